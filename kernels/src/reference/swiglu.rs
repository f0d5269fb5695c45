//! SwiGLU: out = silu(gate) * up, silu(x) = x * sigmoid(x) = x / (1 + exp(-x)).
//! Matches transformers' LlamaMLP `act_fn(gate_proj(x)) * up_proj(x)`.

use crate::error::{KernelError, check_len};

/// out, gate, up: (N, I).
pub fn swiglu_forward(out: &mut [f32], gate: &[f32], up: &[f32]) -> Result<(), KernelError> {
    const OP: &str = "swiglu_forward";
    check_len(OP, "gate", gate.len(), out.len())?;
    check_len(OP, "up", up.len(), out.len())?;
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
    Ok(())
}
