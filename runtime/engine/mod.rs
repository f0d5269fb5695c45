//! A batched Llama forward over the paged KV cache.
//!
//! [`PagedEngine`] owns the K/V arenas, a [`KvManager`] for the bookkeeping (block tables,
//! ref counts, prefix cache, copy-on-write) and activation buffers for up to `max_rows`
//! rows, allocated once in [`PagedEngine::new`]. Attention scratch grows on demand to the
//! longest context seen (it is sized by context length, not by rows).
//!
//! - [`PagedEngine::prefill`] adds a sequence (reusing cached full prefix blocks), runs the
//!   uncached tokens through the layers in chunks of at most `max_rows` rows with causal
//!   paged attention, writes K/V through the sequence's slots and commits its full blocks
//!   to the prefix cache.
//! - [`PagedEngine::fork`] gives K children sharing every block of a sequence.
//! - [`PagedEngine::decode_step`] runs ONE batched pass for B sequences, one new token each:
//!   every projection is one matmul over the B rows (weights read once per step), RoPE
//!   at each row's own position, K/V written into each row's slot (after the pending
//!   copy-on-write), then paged decode attention or, with `shared`, cascade attention.
//!
//! **Cascade levels and partial blocks.** With `shared = Some((owner, P))`, the shared
//! level covers only the `floor(P / BS)` FULL blocks of the owner's table
//! (`floor(P / BS) * BS` positions). If P is not a multiple of BS, the last prefix block is
//! partial and each forked child copy-on-writes it on its first append, so the children no
//! longer share it; those positions are attended as part of each child's own suffix, which
//! starts at table block `floor(P / BS)`. Every sequence of the batch must hold the same
//! block ids as the owner for the shared blocks (checked; otherwise an error).
//!
//! Arena layout: K and V are each (L, NB, BS, NKV*HS), of f32 or (with [`KvCache::F16`])
//! f16 rounded as rows are written; one layer's slice is the (NB, BS, NKV, HS) arena of
//! `cloudrm_kernels::reference::attention_paged`.

use cloudrm_kernels::KvElem;
use cloudrm_kernels::cpu::RopeTable;
use cloudrm_kernels::reference::attention_paged::{
    Level, PagedShape, cascade_scratch_len, prefill_scratch_len,
};
use cloudrm_kernels::reference::heads::TopLogit;
use half::f16;

use crate::backend::Cpu;
use crate::error::{Error, Result};
use crate::kv::{BlockId, BlockTable, CopyBlock, KvError, KvManager, PrefixKey, SeqId};
use crate::model::llama::{MlpBuffers, mlp_block, qkv_proj};
use crate::model::{Llama, ModelError};

/// Model dimensions the engine's buffers are sized for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dims {
    layers: usize,
    c: usize,
    qd: usize,
    kvd: usize,
    idim: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
}

impl Dims {
    fn of(model: &Llama) -> Self {
        let cfg = &model.config;
        Dims {
            layers: cfg.num_hidden_layers,
            c: cfg.hidden_size,
            qd: cfg.q_dim(),
            kvd: cfg.kv_dim(),
            idim: cfg.intermediate_size,
            nh: cfg.num_attention_heads,
            nkv: cfg.num_key_value_heads,
            hs: cfg.head_dim,
        }
    }
}

/// Activation buffers for up to `max_rows` rows, plus attention scratch.
#[derive(Debug)]
struct Buffers {
    /// (R, C) residual stream
    x: Vec<f32>,
    /// (R, C)
    xn: Vec<f32>,
    /// (R, NH*HS)
    q: Vec<f32>,
    /// (R, NKV*HS)
    k: Vec<f32>,
    /// (R, NKV*HS)
    v: Vec<f32>,
    /// (R, NH*HS)
    att: Vec<f32>,
    /// (R, C)
    proj: Vec<f32>,
    /// (R, I)
    gate: Vec<f32>,
    /// (R, I)
    up: Vec<f32>,
    /// (R, I)
    act: Vec<f32>,
    /// (R) absolute positions
    positions: Vec<u32>,
    /// RoPE angles of `positions[..R]` (filled once per pass, read by every layer)
    rope: RopeTable,
    /// (R, C) final-normed hidden rows
    hidden: Vec<f32>,
    /// scores / cascade scratch; grows to the longest context seen
    scratch: Vec<f32>,
    /// The attention's per-row table slices (empty between passes; its allocation reused)
    refs: Vec<&'static [u32]>,
}

