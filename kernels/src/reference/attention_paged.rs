//! Paged decode attention and shared-prefix (cascade) attention with log-sum-exp merging.
//!
//! Shape letters in this file: B sequences in a decode group, NH query heads, NKV key/value
//! heads, G = NH / NKV query heads per KV head, HS head size, NB blocks in the arena, BS
//! positions per block, P positions of a shared (prefix) level, S positions of one
//! sequence's own suffix, NQ query rows handed to [`attention_partial`].
//!
//! **Storage.** Per layer the cache is a K arena and a V arena, each `(NB, BS, NKV, HS)`, of
//! f32 or f16 ([`KvElem`]: f16 values are widened exactly as they are read).
//! A sequence (or a shared level) owns a *block table*: block ids `u32` into the arena, in
//! position order, plus a length in positions; position `p` lives in block
//! `table[p / BS]` at offset `p % BS`. Block ids need not be contiguous or sorted.
//!
//! **Math.** Decode attention for one query `q` over positions `s` is
//! `o = sum_s softmax_s(scale * q.k_s) v_s` with `scale = 1/sqrt(HS)` (the same as
//! [`super::attention::attention_forward`]; query head h reads KV head h / G). Attention
//! over a split key set is exact when each part returns its normalised output `o_i` and the
//! log-sum-exp of its scores `lse_i = ln sum_s exp(scale * q.k_s)`:
//! `o = sum_i exp(lse_i - lse) o_i`, `lse = ln sum_i exp(lse_i)` (FlashInfer "attention
//! states", Hydragen). An empty part has `o = 0`, `lse = -inf` and is the identity of the
//! merge; [`merge_attention_states`] guards the `-inf` cases so no NaN appears.
//!
//! **Cascade.** CLoud decoding runs K critiques that continue one `[prompt, response]`
//! prefix. [`cascade_decode_attention`] computes each shared level once for all member
//! queries: for each KV head, *for each prefix block, for each position in it, for each
//! query row of every member sequence* (the position loop is outside the query loop), so
//! every prefix K row and V row is read once per decode step for the whole group instead
//! of once per sequence. Each sequence's own suffix is then attended separately and merged
//! by log-sum-exp, level by level (prompt -> response -> critique suffix). This is the
//! scalar oracle for the CUDA cascade kernel; it computes in f32 and, like the rest of
//! `reference/`, favours obviousness over speed. Everything here is forward only and
//! writes its outputs with `=` (no accumulation into the caller's buffers).

use std::ops::Range;

use crate::error::{KernelError, check_len};
use crate::kv::KvElem;

/// Shape of a paged attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedShape {
    /// NH: query heads.
    pub n_heads: usize,
    /// NKV: key/value heads; NH must be a positive multiple of it.
    pub n_kv_heads: usize,
    /// HS: head size.
    pub head_dim: usize,
    /// BS: positions per cache block.
    pub block_size: usize,
}

impl PagedShape {
    /// Errors unless NKV > 0, NH a multiple of NKV, HS > 0 and BS > 0.
    pub fn validate(&self, op: &'static str) -> Result<(), KernelError> {
        if self.n_kv_heads == 0
            || self.n_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
            || self.head_dim == 0
            || self.block_size == 0
        {
            return Err(KernelError::Invalid {
                op,
                arg: "shape",
                reason: format!(
                    "NH={} must be a positive multiple of NKV={}, HS={} and BS={} positive",
                    self.n_heads, self.n_kv_heads, self.head_dim, self.block_size
                ),
            });
        }
        Ok(())
    }

    /// G = NH / NKV: query heads per KV head (0 when NKV is 0).
    pub fn group(&self) -> usize {
        self.n_heads.checked_div(self.n_kv_heads).unwrap_or(0)
    }

    /// Elements of one arena block: BS * NKV * HS.
    pub fn block_elems(&self) -> usize {
        self.block_size * self.n_kv_heads * self.head_dim
    }
}

