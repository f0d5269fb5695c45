//! Fast paged attention: prefill, plain decode and cascade (shared-prefix) decode, with
//! the same contracts as `reference::attention_paged` (same checks, same errors).
//!
//! The unit of work is the reference's attention state of NQ query rows of one KV head over
//! a range of cached positions ([`partial`]). The AVX2 version (HS a multiple of 8) walks
//! the range in chunks of [`CHUNK`] positions so a chunk's K rows (then V rows) stay in L1
//! while every query row of the call reads them: scores four positions at a time with four
//! independent FMA chains, a vectorised `exp` for the softmax, and the weighted V sum four
//! positions per load/store of the output row. Other head sizes, and CPUs without AVX2,
//! run the reference loop.
//!
//! Threads (the global pool, no spawn or allocation per call once the per-thread scratch
//! has grown; items claimed dynamically): prefill splits (row, KV head) pairs, longest
//! causal rows first; decode splits (sequence, KV head) pairs; the cascade splits
//! KV heads times contiguous chunks of sequences, and each chunk reads every shared level
//! once for all its members' queries, so a shared prefix is read once per chunk per step
//! instead of once per sequence. Every work item writes a disjoint set of output rows.

use std::cell::RefCell;
use std::ops::Range;

use super::dispatch::{Isa, current, num_threads};
use super::pool;
use crate::error::{KernelError, check_len};
use crate::reference::attention::AttnShape;
use crate::reference::attention_paged::{
    Level, PagedShape, cascade_scratch_len, check_arena, check_prefill, check_table, merge_row,
    partial_unchecked,
};

/// Positions per chunk of the AVX2 partial (64 positions x HS 64 x 4 bytes = 16 KiB of K).
const CHUNK: usize = 64;

thread_local! {
    /// Per-thread scratch of the attention kernels; grows to the largest call seen.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with_borrow_mut(|s| {
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: hands disjoint output rows of one buffer to pool participants.
unsafe impl Send for SendPtr {}
// SAFETY: as above; participants never touch the same element.
unsafe impl Sync for SendPtr {}

/// Threads for `items` work items of about `flops` floating-point operations in all.
fn threads_for(items: usize, flops: usize) -> usize {
    if flops < 1 << 16 {
        1
    } else {
        num_threads().clamp(1, items.max(1))
    }
}

/// The attention state of the NQ = `lse.len()` query rows `q` of KV head `kv_head` over
/// `positions` of `table` (the reference's `partial_unchecked` contract; arguments already
/// checked). `scores` holds at least NQ * len(positions).
#[allow(clippy::too_many_arguments)]
fn partial(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k_arena: &[f32],
    v_arena: &[f32],
    table: &[u32],
    positions: Range<usize>,
    kv_head: usize,
    scale: f32,
    scores: &mut [f32],
    shape: &PagedShape,
    isa: Isa,
) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && shape.head_dim.is_multiple_of(8) {
        // SAFETY: AVX2+FMA detected; the caller checked the arena, table and lengths.
        unsafe {
            avx2::partial(
                out, lse, q, k_arena, v_arena, table, positions, kv_head, scale, scores, shape,
            )
        };
        return;
    }
    let _ = isa;
    partial_unchecked(
        out, lse, q, k_arena, v_arena, table, positions, kv_head, scale, scores, shape,
    );
}

/// Fast [`crate::reference::attention_paged::paged_prefill_attention`].
#[allow(clippy::too_many_arguments)]
pub fn paged_prefill_attention(
    out: &mut [f32],
    q: &[f32],
    k_arena: &[f32],
    v_arena: &[f32],
    block_table: &[u32],
    pos0: usize,
    shape: PagedShape,
    scratch: &mut [f32],
) -> Result<(), KernelError> {
    let rows = check_prefill(out, q, k_arena, v_arena, block_table, pos0, &shape, scratch)?;
    causal_rows(out, q, k_arena, v_arena, block_table, pos0, rows, &shape);
    Ok(())
}