/// A decode step's bookkeeping, kept between steps so that a step whose sequences stay
/// inside their blocks allocates nothing (a step that opens a block allocates its id).
#[derive(Default)]
struct StepBufs {
    /// Per row: blocks covered by its shared levels.
    covered: Vec<usize>,
    /// Per row: its new position's arena row.
    rows: Vec<usize>,
    /// Per row: its whole block table (ids as u32).
    tables: Vec<Vec<u32>>,
    /// Per row: its length after the step.
    lens: Vec<usize>,
    /// Per non-empty level: (block table, positions, member rows); `n_levels` in use.
    level_tables: Vec<(Vec<u32>, usize, std::ops::Range<usize>)>,
    n_levels: usize,
    /// Per row: the blocks past its shared levels, and their positions.
    suffix_tables: Vec<Vec<u32>>,
    suffix_lens: Vec<usize>,
    /// The levels as the attention takes them (empty between steps; allocation reused).
    levels: Vec<Level<'static>>,
    /// [`PagedEngine::blocks_needed`]'s shared last blocks and their simulated drops.
    dropped: Vec<(BlockId, u32)>,
}

impl std::fmt::Debug for StepBufs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepBufs")
            .field("rows", &self.rows.capacity())
            .field("levels", &self.level_tables.len())
            .finish_non_exhaustive()
    }
}

/// An empty vector reusing `v`'s allocation for references of another lifetime (an
/// in-place collect: the element layout is the same, so no allocation).
fn recycle_refs<'b, T: ?Sized>(mut v: Vec<&'_ T>) -> Vec<&'b T> {
    v.clear();
    v.into_iter().map(|_| unreachable!("cleared")).collect()
}

/// [`recycle_refs`] for cascade levels.
fn recycle_levels<'b>(mut v: Vec<Level<'_>>) -> Vec<Level<'b>> {
    v.clear();
    v.into_iter().map(|_| unreachable!("cleared")).collect()
}

/// `dst` = the ids of `blocks`, reusing its allocation.
fn fill_table(dst: &mut Vec<u32>, blocks: &[BlockId]) {
    dst.clear();
    dst.extend(blocks.iter().map(|b| b.0));
}

/// [`fill_table`] from a sequence's table, first giving `dst` the room reserved in it (so
/// that a step whose sequence opens a block, within its reserved room, allocates nothing).
fn fill_seq_table(dst: &mut Vec<u32>, table: &BlockTable) {
    dst.clear();
    dst.reserve(table.room());
    fill_table(dst, table.blocks());
}

/// The first `n` vectors of `v` (created on first use), cleared.
fn take_rows<T>(v: &mut Vec<Vec<T>>, n: usize) -> &mut [Vec<T>] {
    if v.len() < n {
        v.resize_with(n, Vec::new);
    }
    for t in &mut v[..n] {
        t.clear();
    }
    &mut v[..n]
}

/// How the rows of one pass attend.
/// Rows an engine built for scoring holds at least: prefill runs in chunks of `max_rows`
/// tokens, and long chunks keep the prefill GEMM compute-bound.
pub const PREFILL_ROWS: usize = 256;

/// A shared level of a cascade decode step (see [`PagedEngine::decode_step_levels`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedLevel {
    /// The sequence whose table holds the level's blocks.
    pub owner: SeqId,
    /// Block indices of `owner`'s table (full blocks only).
    pub blocks: std::ops::Range<usize>,
    /// Rows of the step (indices into its `seqs`) that attend this level.
    pub members: std::ops::Range<usize>,
}

enum Attn<'a> {
    /// Causal prefill of one sequence: row r is at position `pos0 + r` of `table`.
    Prefill { table: &'a [u32], pos0: usize },
    /// One query per sequence over its whole table.
    Decode {
        tables: &'a [Vec<u32>],
        lens: &'a [usize],
    },
    /// Shared levels (each over a contiguous range of rows) plus each row's own suffix.
    Cascade {
        /// Shared levels, outermost first.
        levels: &'a [Level<'a>],
        suffix_tables: &'a [Vec<u32>],
        suffix_lens: &'a [usize],
    },
}

/// Batched forward over a paged KV cache (see the module docs).
#[derive(Debug)]
pub struct PagedEngine {
    kv: KvManager,
    key: PrefixKey,
    dims: Dims,
    num_blocks: usize,
    block_size: usize,
    max_rows: usize,
    /// K and V, each (L, NB, BS, NKV*HS).
    arenas: KvArenas,
    bufs: Buffers,
    step: StepBufs,
}

/// `logits (rows, V) = hidden (rows, C) @ lm_head^T`; `out` must hold rows * V.
pub fn lm_logits(model: &Llama, cpu: &Cpu, hidden: &[f32], out: &mut [f32]) -> Result<()> {
    let c = model.config.hidden_size;
    let vocab = model.config.vocab_size;
    if c == 0 || !hidden.len().is_multiple_of(c) || out.len() != hidden.len() / c * vocab {
        return Err(Error::Usage(format!(
            "lm_logits: hidden has {} elements, out {}; expected rows * {c} and rows * {vocab}",
            hidden.len(),
            out.len()
        )));
    }
    let w = &model.weights;
    cpu.matmul(out, hidden, w.get(&w.lm_head), None, c, vocab)?;
    Ok(())
}

