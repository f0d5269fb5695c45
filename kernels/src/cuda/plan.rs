//! Host-side work items for `attention_partial_bf16_hs*` + `attention_merge_states_bf16`
//! (kernels/cuda/attention.cu): shared-prefix (cascade) decode, split-K decode and causal
//! prefill all become a list of *parts* (a block table, a length, a contiguous range of
//! query sequences that attend it), cut into work items and merged per sequence by
//! log-sum-exp. Pure Rust, no CUDA: unit-tested on the CPU against the reference
//! (`reference::attention_paged`), whose `cascade_decode_attention` is the same math.
//!
//! One work item = `{ table_off, pos_start, pos_end, seq_start, seq_count, slot }`: the CTA
//! (one per item and KV head) attends positions `pos_start..pos_end` of the table at
//! `tables[table_off..]` for the G query heads of each sequence
//! `seq_start..seq_start + seq_count`, and member m writes attention state slot
//! `slot + m`. A part's members are cut into chunks of at most `max_rows / G` sequences
//! (the kernel holds at most 32 query rows per CTA) and, with `split`, its positions into
//! ranges of at most `split` positions (split-K: more CTAs for long ranges). Every item
//! gets fresh slots; sequence b's merge list (CSR `merge_offsets`, `merge_slots`) names
//! every slot written for b, in part order. An empty part emits nothing (its state would
//! be the merge identity), so a sequence with no positions at all merges to a zero row,
//! as in the reference. Cost: O(items + blocks referenced) time and memory.

use std::ops::Range;

use crate::reference::attention_paged::{Level, PagedShape};

use super::error::CudaError;

/// Most query rows one `attention_partial` CTA holds (`MAX_ROWS` in attention.cu).
pub const MAX_ITEM_ROWS: usize = 32;
/// Query rows per warp in `attention_partial` (`RPW` in attention.cu).
pub const ROWS_PER_WARP: usize = 4;
/// Positions per shared-memory tile (`TILE` in attention.cu).
pub const TILE: usize = 32;

/// A range of positions `0..len` of one block table, attended by the query heads of the
/// contiguous sequences `members` (a cascade level, a sequence's own suffix, or one causal
/// prefill row).
#[derive(Debug, Clone)]
pub struct PlanPart<'a> {
    /// Block ids; at least ceil(len / BS).
    pub table: &'a [u32],
    /// Positions attended.
    pub len: usize,
    /// The query sequences (rows of q, each NH heads) that attend this part.
    pub members: Range<usize>,
    /// Causal prefill: member i (the i-th of `members`) attends only positions below
    /// `causal + i` (rows at consecutive positions; `len` is the last member's limit).
    /// `None`: every member attends all `len` positions.
    pub causal: Option<usize>,
}

/// How parts are cut into items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// Most query rows (sequences * G) per item: at most [`MAX_ITEM_ROWS`].
    pub max_rows: usize,
    /// Split ranges longer than this many positions across items (split-K); `None` keeps
    /// each part's positions in one item. Multiples of [`TILE`] waste no tile work.
    pub split: Option<usize>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            max_rows: MAX_ITEM_ROWS,
            split: None,
        }
    }
}

/// u32 words per row of the `items` argument.
pub const ITEM_WORDS: usize = 7;

/// One `attention_partial` work item (a row of the `items` argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkItem {
    pub table_off: u32,
    pub pos_start: u32,
    pub pos_end: u32,
    pub seq_start: u32,
    pub seq_count: u32,
    pub slot: u32,
    /// 0: no mask; else member m attends only positions below `causal + m`.
    pub causal: u32,
}

impl WorkItem {
    /// The kernel's row layout.
    pub fn to_row(self) -> [u32; ITEM_WORDS] {
        [
            self.table_off,
            self.pos_start,
            self.pos_end,
            self.seq_start,
            self.seq_count,
            self.slot,
            self.causal,
        ]
    }

    /// The positions member `m` attends: pos_start..pos_end, cut at its causal limit
    /// (possibly empty).
    pub fn member_range(&self, m: u32) -> Range<usize> {
        let end = if self.causal == 0 {
            self.pos_end
        } else {
            self.pos_end.min(self.causal + m)
        };
        self.pos_start as usize..(end.max(self.pos_start)) as usize
    }
}

