//! The loader's error type: one variant per module, each module owning its own enum so
//! that the culprit (file, tensor, field, offset) travels with the error.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Safetensors(#[from] crate::safetensors::SafetensorsError),
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error(transparent)]
    Template(#[from] crate::template::TemplateError),
}

impl LoaderError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LoaderError::Io {
            path: path.into(),
            source,
        }
    }
}