/// The greedy next token of one final-normed hidden row (C), by the fused LM head + top-1
/// (the logits are never written). Same choice as `cloudrm_sampler::argmax` over the
/// logits: the first maximum, NaN skipped (token 0 if every logit is NaN).
pub fn lm_greedy(model: &Llama, cpu: &Cpu, hidden: &[f32]) -> Result<u32> {
    let w = &model.weights;
    let mut best = [TopLogit {
        token: 0,
        logit: 0.0,
    }];
    cpu.lm_head_topk(
        &mut best,
        hidden,
        w.get(&w.lm_head),
        model.config.hidden_size,
        model.config.vocab_size,
        1,
    )?;
    Ok(if best[0].logit.is_nan() {
        0
    } else {
        best[0].token
    })
}

fn grow(buf: &mut Vec<f32>, n: usize) {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
}

fn table_u32(blocks: &[BlockId]) -> Vec<u32> {
    blocks.iter().map(|b| b.0).collect()
}

impl PagedEngine {
    /// An engine for `model` with `num_blocks` blocks of `block_size` positions and
    /// activation buffers for `max_rows` rows per pass (prefill chunk / decode batch).
    pub fn new(
        model: &Llama,
        num_blocks: usize,
        block_size: usize,
        max_rows: usize,
    ) -> Result<Self> {
        Self::with_cache(model, num_blocks, block_size, max_rows, KvCache::F32)
    }

    /// [`PagedEngine::new`] with the K/V arenas holding `cache` elements.
    pub fn with_cache(
        model: &Llama,
        num_blocks: usize,
        block_size: usize,
        max_rows: usize,
        cache: KvCache,
    ) -> Result<Self> {
        let kv = KvManager::new(num_blocks, block_size)?;
        let d = Dims::of(model);
        if max_rows == 0 {
            return Err(KvError::InvalidArgument {
                op: "PagedEngine::new",
                arg: "max_rows",
                reason: "must be at least 1".into(),
            }
            .into());
        }
        let arena = d
            .layers
            .checked_mul(num_blocks)
            .and_then(|x| x.checked_mul(block_size))
            .and_then(|x| x.checked_mul(d.kvd))
            .filter(|&x| x.checked_mul(cache.bytes()).is_some())
            .ok_or(KvError::InvalidArgument {
                op: "PagedEngine::new",
                arg: "num_blocks",
                reason: format!(
                    "{} x {num_blocks} x {block_size} x {} {} overflows the address space",
                    d.layers,
                    d.kvd,
                    cache.name()
                ),
            })?;
        let r = max_rows;
        let bufs = Buffers {
            x: vec![0.0; r * d.c],
            xn: vec![0.0; r * d.c],
            q: vec![0.0; r * d.qd],
            k: vec![0.0; r * d.kvd],
            v: vec![0.0; r * d.kvd],
            att: vec![0.0; r * d.qd],
            proj: vec![0.0; r * d.c],
            gate: vec![0.0; r * d.idim],
            up: vec![0.0; r * d.idim],
            act: vec![0.0; r * d.idim],
            positions: vec![0; r],
            rope: RopeTable::default(),
            hidden: vec![0.0; r * d.c],
            scratch: Vec::new(),
            refs: Vec::new(),
        };
        Ok(PagedEngine {
            kv,
            key: PrefixKey::BASE,
            dims: d,
            num_blocks,
            block_size,
            max_rows,
            arenas: match cache {
                KvCache::F32 => KvArenas::F32(Arena::zeroed(arena), Arena::zeroed(arena)),
                KvCache::F16 => KvArenas::F16(Arena::zeroed(arena), Arena::zeroed(arena)),
            },
            bufs,
            step: StepBufs::default(),
        })
    }

