//! Launch specifications: for each kernel entry point, a pure function from buffer
//! addresses and lengths, host index data and shapes to the launch (kernel, grid, block,
//! argument list), or a typed error. Every length, stride, alignment and index the kernel
//! touches is checked here, with the same rules as the CPU reference in `reference/`, and
//! the launch configuration is the one documented at the top of the kernel's `.cu` file.
//! No CUDA is needed, so all of it is unit-tested on the CPU; [`super::ops`] only turns
//! cudarc buffers into [`Buf`]s and launches the spec.

use std::collections::HashSet;

use super::device::{Arg, Kernel};
use super::error::{CudaError, check_len};
use super::plan::{MAX_ITEM_ROWS, ROWS_PER_WARP, WorkPlan};
use crate::reference::attention_paged::PagedShape;

/// Largest grid.x (2^31 - 1) and grid.y / grid.z (65535).
const GRID_X_MAX: usize = (1 << 31) - 1;
const GRID_YZ_MAX: usize = 65535;

/// A device buffer as the checks see it: its address and its length in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub len: usize,
}

/// An index buffer: the host copy it was uploaded from and its device address (0 when
/// empty).
#[derive(Debug, Clone, Copy)]
pub struct Idx<'a> {
    pub host: &'a [u32],
    pub addr: u64,
}

impl Idx<'_> {
    fn len(&self) -> usize {
        self.host.len()
    }
}

/// The device addresses of an uploaded [`WorkPlan`]'s index buffers.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanAddrs {
    pub tables: u64,
    pub items: u64,
    pub merge_offsets: u64,
    pub merge_slots: u64,
}

/// A checked launch: grid, block (x only; no dynamic shared memory) and arguments.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub kernel: Kernel,
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub(crate) args: Vec<Arg>,
}

/// `None`: the call has no work (zero rows) and launches nothing.
pub type Spec = Result<Option<LaunchSpec>, CudaError>;

fn spec(kernel: Kernel, grid: (u32, u32, u32), block: u32, args: Vec<Arg>) -> Spec {
    Ok(Some(LaunchSpec {
        kernel,
        grid,
        block,
        args,
    }))
}

fn u32_of(op: &'static str, arg: &'static str, v: usize) -> Result<u32, CudaError> {
    u32::try_from(v).map_err(|_| CudaError::bad(op, arg, format!("{v} does not fit in u32")))
}

fn grid_x(op: &'static str, n: usize) -> Result<u32, CudaError> {
    if n > GRID_X_MAX {
        return Err(CudaError::bad(
            op,
            "(grid)",
            format!("{n} blocks exceed grid.x"),
        ));
    }
    Ok(n as u32)
}

fn grid_yz(op: &'static str, arg: &'static str, n: usize) -> Result<u32, CudaError> {
    if n > GRID_YZ_MAX {
        return Err(CudaError::bad(
            op,
            arg,
            format!("{n} exceeds the grid.y limit of {GRID_YZ_MAX}"),
        ));
    }
    Ok(n as u32)
}

fn aligned(op: &'static str, arg: &'static str, addr: u64, bytes: u64) -> Result<(), CudaError> {
    if !addr.is_multiple_of(bytes) {
        return Err(CudaError::bad(
            op,
            arg,
            format!("device address {addr:#x} is not {bytes}-byte aligned"),
        ));
    }
    Ok(())
}

/// Rows of `width` elements at stride `ld`: the elements a buffer must hold.
fn strided_len(rows: usize, ld: usize, width: usize) -> usize {
    if rows == 0 {
        0
    } else {
        (rows - 1) * ld + width
    }
}

fn at_least(
    op: &'static str,
    arg: &'static str,
    actual: usize,
    needed: usize,
) -> Result<(), CudaError> {
    if actual < needed {
        return Err(CudaError::bad(
            op,
            arg,
            format!("{actual} elements, at least {needed} needed"),
        ));
    }
    Ok(())
}

fn check_shape(op: &'static str, shape: &PagedShape) -> Result<(), CudaError> {
    shape
        .validate(op)
        .map_err(|e| CudaError::bad(op, "shape", e.to_string()))
}

/// Arena checks (K and V the same positive whole number of blocks of BS*NKV*HS, shape
/// fields that fit the kernels' u32 arguments); returns NB.
fn check_arena(op: &'static str, shape: &PagedShape, k: Buf, v: Buf) -> Result<usize, CudaError> {
    check_shape(op, shape)?;
    for v in [
        shape.n_heads,
        shape.n_kv_heads,
        shape.head_dim,
        shape.block_size,
    ] {
        u32_of(op, "shape", v)?;
    }
    let block = shape.block_elems();
    if k.len == 0 || !k.len.is_multiple_of(block) {
        return Err(CudaError::bad(
            op,
            "k_arena",
            format!(
                "{} elements is not a positive whole number of blocks of BS*NKV*HS = {block}",
                k.len
            ),
        ));
    }
    check_len(op, "v_arena", v.len, k.len)?;
    Ok(k.len / block)
}

/// The table row covers positions 0..len with ids inside the arena.
fn check_table_row(
    op: &'static str,
    arg: &'static str,
    row: &[u32],
    len: usize,
    block_size: usize,
    n_blocks: usize,
) -> Result<(), CudaError> {
    let needed = len.div_ceil(block_size);
    if row.len() < needed {
        return Err(CudaError::bad(
            op,
            arg,
            format!(
                "{len} positions need {needed} block ids, the row has {}",
                row.len()
            ),
        ));
    }
    if let Some((i, &id)) = row[..needed]
        .iter()
        .enumerate()
        .find(|&(_, &id)| id as usize >= n_blocks)
    {
        return Err(CudaError::bad(
            op,
            arg,
            format!("block id {id} at index {i} is outside the arena of {n_blocks} blocks"),
        ));
    }
    Ok(())
}

fn attention_kernel(
    op: &'static str,
    head_dim: usize,
    hs64: Kernel,
    hs128: Kernel,
) -> Result<Kernel, CudaError> {
    match head_dim {
        64 => Ok(hs64),
        128 => Ok(hs128),
        _ => Err(CudaError::bad(
            op,
            "shape",
            format!("HS={head_dim}: the attention kernels exist for HS 64 and 128"),
        )),
    }
}

/// Checks of the embedding kernel; returns V.
pub fn check_embedding(
    op: &'static str,
    out: Buf,
    table: Buf,
    n_ids: usize,
    channels: usize,
) -> Result<usize, CudaError> {
    if channels == 0 || table.len == 0 || !table.len.is_multiple_of(channels) {
        return Err(CudaError::bad(
            op,
            "table",
            format!(
                "{} elements is not a positive multiple of C={channels}",
                table.len
            ),
        ));
    }
    check_len(op, "out", out.len, n_ids * channels)?;
    u32_of(op, "channels", channels)?;
    let vocab = table.len / channels;
    u32_of(op, "table", vocab)?;
    grid_x(op, n_ids)?;
    if channels.is_multiple_of(8) {
        // The vector path: 16-byte loads of table rows, 16-byte stores of out rows.
        aligned(op, "table", table.addr, 16)?;
        aligned(op, "out", out.addr, 16)?;
    }
    Ok(vocab)
}

/// `embedding_bf16`. With `check_ids` every id is checked against V on the host (as
/// `reference::embedding::embedding_forward` does); without it, a bad id is the
/// kernel's business (zero row, flagged in `error`, an address or 0).
pub fn embedding(
    out: Buf,
    table: Buf,
    ids: Idx<'_>,
    channels: usize,
    check_ids: bool,
    error: u64,
) -> Spec {
    const OP: &str = "embedding";
    let vocab = check_embedding(OP, out, table, ids.len(), channels)?;
    if check_ids
        && let Some((t, _)) = ids
            .host
            .iter()
            .enumerate()
            .find(|&(_, &id)| id as usize >= vocab)
    {
        return Err(CudaError::TokenOutOfRange { position: t, vocab });
    }
    if ids.host.is_empty() {
        return Ok(None);
    }
    spec(
        Kernel::Embedding,
        (ids.len() as u32, 1, 1),
        256,
        vec![
            Arg::Ptr(out.addr),
            Arg::Ptr(table.addr),
            Arg::Ptr(ids.addr),
            Arg::U32(channels as u32),
            Arg::U32(vocab as u32),
            Arg::Ptr(error),
        ],
    )
}

