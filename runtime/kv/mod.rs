//! Paged KV cache with prefix sharing: the bookkeeping the engine uses to place K/V rows,
//! and a CPU storage arena that executes it.
//!
//! # Design (ported from vLLM v1 `KVCacheManager` / `BlockPool` / `FreeKVCacheBlockQueue`)
//!
//! The cache is `num_blocks` fixed-size blocks of `block_size` token positions. A sequence
//! owns a [`BlockTable`] (its block ids in position order plus the number of filled
//! positions); position `p` lives in block `blocks[p / block_size]` at row `p % block_size`.
//! Nothing is ever concatenated: a sequence grows by taking blocks from the pool.
//!
//! - **Ref counts.** Every block has a ref count = number of block tables holding it.
//!   [`KvManager::fork`] clones a table and increfs its blocks (no copy, no allocation), so
//!   K critiques that continue one prefix share every prefix block (ref count K + 1).
//! - **Copy-on-write of the partial last block.** A full block is immutable. A partially
//!   filled last block shared by several tables is copied the first time one of them
//!   appends into it: [`KvManager::append_slots`] allocates a fresh block and returns a
//!   [`CopyBlock`] inside [`AppendSlots`]; the slots can only be taken out of `AppendSlots`
//!   by executing the copy (`apply` / `apply_to`), so the engine cannot forget it. The
//!   last sharer writes in place.
//! - **Prefix caching.** A FULL block gets a chain hash `h_i = H(h_{i-1}, key, tokens_i)`
//!   ([`prefix::hash_block`], FNV-1a + SplitMix64 finaliser, stable across runs and
//!   platforms) once the engine has computed it ([`KvManager::commit_full_blocks`]). The
//!   key ([`PrefixKey`]) carries the LoRA adapter identity so two adapters never share KV
//!   (heads sit above the trunk and do not change K/V, so they are not in the key). The
//!   hash is never trusted alone: a cache entry stores its block's tokens, key and parent
//!   block (id + generation, bumped on every reallocation), and a hit must match all
//!   three, so a hit is exact by induction from the first block. [`KvManager::add_sequence`]
//!   reuses the longest cached chain of full blocks and allocates only the rest; as in
//!   vLLM, at least the last prompt token is always recomputed (the engine needs its
//!   logits), so a block-aligned prompt reuses one block less than it has.
//! - **Free lists.** A block with ref count 0 is either *plain free* (no cached content; a
//!   LIFO stack) or *cached-but-unreferenced* (its hash is still in the prefix cache; an
//!   intrusive doubly linked LRU queue ordered by the time it was freed). Allocation takes
//!   plain blocks first and only then evicts from the LRU head, dropping the evicted hash
//!   (vLLM keeps one queue; preferring plain blocks keeps cached prefixes longer). A
//!   prefix hit on an unreferenced cached block takes it out of the queue in O(1).
//!   [`KvManager::free_sequence`] releases blocks tail first, so a sequence's tail is
//!   evicted before its prefix (vLLM's reverse-order free).
//! - **Capacity.** Allocation is all-or-nothing and never exceeds `num_blocks`; running
//!   out is [`KvError::CapacityExhausted`], checked before any state changes, so an error
//!   leaves the manager exactly as it was.
//!
//! # Complexity (B = block_size, n = blocks involved, S = live sequences)
//!
//! | operation | cost |
//! | --- | --- |
//! | `BlockPool::allocate(n)` | O(n) (each pop O(1), eviction O(1) expected hash-map remove) |
//! | `BlockPool::incref` / `decref` | O(1) (LRU unlink / push-back are O(1)) |
//! | `PrefixCache::find` / `insert` / `remove` | O(B) expected (hash-map + token compare) |
//! | `KvManager::add_sequence(T tokens)` | O(T) hashing + O(T / B) lookups + O(log S) |
//! | `KvManager::append_slots(n)` | O(n) + O(log S) |
//! | `KvManager::fork(k)` | O(k * blocks of the parent) (table clones) + O(k log S) |
//! | `KvManager::commit_full_blocks` | O(B) per newly committed block |
//! | `KvManager::free_sequence` | O(blocks of the sequence) |
//! | `KvStorage::copy_block(len)` | O(L * len * NKV * HS) |
//!
//! The storage for the GPU lives with the CUDA backend; [`KvStorage`] is the CPU arena with
//! the same (L, num_blocks, block_size, NKV * HS) layout.

pub mod block_pool;
pub mod prefix;
pub mod storage;
pub mod table;

pub use block_pool::{BlockId, BlockPool};
pub use prefix::{BlockHash, ParentRef, PrefixCache, PrefixKey, hash_block};
pub use storage::KvStorage;
pub use table::{AppendSlots, BlockTable, CopyBlock, KvManager, SeqId, Slot};

/// Errors of the KV cache: each names the sequence, block or argument at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error(
        "KV cache exhausted: {needed} blocks needed, {free} free\nhint: raise the number of KV blocks, lower K or the batch, or free finished sequences"
    )]
    CapacityExhausted { needed: usize, free: usize },
    #[error("unknown sequence {seq} (never added or already freed)")]
    UnknownSequence { seq: SeqId },
    #[error("{op}: block {block}: {reason}")]
    InvalidBlock {
        op: &'static str,
        block: BlockId,
        reason: &'static str,
    },
    #[error("{op}: invalid argument `{arg}`: {reason}")]
    InvalidArgument {
        op: &'static str,
        arg: &'static str,
        reason: String,
    },
}
