//! The CUDA backend's typed errors: missing libraries or devices, driver and cuBLAS
//! failures, NVRTC compilation, and arguments rejected on the host before a launch.

use std::path::PathBuf;

/// Errors of the CUDA path (compilation, device, launches). Never a panic: cudarc's
/// loaders panic when a library is missing, so every entry point probes first and
/// catches a panic anyway.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaError {
    /// No NVRTC library could be loaded.
    #[error("NVRTC is not available: {0}")]
    NvrtcMissing(String),
    /// NVRTC rejected a kernel file; `log` is its program log.
    #[error("NVRTC failed to compile {file} for {arch}:\n{log}")]
    Compile {
        file: &'static str,
        arch: &'static str,
        log: String,
    },
    /// Any other NVRTC failure (program creation, PTX retrieval, a panic inside cudarc).
    #[error("NVRTC error on {file}: {reason}")]
    Nvrtc { file: &'static str, reason: String },
    /// Reading or writing the PTX cache.
    #[error("PTX cache {path}: {reason}")]
    Cache { path: PathBuf, reason: String },
    /// The CUDA driver library (libcuda) could not be loaded.
    #[error(
        "the CUDA driver is not available: {0}\nhint: a GPU machine has libcuda.so.1 on the library search path (ldconfig or LD_LIBRARY_PATH)"
    )]
    DriverMissing(String),
    /// The driver loaded but reports no usable device (or not the one asked for).
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// The device's compute capability is below what the kernels are built for.
    #[error("unsupported GPU: compute capability {major}.{minor} (sm_80 or newer is needed)")]
    UnsupportedArch { major: i32, minor: i32 },
    /// A CUDA driver call failed (`op` names the call or the kernel launched).
    #[error("CUDA driver error in {op}: {reason}")]
    Driver { op: String, reason: String },
    /// The cuBLAS library could not be loaded.
    #[error(
        "cuBLAS is not available: {0}\nhint: put the folder holding libcublas.so.13 and libcublasLt.so.13 on LD_LIBRARY_PATH"
    )]
    CublasMissing(String),
    /// A cuBLAS call failed.
    #[error("cuBLAS error in {op}: {reason}")]
    Cublas { op: String, reason: String },
    /// An argument rejected on the host before any launch (shape, length, alignment, an
    /// index out of range).
    #[error("{op}: invalid argument `{arg}`: {reason}")]
    BadArgument {
        op: &'static str,
        arg: &'static str,
        reason: String,
    },
    /// A device buffer has the wrong number of elements.
    #[error("{op}: `{arg}` has {actual} elements, expected {expected}")]
    Length {
        op: &'static str,
        arg: &'static str,
        expected: usize,
        actual: usize,
    },
    /// The embedding kernel met a token id outside the vocabulary (first offending
    /// position it recorded).
    #[error("embedding: token id at position {position} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { position: usize, vocab: usize },
}

impl CudaError {
    pub fn bad(op: &'static str, arg: &'static str, reason: impl Into<String>) -> Self {
        CudaError::BadArgument {
            op,
            arg,
            reason: reason.into(),
        }
    }

    pub(crate) fn driver(op: impl Into<String>, e: impl std::fmt::Display) -> Self {
        CudaError::Driver {
            op: op.into(),
            reason: e.to_string(),
        }
    }
}

/// `Ok` when `actual == expected`, else [`CudaError::Length`].
pub fn check_len(
    op: &'static str,
    arg: &'static str,
    actual: usize,
    expected: usize,
) -> Result<(), CudaError> {
    if actual == expected {
        Ok(())
    } else {
        Err(CudaError::Length {
            op,
            arg,
            expected,
            actual,
        })
    }
}

/// The text of a caught panic.
pub(crate) fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic inside cudarc".to_string())
}
