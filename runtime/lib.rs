//! cloudrm: runtime and single-binary trainer for Critique-out-Loud reward models.

pub use cloudrm_kernels as kernels;
pub use cloudrm_loader as loader;
pub use cloudrm_sampler as sampler;