fn check_norm(op: &'static str, inp: Buf, out: Buf, weight: Buf) -> Result<usize, CudaError> {
    let c = weight.len;
    if c == 0 {
        return Err(CudaError::bad(op, "weight", "empty"));
    }
    check_len(op, "out", out.len, inp.len)?;
    if !inp.len.is_multiple_of(c) {
        return Err(CudaError::bad(
            op,
            "inp",
            format!("{} elements is not a multiple of C={c}", inp.len),
        ));
    }
    u32_of(op, "weight", c)?;
    let rows = inp.len / c;
    grid_x(op, rows)?;
    Ok(rows)
}

/// Threads per row of the RMSNorm kernels: one per 4 channels (a float4 of the fast
/// path), a multiple of 32 in 32..=1024.
pub fn norm_threads(c: usize) -> u32 {
    (c.div_ceil(4).div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// `rmsnorm_bf16`: out (N, C) bf16, inp (N, C) f32, weight (C) bf16.
pub fn rmsnorm(out: Buf, inp: Buf, weight: Buf, eps: f32) -> Spec {
    let rows = check_norm("rmsnorm", inp, out, weight)?;
    if rows == 0 {
        return Ok(None);
    }
    spec(
        Kernel::RmsNorm,
        (rows as u32, 1, 1),
        norm_threads(weight.len),
        vec![
            Arg::Ptr(out.addr),
            Arg::Ptr(inp.addr),
            Arg::Ptr(weight.addr),
            Arg::U32(weight.len as u32),
            Arg::F32(eps),
        ],
    )
}

/// `residual_rmsnorm_bf16`: resid (N, C) f32 in/out, delta and out (N, C) bf16,
/// weight (C) bf16.
pub fn residual_rmsnorm(resid: Buf, delta: Buf, out: Buf, weight: Buf, eps: f32) -> Spec {
    const OP: &str = "residual_rmsnorm";
    let rows = check_norm(OP, resid, out, weight)?;
    check_len(OP, "delta", delta.len, resid.len)?;
    if rows == 0 {
        return Ok(None);
    }
    spec(
        Kernel::ResidualRmsNorm,
        (rows as u32, 1, 1),
        norm_threads(weight.len),
        vec![
            Arg::Ptr(resid.addr),
            Arg::Ptr(delta.addr),
            Arg::Ptr(out.addr),
            Arg::Ptr(weight.addr),
            Arg::U32(weight.len as u32),
            Arg::F32(eps),
        ],
    )
}

/// Threads per block of `rope_qkv_paged_bf16`.
const ROPE_THREADS: u32 = 128;

/// `rope_qkv_paged_bf16`; see [`super::CudaDevice::rope_qkv_paged`] for the layouts.
/// Checked: every token's sequence row exists, covers its position with a block inside
/// the arena, and no two tokens write the same cache slot (the result would depend on
/// timing).
#[allow(clippy::too_many_arguments)]
pub fn rope_qkv_paged(
    q_out: Buf,
    k_arena: Buf,
    v_arena: Buf,
    qkv: Buf,
    positions: Idx<'_>,
    token_seq: Idx<'_>,
    block_tables: Idx<'_>,
    ld_table: usize,
    inv_freq: Buf,
    ld_qkv: usize,
    shape: PagedShape,
) -> Spec {
    const OP: &str = "rope_qkv_paged";
    let n_blocks = check_arena(OP, &shape, k_arena, v_arena)?;
    let (nh, nkv, hs, bs) = (
        shape.n_heads,
        shape.n_kv_heads,
        shape.head_dim,
        shape.block_size,
    );
    if !hs.is_multiple_of(2) {
        return Err(CudaError::bad(OP, "shape", format!("HS={hs} must be even")));
    }
    check_len(OP, "inv_freq", inv_freq.len, hs / 2)?;
    let t = positions.len();
    check_len(OP, "token_seq", token_seq.len(), t)?;
    let width = (nh + 2 * nkv) * hs;
    if ld_qkv < width {
        return Err(CudaError::bad(
            OP,
            "ld_qkv",
            format!("{ld_qkv} is below the QKV row width (NH + 2 NKV) * HS = {width}"),
        ));
    }
    u32_of(OP, "ld_qkv", ld_qkv)?;
    check_len(OP, "qkv", qkv.len, t * ld_qkv)?;
    check_len(OP, "q_out", q_out.len, t * nh * hs)?;
    if ld_table == 0 || !block_tables.len().is_multiple_of(ld_table) {
        return Err(CudaError::bad(
            OP,
            "block_tables",
            format!(
                "{} ids is not a whole number of rows of ld_table = {ld_table}",
                block_tables.len()
            ),
        ));
    }
    u32_of(OP, "ld_table", ld_table)?;
    let n_seqs = block_tables.len() / ld_table;
    let mut slots = HashSet::with_capacity(t);
    for (i, (&pos, &seq)) in positions.host.iter().zip(token_seq.host).enumerate() {
        let (pos, seq) = (pos as usize, seq as usize);
        if seq >= n_seqs {
            return Err(CudaError::bad(
                OP,
                "token_seq",
                format!("token {i}: sequence {seq} but the tables have {n_seqs} rows"),
            ));
        }
        let row = &block_tables.host[seq * ld_table..(seq + 1) * ld_table];
        check_table_row(OP, "block_tables", row, pos + 1, bs, n_blocks)?;
        let slot = row[pos / bs] as usize * bs + pos % bs;
        if !slots.insert(slot) {
            return Err(CudaError::bad(
                OP,
                "positions",
                format!("token {i} writes cache slot {slot} that an earlier token writes"),
            ));
        }
    }
    grid_x(OP, t)?;
    if t == 0 {
        return Ok(None);
    }
    // Enough blocks per token for one (head, pair) item or V word per thread.
    let items = ((nh + nkv) * (hs / 2)).max(nkv * hs);
    let gy = items.div_ceil(ROPE_THREADS as usize).clamp(1, 65535) as u32;
    spec(
        Kernel::RopeQkvPaged,
        (t as u32, gy, 1),
        ROPE_THREADS,
        vec![
            Arg::Ptr(q_out.addr),
            Arg::Ptr(k_arena.addr),
            Arg::Ptr(v_arena.addr),
            Arg::Ptr(qkv.addr),
            Arg::Ptr(positions.addr),
            Arg::Ptr(token_seq.addr),
            Arg::Ptr(block_tables.addr),
            Arg::Ptr(inv_freq.addr),
            Arg::U32(nh as u32),
            Arg::U32(nkv as u32),
            Arg::U32(hs as u32),
            Arg::U32(bs as u32),
            Arg::U32(ld_qkv as u32),
            Arg::U32(ld_table as u32),
        ],
    )
}

/// Threads of `flash_prefill_bf16_hs*`: 4 warps of 16 query rows.
const FLASH_THREADS: u32 = 128;

/// Whether the tensor-core prefill kernel serves this shape: HS 64 or 128 and a GQA group
/// G = NH / NKV that divides 16 (a warp's 16 rows are whole tokens' groups).
pub fn flash_prefill_supported(shape: &PagedShape) -> bool {
    let (nh, nkv) = (shape.n_heads, shape.n_kv_heads);
    matches!(shape.head_dim, 64 | 128)
        && nkv > 0
        && nh.is_multiple_of(nkv)
        && nh / nkv <= 16
        && 16usize.is_multiple_of(nh / nkv)
}

/// `flash_prefill_bf16_hs{64,128}`: causal prefill of T tokens at positions pos0 ..
/// pos0 + T of one sequence. out, q (T, NH, HS) bf16; arenas (NB, BS, NKV, HS) bf16;
/// table: the sequence's block ids, covering positions 0 .. pos0 + T inside the arena.
/// Their K/V must already be in the cache (rope_qkv_paged writes them).
#[allow(clippy::too_many_arguments)]
pub fn flash_prefill(
    out: Buf,
    q: Buf,
    k_arena: Buf,
    v_arena: Buf,
    table: Idx<'_>,
    pos0: usize,
    t: usize,
    shape: PagedShape,
) -> Spec {
    const OP: &str = "flash_prefill";
    let n_blocks = check_arena(OP, &shape, k_arena, v_arena)?;
    let kernel = attention_kernel(
        OP,
        shape.head_dim,
        Kernel::FlashPrefillHs64,
        Kernel::FlashPrefillHs128,
    )?;
    if !flash_prefill_supported(&shape) {
        return Err(CudaError::bad(
            OP,
            "shape",
            format!(
                "G = NH / NKV = {} / {}: the tensor-core prefill needs G dividing 16",
                shape.n_heads, shape.n_kv_heads
            ),
        ));
    }
    let (nh, hs) = (shape.n_heads, shape.head_dim);
    check_len(OP, "q", q.len, t * nh * hs)?;
    check_len(OP, "out", out.len, t * nh * hs)?;
    let total = pos0
        .checked_add(t)
        .filter(|&n| n <= u32::MAX as usize)
        .ok_or_else(|| CudaError::bad(OP, "pos0", format!("pos0 {pos0} + T {t} overflows")))?;
    check_table_row(OP, "table", table.host, total, shape.block_size, n_blocks)?;
    if t == 0 {
        return Ok(None);
    }
    // K/V rows are read as 16-byte vectors, q and out as bf16 pairs.
    aligned(OP, "k_arena", k_arena.addr, 16)?;
    aligned(OP, "v_arena", v_arena.addr, 16)?;
    aligned(OP, "q", q.addr, 4)?;
    aligned(OP, "out", out.addr, 4)?;
    let tokens_per_cta = 4 * (16 / (nh / shape.n_kv_heads));
    let gx = grid_x(OP, t.div_ceil(tokens_per_cta))?;
    let gy = grid_yz(OP, "shape", shape.n_kv_heads)?;
    spec(
        kernel,
        (gx, gy, 1),
        FLASH_THREADS,
        vec![
            Arg::Ptr(out.addr),
            Arg::Ptr(q.addr),
            Arg::Ptr(k_arena.addr),
            Arg::Ptr(v_arena.addr),
            Arg::Ptr(table.addr),
            Arg::U32(pos0 as u32),
            Arg::U32(t as u32),
            Arg::U32(nh as u32),
            Arg::U32(shape.n_kv_heads as u32),
            Arg::U32(shape.block_size as u32),
            Arg::F32(1.0 / (hs as f32).sqrt()),
        ],
    )
}

/// `paged_decode_attention_bf16_hs{64,128}`: out, q (B, NH, HS) bf16; arenas
/// (NB, BS, NKV, HS) bf16; block_tables (B, ld_table); seq_lens (B). HS must be 64 or
/// 128 and G = NH / NKV at most 32 (one warp per query head).
#[allow(clippy::too_many_arguments)]
pub fn paged_decode_attention(
    out: Buf,
    q: Buf,
    k_arena: Buf,
    v_arena: Buf,
    block_tables: Idx<'_>,
    ld_table: usize,
    seq_lens: Idx<'_>,
    shape: PagedShape,
) -> Spec {
    const OP: &str = "paged_decode_attention";
    let n_blocks = check_arena(OP, &shape, k_arena, v_arena)?;
    let kernel = attention_kernel(
        OP,
        shape.head_dim,
        Kernel::PagedDecodeHs64,
        Kernel::PagedDecodeHs128,
    )?;
    let g = shape.group();
    if g > 32 {
        return Err(CudaError::bad(
            OP,
            "shape",
            format!("G = NH/NKV = {g}: at most 32 query heads per KV head"),
        ));
    }
    let b = seq_lens.len();
    let width = shape.n_heads * shape.head_dim;
    check_len(OP, "q", q.len, b * width)?;
    check_len(OP, "out", out.len, b * width)?;
    check_len(OP, "block_tables", block_tables.len(), b * ld_table)?;
    u32_of(OP, "ld_table", ld_table)?;
    for (s, &len) in seq_lens.host.iter().enumerate() {
        let row = &block_tables.host[s * ld_table..(s + 1) * ld_table];
        check_table_row(
            OP,
            "block_tables",
            row,
            len as usize,
            shape.block_size,
            n_blocks,
        )?;
    }
    let nkv = grid_x(OP, shape.n_kv_heads)?;
    let by = grid_yz(OP, "seq_lens", b)?;
    if b == 0 {
        return Ok(None);
    }
    aligned(OP, "q", q.addr, 16)?;
    aligned(OP, "k_arena", k_arena.addr, 16)?;
    aligned(OP, "v_arena", v_arena.addr, 16)?;
    aligned(OP, "out", out.addr, 4)?;
    spec(
        kernel,
        (nkv, by, 1),
        32 * g as u32,
        vec![
            Arg::Ptr(out.addr),
            Arg::Ptr(q.addr),
            Arg::Ptr(k_arena.addr),
            Arg::Ptr(v_arena.addr),
            Arg::Ptr(block_tables.addr),
            Arg::U32(ld_table as u32),
            Arg::Ptr(seq_lens.addr),
            Arg::U32(shape.n_heads as u32),
            Arg::U32(shape.n_kv_heads as u32),
            Arg::U32(shape.block_size as u32),
            Arg::F32(1.0 / (shape.head_dim as f32).sqrt()),
        ],
    )
}

/// Internal consistency of a [`WorkPlan`] (item rows, slots, table ranges, CSR merge
/// lists), as the kernels rely on it; returns the largest block id any item reads.
pub fn check_plan(plan: &WorkPlan) -> Result<Option<u32>, CudaError> {
    const OP: &str = "check_plan";
    let bad = |reason: String| CudaError::bad(OP, "plan", reason);
    if plan.group == 0 || plan.block_size == 0 {
        return Err(bad("G and BS must be positive".into()));
    }
    let mut max_block: Option<u32> = None;
    let mut max_rows = 0;
    for (i, it) in plan.items.iter().enumerate() {
        let rows = it.seq_count as usize * plan.group;
        if it.seq_count == 0 || rows > MAX_ITEM_ROWS {
            return Err(bad(format!(
                "item {i}: {rows} query rows (1..={MAX_ITEM_ROWS})"
            )));
        }
        max_rows = max_rows.max(rows);
        if it.seq_start as usize + it.seq_count as usize > plan.n_seqs {
            return Err(bad(format!("item {i}: sequences beyond B={}", plan.n_seqs)));
        }
        if it.slot as usize + it.seq_count as usize > plan.n_slots {
            return Err(bad(format!(
                "item {i}: slots beyond n_slots={}",
                plan.n_slots
            )));
        }
        if it.pos_start > it.pos_end {
            return Err(bad(format!("item {i}: pos_start > pos_end")));
        }
        if it.causal.checked_add(it.seq_count).is_none() {
            return Err(bad(format!("item {i}: the causal limits overflow u32")));
        }
        let needed = (it.pos_end as usize).div_ceil(plan.block_size);
        let start = it.table_off as usize;
        if start + needed > plan.tables.len() {
            return Err(bad(format!("item {i}: table range beyond the tables")));
        }
        // Only the blocks of positions pos_start..pos_end are read.
        let first = (it.pos_start as usize / plan.block_size).min(needed);
        for &id in &plan.tables[start + first..start + needed] {
            max_block = Some(max_block.map_or(id, |m| m.max(id)));
        }
    }
    if max_rows != plan.max_item_rows {
        return Err(bad(format!(
            "max_item_rows is {} but the items need {max_rows}",
            plan.max_item_rows
        )));
    }
    if plan.merge_offsets.len() != plan.n_seqs + 1
        || plan.merge_offsets.first() != Some(&0)
        || plan.merge_offsets.windows(2).any(|w| w[0] > w[1])
        || plan.merge_offsets.last().map(|&x| x as usize) != Some(plan.merge_slots.len())
    {
        return Err(bad(
            "merge_offsets is not a CSR offset list over merge_slots".into(),
        ));
    }
    if plan.merge_slots.iter().any(|&s| s as usize >= plan.n_slots) {
        return Err(bad("a merge slot is beyond n_slots".into()));
    }
    u32_of(OP, "n_slots", plan.n_slots)?;
    u32_of(OP, "tables", plan.tables.len())?;
    Ok(max_block)
}

fn check_plan_shape(op: &'static str, p: &WorkPlan, shape: &PagedShape) -> Result<(), CudaError> {
    check_shape(op, shape)?;
    if p.group != shape.group() || p.block_size != shape.block_size {
        return Err(CudaError::bad(
            op,
            "plan",
            format!(
                "planned for G={} BS={}, called with G={} BS={}",
                p.group,
                p.block_size,
                shape.group(),
                shape.block_size
            ),
        ));
    }
    Ok(())
}

/// `attention_partial_bf16_hs{64,128}` over a plan checked by [`check_plan`]
/// (`max_block` is its result): states_o (>= n_slots, NH, HS) f32, states_lse
/// (>= n_slots, NH) f32, q (B, NH, HS) bf16, arenas (NB, BS, NKV, HS) bf16.
#[allow(clippy::too_many_arguments)]
pub fn attention_partial(
    states_o: Buf,
    states_lse: Buf,
    q: Buf,
    k_arena: Buf,
    v_arena: Buf,
    plan: &WorkPlan,
    max_block: Option<u32>,
    addrs: PlanAddrs,
    shape: PagedShape,
) -> Spec {
    const OP: &str = "attention_partial";
    let n_blocks = check_arena(OP, &shape, k_arena, v_arena)?;
    let kernel = attention_kernel(
        OP,
        shape.head_dim,
        Kernel::PartialHs64,
        Kernel::PartialHs128,
    )?;
    check_plan_shape(OP, plan, &shape)?;
    if let Some(m) = max_block
        && m as usize >= n_blocks
    {
        return Err(CudaError::bad(
            OP,
            "plan",
            format!("block id {m} is outside the arena of {n_blocks} blocks"),
        ));
    }
    let (nh, hs) = (shape.n_heads, shape.head_dim);
    check_len(OP, "q", q.len, plan.n_seqs * nh * hs)?;
    at_least(OP, "states_o", states_o.len, plan.n_slots * nh * hs)?;
    at_least(OP, "states_lse", states_lse.len, plan.n_slots * nh)?;
    let n_items = grid_x(OP, plan.items.len())?;
    let nkv = grid_yz(OP, "shape", shape.n_kv_heads)?;
    let warps = plan.warps();
    if plan.max_item_rows > ROWS_PER_WARP * warps as usize {
        return Err(CudaError::bad(OP, "plan", "items exceed the CTA's rows"));
    }
    if n_items == 0 {
        return Ok(None);
    }
    aligned(OP, "q", q.addr, 16)?;
    aligned(OP, "k_arena", k_arena.addr, 16)?;
    aligned(OP, "v_arena", v_arena.addr, 16)?;
    aligned(OP, "states_o", states_o.addr, 8)?;
    spec(
        kernel,
        (n_items, nkv, 1),
        32 * warps,
        vec![
            Arg::Ptr(states_o.addr),
            Arg::Ptr(states_lse.addr),
            Arg::Ptr(q.addr),
            Arg::Ptr(k_arena.addr),
            Arg::Ptr(v_arena.addr),
            Arg::Ptr(addrs.tables),
            Arg::Ptr(addrs.items),
            Arg::U32(nh as u32),
            Arg::U32(shape.n_kv_heads as u32),
            Arg::U32(shape.block_size as u32),
            Arg::F32(1.0 / (hs as f32).sqrt()),
        ],
    )
}

/// Threads per (head, sequence) of `attention_merge_states_bf16` for rows of at most
/// `max_slots` states: a warp per 8 slots, 1 to 4 warps. On an H200 a K = 16 step over a
/// 2048-token prefix (~36 states per row) took 25 us per layer with one warp and 18 with
/// four, while a 2048-token prefill (1 to 4 states per row) took 61 us with one warp
/// and 193 with four.
pub fn merge_threads(max_slots: usize) -> u32 {
    32 * max_slots.div_ceil(8).clamp(1, 4) as u32
}

/// `attention_merge_states_bf16` over a plan checked by [`check_plan`]: out (B, NH, HS)
/// bf16, states as for [`attention_partial`].
pub fn attention_merge_states(
    out: Buf,
    states_o: Buf,
    states_lse: Buf,
    plan: &WorkPlan,
    addrs: PlanAddrs,
    shape: PagedShape,
) -> Spec {
    const OP: &str = "attention_merge_states";
    check_plan_shape(OP, plan, &shape)?;
    let (nh, hs) = (shape.n_heads, shape.head_dim);
    check_len(OP, "out", out.len, plan.n_seqs * nh * hs)?;
    at_least(OP, "states_o", states_o.len, plan.n_slots * nh * hs)?;
    at_least(OP, "states_lse", states_lse.len, plan.n_slots * nh)?;
    let gx = grid_x(OP, nh)?;
    let gy = grid_yz(OP, "plan", plan.n_seqs)?;
    u32_of(OP, "shape", hs)?;
    if plan.n_seqs == 0 {
        return Ok(None);
    }
    let max_slots = plan
        .merge_offsets
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]) as usize)
        .max()
        .unwrap_or(0);
    spec(
        Kernel::MergeStates,
        (gx, gy, 1),
        merge_threads(max_slots),
        vec![
            Arg::Ptr(out.addr),
            Arg::Ptr(states_o.addr),
            Arg::Ptr(states_lse.addr),
            Arg::Ptr(addrs.merge_offsets),
            Arg::Ptr(addrs.merge_slots),
            Arg::U32(nh as u32),
            Arg::U32(hs as u32),
        ],
    )
}

