//! Fast paged attention: prefill, plain decode and cascade (shared-prefix) decode, with
//! the same contracts as `reference::attention_paged` (same checks, same errors).
//!
//! The unit of work is the reference's attention state of NQ query rows of one KV head over
//! a range of cached positions ([`partial`]). The AVX2 version (HS a multiple of 8) first
//! lists the range's row offsets (walking the block table, no division per row), then walks
//! the range in chunks of [`CHUNK`] positions so a chunk's K rows (then V rows) stay in L1
//! while every query row of the call reads them, prefetching the next chunk's rows (a paged
//! cache is far larger than L2 and its blocks defeat the hardware prefetcher). Scores: two
//! query rows by four positions share their loads, one accumulator per pair summed over
//! the head dim. Softmax: a vectorised `exp`. Weighted V sum: up to three query rows by up
//! to 32 channels of output live in registers across a chunk and share each V load,
//! adding the positions one by one in order, as the reference does. Other head sizes, and
//! CPUs without AVX2, run the reference loop.
//!
//! Arenas hold f32 or f16 ([`KvElem`]). f16 rows are widened in registers (F16C) as the
//! score and V-sum loops load them, and the transposed score loop below reads one chunk
//! of K widened into an L1 buffer; f16 to f32 is exact, so a result over an f16 arena is
//! bit for bit the result over an f32 arena holding the same values, with half the bytes
//! streamed.
//!
//! Many query rows of one KV head (eight or more: a shared level's members, a wide GQA
//! group, or a prefill block) take another score loop: the query is transposed and scaled
//! once per call, eight rows sit in the lanes of one register and each K element is
//! broadcast once for all of them, so no horizontal sums and one pass over the chunk for
//! up to 16 rows (24, three registers of rows, ran a fifth slower: out of registers).
//! On AVX-512 paths that loop (16 rows per register, up to 64 rows a pass), the softmax
//! and the weighted V sum (16 channels per register) take 16-lane forms whose every lane
//! does the AVX2 lane's arithmetic in its order: the same bits on every path.
//!
//! Threads (the global pool, no spawn or allocation per call once the per-thread scratch
//! has grown; items claimed dynamically): prefill splits (block of [`QBLOCK`] positions,
//! KV head) pairs, longest blocks first, each block's rows (all the group's query heads)
//! taking the many-row loops together with a causal length per row, so each K and V row
//! is read once per block rather than once per row; the blocks are aligned to absolute
//! positions and always take the transposed score loop, so a row's bits do not depend on
//! the call it is in. Plain decode cuts each sequence into pieces of [`DECODE_SPLIT`] positions
//! and runs (piece, KV head) items, so one long sequence keeps every thread busy (three KV
//! heads on two threads left one idle a third of the time); a sequence of one piece writes
//! its output directly, longer ones merge their pieces' states in order after. The
//! cascade cuts every shared level into pieces of [`SPLIT`] and runs (piece, KV head)
//! items over all the level's members' queries at once, so a shared prefix is read once
//! per step whatever the thread count, next to (sequence, KV head) items for the
//! suffixes; a second pass merges each row's states in a fixed order. The pieces have a
//! fixed size, so results do not depend on the thread count. Every work item writes a
//! disjoint set of rows.

use std::cell::RefCell;
use std::ops::Range;

use super::dispatch::{Isa, current, num_threads};
use super::pool::{self, SendPtr};
use crate::error::{KernelError, check_len};
use crate::kv::KvElem;
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
        grow_with_room(s, len, SCRATCH_ROOM);
        f(&mut s[..len])
    })
}

/// Per-thread buffers, when they first grow, take room for contexts up to ROOM_POSITIONS
/// positions at once (and double past it), so decode steps stop allocating after the
/// first one instead of at every power of two of the context length.
const ROOM_POSITIONS: usize = 4096;
/// [`SCRATCH`]'s room: a suffix item's scores (G x positions) for G up to 8.
const SCRATCH_ROOM: usize = 8 * ROOM_POSITIONS;
/// [`PARTS`]'s room: piece states of 16 sequences of ROOM_POSITIONS positions, 32 heads of
/// 64 (rows x (HS + 1)).
const PARTS_ROOM: usize = 16 * (ROOM_POSITIONS / DECODE_SPLIT + 1) * 32 * 65;

/// At least ROOM_POSITIONS elements of spare capacity once, for lists of one entry per
/// position or piece (cleared and refilled every call).
fn reserve_room<T>(v: &mut Vec<T>) {
    if v.capacity() < ROOM_POSITIONS {
        v.reserve(ROOM_POSITIONS);
    }
}

/// `v.len() >= len`, new elements zero; a growing buffer takes at least `room` elements
/// of capacity.
fn grow_with_room<T: Clone + Default>(v: &mut Vec<T>, len: usize, room: usize) {
    if v.len() < len {
        if v.capacity() < len {
            v.reserve(len.max(room) - v.len());
        }
        v.resize(len, T::default());
    }
}

/// Threads for `items` work items of about `flops` floating-point operations in all.
fn threads_for(items: usize, flops: usize) -> usize {
    if flops < 1 << 16 {
        1
    } else {
        num_threads().clamp(1, items.max(1))
    }
}

/// Whether [`partial`] takes the AVX2 kernels (which alone serve a [`Causal`] block).
fn avx2_path(isa: Isa, shape: &PagedShape) -> bool {
    cfg!(target_arch = "x86_64") && isa >= Isa::Avx2 && shape.head_dim.is_multiple_of(8)
}

/// A causal block of query rows (see [`causal_rows`]): query row v sees the first
/// `first_len + v / group` positions of the call, and the scores take the transposed path
/// whatever the number of rows, so a row's bits do not depend on which other rows share
/// its block.
#[derive(Clone, Copy)]
struct Causal {
    first_len: usize,
    group: usize,
}

impl Causal {
    fn len(self, row: usize) -> usize {
        self.first_len + row / self.group
    }
}

/// The attention state of the NQ = `lse.len()` query rows `q` of KV head `kv_head` over
/// `positions` of `table` (the reference's `partial_unchecked` contract; arguments already
/// checked), or with `causal` over each row's own first positions (only where
/// [`avx2_path`] holds). `scores` holds at least NQ * len(positions).
#[allow(clippy::too_many_arguments)]
fn partial<T: KvElem>(
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
    causal: Option<Causal>,
    isa: Isa,
) {
    #[cfg(target_arch = "x86_64")]
    if avx2_path(isa, shape) {
        // SAFETY: AVX2+FMA detected (AVX-512F too where `isa` is an AVX-512 path); the
        // caller checked the arena, table and lengths.
        unsafe {
            avx2::partial(
                out,
                lse,
                q,
                k_arena,
                v_arena,
                table,
                positions,
                kv_head,
                scale,
                scores,
                shape,
                causal,
                isa >= Isa::Avx512,
            )
        };
        return;
    }
    let _ = isa;
    debug_assert!(causal.is_none(), "causal blocks need the AVX2 path");
    partial_unchecked(
        out, lse, q, k_arena, v_arena, table, positions, kv_head, scale, scores, shape,
    );
}

/// Fast [`crate::reference::attention_paged::paged_prefill_attention`].
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

/// Query rows per work item of the blocked causal attention: a block is QBLOCK positions
/// aligned to multiples of QBLOCK, so a row's block (and its bits) do not depend on where
/// the call starts (a prompt partly served from the prefix cache scores exactly as when
/// computed whole).
const QBLOCK: usize = 16;

