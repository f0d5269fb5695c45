//! cloudrm-kernels: numerics only, no model knowledge, no allocation in hot paths.
//!
//! `reference/` holds the scalar, obviously-right f32 version of every op, one file per
//! op family, forward and backward side by side (llm.c). `cpu/` holds the fast versions
//! with the same names and signatures; tests hold every fast path to the reference.
//!
//! Shape letters used in comments: B rows, T tokens, C hidden, NH query heads, NKV key/value
//! heads, HS head size, I MLP width, V vocab, S cached positions, OC output channels.

pub mod cpu;
pub mod cuda;
pub mod error;
pub mod kv;
pub mod reference;
pub mod weights;

pub use error::KernelError;
pub use kv::KvElem;
pub use weights::Weights;

/// The op inventory. Every op has a reference and is covered by tests on every backend
/// (the coverage test iterates `OpKind::ALL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Embedding,
    RmsNorm,
    Rope,
    Matmul,
    Attention,
    SwiGlu,
    Residual,
    RewardHead,
    DualHead,
    PagedAttention,
    CascadeAttention,
    PagedPrefillAttention,
    LmHeadTopK,
}

impl OpKind {
    pub const ALL: [OpKind; 13] = [
        OpKind::Embedding,
        OpKind::RmsNorm,
        OpKind::Rope,
        OpKind::Matmul,
        OpKind::Attention,
        OpKind::SwiGlu,
        OpKind::Residual,
        OpKind::RewardHead,
        OpKind::DualHead,
        OpKind::PagedAttention,
        OpKind::CascadeAttention,
        OpKind::PagedPrefillAttention,
        OpKind::LmHeadTopK,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            OpKind::Embedding => "embedding",
            OpKind::RmsNorm => "rmsnorm",
            OpKind::Rope => "rope",
            OpKind::Matmul => "matmul",
            OpKind::Attention => "attention",
            OpKind::SwiGlu => "swiglu",
            OpKind::Residual => "residual",
            OpKind::RewardHead => "reward_head",
            OpKind::DualHead => "dual_head",
            OpKind::PagedAttention => "paged_attention",
            OpKind::CascadeAttention => "cascade_attention",
            OpKind::PagedPrefillAttention => "paged_prefill_attention",
            OpKind::LmHeadTopK => "lm_head_topk",
        }
    }
}
