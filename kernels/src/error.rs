//! Kernel argument errors. Public kernels do O(1) length checks and return these; inner
//! loops only `debug_assert!`.

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KernelError {
    #[error("{op}: `{arg}` has {actual} elements, expected {expected}")]
    Length {
        op: &'static str,
        arg: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("{op}: invalid argument `{arg}`: {reason}")]
    Invalid {
        op: &'static str,
        arg: &'static str,
        reason: String,
    },
    #[error("{op}: token id {id} at position {position} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        op: &'static str,
        id: u32,
        position: usize,
        vocab: usize,
    },
}

/// `Ok` when `actual == expected`, else a `KernelError::Length`.
#[inline]
pub fn check_len(
    op: &'static str,
    arg: &'static str,
    actual: usize,
    expected: usize,
) -> Result<(), KernelError> {
    if actual == expected {
        Ok(())
    } else {
        Err(KernelError::Length {
            op,
            arg,
            expected,
            actual,
        })
    }
}
