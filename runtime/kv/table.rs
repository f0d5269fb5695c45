//! Per-sequence block tables and the manager over the pool (vLLM v1 `KVCacheManager`):
//! add with prefix reuse, append slots, fork K with copy-on-write of the partial last
//! block, commit full blocks to the prefix cache, free.

use std::collections::BTreeMap;
use std::fmt;

use super::KvError;
use super::block_pool::{BlockId, BlockPool};
use super::prefix::{BlockHash, ParentRef, PrefixKey, hash_block};
use super::storage::KvStorage;

/// One live sequence of the manager.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq {}", self.0)
    }
}

/// Where one token's K/V row goes: block and row inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub block: BlockId,
    pub offset: usize,
}

/// Copy rows `0..len` of `src` into `dst` in every layer, before writing into `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyBlock {
    pub src: BlockId,
    pub dst: BlockId,
    pub len: usize,
}

/// The answer of [`KvManager::append_slots`]. The slots come out only through
/// [`AppendSlots::apply`] / [`AppendSlots::apply_to`], which run the pending copy first,
/// so a copy-on-write can not be skipped by accident.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "the slots (and a possible copy-on-write) must be applied"]
pub struct AppendSlots {
    copy: Option<CopyBlock>,
    /// A single slot (the decode step's case) without a heap allocation; else `many`.
    one: Option<Slot>,
    many: Vec<Slot>,
}

impl AppendSlots {
    /// The copy the engine must run before writing, if any (for inspection).
    pub fn pending_copy(&self) -> Option<&CopyBlock> {
        self.copy.as_ref()
    }

    /// The slots (for inspection; take them with `apply`).
    pub fn peek_slots(&self) -> &[Slot] {
        match &self.one {
            Some(one) => std::slice::from_ref(one),
            None => &self.many,
        }
    }

    /// Runs `copy` on the pending copy (if any), then hands out the slots.
    pub fn apply<E>(self, copy: impl FnOnce(&CopyBlock) -> Result<(), E>) -> Result<Vec<Slot>, E> {
        if let Some(c) = &self.copy {
            copy(c)?;
        }
        Ok(match self.one {
            Some(one) => vec![one],
            None => self.many,
        })
    }

    /// [`AppendSlots::apply`] handing out only the first slot (`None` when none was
    /// asked for): the one-token decode step's form, which allocates nothing.
    pub fn apply_first<E>(
        self,
        copy: impl FnOnce(&CopyBlock) -> Result<(), E>,
    ) -> Result<Option<Slot>, E> {
        if let Some(c) = &self.copy {
            copy(c)?;
        }
        Ok(self.one.or_else(|| self.many.first().copied()))
    }

    /// `apply` against the CPU storage.
    pub fn apply_to(self, storage: &mut KvStorage) -> Result<Vec<Slot>, KvError> {
        self.apply(|c| storage.copy_block(c.src, c.dst, c.len))
    }
}

/// The blocks of one sequence in position order and how many positions are filled.
#[derive(Clone, Debug)]
pub struct BlockTable {
    /// (ceil(len / block_size)) block ids
    blocks: Vec<BlockId>,
    /// filled (allocated) positions
    len: usize,
    key: PrefixKey,
    /// chain hashes of the leading full blocks already committed to the prefix cache
    hashes: Vec<BlockHash>,
}

impl BlockTable {
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Block ids the list holds without growing (see [`KvManager::reserve`]).
    pub fn room(&self) -> usize {
        self.blocks.capacity()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn key(&self) -> PrefixKey {
        self.key
    }

    /// Leading full blocks registered in the prefix cache by this sequence (or reused).
    pub fn num_committed(&self) -> usize {
        self.hashes.len()
    }
}

/// Owns the block pool (with its prefix cache) and every sequence's block table.
#[derive(Debug)]
pub struct KvManager {
    pool: BlockPool,
    tables: BTreeMap<SeqId, BlockTable>,
    next_seq: u64,
}

impl KvManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self, KvError> {
        Ok(Self {
            pool: BlockPool::new(num_blocks, block_size)?,
            tables: BTreeMap::new(),
            next_seq: 0,
        })
    }

