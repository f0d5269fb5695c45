//! Pairwise evaluation of a reward model: read preference data (RewardBench rows or its
//! Parquet export, Anthropic HH, LLMBar, HHH alignment), compare chosen against rejected
//! with the `CloudScorer`, write one JSON line per example, and summarise accuracy
//! (overall, per subset, RewardBench sections both the official and the CLoud way).
//!
//! - `formats`: file -> rows (`Example` or a per-row error), format auto-detection.
//! - `summary`: per-example results and the summary math.
//! - `run`: the resumable eval loop behind `cloudrm eval`.

pub mod formats;
pub mod run;
pub mod summary;

use std::fmt;

pub use formats::{Container, Dataset, Example, Row, RowRef, Schema, read_examples};
pub use run::{EvalOptions, EvalReport, require_trained_head, run_eval};
pub use summary::{ExampleResult, SectionScores, SubsetStats, Summary};

/// Where a row sits in its file: a 1-based line (JSON lines) or a 0-based index (JSON
/// arrays, Parquet rows).
impl fmt::Display for RowRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RowRef::Line(n) => write!(f, "line {n}"),
            RowRef::Index(n) => write!(f, "index {n}"),
        }
    }
}

/// Errors of the eval command: bad data files and rows, the output file, the head.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: cannot tell the data format from the file name ({reason}); expected .json, \
         .jsonl, .json.gz, .jsonl.gz or .parquet, or pass --format"
    )]
    UnknownFormat { path: String, reason: String },
    #[error("{path}: no examples (empty file)")]
    Empty { path: String },
    #[error("{path}: not a JSON array of rows: {message}")]
    BadJsonFile { path: String, message: String },
    #[error(
        "{path}: cannot tell the row format from the fields of the first valid row ({fields}); \
         pass --format"
    )]
    UnknownSchema { path: String, fields: String },
    #[error("{path}: Parquet: {message}")]
    Parquet { path: String, message: String },
    #[error("{at}: invalid JSON: {message}")]
    BadJson { at: RowRef, message: String },
    #[error("{at}: not a JSON object")]
    NotObject { at: RowRef },
    #[error("{at}: missing field `{field}`")]
    MissingField { at: RowRef, field: &'static str },
    #[error("{at}: field `{field}` is {found}, expected {expected}")]
    BadField {
        at: RowRef,
        field: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error("{at}: bad label {value}: {reason}")]
    BadLabel {
        at: RowRef,
        value: String,
        reason: String,
    },
    #[error("{at}: {reason}")]
    BadTranscript { at: RowRef, reason: String },
    #[error("{at}: duplicate id {id:?} (ids must be unique for --resume)")]
    DuplicateId { at: RowRef, id: String },
    #[error(
        "{path} exists and is not empty: pass --resume to continue it, or choose another --out"
    )]
    OutputExists { path: String },
    #[error("{path}: line {line}: not a result line ({reason}); cannot resume from it")]
    BadOutputLine {
        path: String,
        line: usize,
        reason: String,
    },
    #[error(
        "the reward head of {model} is untrained: its rewards are random noise, not a \
         judgement; refusing to evaluate (pass --allow-untrained to run anyway, e.g. to time it)"
    )]
    UntrainedHead { model: String },
}

impl EvalError {
    /// The row a per-row error names, if it is one.
    pub fn row(&self) -> Option<RowRef> {
        match self {
            EvalError::BadJson { at, .. }
            | EvalError::NotObject { at }
            | EvalError::MissingField { at, .. }
            | EvalError::BadField { at, .. }
            | EvalError::BadLabel { at, .. }
            | EvalError::BadTranscript { at, .. }
            | EvalError::DuplicateId { at, .. } => Some(*at),
            _ => None,
        }
    }
}