/// Causal attention of `rows` query rows at positions pos0.. over `table` (checked by the
/// caller), one work item per (block of positions, KV head), longest blocks first. On the
/// AVX2 path a block is QBLOCK positions: every query head of the block's rows reads each
/// K and V row of the chunk once from L1, each row over its own causal length
/// ([`Causal`]). Elsewhere a block is one position (the reference loop per row).
#[allow(clippy::too_many_arguments)]
fn causal_rows<T: KvElem>(
    out: &mut [f32],
    q: &[f32],
    k_arena: &[T],
    v_arena: &[T],
    block_table: &[u32],
    pos0: usize,
    rows: usize,
    shape: &PagedShape,
) {
    if rows == 0 {
        return;
    }
    let shape = *shape;
    let isa = current();
    let blocked = avx2_path(isa, &shape);
    let qb = if blocked { QBLOCK } else { 1 };
    let (hs, group, nkv) = (shape.head_dim, shape.group(), shape.n_kv_heads);
    let gw = group * hs;
    let qd = shape.n_heads * hs;
    let scale = 1.0 / (hs as f32).sqrt();
    let (first, last) = (pos0 / qb, (pos0 + rows - 1) / qb);
    let items = (last - first + 1) * nkv;
    let flops = 4 * rows * shape.n_heads * hs * (pos0 + rows);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let out_len = out.len();
    pool::global().run_items(threads_for(items, flops), items, &|it| {
        // SAFETY: item (block, kvh) writes only the kvh slice (gw floats) of its block's
        // rows; items are disjoint and `out` outlives `run_items`.
        let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get(), out_len) };
        // Longest blocks first, so the last items claimed are the short ones.
        let (blk, kvh) = (last - it / nkv, it % nkv);
        // Rows ra..rb of the call (positions pos0 + ra..) lie in the block.
        let ra = (blk * qb).max(pos0) - pos0;
        let rb = ((blk + 1) * qb).min(pos0 + rows) - pos0;
        let n_q = (rb - ra) * group;
        let n_pos = pos0 + rb;
        with_scratch(2 * n_q * hs + n_q + n_q * n_pos, |s| {
            let (qg, s) = s.split_at_mut(n_q * hs);
            let (og, s) = s.split_at_mut(n_q * hs);
            let (lse, scores) = s.split_at_mut(n_q);
            for (r, dst) in (ra..rb).zip(qg.chunks_exact_mut(gw)) {
                dst.copy_from_slice(&q[r * qd + kvh * gw..][..gw]);
            }
            // Off the AVX2 path a block is one row, which needs no causal lengths: its
            // query heads all see the n_pos positions.
            let causal = blocked.then_some(Causal {
                first_len: pos0 + ra + 1,
                group,
            });
            partial(
                og,
                lse,
                qg,
                k_arena,
                v_arena,
                block_table,
                0..n_pos,
                kvh,
                scale,
                scores,
                &shape,
                causal,
                isa,
            );
            for (r, src) in (ra..rb).zip(og.chunks_exact(gw)) {
                out[r * qd + kvh * gw..][..gw].copy_from_slice(src);
            }
        });
    });
}

/// Fast [`crate::reference::attention_paged::paged_decode_attention`].
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
    let (group, nkv, nh) = (shape.group(), shape.n_kv_heads, shape.n_heads);
    let gw = group * hs;
    let scale = 1.0 / (hs as f32).sqrt();
    DECODE_WORK.with_borrow_mut(|work| {
        // (sequence, piece, first state row in PARTS or NO_PARTS): a sequence of one piece
        // writes its output rows directly.
        work.clear();
        reserve_room(work);
        let mut part_rows = 0;
        for (s, &len) in seq_lens.iter().enumerate() {
            let pieces = len.div_ceil(DECODE_SPLIT).max(1);
            let base = if pieces > 1 {
                part_rows += pieces * nh;
                part_rows - pieces * nh
            } else {
                NO_PARTS
            };
            work.extend((0..pieces).map(|p| (s, p, base)));
        }
        let work = &*work;
        PARTS.with_borrow_mut(|parts| {
            let parts_len = part_rows * (hs + 1);
            grow_with_room(parts, parts_len, PARTS_ROOM);
            let parts_ptr = SendPtr(parts.as_mut_ptr());
            let out_ptr = SendPtr(out.as_mut_ptr());
            let items = work.len() * nkv;
            let one = |wi: usize, kvh: usize| {
                let (s, p, base) = work[wi];
                let pos = piece_range(p, seq_lens[s], DECODE_SPLIT);
                let off = s * q_width + kvh * gw;
                with_scratch(group + group * pos.len(), |sc| {
                    let (lse, scores) = sc.split_at_mut(group);
                    // SAFETY: item (piece, kvh) alone writes rows kvh * G..(kvh + 1) * G
                    // of its sequence's output (a sequence of one piece) or of its piece's
                    // state block; both buffers outlive the job.
                    let (o, lse) = unsafe {
                        if base == NO_PARTS {
                            (
                                std::slice::from_raw_parts_mut(out_ptr.get().add(off), gw),
                                lse,
                            )
                        } else {
                            let r = base + p * nh + kvh * group;
                            (
                                std::slice::from_raw_parts_mut(parts_ptr.get().add(r * hs), gw),
                                std::slice::from_raw_parts_mut(
                                    parts_ptr.get().add(part_rows * hs + r),
                                    group,
                                ),
                            )
                        }
                    };
                    partial(
                        o,
                        lse,
                        &q[off..off + gw],
                        k_arena,
                        v_arena,
                        block_tables[s],
                        pos.clone(),
                        kvh,
                        scale,
                        scores,
                        &shape,
                        None,
                        isa,
                    );
                });
            };
            // As the cascade: with pieces enough for every thread twice over (a batch of
            // sequences), an item takes all KV heads of one piece, its blocks read whole
            // first; otherwise (a single stream) one item per (piece, KV head).
            let threads = threads_for(items, 4 * total * q_width);
            if whole_items(work.len(), threads, nkv) {
                pool::global().run_items(threads, work.len(), &|wi| {
                    let (s, p, _) = work[wi];
                    let pos = piece_range(p, seq_lens[s], DECODE_SPLIT);
                    warm(k_arena, v_arena, block_tables[s], pos, &shape);
                    for kvh in 0..nkv {
                        one(wi, kvh);
                    }
                });
            } else {
                pool::global().run_items(threads, items, &|it| one(it / nkv, it % nkv));
            }
            // Merge the pieces of each long sequence in order (the state rows were handed
            // out in sequence order above).
            let parts = &parts[..parts_len];
            let mut base = 0;
            for (s, &len) in seq_lens.iter().enumerate() {
                let pieces = len.div_ceil(DECODE_SPLIT).max(1);
                if pieces == 1 {
                    continue;
                }
                for h in 0..nh {
                    merge_states(
                        &mut out[(s * nh + h) * hs..][..hs],
                        parts,
                        part_rows,
                        (0..pieces).map(|p| base + p * nh + h),
                    );
                }
                base += pieces * nh;
            }
        });
    });
    Ok(())
}

const NO_PARTS: usize = usize::MAX;

thread_local! {
    /// The (sequence, piece, state row) work list of one plain decode call.
    static DECODE_WORK: RefCell<Vec<(usize, usize, usize)>> = const { RefCell::new(Vec::new()) };
}

