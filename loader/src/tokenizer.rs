//! tokenizer.json through the `tokenizers` crate. (skeleton)

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: tokenizer.json not found")]
    Missing { path: String },
}
