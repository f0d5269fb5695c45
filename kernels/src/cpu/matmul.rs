//! Fast linear layer (same contract as `reference::matmul::matmul_forward`): work split
//! along the output dimension across threads.
//!
//! SIMD paths (float weights: `matmul/lanes.rs`, one source for AVX2 and AVX-512): a
//! register-tiled kernel computes an MR x NR tile of outputs (MR input rows times NR = 3
//! weight rows; MR 4 with AVX2, 8 with AVX-512) as MR*NR vector dot products sharing their
//! loads: per 8 (16) input channels it converts NR weight vectors in registers
//! (bf16/f16/f32, never copied to an f32 buffer) and streams MR input vectors through them
//! with MR*NR FMAs. Input rows are
//! processed in panels small enough to stay in L2 while a thread sweeps its output columns,
//! so each weight tile is read from memory once per panel and reused from L1 by every row
//! block of the panel. One input row (decode) reads the weight rows one after another
//! as a single prefetched stream per thread, each output summed in the tile's order
//! (a row gives the same bits alone and in a batch). Int8 weights are widened and
//! multiplied by their group's scale (exact in f32) once per tile, two accumulators per
//! output (`tile_q8_512` on AVX-512, a group per vector; `tile_q8` on AVX2), in 4 x 2
//! tiles, or one row after another for decode. The scalar path converts one weight row at a time and dots it with
//! every input row.

use half::{bf16, f16};

use super::dispatch::{Isa, current, num_threads};
use super::pool::{self, SendPtr};
use super::rowwise::{RopeTable, rmsnorm_rows, rope_by_table, rotate_heads, swiglu_slice};
use crate::error::KernelError;
use crate::reference::matmul::check_shapes;
use crate::weights::{Q8Slice, Weights};

/// out: (B, OC); inp: (B, C); weight: (OC, C); bias: (OC).
pub fn matmul_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: Weights<'_>,
    bias: Option<&[f32]>,
    in_features: usize,
    out_features: usize,
) -> Result<(), KernelError> {
    check_shapes(
        "matmul_forward",
        out,
        inp,
        &weight,
        bias,
        in_features,
        out_features,
    )?;
    let rows = inp.len() / in_features;
    if rows == 0 {
        return Ok(());
    }
    let isa = current();
    let call = next_call();
    // Each block writes its own columns of every row through a raw pointer (disjoint
    // index sets).
    let (threads, per) = split_plan(rows, in_features, out_features, isa);
    let bf16 = matches!(weight, Weights::BF16(_));
    share_input(inp, in_features, bf16, isa, call, threads);
    let blocks = out_features.div_ceil(per);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let out_len = out.len();
    pool::global().run_ranges(threads, blocks, &|blk| {
        let start = blk * per;
        let end = ((blk + 1) * per).min(out_features);
        // SAFETY: every block writes only columns start..end of each output row, the
        // blocks are disjoint, and `out` outlives the job.
        let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get(), out_len) };
        compute(
            out,
            inp,
            weight,
            bias,
            in_features,
            out_features,
            start..end,
            isa,
            call,
        );
    });
    Ok(())
}

/// The 16-lane (AVX-512) matmul kernels run over pairs of AVX2 registers on the calling
/// thread, for columns `cols` of `out` (the rest untouched): tests check the 16-lane
/// kernels' tiling, tails and summation order on machines without AVX-512 through this.
/// `Ok(false)` (nothing written) where the CPU lacks AVX2 or for int8 weights.
#[doc(hidden)]
pub fn matmul_forward_wide_emulated(
    out: &mut [f32],
    inp: &[f32],
    weight: Weights<'_>,
    bias: Option<&[f32]>,
    in_features: usize,
    out_features: usize,
    cols: std::ops::Range<usize>,
) -> Result<bool, KernelError> {
    const OP: &str = "matmul_forward_wide_emulated";
    if !check_emulated(OP, out, inp, weight, bias, in_features, out_features, &cols)? {
        return Ok(true);
    }
    Ok(lanes::emulated(
        out,
        inp,
        weight,
        bias,
        in_features,
        out_features,
        cols,
    ))
}

/// The shape and column checks of the emulated entry points (typed errors); false when
/// there is no input row (nothing to run).
#[allow(clippy::too_many_arguments)]
fn check_emulated(
    op: &'static str,
    out: &[f32],
    inp: &[f32],
    weight: Weights<'_>,
    bias: Option<&[f32]>,
    in_features: usize,
    out_features: usize,
    cols: &std::ops::Range<usize>,
) -> Result<bool, KernelError> {
    check_shapes(op, out, inp, &weight, bias, in_features, out_features)?;
    if cols.start > cols.end || cols.end > out_features {
        return Err(KernelError::Invalid {
            op,
            arg: "cols",
            reason: format!("{cols:?} is not within 0..{out_features}"),
        });
    }
    Ok(!inp.is_empty())
}

/// Whether the AVX-512 kernels agree with the reference (see `lanes::self_check`).
#[cfg(target_arch = "x86_64")]
pub(super) fn wide_self_check() -> bool {
    lanes::self_check()
}

/// The bf16-compute kernels ([`dot`]) run over pairs of AVX2 registers on the calling
/// thread for columns `cols` of `out` (the rest untouched), the input rounded to bf16
/// first: tests check their tiling, tails and summation order through this on machines
/// without AVX512_BF16. `Ok(false)` (nothing written) where the CPU lacks AVX2.
#[doc(hidden)]
pub fn matmul_forward_bf16_emulated(
    out: &mut [f32],
    inp: &[f32],
    weight: &[bf16],
    bias: Option<&[f32]>,
    in_features: usize,
    out_features: usize,
    cols: std::ops::Range<usize>,
) -> Result<bool, KernelError> {
    const OP: &str = "matmul_forward_bf16_emulated";
    let w = Weights::BF16(weight);
    if !check_emulated(OP, out, inp, w, bias, in_features, out_features, &cols)? {
        return Ok(true);
    }
    Ok(dot::emulated(
        out,
        inp,
        weight,
        bias,
        in_features,
        out_features,
        cols,
        next_call(),
    ))
}

/// Whether the AVX512_BF16 kernels agree with the reference (see `dot::self_check`).
#[cfg(target_arch = "x86_64")]
pub(super) fn bf16_self_check() -> bool {
    dot::self_check()
}

/// The AMX tile kernels ([`amx`]) run with the tile registers emulated in memory on the
/// calling thread, for columns `cols` of `out` (the rest untouched), the input rounded to
/// bf16 first: tests check their blocking, padding, tails and write-back through this on
/// machines without AMX (any machine: the emulation is plain Rust).
#[doc(hidden)]
pub fn matmul_forward_amx_emulated(
    out: &mut [f32],
    inp: &[f32],
    weight: &[bf16],
    bias: Option<&[f32]>,
    in_features: usize,
    out_features: usize,
    cols: std::ops::Range<usize>,
) -> Result<(), KernelError> {
    const OP: &str = "matmul_forward_amx_emulated";
    let w = Weights::BF16(weight);
    if check_emulated(OP, out, inp, w, bias, in_features, out_features, &cols)? {
        let (c, oc, call) = (in_features, out_features, next_call());
        // SAFETY: the emulation needs no CPU feature; shapes and columns checked.
        unsafe { amx::gemm(false, out, inp, weight, bias, c, oc, cols, call) };
    }
    Ok(())
}