    /// The block bookkeeping (read only).
    pub fn kv(&self) -> &KvManager {
        &self.kv
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool (its capacity).
    pub fn num_blocks(&self) -> usize {
        self.kv.pool().num_blocks()
    }

    /// The prefix-cache key of the next prefills (the adapter/head identity); sequences
    /// prefilled under different keys never share blocks.
    pub fn set_prefix_key(&mut self, key: PrefixKey) {
        self.key = key;
    }

    /// Blocks referenced by live sequences.
    pub fn used_blocks(&self) -> usize {
        self.kv.pool().num_used()
    }

    /// Leading positions of `tokens` a `prefill` would take from the prefix cache.
    pub fn cached_prefix_len(&self, tokens: &[u32]) -> usize {
        self.kv.cached_prefix_len(tokens, self.key)
    }

    /// What the K/V arenas hold.
    pub fn kv_cache(&self) -> KvCache {
        match self.arenas {
            KvArenas::F32(..) => KvCache::F32,
            KvArenas::F16(..) => KvCache::F16,
        }
    }

    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// Positions held by `seq`.
    pub fn seq_len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.kv.seq_len(seq)?)
    }

    fn check_model(&self, model: &Llama, op: &str) -> Result<()> {
        if Dims::of(model) != self.dims {
            return Err(Error::Usage(format!(
                "{op}: the model's dimensions differ from the ones this engine was built for"
            )));
        }
        Ok(())
    }

    fn check_tokens(model: &Llama, tokens: &[u32], pos0: usize) -> Result<()> {
        let vocab = model.config.vocab_size;
        if let Some((i, &id)) = tokens
            .iter()
            .enumerate()
            .find(|&(_, &id)| id as usize >= vocab)
        {
            return Err(ModelError::TokenOutOfRange {
                id,
                position: pos0 + i,
                vocab,
            }
            .into());
        }
        Ok(())
    }

    /// Prefill `tokens` as a new sequence. Returns its id, the last position's logits (V)
    /// and its final-normed hidden state (C). Cached full prefix blocks are reused and only
    /// the rest is computed. On error the sequence is dropped again.
    pub fn prefill(
        &mut self,
        model: &Llama,
        cpu: &Cpu,
        tokens: &[u32],
    ) -> Result<(SeqId, Vec<f32>, Vec<f32>)> {
        self.check_model(model, "PagedEngine::prefill")?;
        if tokens.is_empty() {
            return Err(ModelError::EmptyInput.into());
        }
        Self::check_tokens(model, tokens, 0)?;
        let (seq, cached) = self.kv.add_sequence(tokens, self.key)?;
        match self.prefill_rows(model, cpu, seq, tokens, cached) {
            Ok((logits, hidden)) => Ok((seq, logits, hidden)),
            Err(e) => {
                // The sequence was added above; dropping it cannot fail.
                let _ = self.kv.free_sequence(seq);
                Err(e)
            }
        }
    }

    fn prefill_rows(
        &mut self,
        model: &Llama,
        cpu: &Cpu,
        seq: SeqId,
        tokens: &[u32],
        cached: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let c = self.dims.c;
        let bs = self.block_size;
        let table = table_u32(self.kv.block_table(seq)?);
        let mut pos0 = cached;
        let mut last_rows = 0;
        let mut rows: Vec<usize> = Vec::with_capacity(self.max_rows);
        while pos0 < tokens.len() {
            let end = (pos0 + self.max_rows).min(tokens.len());
            rows.clear();
            for p in pos0..end {
                let slot = self.kv.slot(seq, p)?;
                rows.push(slot.block.index() * bs + slot.offset);
            }
            for (dst, p) in self.bufs.positions.iter_mut().zip(pos0..end) {
                *dst = p as u32;
            }
            self.forward_rows(
                model,
                cpu,
                &tokens[pos0..end],
                &rows,
                &Attn::Prefill {
                    table: &table,
                    pos0,
                },
            )?;
            last_rows = end - pos0;
            pos0 = end;
        }
        let w = &model.weights;
        let last = &self.bufs.x[(last_rows - 1) * c..last_rows * c];
        let mut hidden = vec![0.0; c];
        cpu.rmsnorm(
            &mut hidden,
            last,
            w.get(&w.final_norm),
            model.config.rms_norm_eps,
        )?;
        let mut logits = vec![0.0; model.config.vocab_size];
        lm_logits(model, cpu, &hidden, &mut logits)?;
        self.kv.commit_full_blocks(seq, tokens)?;
        Ok((logits, hidden))
    }

    /// `k` children of `seq` sharing all its blocks.
    pub fn fork(&mut self, seq: SeqId, k: usize) -> Result<Vec<SeqId>> {
        Ok(self.kv.fork(seq, k)?)
    }

    /// Room in `seq`'s block list for `positions` positions in all, so that decode steps
    /// up to that length allocate nothing, the steps opening a block included (see
    /// [`KvManager::reserve`]).
    pub fn reserve(&mut self, seq: SeqId, positions: usize) -> Result<()> {
        self.kv.reserve(seq, positions)?;
        // No sequence outgrows the pool.
        let positions = positions.min(self.num_blocks * self.block_size);
        // The attention scratch of a decode or cascade step over that many positions.
        let shape = self.paged_shape();
        // Rows a step can hold: the live sequences (a later reserve for more sequences
        // sizes for them), at most `max_rows`.
        let rows = self.kv.num_sequences().min(self.max_rows);
        let need = cascade_scratch_len(&shape, rows, positions).max(positions);
        grow(&mut self.bufs.scratch, need);
        Ok(())
    }

    /// The attention kernels' view of the arenas.
    fn paged_shape(&self) -> PagedShape {
        let d = self.dims;
        PagedShape {
            n_heads: d.nh,
            n_kv_heads: d.nkv,
            head_dim: d.hs,
            block_size: self.block_size,
        }
    }

    /// Drops `seq` (its blocks stay reusable through the prefix cache until evicted).
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        Ok(self.kv.free_sequence(seq)?)
    }

    /// Blocks `append_slots(seq, 1)` would allocate for each of `seqs` in order (simulating
    /// the copy-on-write ref-count drops), so a step can fail before changing anything.
    fn blocks_needed(&self, seqs: &[SeqId], dropped: &mut Vec<(BlockId, u32)>) -> Result<usize> {
        let bs = self.block_size;
        dropped.clear();
        let mut needed = 0;
        for &s in seqs {
            let t = self.kv.table(s)?;
            if t.len().is_multiple_of(bs) {
                needed += 1;
                continue;
            }
            let Some(&last) = t.blocks().last() else {
                needed += 1;
                continue;
            };
            let base = self.kv.pool().ref_count(last).unwrap_or(0);
            let idx = dropped.iter().position(|&(b, _)| b == last);
            let gone = idx.map_or(0, |i| dropped[i].1);
            if base.saturating_sub(gone) > 1 {
                needed += 1;
                match idx {
                    Some(i) => dropped[i].1 += 1,
                    None => dropped.push((last, 1)),
                }
            }
        }
        Ok(needed)
    }

    /// One batched decode step: row b feeds `tokens[b]` to `seqs[b]`. Returns the
    /// final-normed hidden rows (B, C). With `shared = Some((owner, P))`, attention runs as
    /// a cascade with one shared level of the owner's first `floor(P / BS)` blocks (see the
    /// module docs). All or nothing for the cache: capacity and argument errors are
    /// reported before any sequence grows.
    pub fn decode_step(
        &mut self,
        model: &Llama,
        cpu: &Cpu,
        seqs: &[SeqId],
        tokens: &[u32],
        shared: Option<(SeqId, usize)>,
    ) -> Result<&[f32]> {
        let level;
        let levels: &[SharedLevel] = match shared {
            Some((owner, p)) => {
                let owner_len = self.kv.seq_len(owner)?;
                if p > owner_len {
                    return Err(KvError::InvalidArgument {
                        op: "PagedEngine::decode_step",
                        arg: "shared",
                        reason: format!("prefix of {p} positions but {owner} holds {owner_len}"),
                    }
                    .into());
                }
                level = SharedLevel {
                    owner,
                    blocks: 0..p / self.block_size,
                    members: 0..seqs.len(),
                };
                std::slice::from_ref(&level)
            }
            None => &[],
        };
        self.decode_step_levels(model, cpu, seqs, tokens, levels)
    }

    /// [`PagedEngine::decode_step`] with nested shared levels (e.g. prompt -> response ->
    /// K critiques, or the prompt shared by two compared responses): level i covers the
    /// FULL blocks `blocks` of `owner`'s table and is attended once per step for the rows
    /// `members` (a contiguous range of `seqs`). For every row, the levels it belongs to,
    /// in the order given, must tile its table from block 0 (each starts where the row's
    /// previous level ended) and hold exactly the row's own block ids; the rest of the row's
    /// table is its own suffix. Checked before anything changes.
    pub fn decode_step_levels(
        &mut self,
        model: &Llama,
        cpu: &Cpu,
        seqs: &[SeqId],
        tokens: &[u32],
        levels: &[SharedLevel],
    ) -> Result<&[f32]> {
        const OP: &str = "PagedEngine::decode_step";
        self.check_model(model, OP)?;
        let b = seqs.len();
        if b == 0 {
            return Err(ModelError::EmptyInput.into());
        }
        if tokens.len() != b || b > self.max_rows {
            return Err(Error::Usage(format!(
                "{OP}: {b} sequences and {} tokens; they must match and be at most {} (max_rows)",
                tokens.len(),
                self.max_rows
            )));
        }
        for (i, &s) in seqs.iter().enumerate() {
            if seqs[..i].contains(&s) {
                return Err(KvError::InvalidArgument {
                    op: OP,
                    arg: "seqs",
                    reason: format!("{s} appears twice"),
                }
                .into());
            }
            let pos = self.kv.seq_len(s)?;
            Self::check_tokens(model, &tokens[i..i + 1], pos)?;
        }
        // The step's bookkeeping lives outside `self` while the step runs (put back even
        // after an error, so its allocations are kept).
        let mut st = std::mem::take(&mut self.step);
        let r = self.decode_step_with(model, cpu, seqs, tokens, levels, &mut st);
        self.step = st;
        r?;
        let c = self.dims.c;
        let w = &model.weights;
        cpu.rmsnorm(
            &mut self.bufs.hidden[..b * c],
            &self.bufs.x[..b * c],
            w.get(&w.final_norm),
            model.config.rms_norm_eps,
        )?;
        Ok(&self.bufs.hidden[..b * c])
    }

    /// [`PagedEngine::decode_step_levels`] after its argument checks, its lists in `st`.
    fn decode_step_with(
        &mut self,
        model: &Llama,
        cpu: &Cpu,
        seqs: &[SeqId],
        tokens: &[u32],
        levels: &[SharedLevel],
        st: &mut StepBufs,
    ) -> Result<()> {
        const OP: &str = "PagedEngine::decode_step";
        let b = seqs.len();
        let bs = self.block_size;
        // Levels: full owner blocks, tiling each member's table from block 0.
        st.covered.clear();
        st.covered.resize(b, 0);
        st.n_levels = 0;
        for lv in levels {
            let bad = |reason: String| -> Error {
                KvError::InvalidArgument {
                    op: OP,
                    arg: "levels",
                    reason,
                }
                .into()
            };
            if lv.members.start > lv.members.end || lv.members.end > b {
                return Err(bad(format!(
                    "members {}..{} is not a range within the {b} rows",
                    lv.members.start, lv.members.end
                )));
            }
            let owner_len = self.kv.seq_len(lv.owner)?;
            if lv.blocks.start > lv.blocks.end || lv.blocks.end * bs > owner_len {
                return Err(bad(format!(
                    "blocks {}..{} are not full blocks of {} ({owner_len} positions)",
                    lv.blocks.start, lv.blocks.end, lv.owner
                )));
            }
            if lv.blocks.is_empty() || lv.members.is_empty() {
                continue;
            }
            let blocks = &self.kv.block_table(lv.owner)?[lv.blocks.clone()];
            for r in lv.members.clone() {
                let s = seqs[r];
                if st.covered[r] != lv.blocks.start
                    || self.kv.block_table(s)?.get(lv.blocks.clone()) != Some(blocks)
                    || self.kv.seq_len(s)? < lv.blocks.end * bs
                {
                    return Err(bad(format!(
                        "{s} does not hold blocks {}..{} of {} right after its earlier levels",
                        lv.blocks.start, lv.blocks.end, lv.owner
                    )));
                }
                st.covered[r] = lv.blocks.end;
            }
            if st.level_tables.len() == st.n_levels {
                st.level_tables.push((Vec::new(), 0, 0..0));
            }
            let (table, len, members) = &mut st.level_tables[st.n_levels];
            fill_table(table, blocks);
            *len = blocks.len() * bs;
            *members = lv.members.clone();
            st.n_levels += 1;
        }
        let needed = self.blocks_needed(seqs, &mut st.dropped)?;
        let free = self.kv.free_blocks();
        if needed > free {
            return Err(KvError::CapacityExhausted { needed, free }.into());
        }
        // Append one slot per sequence, running any copy-on-write on our arenas first.
        st.rows.clear();
        for (i, &s) in seqs.iter().enumerate() {
            let pos = self.kv.seq_len(s)?;
            let pending = self.kv.append_slots(s, 1)?;
            let dims = self.dims;
            let nb = self.num_blocks;
            let arenas = &mut self.arenas;
            let slot = pending.apply_first(|c| match arenas {
                KvArenas::F32(k, v) => copy_block(k, v, dims, nb, bs, c),
                KvArenas::F16(k, v) => copy_block(k, v, dims, nb, bs, c),
            })?;
            let slot = slot.ok_or_else(|| KvError::InvalidArgument {
                op: OP,
                arg: "seqs",
                reason: format!("no slot returned for {s}"),
            })?;
            st.rows.push(slot.block.index() * bs + slot.offset);
            self.bufs.positions[i] = pos as u32;
        }
        st.lens.clear();
        for (t, &s) in take_rows(&mut st.tables, b).iter_mut().zip(seqs) {
            let table = self.kv.table(s)?;
            fill_seq_table(t, table);
            st.lens.push(table.len());
        }
        if st.n_levels == 0 {
            return self.forward_rows(
                model,
                cpu,
                tokens,
                &st.rows,
                &Attn::Decode {
                    tables: &st.tables[..b],
                    lens: &st.lens,
                },
            );
        }
        st.suffix_lens.clear();
        for (i, t) in take_rows(&mut st.suffix_tables, b).iter_mut().enumerate() {
            let n = st.covered[i];
            t.reserve(st.tables[i].capacity());
            t.extend_from_slice(&st.tables[i][n..]);
            st.suffix_lens.push(st.lens[i] - n * bs);
        }
        let mut lv = recycle_levels(std::mem::take(&mut st.levels));
        lv.extend(
            st.level_tables[..st.n_levels]
                .iter()
                .map(|(table, len, members)| Level {
                    block_table: table,
                    len: *len,
                    members: members.clone(),
                }),
        );
        let r = self.forward_rows(
            model,
            cpu,
            tokens,
            &st.rows,
            &Attn::Cascade {
                levels: &lv,
                suffix_tables: &st.suffix_tables[..b],
                suffix_lens: &st.suffix_lens,
            },
        );
        st.levels = recycle_levels(lv);
        r
    }

    /// The layer loop over R = `ids.len()` rows at `self.bufs.positions[..R]`; row r's K/V
    /// go to arena row `rows[r]` (= block * BS + offset) of every layer. Leaves the
    /// residual stream in `self.bufs.x[..R*C]`.
    fn forward_rows(
        &mut self,
        model: &Llama,
        cpu: &Cpu,
        ids: &[u32],
        rows: &[usize],
        attn: &Attn<'_>,
    ) -> Result<()> {
        let d = self.dims;
        let t = ids.len();
        let (c, qd, kvd, idim) = (d.c, d.qd, d.kvd, d.idim);
        let w = &model.weights;
        let layer_elems = self.num_blocks * self.block_size * kvd;
        let shape = self.paged_shape();
        shape.validate("PagedEngine")?;
        // Scratch for the longest context of this pass.
        let need = match attn {
            Attn::Prefill { pos0, .. } => prefill_scratch_len(&shape, *pos0, t),
            Attn::Decode { lens, .. } => lens.iter().copied().max().unwrap_or(0),
            Attn::Cascade {
                levels,
                suffix_lens,
                ..
            } => {
                let m = suffix_lens.iter().copied().max().unwrap_or(0);
                let l = levels.iter().map(|l| l.len).max().unwrap_or(0);
                cascade_scratch_len(&shape, t, m.max(l))
            }
        };
        grow(&mut self.bufs.scratch, need);
        let mut suffix_refs = recycle_refs(std::mem::take(&mut self.bufs.refs));
        match attn {
            Attn::Decode { tables, .. } => suffix_refs.extend(tables.iter().map(|v| v.as_slice())),
            Attn::Cascade { suffix_tables, .. } => {
                suffix_refs.extend(suffix_tables.iter().map(|v| v.as_slice()))
            }
            Attn::Prefill { .. } => {}
        }
        let bufs = &mut self.bufs;
        bufs.rope.fill(&bufs.positions[..t], &model.inv_freq)?;
        let x = &mut bufs.x[..t * c];
        cpu.embedding(x, ids, w.get(&w.embed), c)?;
        for (l, lw) in w.layers.iter().enumerate() {
            let xn = &mut bufs.xn[..t * c];
            let q = &mut bufs.q[..t * qd];
            let k = &mut bufs.k[..t * kvd];
            let v = &mut bufs.v[..t * kvd];
            qkv_proj(cpu, model, lw, x, &bufs.rope, q, k, v, xn)?;
            let att = &mut bufs.att[..t * qd];
            let layer = l * layer_elems..(l + 1) * layer_elems;
            let step = LayerStep {
                cpu,
                rows,
                k,
                v,
                kvd,
                q,
                att,
                attn,
                shape,
                suffix_refs: &suffix_refs,
                scratch: &mut bufs.scratch,
            };
            match &mut self.arenas {
                KvArenas::F32(ka, va) => step.run(&mut ka[layer.clone()], &mut va[layer])?,
                KvArenas::F16(ka, va) => step.run(&mut ka[layer.clone()], &mut va[layer])?,
            }
            let proj = &mut bufs.proj[..t * c];
            cpu.matmul(proj, att, w.get(&lw.o_proj), lw.o_bias.as_deref(), qd, c)?;
            cpu.residual(x, proj)?;
            mlp_block(
                cpu,
                model,
                lw,
                x,
                MlpBuffers {
                    xn,
                    gate: &mut bufs.gate[..t * idim],
                    up: &mut bufs.up[..t * idim],
                    act: &mut bufs.act[..t * idim],
                    proj,
                },
            )?;
        }
        self.bufs.refs = recycle_refs(suffix_refs);
        Ok(())
    }
}