/// Fast [`crate::reference::attention_paged::cascade_decode_attention`].
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
    let nkv = shape.n_kv_heads;
    let scale = 1.0 / (hs as f32).sqrt();
    let threads = threads_for(n_seqs * nkv, 4 * work * nh * hs);
    let lay = PartsLayout::new(levels, n_seqs, nh, hs);
    let level_items = lay.pieces_total * nkv;
    let items = level_items + n_seqs * nkv;
    PARTS.with_borrow_mut(|parts| {
        grow_with_room(parts, lay.len(), PARTS_ROOM);
        let parts_ptr = SendPtr(parts.as_mut_ptr());
        let ctx = Cascade {
            q,
            k_arena,
            v_arena,
            shape: &shape,
            scale,
            isa,
            lay: &lay,
            parts: parts_ptr,
        };
        // Phase 1: every (level piece, KV head) and (suffix, KV head) attention state.
        if whole_items(lay.pieces_total + n_seqs, threads, nkv) {
            pool::global().run_items(threads, lay.pieces_total + n_seqs, &|it| {
                if it < lay.pieces_total {
                    let (li, p, _) = lay.piece(levels, it);
                    let level = &levels[li];
                    let pos = piece_range(p, level.len, SPLIT);
                    warm(k_arena, v_arena, level.block_table, pos, &shape);
                    for kvh in 0..nkv {
                        ctx.level_piece(levels, it, kvh);
                    }
                } else {
                    let s = it - lay.pieces_total;
                    let (table, len) = (suffix_tables[s], suffix_lens[s]);
                    warm(k_arena, v_arena, table, 0..len, &shape);
                    for kvh in 0..nkv {
                        ctx.suffix(table, len, s, kvh);
                    }
                }
            });
        } else {
            pool::global().run_items(threads, items, &|it| {
                if it < level_items {
                    let (kvh, piece) = (it % nkv, it / nkv);
                    ctx.level_piece(levels, piece, kvh);
                } else {
                    let it = it - level_items;
                    let (kvh, s) = (it % nkv, it / nkv);
                    ctx.suffix(suffix_tables[s], suffix_lens[s], s, kvh);
                }
            });
        }
        // Phase 2: merge each output row's states in a fixed order (levels, their pieces,
        // then the suffix), whatever the thread count.
        let out_ptr = SendPtr(out.as_mut_ptr());
        let out_len = out.len();
        let merge_threads = if n_seqs * nh * (lay.pieces_total + 1) * hs < 1 << 14 {
            1
        } else {
            threads
        };
        pool::global().run_items(merge_threads, n_seqs, &|s| {
            // SAFETY: item s writes only sequence s's rows of `out`; `out` outlives the job.
            let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get(), out_len) };
            ctx.merge(out, levels, s);
        });
    });
    Ok(())
}

/// Reads the K and V rows (all heads) of `positions` of `table`, block by block, one
/// load per cache line: each block's rows are contiguous, so the hardware streams them in
/// at full bandwidth, where the per-head rows (one piece of HS every NKV * HS elements)
/// are fetched a few lines at a time by the kernels' own access pattern.
fn warm<T: KvElem>(k: &[T], v: &[T], table: &[u32], positions: Range<usize>, shape: &PagedShape) {
    let bs = shape.block_size;
    let row = shape.n_kv_heads * shape.head_dim;
    let step = (64 / std::mem::size_of::<T>()).max(1);
    let mut pos = positions.start;
    while pos < positions.end {
        let blk = pos / bs;
        let last = ((blk + 1) * bs).min(positions.end);
        let a = (table[blk] as usize * bs + pos % bs) * row;
        let b = a + (last - pos) * row;
        for arena in [k, v] {
            let mut i = a;
            while i < b {
                // SAFETY: i < b <= arena.len() (the caller checked the table).
                unsafe { std::ptr::read_volatile(arena.as_ptr().add(i)) };
                i += step;
            }
        }
        pos = last;
    }
}

/// Positions of piece `p` of a level or sequence of `len` positions cut every `split`.
fn piece_range(p: usize, len: usize, split: usize) -> Range<usize> {
    p * split..((p + 1) * split).min(len)
}

/// Whether a job of `units` pieces and suffixes runs as one item per unit over all `nkv`
/// heads, its blocks read whole first ([`warm`]), rather than one item per (unit, KV
/// head): when the units go round the threads twice. The states are the same either way.
fn whole_items(units: usize, threads: usize, nkv: usize) -> bool {
    units >= 2 * threads && nkv > 1
}

/// Positions per piece of a shared level: a level is read once per step by as many
/// threads as there are pieces and KV heads (a fixed size, so the result does not depend
/// on the thread count).
const SPLIT: usize = 256;

/// Positions per piece of a plain decode sequence (fixed, as [`SPLIT`]). Smaller than a
/// level's piece: a single stream after a 512-token prompt is five pieces, enough for
/// whole items on two threads ([`whole_items`]), where 256 gave three and left it on
/// per-head items reading one KV head's rows in every three (`cargo bench --bench kernels
/// -- decode_attention`, docs/benchmarks.md). The cascade keeps 256: its pieces serve
/// eight members' rows each, and 128 was not faster there.
const DECODE_SPLIT: usize = 128;

thread_local! {
    /// Attention states of one cascade call (see [`PartsLayout`]) or of the long sequences'
    /// pieces of one decode call, on the calling thread.
    static PARTS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Where the attention states of a cascade call live in one buffer: for each level, for
/// each piece, (members, NH, HS) outputs; then (B, NH, HS) suffix outputs; then the lse
/// values in the same order ((members, NH) per piece, then (B, NH)).
struct PartsLayout {
    pieces_total: usize,
    /// State rows (one per member and head) of every level piece, before the suffix block.
    level_rows: usize,
    n_seqs: usize,
    nh: usize,
    hs: usize,
}

/// Per level, in order: (pieces, state rows per piece = members * NH, first state row).
fn level_blocks<'l>(
    levels: &'l [Level<'_>],
    nh: usize,
) -> impl Iterator<Item = (usize, usize, usize)> + 'l {
    levels.iter().scan(0, move |row, l| {
        let (pieces, per) = (l.len.div_ceil(SPLIT), l.members.len() * nh);
        let first = *row;
        *row += pieces * per;
        Some((pieces, per, first))
    })
}