/// The AMX path's input packing (rows x c bf16 bits into B tiles, see `amx::pack`), by
/// 16 x 16 transposes or (`transposes` false) one channel pair at a time: for the
/// benchmark that compares the two. `c` must be at least 1.
#[doc(hidden)]
pub fn amx_pack_input(dst: &mut Vec<u32>, xb: &[u16], c: usize, transposes: bool) {
    amx::pack_with(dst, xb, c.max(1), transposes);
}

/// Whether the AMX kernels agree with the reference (see `amx::self_check`).
#[cfg(target_arch = "x86_64")]
pub(super) fn amx_self_check() -> bool {
    amx::self_check()
}

mod amx;
mod dot;
mod lanes;

/// One linear layer of a fused [`matmul_forward_many`] call:
/// out (B, OC) = inp (B, C) . weight (OC, C)^T + bias (OC).
pub struct Linear<'a> {
    pub out: &'a mut [f32],
    pub weight: Weights<'a>,
    pub bias: Option<&'a [f32]>,
    pub out_features: usize,
}

/// Per fused layer: output pointer and length, weights, bias, OC, first item.
type FusedMeta<'a> = (
    SendPtr<f32>,
    usize,
    Option<Weights<'a>>,
    Option<&'a [f32]>,
    usize,
    usize,
);

/// Layers a fused call takes at most.
pub const MAX_FUSED: usize = 4;

/// RMSNorm applied to a matmul's input as the call takes it in: out = W . rmsnorm(inp)
/// with no normalised copy written by a separate op. Each thread of the call normalises
/// the rows into its own buffer at its first work item (rows x C of redundant work per
/// thread, against a pass over a shared buffer and one more fork/join), with the kernel
/// [`super::rmsnorm_forward`] runs, so the bits are those of that op then the matmul.
#[derive(Clone, Copy)]
pub struct NormIn<'a> {
    /// (C)
    pub weight: Weights<'a>,
    pub eps: f32,
}

/// RoPE applied in the epilogue of a fused call: the outputs of its first `layers`
/// layers (Q, then K) are rotated head by head as each block of output columns is done,
/// row r by the angles of the table's row r. Blocks are cut at whole heads, so the bits
/// are those of the matmul then [`super::rope_forward`].
#[derive(Clone, Copy)]
pub struct RopeOut<'a> {
    pub table: &'a RopeTable,
    pub layers: usize,
}

/// What a fused call applies around its matmuls (nothing by default).
#[derive(Clone, Copy, Default)]
pub struct Fusion<'a> {
    pub norm: Option<NormIn<'a>>,
    pub rope: Option<RopeOut<'a>>,
}