/// `swiglu_bf16`: out (N, I) bf16; gate and up hold at least (N - 1) * ld_in + I bf16.
/// I and ld_in even, every address 4-byte aligned (two bf16 per load).
pub fn swiglu(out: Buf, gate: Buf, up: Buf, n_rows: usize, inter: usize, ld_in: usize) -> Spec {
    const OP: &str = "swiglu";
    if inter == 0 || !inter.is_multiple_of(2) || !ld_in.is_multiple_of(2) || ld_in < inter {
        return Err(CudaError::bad(
            OP,
            "shape",
            format!("I={inter} must be positive and even, ld_in={ld_in} even and >= I"),
        ));
    }
    check_len(OP, "out", out.len, n_rows * inter)?;
    at_least(OP, "gate", gate.len, strided_len(n_rows, ld_in, inter))?;
    at_least(OP, "up", up.len, strided_len(n_rows, ld_in, inter))?;
    u32_of(OP, "n_rows", n_rows)?;
    u32_of(OP, "ld_in", ld_in)?;
    if n_rows == 0 {
        return Ok(None);
    }
    aligned(OP, "out", out.addr, 4)?;
    aligned(OP, "gate", gate.addr, 4)?;
    aligned(OP, "up", up.addr, 4)?;
    let pairs = n_rows * inter / 2;
    // Grid-stride loop: any grid size is correct; cap it at a few waves.
    let blocks = pairs.div_ceil(256).clamp(1, 1 << 16);
    spec(
        Kernel::SwiGlu,
        (blocks as u32, 1, 1),
        256,
        vec![
            Arg::Ptr(out.addr),
            Arg::Ptr(gate.addr),
            Arg::Ptr(up.addr),
            Arg::U32(n_rows as u32),
            Arg::U32(inter as u32),
            Arg::U32(ld_in as u32),
        ],
    )
}