/// A level of shared context in a cascade: positions shared by a contiguous range of the
/// group's B sequences (e.g. the prompt for all of them, a response for a subset).
#[derive(Debug, Clone)]
pub struct Level<'a> {
    /// Block ids of this level, at least ceil(P / BS) of them; position p of the level is
    /// in block `block_table[p / BS]` at offset `p % BS`.
    pub block_table: &'a [u32],
    /// P: positions in this level (may be 0 and need not be a multiple of BS).
    pub len: usize,
    /// Which of the B sequences attend this level (a sub-range of 0..B).
    pub members: Range<usize>,
}

/// Scratch elements [`cascade_decode_attention`] needs for B = `n_seqs` sequences whose
/// longest level or suffix has `max_len` positions:
/// `2 * B*G*HS` (gathered queries, partial output) + `B*G` (partial lse) + `B*NH` (running
/// lse) + `B*G * max_len` (scores).
pub fn cascade_scratch_len(shape: &PagedShape, n_seqs: usize, max_len: usize) -> usize {
    let rows = n_seqs * shape.group();
    2 * rows * shape.head_dim + rows + n_seqs * shape.n_heads + rows * max_len
}

/// Arena checks shared by every entry point; returns NB.
pub(crate) fn check_arena<T: KvElem>(
    op: &'static str,
    shape: &PagedShape,
    k_arena: &[T],
    v_arena: &[T],
) -> Result<usize, KernelError> {
    let block = shape.block_elems();
    if !k_arena.len().is_multiple_of(block) {
        return Err(KernelError::Invalid {
            op,
            arg: "k_arena",
            reason: format!(
                "{} elements is not a whole number of blocks of BS*NKV*HS = {block}",
                k_arena.len()
            ),
        });
    }
    check_len(op, "v_arena", v_arena.len(), k_arena.len())?;
    Ok(k_arena.len() / block)
}

/// The table covers positions 0..`end` and each block id it uses for them is in the arena.
/// O(ceil(end / BS)).
pub(crate) fn check_table(
    op: &'static str,
    arg: &'static str,
    table: &[u32],
    end: usize,
    block_size: usize,
    n_blocks: usize,
) -> Result<(), KernelError> {
    let needed = end.div_ceil(block_size);
    if table.len() < needed {
        return Err(KernelError::Length {
            op,
            arg,
            expected: needed,
            actual: table.len(),
        });
    }
    for (i, &id) in table[..needed].iter().enumerate() {
        if id as usize >= n_blocks {
            return Err(KernelError::Invalid {
                op,
                arg,
                reason: format!(
                    "block id {id} at table index {i} is outside the arena of {n_blocks} blocks"
                ),
            });
        }
    }
    Ok(())
}

/// Offset of the (HS) row of `kv_head` at position `pos` of `table` in an arena.
#[inline]
pub(crate) fn row_offset(table: &[u32], pos: usize, kv_head: usize, shape: &PagedShape) -> usize {
    let block = table[pos / shape.block_size] as usize;
    ((block * shape.block_size + pos % shape.block_size) * shape.n_kv_heads + kv_head)
        * shape.head_dim
}

