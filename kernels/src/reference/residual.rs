//! Residual add: acc += x.

use crate::error::{KernelError, check_len};

/// acc, x: (N) with N any shape flattened.
pub fn residual_forward(acc: &mut [f32], x: &[f32]) -> Result<(), KernelError> {
    check_len("residual_forward", "x", x.len(), acc.len())?;
    for (a, &b) in acc.iter_mut().zip(x) {
        *a += b;
    }
    Ok(())
}