/// Tags each matmul call with a number, so a thread knows when its normalised (or
/// bf16-rounded) input buffer belongs to an earlier call.
static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A fresh call tag (never 0).
pub(super) fn next_call() -> u64 {
    CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// On the AMX path (or its emulation), a call of many rows against bf16 weights rounds
/// and packs its (unnormalised) input once for all threads ([`amx::share_packed`]); on
/// the AVX-512 and AVX2 paths it pairs it ([`lanes::share_paired`]); its work items then
/// find that copy. Nothing elsewhere.
fn share_input(inp: &[f32], c: usize, bf16: bool, isa: Isa, call: u64, threads: usize) {
    let emulated = super::dispatch::emulated();
    let amx = isa >= Isa::Amx || emulated == Some(Isa::Amx);
    let rows = inp.len() / c;
    if amx && bf16 && rows >= amx::SHARE_ROWS {
        amx::share_packed(inp, c, call, threads);
    }
    // The f32-compute kernels pair a bf16 call's input (`lanes::pair_rows`).
    if let Some(l) = lanes::paired_lanes(isa)
        && emulated.is_none()
        && bf16
        && rows >= lanes::SHARE_ROWS
    {
        lanes::share_paired(inp, c, l, call, threads);
    }
}

thread_local! {
    /// (call number, this thread's normalised rows of that call).
    static NORMED: std::cell::RefCell<(u64, Vec<f32>)> =
        const { std::cell::RefCell::new((0, Vec::new())) };
}

/// A fused call's input as one work item sees it: `inp` itself, or (with a norm) this
/// thread's normalised copy for call `call`, made at its first item.
fn with_input<R>(
    inp: &[f32],
    norm: Option<NormIn<'_>>,
    call: u64,
    isa: Isa,
    f: impl FnOnce(&[f32]) -> R,
) -> R {
    let Some(n) = norm else { return f(inp) };
    NORMED.with_borrow_mut(|(tag, buf)| {
        if *tag != call {
            if buf.len() < inp.len() {
                buf.resize(inp.len(), 0.0);
            }
            let r = rmsnorm_rows(&mut buf[..inp.len()], inp, n.weight, n.eps, isa);
            debug_assert!(r.is_ok(), "with_input: the norm's shapes are checked first");
            *tag = call;
        }
        f(&buf[..inp.len()])
    })
}

/// From this many input rows (prefill chunks), a fused call runs its norm, matmuls and
/// rotations as separate pool jobs (same bits): every thread normalising every row, and
/// column blocks cut at whole heads (a one-column tile per block), cost more there than
/// the fork/joins saved. Measured with `cargo bench --bench kernels -- qkv_rows`.
const FUSE_MAX_ROWS: usize = 64;

/// `f(rmsnorm(inp))` through [`super::rmsnorm_forward`] into the calling thread's
/// [`NORMED`] buffer (tagged as no call's, since `f` runs unfused calls that never read
/// it), or `f(inp)` without a norm.
fn staged(
    inp: &[f32],
    norm: Option<NormIn<'_>>,
    f: impl FnOnce(&[f32]) -> Result<(), KernelError>,
) -> Result<(), KernelError> {
    let Some(n) = norm else { return f(inp) };
    NORMED.with_borrow_mut(|(tag, buf)| {
        *tag = 0;
        if buf.len() < inp.len() {
            buf.resize(inp.len(), 0.0);
        }
        let x = &mut buf[..inp.len()];
        super::rmsnorm_forward(x, inp, n.weight, n.eps)?;
        f(x)
    })
}

/// Typed errors for a norm whose weight does not match the input channels.
fn check_norm(op: &'static str, norm: Option<NormIn<'_>>, c: usize) -> Result<(), KernelError> {
    match norm {
        Some(n) if n.weight.len() != c => Err(KernelError::Invalid {
            op,
            arg: "norm.weight",
            reason: format!("{} elements for {c} input channels", n.weight.len()),
        }),
        _ => Ok(()),
    }
}

/// Up to [`MAX_FUSED`] linear layers over the same input (Q, K and V; gate and up) in ONE
/// pool job: the column blocks of all of them are claimed from one counter, so a decode
/// step pays one fork/join instead of one per layer. Same results as
/// [`matmul_forward`] per layer.
pub fn matmul_forward_many(
    layers: &mut [Linear<'_>],
    inp: &[f32],
    in_features: usize,
) -> Result<(), KernelError> {
    matmul_forward_many_fused(layers, inp, in_features, Fusion::default())
}

/// [`matmul_forward_many`] with the layer's RMSNorm taken into its input pass and RoPE
/// into its epilogue ([`Fusion`]): the attention block's norm, Q/K/V projections and
/// rotations in one pool job, bit for bit [`super::rmsnorm_forward`], the matmuls and
/// [`super::rope_forward`] run one after another.
pub fn matmul_forward_many_fused(
    layers: &mut [Linear<'_>],
    inp: &[f32],
    in_features: usize,
    fusion: Fusion<'_>,
) -> Result<(), KernelError> {
    const OP: &str = "matmul_forward_many";
    if layers.len() > MAX_FUSED {
        return Err(KernelError::Invalid {
            op: OP,
            arg: "layers",
            reason: format!("{} layers; at most {MAX_FUSED}", layers.len()),
        });
    }
    for l in layers.iter() {
        check_shapes(
            OP,
            l.out,
            inp,
            &l.weight,
            l.bias,
            in_features,
            l.out_features,
        )?;
    }
    check_norm(OP, fusion.norm, in_features)?;
    let rows = inp.len() / in_features;
    let head_dim = match fusion.rope {
        Some(rope) => check_rope(OP, rope, layers, rows)?,
        None => 0,
    };
    if rows == 0 || layers.is_empty() {
        return Ok(());
    }
    if rows >= FUSE_MAX_ROWS && (fusion.norm.is_some() || fusion.rope.is_some()) {
        return staged(inp, fusion.norm, |x| {
            matmul_forward_many_fused(layers, x, in_features, Fusion::default())?;
            if let Some(rope) = fusion.rope {
                for l in layers[..rope.layers].iter_mut() {
                    rope_by_table(l.out, l.out_features, rope.table)?;
                }
            }
            Ok(())
        });
    }
    let isa = current();
    let total_oc: usize = layers.iter().map(|l| l.out_features).sum();
    let (threads, mut per) = split_plan(rows, in_features, total_oc, isa);
    if head_dim > 0 {
        // Blocks of whole heads, so each block's epilogue rotates complete heads.
        per = per.next_multiple_of(head_dim);
    }
    let call = next_call();
    if fusion.norm.is_none() {
        let bf16 = layers.iter().any(|l| matches!(l.weight, Weights::BF16(_)));
        share_input(inp, in_features, bf16, isa, call, threads);
    }
    let mut meta: [FusedMeta<'_>; MAX_FUSED] =
        [(SendPtr(std::ptr::null_mut()), 0, None, None, 0, 0); MAX_FUSED];
    let mut items = 0;
    for (m, l) in meta.iter_mut().zip(layers.iter_mut()) {
        *m = (
            SendPtr(l.out.as_mut_ptr()),
            l.out.len(),
            Some(l.weight),
            l.bias,
            l.out_features,
            items,
        );
        items += l.out_features.div_ceil(per);
    }
    let n = layers.len();
    pool::global().run_ranges(threads, items, &|it| {
        let li = (0..n).rev().find(|&i| meta[i].5 <= it).unwrap_or(0);
        let (ptr, len, w, bias, oc, first) = meta[li];
        let Some(weight) = w else { return };
        let blk = it - first;
        let start = blk * per;
        let end = ((blk + 1) * per).min(oc);
        // SAFETY: each item writes only columns start..end of its own layer's output,
        // items are disjoint, and every output outlives the job.
        let out = unsafe { std::slice::from_raw_parts_mut(ptr.get(), len) };
        with_input(inp, fusion.norm, call, isa, |x| {
            compute(out, x, weight, bias, in_features, oc, start..end, isa, call)
        });
        if let Some(rope) = fusion.rope.filter(|r| li < r.layers) {
            // start and end are multiples of the head dim (checked and cut above).
            for r in 0..rows {
                let (sin, cos) = rope.table.row(r);
                rotate_heads(&mut out[r * oc + start..r * oc + end], sin, cos);
            }
        }
    });
    Ok(())
}

/// Typed errors for a RoPE epilogue that does not fit the call; its head dim.
fn check_rope(
    op: &'static str,
    rope: RopeOut<'_>,
    layers: &[Linear<'_>],
    rows: usize,
) -> Result<usize, KernelError> {
    let hd = rope.table.head_dim();
    let bad = |arg: &'static str, reason: String| KernelError::Invalid { op, arg, reason };
    if rope.layers > layers.len() {
        return Err(bad(
            "rope.layers",
            format!("{} rotated layers of {}", rope.layers, layers.len()),
        ));
    }
    if hd == 0 {
        return Err(bad("rope.table", "empty (never filled)".into()));
    }
    if rope.table.rows() != rows {
        return Err(bad(
            "rope.table",
            format!("{} positions for {rows} input rows", rope.table.rows()),
        ));
    }
    if let Some(l) = layers[..rope.layers]
        .iter()
        .find(|l| !l.out_features.is_multiple_of(hd))
    {
        return Err(bad(
            "rope.layers",
            format!(
                "{} output features are not whole heads of {hd}",
                l.out_features
            ),
        ));
    }
    Ok(hd)
}

/// The MLP's gate and up projections and SwiGLU in ONE pool job: act (B, I) =
/// silu(n . gate^T + gate_bias) * (n . up^T + up_bias), n = inp (B, C), or with `norm`
/// rmsnorm(inp) taken in by the input pass ([`NormIn`]). Each item computes
/// one column block of gate and up for every row into per-thread buffers and writes that
/// block of `act` (the gate and up outputs never reach memory as whole matrices). The
/// bits are those of [`matmul_forward_many`] then [`super::swiglu_forward`]: every
/// output is the same dot product, and every element of `act` takes the same exp path
/// (see `swiglu_slice`).
#[allow(clippy::too_many_arguments)]
pub fn matmul_swiglu(
    act: &mut [f32],
    inp: &[f32],
    gate: Weights<'_>,
    gate_bias: Option<&[f32]>,
    up: Weights<'_>,
    up_bias: Option<&[f32]>,
    in_features: usize,
    out_features: usize,
    norm: Option<NormIn<'_>>,
) -> Result<(), KernelError> {
    const OP: &str = "matmul_swiglu";
    check_shapes(OP, act, inp, &gate, gate_bias, in_features, out_features)?;
    check_shapes(OP, act, inp, &up, up_bias, in_features, out_features)?;
    check_norm(OP, norm, in_features)?;
    let rows = inp.len() / in_features;
    if rows == 0 {
        return Ok(());
    }
    if rows >= FUSE_MAX_ROWS && norm.is_some() {
        return staged(inp, norm, |x| {
            matmul_swiglu(
                act,
                x,
                gate,
                gate_bias,
                up,
                up_bias,
                in_features,
                out_features,
                None,
            )
        });
    }
    let isa = current();
    let call = next_call();
    let (c, oc) = (in_features, out_features);
    // Blocks as matmul_forward_many's for the two layers together.
    let (threads, per) = split_plan(rows, c, 2 * oc, isa);
    if norm.is_none() {
        let bf16 = matches!(gate, Weights::BF16(_)) || matches!(up, Weights::BF16(_));
        share_input(inp, c, bf16, isa, call, threads);
    }
    let blocks = oc.div_ceil(per);
    let total = act.len();
    let act_ptr = SendPtr(act.as_mut_ptr());
    pool::global().run_ranges(threads, blocks, &|blk| {
        let (s, e) = (blk * per, ((blk + 1) * per).min(oc));
        let n = e - s;
        GATE_UP.with_borrow_mut(|(g, u)| {
            if g.len() < rows * n {
                g.resize(rows * n, 0.0);
                u.resize(rows * n, 0.0);
            }
            let (g, u) = (&mut g[..rows * n], &mut u[..rows * n]);
            with_input(inp, norm, call, isa, |x| {
                for (buf, w, b) in [(&mut *g, gate, gate_bias), (&mut *u, up, up_bias)] {
                    let b = b.map(|b| &b[s..e]);
                    compute(buf, x, w.slice(s * c, n * c), b, c, n, 0..n, isa, call);
                }
            });
            for r in 0..rows {
                let at = r * oc + s;
                // SAFETY: item blk alone writes columns s..e of every row of `act`, which
                // outlives the job.
                let out = unsafe { std::slice::from_raw_parts_mut(act_ptr.get().add(at), n) };
                swiglu_slice(out, &g[r * n..][..n], &u[r * n..][..n], at, total, isa);
            }
        });
    });
    Ok(())
}

thread_local! {
    /// Gate and up outputs of one [`matmul_swiglu`] block, per thread.
    static GATE_UP: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Threads and columns per block for `rows` x `c` inputs against `total_oc` output
/// columns (one layer or several fused): one thread for tiny calls; blocks claimed
/// dynamically, a multiple of 12 columns (whole 3-wide tiles and 4-wide GEMV groups; 48
/// on the AMX path, whole 16-row tiles too) and small enough for about eight per thread
/// (two on the AMX path with fewer than 16 rows).
fn split_plan(rows: usize, c: usize, total_oc: usize, isa: Isa) -> (usize, usize) {
    let threads = if rows * c * total_oc < 1 << 15 {
        1
    } else {
        num_threads().clamp(1, total_oc.div_ceil(16).max(1))
    };
    // (Whole 16-row tiles too on the AMX path: 48.)
    let unit = if isa >= Isa::Amx { 48 } else { 12 };
    // Under one tile of rows (decode, a K-critique step) a call streams its weights, and
    // each thread runs its lane of blocks in order (`run_ranges`), so fewer, longer
    // blocks mean fewer restarted streams: one per thread on the AMX path (whose
    // blocks spread their 32 tile rows over the block, one stream each), two elsewhere
    // (a 2-core Xeon, the model's shapes: AMX 29.3 GB/s against 26.5 with two, AVX512_BF16
    // 34.0 against 33.1 with eight; docs/benchmarks.md).
    let blocks = match (isa >= Isa::Amx, rows < 16) {
        (true, true) => 1,
        (false, true) => 2,
        _ => 8,
    };
    let per = total_oc
        .div_ceil(threads * blocks)
        .next_multiple_of(unit)
        .clamp(2 * unit, 768);
    (threads, per)
}

/// out (rows, cols.len()) = inp (rows, c) . weight(cols)^T on the calling thread, every
/// value computed exactly as [`matmul_forward`] computes that column (each output is one
/// dot product whose order does not depend on its neighbours).
pub(super) fn block_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: Weights<'_>,
    c: usize,
    cols: std::ops::Range<usize>,
    isa: Isa,
    call: u64,
) {
    let n = cols.len();
    let w = weight.slice(cols.start * c, n * c);
    compute(out, inp, w, None, c, n, 0..n, isa, call);
}

thread_local! {
    /// One weight row converted to f32, per thread; grows once to the widest C seen.
    static WROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[allow(clippy::too_many_arguments)]
fn compute(
    out: &mut [f32],
    inp: &[f32],
    weight: Weights<'_>,
    bias: Option<&[f32]>,
    in_features: usize,
    out_features: usize,
    cols: std::ops::Range<usize>,
    isa: Isa,
    call: u64,
) {
    let rows = inp.len() / in_features;
    if let Weights::BF16(w) = weight
        && let Some(e) = super::dispatch::emulated()
    {
        let (c, oc) = (in_features, out_features);
        if e == Isa::Amx {
            // SAFETY: the emulation needs no CPU feature; shapes checked by the callers.
            unsafe { amx::gemm(false, out, inp, w, bias, c, oc, cols, call) };
        } else {
            // (`emulate` takes the AVX512_BF16 emulation only where AVX2 is detected.)
            let ran = dot::emulated(out, inp, w, bias, c, oc, cols, call);
            debug_assert!(ran, "the AVX512_BF16 emulation runs where emulate took it");
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Amx
        && let Weights::BF16(w) = weight
    {
        let (c, oc) = (in_features, out_features);
        // SAFETY: the Amx path is only chosen when AMX-TILE and AMX-BF16 are detected, the
        // OS granted the tile state and the kernels passed their self-check; shapes
        // checked by `check_shapes`, `cols` within 0..out_features.
        unsafe { amx::gemm(true, out, inp, w, bias, c, oc, cols, call) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512Bf16
        && let Weights::BF16(w) = weight
    {
        // SAFETY: the Avx512Bf16 path is only chosen when AVX-512F, AVX512_BF16, AVX2,
        // FMA and F16C are detected (and its kernels passed their self-check); shapes
        // checked by `check_shapes`, `cols` within 0..out_features.
        unsafe { dot::gemm(out, inp, w, bias, in_features, out_features, cols, call) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the Avx512 path is only chosen when AVX-512F, AVX2, FMA and F16C are
    // detected; the shapes were checked by `check_shapes` and `cols` lies within
    // 0..out_features. (Int8 weights return false and take `tiled`'s kernels.)
    if isa >= Isa::Avx512
        && unsafe {
            lanes::avx512::gemm(
                out,
                inp,
                weight,
                bias,
                in_features,
                out_features,
                cols.clone(),
                call,
            )
        }
    {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // Int8 weights: the 16-lane kernels where AVX-512 is, else the 8-lane GEMV for one
        // row (chosen on Zen 3) and tiles for more.
        let q8 = if isa >= Isa::Avx512 {
            tiled::Q8Kernels::Avx512
        } else {
            tiled::Q8Kernels::Avx2
        };
        // SAFETY: the Avx2 path is only chosen when AVX2, FMA and F16C are detected; the
        // shapes were checked by `check_shapes` and `cols` lies within 0..out_features.
        unsafe {
            tiled::gemm(
                out,
                inp,
                weight,
                bias,
                in_features,
                out_features,
                cols.clone(),
                q8,
                call,
            )
        };
        if let Weights::Q8(w) = weight
            && let Some(keep) = w.keep()
        {
            add_kept(out, inp, keep, in_features, out_features, cols, isa);
        }
        return;
    }
    // The scalar path: one weight row converted into this thread's buffer (grown once to
    // the widest C) and dotted with every input row.
    WROW.with_borrow_mut(|wrow| {
        if wrow.len() < in_features {
            wrow.resize(in_features, 0.0);
        }
        let wrow = &mut wrow[..in_features];
        for o in cols {
            let w = weight.slice(o * in_features, in_features);
            let b = bias.map_or(0.0, |b| b[o]);
            // (Q8 rows go through the converted row even alone, so a row sums in the same
            // order whatever the number of rows.)
            if rows == 1 && !matches!(w, Weights::Q8(_)) {
                out[o] = dot_weights(&inp[..in_features], w, isa) + b;
                continue;
            }
            convert_row(w, wrow, isa);
            for r in 0..rows {
                let x = &inp[r * in_features..][..in_features];
                out[r * out_features + o] = dot_f32(x, wrow, isa) + b;
            }
        }
    });
}

fn convert_row(w: Weights<'_>, dst: &mut [f32], isa: Isa) {
    match w {
        Weights::F32(w) => dst.copy_from_slice(w),
        Weights::BF16(w) => {
            for (d, s) in dst.iter_mut().zip(w) {
                *d = s.to_f32();
            }
        }
        Weights::Q8(q) => {
            for (i, d) in dst.iter_mut().enumerate() {
                *d = q.get(i);
            }
        }
        Weights::F16(w) => {
            #[cfg(target_arch = "x86_64")]
            if isa >= Isa::Avx2 {
                // SAFETY: the Avx2 path is only chosen when AVX2, FMA and F16C are detected.
                unsafe { avx2::convert_f16(w, dst) };
                return;
            }
            let _ = isa;
            for (d, s) in dst.iter_mut().zip(w) {
                *d = s.to_f32();
            }
        }
    }
}

fn dot_weights(x: &[f32], w: Weights<'_>, isa: Isa) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: the Avx2 path is only chosen when AVX2, FMA and F16C are detected.
        return unsafe {
            match w {
                Weights::F32(w) => avx2::dot_f32(x, w),
                Weights::BF16(w) => avx2::dot_bf16(x, w),
                Weights::F16(w) => avx2::dot_f16(x, w),
                Weights::Q8(w) => q8_dot(x, w),
            }
        };
    }
    let _ = isa;
    match w {
        Weights::F32(w) => scalar_dot(x, w, |v| *v),
        Weights::BF16(w) => scalar_dot(x, w, |v: &bf16| v.to_f32()),
        Weights::F16(w) => scalar_dot(x, w, |v: &f16| v.to_f32()),
        Weights::Q8(w) => q8_dot(x, w),
    }
}

/// Dot product with one row of Q8 weights, element by element ([`Q8Slice::get`]: the
/// group's scale, plus a kept column's value).
fn q8_dot(x: &[f32], w: Q8Slice<'_>) -> f32 {
    x.iter().enumerate().map(|(i, &v)| v * w.get(i)).sum()
}

/// Add the kept columns' part ([`crate::weights::Q8Keep`]) to outputs `cols` of every
/// row, after the int8 kernels (which see zeros there): per run of 16 rows of the
/// matrix (one contiguous stream), the kept values widened once, then for each input row
/// `x[cols[j]] * column j` summed over j in order (a multiply and an add, never fused,
/// so every path and any split of the rows or outputs gives the same bits).
fn add_kept(
    out: &mut [f32],
    inp: &[f32],
    keep: crate::weights::Q8Keep<'_>,
    c: usize,
    oc: usize,
    cols: std::ops::Range<usize>,
    isa: Isa,
) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512 {
        // SAFETY: AVX-512F detected on this path.
        return unsafe { add_kept_avx512(out, inp, keep, c, oc, cols) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: AVX2 detected on this path.
        return unsafe { add_kept_avx2(out, inp, keep, c, oc, cols) };
    }
    let _ = isa;
    add_kept_body(out, inp, keep, c, oc, cols)
}

target_builds!(
    add_kept_body(
        out: &mut [f32],
        inp: &[f32],
        keep: crate::weights::Q8Keep<'_>,
        c: usize,
        oc: usize,
        cols: std::ops::Range<usize>,
    );
    add_kept_avx512 = "avx512f",
    add_kept_avx2 = "avx2",
);

/// [`add_kept`]'s body, compiled into each build.
#[inline(always)]
fn add_kept_body(
    out: &mut [f32],
    inp: &[f32],
    keep: crate::weights::Q8Keep<'_>,
    c: usize,
    oc: usize,
    cols: std::ops::Range<usize>,
) {
    use crate::weights::{Q8_KEEP_MAX, Q8_KEEP_RUN as RUN};
    let kc = keep.cols();
    let n = kc.len().min(Q8_KEEP_MAX);
    let mut v = [[0f32; RUN]; Q8_KEEP_MAX];
    // Outputs o of this slice are rows first + o of the matrix, whose runs are aligned.
    let first = keep.first();
    let mut o = cols.start;
    while o < cols.end {
        let (run, t0) = ((first + o) / RUN, (first + o) % RUN);
        let m = (RUN - t0).min(cols.end - o);
        for (vj, src) in v[..n].iter_mut().zip(keep.run(run).chunks_exact(RUN)) {
            for (d, s) in vj.iter_mut().zip(src) {
                *d = f32::from_bits((s.to_bits() as u32) << 16);
            }
        }
        for (r, x) in inp.chunks_exact(c).enumerate() {
            let mut acc = [0f32; RUN];
            for (vj, &k) in v[..n].iter().zip(kc) {
                let xj = x[k as usize];
                for (a, w) in acc.iter_mut().zip(vj) {
                    *a += xj * w;
                }
            }
            for (d, a) in out[r * oc + o..][..m].iter_mut().zip(&acc[t0..]) {
                *d += a;
            }
        }
        o += m;
    }
}

fn dot_f32(x: &[f32], w: &[f32], isa: Isa) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: the Avx2 path is only chosen when AVX2, FMA and F16C are detected.
        return unsafe { avx2::dot_f32(x, w) };
    }
    let _ = isa;
    scalar_dot(x, w, |v| *v)
}

/// Eight independent accumulators so LLVM can vectorise without reassociating.
#[inline]
fn scalar_dot<T>(x: &[f32], w: &[T], conv: impl Fn(&T) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let n8 = x.len() / 8 * 8;
    for (xc, wc) in x[..n8].chunks_exact(8).zip(w[..n8].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += xc[i] * conv(&wc[i]);
        }
    }
    let mut tail = 0.0;
    for i in n8..x.len() {
        tail += x[i] * conv(&w[i]);
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    use crate::cpu::simd::avx2::{load_bf16x8, load_f16x8};

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(v, 1);
        let lo = _mm256_castps256_ps128(v);
        let s = _mm_add_ps(hi, lo);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// SAFETY: caller guarantees AVX2+FMA and x.len() == w.len().
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(x: &[f32], w: &[f32]) -> f32 {
        let n = x.len().min(w.len());
        let n32 = n / 32 * 32;
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut a0 = _mm256_setzero_ps();
        let mut a1 = _mm256_setzero_ps();
        let mut a2 = _mm256_setzero_ps();
        let mut a3 = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: i + 32 <= n for every load in the loop.
        unsafe {
            while i < n32 {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(wp.add(i)), a0);
                a1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(xp.add(i + 8)),
                    _mm256_loadu_ps(wp.add(i + 8)),
                    a1,
                );
                a2 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(xp.add(i + 16)),
                    _mm256_loadu_ps(wp.add(i + 16)),
                    a2,
                );
                a3 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(xp.add(i + 24)),
                    _mm256_loadu_ps(wp.add(i + 24)),
                    a3,
                );
                i += 32;
            }
            let mut s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            while i < n {
                s += *xp.add(i) * *wp.add(i);
                i += 1;
            }
            s
        }
    }

    /// SAFETY: caller guarantees AVX2+FMA and x.len() == w.len().
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16(x: &[f32], w: &[bf16]) -> f32 {
        let n = x.len().min(w.len());
        let n16 = n / 16 * 16;
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut a0 = _mm256_setzero_ps();
        let mut a1 = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: i + 16 <= n for every load in the loop.
        unsafe {
            while i < n16 {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), load_bf16x8(wp.add(i)), a0);
                a1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(xp.add(i + 8)),
                    load_bf16x8(wp.add(i + 8)),
                    a1,
                );
                i += 16;
            }
            let mut s = hsum(_mm256_add_ps(a0, a1));
            while i < n {
                s += *xp.add(i) * (*wp.add(i)).to_f32();
                i += 1;
            }
            s
        }
    }

    /// SAFETY: caller guarantees AVX2+FMA+F16C and x.len() == w.len().
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(x: &[f32], w: &[f16]) -> f32 {
        let n = x.len().min(w.len());
        let n16 = n / 16 * 16;
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut a0 = _mm256_setzero_ps();
        let mut a1 = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: i + 16 <= n for every load in the loop.
        unsafe {
            while i < n16 {
                let w0 = load_f16x8(wp.add(i));
                let w1 = load_f16x8(wp.add(i + 8));
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), w0, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i + 8)), w1, a1);
                i += 16;
            }
            let mut s = hsum(_mm256_add_ps(a0, a1));
            while i < n {
                s += *xp.add(i) * (*wp.add(i)).to_f32();
                i += 1;
            }
            s
        }
    }

    /// SAFETY: caller guarantees AVX2+F16C and dst.len() == w.len().
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn convert_f16(w: &[f16], dst: &mut [f32]) {
        let n = w.len().min(dst.len());
        let n8 = n / 8 * 8;
        let mut i = 0;
        // SAFETY: i + 8 <= n for every load/store in the loop.
        unsafe {
            while i < n8 {
                let v = load_f16x8(w.as_ptr().add(i));
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), v);
                i += 8;
            }
        }
        for j in n8..n {
            dst[j] = w[j].to_f32();
        }
    }
}