/// One layer's cache write and attention: the R rows' K/V into their arena rows (rounded
/// for an f16 cache), then the pass's attention over the layer's arenas.
struct LayerStep<'a> {
    cpu: &'a Cpu,
    rows: &'a [usize],
    k: &'a [f32],
    v: &'a [f32],
    kvd: usize,
    q: &'a [f32],
    att: &'a mut [f32],
    attn: &'a Attn<'a>,
    shape: PagedShape,
    suffix_refs: &'a [&'a [u32]],
    scratch: &'a mut [f32],
}

impl LayerStep<'_> {
    fn run<T: KvElem>(self, k_layer: &mut [T], v_layer: &mut [T]) -> Result<()> {
        let kvd = self.kvd;
        for (r, &row) in self.rows.iter().enumerate() {
            T::store_row(&mut k_layer[row * kvd..][..kvd], &self.k[r * kvd..][..kvd]);
            T::store_row(&mut v_layer[row * kvd..][..kvd], &self.v[r * kvd..][..kvd]);
        }
        let (k_layer, v_layer) = (&*k_layer, &*v_layer);
        let (cpu, att, q, shape, scratch) = (self.cpu, self.att, self.q, self.shape, self.scratch);
        match self.attn {
            Attn::Prefill { table, pos0 } => {
                cpu.paged_prefill_attention(att, q, k_layer, v_layer, table, *pos0, shape, scratch)?
            }
            Attn::Decode { lens, .. } => cpu.paged_decode_attention(
                att,
                q,
                k_layer,
                v_layer,
                self.suffix_refs,
                lens,
                shape,
                scratch,
            )?,
            Attn::Cascade {
                levels,
                suffix_lens,
                ..
            } => cpu.cascade_decode_attention(
                att,
                q,
                k_layer,
                v_layer,
                levels,
                self.suffix_refs,
                suffix_lens,
                shape,
                scratch,
            )?,
        }
        Ok(())
    }
}