/// [`attention_partial`] after its checks. Loop order: for each block of the range, for each
/// position in it, for each query row — each K row and each V row is read once.
#[allow(clippy::too_many_arguments)]
pub(crate) fn partial_unchecked<T: KvElem>(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k_arena: &[T],
    v_arena: &[T],
    table: &[u32],
    positions: Range<usize>,
    kv_head: usize,
    scale: f32,
    scores: &mut [f32],
    shape: &PagedShape,
) {
    let hs = shape.head_dim;
    let bs = shape.block_size;
    let n_q = lse.len();
    let n_pos = positions.end.saturating_sub(positions.start);
    debug_assert_eq!(q.len(), n_q * hs);
    debug_assert_eq!(out.len(), n_q * hs);
    debug_assert!(scores.len() >= n_q * n_pos);
    out.fill(0.0);
    if n_pos == 0 {
        lse.fill(f32::NEG_INFINITY);
        return;
    }
    // scores (NQ, n_pos), row-major per query.
    let scores = &mut scores[..n_q * n_pos];

    // Pass 1: scores. For each block, for each position in it, for each query.
    let mut pos = positions.start;
    while pos < positions.end {
        let block_end = ((pos / bs + 1) * bs).min(positions.end);
        for p in pos..block_end {
            let j = p - positions.start;
            let k_row = &k_arena[row_offset(table, p, kv_head, shape)..][..hs];
            for (n, q_row) in q.chunks_exact(hs).enumerate() {
                let mut dot = 0.0f32;
                for i in 0..hs {
                    dot += q_row[i] * k_row[i].to_f32();
                }
                scores[n * n_pos + j] = dot * scale;
            }
        }
        pos = block_end;
    }

    // Pass 2: per query, softmax in place (row max subtracted) and lse = max + ln(sum).
    for (row, l) in scores.chunks_exact_mut(n_pos).zip(lse.iter_mut()) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0.0f32;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        for s in row.iter_mut() {
            *s /= sum;
        }
        *l = max + sum.ln();
    }

    // Pass 3: outputs. For each block, for each position in it, for each query.
    let mut pos = positions.start;
    while pos < positions.end {
        let block_end = ((pos / bs + 1) * bs).min(positions.end);
        for p in pos..block_end {
            let j = p - positions.start;
            let v_row = &v_arena[row_offset(table, p, kv_head, shape)..][..hs];
            for (n, o_row) in out.chunks_exact_mut(hs).enumerate() {
                let w = scores[n * n_pos + j];
                for i in 0..hs {
                    o_row[i] += w * v_row[i].to_f32();
                }
            }
        }
        pos = block_end;
    }
}

/// Attention of NQ query rows that all read KV head `kv_head` over the cached positions
/// `positions` = [start, end) of `block_table`, returning the merge-ready attention state.
///
/// - `out`: (NQ, HS) normalised output `sum_s softmax_s(scale * q.k_s) v_s`
/// - `lse`: (NQ) `ln sum_s exp(scale * q.k_s)`; NQ is taken from its length
/// - `q`: (NQ, HS)
/// - `k_arena`, `v_arena`: (NB, BS, NKV, HS)
/// - `block_table`: at least ceil(end / BS) block ids
/// - `scores`: scratch of at least NQ * (end - start) elements
///
/// An empty range gives `out = 0` and `lse = -inf`. Each K and V row in the range is read
/// once for all NQ queries (position loop outside the query loop).
#[allow(clippy::too_many_arguments)]
pub fn attention_partial<T: KvElem>(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k_arena: &[T],
    v_arena: &[T],
    block_table: &[u32],
    positions: Range<usize>,
    kv_head: usize,
    scale: f32,
    scores: &mut [f32],
    shape: PagedShape,
) -> Result<(), KernelError> {
    const OP: &str = "attention_partial";
    shape.validate(OP)?;
    let n_blocks = check_arena(OP, &shape, k_arena, v_arena)?;
    let n_q = lse.len();
    check_len(OP, "q", q.len(), n_q * shape.head_dim)?;
    check_len(OP, "out", out.len(), n_q * shape.head_dim)?;
    if positions.start > positions.end {
        return Err(KernelError::Invalid {
            op: OP,
            arg: "positions",
            reason: format!("start {} > end {}", positions.start, positions.end),
        });
    }
    if kv_head >= shape.n_kv_heads {
        return Err(KernelError::Invalid {
            op: OP,
            arg: "kv_head",
            reason: format!("{kv_head} is not below NKV={}", shape.n_kv_heads),
        });
    }
    check_table(
        OP,
        "block_table",
        block_table,
        positions.end,
        shape.block_size,
        n_blocks,
    )?;
    let needed = n_q * (positions.end - positions.start);
    if scores.len() < needed {
        return Err(KernelError::Length {
            op: OP,
            arg: "scores",
            expected: needed,
            actual: scores.len(),
        });
    }
    partial_unchecked(
        out,
        lse,
        q,
        k_arena,
        v_arena,
        block_table,
        positions,
        kv_head,
        scale,
        scores,
        &shape,
    );
    Ok(())
}