/// The AVX2 int8 kernels, and the helpers the float kernels of every width share
/// (`lanes`: weight loads, the tile walk, the prefill widening buffer).
#[cfg(target_arch = "x86_64")]
mod tiled {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use half::{bf16, f16};

    use super::avx2::hsum;
    use crate::cpu::simd::avx2::{load_bf16x8, load_f16x8};
    use crate::weights::{Q8_GROUP, Weights};

    /// Which int8 kernels a call takes.
    #[derive(Clone, Copy)]
    pub(super) enum Q8Kernels {
        /// The 8-lane ones: one row through the GEMV, more in tiles (the same bits).
        Avx2,
        /// The 16-lane ones (AVX-512F present).
        Avx512,
    }

    /// Float weight element types, as a const parameter so each kernel is monomorphised
    /// (int8 weights have their own kernels, [`tile_q8`]).
    pub(super) const F32: u8 = 0;
    pub(super) const BF16: u8 = 1;
    pub(super) const F16: u8 = 2;

    /// From this many input rows (prefill chunks), 16-bit weights are widened once per
    /// panel into [`PACK`] rather than in every row block.
    pub(super) const PACK_ROWS: usize = 16;

    thread_local! {
        /// One column block's weight rows widened to f32 (3 x C), per thread.
        pub(super) static PACK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// dst[..len] = the `len` DT elements at `src` as f32, asking for the `len` elements
    /// after them (the next column block) as it goes.
    ///
    /// SAFETY: AVX2+FMA+F16C; `len` readable elements at src, `len` writable at dst.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn widen<const DT: u8>(src: *const u8, dst: *mut f32, len: usize) {
        let es = elem::<DT>();
        let n8 = len / 8 * 8;
        // SAFETY: see the function's contract; prefetches never fault.
        unsafe {
            let mut i = 0;
            while i < n8 {
                if (i * es).is_multiple_of(64) {
                    _mm_prefetch::<_MM_HINT_T0>(src.wrapping_add((len + i) * es) as *const i8);
                }
                _mm256_storeu_ps(dst.add(i), load8::<DT>(src.add(i * es)));
                i += 8;
            }
            for j in n8..len {
                *dst.add(j) = load1::<DT>(src, j);
            }
        }
    }