    pub fn block_size(&self) -> usize {
        self.pool.block_size()
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Blocks an allocation can take now (plain free + evictable cached).
    pub fn free_blocks(&self) -> usize {
        self.pool.free_blocks()
    }

    pub fn num_sequences(&self) -> usize {
        self.tables.len()
    }

    /// Live sequences in id order.
    pub fn sequences(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.tables.keys().copied()
    }

    pub fn table(&self, seq: SeqId) -> Result<&BlockTable, KvError> {
        self.tables
            .get(&seq)
            .ok_or(KvError::UnknownSequence { seq })
    }

    pub fn block_table(&self, seq: SeqId) -> Result<&[BlockId], KvError> {
        Ok(&self.table(seq)?.blocks)
    }

    pub fn seq_len(&self, seq: SeqId) -> Result<usize, KvError> {
        Ok(self.table(seq)?.len)
    }

    /// The slot of an allocated position of `seq`.
    pub fn slot(&self, seq: SeqId, pos: usize) -> Result<Slot, KvError> {
        let t = self.table(seq)?;
        let bs = self.block_size();
        if pos >= t.len {
            return Err(KvError::InvalidArgument {
                op: "KvManager::slot",
                arg: "pos",
                reason: format!("position {pos} of {seq}, which holds {}", t.len),
            });
        }
        Ok(Slot {
            block: t.blocks[pos / bs],
            offset: pos % bs,
        })
    }

    /// Cached full blocks (and their hashes) that `tokens` under `key` can reuse, capped so
    /// that at least the last token is left to compute.
    fn match_prefix(&self, tokens: &[u32], key: PrefixKey) -> Vec<(BlockId, BlockHash)> {
        let bs = self.block_size();
        let max_blocks = tokens.len().saturating_sub(1) / bs;
        let mut hits = Vec::new();
        let mut parent: Option<(BlockId, BlockHash)> = None;
        for chunk in tokens.chunks_exact(bs).take(max_blocks) {
            let h = hash_block(parent.map(|p| p.1), key, chunk);
            let parent_ref = parent.and_then(|(b, _)| {
                self.pool.generation(b).map(|generation| ParentRef {
                    block: b,
                    generation,
                })
            });
            match self.pool.lookup(h, parent_ref, key, chunk) {
                Some(b) => {
                    hits.push((b, h));
                    parent = Some((b, h));
                }
                None => break,
            }
        }
        hits
    }

    /// Leading positions of `tokens` that [`add_sequence`](Self::add_sequence) would find
    /// computed now (a multiple of the block size). Changes nothing.
    pub fn cached_prefix_len(&self, tokens: &[u32], key: PrefixKey) -> usize {
        self.match_prefix(tokens, key).len() * self.block_size()
    }

    fn take_seq_ids(&mut self, op: &'static str, k: usize) -> Result<u64, KvError> {
        let first = self.next_seq;
        u64::try_from(k)
            .ok()
            .and_then(|k| first.checked_add(k))
            .map(|next| {
                self.next_seq = next;
                first
            })
            .ok_or(KvError::InvalidArgument {
                op,
                arg: "k",
                reason: "sequence ids exhausted".into(),
            })
    }

    /// Adds a sequence holding `tokens` (all positions allocated). Reuses the longest
    /// cached chain of full blocks and allocates the rest; returns the new id and how many
    /// leading positions are already computed, so the engine prefills only
    /// `cached_len..tokens.len()` and then calls [`commit_full_blocks`](Self::commit_full_blocks).
    pub fn add_sequence(
        &mut self,
        tokens: &[u32],
        key: PrefixKey,
    ) -> Result<(SeqId, usize), KvError> {
        const OP: &str = "KvManager::add_sequence";
        if tokens.is_empty() {
            return Err(KvError::InvalidArgument {
                op: OP,
                arg: "tokens",
                reason: "empty; a sequence needs at least one token".into(),
            });
        }
        let bs = self.block_size();
        let hits = self.match_prefix(tokens, key);
        let total = tokens.len().div_ceil(bs);
        let needed = total - hits.len();
        // Hits that sit in the LRU queue stop being allocatable once referenced.
        let revived = hits
            .iter()
            .filter(|(b, _)| self.pool.ref_count(*b) == Some(0))
            .count();
        let free = self.pool.free_blocks() - revived;
        if needed > free {
            return Err(KvError::CapacityExhausted { needed, free });
        }
        let first = self.take_seq_ids(OP, 1)?;
        for (i, &(b, _)) in hits.iter().enumerate() {
            if let Err(e) = self.pool.incref(b) {
                self.release(&hits[..i]);
                self.next_seq = first;
                return Err(e);
            }
        }
        let fresh = match self.pool.allocate(needed) {
            Ok(f) => f,
            Err(e) => {
                self.release(&hits);
                self.next_seq = first;
                return Err(e);
            }
        };
        let mut blocks: Vec<BlockId> = hits.iter().map(|(b, _)| *b).collect();
        blocks.extend(fresh);
        let seq = SeqId(first);
        self.tables.insert(
            seq,
            BlockTable {
                blocks,
                len: tokens.len(),
                key,
                hashes: hits.iter().map(|(_, h)| *h).collect(),
            },
        );
        Ok((seq, hits.len() * bs))
    }

    fn release(&mut self, hits: &[(BlockId, BlockHash)]) {
        for &(b, _) in hits.iter().rev() {
            // Only undoes increfs made just before; cannot fail.
            let _ = self.pool.decref(b);
        }
    }

    /// Slots for `n` new tokens of `seq`, allocating blocks as needed. If the partially
    /// filled last block is shared (after a fork), a fresh block replaces it in this table
    /// and the returned [`AppendSlots`] carries the [`CopyBlock`] to run first. All or
    /// nothing: on error nothing changes.
    pub fn append_slots(&mut self, seq: SeqId, n: usize) -> Result<AppendSlots, KvError> {
        let bs = self.pool.block_size();
        let Self { pool, tables, .. } = self;
        let table = tables
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence { seq })?;
        if n == 0 {
            return Ok(AppendSlots {
                copy: None,
                one: None,
                many: Vec::new(),
            });
        }
        let len = table.len;
        let new_len = len.checked_add(n).ok_or_else(|| KvError::InvalidArgument {
            op: "KvManager::append_slots",
            arg: "n",
            reason: format!("{len} + {n} positions overflow"),
        })?;
        let partial = len % bs;
        let last = table.blocks.last().copied();
        let cow_src = match last {
            Some(b) if partial != 0 && pool.ref_count(b).is_some_and(|r| r > 1) => Some(b),
            _ => None,
        };
        let needed = new_len.div_ceil(bs) - table.blocks.len() + usize::from(cow_src.is_some());
        // The fresh ids go straight onto the table (no allocation within its reserved
        // room, see `reserve`); a copy-on-write's block then takes the shared one's place.
        let kept = table.blocks.len();
        pool.allocate_into(needed, &mut table.blocks)?;
        let copy = match cow_src {
            Some(src) => {
                let dst = table.blocks.remove(kept);
                table.blocks[kept - 1] = dst;
                // The source is shared (ref count > 1): this cannot fail.
                pool.decref(src)?;
                Some(CopyBlock {
                    src,
                    dst,
                    len: partial,
                })
            }
            None => None,
        };
        let slot = |p: usize| Slot {
            block: table.blocks[p / bs],
            offset: p % bs,
        };
        let (one, many) = if n == 1 {
            (Some(slot(len)), Vec::new())
        } else {
            (None, (len..new_len).map(slot).collect())
        };
        table.len = new_len;
        Ok(AppendSlots { copy, one, many })
    }