/// Hidden-row checks shared by the reward heads; returns R.
fn check_head_rows(
    op: &'static str,
    hidden: Buf,
    ld_hidden: usize,
    channels: usize,
    rows: Option<Idx<'_>>,
    default_rows: usize,
) -> Result<usize, CudaError> {
    if channels == 0 || ld_hidden < channels {
        return Err(CudaError::bad(
            op,
            "ld_hidden",
            format!("C={channels} must be positive and ld_hidden={ld_hidden} >= C"),
        ));
    }
    u32_of(op, "ld_hidden", ld_hidden)?;
    u32_of(op, "channels", channels)?;
    let (n, max_row) = match rows {
        Some(r) => (r.len(), r.host.iter().max().map(|&m| m as usize)),
        None => (default_rows, default_rows.checked_sub(1)),
    };
    if let Some(m) = max_row {
        at_least(op, "hidden", hidden.len, m * ld_hidden + channels)?;
    }
    grid_x(op, n)?;
    Ok(n)
}

/// `reward_linear_bf16`: rewards (R) f32; hidden bf16 rows of stride ld_hidden; rows (R)
/// or None for rows 0..R; w (C) bf16.
pub fn reward_linear(
    rewards: Buf,
    hidden: Buf,
    ld_hidden: usize,
    rows: Option<Idx<'_>>,
    w: Buf,
    b: f32,
) -> Spec {
    const OP: &str = "reward_linear";
    let c = w.len;
    let n = check_head_rows(OP, hidden, ld_hidden, c, rows, rewards.len)?;
    check_len(OP, "rewards", rewards.len, n)?;
    if n == 0 {
        return Ok(None);
    }
    spec(
        Kernel::RewardLinear,
        (n as u32, 1, 1),
        256,
        vec![
            Arg::Ptr(rewards.addr),
            Arg::Ptr(hidden.addr),
            Arg::U32(ld_hidden as u32),
            Arg::Ptr(rows.map_or(0, |r| r.addr)),
            Arg::Ptr(w.addr),
            Arg::F32(b),
            Arg::U32(c as u32),
        ],
    )
}