/// The arguments of one cascade / split-K / prefill attention step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkPlan {
    /// Every part's block ids (its first ceil(len / BS)), concatenated.
    pub tables: Vec<u32>,
    pub items: Vec<WorkItem>,
    /// Attention states written: `states_o` (n_slots, NH, HS), `states_lse` (n_slots, NH).
    pub n_slots: usize,
    /// (n_seqs + 1) CSR offsets into `merge_slots`.
    pub merge_offsets: Vec<u32>,
    /// The slots of each sequence, in part order.
    pub merge_slots: Vec<u32>,
    /// B: query sequences.
    pub n_seqs: usize,
    /// G = NH / NKV.
    pub group: usize,
    /// BS the tables were checked against.
    pub block_size: usize,
    /// The largest seq_count * G over all items (0 without items).
    pub max_item_rows: usize,
}

fn to_u32(op: &'static str, arg: &'static str, v: usize) -> Result<u32, CudaError> {
    u32::try_from(v).map_err(|_| CudaError::bad(op, arg, format!("{v} does not fit in u32")))
}

impl WorkPlan {
    /// Cuts `parts` into work items for B = `n_seqs` query sequences, G query heads per KV
    /// head, cache blocks of `block_size` positions in an arena of `n_blocks` blocks.
    /// Checks every table (covers its length, ids inside the arena) and member range.
    pub fn build(
        parts: &[PlanPart<'_>],
        n_seqs: usize,
        group: usize,
        block_size: usize,
        n_blocks: usize,
        opts: PlanOptions,
    ) -> Result<WorkPlan, CudaError> {
        const OP: &str = "WorkPlan::build";
        if group == 0 || block_size == 0 {
            return Err(CudaError::bad(
                OP,
                "shape",
                format!("G={group} and BS={block_size} must be positive"),
            ));
        }
        if opts.max_rows == 0 || opts.max_rows > MAX_ITEM_ROWS || group > opts.max_rows {
            return Err(CudaError::bad(
                OP,
                "max_rows",
                format!(
                    "{} must be in 1..={MAX_ITEM_ROWS} and hold one sequence's G={group} query heads",
                    opts.max_rows
                ),
            ));
        }
        if opts.split == Some(0) {
            return Err(CudaError::bad(OP, "split", "must be positive"));
        }
        let chunk = opts.max_rows / group;
        let mut tables = Vec::new();
        let mut items = Vec::new();
        let mut per_seq: Vec<Vec<u32>> = vec![Vec::new(); n_seqs];
        let mut n_slots = 0usize;
        let mut max_item_rows = 0usize;
        for (i, part) in parts.iter().enumerate() {
            let m = &part.members;
            if m.start > m.end || m.end > n_seqs {
                return Err(CudaError::bad(
                    OP,
                    "parts",
                    format!(
                        "part {i}: members {}..{} is not a range within the {n_seqs} sequences",
                        m.start, m.end
                    ),
                ));
            }
            let needed = part.len.div_ceil(block_size);
            if part.table.len() < needed {
                return Err(CudaError::bad(
                    OP,
                    "parts",
                    format!(
                        "part {i}: {} positions need {needed} block ids, the table has {}",
                        part.len,
                        part.table.len()
                    ),
                ));
            }
            if let Some((j, &id)) = part.table[..needed]
                .iter()
                .enumerate()
                .find(|&(_, &id)| id as usize >= n_blocks)
            {
                return Err(CudaError::bad(
                    OP,
                    "parts",
                    format!(
                        "part {i}: block id {id} at table index {j} is outside the arena of {n_blocks} blocks"
                    ),
                ));
            }
            if part.causal == Some(0) {
                return Err(CudaError::bad(
                    OP,
                    "parts",
                    format!("part {i}: a causal limit must be positive"),
                ));
            }
            if part.len == 0 || m.is_empty() {
                continue;
            }
            let table_off = to_u32(OP, "tables", tables.len())?;
            tables.extend_from_slice(&part.table[..needed]);
            let split = opts.split.unwrap_or(part.len);
            let mut pos = 0;
            while pos < part.len {
                let end = (pos + split).min(part.len);
                let mut s = m.start;
                while s < m.end {
                    let count = chunk.min(m.end - s);
                    let slot = to_u32(OP, "slots", n_slots)?;
                    // This chunk's first member is member s - m.start of the part.
                    let causal = match part.causal {
                        Some(c) => {
                            // The last member's limit must fit too.
                            to_u32(OP, "causal", c + (s - m.start) + count)?;
                            (c + (s - m.start)) as u32
                        }
                        None => 0,
                    };
                    items.push(WorkItem {
                        table_off,
                        pos_start: to_u32(OP, "positions", pos)?,
                        pos_end: to_u32(OP, "positions", end)?,
                        seq_start: to_u32(OP, "members", s)?,
                        seq_count: to_u32(OP, "members", count)?,
                        slot,
                        causal,
                    });
                    for k in 0..count {
                        per_seq[s + k].push(slot + k as u32);
                    }
                    n_slots += count;
                    max_item_rows = max_item_rows.max(count * group);
                    s += count;
                }
                pos = end;
            }
        }
        to_u32(OP, "tables", tables.len())?;
        to_u32(OP, "slots", n_slots)?;
        let mut merge_offsets = Vec::with_capacity(n_seqs + 1);
        let mut merge_slots = Vec::with_capacity(n_slots);
        merge_offsets.push(0);
        for list in per_seq {
            merge_slots.extend_from_slice(&list);
            merge_offsets.push(merge_slots.len() as u32);
        }
        Ok(WorkPlan {
            tables,
            items,
            n_slots,
            merge_offsets,
            merge_slots,
            n_seqs,
            group,
            block_size,
            max_item_rows,
        })
    }

    /// Cascade decode (the plan of `reference::attention_paged::cascade_decode_attention`):
    /// every level, then each sequence's own suffix, one query per sequence.
    pub fn cascade(
        levels: &[Level<'_>],
        suffix_tables: &[&[u32]],
        suffix_lens: &[usize],
        shape: &PagedShape,
        n_blocks: usize,
        opts: PlanOptions,
    ) -> Result<WorkPlan, CudaError> {
        const OP: &str = "WorkPlan::cascade";
        check_shape(OP, shape)?;
        let n_seqs = suffix_lens.len();
        if suffix_tables.len() != n_seqs {
            return Err(CudaError::Length {
                op: OP,
                arg: "suffix_tables",
                expected: n_seqs,
                actual: suffix_tables.len(),
            });
        }
        let mut parts: Vec<PlanPart<'_>> = levels
            .iter()
            .map(|l| PlanPart {
                table: l.block_table,
                len: l.len,
                members: l.members.clone(),
                causal: None,
            })
            .collect();
        parts.extend(
            suffix_tables
                .iter()
                .zip(suffix_lens)
                .enumerate()
                .map(|(b, (t, &len))| PlanPart {
                    table: t,
                    len,
                    members: b..b + 1,
                    causal: None,
                }),
        );
        Self::build(
            &parts,
            n_seqs,
            shape.group(),
            shape.block_size,
            n_blocks,
            opts,
        )
    }

    /// Causal prefill (the plan of `reference::attention_paged::paged_prefill_attention`):
    /// `n_rows` new rows at positions `pos0..pos0 + n_rows` of one table (their K/V already
    /// in the cache); row r is query "sequence" r and attends positions 0..=pos0 + r.
    /// Consecutive rows are grouped as many as one item holds (`max_rows / G`), with a
    /// causal mask per row, so each K/V tile is read once for the whole group (as a
    /// flash-attention query tile) instead of once per row.
    pub fn causal_prefill(
        table: &[u32],
        pos0: usize,
        n_rows: usize,
        shape: &PagedShape,
        n_blocks: usize,
        opts: PlanOptions,
    ) -> Result<WorkPlan, CudaError> {
        check_shape("WorkPlan::causal_prefill", shape)?;
        let per = (opts.max_rows / shape.group()).max(1);
        let parts: Vec<PlanPart<'_>> = (0..n_rows)
            .step_by(per)
            .map(|r| {
                let n = per.min(n_rows - r);
                PlanPart {
                    table,
                    len: pos0 + r + n,
                    members: r..r + n,
                    causal: Some(pos0 + r + 1),
                }
            })
            .collect();
        Self::build(
            &parts,
            n_rows,
            shape.group(),
            shape.block_size,
            n_blocks,
            opts,
        )
    }

    /// The `items` argument: (n_items, ITEM_WORDS) u32, row-major.
    pub fn item_rows(&self) -> Vec<u32> {
        self.items.iter().flat_map(|it| it.to_row()).collect()
    }

    /// Warps per CTA: one per row up to 8, then up to RPW rows per warp (1..=8). Small
    /// items (a single decode row group of G rows) get G warps rather than one, so the
    /// tile loads and the rows' scores run in parallel.
    pub fn warps(&self) -> u32 {
        let most = MAX_ITEM_ROWS / ROWS_PER_WARP;
        self.max_item_rows.clamp(1, most) as u32
    }
}

fn check_shape(op: &'static str, shape: &PagedShape) -> Result<(), CudaError> {
    shape
        .validate(op)
        .map_err(|e| CudaError::bad(op, "shape", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::attention_paged::{
        attention_partial, cascade_decode_attention, cascade_scratch_len, merge_attention_states,
        paged_prefill_attention, prefill_scratch_len,
    };
    use std::collections::HashMap;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn f32(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    fn shape(nh: usize, nkv: usize, hs: usize, bs: usize) -> PagedShape {
        PagedShape {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hs,
            block_size: bs,
        }
    }

    /// For every sequence, the (table_off, position) pairs its items cover.
    fn coverage(plan: &WorkPlan) -> Vec<HashMap<(u32, u32), usize>> {
        let mut cov = vec![HashMap::new(); plan.n_seqs];
        for it in &plan.items {
            for b in it.seq_start..it.seq_start + it.seq_count {
                for p in it.pos_start..it.pos_end {
                    *cov[b as usize].entry((it.table_off, p)).or_insert(0) += 1;
                }
            }
        }
        cov
    }

    fn check_invariants(plan: &WorkPlan, opts: PlanOptions) {
        let mut seen = vec![0usize; plan.n_slots];
        for it in &plan.items {
            let rows = it.seq_count as usize * plan.group;
            assert!(rows >= 1 && rows <= opts.max_rows, "{it:?}");
            assert!(rows <= ROWS_PER_WARP * plan.warps() as usize, "{it:?}");
            assert!(it.pos_start < it.pos_end, "{it:?}");
            if let Some(s) = opts.split {
                assert!((it.pos_end - it.pos_start) as usize <= s);
            }
            let needed = (it.pos_end as usize).div_ceil(plan.block_size);
            assert!(it.table_off as usize + needed <= plan.tables.len());
            for m in 0..it.seq_count {
                seen[(it.slot + m) as usize] += 1;
                let b = (it.seq_start + m) as usize;
                let list = &plan.merge_slots
                    [plan.merge_offsets[b] as usize..plan.merge_offsets[b + 1] as usize];
                assert!(list.contains(&(it.slot + m)), "seq {b} misses slot");
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "each slot written once");
        assert_eq!(plan.merge_offsets.len(), plan.n_seqs + 1);
        assert_eq!(
            *plan.merge_offsets.last().unwrap() as usize,
            plan.merge_slots.len()
        );
        assert_eq!(plan.merge_slots.len(), plan.n_slots);
    }

    /// A CLoud-like cascade: prompt for all B, two responses for halves, suffixes of
    /// assorted lengths (0 included), tables of distinct scattered blocks.
    /// (tables, levels as (len, members), suffix lengths)
    type Case = (Vec<Vec<u32>>, Vec<(usize, Range<usize>)>, Vec<usize>);

    fn cloud_case(b: usize, bs: usize) -> Case {
        let prompt = 3 * bs + 5;
        let half = b / 2;
        let levels = vec![(prompt, 0..b), (bs - 1, 0..half), (bs + 1, half..b)];
        let suffix: Vec<usize> = (0..b).map(|i| [0, 1, bs, 2 * bs + 3][i % 4]).collect();
        let mut next = 0u32;
        let mut tables = Vec::new();
        for len in levels.iter().map(|l| l.0).chain(suffix.iter().copied()) {
            let n = len.div_ceil(bs);
            // Scatter ids: reverse order within each table.
            let t: Vec<u32> = (0..n as u32).rev().map(|k| next + k).collect();
            next += n as u32;
            tables.push(t);
        }
        (tables, levels, suffix)
    }

    #[test]
    fn items_tile_each_sequence_exactly_once() {
        let bs = 16;
        for (b, nh, nkv, split, max_rows) in [
            (7, 9, 3, None, 32),
            (7, 9, 3, Some(32), 32),
            (33, 8, 1, Some(16), 32),
            (5, 4, 4, Some(1), 8),
            (1, 32, 1, None, 32),
        ] {
            let sh = shape(nh, nkv, 64, bs);
            let (tables, levels, suffix) = cloud_case(b, bs);
            let n_blocks = tables.iter().map(|t| t.len()).sum::<usize>();
            let lv: Vec<Level<'_>> = levels
                .iter()
                .zip(&tables)
                .map(|((len, m), t)| Level {
                    block_table: t,
                    len: *len,
                    members: m.clone(),
                })
                .collect();
            let st: Vec<&[u32]> = tables[levels.len()..].iter().map(|t| &t[..]).collect();
            let opts = PlanOptions { max_rows, split };
            let plan = WorkPlan::cascade(&lv, &st, &suffix, &sh, n_blocks, opts).unwrap();
            check_invariants(&plan, opts);
            let cov = coverage(&plan);
            // Expected: each level containing b and b's own suffix, every position once.
            // table_off identifies the part: find it from the first item of each part.
            for (seq, c) in cov.iter().enumerate() {
                let mut expected = 0;
                for (len, m) in levels.iter() {
                    if m.contains(&seq) {
                        expected += len;
                    }
                }
                expected += suffix[seq];
                assert_eq!(c.values().sum::<usize>(), expected, "seq {seq}");
                assert!(c.values().all(|&n| n == 1), "seq {seq}: a position twice");
            }
        }
    }

    /// Runs a plan the way the kernels do, with the reference ops: each item, KV head and
    /// member is one `attention_partial` over the member's query heads and its range of
    /// the item's positions (the causal cut), then each sequence merges its slots.
    fn simulate(plan: &WorkPlan, q: &[f32], k: &[f32], v: &[f32], sh: &PagedShape) -> Vec<f32> {
        let (nh, hs, g) = (sh.n_heads, sh.head_dim, sh.group());
        let mut so = vec![f32::NAN; plan.n_slots * nh * hs];
        let mut sl = vec![f32::NAN; plan.n_slots * nh];
        let scale = 1.0 / (hs as f32).sqrt();
        for it in &plan.items {
            let table = &plan.tables[it.table_off as usize..];
            for kvh in 0..sh.n_kv_heads {
                // One reference call per member: its G query heads over its own range
                // (the item's positions cut at the member's causal limit).
                for m in 0..it.seq_count as usize {
                    let range = it.member_range(m as u32);
                    let mut qg = vec![0.0; g * hs];
                    for j in 0..g {
                        let src = ((it.seq_start as usize + m) * nh + kvh * g + j) * hs;
                        qg[j * hs..][..hs].copy_from_slice(&q[src..src + hs]);
                    }
                    let mut o = vec![0.0; g * hs];
                    let mut lse = vec![0.0; g];
                    let mut scores = vec![0.0; g * range.len()];
                    attention_partial(
                        &mut o,
                        &mut lse,
                        &qg,
                        k,
                        v,
                        table,
                        range,
                        kvh,
                        scale,
                        &mut scores,
                        *sh,
                    )
                    .unwrap();
                    for j in 0..g {
                        let state = (it.slot as usize + m) * nh + kvh * g + j;
                        so[state * hs..][..hs].copy_from_slice(&o[j * hs..][..hs]);
                        sl[state] = lse[j];
                    }
                }
            }
        }
        let mut out = vec![0.0; plan.n_seqs * nh * hs];
        for b in 0..plan.n_seqs {
            for h in 0..nh {
                let mut acc = vec![0.0; hs];
                let mut acc_lse = [f32::NEG_INFINITY];
                for &s in &plan.merge_slots
                    [plan.merge_offsets[b] as usize..plan.merge_offsets[b + 1] as usize]
                {
                    let st = s as usize * nh + h;
                    merge_attention_states(
                        &mut acc,
                        &mut acc_lse,
                        &so[st * hs..][..hs],
                        &sl[st..st + 1],
                        hs,
                    )
                    .unwrap();
                }
                out[(b * nh + h) * hs..][..hs].copy_from_slice(&acc);
            }
        }
        out
    }

    fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f32 = b.iter().map(|y| y * y).sum();
        (num / den.max(1e-30)).sqrt()
    }

    #[test]
    fn simulated_cascade_matches_reference() {
        let mut rng = Rng(0x9e3779b97f4a7c15);
        for (b, nh, nkv, split) in [(6, 9, 3, None), (6, 9, 3, Some(32)), (9, 8, 2, Some(7))] {
            let bs = 16;
            let sh = shape(nh, nkv, 8, bs);
            let (tables, levels, suffix) = cloud_case(b, bs);
            let n_blocks = tables.iter().map(|t| t.len()).sum::<usize>();
            let arena = n_blocks * sh.block_elems();
            let k: Vec<f32> = (0..arena).map(|_| rng.f32()).collect();
            let v: Vec<f32> = (0..arena).map(|_| rng.f32()).collect();
            let q: Vec<f32> = (0..b * nh * 8).map(|_| rng.f32() * 2.0).collect();
            let lv: Vec<Level<'_>> = levels
                .iter()
                .zip(&tables)
                .map(|((len, m), t)| Level {
                    block_table: t,
                    len: *len,
                    members: m.clone(),
                })
                .collect();
            let st: Vec<&[u32]> = tables[levels.len()..].iter().map(|t| &t[..]).collect();
            let opts = PlanOptions {
                max_rows: 32,
                split,
            };
            let plan = WorkPlan::cascade(&lv, &st, &suffix, &sh, n_blocks, opts).unwrap();
            let got = simulate(&plan, &q, &k, &v, &sh);
            let max_len = levels
                .iter()
                .map(|l| l.0)
                .chain(suffix.iter().copied())
                .max()
                .unwrap();
            let mut want = vec![0.0; got.len()];
            let mut scratch = vec![0.0; cascade_scratch_len(&sh, b, max_len)];
            cascade_decode_attention(&mut want, &q, &k, &v, &lv, &st, &suffix, sh, &mut scratch)
                .unwrap();
            let e = rel_l2(&got, &want);
            assert!(e < 1e-5, "rel err {e}");
        }
    }

    #[test]
    fn simulated_prefill_matches_reference() {
        let mut rng = Rng(42);
        // (NH, NKV, pos0, rows, max_rows, split): grouped rows with split pieces that lie
        // wholly past the early rows' limits, one row per item, G = 1, a row count that
        // is not a multiple of the group, no split.
        for (nh, nkv, pos0, rows, max_rows, split) in [
            (9usize, 3usize, 19usize, 17usize, 32usize, Some(16usize)),
            (9, 3, 0, 17, 3, Some(16)),
            (4, 4, 5, 40, 32, Some(7)),
            (8, 2, 0, 33, 32, None),
            (8, 2, 31, 1, 32, Some(32)),
        ] {
            let sh = shape(nh, nkv, 8, 16);
            let nb = (pos0 + rows).div_ceil(16);
            let table: Vec<u32> = (0..nb as u32).rev().collect();
            let arena = nb * sh.block_elems();
            let k: Vec<f32> = (0..arena).map(|_| rng.f32()).collect();
            let v: Vec<f32> = (0..arena).map(|_| rng.f32()).collect();
            let q: Vec<f32> = (0..rows * nh * 8).map(|_| rng.f32()).collect();
            let opts = PlanOptions { max_rows, split };
            let plan = WorkPlan::causal_prefill(&table, pos0, rows, &sh, nb, opts).unwrap();
            check_invariants(&plan, opts);
            // Rows are grouped: as many items as groups x pieces, not rows x pieces.
            let per = max_rows / sh.group();
            let groups = rows.div_ceil(per);
            let pieces = |len: usize| split.map_or(1, |s| len.div_ceil(s));
            let expected: usize = (0..groups)
                .map(|gi| pieces(pos0 + (gi * per + per).min(rows)))
                .sum();
            assert_eq!(plan.items.len(), expected, "{nh} {nkv} {pos0} {rows}");
            let got = simulate(&plan, &q, &k, &v, &sh);
            let mut want = vec![0.0; got.len()];
            let mut scratch = vec![0.0; prefill_scratch_len(&sh, pos0, rows)];
            paged_prefill_attention(&mut want, &q, &k, &v, &table, pos0, sh, &mut scratch).unwrap();
            let e = rel_l2(&got, &want);
            assert!(e < 1e-5, "{nh} {nkv} {pos0} {rows}: rel err {e}");
        }
    }

    #[test]
    fn a_causal_limit_cuts_each_members_range() {
        let it = WorkItem {
            table_off: 0,
            pos_start: 16,
            pos_end: 32,
            seq_start: 4,
            seq_count: 3,
            slot: 0,
            causal: 15,
        };
        assert_eq!(it.member_range(0), 16..16); // limit 15: nothing in 16..32
        assert_eq!(it.member_range(2), 16..17);
        let open = WorkItem { causal: 0, ..it };
        assert_eq!(open.member_range(2), 16..32);
        let sh = shape(4, 2, 8, 16);
        let part = PlanPart {
            table: &[0, 1],
            len: 20,
            members: 0..2,
            causal: Some(0),
        };
        assert!(WorkPlan::build(&[part], 2, sh.group(), 16, 2, PlanOptions::default()).is_err());
    }

    #[test]
    fn empty_parts_emit_nothing_and_all_empty_merges_to_nothing() {
        let sh = shape(4, 2, 8, 16);
        let t: &[u32] = &[];
        let plan =
            WorkPlan::cascade(&[], &[t, t], &[0, 0], &sh, 4, PlanOptions::default()).unwrap();
        assert!(plan.items.is_empty());
        assert_eq!(plan.n_slots, 0);
        assert_eq!(plan.merge_offsets, vec![0, 0, 0]);
        assert_eq!(plan.warps(), 1);
    }

    #[test]
    fn warps_are_one_per_row_up_to_eight() {
        // G = 4: one sequence's decode item has 4 rows (4 warps); 8 sequences sharing a
        // prefix make 32-row items (8 warps of 4 rows).
        let sh = shape(8, 2, 8, 16);
        let own: &[u32] = &[0, 1];
        let plan = WorkPlan::cascade(&[], &[own], &[20], &sh, 4, PlanOptions::default()).unwrap();
        assert_eq!(plan.max_item_rows, 4);
        assert_eq!(plan.warps(), 4);
        let prefix: &[u32] = &[2, 3];
        let level = Level {
            block_table: prefix,
            len: 32,
            members: 0..8,
        };
        let tails: Vec<&[u32]> = vec![own; 8];
        let plan =
            WorkPlan::cascade(&[level], &tails, &[1; 8], &sh, 4, PlanOptions::default()).unwrap();
        assert_eq!(plan.max_item_rows, 32);
        assert_eq!(plan.warps(), 8);
    }

    #[test]
    fn bad_parts_are_typed_errors() {
        let sh = shape(4, 2, 8, 16);
        let t: &[u32] = &[0, 1];
        let opts = PlanOptions::default();
        // Table too short for 33 positions at BS=16.
        assert!(matches!(
            WorkPlan::cascade(&[], &[t], &[33], &sh, 4, opts),
            Err(CudaError::BadArgument { arg: "parts", .. })
        ));
        // Block id outside the arena.
        assert!(matches!(
            WorkPlan::cascade(&[], &[t], &[17], &sh, 1, opts),
            Err(CudaError::BadArgument { arg: "parts", .. })
        ));
        // Members beyond B.
        let lv = [Level {
            block_table: t,
            len: 3,
            members: 0..3,
        }];
        assert!(matches!(
            WorkPlan::cascade(&lv, &[t], &[1], &sh, 4, opts),
            Err(CudaError::BadArgument { arg: "parts", .. })
        ));
        // G larger than the rows an item holds.
        let big = shape(64, 1, 8, 16);
        assert!(matches!(
            WorkPlan::cascade(&[], &[t], &[1], &big, 4, opts),
            Err(CudaError::BadArgument {
                arg: "max_rows",
                ..
            })
        ));
        assert!(matches!(
            WorkPlan::cascade(
                &[],
                &[t],
                &[1],
                &sh,
                4,
                PlanOptions {
                    split: Some(0),
                    ..opts
                }
            ),
            Err(CudaError::BadArgument { arg: "split", .. })
        ));
        // Mismatched suffix lists.
        assert!(matches!(
            WorkPlan::cascade(&[], &[t], &[1, 2], &sh, 4, opts),
            Err(CudaError::Length { .. })
        ));
    }
}