impl PartsLayout {
    fn new(levels: &[Level<'_>], n_seqs: usize, nh: usize, hs: usize) -> Self {
        let (mut pieces_total, mut level_rows) = (0, 0);
        for (pieces, per, _) in level_blocks(levels, nh) {
            pieces_total += pieces;
            level_rows += pieces * per;
        }
        PartsLayout {
            pieces_total,
            level_rows,
            n_seqs,
            nh,
            hs,
        }
    }

    fn rows(&self) -> usize {
        self.level_rows + self.n_seqs * self.nh
    }

    fn len(&self) -> usize {
        self.rows() * (self.hs + 1)
    }

    /// Output offset of row 0 of a state block starting at state row `row`.
    fn o(&self, row: usize) -> usize {
        row * self.hs
    }

    fn lse(&self, row: usize) -> usize {
        self.rows() * self.hs + row
    }

    /// Global piece index -> (level, piece within it, first state row of the piece).
    fn piece(&self, levels: &[Level<'_>], mut piece: usize) -> (usize, usize, usize) {
        for (li, (pieces, per, first)) in level_blocks(levels, self.nh).enumerate() {
            if piece < pieces {
                return (li, piece, first + piece * per);
            }
            piece -= pieces;
        }
        unreachable!("piece index within pieces_total")
    }
}

/// Read-only inputs of a cascade call.
struct Cascade<'a, T: KvElem> {
    q: &'a [f32],
    k_arena: &'a [T],
    v_arena: &'a [T],
    shape: &'a PagedShape,
    scale: f32,
    isa: Isa,
    lay: &'a PartsLayout,
    parts: SendPtr<f32>,
}

impl<T: KvElem> Cascade<'_, T> {
    /// The state of every member's query rows of KV head `kvh` over one piece of a level.
    fn level_piece(&self, levels: &[Level<'_>], piece: usize, kvh: usize) {
        let (li, p, row0) = self.lay.piece(levels, piece);
        let level = &levels[li];
        let (hs, nh, group) = (self.shape.head_dim, self.shape.n_heads, self.shape.group());
        let gw = group * hs;
        let members = level.members.len();
        let rows = members * group;
        let pos = piece_range(p, level.len, SPLIT);
        let head0 = kvh * group;
        with_scratch(2 * rows * hs + rows + rows * SPLIT, |s| {
            let (qg, s) = s.split_at_mut(rows * hs);
            let (og, s) = s.split_at_mut(rows * hs);
            let (lg, scores) = s.split_at_mut(rows);
            for (i, sq) in level.members.clone().enumerate() {
                qg[i * gw..][..gw].copy_from_slice(&self.q[(sq * nh + head0) * hs..][..gw]);
            }
            partial(
                og,
                lg,
                qg,
                self.k_arena,
                self.v_arena,
                level.block_table,
                pos,
                kvh,
                self.scale,
                scores,
                self.shape,
                None,
                self.isa,
            );
            // SAFETY: this item alone writes rows (i, head0..head0 + G) of its piece's
            // block; the buffer holds `lay.len()` elements and outlives the job.
            unsafe {
                let base = self.parts.get();
                for i in 0..members {
                    let r = row0 + i * nh + head0;
                    std::ptr::copy_nonoverlapping(
                        og.as_ptr().add(i * gw),
                        base.add(self.lay.o(r)),
                        gw,
                    );
                    std::ptr::copy_nonoverlapping(
                        lg.as_ptr().add(i * group),
                        base.add(self.lay.lse(r)),
                        group,
                    );
                }
            }
        });
    }

    /// The state of sequence `s`'s query rows of KV head `kvh` over its own suffix.
    fn suffix(&self, table: &[u32], len: usize, s: usize, kvh: usize) {
        let (hs, nh, group) = (self.shape.head_dim, self.shape.n_heads, self.shape.group());
        let gw = group * hs;
        let r = self.lay.level_rows + s * nh + kvh * group;
        with_scratch(group * len.max(1), |scores| {
            // SAFETY: this item alone writes rows (s, kvh * G..kvh * G + G) of the suffix
            // block; the buffer holds `lay.len()` elements and outlives the job.
            let (o, lse) = unsafe {
                let base = self.parts.get();
                (
                    std::slice::from_raw_parts_mut(base.add(self.lay.o(r)), gw),
                    std::slice::from_raw_parts_mut(base.add(self.lay.lse(r)), group),
                )
            };
            partial(
                o,
                lse,
                &self.q[(s * nh + kvh * group) * hs..][..gw],
                self.k_arena,
                self.v_arena,
                table,
                0..len,
                kvh,
                self.scale,
                scores,
                self.shape,
                None,
                self.isa,
            );
        });
    }

    /// Sequence `s`'s output rows: its levels' pieces in order, then its suffix.
    fn merge(&self, out: &mut [f32], levels: &[Level<'_>], s: usize) {
        let (hs, nh) = (self.shape.head_dim, self.shape.n_heads);
        let base = self.parts.get() as *const f32;
        // SAFETY: phase 1 is over; the buffer is only read here.
        let parts = unsafe { std::slice::from_raw_parts(base, self.lay.len()) };
        for h in 0..nh {
            let level_rows = levels
                .iter()
                .zip(level_blocks(levels, nh))
                .filter(|(l, _)| l.members.contains(&s))
                .flat_map(|(l, (pieces, per, first))| {
                    let i = s - l.members.start;
                    (0..pieces).map(move |p| first + p * per + i * nh + h)
                });
            let suffix_row = self.lay.level_rows + s * nh + h;
            merge_states(
                &mut out[(s * nh + h) * hs..][..hs],
                parts,
                self.lay.rows(),
                level_rows.chain([suffix_row]),
            );
        }
    }
}

/// Merges, in the order given, the attention states `rows` of a buffer holding `n_rows`
/// states (their HS outputs, row after row, then their lse values) into `o`.
fn merge_states(o: &mut [f32], parts: &[f32], n_rows: usize, rows: impl Iterator<Item = usize>) {
    let hs = o.len();
    o.fill(0.0);
    let mut lse = f32::NEG_INFINITY;
    for r in rows {
        merge_row(o, &mut lse, &parts[r * hs..][..hs], parts[n_rows * hs + r]);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{CHUNK, Causal, reserve_room};
    use crate::cpu::simd::avx2::{exp, load_f16x8};
    use crate::kv::KvElem;
    use crate::reference::attention_paged::{PagedShape, partial_unchecked, row_offset};

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// The four horizontal sums of a, b, c, d as one vector [sa, sb, sc, sd].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        let ab = _mm256_hadd_ps(a, b);
        let cd = _mm256_hadd_ps(c, d);
        let abcd = _mm256_hadd_ps(ab, cd);
        _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1))
    }

