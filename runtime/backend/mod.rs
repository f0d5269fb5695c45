//! Compute backends. The CPU backend has a reference mode (the scalar kernels, the test
//! oracle, ggml's `use_ref`) and a fast mode (SIMD + threads). `cuda` holds the GPU
//! forward (prefill and shared-prefix greedy decode, checked and timed by
//! `cloudrm gpu-check`); the CUDA backend behind the same calls is still to come.

pub mod cpu;
pub mod cuda;

pub use cpu::{Cpu, CpuMode};