/// `reward_dense_tanh_bf16`: z (R, C) f32; hidden bf16 rows of stride ld_hidden (C and
/// ld_hidden multiples of 8, 16-byte aligned); rows (R) or None for rows 0..R; dense_w
/// (C, C) bf16 16-byte aligned; dense_b (C) f32.
pub fn reward_dense_tanh(
    z: Buf,
    hidden: Buf,
    ld_hidden: usize,
    rows: Option<Idx<'_>>,
    dense_w: Buf,
    dense_b: Buf,
) -> Spec {
    const OP: &str = "reward_dense_tanh";
    let c = dense_b.len;
    if c == 0 || !c.is_multiple_of(8) || !ld_hidden.is_multiple_of(8) {
        return Err(CudaError::bad(
            OP,
            "shape",
            format!(
                "C={c} must be a positive multiple of 8 and ld_hidden={ld_hidden} a multiple of 8"
            ),
        ));
    }
    check_len(OP, "dense_w", dense_w.len, c * c)?;
    let n = check_head_rows(OP, hidden, ld_hidden, c, rows, z.len / c)?;
    check_len(OP, "z", z.len, n * c)?;
    u32_of(OP, "rows", n)?;
    if n == 0 {
        return Ok(None);
    }
    aligned(OP, "hidden", hidden.addr, 16)?;
    aligned(OP, "dense_w", dense_w.addr, 16)?;
    spec(
        Kernel::RewardDenseTanh,
        (c.div_ceil(8) as u32, 1, 1),
        256,
        vec![
            Arg::Ptr(z.addr),
            Arg::Ptr(hidden.addr),
            Arg::U32(ld_hidden as u32),
            Arg::Ptr(rows.map_or(0, |r| r.addr)),
            Arg::U32(n as u32),
            Arg::Ptr(dense_w.addr),
            Arg::Ptr(dense_b.addr),
            Arg::U32(c as u32),
        ],
    )
}

/// `reward_out_f32`: rewards (R) f32, z (R, C) f32, w_out (C) bf16.
pub fn reward_out(rewards: Buf, z: Buf, w_out: Buf, b_out: f32) -> Spec {
    const OP: &str = "reward_out";
    let c = w_out.len;
    if c == 0 {
        return Err(CudaError::bad(OP, "w_out", "empty"));
    }
    let n = rewards.len;
    check_len(OP, "z", z.len, n * c)?;
    u32_of(OP, "w_out", c)?;
    grid_x(OP, n)?;
    if n == 0 {
        return Ok(None);
    }
    spec(
        Kernel::RewardOut,
        (n as u32, 1, 1),
        256,
        vec![
            Arg::Ptr(rewards.addr),
            Arg::Ptr(z.addr),
            Arg::Ptr(w_out.addr),
            Arg::F32(b_out),
            Arg::U32(c as u32),
        ],
    )
}

/// `argmax_f32`: ids (B) u32, logits (B, ld) f32, V <= ld.
pub fn argmax(ids: Buf, logits: Buf, vocab: usize, ld: usize) -> Spec {
    const OP: &str = "argmax";
    if ld == 0 || vocab > ld {
        return Err(CudaError::bad(
            OP,
            "ld",
            format!("V={vocab} must be at most ld={ld} > 0"),
        ));
    }
    let b = ids.len;
    check_len(OP, "logits", logits.len, b * ld)?;
    u32_of(OP, "ld", ld)?;
    grid_x(OP, b)?;
    if b == 0 {
        return Ok(None);
    }
    spec(
        Kernel::Argmax,
        (b as u32, 1, 1),
        1024,
        vec![
            Arg::Ptr(ids.addr),
            Arg::Ptr(logits.addr),
            Arg::U32(vocab as u32),
            Arg::U32(ld as u32),
        ],
    )
}

/// The sampling parameters of `sample_f32` (cloudrm-sampler's `SamplingParams`, less
/// the stop conditions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    /// 0: greedy (argmax after the penalty).
    pub temperature: f32,
    /// 0: off.
    pub top_k: u32,
    /// 1: off.
    pub top_p: f32,
    /// 0: off.
    pub min_p: f32,
    /// 1: off.
    pub repetition_penalty: f32,
    /// The Philox key.
    pub seed: u64,
}

impl SampleParams {
    /// The top-p threshold the kernel compares with, computed as the CPU sampler does
    /// ((1 - top_p as f64) as f32), or -1 when top-p is off.
    pub fn top_p_threshold(&self) -> f32 {
        if self.top_p >= 1.0 {
            -1.0
        } else {
            (1.0f64 - f64::from(self.top_p)) as f32
        }
    }
}

/// `sample_f32`: ids and status (B) u32; logits (B, ld) f32 with V <= ld; history CSR
/// (B + 1 offsets into `hist_ids`, every id < V); seen (B, ceil(V / 32)) u32, all zero;
/// counters (B, 4) u32.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    ids: Buf,
    status: Buf,
    logits: Buf,
    vocab: usize,
    ld: usize,
    hist_offsets: Idx<'_>,
    hist_ids: Idx<'_>,
    seen: Buf,
    counters: Idx<'_>,
    p: SampleParams,
) -> Spec {
    const OP: &str = "sample";
    if vocab == 0 || vocab > ld {
        return Err(CudaError::bad(
            OP,
            "ld",
            format!("V={vocab} must be in 1..=ld={ld}"),
        ));
    }
    let ok = p.temperature.is_finite()
        && p.temperature >= 0.0
        && p.top_p > 0.0
        && p.top_p <= 1.0
        && p.min_p.is_finite()
        && (0.0..=1.0).contains(&p.min_p)
        && p.repetition_penalty.is_finite()
        && p.repetition_penalty > 0.0;
    if !ok {
        return Err(CudaError::bad(
            OP,
            "params",
            format!(
                "{p:?}: temperature >= 0, top_p in (0, 1], min_p in [0, 1] and a positive penalty required"
            ),
        ));
    }
    let b = ids.len;
    check_len(OP, "status", status.len, b)?;
    check_len(OP, "logits", logits.len, b * ld)?;
    check_len(OP, "hist_offsets", hist_offsets.len(), b + 1)?;
    let offs = hist_offsets.host;
    if offs.first() != Some(&0)
        || offs.windows(2).any(|w| w[0] > w[1])
        || offs.last().map(|&x| x as usize) != Some(hist_ids.len())
    {
        return Err(CudaError::bad(
            OP,
            "hist_offsets",
            "not a CSR offset list over hist_ids",
        ));
    }
    if let Some(i) = hist_ids.host.iter().position(|&t| t as usize >= vocab) {
        return Err(CudaError::TokenOutOfRange { position: i, vocab });
    }
    let words = vocab.div_ceil(32);
    check_len(OP, "seen", seen.len, b * words)?;
    check_len(OP, "counters", counters.len(), 4 * b)?;
    u32_of(OP, "ld", ld)?;
    grid_x(OP, b)?;
    if b == 0 {
        return Ok(None);
    }
    aligned(OP, "counters", counters.addr, 16)?;
    spec(
        Kernel::Sample,
        (b as u32, 1, 1),
        1024,
        vec![
            Arg::Ptr(ids.addr),
            Arg::Ptr(status.addr),
            Arg::Ptr(logits.addr),
            Arg::U32(vocab as u32),
            Arg::U32(ld as u32),
            Arg::Ptr(hist_offsets.addr),
            Arg::Ptr(hist_ids.addr), // never read when the history is empty
            Arg::Ptr(seen.addr),
            Arg::U32(words as u32),
            Arg::Ptr(counters.addr),
            Arg::U32(p.seed as u32),
            Arg::U32((p.seed >> 32) as u32),
            Arg::F32(p.temperature),
            Arg::U32(p.top_k),
            Arg::F32(p.top_p_threshold()),
            Arg::F32(p.min_p),
            Arg::F32(p.repetition_penalty),
        ],
    )
}