/// Copy rows `0..len` of block `src` into `dst` in every layer of both arenas.
fn copy_block<T: KvElem>(
    k_arena: &mut [T],
    v_arena: &mut [T],
    d: Dims,
    num_blocks: usize,
    bs: usize,
    c: &CopyBlock,
) -> Result<(), KvError> {
    if c.src.index() >= num_blocks || c.dst.index() >= num_blocks || c.len > bs {
        return Err(KvError::InvalidBlock {
            op: "PagedEngine::copy_block",
            block: c.dst,
            reason: "copy out of range for the engine's arenas",
        });
    }
    let block = bs * d.kvd;
    let n = c.len * d.kvd;
    for l in 0..d.layers {
        let base = l * num_blocks * block;
        let (s, t) = (base + c.src.index() * block, base + c.dst.index() * block);
        k_arena.copy_within(s..s + n, t);
        v_arena.copy_within(s..s + n, t);
    }
    Ok(())
}

/// What the K/V arenas hold: f32 (the default; the reference's arithmetic bit for bit)
/// or f16 (half the bytes each decode step streams through attention and half the memory
/// per cached position; values rounded to nearest when written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCache {
    #[default]
    F32,
    F16,
}

impl KvCache {
    /// Bytes per cached element.
    pub fn bytes(self) -> usize {
        match self {
            KvCache::F32 => 4,
            KvCache::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvCache::F32 => f32::NAME,
            KvCache::F16 => f16::NAME,
        }
    }
}

