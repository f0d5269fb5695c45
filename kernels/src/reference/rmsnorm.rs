//! RMSNorm: out = x / sqrt(mean(x^2) + eps) * weight, per row.
//! Matches transformers' `LlamaRMSNorm` (variance in f32). f32 accumulation.

use crate::error::{KernelError, check_len};
use crate::weights::Weights;

/// out, inp: (N, C); weight: (C).
pub fn rmsnorm_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: Weights<'_>,
    eps: f32,
) -> Result<(), KernelError> {
    const OP: &str = "rmsnorm_forward";
    let c = weight.len();
    if c == 0 {
        return Err(KernelError::Invalid {
            op: OP,
            arg: "weight",
            reason: "empty".into(),
        });
    }
    check_len(OP, "out", out.len(), inp.len())?;
    if !inp.len().is_multiple_of(c) {
        return Err(KernelError::Invalid {
            op: OP,
            arg: "inp",
            reason: format!("{} elements is not a multiple of C={c}", inp.len()),
        });
    }
    for (o, x) in out.chunks_exact_mut(c).zip(inp.chunks_exact(c)) {
        let mut ss = 0.0f32;
        for &v in x {
            ss += v * v;
        }
        let rstd = 1.0 / (ss / c as f32 + eps).sqrt();
        for (i, (o, &v)) in o.iter_mut().zip(x).enumerate() {
            *o = weight.get(i) * (v * rstd);
        }
    }
    Ok(())
}