/// `fill_uniform_bf16`: out (n) bf16, n < 2^32; any scale and offset (finite).
pub fn fill_uniform(out: Buf, seed: u64, scale: f32, offset: f32) -> Spec {
    const OP: &str = "fill_uniform";
    if !scale.is_finite() || !offset.is_finite() {
        return Err(CudaError::bad(
            OP,
            "scale/offset",
            format!("{scale} and {offset} must be finite"),
        ));
    }
    let n = u32_of(OP, "out", out.len)?;
    if n == 0 {
        return Ok(None);
    }
    // Grid-stride loop: any grid is correct; a few waves keep every SM busy.
    let blocks = out.len.div_ceil(256).clamp(1, 4096);
    spec(
        Kernel::FillUniform,
        (blocks as u32, 1, 1),
        256,
        vec![
            Arg::Ptr(out.addr),
            Arg::U32(n),
            Arg::U32(seed as u32),
            Arg::U32((seed >> 32) as u32),
            Arg::F32(scale),
            Arg::F32(offset),
        ],
    )
}

/// GEMM checks (y (M, N), x (M, K), w (N, K)); returns cuBLAS's (m, n, k) = (N, M, K) as
/// i32, or None when M = 0.
pub fn gemm(
    y: Buf,
    x: Buf,
    w: Buf,
    m: usize,
    n: usize,
    k: usize,
) -> Result<Option<(i32, i32, i32)>, CudaError> {
    const OP: &str = "gemm_bf16";
    if n == 0 || k == 0 {
        return Err(CudaError::bad(OP, "n/k", "must be positive"));
    }
    let as_int = |arg: &'static str, v: usize| {
        i32::try_from(v).map_err(|_| CudaError::bad(OP, arg, format!("{v} exceeds i32")))
    };
    let (mi, ni, ki) = (as_int("m", m)?, as_int("n", n)?, as_int("k", k)?);
    check_len(OP, "x", x.len, m * k)?;
    check_len(OP, "w", w.len, n * k)?;
    check_len(OP, "y", y.len, m * n)?;
    Ok((m > 0).then_some((ni, mi, ki)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::plan::{PlanOptions, WorkPlan};

    const A: u64 = 0x7f00_0000_0000; // a 256-byte aligned fake device address

    fn buf(len: usize) -> Buf {
        Buf { addr: A, len }
    }

    fn idx(host: &[u32]) -> Idx<'_> {
        Idx { host, addr: A }
    }

    fn shape(nh: usize, nkv: usize, hs: usize, bs: usize) -> PagedShape {
        PagedShape {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hs,
            block_size: bs,
        }
    }

    fn bad_arg(r: Spec) -> &'static str {
        match r {
            Err(CudaError::BadArgument { arg, .. }) | Err(CudaError::Length { arg, .. }) => arg,
            other => panic!("expected an argument error, got {other:?}"),
        }
    }

    /// Every produced spec matches its kernel's parameter list.
    fn ok(r: Spec) -> LaunchSpec {
        let s = r.unwrap().unwrap();
        let kinds: Vec<_> = s
            .args
            .iter()
            .map(|a| match a {
                Arg::Ptr(_) => super::super::device::Param::Ptr,
                Arg::U32(_) => super::super::device::Param::U32,
                Arg::F32(_) => super::super::device::Param::F32,
            })
            .collect();
        assert_eq!(kinds, s.kernel.params(), "{:?}", s.kernel);
        assert!(s.block > 0 && s.block <= 1024 && s.block.is_multiple_of(32));
        s
    }

    #[test]
    fn embedding_checks() {
        let s = ok(embedding(
            buf(3 * 8),
            buf(5 * 8),
            idx(&[0, 4, 2]),
            8,
            true,
            0,
        ));
        assert_eq!(s.grid, (3, 1, 1));
        assert!(matches!(
            embedding(buf(3 * 8), buf(5 * 8), idx(&[0, 5, 2]), 8, true, 0),
            Err(CudaError::TokenOutOfRange {
                position: 1,
                vocab: 5
            })
        ));
        // Unchecked ids are the kernel's business.
        ok(embedding(
            buf(3 * 8),
            buf(5 * 8),
            idx(&[0, 5, 2]),
            8,
            false,
            A,
        ));
        assert_eq!(
            bad_arg(embedding(buf(3 * 8), buf(41), idx(&[0]), 8, true, 0)),
            "table"
        );
        assert_eq!(
            bad_arg(embedding(buf(2 * 8), buf(40), idx(&[0, 1, 2]), 8, true, 0)),
            "out"
        );
        let misaligned = Buf {
            addr: A + 2,
            len: 40,
        };
        assert_eq!(
            bad_arg(embedding(buf(8), misaligned, idx(&[0]), 8, true, 0)),
            "table"
        );
        // Odd C takes the scalar path: no alignment needed.
        ok(embedding(
            buf(7),
            Buf {
                addr: A + 2,
                len: 35,
            },
            idx(&[4]),
            7,
            true,
            0,
        ));
        assert!(
            embedding(buf(0), buf(40), idx(&[]), 8, true, 0)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn norm_checks() {
        let s = ok(rmsnorm(buf(7 * 577), buf(7 * 577), buf(577), 1e-5));
        assert_eq!(s.grid, (7, 1, 1));
        assert_eq!(
            bad_arg(rmsnorm(buf(7 * 577), buf(7 * 577), buf(0), 1e-5)),
            "weight"
        );
        assert_eq!(
            bad_arg(rmsnorm(buf(7 * 577), buf(7 * 576), buf(577), 1e-5)),
            "out"
        );
        assert_eq!(bad_arg(rmsnorm(buf(10), buf(10), buf(3), 1e-5)), "inp");
        ok(residual_rmsnorm(buf(14), buf(14), buf(14), buf(7), 1e-5));
        assert_eq!(
            bad_arg(residual_rmsnorm(buf(14), buf(13), buf(14), buf(7), 1e-5)),
            "delta"
        );
        assert!(rmsnorm(buf(0), buf(0), buf(4), 1e-5).unwrap().is_none());
        // One thread per 4 channels, a multiple of 32, at most 1024.
        assert_eq!(
            ok(rmsnorm(buf(4096), buf(4096), buf(4096), 1e-5)).block,
            1024
        );
        assert_eq!(ok(rmsnorm(buf(576), buf(576), buf(576), 1e-5)).block, 160);
        assert_eq!(norm_threads(1), 32);
        assert_eq!(norm_threads(8192), 1024);
    }

    #[test]
    fn flash_prefill_checks() {
        let sh = shape(32, 8, 128, 16);
        let nb = 4;
        let arena = nb * sh.block_elems();
        let tables = [3u32, 1, 0, 2];
        let row = 32 * 128;
        let spec_of = |pos0: usize, t: usize, tables: &[u32], sh: PagedShape| {
            flash_prefill(
                buf(t * row),
                buf(t * row),
                buf(arena),
                buf(arena),
                idx(tables),
                pos0,
                t,
                sh,
            )
        };
        // G = 4: 4 tokens per warp, 16 per CTA; 37 tokens -> 3 query tiles, 8 KV heads.
        let s = ok(spec_of(20, 37, &tables, sh));
        assert_eq!((s.grid, s.block), ((3, 8, 1), 128));
        assert!(spec_of(0, 0, &tables, sh).unwrap().is_none());
        // 20 + 45 = 65 positions need 5 blocks; the table has 4.
        assert_eq!(bad_arg(spec_of(20, 45, &tables, sh)), "table");
        assert_eq!(bad_arg(spec_of(0, 20, &[0, 9], sh)), "table");
        // G = 3 (SmolLM2: 9 / 3) does not divide 16; HS 96 has no kernel.
        assert!(!flash_prefill_supported(&shape(9, 3, 64, 16)));
        assert!(flash_prefill_supported(&shape(8, 8, 64, 16)));
        assert!(flash_prefill_supported(&shape(32, 2, 128, 16)));
        assert!(!flash_prefill_supported(&shape(64, 2, 128, 16)));
        let g3 = shape(9, 3, 64, 16);
        let a3 = nb * g3.block_elems();
        let r = flash_prefill(
            buf(5 * 9 * 64),
            buf(5 * 9 * 64),
            buf(a3),
            buf(a3),
            idx(&tables),
            0,
            5,
            g3,
        );
        assert_eq!(bad_arg(r), "shape");
        assert_eq!(
            bad_arg(flash_prefill(
                buf(5 * row),
                buf(4 * row),
                buf(arena),
                buf(arena),
                idx(&tables),
                0,
                5,
                sh
            )),
            "q"
        );
        // K/V rows are read as 16-byte vectors.
        assert_eq!(
            bad_arg(flash_prefill(
                buf(5 * row),
                buf(5 * row),
                Buf {
                    addr: A + 8,
                    len: arena
                },
                buf(arena),
                idx(&tables),
                0,
                5,
                sh
            )),
            "k_arena"
        );
    }

    #[test]
    fn rope_checks() {
        let sh = shape(9, 3, 64, 16);
        let nb = 4;
        let arena = nb * sh.block_elems();
        let ld = (9 + 6) * 64;
        let tables = [3u32, 1, 0, 2];
        // Two tokens of one sequence at positions 17 and 18 (block 1 = id 1).
        let spec_of = |pos: &[u32], seq: &[u32], tables: &[u32], ld_table: usize| {
            rope_qkv_paged(
                buf(pos.len() * 9 * 64),
                buf(arena),
                buf(arena),
                buf(pos.len() * ld),
                idx(pos),
                idx(seq),
                idx(tables),
                ld_table,
                buf(32),
                ld,
                sh,
            )
        };
        let s = ok(spec_of(&[17, 18], &[0, 0], &tables, 4));
        // (9 + 3) heads x 32 pairs = 384 items: three blocks of 128 per token.
        assert_eq!(s.grid, (2, 3, 1));
        assert_eq!(s.block, 128);
        // Two sequences (rows of 2), decode: one token each.
        ok(spec_of(&[17, 5], &[0, 1], &tables, 2));
        assert_eq!(bad_arg(spec_of(&[64], &[0], &tables, 4)), "block_tables");
        assert_eq!(bad_arg(spec_of(&[1], &[2], &tables, 2)), "token_seq");
        assert_eq!(bad_arg(spec_of(&[5, 5], &[0, 0], &tables, 4)), "positions");
        assert_eq!(
            bad_arg(spec_of(&[1], &[0], &[9, 9, 9, 9], 4)),
            "block_tables"
        );
        assert_eq!(bad_arg(spec_of(&[1], &[0], &tables, 3)), "block_tables");
        assert_eq!(bad_arg(spec_of(&[1, 2], &[0], &tables, 4)), "token_seq");
        let odd = shape(9, 3, 7, 16);
        assert_eq!(
            bad_arg(rope_qkv_paged(
                buf(63),
                buf(4 * odd.block_elems()),
                buf(4 * odd.block_elems()),
                buf(105),
                idx(&[0]),
                idx(&[0]),
                idx(&tables),
                4,
                buf(3),
                105,
                odd,
            )),
            "shape"
        );
    }

    #[test]
    fn paged_decode_checks() {
        let sh = shape(9, 3, 64, 16);
        let arena = 4 * sh.block_elems();
        let tables = [3u32, 1, 0, 2];
        let call = |lens: &[u32], sh: PagedShape, q: Buf| {
            paged_decode_attention(
                buf(lens.len() * sh.n_heads * sh.head_dim),
                q,
                buf(arena),
                buf(arena),
                idx(&tables[..lens.len() * 2]),
                2,
                idx(lens),
                sh,
            )
        };
        let s = ok(call(&[17, 32], sh, buf(2 * 9 * 64)));
        assert_eq!((s.grid, s.block), ((3, 2, 1), 96));
        assert_eq!(s.kernel, Kernel::PagedDecodeHs64);
        assert_eq!(bad_arg(call(&[33, 1], sh, buf(2 * 9 * 64))), "block_tables");
        assert_eq!(bad_arg(call(&[1, 1], sh, buf(2 * 9 * 64 - 1))), "q");
        let misaligned = Buf {
            addr: A + 8,
            len: 2 * 9 * 64,
        };
        assert_eq!(bad_arg(call(&[1, 1], sh, misaligned)), "q");
        let hs96 = shape(4, 2, 96, 16);
        let a96 = 4 * hs96.block_elems();
        assert_eq!(
            bad_arg(paged_decode_attention(
                buf(4 * 96),
                buf(4 * 96),
                buf(a96),
                buf(a96),
                idx(&[0]),
                1,
                idx(&[1]),
                hs96
            )),
            "shape"
        );
        let g64 = shape(64, 1, 64, 16);
        let a = 4 * g64.block_elems();
        assert_eq!(
            bad_arg(paged_decode_attention(
                buf(64 * 64),
                buf(64 * 64),
                buf(a),
                buf(a),
                idx(&[0]),
                1,
                idx(&[1]),
                g64
            )),
            "shape"
        );
        // NH not a multiple of NKV, arena not whole blocks.
        assert_eq!(bad_arg(call(&[1, 1], shape(8, 3, 64, 16), buf(0))), "shape");
        assert_eq!(
            bad_arg(paged_decode_attention(
                buf(9 * 64),
                buf(9 * 64),
                buf(arena + 1),
                buf(arena + 1),
                idx(&[0]),
                1,
                idx(&[1]),
                sh
            )),
            "k_arena"
        );
    }

    fn plan_case() -> (WorkPlan, PagedShape) {
        let sh = shape(9, 3, 64, 16);
        let t0: &[u32] = &[0, 1, 2];
        let t1: &[u32] = &[3];
        let t2: &[u32] = &[4, 5];
        let lv = [crate::reference::attention_paged::Level {
            block_table: t0,
            len: 40,
            members: 0..12,
        }];
        let tables: Vec<&[u32]> = (0..12).map(|i| if i % 2 == 0 { t1 } else { t2 }).collect();
        let lens: Vec<usize> = (0..12).map(|i| if i % 2 == 0 { 16 } else { 17 }).collect();
        let plan = WorkPlan::cascade(&lv, &tables, &lens, &sh, 6, PlanOptions::default()).unwrap();
        (plan, sh)
    }

    #[test]
    fn plan_launch_checks() {
        let (plan, sh) = plan_case();
        let max_block = check_plan(&plan).unwrap();
        assert_eq!(max_block, Some(5));
        let (nh, hs) = (9, 64);
        let arena = 6 * sh.block_elems();
        let states = plan.n_slots * nh;
        let s = ok(attention_partial(
            buf(states * hs),
            buf(states),
            buf(12 * nh * hs),
            buf(arena),
            buf(arena),
            &plan,
            max_block,
            PlanAddrs::default(),
            sh,
        ));
        // 12 sequences of G=3 rows: the level is cut into chunks of 10 and 2.
        assert_eq!(s.grid, (plan.items.len() as u32, 3, 1));
        assert_eq!(s.block, 32 * 8);
        // An arena smaller than the plan's blocks.
        let small = 5 * sh.block_elems();
        assert_eq!(
            bad_arg(attention_partial(
                buf(states * hs),
                buf(states),
                buf(12 * nh * hs),
                buf(small),
                buf(small),
                &plan,
                max_block,
                PlanAddrs::default(),
                sh,
            )),
            "plan"
        );
        // States too small, plan for another shape.
        assert_eq!(
            bad_arg(attention_partial(
                buf(states * hs - 1),
                buf(states),
                buf(12 * nh * hs),
                buf(arena),
                buf(arena),
                &plan,
                max_block,
                PlanAddrs::default(),
                sh,
            )),
            "states_o"
        );
        let other = shape(8, 4, 64, 16);
        assert_eq!(
            bad_arg(attention_merge_states(
                buf(12 * 8 * 64),
                buf(states * hs),
                buf(states),
                &plan,
                PlanAddrs::default(),
                other
            )),
            "plan"
        );
        let s = ok(attention_merge_states(
            buf(12 * nh * hs),
            buf(states * hs),
            buf(states),
            &plan,
            PlanAddrs::default(),
            sh,
        ));
        assert_eq!(s.grid, (9, 12, 1));
        let most = plan
            .merge_offsets
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap();
        assert_eq!(s.block, merge_threads(most));
        assert_eq!(merge_threads(0), 32);
        assert_eq!(merge_threads(4), 32);
        assert_eq!(merge_threads(20), 96);
        assert_eq!(merge_threads(36), 128);
    }

    #[test]
    fn tampered_plans_are_rejected() {
        let (plan, _) = plan_case();
        let mut p = plan.clone();
        p.items[0].seq_count = 11; // 33 rows
        assert!(check_plan(&p).is_err());
        let mut p = plan.clone();
        p.items[0].slot = p.n_slots as u32;
        assert!(check_plan(&p).is_err());
        let mut p = plan.clone();
        p.items[0].pos_end = 1000;
        assert!(check_plan(&p).is_err());
        let mut p = plan.clone();
        p.merge_slots[0] = p.n_slots as u32;
        assert!(check_plan(&p).is_err());
        let mut p = plan.clone();
        p.merge_offsets.swap(1, 2);
        assert!(check_plan(&p).is_err());
        let mut p = plan;
        p.max_item_rows = 4;
        assert!(check_plan(&p).is_err());
    }

    #[test]
    fn swiglu_checks() {
        // Fused gate|up rows of 2I.
        let s = ok(swiglu(
            buf(7 * 1536),
            buf(7 * 3072),
            buf(7 * 3072 - 1536),
            7,
            1536,
            3072,
        ));
        assert_eq!(s.block, 256);
        assert_eq!(
            bad_arg(swiglu(buf(7 * 9), buf(63), buf(63), 7, 9, 9)),
            "shape"
        );
        assert_eq!(bad_arg(swiglu(buf(14), buf(13), buf(14), 7, 2, 2)), "gate");
        let odd = Buf {
            addr: A + 2,
            len: 14,
        };
        assert_eq!(bad_arg(swiglu(buf(14), buf(14), odd, 7, 2, 2)), "up");
    }

    #[test]
    fn head_checks() {
        ok(reward_linear(
            buf(3),
            buf(3 * 576),
            576,
            None,
            buf(576),
            0.5,
        ));
        ok(reward_linear(
            buf(2),
            buf(3 * 576),
            576,
            Some(idx(&[2, 0])),
            buf(576),
            0.0,
        ));
        assert_eq!(
            bad_arg(reward_linear(
                buf(2),
                buf(3 * 576),
                576,
                Some(idx(&[3, 0])),
                buf(576),
                0.0
            )),
            "hidden"
        );
        assert_eq!(
            bad_arg(reward_linear(
                buf(3),
                buf(3 * 576),
                500,
                None,
                buf(576),
                0.0
            )),
            "ld_hidden"
        );
        let s = ok(reward_dense_tanh(
            buf(2 * 576),
            buf(3 * 576),
            576,
            Some(idx(&[1, 2])),
            buf(576 * 576),
            buf(576),
        ));
        assert_eq!(s.grid, (72, 1, 1));
        assert_eq!(
            bad_arg(reward_dense_tanh(
                buf(2 * 577),
                buf(3 * 577),
                577,
                None,
                buf(577 * 577),
                buf(577)
            )),
            "shape"
        );
        ok(reward_out(buf(2), buf(2 * 576), buf(576), 0.1));
        assert_eq!(bad_arg(reward_out(buf(2), buf(576), buf(576), 0.1)), "z");
    }

    #[test]
    fn argmax_and_gemm_checks() {
        let s = ok(argmax(buf(3), buf(3 * 50), 49, 50));
        assert_eq!((s.grid, s.block), ((3, 1, 1), 1024));
        assert_eq!(bad_arg(argmax(buf(3), buf(3 * 50), 51, 50)), "ld");
        assert_eq!(bad_arg(argmax(buf(3), buf(149), 50, 50)), "logits");
        assert_eq!(
            gemm(buf(7 * 5), buf(7 * 3), buf(5 * 3), 7, 5, 3).unwrap(),
            Some((5, 7, 3))
        );
        assert_eq!(gemm(buf(0), buf(0), buf(15), 0, 5, 3).unwrap(), None);
        assert!(matches!(
            gemm(buf(7 * 5), buf(7 * 3), buf(5 * 4), 7, 5, 3),
            Err(CudaError::Length { arg: "w", .. })
        ));
        assert!(gemm(buf(0), buf(0), buf(0), 1, 0, 3).is_err());
    }
    #[test]
    fn fill_uniform_splits_the_seed_and_checks_its_arguments() {
        let s = fill_uniform(buf(1000), 0x1122_3344_5566_7788, 0.5, -1.0)
            .unwrap()
            .unwrap();
        assert_eq!(s.kernel, Kernel::FillUniform);
        assert!(matches!(s.args[1], Arg::U32(1000)));
        assert!(matches!(s.args[2], Arg::U32(0x5566_7788)));
        assert!(matches!(s.args[3], Arg::U32(0x1122_3344)));
        assert!(fill_uniform(buf(0), 1, 1.0, 0.0).unwrap().is_none());
        assert!(fill_uniform(buf(10), 1, f32::NAN, 0.0).is_err());
        assert!(fill_uniform(buf(1 << 32), 1, 1.0, 0.0).is_err());
    }
    #[test]
    fn sample_checks_history_scratch_and_params() {
        let p = SampleParams {
            temperature: 0.5,
            top_k: 0,
            top_p: 0.9,
            min_p: 0.0,
            repetition_penalty: 1.01,
            seed: 0x0000_0001_0000_0002,
        };
        let offs = [0u32, 2, 2, 3];
        let hist = [5u32, 5, 99];
        let ctr = [0u32; 12];
        let run = |p: SampleParams, offs: &[u32], hist: &[u32], seen: usize, v: usize| {
            sample(
                buf(3),
                buf(3),
                buf(3 * 128),
                v,
                128,
                idx(offs),
                idx(hist),
                buf(seen),
                idx(&ctr),
                p,
            )
        };
        let s = run(p, &offs, &hist, 3 * 4, 100).unwrap().unwrap();
        assert_eq!(s.kernel, Kernel::Sample);
        assert_eq!(s.block, 1024);
        assert!(matches!(s.args[8], Arg::U32(4)));
        assert!(matches!(s.args[10], Arg::U32(2)));
        assert!(matches!(s.args[11], Arg::U32(1)));
        assert!(matches!(s.args[14], Arg::F32(t) if t == (1.0f64 - 0.9f32 as f64) as f32));
        // A history id >= V, a broken CSR, the wrong scratch size, bad parameters.
        assert!(matches!(
            run(p, &offs, &hist, 3 * 4, 99),
            Err(CudaError::TokenOutOfRange { position: 2, .. })
        ));
        assert!(run(p, &[0, 2, 1, 3], &hist, 12, 100).is_err());
        assert!(run(p, &[0, 2, 2, 2], &hist, 12, 100).is_err());
        assert!(run(p, &offs, &hist, 11, 100).is_err());
        for bad in [
            SampleParams {
                temperature: -1.0,
                ..p
            },
            SampleParams { top_p: 0.0, ..p },
            SampleParams {
                min_p: f32::NAN,
                ..p
            },
            SampleParams {
                repetition_penalty: 0.0,
                ..p
            },
        ] {
            assert!(run(bad, &offs, &hist, 12, 100).is_err(), "{bad:?}");
        }
        assert_eq!(SampleParams { top_p: 1.0, ..p }.top_p_threshold(), -1.0);
        // V above ld.
        assert!(run(p, &offs, &hist, 3 * 5, 129).is_err());
    }
}