/// Fast [`crate::reference::attention::attention_forward`]: the contiguous cache
/// (S, NKV, HS) is one block of S' = pos0 + T positions, so the paged prefill's work items
/// serve it unchanged.
pub fn attention_forward(
    out: &mut [f32],
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    scores: &mut [f32],
    shape: AttnShape,
) -> Result<(), KernelError> {
    const OP: &str = "attention_forward";
    shape.validate(OP)?;
    let q_width = shape.n_heads * shape.head_dim;
    let kv_width = shape.n_kv_heads * shape.head_dim;
    let needed = shape.pos0 + shape.n_tokens;
    check_len(OP, "q", q.len(), shape.n_tokens * q_width)?;
    check_len(OP, "out", out.len(), shape.n_tokens * q_width)?;
    if k_cache.len() < needed * kv_width || v_cache.len() != k_cache.len() {
        return Err(KernelError::Length {
            op: OP,
            arg: "k_cache/v_cache",
            expected: needed * kv_width,
            actual: k_cache.len().min(v_cache.len()),
        });
    }
    if scores.len() < needed {
        return Err(KernelError::Length {
            op: OP,
            arg: "scores",
            expected: needed,
            actual: scores.len(),
        });
    }
    if shape.n_tokens == 0 {
        return Ok(());
    }
    let paged = PagedShape {
        n_heads: shape.n_heads,
        n_kv_heads: shape.n_kv_heads,
        head_dim: shape.head_dim,
        block_size: needed,
    };
    causal_rows(
        out,
        q,
        &k_cache[..needed * kv_width],
        &v_cache[..needed * kv_width],
        &[0],
        shape.pos0,
        shape.n_tokens,
        &paged,
    );
    Ok(())
}

/// Causal attention of `rows` query rows at positions pos0.. over `table` (checked by the
/// caller), one work item per (row, KV head), longest rows first.
#[allow(clippy::too_many_arguments)]
fn causal_rows(
    out: &mut [f32],
    q: &[f32],
    k_arena: &[f32],
    v_arena: &[f32],
    block_table: &[u32],
    pos0: usize,
    rows: usize,
    shape: &PagedShape,
) {
    let shape = *shape;
    let isa = current();
    let (hs, group, nkv) = (shape.head_dim, shape.group(), shape.n_kv_heads);
    let gw = group * hs;
    let qd = shape.n_heads * hs;
    let scale = 1.0 / (hs as f32).sqrt();
    let items = rows * nkv;
    let flops = 4 * rows * shape.n_heads * hs * (pos0 + rows);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let out_len = out.len();
    pool::global().run_items(threads_for(items, flops), items, &|it| {
        // SAFETY: item (r, kvh) writes only out[r * qd + kvh * gw..][..gw]; items are
        // disjoint and `out` outlives `run_items`.
        let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get(), out_len) };
        // Longest rows first, so the last items claimed are the short ones.
        let (r, kvh) = (rows - 1 - it / nkv, it % nkv);
        let end = pos0 + r + 1;
        let off = r * qd + kvh * gw;
        with_scratch(group + group * end, |s| {
            let (lse, scores) = s.split_at_mut(group);
            partial(
                &mut out[off..off + gw],
                lse,
                &q[off..off + gw],
                k_arena,
                v_arena,
                block_table,
                0..end,
                kvh,
                scale,
                scores,
                &shape,
                isa,
            );
        });
    });
}

/// Fast [`crate::reference::attention_paged::paged_decode_attention`].
#[allow(clippy::too_many_arguments)]
pub fn paged_decode_attention(
    out: &mut [f32],
    q: &[f32],
    k_arena: &[f32],
    v_arena: &[f32],
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
    let mut total = 0;
    for (table, &len) in block_tables.iter().zip(seq_lens) {
        check_table(OP, "block_tables", table, len, shape.block_size, n_blocks)?;
        max_len = max_len.max(len);
        total += len;
    }
    if scores.len() < max_len {
        return Err(KernelError::Length {
            op: OP,
            arg: "scores",
            expected: max_len,
            actual: scores.len(),
        });
    }
    let isa = current();
    let (group, nkv) = (shape.group(), shape.n_kv_heads);
    let gw = group * hs;
    let scale = 1.0 / (hs as f32).sqrt();
    let items = n_seqs * nkv;
    let out_ptr = SendPtr(out.as_mut_ptr());
    let out_len = out.len();
    pool::global().run_items(threads_for(items, 4 * total * q_width), items, &|it| {
        // SAFETY: item (b, kvh) writes only out[b * q_width + kvh * gw..][..gw].
        let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get(), out_len) };
        let (b, kvh) = (it / nkv, it % nkv);
        let len = seq_lens[b];
        let off = b * q_width + kvh * gw;
        with_scratch(group + group * len, |s| {
            let (lse, scores) = s.split_at_mut(group);
            partial(
                &mut out[off..off + gw],
                lse,
                &q[off..off + gw],
                k_arena,
                v_arena,
                block_tables[b],
                0..len,
                kvh,
                scale,
                scores,
                &shape,
                isa,
            );
        });
    });
    Ok(())
}