    /// Bytes of input rows a panel may hold (stays in L2 while a thread sweeps columns).
    const PANEL_BYTES: usize = 192 * 1024;

    /// Eight weights at `p` (element type DT) as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn load8<const DT: u8>(p: *const u8) -> __m256 {
        // SAFETY: the caller guarantees 8 readable elements of type DT at p.
        unsafe {
            match DT {
                F32 => _mm256_loadu_ps(p as *const f32),
                BF16 => load_bf16x8(p as *const bf16),
                _ => load_f16x8(p as *const f16),
            }
        }
    }

    /// Element `i` of a weight row of type DT as f32.
    #[inline]
    pub(super) unsafe fn load1<const DT: u8>(p: *const u8, i: usize) -> f32 {
        // SAFETY: the caller guarantees element i is readable.
        unsafe {
            match DT {
                F32 => *(p as *const f32).add(i),
                BF16 => f32::from_bits((*(p as *const u16).add(i) as u32) << 16),
                _ => half::f16::from_bits(*(p as *const u16).add(i)).to_f32(),
            }
        }
    }

    pub(super) const fn elem<const DT: u8>() -> usize {
        match DT {
            F32 => 4,
            _ => 2,
        }
    }

    /// Bytes ahead of the current load that the decode GEMV prefetches (a little over
    /// one 576-wide bf16 row: far enough to cover the memory latency, near enough to
    /// stay within the job's own rows).
    pub(super) const GEMV_PREFETCH: usize = 2048;

    /// Int8 rows one after another (one linear stream, as [`gemv`]), each output summed
    /// by [`tile_q8`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn gemv_q8(
        out: *mut f32,
        x: *const f32,
        w: *const i8,
        s: *const u16,
        bias: Option<&[f32]>,
        c: usize,
        cols: Range<usize>,
    ) {
        let groups = c / Q8_GROUP;
        // SAFETY: c is a multiple of Q8_GROUP (checked by check_shapes); rows o < OC.
        unsafe {
            for o in cols {
                let b = [bias.map_or(0.0, |b| b[o]), 0.0];
                tile_q8::<1, 1>(x, w.add(o * c), s.add(o * groups), c, out.add(o), 0, b);
            }
        }
    }

    /// Int8 tile: out[i * ldo + j] = x_i . w_j + bias_j for i < M, j < N, w_j = w + j * c
    /// with bf16 scales s + j * c / Q8_GROUP. Each 8 weights are widened to f32 and
    /// multiplied by their group's scale once, then shared by the M rows' FMAs. Each
    /// output has two accumulators, for even and odd groups (two FMA chains per output: a
    /// row alone is bound by their latency), added at the end, `hsum`, then the bias.
    /// The scales are widened eight groups at a time into a small buffer, from which each
    /// group's is broadcast; groups go two per step. The order of every output is the
    /// same for any M and N, so a row gives the same bits alone and batched. Registers:
    /// 2 M N accumulators, N weights, one input (19 at 4 x 2, three over the 16 ymm).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_q8<const M: usize, const N: usize>(
        x: *const f32,
        w: *const i8,
        s: *const u16,
        c: usize,
        out: *mut f32,
        ldo: usize,
        bias: [f32; 2],
    ) {
        let groups = c / Q8_GROUP;
        let mut acc = [[[_mm256_setzero_ps(); 2]; N]; M];
        // Scales of groups g0..g0 + 8 per weight row, as f32.
        let mut sf = [[0f32; 8]; N];
        // SAFETY: c is a multiple of Q8_GROUP; rows i < M of x and j < N of w (and their
        // `groups` scales) exist; prefetches past the matrix are harmless.
        unsafe {
            let mut g = 0;
            while g < groups {
                if g % 8 == 0 {
                    for (j, sj) in sf.iter_mut().enumerate() {
                        widen_scales(sj, s.add(j * groups + g), groups - g);
                    }
                }
                if g + 2 <= groups {
                    let k = g * Q8_GROUP;
                    if k.is_multiple_of(64) {
                        prefetch_q8::<N>(w, s, c, k);
                    }
                    q8_group8::<M, N, 0>(&mut acc, x, w, &sf, c, g);
                    q8_group8::<M, N, 1>(&mut acc, x, w, &sf, c, g + 1);
                    g += 2;
                } else {
                    // (An odd count's last group is even.)
                    q8_group8::<M, N, 0>(&mut acc, x, w, &sf, c, g);
                    g += 1;
                }
            }
            for (i, ai) in acc.iter().enumerate() {
                for (j, a) in ai.iter().enumerate() {
                    *out.add(i * ldo + j) = hsum(_mm256_add_ps(a[0], a[1])) + bias[j];
                }
            }
        }
    }

    /// Group `g` of [`tile_q8`] into accumulators `P` (its parity).
    ///
    /// SAFETY: AVX2+FMA; as [`tile_q8`], g < c / Q8_GROUP, `sf` holding group g's scales
    /// at g % 8.
    #[inline(always)]
    unsafe fn q8_group8<const M: usize, const N: usize, const P: usize>(
        acc: &mut [[[__m256; 2]; N]; M],
        x: *const f32,
        w: *const i8,
        sf: &[[f32; 8]; N],
        c: usize,
        g: usize,
    ) {
        let k = g * Q8_GROUP;
        // SAFETY: see the function's contract.
        unsafe {
            for v in 0..Q8_GROUP / 8 {
                let mut wv = [_mm256_setzero_ps(); N];
                for (j, wj) in wv.iter_mut().enumerate() {
                    let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        w.add(j * c + k + 8 * v) as *const __m128i
                    ));
                    *wj = _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_broadcast_ss(&sf[j][g % 8]));
                }
                for (i, ai) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.add(i * c + k + 8 * v));
                    for (a, wj) in ai.iter_mut().zip(&wv) {
                        a[P] = _mm256_fmadd_ps(xv, *wj, a[P]);
                    }
                }
            }
        }
    }

    /// dst[..n.min(8)] = the bf16 scales at `s` as f32 (eight in one vector when there
    /// are eight, else one at a time: the last scales of a matrix end where it does).
    ///
    /// SAFETY: AVX2; n.min(8) scales readable at s.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen_scales(dst: &mut [f32; 8], s: *const u16, n: usize) {
        // SAFETY: see the function's contract.
        unsafe {
            if n >= 8 {
                let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(s as *const __m128i));
                _mm256_storeu_ps(
                    dst.as_mut_ptr(),
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
                );
            } else {
                for (t, d) in dst.iter_mut().take(n).enumerate() {
                    *d = f32::from_bits((*s.add(t) as u32) << 16);
                }
            }
        }
    }

    /// Prefetch, for the N weight rows of an int8 tile at channel k, the weights
    /// `N * GEMV_PREFETCH` bytes ahead, and every 512 channels their scales as far ahead
    /// (a line of scales covers 32 groups).
    ///
    /// SAFETY: none needed (prefetches never fault); `w`, `s` as the tile's.
    #[inline(always)]
    unsafe fn prefetch_q8<const N: usize>(w: *const i8, s: *const u16, c: usize, k: usize) {
        for j in 0..N {
            let ahead = j * c + k + N * GEMV_PREFETCH;
            // SAFETY: SSE is baseline on x86-64; a prefetch never faults.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(ahead));
                if k.is_multiple_of(512) {
                    let sp = s.wrapping_add(ahead / Q8_GROUP);
                    _mm_prefetch::<_MM_HINT_T0>(sp as *const i8);
                }
            }
        }
    }

    /// The int8 tile loop of [`gemm_q8`] and [`gemm_q8_512`]: `rows` x `cols` in 4 x 2
    /// tiles of `$tile` over L2-sized row panels ([`for_each_tile`]).
    macro_rules! q8_tiles {
        ($tile:ident, $out:expr, $x:expr, $rows:expr, $w:expr, $s:expr, $bias:expr,
         $c:expr, $oc:expr, $cols:expr) => {{
            let (out, x, w, s, bias, c, oc) = ($out, $x, $w, $s, $bias, $c, $oc);
            let groups = c / Q8_GROUP;
            for_each_tile($rows, c, $cols, 4, 2, |r, m, o, n, _| {
                let mut b = [0.0; 2];
                if let Some(bs) = bias {
                    b[..n].copy_from_slice(&bs[o..o + n]);
                }
                // SAFETY: the caller's guarantees; the tile lies within rows x cols.
                unsafe {
                    let (wt, st) = (w.add(o * c), s.add(o * groups));
                    let (xr, op) = (x.add(r * c), out.add(r * oc + o));
                    match (m, n) {
                        (4, 2) => $tile::<4, 2>(xr, wt, st, c, op, oc, b),
                        (4, _) => $tile::<4, 1>(xr, wt, st, c, op, oc, b),
                        (3, 2) => $tile::<3, 2>(xr, wt, st, c, op, oc, b),
                        (3, _) => $tile::<3, 1>(xr, wt, st, c, op, oc, b),
                        (2, 2) => $tile::<2, 2>(xr, wt, st, c, op, oc, b),
                        (2, _) => $tile::<2, 1>(xr, wt, st, c, op, oc, b),
                        (_, 2) => $tile::<1, 2>(xr, wt, st, c, op, oc, b),
                        _ => $tile::<1, 1>(xr, wt, st, c, op, oc, b),
                    }
                }
            });
        }};
    }

    /// [`gemm`] for int8 weights: one row by [`gemv_q8`], more in 4 x 2 tiles of
    /// [`tile_q8`] over L2-sized row panels (the same bits either way).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_q8(
        out: *mut f32,
        x: *const f32,
        rows: usize,
        w: *const i8,
        s: *const u16,
        bias: Option<&[f32]>,
        c: usize,
        oc: usize,
        cols: Range<usize>,
    ) {
        if rows == 1 {
            // SAFETY: forwarded caller guarantees.
            unsafe { gemv_q8(out, x, w, s, bias, c, cols) };
            return;
        }
        q8_tiles!(tile_q8, out, x, rows, w, s, bias, c, oc, cols);
    }

    /// [`gemm_q8`] on AVX-512: rows in 4 x 2 tiles of [`tile_q8_512`] over L2-sized row
    /// panels, one row as a 1 x 2 tile (the same bits either way).
    ///
    /// SAFETY: AVX-512F, AVX2, FMA and F16C present; otherwise as [`gemm_q8`].
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_q8_512(
        out: *mut f32,
        x: *const f32,
        rows: usize,
        w: *const i8,
        s: *const u16,
        bias: Option<&[f32]>,
        c: usize,
        oc: usize,
        cols: Range<usize>,
    ) {
        q8_tiles!(tile_q8_512, out, x, rows, w, s, bias, c, oc, cols);
    }

    /// The 16-lane kernels take one group per vector.
    const _: () = assert!(Q8_GROUP == 16);

    /// Int8 tile on AVX-512: out[i * ldo + j] = x_i . w_j + bias_j for i < M, j < N,
    /// w_j = w + j * c with bf16 scales s + j * c / Q8_GROUP. Each group (16 weights, one
    /// vector) is widened to f32 and multiplied by its scale once, then shared by the M
    /// rows' FMAs. Each output has two accumulators, for even and odd groups (two FMA
    /// chains per output: a row alone is bound by their latency), added and reduced at
    /// the end, then the bias. The scales are widened sixteen groups at a time into a
    /// small buffer, from which each group's is broadcast; groups go four per step. The
    /// order of every output is the same for any M and N, so a row gives the same bits
    /// alone and batched. Registers: 2 M N accumulators, N weights, one input (19 of the
    /// 32 zmm at 4 x 2).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn tile_q8_512<const M: usize, const N: usize>(
        x: *const f32,
        w: *const i8,
        s: *const u16,
        c: usize,
        out: *mut f32,
        ldo: usize,
        bias: [f32; 2],
    ) {
        let groups = c / Q8_GROUP;
        let mut acc = [[[_mm512_setzero_ps(); 2]; N]; M];
        // Scales of groups g0..g0 + 16 per weight row, as f32.
        let mut sf = [[0f32; 16]; N];
        // SAFETY: c is a multiple of Q8_GROUP; rows i < M of x and j < N of w (and their
        // `groups` scales) exist; prefetches past the matrix are harmless.
        unsafe {
            let mut g = 0;
            while g < groups {
                if g % 16 == 0 {
                    for (j, sj) in sf.iter_mut().enumerate() {
                        let sp = s.add(j * groups + g);
                        for (h, half) in sj.as_chunks_mut::<8>().0.iter_mut().enumerate() {
                            if groups - g > 8 * h {
                                widen_scales(half, sp.add(8 * h), groups - g - 8 * h);
                            }
                        }
                    }
                }
                if g + 4 <= groups {
                    prefetch_q8::<N>(w, s, c, g * Q8_GROUP);
                    q8_group::<M, N, 0>(&mut acc, x, w, &sf, c, g);
                    q8_group::<M, N, 1>(&mut acc, x, w, &sf, c, g + 1);
                    q8_group::<M, N, 0>(&mut acc, x, w, &sf, c, g + 2);
                    q8_group::<M, N, 1>(&mut acc, x, w, &sf, c, g + 3);
                    g += 4;
                } else {
                    if g % 2 == 0 {
                        q8_group::<M, N, 0>(&mut acc, x, w, &sf, c, g);
                    } else {
                        q8_group::<M, N, 1>(&mut acc, x, w, &sf, c, g);
                    }
                    g += 1;
                }
            }
            for (i, ai) in acc.iter().enumerate() {
                for (j, a) in ai.iter().enumerate() {
                    *out.add(i * ldo + j) =
                        _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1])) + bias[j];
                }
            }
        }
    }

    /// Group `g` of [`tile_q8_512`] into accumulators `P` (its parity).
    ///
    /// SAFETY: AVX-512F; as [`tile_q8_512`], g < c / Q8_GROUP, `sf` holding group g's
    /// scales at g % 16.
    #[inline(always)]
    unsafe fn q8_group<const M: usize, const N: usize, const P: usize>(
        acc: &mut [[[__m512; 2]; N]; M],
        x: *const f32,
        w: *const i8,
        sf: &[[f32; 16]; N],
        c: usize,
        g: usize,
    ) {
        let k = g * Q8_GROUP;
        // SAFETY: see the function's contract.
        unsafe {
            let mut wv = [_mm512_setzero_ps(); N];
            for (j, wj) in wv.iter_mut().enumerate() {
                let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(w.add(j * c + k) as *const __m128i));
                *wj = _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(sf[j][g % 16]));
            }
            for (i, ai) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(x.add(i * c + k));
                for (a, wj) in ai.iter_mut().zip(&wv) {
                    a[P] = _mm512_fmadd_ps(xv, *wj, a[P]);
                }
            }
        }
    }

    /// The output tiles of `rows` x `cols`: row panels small enough to stay in L2 while
    /// a thread sweeps its columns (`PANEL_BYTES`), in each panel column blocks of up to
    /// `nr` weight rows, in each block row blocks of up to `mr` input rows; `f(r, m, o,
    /// n, first)` per tile (rows r..r+m, columns o..o+n; `first` for the panel's first
    /// row block of a column block). Each weight tile is read from memory once per panel
    /// and from L1 by the panel's row blocks.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn for_each_tile(
        rows: usize,
        c: usize,
        cols: Range<usize>,
        mr: usize,
        nr: usize,
        mut f: impl FnMut(usize, usize, usize, usize, bool),
    ) {
        let panel = (PANEL_BYTES / (4 * c)).clamp(mr, 256) / mr * mr;
        let mut r0 = 0;
        while r0 < rows {
            let r_end = (r0 + panel).min(rows);
            let mut o = cols.start;
            while o < cols.end {
                let n = nr.min(cols.end - o);
                let mut r = r0;
                while r < r_end {
                    let m = mr.min(r_end - r);
                    f(r, m, o, n, r == r0);
                    r += m;
                }
                o += n;
            }
            r0 = r_end;
        }
    }

    /// out (rows, oc) columns `cols` = inp (rows, c) . weight(cols)^T + bias; int8 weights
    /// through the kernels `q8` names.
    ///
    /// SAFETY: AVX2+FMA+F16C present; `inp.len()` is a multiple of `c`, `out` holds
    /// rows * oc, `weight` oc * c, `bias` (if any) oc; `cols` within 0..oc. Only columns
    /// `cols` of `out` are written.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        out: &mut [f32],
        inp: &[f32],
        weight: Weights<'_>,
        bias: Option<&[f32]>,
        c: usize,
        oc: usize,
        cols: Range<usize>,
        q8: Q8Kernels,
        call: u64,
    ) {
        let rows = inp.len() / c;
        // SAFETY: forwarded caller guarantees (for Q8, c is a multiple of Q8_GROUP:
        // `check_shapes` checked it).
        unsafe {
            match weight {
                Weights::F32(_) | Weights::BF16(_) | Weights::F16(_) => {
                    super::lanes::avx2::gemm(out, inp, weight, bias, c, oc, cols, call);
                }
                Weights::Q8(w) => {
                    let (o, x, q) = (out.as_mut_ptr(), inp.as_ptr(), w.q().as_ptr());
                    let sc = w.scales().as_ptr() as *const u16;
                    match q8 {
                        Q8Kernels::Avx512 => gemm_q8_512(o, x, rows, q, sc, bias, c, oc, cols),
                        Q8Kernels::Avx2 => gemm_q8(o, x, rows, q, sc, bias, c, oc, cols),
                    }
                }
            }
        }
    }
}
