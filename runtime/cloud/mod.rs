//! Critique-out-Loud scoring: the CLoud sequence layout (template.rs) and scoring with
//! self-consistency, classic mode, compare and best-of-n (score.rs).
//!
//! The K critiques of one response run on the paged engine: the shared prefix (prompt +
//! response + critique request) is prefilled once, forked K times without copying, and
//! decoded in lock step with cascade attention over the shared blocks.

mod batch;
mod gpu;
mod score;
pub mod template;

pub use gpu::CudaScorer;
pub use score::{Aggregation, CloudScorer, Comparison, Score, ScoreOptions};
pub use template::{COT_PROMPT, CloudTemplate, split_after_last_content};

/// What pairwise evaluation (`eval`) needs of a scorer, on the CPU or the GPU.
pub trait PairScorer {
    /// The reward model scored with.
    fn reward_model(&self) -> &crate::model::RewardModel;
    /// Compare each (prompt, chosen, rejected) triple; a bad triple's error is its own
    /// result.
    fn compare_many(
        &self,
        triples: &[(&str, &str, &str)],
        opts: &ScoreOptions,
    ) -> crate::error::Result<Vec<crate::error::Result<Comparison>>>;
}

impl PairScorer for CloudScorer<'_> {
    fn reward_model(&self) -> &crate::model::RewardModel {
        self.model
    }

    fn compare_many(
        &self,
        triples: &[(&str, &str, &str)],
        opts: &ScoreOptions,
    ) -> crate::error::Result<Vec<crate::error::Result<Comparison>>> {
        CloudScorer::compare_many(self, triples, opts)
    }
}

impl PairScorer for CudaScorer<'_, '_> {
    fn reward_model(&self) -> &crate::model::RewardModel {
        self.model()
    }

    /// One comparison after another (no batch across triples on the GPU yet).
    fn compare_many(
        &self,
        triples: &[(&str, &str, &str)],
        opts: &ScoreOptions,
    ) -> crate::error::Result<Vec<crate::error::Result<Comparison>>> {
        Ok(triples
            .iter()
            .map(|&(p, a, b)| self.compare(p, a, b, opts))
            .collect())
    }
}

/// Bad scoring requests, each naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error("the {field} is empty")]
    EmptyText { field: &'static str },
    #[error(
        "the {what} is {tokens} tokens plus up to {extra} critique tokens, more than the model's context of {context}"
    )]
    TooLong {
        what: &'static str,
        tokens: usize,
        extra: usize,
        context: usize,
    },
    #[error("invalid option `{name}` = {value}: {reason}")]
    InvalidOption {
        name: &'static str,
        value: String,
        reason: String,
    },
}