/// Fast [`crate::reference::attention_paged::cascade_decode_attention`].
#[allow(clippy::too_many_arguments)]
pub fn cascade_decode_attention(
    out: &mut [f32],
    q: &[f32],
    k_arena: &[f32],
    v_arena: &[f32],
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
    check_len(OP, "suffix_tables", suffix_tables.len(), n_seqs)?;
    check_len(OP, "q", q.len(), n_seqs * nh * hs)?;
    check_len(OP, "out", out.len(), n_seqs * nh * hs)?;
    let mut max_len = 0;
    let mut work = 0;
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
        work += level.len * level.members.len();
    }
    for (table, &len) in suffix_tables.iter().zip(suffix_lens) {
        check_table(OP, "suffix_tables", table, len, shape.block_size, n_blocks)?;
        max_len = max_len.max(len);
        work += len;
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
    if n_seqs == 0 {
        return Ok(());
    }
    let isa = current();
    let (group, nkv) = (shape.group(), shape.n_kv_heads);
    let scale = 1.0 / (hs as f32).sqrt();
    let threads = threads_for(n_seqs * nkv, 4 * work * nh * hs);
    // Chunks of sequences per KV head: enough items for every thread, few enough that a
    // shared level is read by as few chunks as possible.
    let chunks = (2 * threads).div_ceil(nkv).clamp(1, n_seqs);
    let per_chunk = n_seqs.div_ceil(chunks);
    let chunks = n_seqs.div_ceil(per_chunk);
    let items = nkv * chunks;
    let out_ptr = SendPtr(out.as_mut_ptr());
    let out_len = out.len();
    pool::global().run_items(threads, items, &|it| {
        // SAFETY: item (kvh, chunk) writes only the rows (b, kvh * G + j) of `out` for the
        // sequences b of its chunk; items are disjoint and `out` outlives `run_items`.
        let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get(), out_len) };
        let rows = per_chunk * group;
        let len = 3 * rows * hs + 2 * rows + rows * max_len;
        with_scratch(len, |s| {
            let (qg, s) = s.split_at_mut(rows * hs);
            let (og, s) = s.split_at_mut(rows * hs);
            let (lg, s) = s.split_at_mut(rows);
            let (lse_run, s) = s.split_at_mut(rows);
            let (o_suffix, scores) = s.split_at_mut(rows * hs);
            let (kvh, chunk) = (it % nkv, it / nkv);
            let seqs = chunk * per_chunk..((chunk + 1) * per_chunk).min(n_seqs);
            let ctx = Cascade {
                q,
                k_arena,
                v_arena,
                shape: &shape,
                scale,
                isa,
                kvh,
            };
            ctx.run(
                out,
                seqs,
                levels,
                suffix_tables,
                suffix_lens,
                Bufs {
                    qg,
                    og,
                    lg,
                    lse_run,
                    o_suffix,
                    scores,
                },
            );
        });
    });
    Ok(())
}

/// Read-only inputs of one cascade work item (one KV head).
struct Cascade<'a> {
    q: &'a [f32],
    k_arena: &'a [f32],
    v_arena: &'a [f32],
    shape: &'a PagedShape,
    scale: f32,
    isa: Isa,
    kvh: usize,
}

/// Per-thread buffers of one cascade work item.
struct Bufs<'s> {
    /// (M*G, HS) gathered queries of the chunk's members of a level
    qg: &'s mut [f32],
    /// (M*G, HS) partial output of a level
    og: &'s mut [f32],
    /// (M*G) partial lse
    lg: &'s mut [f32],
    /// (chunk*G) running lse of the chunk's rows
    lse_run: &'s mut [f32],
    /// (G, HS) partial output of one suffix
    o_suffix: &'s mut [f32],
    scores: &'s mut [f32],
}

