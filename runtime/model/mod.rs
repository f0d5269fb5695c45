//! The Llama-family model: config, named weight views over the mmap, the forward pass.

pub mod heads;
pub mod llama;
pub mod rope;
pub mod weights;

pub use heads::{CheckpointLayout, FeedbackMethod, RewardHead, RewardModel, UNTRAINED_HEAD_SEED};
pub use llama::{CALIBRATION_TEXT, InputEnergies, Llama, LogitsMode, Session, Trace};
pub use weights::{LlamaWeights, WeightHandle};

/// Errors of model loading and running that are not the loader's or a kernel's.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("tensor `{tensor}` has shape {actual:?}, expected {expected:?} (from config.json)")]
    ShapeMismatch {
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor `{tensor}` has dtype {dtype}; weights must be F32, BF16 or F16")]
    UnsupportedDtype { tensor: String, dtype: String },
    #[error(
        "tensor `{tensor}` is not aligned for its dtype in the file (offset not a multiple of {align})"
    )]
    Misaligned { tensor: String, align: usize },
    #[error("context full: {needed} positions needed, the session holds {capacity}")]
    ContextFull { needed: usize, capacity: usize },
    #[error("{}: no reward head (expected `reward_head.out_proj.weight` or `score.weight`)", dir.display())]
    NoRewardHead { dir: std::path::PathBuf },
    #[error("{file}: `feedback_method` is {value}; expected \"vanilla\" or \"teacher\"")]
    BadFeedbackMethod { file: String, value: String },
    #[error(
        "{file}: cannot find the base model's config (`base_model_name_or_path` = {base}): {reason}"
    )]
    BaseConfig {
        file: String,
        base: String,
        reason: String,
    },
    #[error("cannot quantise the model to q8: {0}")]
    Quantize(String),
    #[error("empty input: at least one token is needed")]
    EmptyInput,
    #[error("token id {id} at position {position} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        id: u32,
        position: usize,
        vocab: usize,
    },
}
