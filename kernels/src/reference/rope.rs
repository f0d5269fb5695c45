//! Rotary position embedding, rotate-half form (GPT-NeoX / Hugging Face Llama):
//! for i < HS/2, with f = pos * inv_freq[i] computed in f32 as transformers does,
//!   out[i]        = x[i] * cos(f) - x[i + HS/2] * sin(f)
//!   out[i + HS/2] = x[i + HS/2] * cos(f) + x[i] * sin(f)
//! (transformers `apply_rotary_pos_emb` with `rotate_half`). In place.

use crate::error::{KernelError, check_len};

/// x: (T, H, HS) in place; positions: (T); inv_freq: (HS/2).
pub fn rope_forward(
    x: &mut [f32],
    positions: &[u32],
    n_heads: usize,
    head_dim: usize,
    inv_freq: &[f32],
) -> Result<(), KernelError> {
    const OP: &str = "rope_forward";
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(KernelError::Invalid {
            op: OP,
            arg: "head_dim",
            reason: format!("{head_dim} must be positive and even"),
        });
    }
    let half = head_dim / 2;
    check_len(OP, "inv_freq", inv_freq.len(), half)?;
    check_len(OP, "x", x.len(), positions.len() * n_heads * head_dim)?;
    if n_heads == 0 {
        return Ok(());
    }
    for (row, &pos) in x.chunks_exact_mut(n_heads * head_dim).zip(positions) {
        for head in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let f = pos as f32 * inv_freq[i];
                let (sin, cos) = f.sin_cos();
                let a = head[i];
                let b = head[i + half];
                head[i] = a * cos - b * sin;
                head[i + half] = b * cos + a * sin;
            }
        }
    }
    Ok(())
}
