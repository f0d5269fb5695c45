//! safetensors: memory-mapped, header-validated, zero-copy typed views.
//! (skeleton: the loader issue fills this in)

use crate::dtype::Dtype;

#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("{file}: tensor `{name}` not found")]
    MissingTensor { file: String, name: String },
    #[error("{file}: tensor `{name}` has dtype {actual}, expected {expected}")]
    WrongDtype {
        file: String,
        name: String,
        expected: Dtype,
        actual: Dtype,
    },
}