impl std::str::FromStr for KvCache {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(KvCache::F32),
            "f16" => Ok(KvCache::F16),
            _ => Err(format!("unknown KV cache type `{s}` (expected f32 or f16)")),
        }
    }
}

impl std::fmt::Display for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The engine's K and V arenas of one element type.
#[derive(Debug)]
enum KvArenas {
    F32(Arena<f32>, Arena<f32>),
    F16(Arena<f16>, Arena<f16>),
}

/// A zeroed KV arena whose first element is 64-byte aligned, so every cached row (a
/// multiple of 64 bytes here) starts on a cache line: a plain `Vec<f32>` this large comes
/// from the allocator 16 bytes past a page boundary, which splits every 256-byte head row
/// over five lines and every other 32-byte load over two (the cascade attention kernel
/// measured about 6 % faster on aligned arenas).
struct Arena<T: KvElem> {
    buf: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: KvElem> Arena<T> {
    /// Elements of slack to move the start onto a 64-byte boundary.
    const SLACK: usize = 64 / std::mem::size_of::<T>();

    fn zeroed(len: usize) -> Arena<T> {
        let buf = T::zeroed_vec(len + Self::SLACK);
        // Elements to the next 64-byte boundary (< SLACK: the Vec is aligned to its
        // element size, which divides 64).
        let start = (64 - buf.as_ptr() as usize % 64) % 64 / std::mem::size_of::<T>();
        Arena { buf, start, len }
    }
}

impl<T: KvElem> std::fmt::Debug for Arena<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Arena({} x {}, 64-byte aligned)", self.len, T::NAME)
    }
}