/// Merge one (HS) attention state b into a, in place (see [`merge_attention_states`]).
#[inline]
pub(crate) fn merge_row(o_a: &mut [f32], lse_a: &mut f32, o_b: &[f32], lse_b: f32) {
    debug_assert_eq!(o_a.len(), o_b.len());
    let la = *lse_a;
    if la == f32::NEG_INFINITY && lse_b == f32::NEG_INFINITY {
        // Both parts empty: exp(-inf - -inf) would be NaN; the empty set attends nothing.
        o_a.fill(0.0);
        return;
    }
    if lse_b == f32::NEG_INFINITY {
        return;
    }
    if la == f32::NEG_INFINITY {
        o_a.copy_from_slice(o_b);
        *lse_a = lse_b;
        return;
    }
    let m = la.max(lse_b);
    let wa = (la - m).exp();
    let wb = (lse_b - m).exp();
    let sum = wa + wb;
    let (ca, cb) = (wa / sum, wb / sum);
    for (a, &b) in o_a.iter_mut().zip(o_b) {
        *a = ca * *a + cb * b;
    }
    *lse_a = m + sum.ln();
}

/// Merge N attention states b into a, in place (FlashInfer `merge_state`):
/// with `m = max(lse_a, lse_b)`, `wa = e^(lse_a - m)`, `wb = e^(lse_b - m)`:
/// `o_a <- (wa o_a + wb o_b) / (wa + wb)`, `lse_a <- m + ln(wa + wb)`.
/// If `lse_b = -inf` a is kept exactly; if `lse_a = -inf` a becomes b exactly; if both
/// are `-inf` then `o_a = 0`, `lse_a = -inf` (no NaN).
///
/// - `o_a`: (N, HS) in/out; `lse_a`: (N) in/out; `o_b`: (N, HS); `lse_b`: (N)
pub fn merge_attention_states(
    o_a: &mut [f32],
    lse_a: &mut [f32],
    o_b: &[f32],
    lse_b: &[f32],
    head_dim: usize,
) -> Result<(), KernelError> {
    const OP: &str = "merge_attention_states";
    if head_dim == 0 {
        return Err(KernelError::Invalid {
            op: OP,
            arg: "head_dim",
            reason: "HS must be positive".to_string(),
        });
    }
    let n = lse_a.len();
    check_len(OP, "lse_b", lse_b.len(), n)?;
    check_len(OP, "o_a", o_a.len(), n * head_dim)?;
    check_len(OP, "o_b", o_b.len(), n * head_dim)?;
    for (((oa, la), ob), &lb) in o_a
        .chunks_exact_mut(head_dim)
        .zip(lse_a.iter_mut())
        .zip(o_b.chunks_exact(head_dim))
        .zip(lse_b)
    {
        merge_row(oa, la, ob, lb);
    }
    Ok(())
}