    /// Eight cached values at element `idx` of an arena: f32, or f16 widened (`F16`, the
    /// arena's elements then being u16 at `base`).
    ///
    /// SAFETY: AVX2+F16C; 8 readable elements at `idx`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn ld<const F16: bool>(base: *const f32, idx: usize) -> __m256 {
        // SAFETY: see the function's contract.
        unsafe {
            if F16 {
                load_f16x8((base as *const half::f16).add(idx))
            } else {
                _mm256_loadu_ps(base.add(idx))
            }
        }
    }

    /// Dot of HS (a multiple of 8) elements: `a` against the cached row at element `b` of
    /// `base`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot<const F16: bool>(a: *const f32, base: *const f32, b: usize, hs: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: i + 8 <= hs.
        unsafe {
            while i < hs {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), ld::<F16>(base, b + i), acc);
                i += 8;
            }
            hsum(acc)
        }
    }

    /// Per-thread buffers of [`partial`].
    #[derive(Default)]
    struct Bufs {
        /// Arena offsets (elements) of the rows of one call.
        offs: Vec<usize>,
        /// f16 arenas: `(j % CHUNK) * HS` for position j, the offset of its row in `wide`.
        local: Vec<usize>,
        /// The head size `local` was built for.
        local_hs: usize,
        /// f16 arenas: one chunk's rows widened to f32 (CHUNK x HS).
        wide: Vec<f32>,
    }

    thread_local! {
        static BUFS: std::cell::RefCell<Bufs> = std::cell::RefCell::new(Bufs::default());
    }

    /// Where a call's K and V rows are, and whether they are f16 (widened exactly as the
    /// loops load them, see [`ld`] and [`chunk_rows`]).
    #[derive(Clone, Copy)]
    struct Src {
        /// K and V arena bases (f16 elements when `f16`, read through [`ld`]).
        k: *const f32,
        v: *const f32,
        f16: bool,
    }

    impl Src {
        /// Bytes per arena element.
        fn es(self) -> usize {
            if self.f16 { 2 } else { 4 }
        }
    }

    /// See `super::partial`. HS is a multiple of 8. With `zmm` the transposed score loop,
    /// the softmax and the weighted V sum take their AVX-512 forms ([`zmm`]: the same
    /// bits).
    ///
    /// SAFETY: AVX2+FMA+F16C present, and AVX-512F with `zmm`; the arguments satisfy the
    /// reference partial's checks.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn partial<T: KvElem>(
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
        causal: Option<Causal>,
        zmm: bool,
    ) {
        // The row offsets once per call, walking the blocks (no division per position:
        // a 64-bit divide per K and per V row cost more than the arithmetic it feeds).
        BUFS.with_borrow_mut(|b| {
            let offs = &mut b.offs;
            offs.clear();
            reserve_room(offs);
            let bs = shape.block_size;
            let (mut blk, mut r) = (positions.start / bs, positions.start % bs);
            let head = kv_head * shape.head_dim;
            let row = shape.n_kv_heads * shape.head_dim;
            for _ in positions.clone() {
                offs.push((table[blk] as usize * bs + r) * row + head);
                r += 1;
                if r == bs {
                    r = 0;
                    blk += 1;
                }
            }
            debug_assert!(
                offs.iter()
                    .zip(positions.clone())
                    .all(|(&o, p)| o == row_offset(table, p, kv_head, shape))
            );
            let src = if let (Some(k), Some(v)) = (T::as_f32(k_arena), T::as_f32(v_arena)) {
                Src {
                    k: k.as_ptr(),
                    v: v.as_ptr(),
                    f16: false,
                }
            } else if let (Some(k), Some(v)) = (T::as_f16(k_arena), T::as_f16(v_arena)) {
                let hs = shape.head_dim;
                if b.local_hs != hs {
                    b.local.clear();
                    b.local_hs = hs;
                }
                if b.local.len() < offs.len() {
                    reserve_room(&mut b.local);
                    let from = b.local.len();
                    b.local.extend((from..offs.len()).map(|j| (j % CHUNK) * hs));
                }
                if b.wide.len() < CHUNK * hs {
                    b.wide.resize(CHUNK * hs, 0.0);
                }
                Src {
                    k: k.as_ptr() as *const f32,
                    v: v.as_ptr() as *const f32,
                    f16: true,
                }
            } else {
                // No other element type exists (the trait is sealed); the reference
                // serves any anyway (and no causal caller reaches here).
                debug_assert!(causal.is_none());
                partial_unchecked(
                    out, lse, q, k_arena, v_arena, table, positions, kv_head, scale, scores, shape,
                );
                return;
            };
            // SAFETY: forwarded caller guarantees.
            unsafe { partial_at(out, lse, q, src, b, scale, scores, shape, causal, zmm) }
        })
    }

    /// [`partial`] with the row offsets of its positions in `b.offs`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn partial_at(
        out: &mut [f32],
        lse: &mut [f32],
        q: &[f32],
        src: Src,
        b: &mut Bufs,
        scale: f32,
        scores: &mut [f32],
        shape: &PagedShape,
        causal: Option<Causal>,
        zmm: bool,
    ) {
        let wide = b.wide.as_mut_ptr();
        let (offs, local) = (&b.offs[..], &b.local[..]);
        let hs = shape.head_dim;
        let n_q = lse.len();
        let n_pos = offs.len();
        out[..n_q * hs].fill(0.0);
        if n_pos == 0 {
            lse.fill(f32::NEG_INFINITY);
            return;
        }
        let scores = &mut scores[..n_q * n_pos];
        let (k_base, v_base, es) = (src.k as *const u8, src.v as *const u8, src.es());
        // SAFETY: every row offset lies in the checked arena (HS elements each), every
        // score index below n_q * n_pos, every q/out row below n_q.
        unsafe {
            // Many query rows (a shared level's members): Q transposed and scaled once,
            // (HS, RP) with RP = rows rounded up to the register's lanes, zero padded.
            let lanes = if zmm { 16 } else { 8 };
            let rp = n_q.div_ceil(lanes) * lanes;
            let mut qt = QT.take();
            let many = n_q >= MANY_ROWS || causal.is_some();
            // Positions row `r` sees.
            let len_of = |r: usize| causal.map_or(n_pos, |c| c.len(r));
            debug_assert!((0..n_q).all(|r| (1..=n_pos).contains(&len_of(r))));
            if many {
                qt.clear();
                qt.resize(hs * rp, 0.0);
                for r in 0..n_q {
                    for i in 0..hs {
                        qt[i * rp + r] = q[r * hs + i] * scale;
                    }
                }
            }
            // Pass 1: scores, chunk by chunk so the chunk's K rows stay in L1; two query
            // rows at a time share each K load (or every row shares it, transposed).
            // The rows come from a paged cache far larger than L2, in blocks the hardware
            // prefetcher cannot predict: each chunk asks for the next chunk's rows (K in
            // pass 1, then V) while it computes.
            prefetch_rows(k_base, es, offs, 0..CHUNK.min(n_pos), hs);
            let mut c0 = 0;
            while c0 < n_pos {
                let c1 = (c0 + CHUNK).min(n_pos);
                if c1 < n_pos {
                    prefetch_rows(k_base, es, offs, c1..(c1 + CHUNK).min(n_pos), hs);
                } else {
                    prefetch_rows(v_base, es, offs, 0..CHUNK.min(n_pos), hs);
                }
                if many {
                    // Broadcasts need f32 rows: an f16 chunk is widened once for all rows.
                    let (kp, offs) = chunk_rows(src, offs, local, wide, c0..c1, hs);
                    let (rv, step) = (rp / lanes, if zmm { 4 } else { 2 });
                    let mut vb = 0;
                    while vb < rv {
                        let a = ScoreT {
                            qt: qt.as_ptr(),
                            rp,
                            vb,
                            n_q,
                            scores: scores.as_mut_ptr(),
                            n_pos,
                            kp,
                            hs,
                        };
                        match (zmm, rv - vb) {
                            (true, 1) => zmm::score_t::<1>(&a, c0..c1, offs),
                            (true, 2) => zmm::score_t::<2>(&a, c0..c1, offs),
                            (true, 3) => zmm::score_t::<3>(&a, c0..c1, offs),
                            (true, _) => zmm::score_t::<4>(&a, c0..c1, offs),
                            (false, 1) => score_t::<1>(&a, c0..c1, offs),
                            (false, _) => score_t::<2>(&a, c0..c1, offs),
                        }
                        vb += step;
                    }
                } else {
                    let mut n = 0;
                    while n < n_q {
                        let two = n_q - n >= 2;
                        score(two, q, scores, n, n_pos, c0..c1, src, offs, hs, scale);
                        n += 2;
                    }
                }
                c0 = c1;
            }

            QT.set(qt);
            // Pass 2: softmax per query row over the positions it sees (the rest of a
            // causal row is zeroed: pass 3 adds those positions as exact zeros);
            // lse = max + ln(sum).
            for (r, (full, l)) in scores
                .chunks_exact_mut(n_pos)
                .zip(lse.iter_mut())
                .enumerate()
            {
                let len = len_of(r);
                let (row, masked) = full.split_at_mut(len);
                masked.fill(0.0);
                *l = if zmm {
                    zmm::softmax_row(row)
                } else {
                    softmax_row(row)
                };
            }

            // Pass 3: out += p * V, chunk by chunk; up to three query rows by up to 32
            // channels of the output stay in registers for the whole chunk and share each
            // V load.
            let mut c0 = 0;
            while c0 < n_pos {
                let c1 = (c0 + CHUNK).min(n_pos);
                if c1 < n_pos {
                    prefetch_rows(v_base, es, offs, c1..(c1 + CHUNK).min(n_pos), hs);
                }
                let mut n = 0;
                while n < n_q {
                    let r = (n_q - n).min(3);
                    // The rows' last, which sees the most positions (rows of a causal
                    // block see more as they go).
                    let seen = c1.min(len_of(n + r - 1));
                    if seen <= c0 {
                        n += r;
                        continue;
                    }
                    let mut ch = 0;
                    while ch < hs {
                        let a = PvArgs {
                            out: out.as_mut_ptr(),
                            scores: scores.as_ptr(),
                            vp: src.v,
                            n,
                            n_pos,
                            ch,
                            hs,
                        };
                        let cols = c0..seen;
                        if zmm && hs - ch >= 16 {
                            let nv = ((hs - ch) / 16).min(4);
                            let (cols, f16) = (cols, src.f16);
                            match (r, nv) {
                                (3, 4) => zmm::pv::<3, 4>(&a, cols, offs, f16),
                                (3, 3) => zmm::pv::<3, 3>(&a, cols, offs, f16),
                                (3, 2) => zmm::pv::<3, 2>(&a, cols, offs, f16),
                                (3, _) => zmm::pv::<3, 1>(&a, cols, offs, f16),
                                (2, 4) => zmm::pv::<2, 4>(&a, cols, offs, f16),
                                (2, 3) => zmm::pv::<2, 3>(&a, cols, offs, f16),
                                (2, 2) => zmm::pv::<2, 2>(&a, cols, offs, f16),
                                (2, _) => zmm::pv::<2, 1>(&a, cols, offs, f16),
                                (_, 4) => zmm::pv::<1, 4>(&a, cols, offs, f16),
                                (_, 3) => zmm::pv::<1, 3>(&a, cols, offs, f16),
                                (_, 2) => zmm::pv::<1, 2>(&a, cols, offs, f16),
                                _ => zmm::pv::<1, 1>(&a, cols, offs, f16),
                            }
                            ch += nv * 16;
                            continue;
                        }
                        let nv = ((hs - ch) / 8).min(4);
                        match (r, nv) {
                            (3, 4) => pv::<3, 4>(&a, cols, offs, src.f16),
                            (3, 3) => pv::<3, 3>(&a, cols, offs, src.f16),
                            (3, 2) => pv::<3, 2>(&a, cols, offs, src.f16),
                            (3, _) => pv::<3, 1>(&a, cols, offs, src.f16),
                            (2, 4) => pv::<2, 4>(&a, cols, offs, src.f16),
                            (2, 3) => pv::<2, 3>(&a, cols, offs, src.f16),
                            (2, 2) => pv::<2, 2>(&a, cols, offs, src.f16),
                            (2, _) => pv::<2, 1>(&a, cols, offs, src.f16),
                            (_, 4) => pv::<1, 4>(&a, cols, offs, src.f16),
                            (_, 3) => pv::<1, 3>(&a, cols, offs, src.f16),
                            (_, 2) => pv::<1, 2>(&a, cols, offs, src.f16),
                            _ => pv::<1, 1>(&a, cols, offs, src.f16),
                        }
                        ch += nv * 8;
                    }
                    n += r;
                }
                c0 = c1;
            }
        }
    }

    /// The row's softmax in place (a vectorised `exp`: eight lanes summed, then the tail);
    /// returns its lse = max + ln(sum).
    ///
    /// SAFETY: AVX2+FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn softmax_row(row: &mut [f32]) -> f32 {
        let len = row.len();
        let n8 = len / 8 * 8;
        let p = row.as_mut_ptr();
        // SAFETY: every vector access lies below n8 <= len.
        unsafe {
            let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut j = 0;
            while j < n8 {
                vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p.add(j)));
                j += 8;
            }
            let mut max = hmax(vmax);
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
            max + sum.ln()
        }
    }

    /// The largest of eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hmax(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)))
    }

    /// Ask for the cache lines of rows `offs[j]..offs[j] + hs` (elements of `es` bytes)
    /// of `base`, j in `rows`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn prefetch_rows(base: *const u8, es: usize, offs: &[usize], rows: Range<usize>, hs: usize) {
        for j in rows {
            let row = base.wrapping_add(offs[j] * es) as *const i8;
            let mut b = 0;
            while b < hs * es {
                // SAFETY: a prefetch never faults; the address is within the arena.
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(b));
                b += 64;
            }
        }
    }

    /// The K rows of the chunk of positions `cols` (starting at a multiple of CHUNK) as
    /// f32 rows and their offsets: in place with the call's offsets for an f32 arena;
    /// widened into `wide` (CHUNK x HS) with the chunk-local offsets `local` for an f16
    /// arena.
    ///
    /// SAFETY: AVX2+F16C; `offs[j]` is a readable row of HS elements for j in `cols`;
    /// `wide` holds CHUNK * HS floats and `cols` spans at most CHUNK positions.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn chunk_rows<'o>(
        src: Src,
        offs: &'o [usize],
        local: &'o [usize],
        wide: *mut f32,
        cols: Range<usize>,
        hs: usize,
    ) -> (*const f32, &'o [usize]) {
        if !src.f16 {
            return (src.k, offs);
        }
        debug_assert!(cols.start.is_multiple_of(CHUNK) && cols.len() <= CHUNK);
        // SAFETY: see the function's contract.
        unsafe {
            for (i, j) in cols.enumerate() {
                let d = wide.add(i * hs);
                let mut c = 0;
                while c < hs {
                    _mm256_storeu_ps(d.add(c), ld::<true>(src.k, offs[j] + c));
                    c += 8;
                }
            }
        }
        (wide, local)
    }

    /// [`score_rows`] over two query rows (`two`) or one, for an f32 or f16 arena.
    ///
    /// SAFETY: as [`score_rows`] (R = 2 when `two`, else 1).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn score(
        two: bool,
        q: &[f32],
        scores: &mut [f32],
        n: usize,
        n_pos: usize,
        cols: Range<usize>,
        src: Src,
        offs: &[usize],
        hs: usize,
        scale: f32,
    ) {
        let (kp, f16) = (src.k, src.f16);
        // SAFETY: forwarded.
        unsafe {
            match (two, f16) {
                (true, false) => {
                    score_rows::<2, false>(q, scores, n, n_pos, cols, kp, offs, hs, scale)
                }
                (true, true) => {
                    score_rows::<2, true>(q, scores, n, n_pos, cols, kp, offs, hs, scale)
                }
                (false, false) => {
                    score_rows::<1, false>(q, scores, n, n_pos, cols, kp, offs, hs, scale)
                }
                (false, true) => {
                    score_rows::<1, true>(q, scores, n, n_pos, cols, kp, offs, hs, scale)
                }
            }
        }
    }

    /// [`pv_rows`] for an f32 or (`f16`) f16 arena.
    ///
    /// SAFETY: as [`pv_rows`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pv<const R: usize, const V: usize>(
        a: &PvArgs,
        cols: Range<usize>,
        offs: &[usize],
        f16: bool,
    ) {
        // SAFETY: forwarded.
        unsafe {
            if f16 {
                pv_rows::<R, V, true>(a, cols, offs)
            } else {
                pv_rows::<R, V, false>(a, cols, offs)
            }
        }
    }

    /// Scores of query rows `n..n + R` against positions `cols` (scaled), written to
    /// `scores[row * n_pos + j]`. Every (row, position) keeps one accumulator over the
    /// head dim and groups of four positions are summed with `hsum4`, the rest with
    /// `hsum`, so a score does not depend on R.
    ///
    /// SAFETY: AVX2+FMA; rows n..n+R of q (HS each) and of scores exist; `offs[j]` is a
    /// readable K row for every j in `cols`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn score_rows<const R: usize, const F16: bool>(
        q: &[f32],
        scores: &mut [f32],
        n: usize,
        n_pos: usize,
        cols: Range<usize>,
        kp: *const f32,
        offs: &[usize],
        hs: usize,
        scale: f32,
    ) {
        let vscale = _mm_set1_ps(scale);
        // SAFETY: see the function's contract.
        unsafe {
            let qn = q.as_ptr().add(n * hs);
            let srow = scores.as_mut_ptr().add(n * n_pos);
            let mut j = cols.start;
            while j + 4 <= cols.end {
                let k = [offs[j], offs[j + 1], offs[j + 2], offs[j + 3]];
                let mut acc = [[_mm256_setzero_ps(); 4]; R];
                let mut i = 0;
                while i < hs {
                    let kv = [
                        ld::<F16>(kp, k[0] + i),
                        ld::<F16>(kp, k[1] + i),
                        ld::<F16>(kp, k[2] + i),
                        ld::<F16>(kp, k[3] + i),
                    ];
                    for (r, a) in acc.iter_mut().enumerate() {
                        let qv = _mm256_loadu_ps(qn.add(r * hs + i));
                        for (x, kk) in a.iter_mut().zip(&kv) {
                            *x = _mm256_fmadd_ps(qv, *kk, *x);
                        }
                    }
                    i += 8;
                }
                for (r, a) in acc.iter().enumerate() {
                    let s = _mm_mul_ps(hsum4(a[0], a[1], a[2], a[3]), vscale);
                    _mm_storeu_ps(srow.add(r * n_pos + j), s);
                }
                j += 4;
            }
            while j < cols.end {
                for r in 0..R {
                    *srow.add(r * n_pos + j) = dot::<F16>(qn.add(r * hs), kp, offs[j], hs) * scale;
                }
                j += 1;
            }
        }
    }

    /// Query rows from which the scores use the transposed query ([`score_t`]).
    pub(super) const MANY_ROWS: usize = 8;

    thread_local! {
        /// The transposed, scaled query of one [`partial`] call with many rows.
        static QT: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    }

    /// Arguments of one [`score_t`] call.
    struct ScoreT {
        /// Transposed scaled query, (HS, RP).
        qt: *const f32,
        rp: usize,
        /// First row vector of this call (8 rows; 16 for [`zmm::score_t`]).
        vb: usize,
        n_q: usize,
        scores: *mut f32,
        n_pos: usize,
        kp: *const f32,
        hs: usize,
    }

    /// Scores of row vectors vb..vb + V (8 query rows each) against positions `cols`:
    /// 8 rows in the lanes of one register, each K element broadcast once for all of
    /// them (no horizontal sums); four positions at a time, then a 8 x 4 transpose
    /// writes row-major scores. Each score sums its HS products in order.
    ///
    /// SAFETY: AVX2+FMA; `qt` holds HS * RP elements, RP >= 8 (vb + V); scores holds
    /// n_q * n_pos; `offs[j]` is a readable K row for every j in `cols`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn score_t<const V: usize>(a: &ScoreT, cols: Range<usize>, offs: &[usize]) {
        // SAFETY: see the function's contract.
        unsafe {
            let qt = a.qt.add(a.vb * 8);
            let store = |v: usize, lane_rows: [__m128; 8], j: usize| {
                for (l, x) in lane_rows.iter().enumerate() {
                    let r = (a.vb + v) * 8 + l;
                    if r < a.n_q {
                        _mm_storeu_ps(a.scores.add(r * a.n_pos + j), *x);
                    }
                }
            };
            let mut j = cols.start;
            while j + 4 <= cols.end {
                let k = [
                    a.kp.add(offs[j]),
                    a.kp.add(offs[j + 1]),
                    a.kp.add(offs[j + 2]),
                    a.kp.add(offs[j + 3]),
                ];
                let mut acc = [[_mm256_setzero_ps(); 4]; V];
                for i in 0..a.hs {
                    let mut qv = [_mm256_setzero_ps(); V];
                    for (v, x) in qv.iter_mut().enumerate() {
                        *x = _mm256_loadu_ps(qt.add(i * a.rp + 8 * v));
                    }
                    for (p, kk) in k.iter().enumerate() {
                        let b = _mm256_broadcast_ss(&*kk.add(i));
                        for (v, x) in qv.iter().enumerate() {
                            acc[v][p] = _mm256_fmadd_ps(*x, b, acc[v][p]);
                        }
                    }
                }
                for (v, a4) in acc.iter().enumerate() {
                    let t0 = _mm256_unpacklo_ps(a4[0], a4[1]);
                    let t1 = _mm256_unpackhi_ps(a4[0], a4[1]);
                    let t2 = _mm256_unpacklo_ps(a4[2], a4[3]);
                    let t3 = _mm256_unpackhi_ps(a4[2], a4[3]);
                    let r0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                    let r1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                    let r2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                    let r3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                    store(
                        v,
                        [
                            _mm256_castps256_ps128(r0),
                            _mm256_castps256_ps128(r1),
                            _mm256_castps256_ps128(r2),
                            _mm256_castps256_ps128(r3),
                            _mm256_extractf128_ps::<1>(r0),
                            _mm256_extractf128_ps::<1>(r1),
                            _mm256_extractf128_ps::<1>(r2),
                            _mm256_extractf128_ps::<1>(r3),
                        ],
                        j,
                    );
                }
                j += 4;
            }
            while j < cols.end {
                let kj = a.kp.add(offs[j]);
                let mut acc = [_mm256_setzero_ps(); V];
                for i in 0..a.hs {
                    let b = _mm256_broadcast_ss(&*kj.add(i));
                    for (v, x) in acc.iter_mut().enumerate() {
                        *x = _mm256_fmadd_ps(_mm256_loadu_ps(qt.add(i * a.rp + 8 * v)), b, *x);
                    }
                }
                for (v, x) in acc.iter().enumerate() {
                    let mut lanes = [0.0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), *x);
                    for (l, &val) in lanes.iter().enumerate() {
                        let r = (a.vb + v) * 8 + l;
                        if r < a.n_q {
                            *a.scores.add(r * a.n_pos + j) = val;
                        }
                    }
                }
                j += 1;
            }
        }
    }

    /// Pointers and strides of one [`pv_rows`] call.
    struct PvArgs {
        out: *mut f32,
        scores: *const f32,
        vp: *const f32,
        /// First query row.
        n: usize,
        n_pos: usize,
        /// First channel.
        ch: usize,
        hs: usize,
    }

    /// out[row][ch..ch + 8V] += sum over j in `cols` of p[row][j] * V[j][ch..ch + 8V], for
    /// rows n..n + R, the R x V accumulators held in registers across the positions. Each
    /// output lane adds the positions one by one in order (the reference order).
    ///
    /// SAFETY: AVX2+FMA; rows n..n+R of out (HS each) and scores exist; ch + 8V <= HS;
    /// `offs[j]` is a readable V row for every j in `cols`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pv_rows<const R: usize, const V: usize, const F16: bool>(
        a: &PvArgs,
        cols: Range<usize>,
        offs: &[usize],
    ) {
        // SAFETY: see the function's contract.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); V]; R];
            for (r, row) in acc.iter_mut().enumerate() {
                let o = a.out.add((a.n + r) * a.hs + a.ch);
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(o.add(8 * v));
                }
            }
            let s = a.scores.add(a.n * a.n_pos);
            for j in cols {
                let vj = offs[j] + a.ch;
                // R weights, then each V vector loaded once for the R rows (R x V
                // accumulators + R + 1 registers: 16 at 3 x 4).
                let mut w = [_mm256_setzero_ps(); R];
                for (r, x) in w.iter_mut().enumerate() {
                    *x = _mm256_set1_ps(*s.add(r * a.n_pos + j));
                }
                for v in 0..V {
                    let vx = ld::<F16>(a.vp, vj + 8 * v);
                    for (row, wr) in acc.iter_mut().zip(&w) {
                        row[v] = _mm256_fmadd_ps(*wr, vx, row[v]);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                let o = a.out.add((a.n + r) * a.hs + a.ch);
                for (v, x) in row.iter().enumerate() {
                    _mm256_storeu_ps(o.add(8 * v), *x);
                }
            }
        }
    }

    /// AVX-512 forms of [`score_t`] (16 query rows in the lanes of a register) and
    /// [`pv_rows`] (16 channels per register). Every lane does exactly what an AVX2 lane
    /// does, the same FMAs in the same order (a score sums its HS products in order, an
    /// output channel adds the positions in order, rows grouped alike), so the results
    /// are the AVX2 kernels' bits: the choice of path never changes an attention output.
    mod zmm {
        use std::arch::x86_64::*;
        use std::ops::Range;

        use super::{PvArgs, ScoreT};
        use crate::cpu::simd::avx512::exp;

        /// Sixteen cached values at element `idx` of an arena: f32, or f16 widened.
        ///
        /// SAFETY: AVX-512F; 16 readable elements at `idx`.
        #[inline]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn ld<const F16: bool>(base: *const f32, idx: usize) -> __m512 {
            // SAFETY: see the function's contract.
            unsafe {
                if F16 {
                    let p = (base as *const half::f16).add(idx);
                    _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
                } else {
                    _mm512_loadu_ps(base.add(idx))
                }
            }
        }

        /// [`super::softmax_row`] sixteen lanes at a time, the bits of the AVX2 one: the
        /// exps are the same per element, and each sixteen are added to the eight-lane sum
        /// as its two halves in order, as the AVX2 loop adds them.
        ///
        /// SAFETY: AVX-512F.
        #[inline]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        pub(super) unsafe fn softmax_row(row: &mut [f32]) -> f32 {
            let len = row.len();
            let (n16, n8) = (len / 16 * 16, len / 8 * 8);
            let p = row.as_mut_ptr();
            // SAFETY: every vector access lies below n8 <= len.
            unsafe {
                let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
                let mut j = 0;
                while j < n16 {
                    vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(p.add(j)));
                    j += 16;
                }
                let mut max = _mm512_reduce_max_ps(vmax);
                for &s in &row[n16..] {
                    max = max.max(s);
                }
                let vm = _mm512_set1_ps(max);
                let mut vsum = _mm256_setzero_ps();
                let mut j = 0;
                while j < n16 {
                    let e = exp(_mm512_sub_ps(_mm512_loadu_ps(p.add(j)), vm));
                    _mm512_storeu_ps(p.add(j), e);
                    vsum = _mm256_add_ps(vsum, _mm512_castps512_ps256(e));
                    vsum = _mm256_add_ps(
                        vsum,
                        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e))),
                    );
                    j += 16;
                }
                if n8 > n16 {
                    let e = super::exp(_mm256_sub_ps(
                        _mm256_loadu_ps(p.add(j)),
                        _mm256_set1_ps(max),
                    ));
                    _mm256_storeu_ps(p.add(j), e);
                    vsum = _mm256_add_ps(vsum, e);
                }
                let mut sum = super::hsum(vsum);
                for s in &mut row[n8..] {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                let mut j = 0;
                while j < n16 {
                    let x = _mm512_mul_ps(_mm512_loadu_ps(p.add(j)), _mm512_set1_ps(inv));
                    _mm512_storeu_ps(p.add(j), x);
                    j += 16;
                }
                if n8 > n16 {
                    let x = _mm256_mul_ps(_mm256_loadu_ps(p.add(j)), _mm256_set1_ps(inv));
                    _mm256_storeu_ps(p.add(j), x);
                }
                for s in &mut row[n8..] {
                    *s /= sum;
                }
                max + sum.ln()
            }
        }

        /// [`super::score_t`] over row vectors vb..vb + V of 16 rows (`a.vb` counts
        /// 16-row vectors, `a.rp` a multiple of 16).
        ///
        /// SAFETY: AVX-512F; `qt` holds HS * RP elements with RP >= 16 (vb + V); scores
        /// holds n_q * n_pos; `offs[j]` is a readable K row for every j in `cols`.
        #[inline]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        pub(super) unsafe fn score_t<const V: usize>(
            a: &ScoreT,
            cols: Range<usize>,
            offs: &[usize],
        ) {
            // SAFETY: see the function's contract.
            unsafe {
                let qt = a.qt.add(a.vb * 16);
                let mut j = cols.start;
                while j + 4 <= cols.end {
                    let k = [
                        a.kp.add(offs[j]),
                        a.kp.add(offs[j + 1]),
                        a.kp.add(offs[j + 2]),
                        a.kp.add(offs[j + 3]),
                    ];
                    let mut acc = [[_mm512_setzero_ps(); 4]; V];
                    for i in 0..a.hs {
                        let mut qv = [_mm512_setzero_ps(); V];
                        for (v, x) in qv.iter_mut().enumerate() {
                            *x = _mm512_loadu_ps(qt.add(i * a.rp + 16 * v));
                        }
                        for (p, kk) in k.iter().enumerate() {
                            let b = _mm512_set1_ps(*kk.add(i));
                            for (v, x) in qv.iter().enumerate() {
                                acc[v][p] = _mm512_fmadd_ps(*x, b, acc[v][p]);
                            }
                        }
                    }
                    for (v, a4) in acc.iter().enumerate() {
                        // Within each 128-bit lane L: r_m holds row 4L + m's four scores.
                        let t0 = _mm512_unpacklo_ps(a4[0], a4[1]);
                        let t1 = _mm512_unpackhi_ps(a4[0], a4[1]);
                        let t2 = _mm512_unpacklo_ps(a4[2], a4[3]);
                        let t3 = _mm512_unpackhi_ps(a4[2], a4[3]);
                        let r = [
                            _mm512_shuffle_ps::<0x44>(t0, t2),
                            _mm512_shuffle_ps::<0xEE>(t0, t2),
                            _mm512_shuffle_ps::<0x44>(t1, t3),
                            _mm512_shuffle_ps::<0xEE>(t1, t3),
                        ];
                        let row0 = (a.vb + v) * 16;
                        for (m, rm) in r.iter().enumerate() {
                            let lanes = [
                                _mm512_extractf32x4_ps::<0>(*rm),
                                _mm512_extractf32x4_ps::<1>(*rm),
                                _mm512_extractf32x4_ps::<2>(*rm),
                                _mm512_extractf32x4_ps::<3>(*rm),
                            ];
                            for (l, x) in lanes.iter().enumerate() {
                                let row = row0 + 4 * l + m;
                                if row < a.n_q {
                                    _mm_storeu_ps(a.scores.add(row * a.n_pos + j), *x);
                                }
                            }
                        }
                    }
                    j += 4;
                }
                while j < cols.end {
                    let kj = a.kp.add(offs[j]);
                    let mut acc = [_mm512_setzero_ps(); V];
                    for i in 0..a.hs {
                        let b = _mm512_set1_ps(*kj.add(i));
                        for (v, x) in acc.iter_mut().enumerate() {
                            let qv = _mm512_loadu_ps(qt.add(i * a.rp + 16 * v));
                            *x = _mm512_fmadd_ps(qv, b, *x);
                        }
                    }
                    for (v, x) in acc.iter().enumerate() {
                        let mut lanes = [0.0f32; 16];
                        _mm512_storeu_ps(lanes.as_mut_ptr(), *x);
                        for (l, &val) in lanes.iter().enumerate() {
                            let row = (a.vb + v) * 16 + l;
                            if row < a.n_q {
                                *a.scores.add(row * a.n_pos + j) = val;
                            }
                        }
                    }
                    j += 1;
                }
            }
        }

        /// [`super::pv_rows`] with 16 channels per register (ch + 16V <= HS), for an
        /// f32 or (`f16`) f16 arena.
        ///
        /// SAFETY: AVX-512F; as [`super::pv_rows`] with 16V channels.
        #[inline]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        pub(super) unsafe fn pv<const R: usize, const V: usize>(
            a: &PvArgs,
            cols: Range<usize>,
            offs: &[usize],
            f16: bool,
        ) {
            // SAFETY: forwarded.
            unsafe {
                if f16 {
                    pv_rows::<R, V, true>(a, cols, offs)
                } else {
                    pv_rows::<R, V, false>(a, cols, offs)
                }
            }
        }

        /// SAFETY: as [`pv`].
        #[inline]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn pv_rows<const R: usize, const V: usize, const F16: bool>(
            a: &PvArgs,
            cols: Range<usize>,
            offs: &[usize],
        ) {
            // SAFETY: see the function's contract.
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); V]; R];
                for (r, row) in acc.iter_mut().enumerate() {
                    let o = a.out.add((a.n + r) * a.hs + a.ch);
                    for (v, x) in row.iter_mut().enumerate() {
                        *x = _mm512_loadu_ps(o.add(16 * v));
                    }
                }
                let s = a.scores.add(a.n * a.n_pos);
                for j in cols {
                    let vj = offs[j] + a.ch;
                    let mut w = [_mm512_setzero_ps(); R];
                    for (r, x) in w.iter_mut().enumerate() {
                        *x = _mm512_set1_ps(*s.add(r * a.n_pos + j));
                    }
                    for v in 0..V {
                        let vx = ld::<F16>(a.vp, vj + 16 * v);
                        for (row, wr) in acc.iter_mut().zip(&w) {
                            row[v] = _mm512_fmadd_ps(*wr, vx, row[v]);
                        }
                    }
                }
                for (r, row) in acc.iter().enumerate() {
                    let o = a.out.add((a.n + r) * a.hs + a.ch);
                    for (v, x) in row.iter().enumerate() {
                        _mm512_storeu_ps(o.add(16 * v), *x);
                    }
                }
            }
        }
    }
}
