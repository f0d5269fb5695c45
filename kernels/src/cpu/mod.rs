//! Fast CPU kernels: same names and signatures as `reference/`, dispatched on CPU
//! features detected at run time (never compiled with target-cpu=native). Ops without
//! a fast version yet re-export the reference.

pub mod attention;
pub mod dispatch;
pub mod heads;
pub mod matmul;
pub mod pool;

pub use crate::reference::embedding::embedding_forward;
pub use crate::reference::residual::residual_forward;
pub use crate::reference::rmsnorm::rmsnorm_forward;
pub use crate::reference::rope::rope_forward;
pub use crate::reference::swiglu::swiglu_forward;
pub use attention::{
    attention_forward, cascade_decode_attention, paged_decode_attention, paged_prefill_attention,
};
pub use heads::{dual_head_forward, reward_head_forward};
pub use matmul::{Linear, matmul_forward, matmul_forward_many};