/// Plain paged decode: one new query per sequence attends all its cached positions
/// 0..len (the new token's own K/V already written), softmax(q k^T / sqrt(HS)) v.
/// Each (sequence, head) is computed independently, like `attention_forward`.
///
/// - `out`, `q`: (B, NH, HS); B is `seq_lens.len()`
/// - `k_arena`, `v_arena`: (NB, BS, NKV, HS)
/// - `block_tables`: B tables, table b holding at least `ceil(seq_lens[b] / BS)` block ids
/// - `seq_lens`: (B) positions per sequence; a length of 0 gives a zero output
/// - `scores`: scratch of at least max(seq_lens) elements
#[allow(clippy::too_many_arguments)]
pub fn paged_decode_attention<T: KvElem>(
    out: &mut [f32],
    q: &[f32],
    k_arena: &[T],
    v_arena: &[T],
    block_tables: &[&[u32]],
    seq_lens: &[usize],
    shape: PagedShape,
    scores: &mut [f32],
) -> Result<(), KernelError> {
    const OP: &str = "paged_decode_attention";
    shape.validate(OP)?;
    let n_blocks = check_arena(OP, &shape, k_arena, v_arena)?;
    let n_seqs = seq_lens.len();
    let hs = shape.head_dim;
    let q_width = shape.n_heads * hs;
    check_len(OP, "block_tables", block_tables.len(), n_seqs)?;
    check_len(OP, "q", q.len(), n_seqs * q_width)?;
    check_len(OP, "out", out.len(), n_seqs * q_width)?;
    let mut max_len = 0;
    for (table, &len) in block_tables.iter().zip(seq_lens) {
        check_table(OP, "block_tables", table, len, shape.block_size, n_blocks)?;
        max_len = max_len.max(len);
    }
    if scores.len() < max_len {
        return Err(KernelError::Length {
            op: OP,
            arg: "scores",
            expected: max_len,
            actual: scores.len(),
        });
    }
    let group = shape.group();
    let scale = 1.0 / (hs as f32).sqrt();
    for (b, (table, &len)) in block_tables.iter().zip(seq_lens).enumerate() {
        for h in 0..shape.n_heads {
            let kvh = h / group;
            let qh = &q[b * q_width + h * hs..][..hs];
            let oh = &mut out[b * q_width + h * hs..][..hs];
            oh.fill(0.0);
            if len == 0 {
                continue;
            }
            let mut max = f32::NEG_INFINITY;
            for (s, score) in scores[..len].iter_mut().enumerate() {
                let kh = &k_arena[row_offset(table, s, kvh, &shape)..][..hs];
                let mut dot = 0.0f32;
                for i in 0..hs {
                    dot += qh[i] * kh[i].to_f32();
                }
                *score = dot * scale;
                max = max.max(*score);
            }
            let mut sum = 0.0f32;
            for score in scores[..len].iter_mut() {
                *score = (*score - max).exp();
                sum += *score;
            }
            for (s, &p) in scores[..len].iter().enumerate() {
                let vh = &v_arena[row_offset(table, s, kvh, &shape)..][..hs];
                let w = p / sum;
                for i in 0..hs {
                    oh[i] += w * vh[i].to_f32();
                }
            }
        }
    }
    Ok(())
}

