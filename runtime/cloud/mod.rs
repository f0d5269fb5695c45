//! Critique-out-Loud scoring: the CLoud sequence layout (template.rs) and scoring with
//! self-consistency, classic mode, compare and best-of-n (score.rs).
//!
//! This first version runs on one contiguous `Session`: the shared prefix (prompt +
//! response + critique request) is prefilled once and each of the K critiques continues
//! it after truncating the session back to the prefix, so nothing shared is recomputed.
//! The paged, batched engine (all K critiques decoded in lock step over shared prefix
//! blocks) replaces the sequential critique loop in a later step.

pub mod score;
pub mod template;

pub use score::{Aggregation, CloudScorer, Comparison, Score, ScoreOptions};
pub use template::{COT_PROMPT, CloudTemplate};
