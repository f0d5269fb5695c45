//! cloudrm: runtime and single-binary trainer for Critique-out-Loud reward models.
//!
//! Layers: `loader` (files -> validated views), `kernels` (numerics), `backend` (op
//! dispatch), `model` (the Llama forward), `generate` (decoding loops), `hub` (the
//! default model), `eval` (pairwise accuracy on preference data), `cli` (the `cloudrm`
//! binary's commands).

pub mod backend;
pub mod bench;
pub mod cli;
pub mod cloud;
pub mod engine;
pub mod error;
pub mod eval;
pub mod generate;
pub mod gpu_bench;
pub mod gpu_check;
pub mod hub;
pub mod kv;
pub mod model;

pub use cloudrm_kernels as kernels;
pub use cloudrm_loader as loader;
pub use cloudrm_sampler as sampler;
pub use error::{Error, Result};
