//! cloudrm-kernels: numerics only, no model knowledge, no allocation in hot paths.
//!
//! `reference/` holds the scalar, obviously-right f32 version of every op, one file per
//! op family, forward and backward side by side (llm.c). `cpu/` holds the fast versions
//! with the same names and signatures; tests hold every fast path to the reference.
//!
//! Shape letters used in comments: B rows, T tokens, C hidden, NH query heads, NKV key/value
//! heads, HS head size, I MLP width, V vocab, S cached positions, OC output channels.

/// For each `$name = $features`, `unsafe fn $name(args) -> ret` calling `$body(args)`,
/// compiled with `#[target_feature(enable = $features)]` on x86-64: the same plain-Rust
/// operations as the portable build (`$body`, `#[inline(always)]`), so the same bits, in
/// wider vectors. Each is safe to call only where its features are present.
macro_rules! target_builds {
    (@one $name:ident $features:literal $body:ident ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
            $body($($arg),*)
        }
    };
    ($body:ident $args:tt; $($name:ident = $features:literal),+ $(,)?) => {
        $(target_builds!(@one $name $features $body $args);)+
    };
    ($body:ident $args:tt -> $ret:ty; $($name:ident = $features:literal),+ $(,)?) => {
        $(target_builds!(@one $name $features $body $args -> $ret);)+
    };
}

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
