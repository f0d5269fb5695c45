//! Critique-out-Loud scoring: the CLoud sequence layout (template.rs) and scoring with
//! self-consistency, classic mode, compare and best-of-n (score.rs).
//!
//! The K critiques of one response run on the paged engine: the shared prefix (prompt +
//! response + critique request) is prefilled once, forked K times without copying, and
//! decoded in lock step with cascade attention over the shared blocks.

pub mod score;
pub mod template;

pub use score::{Aggregation, CloudScorer, Comparison, Score, ScoreOptions};
pub use template::{COT_PROMPT, CloudTemplate};
