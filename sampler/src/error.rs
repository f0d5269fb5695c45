//! Errors of the sampler crate. Every variant names the culprit (parameter, token, position).

/// Everything that can go wrong while validating parameters or sampling one token.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplerError {
    /// A sampling parameter is out of its domain.
    #[error("invalid sampling parameter `{name}` = {value}: {reason}")]
    InvalidParam {
        /// Field name in `SamplingParams`.
        name: &'static str,
        /// The offending value, formatted.
        value: String,
        /// What the value must satisfy.
        reason: &'static str,
    },
    /// `Sampler::new` was given a vocabulary size that cannot hold `u32` token ids.
    #[error("invalid vocabulary size {vocab_size}: must be in 1..=4294967296 (token ids are u32)")]
    InvalidVocabSize {
        /// The requested vocabulary size.
        vocab_size: usize,
    },
    /// The logits slice is empty.
    #[error("empty logits: nothing to sample from")]
    EmptyLogits,
    /// The logits slice does not have the sampler's vocabulary size.
    #[error(
        "logits length {actual} does not match the sampler's vocabulary size {expected}\nhint: build one Sampler per vocabulary size"
    )]
    VocabMismatch {
        /// Vocabulary size the sampler was built for.
        expected: usize,
        /// Length of the logits slice passed in.
        actual: usize,
    },
    /// A token id in the history (repetition penalty input) is outside the vocabulary.
    #[error(
        "history token {token} at position {position} is outside the vocabulary (size {vocab})"
    )]
    TokenOutOfRange {
        /// The token id.
        token: u32,
        /// Its position in the history slice.
        position: usize,
        /// Vocabulary size.
        vocab: usize,
    },
    /// Every logit is NaN: the model output is broken.
    #[error(
        "all {vocab} logits are NaN\nhint: the forward pass produced NaN; check the weights and the kernels"
    )]
    AllNan {
        /// Vocabulary size.
        vocab: usize,
    },
    /// No token is left to sample: every logit is -inf or NaN (after the repetition penalty).
    #[error("no token can be sampled: all {vocab} logits are -inf or NaN ({nan} of them NaN)")]
    AllMasked {
        /// Vocabulary size.
        vocab: usize,
        /// How many of the logits were NaN.
        nan: usize,
    },
}
