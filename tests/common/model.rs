//! The default model for real-model tests: fetched and imported once per machine (or per
//! $CLOUDRM_HOME), shared by every test binary through the hub's file lock.
#![allow(dead_code)]

use std::path::PathBuf;

use cloudrm::hub;
use cloudrm::loader::gguf::OutDtype;

/// The imported default model in `dtype`; panics with the hub's error (a test failure)
/// when it cannot be had.
pub fn default_model(dtype: OutDtype) -> PathBuf {
    match hub::ensure_default_model(dtype) {
        Ok(dir) => dir,
        Err(e) => panic!("default model unavailable: {e}"),
    }
}
