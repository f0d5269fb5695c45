//! Linear layer: out = inp @ weight^T + bias, i.e. out[b, o] = sum_c inp[b, c] * w[o, c] + bias[o].
//! Matches `torch.nn.functional.linear`. Weight rows in their stored dtype, f32 accumulation.

use crate::error::{KernelError, check_len};
use crate::weights::Weights;

/// out: (B, OC); inp: (B, C); weight: (OC, C); bias: (OC).
pub fn matmul_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: Weights<'_>,
    bias: Option<&[f32]>,
    in_features: usize,
    out_features: usize,
) -> Result<(), KernelError> {
    const OP: &str = "matmul_forward";
    check_shapes(OP, out, inp, &weight, bias, in_features, out_features)?;
    for (o_row, x) in out
        .chunks_exact_mut(out_features)
        .zip(inp.chunks_exact(in_features))
    {
        for (o, dst) in o_row.iter_mut().enumerate() {
            let w = weight.slice(o * in_features, in_features);
            let mut acc = 0.0f32;
            for (c, &xc) in x.iter().enumerate() {
                acc += xc * w.get(c);
            }
            *dst = acc + bias.map_or(0.0, |b| b[o]);
        }
    }
    Ok(())
}

/// The O(1) argument checks shared by every matmul implementation.
pub fn check_shapes(
    op: &'static str,
    out: &[f32],
    inp: &[f32],
    weight: &Weights<'_>,
    bias: Option<&[f32]>,
    in_features: usize,
    out_features: usize,
) -> Result<(), KernelError> {
    if in_features == 0 || out_features == 0 {
        return Err(KernelError::Invalid {
            op,
            arg: "in_features/out_features",
            reason: "must be positive".into(),
        });
    }
    check_len(op, "weight", weight.len(), in_features * out_features)?;
    weight.check_rows(op, in_features)?;
    if !inp.len().is_multiple_of(in_features) {
        return Err(KernelError::Invalid {
            op,
            arg: "inp",
            reason: format!(
                "{} elements is not a multiple of C={in_features}",
                inp.len()
            ),
        });
    }
    check_len(op, "out", out.len(), inp.len() / in_features * out_features)?;
    if let Some(b) = bias {
        check_len(op, "bias", b.len(), out_features)?;
    }
    Ok(())
}
