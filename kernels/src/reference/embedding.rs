//! Token embedding gather: out[t, :] = table[ids[t], :].
//! Matches `torch.nn.Embedding`. Pure copy (with dtype conversion to f32).

use crate::error::{KernelError, check_len};
use crate::weights::Weights;

/// out: (T, C) f32; ids: (T); table: (V, C).
pub fn embedding_forward(
    out: &mut [f32],
    ids: &[u32],
    table: Weights<'_>,
    channels: usize,
) -> Result<(), KernelError> {
    const OP: &str = "embedding_forward";
    check_len(OP, "out", out.len(), ids.len() * channels)?;
    if channels == 0 || !table.len().is_multiple_of(channels) {
        return Err(KernelError::Invalid {
            op: OP,
            arg: "table",
            reason: format!("{} elements is not a multiple of C={channels}", table.len()),
        });
    }
    table.check_rows(OP, channels)?;
    let vocab = table.len() / channels;
    for (t, (&id, row)) in ids.iter().zip(out.chunks_exact_mut(channels)).enumerate() {
        if id as usize >= vocab {
            return Err(KernelError::TokenOutOfRange {
                op: OP,
                id,
                position: t,
                vocab,
            });
        }
        let src = table.slice(id as usize * channels, channels);
        for (c, o) in row.iter_mut().enumerate() {
            *o = src.get(c);
        }
    }
    Ok(())
}
