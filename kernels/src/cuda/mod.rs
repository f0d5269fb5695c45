//! CUDA backend, first part: the kernel sources and their compilation.
//!
//! The kernels live in `kernels/cuda/*.cu` (one file per op family, bf16 storage, f32
//! accumulation; launch configurations and argument layouts are documented at the top of
//! each file, see also docs/cuda.md). `kernels/build.rs` embeds them, with the shared
//! `common.cuh`, into the library; [`nvrtc`] compiles them to PTX with NVRTC, loaded at
//! run time (nothing here links against CUDA, so the crate builds and its CPU paths run on
//! machines without it), and caches the PTX on disk.
//!
//! [`device`] opens the GPU behind presence checks (typed errors, never a panic) and
//! caches the loaded modules; [`ops`] has one checked launch wrapper per kernel entry
//! point and the cuBLAS bf16 GEMM; [`plan`] builds the cascade / split-K / prefill work
//! items of the attention kernels on the host. Not here yet: CUDA graphs, a GPU backend
//! behind the model's forward.

pub mod device;
pub mod error;
pub mod launch;
pub mod nvrtc;
pub mod ops;
pub mod plan;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/cuda_sources.rs"));
}

/// The cudarc version the wrappers are written against (buffers are its `CudaSlice`s).
pub use cudarc;
pub use device::{CudaDevice, DeviceInfo, IndexBuf, Kernel, Param};
pub use error::{CudaError, check_len};
pub use launch::SampleParams;
pub use nvrtc::{compile_ptx, compile_ptx_cached, ptx_cache_dir};
pub use ops::{DevicePlan, GemmOut};
pub use plan::{PlanOptions, PlanPart, WorkItem, WorkPlan};

/// `common.cuh`: the helpers every kernel file is compiled with.
pub const COMMON: &str = embedded::COMMON;

/// The committed list of kernels that must compile without spills or local memory
/// (`kernels/cuda/spill_free.txt`, one `extern "C"` kernel name per line, `#` comments).
pub const SPILL_FREE_MANIFEST: &str = include_str!("../../cuda/spill_free.txt");

/// Kernel names listed in [`SPILL_FREE_MANIFEST`].
pub fn spill_free_kernels() -> impl Iterator<Item = &'static str> {
    SPILL_FREE_MANIFEST
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
}

/// One embedded kernel file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSource {
    /// File name, e.g. `attention.cu`.
    pub name: &'static str,
    /// The file's text (without `common.cuh`).
    pub text: &'static str,
}

impl KernelSource {
    /// The translation unit NVRTC compiles: `common.cuh`, then a `#line 1 "<name>"` so
    /// compiler messages point into the kernel file, then the file.
    pub fn full_source(&self) -> String {
        format!(
            "{COMMON}\n#line 1 \"{name}\"\n{text}",
            name = self.name,
            text = self.text
        )
    }

    /// The file name without `.cu`.
    pub fn stem(&self) -> &'static str {
        self.name.strip_suffix(".cu").unwrap_or(self.name)
    }
}

/// Every embedded `kernels/cuda/*.cu` file, sorted by name.
pub fn sources() -> impl Iterator<Item = KernelSource> {
    embedded::FILES
        .iter()
        .map(|&(name, text)| KernelSource { name, text })
}

/// The embedded file called `name` (e.g. `"rmsnorm.cu"`).
pub fn source(name: &str) -> Option<KernelSource> {
    sources().find(|s| s.name == name)
}

/// A GPU architecture the kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// Ampere (A100): compute capability 8.0.
    Sm80,
    /// Hopper (H100, H200): compute capability 9.0.
    Sm90,
}

impl Arch {
    /// Every supported architecture.
    pub const ALL: [Arch; 2] = [Arch::Sm80, Arch::Sm90];