/// Cascade (shared-prefix) decode attention for a group of B sequences, one new query each.
///
/// Sequence b's context is the concatenation of every level in `levels` whose `members`
/// contain b, in list order, followed by its own suffix (`suffix_tables[b]`,
/// `suffix_lens[b]` positions, possibly 0). Nested CLoud levels are e.g. the prompt with
/// `members: 0..B`, then one level per response with the range of its K critiques as
/// members, with each critique's own tokens as its suffix. Levels need not nest for the
/// math to hold, and since RoPE is already applied to the cached K, only the set of
/// positions matters. The result equals [`paged_decode_attention`] over each sequence's
/// full concatenated context (same f32 math, different summation order). M below is the
/// number of members of a level, G = NH / NKV.
///
/// Loop order (the point of this kernel): for each level, for each KV head, the member
/// queries of that head are gathered into one (M*G, HS) block and [`attention_partial`]
/// runs *for each block of the level, for each position in it, for each gathered query*,
/// so every shared K row and V row is read once per step for the whole group. The suffix
/// of each sequence is attended the same way with its own G queries. Each part's
/// (o, lse) is merged into the running state with [`merge_attention_states`] semantics.
///
/// - `out`, `q`: (B, NH, HS); B is `suffix_lens.len()`
/// - `k_arena`, `v_arena`: (NB, BS, NKV, HS)
/// - `levels`: shared levels, each with at least ceil(P / BS) block ids and
///   `members` within 0..B
/// - `suffix_tables`: B tables, table b with at least ceil(S_b / BS) block ids
/// - `suffix_lens`: (B) suffix positions S_b
/// - `scratch`: at least [`cascade_scratch_len`]`(shape, B, max(P, S_b over all))`
#[allow(clippy::too_many_arguments)]
pub fn cascade_decode_attention<T: KvElem>(
    out: &mut [f32],
    q: &[f32],
    k_arena: &[T],
    v_arena: &[T],
    levels: &[Level<'_>],
    suffix_tables: &[&[u32]],
    suffix_lens: &[usize],
    shape: PagedShape,
    scratch: &mut [f32],
) -> Result<(), KernelError> {
    const OP: &str = "cascade_decode_attention";
    shape.validate(OP)?;
    let n_blocks = check_arena(OP, &shape, k_arena, v_arena)?;
    let n_seqs = suffix_lens.len();
    let hs = shape.head_dim;
    let nh = shape.n_heads;
    let group = shape.group();
    check_len(OP, "suffix_tables", suffix_tables.len(), n_seqs)?;
    check_len(OP, "q", q.len(), n_seqs * nh * hs)?;
    check_len(OP, "out", out.len(), n_seqs * nh * hs)?;
    let mut max_len = 0;
    for level in levels {
        if level.members.start > level.members.end || level.members.end > n_seqs {
            return Err(KernelError::Invalid {
                op: OP,
                arg: "levels",
                reason: format!(
                    "members {}..{} is not a range within the {n_seqs} sequences",
                    level.members.start, level.members.end
                ),
            });
        }
        check_table(
            OP,
            "levels",
            level.block_table,
            level.len,
            shape.block_size,
            n_blocks,
        )?;
        max_len = max_len.max(level.len);
    }
    for (table, &len) in suffix_tables.iter().zip(suffix_lens) {
        check_table(OP, "suffix_tables", table, len, shape.block_size, n_blocks)?;
        max_len = max_len.max(len);
    }
    let needed = cascade_scratch_len(&shape, n_seqs, max_len);
    if scratch.len() < needed {
        return Err(KernelError::Length {
            op: OP,
            arg: "scratch",
            expected: needed,
            actual: scratch.len(),
        });
    }

    let rows = n_seqs * group;
    let (q_gather, rest) = scratch.split_at_mut(rows * hs);
    let (o_part, rest) = rest.split_at_mut(rows * hs);
    let (lse_part, rest) = rest.split_at_mut(rows);
    let (lse_run, scores) = rest.split_at_mut(n_seqs * nh);

    // Running state: the empty context (o = 0, lse = -inf), the identity of the merge.
    out.fill(0.0);
    lse_run.fill(f32::NEG_INFINITY);

    let scale = 1.0 / (hs as f32).sqrt();
    let mut part = Part {
        q,
        k_arena,
        v_arena,
        shape: &shape,
        scale,
        q_gather,
        o_part,
        lse_part,
        scores,
        out,
        lse_run,
    };
    for level in levels {
        part.attend(level.block_table, level.len, level.members.clone());
    }
    for (b, (table, &len)) in suffix_tables.iter().zip(suffix_lens).enumerate() {
        part.attend(table, len, b..b + 1);
    }
    Ok(())
}

/// The buffers of one cascade call, split from its scratch.
struct Part<'s, 'a, T: KvElem> {
    /// (B, NH, HS)
    q: &'a [f32],
    /// (NB, BS, NKV, HS)
    k_arena: &'a [T],
    /// (NB, BS, NKV, HS)
    v_arena: &'a [T],
    shape: &'a PagedShape,
    scale: f32,
    /// (B*G, HS) queries of one KV head, gathered from the members
    q_gather: &'s mut [f32],
    /// (B*G, HS) partial output of one level and KV head
    o_part: &'s mut [f32],
    /// (B*G) partial lse
    lse_part: &'s mut [f32],
    /// (B*G, max P or S)
    scores: &'s mut [f32],
    /// (B, NH, HS) running output
    out: &'s mut [f32],
    /// (B, NH) running lse
    lse_run: &'s mut [f32],
}

impl<T: KvElem> Part<'_, '_, T> {
    /// Attend positions 0..len of `table` for every query of the sequences in `members`
    /// and merge the result into the running state. Arguments were checked by the caller.
    fn attend(&mut self, table: &[u32], len: usize, members: Range<usize>) {
        let hs = self.shape.head_dim;
        let nh = self.shape.n_heads;
        let group = self.shape.group();
        let rows = members.len() * group;
        if rows == 0 {
            return;
        }
        for kvh in 0..self.shape.n_kv_heads {
            // Gather: row (m*G + j) is query head kvh*G + j of sequence members.start + m.
            for (m, b) in members.clone().enumerate() {
                let src = &self.q[(b * nh + kvh * group) * hs..][..group * hs];
                self.q_gather[m * group * hs..][..group * hs].copy_from_slice(src);
            }
            partial_unchecked(
                &mut self.o_part[..rows * hs],
                &mut self.lse_part[..rows],
                &self.q_gather[..rows * hs],
                self.k_arena,
                self.v_arena,
                table,
                0..len,
                kvh,
                self.scale,
                self.scores,
                self.shape,
            );
            // Scatter-merge into the running state of each (sequence, head).
            for (m, b) in members.clone().enumerate() {
                for j in 0..group {
                    let r = m * group + j;
                    let h = b * nh + kvh * group + j;
                    merge_row(
                        &mut self.out[h * hs..][..hs],
                        &mut self.lse_run[h],
                        &self.o_part[r * hs..][..hs],
                        self.lse_part[r],
                    );
                }
            }
        }
    }
}

/// Scratch elements [`paged_prefill_attention`] needs: `G * (pos0 + T) + G`.
pub fn prefill_scratch_len(shape: &PagedShape, pos0: usize, n_rows: usize) -> usize {
    shape.group() * (pos0 + n_rows) + shape.group()
}

/// Causal prefill attention over the paged cache: T new rows at positions
/// `pos0..pos0 + T`, whose K/V are already in the arena, each attending every position up
/// to and including its own (row r sees 0..=pos0 + r), softmax(q k^T / sqrt(HS)) v.
/// Row r and KV head h run [`attention_partial`] with the G queries of that head.
///
/// - `out`, `q`: (T, NH, HS); T = `q.len() / (NH * HS)`
/// - `k_arena`, `v_arena`: (NB, BS, NKV, HS)
/// - `block_table`: at least ceil((pos0 + T) / BS) block ids
/// - `scratch`: at least [`prefill_scratch_len`]`(shape, pos0, T)`
#[allow(clippy::too_many_arguments)]
pub fn paged_prefill_attention<T: KvElem>(
    out: &mut [f32],
    q: &[f32],
    k_arena: &[T],
    v_arena: &[T],
    block_table: &[u32],
    pos0: usize,
    shape: PagedShape,
    scratch: &mut [f32],
) -> Result<(), KernelError> {
    let rows = check_prefill(out, q, k_arena, v_arena, block_table, pos0, &shape, scratch)?;
    let hs = shape.head_dim;
    let group = shape.group();
    let gw = group * hs;
    let qd = shape.n_heads * hs;
    let scale = 1.0 / (hs as f32).sqrt();
    let (lse, scores) = scratch.split_at_mut(group);
    for r in 0..rows {
        let end = pos0 + r + 1;
        for kvh in 0..shape.n_kv_heads {
            let off = r * qd + kvh * gw;
            partial_unchecked(
                &mut out[off..off + gw],
                lse,
                &q[off..off + gw],
                k_arena,
                v_arena,
                block_table,
                0..end,
                kvh,
                scale,
                &mut scores[..group * end],
                &shape,
            );
        }
    }
    Ok(())
}

/// Checks of [`paged_prefill_attention`] (shared with the fast kernel); returns T.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_prefill<T: KvElem>(
    out: &[f32],
    q: &[f32],
    k_arena: &[T],
    v_arena: &[T],
    block_table: &[u32],
    pos0: usize,
    shape: &PagedShape,
    scratch: &[f32],
) -> Result<usize, KernelError> {
    const OP: &str = "paged_prefill_attention";
    shape.validate(OP)?;
    let n_blocks = check_arena(OP, shape, k_arena, v_arena)?;
    let qd = shape.n_heads * shape.head_dim;
    if !q.len().is_multiple_of(qd) {
        return Err(KernelError::Invalid {
            op: OP,
            arg: "q",
            reason: format!(
                "{} elements is not a whole number of rows of NH*HS = {qd}",
                q.len()
            ),
        });
    }
    let rows = q.len() / qd;
    check_len(OP, "out", out.len(), q.len())?;
    check_table(
        OP,
        "block_table",
        block_table,
        pos0 + rows,
        shape.block_size,
        n_blocks,
    )?;
    let needed = prefill_scratch_len(shape, pos0, rows);
    if scratch.len() < needed {
        return Err(KernelError::Length {
            op: OP,
            arg: "scratch",
            expected: needed,
            actual: scratch.len(),
        });
    }
    Ok(rows)
}
