//! Chain hashes of full KV blocks and the prefix cache (vLLM v1 `hash_block_tokens` +
//! `cached_block_hash_to_block`).
//!
//! `h_0 = H(ROOT, key, tokens_0)`, `h_i = H(h_{i-1}, key, tokens_i)`: equal hashes mean
//! (with overwhelming probability) equal token prefixes under the same adapter. The cache
//! never trusts the hash alone: every entry keeps its tokens, key and parent block, and
//! [`PrefixCache::find`] compares them.

use std::collections::HashMap;

use super::block_pool::BlockId;

/// What, besides the tokens, decides a block's K/V: the LoRA adapter applied to the trunk.
/// Two sequences with different keys never share blocks. `adapter` 0 is the base model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrefixKey {
    pub adapter: u64,
}

impl PrefixKey {
    /// The base model, no adapter.
    pub const BASE: PrefixKey = PrefixKey { adapter: 0 };
}

/// Chain hash of one full block (covers every token before it too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

/// The block a cached block continues, as it was when the entry was made: `generation`
/// is bumped every time the pool hands the block out again, so a stale parent never
/// matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParentRef {
    pub block: BlockId,
    pub generation: u32,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// Stands in for the parent hash of the first block.
const ROOT: u64 = 0x636c_6f75_6472_6d30;

/// FNV-1a 64 over `bytes`, continuing from `state`.
pub fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state ^= u64::from(b);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// SplitMix64 finaliser: spreads FNV's weak high bits over the whole word.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `H(parent, key, tokens)`: FNV-1a over the little-endian bytes of the parent hash (or a
/// fixed root), the adapter id, the token count and the tokens, then SplitMix64. Stable
/// across runs, processes and platforms.
pub fn hash_block(parent: Option<BlockHash>, key: PrefixKey, tokens: &[u32]) -> BlockHash {
    let mut h = FNV_OFFSET;
    h = fnv1a(h, &parent.map_or(ROOT, |p| p.0).to_le_bytes());
    h = fnv1a(h, &key.adapter.to_le_bytes());
    h = fnv1a(h, &(tokens.len() as u64).to_le_bytes());
    for t in tokens {
        h = fnv1a(h, &t.to_le_bytes());
    }
    BlockHash(mix64(h))
}

/// Chain hashes of every FULL block of `tokens` (a trailing partial block has none).
pub fn block_hashes(tokens: &[u32], block_size: usize, key: PrefixKey) -> Vec<BlockHash> {
    let mut out = Vec::with_capacity(tokens.len() / block_size.max(1));
    let mut parent = None;
    if block_size == 0 {
        return out;
    }
    for chunk in tokens.chunks_exact(block_size) {
        let h = hash_block(parent, key, chunk);
        out.push(h);
        parent = Some(h);
    }
    out
}

/// One cached full block and what it must match on a hit.
#[derive(Clone, Debug)]
struct Entry {
    block: BlockId,
    parent: Option<ParentRef>,
    key: PrefixKey,
    /// (block_size) token ids of the block
    tokens: Box<[u32]>,
}

/// Chain hash -> cached full blocks. A bucket holds more than one entry only on a hash
/// collision or when two blocks hold the same content (both stay usable).
#[derive(Debug, Default)]
pub struct PrefixCache {
    map: HashMap<BlockHash, Vec<Entry>>,
    len: usize,
}

