//! Fast CPU kernels: same names and signatures as `reference/`, dispatched on CPU
//! features detected at run time (never compiled with target-cpu=native). Ops without
//! a fast version yet re-export the reference.

pub mod attention;
pub mod dispatch;
pub mod heads;
pub mod matmul;
pub mod pool;
pub mod rowwise;
mod simd;

pub use crate::reference::embedding::embedding_forward;
pub use attention::{
    attention_forward, cascade_decode_attention, paged_decode_attention, paged_prefill_attention,
};
pub use heads::{dual_head_forward, lm_head_topk, reward_head_forward};
pub use matmul::{
    Fusion, Linear, NormIn, RopeOut, matmul_forward, matmul_forward_many,
    matmul_forward_many_fused, matmul_swiglu,
};
pub use rowwise::{RopeTable, residual_forward, rmsnorm_forward, rope_forward, swiglu_forward};
