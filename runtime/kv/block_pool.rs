//! Block ids, ref counts and free lists (vLLM v1 `BlockPool` + `FreeKVCacheBlockQueue`).
//! No device memory: the pool only decides which block holds what.
//!
//! A block is in exactly one of three states:
//! - referenced (`ref_count > 0`), cached or not;
//! - plain free (`ref_count == 0`, no hash): on the LIFO `plain_free` stack;
//! - cached-but-unreferenced (`ref_count == 0`, hash): on the LRU queue, an intrusive
//!   doubly linked list over block indices, head = least recently freed = next evicted.

use std::fmt;

use super::KvError;
use super::prefix::{BlockHash, ParentRef, PrefixCache, PrefixKey};

const NIL: u32 = u32::MAX;

/// Index of one KV block in the pool (and in the storage arenas).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

impl BlockId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

#[derive(Clone, Debug)]
struct BlockMeta {
    ref_count: u32,
    /// bumped each time the block is handed out, so stale parent links never match
    generation: u32,
    /// Some while the block's content is registered in the prefix cache
    hash: Option<BlockHash>,
    /// LRU links (block indices, NIL at the ends); meaningful only while in the LRU queue
    prev: u32,
    next: u32,
}

/// Fixed set of `num_blocks` blocks of `block_size` positions with ref counts, a plain free
/// stack, an LRU queue of evictable cached blocks, and the prefix cache over them.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    /// (num_blocks)
    meta: Vec<BlockMeta>,
    /// uncached free blocks; the top is handed out next
    plain_free: Vec<BlockId>,
    lru_head: u32,
    lru_tail: u32,
    lru_len: usize,
    prefix: PrefixCache,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self, KvError> {
        if num_blocks == 0 || num_blocks >= NIL as usize {
            return Err(KvError::InvalidArgument {
                op: "BlockPool::new",
                arg: "num_blocks",
                reason: format!("{num_blocks} is outside 1..{NIL}"),
            });
        }
        if block_size == 0 {
            return Err(KvError::InvalidArgument {
                op: "BlockPool::new",
                arg: "block_size",
                reason: "must be at least 1".into(),
            });
        }
        let meta = vec![
            BlockMeta {
                ref_count: 0,
                generation: 0,
                hash: None,
                prev: NIL,
                next: NIL,
            };
            num_blocks
        ];
        // Reversed so that block 0 is handed out first.
        let plain_free = (0..num_blocks as u32).rev().map(BlockId).collect();
        Ok(Self {
            block_size,
            meta,
            plain_free,
            lru_head: NIL,
            lru_tail: NIL,
            lru_len: 0,
            prefix: PrefixCache::new(),
        })
    }

    pub fn num_blocks(&self) -> usize {
        self.meta.len()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks an allocation can take now: plain free + cached-but-unreferenced.
    pub fn free_blocks(&self) -> usize {
        self.plain_free.len() + self.lru_len
    }

    /// Cached-but-unreferenced blocks (the evictable part of `free_blocks`).
    pub fn num_evictable(&self) -> usize {
        self.lru_len
    }

    /// Blocks with a non-zero ref count.
    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.free_blocks()
    }

    pub fn ref_count(&self, block: BlockId) -> Option<u32> {
        self.meta.get(block.index()).map(|m| m.ref_count)
    }

    pub fn generation(&self, block: BlockId) -> Option<u32> {
        self.meta.get(block.index()).map(|m| m.generation)
    }

    /// The chain hash the block is cached under, if it is cached.
    pub fn cached_hash(&self, block: BlockId) -> Option<BlockHash> {
        self.meta.get(block.index()).and_then(|m| m.hash)
    }

    pub fn prefix_cache(&self) -> &PrefixCache {
        &self.prefix
    }

    /// Evictable blocks, next victim first.
    pub fn evictable_order(&self) -> Vec<BlockId> {
        let mut out = Vec::with_capacity(self.lru_len);
        let mut i = self.lru_head;
        while i != NIL && out.len() <= self.meta.len() {
            out.push(BlockId(i));
            i = self.meta[i as usize].next;
        }
        out
    }

    /// Every free block (plain stack then LRU queue), for diagnostics and tests.
    pub fn free_list(&self) -> Vec<BlockId> {
        let mut out = self.plain_free.clone();
        out.extend(self.evictable_order());
        out
    }

    fn meta_of(&self, op: &'static str, block: BlockId) -> Result<&BlockMeta, KvError> {
        self.meta.get(block.index()).ok_or(KvError::InvalidBlock {
            op,
            block,
            reason: "out of range for this pool",
        })
    }

    /// Takes `n` blocks, each with ref count 1: plain free blocks first, then the least
    /// recently freed cached blocks (whose hashes leave the prefix cache). All or nothing.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<BlockId>, KvError> {
        let mut out = Vec::with_capacity(n);
        self.allocate_into(n, &mut out)?;
        Ok(out)
    }

    /// [`allocate`](Self::allocate) appending the ids to `out` (no allocation when `out`
    /// has room for them). All or nothing: on error `out` and the pool are unchanged.
    pub fn allocate_into(&mut self, n: usize, out: &mut Vec<BlockId>) -> Result<(), KvError> {
        let free = self.free_blocks();
        if n > free {
            return Err(KvError::CapacityExhausted { needed: n, free });
        }
        let start = out.len();
        while out.len() - start < n {
            let block = match self.plain_free.pop() {
                Some(b) => b,
                None => match self.evict_lru_head() {
                    Some(b) => b,
                    None => break,
                },
            };
            let m = &mut self.meta[block.index()];
            m.ref_count = 1;
            m.generation = m.generation.wrapping_add(1);
            out.push(block);
        }
        if out.len() - start < n {
            // Unreachable while the free count is right; give the blocks back untouched.
            for b in out.drain(start..).rev() {
                self.meta[b.index()].ref_count = 0;
                self.plain_free.push(b);
            }
            return Err(KvError::CapacityExhausted { needed: n, free });
        }
        Ok(())
    }

    fn evict_lru_head(&mut self) -> Option<BlockId> {
        if self.lru_head == NIL {
            return None;
        }
        let block = BlockId(self.lru_head);
        self.lru_unlink(block);
        if let Some(h) = self.meta[block.index()].hash.take() {
            self.prefix.remove(h, block);
        }
        Some(block)
    }

    /// Adds one reference. A cached-but-unreferenced block leaves the LRU queue (a prefix
    /// hit); a plain free block cannot be referenced (its content is garbage).
    pub fn incref(&mut self, block: BlockId) -> Result<(), KvError> {
        self.incref_by(block, 1)
    }

    /// Adds `k` references at once (fork).
    pub fn incref_by(&mut self, block: BlockId, k: u32) -> Result<(), KvError> {
        const OP: &str = "BlockPool::incref";
        let m = self.meta_of(OP, block)?;
        if k == 0 {
            return Ok(());
        }
        let Some(new_count) = m.ref_count.checked_add(k) else {
            return Err(KvError::InvalidBlock {
                op: OP,
                block,
                reason: "ref count overflow",
            });
        };
        if m.ref_count == 0 {
            if m.hash.is_none() {
                return Err(KvError::InvalidBlock {
                    op: OP,
                    block,
                    reason: "is free and holds no cached content",
                });
            }
            self.lru_unlink(block);
        }
        self.meta[block.index()].ref_count = new_count;
        Ok(())
    }

    /// Drops one reference. At zero a cached block joins the LRU tail (most recently
    /// freed), an uncached one the plain free stack.
    pub fn decref(&mut self, block: BlockId) -> Result<(), KvError> {
        const OP: &str = "BlockPool::decref";
        let m = self.meta_of(OP, block)?;
        if m.ref_count == 0 {
            return Err(KvError::InvalidBlock {
                op: OP,
                block,
                reason: "is already free",
            });
        }
        let cached = m.hash.is_some();
        let m = &mut self.meta[block.index()];
        m.ref_count -= 1;
        if m.ref_count == 0 {
            if cached {
                self.lru_push_back(block);
            } else {
                self.plain_free.push(block);
            }
        }
        Ok(())
    }

    /// The cached block for `hash` whose parent, key and tokens match, if any.
    pub fn lookup(
        &self,
        hash: BlockHash,
        parent: Option<ParentRef>,
        key: PrefixKey,
        tokens: &[u32],
    ) -> Option<BlockId> {
        self.prefix.find(hash, parent, key, tokens)
    }

    /// Registers the content of a referenced, full `block` under `hash`. Returns false if
    /// the block was already cached (its content is immutable, so nothing changes).
    pub fn cache_block(
        &mut self,
        block: BlockId,
        hash: BlockHash,
        parent: Option<ParentRef>,
        key: PrefixKey,
        tokens: &[u32],
    ) -> Result<bool, KvError> {
        const OP: &str = "BlockPool::cache_block";
        let m = self.meta_of(OP, block)?;
        if m.ref_count == 0 {
            return Err(KvError::InvalidBlock {
                op: OP,
                block,
                reason: "is free; only a referenced block can be cached",
            });
        }
        if tokens.len() != self.block_size {
            return Err(KvError::InvalidArgument {
                op: OP,
                arg: "tokens",
                reason: format!(
                    "{} tokens for block {block}; only full blocks of {} are cached",
                    tokens.len(),
                    self.block_size
                ),
            });
        }
        if m.hash.is_some() {
            return Ok(false);
        }
        self.prefix.insert(hash, block, parent, key, tokens);
        self.meta[block.index()].hash = Some(hash);
        Ok(true)
    }

    fn lru_unlink(&mut self, block: BlockId) {
        let i = block.0;
        let (prev, next) = {
            let m = &self.meta[i as usize];
            (m.prev, m.next)
        };
        if prev == NIL {
            self.lru_head = next;
        } else {
            self.meta[prev as usize].next = next;
        }
        if next == NIL {
            self.lru_tail = prev;
        } else {
            self.meta[next as usize].prev = prev;
        }
        let m = &mut self.meta[i as usize];
        m.prev = NIL;
        m.next = NIL;
        self.lru_len -= 1;
    }

    fn lru_push_back(&mut self, block: BlockId) {
        let i = block.0;
        let tail = self.lru_tail;
        {
            let m = &mut self.meta[i as usize];
            m.prev = tail;
            m.next = NIL;
        }
        if tail == NIL {
            self.lru_head = i;
        } else {
            self.meta[tail as usize].next = i;
        }
        self.lru_tail = i;
        self.lru_len += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(pool: &mut BlockPool, b: BlockId, tag: u32) {
        let toks = vec![tag; pool.block_size()];
        let h = BlockHash(u64::from(tag));
        assert!(
            pool.cache_block(b, h, None, PrefixKey::BASE, &toks)
                .unwrap()
        );
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(
            BlockPool::new(0, 16),
            Err(KvError::InvalidArgument {
                arg: "num_blocks",
                ..
            })
        ));
        assert!(matches!(
            BlockPool::new(4, 0),
            Err(KvError::InvalidArgument {
                arg: "block_size",
                ..
            })
        ));
    }

    #[test]
    fn allocate_is_all_or_nothing() {
        let mut p = BlockPool::new(4, 16).unwrap();
        let a = p.allocate(3).unwrap();
        assert_eq!(a, vec![BlockId(0), BlockId(1), BlockId(2)]);
        assert_eq!(
            p.allocate(2),
            Err(KvError::CapacityExhausted { needed: 2, free: 1 })
        );
        assert_eq!(p.free_blocks(), 1);
        assert_eq!(p.allocate(0).unwrap(), vec![]);
        p.decref(a[1]).unwrap();
        assert_eq!(p.allocate(1).unwrap(), vec![BlockId(1)]);
    }

    #[test]
    fn allocate_into_appends_all_or_nothing() {
        let mut p = BlockPool::new(4, 16).unwrap();
        let mut ids = vec![BlockId(9)];
        p.allocate_into(2, &mut ids).unwrap();
        assert_eq!(ids, vec![BlockId(9), BlockId(0), BlockId(1)]);
        assert_eq!(
            p.allocate_into(3, &mut ids),
            Err(KvError::CapacityExhausted { needed: 3, free: 2 })
        );
        assert_eq!(ids.len(), 3);
        assert_eq!(p.free_blocks(), 2);
        // Room reserved up front: appending does not reallocate.
        let mut room = Vec::with_capacity(2);
        let at = room.as_ptr();
        p.allocate_into(2, &mut room).unwrap();
        assert_eq!(room.as_ptr(), at);
        assert_eq!(p.free_blocks(), 0);
    }

    #[test]
    fn lru_queue_links_stay_consistent() {
        let mut p = BlockPool::new(5, 2).unwrap();
        let b = p.allocate(5).unwrap();
        for (i, &blk) in b.iter().enumerate() {
            cache(&mut p, blk, i as u32 + 1);
        }
        for &blk in [b[3], b[0], b[4], b[1]].iter() {
            p.decref(blk).unwrap();
        }
        assert_eq!(p.evictable_order(), vec![b[3], b[0], b[4], b[1]]);
        // Touch the middle, the head and the tail.
        p.incref(b[4]).unwrap();
        p.incref(b[3]).unwrap();
        p.incref(b[1]).unwrap();
        assert_eq!(p.evictable_order(), vec![b[0]]);
        p.decref(b[1]).unwrap();
        p.decref(b[3]).unwrap();
        assert_eq!(p.evictable_order(), vec![b[0], b[1], b[3]]);
        assert_eq!(p.num_evictable(), 3);
        // Evicts head first and drops its hash.
        let got = p.allocate(2).unwrap();
        assert_eq!(got, vec![b[0], b[1]]);
        assert_eq!(p.cached_hash(b[0]), None);
        assert!(!p.prefix_cache().contains_hash(BlockHash(1)));
        assert!(p.prefix_cache().contains_hash(BlockHash(4)));
    }

    #[test]
    fn refcount_errors_name_the_block() {
        let mut p = BlockPool::new(2, 4).unwrap();
        assert!(matches!(
            p.decref(BlockId(0)),
            Err(KvError::InvalidBlock {
                block: BlockId(0),
                ..
            })
        ));
        assert!(matches!(
            p.incref(BlockId(1)),
            Err(KvError::InvalidBlock {
                block: BlockId(1),
                ..
            })
        ));
        assert!(matches!(
            p.incref(BlockId(9)),
            Err(KvError::InvalidBlock {
                block: BlockId(9),
                ..
            })
        ));
        let b = p.allocate(1).unwrap()[0];
        assert!(matches!(
            p.cache_block(b, BlockHash(1), None, PrefixKey::BASE, &[1, 2]),
            Err(KvError::InvalidArgument { arg: "tokens", .. })
        ));
        p.decref(b).unwrap();
        assert!(matches!(
            p.cache_block(b, BlockHash(1), None, PrefixKey::BASE, &[1, 2, 3, 4]),
            Err(KvError::InvalidBlock { .. })
        ));
    }

    #[test]
    fn generation_bumps_on_each_allocation() {
        let mut p = BlockPool::new(1, 4).unwrap();
        let b = p.allocate(1).unwrap()[0];
        let g = p.generation(b).unwrap();
        p.decref(b).unwrap();
        let b2 = p.allocate(1).unwrap()[0];
        assert_eq!(b, b2);
        assert_eq!(p.generation(b2).unwrap(), g.wrapping_add(1));
    }
}
