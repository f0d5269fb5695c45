//! cloudrm-kernels: numerics only, no model knowledge, no allocation in hot paths.
//!
//! `reference/` holds the scalar, obviously-right f32 version of every op, one file per
//! op family, forward and backward side by side. Fast paths (SIMD, CUDA) are tested
//! against it.

pub mod reference;