impl Cascade<'_> {
    /// Levels then suffixes for the sequences `seqs`, merged into their rows of `out`.
    fn run(
        &self,
        out: &mut [f32],
        seqs: Range<usize>,
        levels: &[Level<'_>],
        suffix_tables: &[&[u32]],
        suffix_lens: &[usize],
        b: Bufs<'_>,
    ) {
        let hs = self.shape.head_dim;
        let nh = self.shape.n_heads;
        let group = self.shape.group();
        let gw = group * hs;
        let head0 = self.kvh * group;
        // Running state: o = 0, lse = -inf for every row of the chunk.
        for s in seqs.clone() {
            out[(s * nh + head0) * hs..][..gw].fill(0.0);
        }
        b.lse_run[..seqs.len() * group].fill(f32::NEG_INFINITY);
        for level in levels {
            let m = level.members.start.max(seqs.start)..level.members.end.min(seqs.end);
            if m.is_empty() {
                continue;
            }
            let rows = m.len() * group;
            for (i, s) in m.clone().enumerate() {
                b.qg[i * gw..][..gw].copy_from_slice(&self.q[(s * nh + head0) * hs..][..gw]);
            }
            partial(
                &mut b.og[..rows * hs],
                &mut b.lg[..rows],
                &b.qg[..rows * hs],
                self.k_arena,
                self.v_arena,
                level.block_table,
                0..level.len,
                self.kvh,
                self.scale,
                b.scores,
                self.shape,
                self.isa,
            );
            for (i, s) in m.enumerate() {
                for j in 0..group {
                    let r = i * group + j;
                    merge_row(
                        &mut out[(s * nh + head0 + j) * hs..][..hs],
                        &mut b.lse_run[(s - seqs.start) * group + j],
                        &b.og[r * hs..][..hs],
                        b.lg[r],
                    );
                }
            }
        }
        for s in seqs.clone() {
            let len = suffix_lens[s];
            partial(
                &mut b.o_suffix[..gw],
                &mut b.lg[..group],
                &self.q[(s * nh + head0) * hs..][..gw],
                self.k_arena,
                self.v_arena,
                suffix_tables[s],
                0..len,
                self.kvh,
                self.scale,
                b.scores,
                self.shape,
                self.isa,
            );
            for j in 0..group {
                merge_row(
                    &mut out[(s * nh + head0 + j) * hs..][..hs],
                    &mut b.lse_run[(s - seqs.start) * group + j],
                    &b.o_suffix[j * hs..][..hs],
                    b.lg[j],
                );
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::CHUNK;
    use crate::reference::attention_paged::{PagedShape, row_offset};

    /// e^x for x <= 0 (softmax arguments after the max is subtracted): Cody-Waite range
    /// reduction and the Cephes degree-6 polynomial, relative error ~2 ulp; arguments
    /// below -87.3 give ~1e-38 instead of 0 (an absolute error far below f32 resolution of
    /// any sum it enters).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp(x: __m256) -> __m256 {
        let x = _mm256_max_ps(
            _mm256_min_ps(x, _mm256_set1_ps(88.0)),
            _mm256_set1_ps(-87.3),
        );
        let fx = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.398_199_9e-3));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.333_452e-3));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.166_579_6e-2));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.166_666_65));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5));
        y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r);
        y = _mm256_add_ps(y, _mm256_set1_ps(1.0));
        let e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(y, _mm256_castsi256_ps(e))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// The four horizontal sums of a, b, c, d as one vector [sa, sb, sc, sd].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        let ab = _mm256_hadd_ps(a, b);
        let cd = _mm256_hadd_ps(c, d);
        let abcd = _mm256_hadd_ps(ab, cd);
        _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1))
    }

    /// Dot of HS (a multiple of 8) elements.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot(a: *const f32, b: *const f32, hs: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: i + 8 <= hs.
        unsafe {
            while i < hs {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc);
                i += 8;
            }
            hsum(acc)
        }
    }

    /// See `super::partial`. HS is a multiple of 8.
    ///
    /// SAFETY: AVX2+FMA present; the arguments satisfy the reference partial's checks.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn partial(
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        k_arena: &[f32],
        v_arena: &[f32],
        table: &[u32],
        positions: Range<usize>,
        kv_head: usize,
        scale: f32,
        scores: &mut [f32],
        shape: &PagedShape,
    ) {
        let hs = shape.head_dim;
        let n_q = lse.len();
        let n_pos = positions.end.saturating_sub(positions.start);
        out[..n_q * hs].fill(0.0);
        if n_pos == 0 {
            lse.fill(f32::NEG_INFINITY);
            return;
        }
        let scores = &mut scores[..n_q * n_pos];
        let kp = k_arena.as_ptr();
        let vp = v_arena.as_ptr();
        let start = positions.start;
        let off = |j: usize| row_offset(table, start + j, kv_head, shape);
        let vscale = _mm256_set1_ps(scale);
        // SAFETY: every row offset lies in the checked arena (HS elements each), every
        // score index below n_q * n_pos, every q/out row below n_q.
        unsafe {
            // Pass 1: scores, chunk by chunk so the chunk's K rows stay in L1.
            let mut c0 = 0;
            while c0 < n_pos {
                let c1 = (c0 + CHUNK).min(n_pos);
                for n in 0..n_q {
                    let qn = q.as_ptr().add(n * hs);
                    let srow = scores.as_mut_ptr().add(n * n_pos);
                    let mut j = c0;
                    while j + 4 <= c1 {
                        let (k0, k1, k2, k3) = (
                            kp.add(off(j)),
                            kp.add(off(j + 1)),
                            kp.add(off(j + 2)),
                            kp.add(off(j + 3)),
                        );
                        let mut a0 = _mm256_setzero_ps();
                        let mut a1 = _mm256_setzero_ps();
                        let mut a2 = _mm256_setzero_ps();
                        let mut a3 = _mm256_setzero_ps();
                        let mut i = 0;
                        while i < hs {
                            let qv = _mm256_loadu_ps(qn.add(i));
                            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0.add(i)), a0);
                            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1.add(i)), a1);
                            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2.add(i)), a2);
                            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3.add(i)), a3);
                            i += 8;
                        }
                        let s = _mm_mul_ps(hsum4(a0, a1, a2, a3), _mm256_castps256_ps128(vscale));
                        _mm_storeu_ps(srow.add(j), s);
                        j += 4;
                    }
                    while j < c1 {
                        *srow.add(j) = dot(qn, kp.add(off(j)), hs) * scale;
                        j += 1;
                    }
                }
                c0 = c1;
            }

            // Pass 2: softmax per query row; lse = max + ln(sum).
            let n8 = n_pos / 8 * 8;
            for (row, l) in scores.chunks_exact_mut(n_pos).zip(lse.iter_mut()) {
                let p = row.as_mut_ptr();
                let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
                let mut j = 0;
                while j < n8 {
                    vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p.add(j)));
                    j += 8;
                }
                let mut max = {
                    let m =
                        _mm_max_ps(_mm256_extractf128_ps(vmax, 1), _mm256_castps256_ps128(vmax));
                    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                    _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)))
                };
                for &s in &row[n8..] {
                    max = max.max(s);
                }
                let vm = _mm256_set1_ps(max);
                let mut vsum = _mm256_setzero_ps();
                let mut j = 0;
                while j < n8 {
                    let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(j)), vm));
                    _mm256_storeu_ps(p.add(j), e);
                    vsum = _mm256_add_ps(vsum, e);
                    j += 8;
                }
                let mut sum = hsum(vsum);
                for s in &mut row[n8..] {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = _mm256_set1_ps(1.0 / sum);
                let mut j = 0;
                while j < n8 {
                    _mm256_storeu_ps(p.add(j), _mm256_mul_ps(_mm256_loadu_ps(p.add(j)), inv));
                    j += 8;
                }
                for s in &mut row[n8..] {
                    *s /= sum;
                }
                *l = max + sum.ln();
            }

            // Pass 3: out += p * V, chunk by chunk, four positions per pass over a row.
            let mut c0 = 0;
            while c0 < n_pos {
                let c1 = (c0 + CHUNK).min(n_pos);
                for n in 0..n_q {
                    let o = out.as_mut_ptr().add(n * hs);
                    let srow = scores.as_ptr().add(n * n_pos);
                    let mut j = c0;
                    while j + 4 <= c1 {
                        let (v0, v1, v2, v3) = (
                            vp.add(off(j)),
                            vp.add(off(j + 1)),
                            vp.add(off(j + 2)),
                            vp.add(off(j + 3)),
                        );
                        let w0 = _mm256_set1_ps(*srow.add(j));
                        let w1 = _mm256_set1_ps(*srow.add(j + 1));
                        let w2 = _mm256_set1_ps(*srow.add(j + 2));
                        let w3 = _mm256_set1_ps(*srow.add(j + 3));
                        let mut i = 0;
                        while i < hs {
                            let mut acc = _mm256_loadu_ps(o.add(i));
                            acc = _mm256_fmadd_ps(w0, _mm256_loadu_ps(v0.add(i)), acc);
                            acc = _mm256_fmadd_ps(w1, _mm256_loadu_ps(v1.add(i)), acc);
                            acc = _mm256_fmadd_ps(w2, _mm256_loadu_ps(v2.add(i)), acc);
                            acc = _mm256_fmadd_ps(w3, _mm256_loadu_ps(v3.add(i)), acc);
                            _mm256_storeu_ps(o.add(i), acc);
                            i += 8;
                        }
                        j += 4;
                    }
                    while j < c1 {
                        let v0 = vp.add(off(j));
                        let w0 = _mm256_set1_ps(*srow.add(j));
                        let mut i = 0;
                        while i < hs {
                            let acc = _mm256_fmadd_ps(
                                w0,
                                _mm256_loadu_ps(v0.add(i)),
                                _mm256_loadu_ps(o.add(i)),
                            );
                            _mm256_storeu_ps(o.add(i), acc);
                            i += 8;
                        }
                        j += 1;
                    }
                }
                c0 = c1;
            }
        }
    }
}