impl PrefixCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached blocks.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether any block is cached under `hash`.
    pub fn contains_hash(&self, hash: BlockHash) -> bool {
        self.map.contains_key(&hash)
    }

    /// The cached block for `hash` whose parent, key and tokens all match, if any.
    pub fn find(
        &self,
        hash: BlockHash,
        parent: Option<ParentRef>,
        key: PrefixKey,
        tokens: &[u32],
    ) -> Option<BlockId> {
        self.map.get(&hash)?.iter().find_map(|e| {
            (e.parent == parent && e.key == key && *e.tokens == *tokens).then_some(e.block)
        })
    }

    /// Caches `block` under `hash`. Returns false (and changes nothing) if `block` is
    /// already in that bucket.
    pub fn insert(
        &mut self,
        hash: BlockHash,
        block: BlockId,
        parent: Option<ParentRef>,
        key: PrefixKey,
        tokens: &[u32],
    ) -> bool {
        let bucket = self.map.entry(hash).or_default();
        if bucket.iter().any(|e| e.block == block) {
            return false;
        }
        bucket.push(Entry {
            block,
            parent,
            key,
            tokens: tokens.into(),
        });
        self.len += 1;
        true
    }

    /// Drops `block` from the bucket of `hash`. Returns whether it was there.
    pub fn remove(&mut self, hash: BlockHash, block: BlockId) -> bool {
        let Some(bucket) = self.map.get_mut(&hash) else {
            return false;
        };
        let before = bucket.len();
        bucket.retain(|e| e.block != block);
        let removed = bucket.len() < before;
        if bucket.is_empty() {
            self.map.remove(&hash);
        }
        if removed {
            self.len -= 1;
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_published_vectors() {
        // FNV-1a 64 test vectors (Fowler/Noll/Vo): "" -> offset basis, "a" -> 0xaf63dc4c8601ec8c.
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn hash_depends_on_parent_key_and_every_token() {
        let t = [1u32, 2, 3, 4];
        let base = hash_block(None, PrefixKey::BASE, &t);
        assert_eq!(base, hash_block(None, PrefixKey::BASE, &t));
        assert_ne!(base, hash_block(Some(base), PrefixKey::BASE, &t));
        assert_ne!(base, hash_block(None, PrefixKey { adapter: 1 }, &t));
        for i in 0..t.len() {
            let mut u = t;
            u[i] ^= 1;
            assert_ne!(base, hash_block(None, PrefixKey::BASE, &u));
        }
        assert_ne!(base, hash_block(None, PrefixKey::BASE, &[2, 1, 3, 4]));
    }

    #[test]
    fn block_hashes_cover_full_blocks_only() {
        let toks: Vec<u32> = (0..11).collect();
        let hs = block_hashes(&toks, 4, PrefixKey::BASE);
        assert_eq!(hs.len(), 2);
        assert_eq!(hs[0], hash_block(None, PrefixKey::BASE, &toks[0..4]));
        assert_eq!(hs[1], hash_block(Some(hs[0]), PrefixKey::BASE, &toks[4..8]));
        assert!(block_hashes(&toks, 0, PrefixKey::BASE).is_empty());
    }

    #[test]
    fn find_verifies_tokens_key_and_parent_not_just_hash() {
        let mut c = PrefixCache::new();
        let h = BlockHash(42);
        let p = ParentRef {
            block: BlockId(7),
            generation: 1,
        };
        assert!(c.insert(h, BlockId(3), Some(p), PrefixKey::BASE, &[1, 2]));
        assert!(!c.insert(h, BlockId(3), Some(p), PrefixKey::BASE, &[1, 2]));
        assert_eq!(
            c.find(h, Some(p), PrefixKey::BASE, &[1, 2]),
            Some(BlockId(3))
        );
        // Same hash, other content: a forced collision must miss.
        assert_eq!(c.find(h, Some(p), PrefixKey::BASE, &[1, 3]), None);
        assert_eq!(c.find(h, Some(p), PrefixKey { adapter: 9 }, &[1, 2]), None);
        let stale = ParentRef {
            block: BlockId(7),
            generation: 2,
        };
        assert_eq!(c.find(h, Some(stale), PrefixKey::BASE, &[1, 2]), None);
        assert_eq!(c.find(h, None, PrefixKey::BASE, &[1, 2]), None);
        // A colliding entry lives beside the first.
        assert!(c.insert(h, BlockId(4), None, PrefixKey::BASE, &[9, 9]));
        assert_eq!(c.len(), 2);
        assert_eq!(c.find(h, None, PrefixKey::BASE, &[9, 9]), Some(BlockId(4)));
        assert!(c.remove(h, BlockId(3)));
        assert!(!c.remove(h, BlockId(3)));
        assert!(c.contains_hash(h));
        assert!(c.remove(h, BlockId(4)));
        assert!(!c.contains_hash(h));
        assert!(c.is_empty());
    }
}