    /// The SASS target name, `sm_80` / `sm_90` (what `ptxas -arch` takes).
    pub const fn sm(self) -> &'static str {
        match self {
            Arch::Sm80 => "sm_80",
            Arch::Sm90 => "sm_90",
        }
    }

    /// The virtual architecture NVRTC generates PTX for, `compute_80` / `compute_90`.
    pub const fn compute(self) -> &'static str {
        match self {
            Arch::Sm80 => "compute_80",
            Arch::Sm90 => "compute_90",
        }
    }

    /// The best supported architecture for a device of compute capability major.minor:
    /// PTX for `compute_XY` runs on every later device (the driver JIT-compiles it).
    pub fn for_device(major: u32, minor: u32) -> Option<Arch> {
        match (major, minor) {
            (9.., _) => Some(Arch::Sm90),
            (8, _) => Some(Arch::Sm80),
            _ => None,
        }
    }
}

/// The `.visible .entry` kernel names defined in a PTX text, in order.
pub fn ptx_entries(ptx: &str) -> Vec<&str> {
    ptx.lines()
        .filter_map(|l| l.trim_start().strip_prefix(".visible .entry "))
        .map(|rest| rest.split(['(', ' ']).next().unwrap_or(rest).trim())
        .collect()
}

/// The parameter types (`.u64`, `.u32`, `.f32`, ...) of entry `name` in a PTX text, in
/// order; None when the PTX does not define it.
pub fn ptx_entry_params(ptx: &str, name: &str) -> Option<Vec<String>> {
    let mut lines = ptx.lines().map(str::trim);
    lines.find(|l| {
        l.strip_prefix(".visible .entry ")
            .and_then(|rest| rest.strip_prefix(name))
            .is_some_and(|rest| rest.starts_with('('))
    })?;
    let mut params = Vec::new();
    for l in lines {
        if l.starts_with(')') {
            return Some(params);
        }
        if let Some(rest) = l.strip_prefix(".param ") {
            params.push(rest.split_whitespace().next().unwrap_or("").to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_family_is_embedded() {
        let names: Vec<_> = sources().map(|s| s.name).collect();
        for f in [
            "argmax.cu",
            "attention.cu",
            "embedding.cu",
            "heads.cu",
            "rmsnorm.cu",
            "rope.cu",
            "swiglu.cu",
        ] {
            assert!(names.contains(&f), "{f} not embedded: {names:?}");
        }
        assert!(COMMON.contains("bf16_to_f32"));
        let src = source("rmsnorm.cu").unwrap().full_source();
        assert!(src.contains("#line 1 \"rmsnorm.cu\""));
        assert!(src.find("warp_sum") < src.find("residual_rmsnorm_bf16"));
    }

    #[test]
    fn manifest_names_look_like_kernels() {
        let names: Vec<_> = spill_free_kernels().collect();
        assert!(!names.is_empty());
        for n in names {
            assert!(
                n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{n:?}"
            );
        }
    }

    #[test]
    fn ptx_entry_names() {
        let ptx = "//\n.visible .entry argmax_f32(\n\t.param .u64 a\n)\n.visible .entry x_hs64(\n";
        assert_eq!(ptx_entries(ptx), ["argmax_f32", "x_hs64"]);
    }

    #[test]
    fn ptx_params() {
        let ptx = ".visible .entry a_hs64(\n\t.param .u64 a_hs64_param_0\n)\n\
            .visible .entry a(\n\t.param .u64 .ptr .align 1 a_param_0,\n\
            \t.param .u32 a_param_1,\n\t.param .f32 a_param_2\n)\n{\n}\n";
        assert_eq!(
            ptx_entry_params(ptx, "a").unwrap(),
            [".u64", ".u32", ".f32"]
        );
        assert_eq!(ptx_entry_params(ptx, "a_hs64").unwrap(), [".u64"]);
        assert_eq!(ptx_entry_params(ptx, "b"), None);
    }

    #[test]
    fn arch_for_device() {
        assert_eq!(Arch::for_device(9, 0), Some(Arch::Sm90));
        assert_eq!(Arch::for_device(8, 6), Some(Arch::Sm80));
        assert_eq!(Arch::for_device(7, 5), None);
        assert_eq!(Arch::Sm90.sm(), "sm_90");
    }
}
