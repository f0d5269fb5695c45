//! The crate-wide error: every layer's typed error converts into it with `?`.

use cloudrm_kernels::KernelError;
use cloudrm_loader::LoaderError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
    #[error(transparent)]
    Kv(#[from] crate::kv::KvError),
    #[error(transparent)]
    Cloud(#[from] crate::cloud::CloudError),
    #[error(transparent)]
    Eval(#[from] crate::eval::EvalError),
    #[error(transparent)]
    Cuda(#[from] cloudrm_kernels::cuda::CudaError),
    #[error("gpu-check: {failed} of {total} checks failed (see {})", log.display())]
    GpuCheckFailed {
        failed: usize,
        total: usize,
        log: std::path::PathBuf,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
}

impl From<cloudrm_loader::safetensors::SafetensorsError> for Error {
    fn from(e: cloudrm_loader::safetensors::SafetensorsError) -> Self {
        Error::Loader(e.into())
    }
}

impl From<cloudrm_loader::tokenizer::TokenizerError> for Error {
    fn from(e: cloudrm_loader::tokenizer::TokenizerError) -> Self {
        Error::Loader(e.into())
    }
}

impl From<cloudrm_loader::template::TemplateError> for Error {
    fn from(e: cloudrm_loader::template::TemplateError) -> Self {
        Error::Loader(e.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<cloudrm_loader::config::ConfigError> for Error {
    fn from(e: cloudrm_loader::config::ConfigError) -> Self {
        Error::Loader(e.into())
    }
}
