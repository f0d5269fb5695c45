//! GGUF v3 (and v2): reader, dequantisation, import to the Hugging Face layout.
//!
//! - [`reader`]: validated parse of the header, metadata and tensor infos over a memory
//!   map ([`GgufFile`]).
//! - [`dequant`]: ggml blocks to f32 (F32, F16, BF16, Q8_0, Q8_1, Q4_0, Q4_1, Q5_0, Q5_1,
//!   Q4_K, Q6_K).
//! - [`import`]: a llama / qwen2 GGUF to model.safetensors, config.json, tokenizer.json,
//!   tokenizer_config.json and generation_config.json ([`import_gguf`]).
//! - [`tokenizer_json`]: the GGUF vocabulary as a `tokenizers` tokenizer.json.

use std::path::Path;

use crate::LoaderError;

pub mod dequant;
pub mod import;
pub mod reader;
pub mod tokenizer_json;

pub use import::{hf_tensor_name, unpermute_rows};
pub use reader::{GgmlType, GgufArray, GgufFile, GgufValue, TensorInfo};

/// Errors from reading or importing a GGUF file. `file` is the GGUF path as given.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{file}: bad magic (not a GGUF file)")]
    BadMagic { file: String },
    #[error("{file}: unsupported GGUF version {version} (supported: 2, 3)")]
    BadVersion { file: String, version: u32 },
    #[error("{file}: truncated: {what} runs past the end of the file (offset {offset})")]
    Truncated {
        file: String,
        what: String,
        offset: u64,
    },
    #[error("{file}: {what} at offset {offset} is not valid UTF-8")]
    BadString {
        file: String,
        what: String,
        offset: u64,
    },
    #[error("{file}: metadata `{key}` has unknown value type {value_type}")]
    BadValueType {
        file: String,
        key: String,
        value_type: u32,
    },
    #[error("{file}: metadata key `{key}` appears twice")]
    DuplicateKey { file: String, key: String },
    #[error("{file}: metadata `{key}` is {actual}, expected {expected}")]
    WrongType {
        file: String,
        key: String,
        expected: &'static str,
        actual: &'static str,
    },
    #[error("{file}: metadata `{key}`: {reason}")]
    BadMetadata {
        file: String,
        key: String,
        reason: String,
    },
    #[error("{file}: required metadata `{key}` is missing")]
    MissingKey { file: String, key: String },
    #[error("{file}: general.alignment {alignment} is not a power of two")]
    BadAlignment { file: String, alignment: u64 },
    #[error("{file}: tensor `{tensor}` has {n_dims} dimensions (1 to 4 allowed)")]
    BadDims {
        file: String,
        tensor: String,
        n_dims: u32,
    },
    #[error("{file}: tensor `{tensor}`: {reason}")]
    BadShape {
        file: String,
        tensor: String,
        reason: String,
    },
    #[error(
        "{file}: tensor `{tensor}` offset {offset} is not a multiple of the alignment {alignment}"
    )]
    BadTensorOffset {
        file: String,
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error("{file}: tensor `{tensor}` appears twice")]
    DuplicateTensor { file: String, tensor: String },
    #[error(
        "{file}: tensor `{tensor}` has unsupported ggml type {ggml_type}\nhint: supported: F32, F16, \
         BF16, F64, Q8_0, Q8_1, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K"
    )]
    UnsupportedTensorType {
        file: String,
        tensor: String,
        ggml_type: u32,
    },
    #[error("{file}: tensor `{tensor}` not found")]
    MissingTensor { file: String, tensor: String },
    #[error("{file}: tensor `{tensor}` has no Hugging Face counterpart in a {arch} model")]
    UnexpectedTensor {
        file: String,
        tensor: String,
        arch: String,
    },
    #[error(
        "{file}: tensor `{tensor}` has shape {actual:?}, expected {expected:?} from the metadata"
    )]
    TensorShape {
        file: String,
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{file}: unsupported architecture `{arch}` (supported: llama, qwen2)")]
    UnsupportedArchitecture { file: String, arch: String },
    #[error("{file}: unsupported tokenizer model `{model}` (supported: gpt2)")]
    UnsupportedTokenizer { file: String, model: String },
    #[error(
        "{file}: unsupported pre-tokenizer `{name}` (supported: default, gpt2, smollm, llama-bpe, qwen2)"
    )]
    UnsupportedPreTokenizer { file: String, name: String },
    #[error("{file}: cannot build tokenizer.json: {reason}")]
    BadTokenizer { file: String, reason: String },
}

/// Element type of the imported safetensors weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutDtype {
    F32,
    F16,
    #[default]
    BF16,
}

impl OutDtype {
    /// The `torch_dtype` name written to config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            OutDtype::F32 => "float32",
            OutDtype::F16 => "float16",
            OutDtype::BF16 => "bfloat16",
        }
    }
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
/// tokenizer.json, tokenizer_config.json and generation_config.json. Atomic: the files
/// are built in a temporary directory next to `out_dir` and moved in only when all of
/// them are complete; on error nothing is left behind.
pub fn import_gguf(
    gguf: &Path,
    out_dir: &Path,
    opts: &ImportOptions,
) -> Result<ImportReport, LoaderError> {
    import::import(gguf, out_dir, opts)
}
