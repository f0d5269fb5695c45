//! Compute backends. The CPU backend has a reference mode (the scalar kernels, the test
//! oracle, ggml's `use_ref`) and a fast mode (SIMD + threads). The CUDA backend arrives
//! with its own issue behind the same calls.

pub mod cpu;

pub use cpu::{Cpu, CpuMode};