impl<T: KvElem> std::ops::Deref for Arena<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl<T: KvElem> std::ops::DerefMut for Arena<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod arena_tests {
    use super::{Arena, KvCache};
    use half::f16;

    #[test]
    fn arena_is_zeroed_aligned_and_exactly_its_length() {
        for len in [0usize, 1, 15, 16, 17, 1 << 20] {
            let mut a = Arena::<f32>::zeroed(len);
            assert_eq!(a.len(), len);
            assert!(a.iter().all(|&v| v == 0.0));
            let h = Arena::<f16>::zeroed(len);
            assert_eq!(h.len(), len);
            assert!(h.iter().all(|&v| v == f16::ZERO));
            if len > 0 {
                assert_eq!(a.as_ptr() as usize % 64, 0, "len {len}");
                assert_eq!(h.as_ptr() as usize % 64, 0, "f16, len {len}");
                a[len - 1] = 3.0;
                a[0] += 1.0;
                assert_eq!(
                    (a[0], a[len - 1]),
                    if len == 1 { (4.0, 4.0) } else { (1.0, 3.0) }
                );
            }
        }
    }

    #[test]
    fn kv_cache_parses_its_names_and_rejects_others() {
        for c in [KvCache::F32, KvCache::F16] {
            assert_eq!(c.to_string().parse::<KvCache>(), Ok(c));
        }
        assert_eq!(KvCache::F16.bytes(), 2);
        let e = "bf16".parse::<KvCache>().unwrap_err();
        assert!(e.contains("bf16") && e.contains("f32 or f16"), "{e}");
    }
}
