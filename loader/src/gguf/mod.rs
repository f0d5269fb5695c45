//! GGUF v3: reader, dequantisation, import to the Hugging Face layout. (skeleton: the
//! GGUF part of the loader issue fills this in; the signatures below are the contract
//! other modules call.)

use std::path::Path;

use crate::LoaderError;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{file}: bad magic")]
    BadMagic { file: String },
    #[error("GGUF import is not implemented yet")]
    NotImplemented,
}

/// Element type of the imported safetensors weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutDtype {
    F32,
    F16,
    #[default]
    BF16,
}

#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    pub dtype: OutDtype,
}

#[derive(Debug, Clone, Default)]
pub struct ImportReport {
    /// Number of tensors written to model.safetensors.
    pub tensors: usize,
    /// Bytes of model.safetensors.
    pub bytes_written: u64,
}

/// Import `gguf` into `out_dir` (created if needed) as model.safetensors, config.json,
/// tokenizer.json and tokenizer_config.json. Atomic: on error nothing is left half-written.
pub fn import_gguf(gguf: &Path, out_dir: &Path, opts: &ImportOptions) -> Result<ImportReport, LoaderError> {
    let _ = (gguf, out_dir, opts);
    Err(GgufError::NotImplemented.into())
}
