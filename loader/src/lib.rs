//! cloudrm-loader: everything that turns files on disk into validated, typed, zero-copy
//! views: safetensors (single file and sharded), GGUF (read, dequantise, import to the
//! Hugging Face layout), `config.json`, `tokenizer.json` and the chat template.
//!
//! Every fallible call returns a typed error that names the file, tensor, field or
//! offset at fault; nothing here panics on bad input.

pub mod config;
pub mod dtype;
pub mod error;
pub mod gguf;
pub mod pages;
pub mod safetensors;
pub mod shards;
pub mod template;
pub mod tokenizer;

pub use config::{ConfigError, LlamaConfig, RopeScaling};
pub use dtype::Dtype;
pub use error::LoaderError;