    /// Room in `seq`'s block table for `positions` positions in all, so that appends up
    /// to that length allocate nothing (the decode step's no-allocation path). Never
    /// shrinks; positions beyond the pool's capacity are fine (only the id list grows).
    pub fn reserve(&mut self, seq: SeqId, positions: usize) -> Result<(), KvError> {
        let bs = self.pool.block_size();
        let table = self
            .tables
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence { seq })?;
        // A copy-on-write append holds one extra id for a moment.
        let blocks = positions.div_ceil(bs).min(self.pool.num_blocks()) + 1;
        table
            .blocks
            .reserve(blocks.saturating_sub(table.blocks.len()));
        Ok(())
    }

    /// `k` children of `seq` sharing all its blocks by ref count (no copy, no allocation).
    pub fn fork(&mut self, seq: SeqId, k: usize) -> Result<Vec<SeqId>, KvError> {
        const OP: &str = "KvManager::fork";
        let parent = self.table(seq)?.clone();
        if k == 0 {
            return Ok(Vec::new());
        }
        let k32 = u32::try_from(k).map_err(|_| KvError::InvalidArgument {
            op: OP,
            arg: "k",
            reason: format!("{k} children is too many"),
        })?;
        // Check every block first so that a failure changes nothing.
        for &b in &parent.blocks {
            let r = self.pool.ref_count(b).unwrap_or(0);
            if r.checked_add(k32).is_none() {
                return Err(KvError::InvalidBlock {
                    op: OP,
                    block: b,
                    reason: "ref count overflow",
                });
            }
        }
        let first = self.take_seq_ids(OP, k)?;
        for &b in &parent.blocks {
            self.pool.incref_by(b, k32)?;
        }
        let children: Vec<SeqId> = (0..k as u64).map(|i| SeqId(first + i)).collect();
        for &c in &children {
            self.tables.insert(c, parent.clone());
        }
        Ok(children)
    }

    /// Registers the full blocks of `seq` covered by `tokens` (the sequence's tokens from
    /// position 0, computed by the engine) in the prefix cache. Returns how many blocks
    /// were newly committed. Call only after their K/V rows are written.
    pub fn commit_full_blocks(&mut self, seq: SeqId, tokens: &[u32]) -> Result<usize, KvError> {
        let bs = self.pool.block_size();
        let Self { pool, tables, .. } = self;
        let table = tables
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence { seq })?;
        if tokens.len() > table.len {
            return Err(KvError::InvalidArgument {
                op: "KvManager::commit_full_blocks",
                arg: "tokens",
                reason: format!(
                    "{} tokens but {seq} holds {} positions",
                    tokens.len(),
                    table.len
                ),
            });
        }
        let start = table.hashes.len();
        let full = tokens.len() / bs;
        for i in start..full {
            let chunk = &tokens[i * bs..(i + 1) * bs];
            let h = hash_block(table.hashes.last().copied(), table.key, chunk);
            let parent = match i.checked_sub(1) {
                Some(j) => {
                    let b = table.blocks[j];
                    pool.generation(b).map(|generation| ParentRef {
                        block: b,
                        generation,
                    })
                }
                None => None,
            };
            pool.cache_block(table.blocks[i], h, parent, table.key, chunk)?;
            table.hashes.push(h);
        }
        Ok(full.saturating_sub(start))
    }

    /// Drops `seq`: its blocks lose one reference each, tail first, so its tail is evicted
    /// before its prefix. Cached blocks stay reusable until evicted.
    pub fn free_sequence(&mut self, seq: SeqId) -> Result<(), KvError> {
        let table = self
            .tables
            .remove(&seq)
            .ok_or(KvError::UnknownSequence { seq })?;
        for &b in table.blocks.iter().rev() {
            self.pool.decref(b)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_prompt_recomputes_its_last_block() {
        let mut m = KvManager::new(8, 4).unwrap();
        let toks: Vec<u32> = (0..8).collect();
        let (a, cached) = m.add_sequence(&toks, PrefixKey::BASE).unwrap();
        assert_eq!(cached, 0);
        assert_eq!(m.commit_full_blocks(a, &toks).unwrap(), 2);
        assert_eq!(m.commit_full_blocks(a, &toks).unwrap(), 0);
        let (b, cached) = m.add_sequence(&toks, PrefixKey::BASE).unwrap();
        assert_eq!(cached, 4);
        assert_eq!(m.block_table(b).unwrap()[0], m.block_table(a).unwrap()[0]);
        assert_ne!(m.block_table(b).unwrap()[1], m.block_table(a).unwrap()[1]);
    }

    #[test]
    fn commit_rejects_more_tokens_than_positions() {
        let mut m = KvManager::new(8, 4).unwrap();
        let (a, _) = m.add_sequence(&[1, 2, 3], PrefixKey::BASE).unwrap();
        assert!(matches!(
            m.commit_full_blocks(a, &[1, 2, 3, 4]),
            Err(KvError::InvalidArgument { arg: "tokens", .. })
        ));
        assert!(matches!(
            m.add_sequence(&[], PrefixKey::BASE),
            Err(KvError::InvalidArgument { arg: "tokens", .. })
        ));
        let ghost = SeqId(99);
        assert_eq!(
            m.append_slots(ghost, 1),
            Err(KvError::UnknownSequence { seq: ghost })
        );
        assert_eq!(
            m.free_sequence(ghost),
            Err(KvError::UnknownSequence { seq: ghost })
        );
        assert!(matches!(
            m.slot(a, 3),
            Err(KvError::InvalidArgument { arg: "pos", .. })
        ));
        assert_eq!(
            m.slot(a, 2).unwrap(),
            Slot {
                block: m.block_table(a).unwrap()[0],
                offset: 2
            }
        );
    }
}
