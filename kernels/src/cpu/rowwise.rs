//! Row-wise ops (RMSNorm, SwiGLU, RoPE, residual add) split across the worker pool when
//! the call is big enough (prefill, batched decode); small calls (one decode row) run
//! inline, where a fork/join would cost more than the op. The residual add runs the
//! scalar reference on each chunk and RoPE its arithmetic with one sine/cosine table per
//! position, so both are bit-identical to the reference. Where the CPU has AVX2, RMSNorm
//! with float weights runs a row kernel (the sum of squares in eight lanes: another
//! summation order than the reference's, within the f32 tolerance; the weights converted
//! in registers; each output `w * (x * rstd)` as the reference computes it) and SwiGLU a
//! vector exp (~2 ulp); an element's result never depends on the other rows. Shapes are
//! checked for the whole call before any chunk runs.
//!
//! The model's layers take RMSNorm and RoPE fused into their matmuls (`matmul::NormIn`,
//! `matmul::RopeOut`): the row norm and the head rotation here are what those run, and a
//! [`RopeTable`] holds a pass's angles once for every layer.

use super::dispatch::{Isa, current, num_threads};
use super::pool;
use crate::error::KernelError;
use crate::error::check_len;
use crate::reference;
use crate::weights::Weights;

/// Elements below which a call runs inline on the calling thread.
const MIN_PARALLEL: usize = 1 << 15;

/// Run `f(first_unit, units)` over `n` units of `unit` elements each, in chunks claimed
/// by the pool's threads; the first error wins.
fn split(
    n: usize,
    unit: usize,
    f: &(dyn Fn(usize, usize) -> Result<(), KernelError> + Sync),
) -> Result<(), KernelError> {
    let threads = num_threads();
    if n * unit < MIN_PARALLEL || threads < 2 || n < 2 {
        return f(0, n);
    }
    let per = n.div_ceil(threads * 4).max(1);
    let items = n.div_ceil(per);
    let err = std::sync::Mutex::new(None);
    pool::global().run_items(threads, items, &|i| {
        let start = i * per;
        let len = per.min(n - start);
        if let Err(e) = f(start, len) {
            let mut slot = err.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(e);
        }
    });
    match err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A `*mut f32` handed to pool participants that write disjoint ranges.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: only used to give each chunk its own disjoint sub-slice of one buffer.
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

impl Out {
    /// Elements `start..start + len` of the buffer.
    ///
    /// SAFETY: the range lies inside the buffer, which outlives the use, and no other
    /// chunk touches it.
    unsafe fn range<'a>(self, start: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: forwarded.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

/// Same contract as [`reference::rmsnorm::rmsnorm_forward`].
pub fn rmsnorm_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: Weights<'_>,
    eps: f32,
) -> Result<(), KernelError> {
    let c = weight.len();
    if c == 0 || !inp.len().is_multiple_of(c) || out.len() != inp.len() {
        // The reference names the problem.
        return reference::rmsnorm::rmsnorm_forward(out, inp, weight, eps);
    }
    let isa = current();
    let o = Out(out.as_mut_ptr());
    split(inp.len() / c, c, &|r, n| {
        // SAFETY: rows r..r+n of `out`, disjoint per chunk, inside out (checked above).
        let out = unsafe { o.range(r * c, n * c) };
        rmsnorm_rows(out, &inp[r * c..(r + n) * c], weight, eps, isa)
    })
}

/// [`rmsnorm_forward`] on the calling thread: the same kernel per row, so the same bits
/// (a row's result never depends on the other rows). Also the input pass of the fused
/// matmuls (`matmul::NormIn`).
pub(crate) fn rmsnorm_rows(
    out: &mut [f32],
    inp: &[f32],
    weight: Weights<'_>,
    eps: f32,
    isa: Isa,
) -> Result<(), KernelError> {
    let c = weight.len();
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2
        && !matches!(weight, Weights::Q8(_))
        && c > 0
        && inp.len().is_multiple_of(c)
        && out.len() == inp.len()
    {
        for (o, x) in out.chunks_exact_mut(c).zip(inp.chunks_exact(c)) {
            // SAFETY: AVX2+FMA+F16C detected; o, x and weight all hold C elements.
            unsafe { avx2::rmsnorm_row(o, x, weight, eps) };
        }
        return Ok(());
    }
    let _ = (isa, c);
    reference::rmsnorm::rmsnorm_forward(out, inp, weight, eps)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::cpu::simd::avx2::{exp, load_bf16x8, load_f16x8};
    use crate::weights::Weights;

    /// out = silu(gate) * up = gate / (1 + e^-gate) * up, eight at a time (the vector exp
    /// of `simd`), the tail as the reference computes it.
    ///
    /// SAFETY: AVX2+FMA; gate and up hold out.len() elements.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn swiglu(out: &mut [f32], gate: &[f32], up: &[f32]) {
        // SAFETY: forwarded.
        unsafe { swiglu_at(out, gate, up, out.len() / 8 * 8) }
    }

    /// silu(g) * u in eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn silu_mul(g: __m256, u: __m256) -> __m256 {
        // SAFETY: AVX2+FMA (this function's features).
        let e = unsafe { exp(_mm256_sub_ps(_mm256_setzero_ps(), g)) };
        _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0), e)), u)
    }

    /// [`swiglu`] with elements `0..vec_len` through the vector exp (a last partial group
    /// too, through zero-padded lanes: every lane computes alone, so an element's result
    /// does not depend on where its group starts) and the rest as the reference computes
    /// them. A slice of a larger array thus gets exactly the bits `swiglu` gives it there.
    ///
    /// SAFETY: AVX2+FMA; gate and up hold out.len() elements; vec_len <= out.len().
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn swiglu_at(out: &mut [f32], gate: &[f32], up: &[f32], vec_len: usize) {
        let n8 = vec_len / 8 * 8;
        let mut i = 0;
        // SAFETY: i + 8 <= n8 <= out.len() for every vector access.
        unsafe {
            while i < n8 {
                let g = _mm256_loadu_ps(gate.as_ptr().add(i));
                let u = _mm256_loadu_ps(up.as_ptr().add(i));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), silu_mul(g, u));
                i += 8;
            }
            if n8 < vec_len {
                let (mut g, mut u, mut o) = ([0.0f32; 8], [0.0f32; 8], [0.0f32; 8]);
                let r = vec_len - n8;
                g[..r].copy_from_slice(&gate[n8..vec_len]);
                u[..r].copy_from_slice(&up[n8..vec_len]);
                let v = silu_mul(_mm256_loadu_ps(g.as_ptr()), _mm256_loadu_ps(u.as_ptr()));
                _mm256_storeu_ps(o.as_mut_ptr(), v);
                out[n8..vec_len].copy_from_slice(&o[..r]);
            }
        }
        for i in vec_len..out.len() {
            out[i] = gate[i] / (1.0 + (-gate[i]).exp()) * up[i];
        }
    }

    /// Eight weights from element i as f32 (float weights only).
    ///
    /// SAFETY: AVX2+F16C; i + 8 <= w.len(); w is not Q8.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(w: Weights<'_>, i: usize) -> __m256 {
        // SAFETY: see the function's contract.
        unsafe {
            match w {
                Weights::F32(w) => _mm256_loadu_ps(w.as_ptr().add(i)),
                Weights::BF16(w) => load_bf16x8(w.as_ptr().add(i)),
                Weights::F16(w) => load_f16x8(w.as_ptr().add(i)),
                Weights::Q8(_) => unreachable!("int8 RMSNorm weights take the reference"),
            }
        }
    }

    /// One row: out = w * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps).
    ///
    /// SAFETY: AVX2+FMA+F16C; out, x and w hold the same C elements; w is not Q8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rmsnorm_row(out: &mut [f32], x: &[f32], w: Weights<'_>, eps: f32) {
        let c = x.len();
        let n16 = c / 16 * 16;
        let n8 = c / 8 * 8;
        // SAFETY: every vector access stays below n8 <= c.
        unsafe {
            let xp = x.as_ptr();
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i < n16 {
                let v0 = _mm256_loadu_ps(xp.add(i));
                let v1 = _mm256_loadu_ps(xp.add(i + 8));
                a0 = _mm256_fmadd_ps(v0, v0, a0);
                a1 = _mm256_fmadd_ps(v1, v1, a1);
                i += 16;
            }
            if i < n8 {
                let v = _mm256_loadu_ps(xp.add(i));
                a0 = _mm256_fmadd_ps(v, v, a0);
            }
            let a = _mm256_add_ps(a0, a1);
            let h = _mm_add_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let mut ss = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
            for &v in &x[n8..] {
                ss += v * v;
            }
            let rstd = 1.0 / (ss / c as f32 + eps).sqrt();
            let vr = _mm256_set1_ps(rstd);
            let op = out.as_mut_ptr();
            let mut i = 0;
            while i < n8 {
                let y = _mm256_mul_ps(_mm256_loadu_ps(xp.add(i)), vr);
                _mm256_storeu_ps(op.add(i), _mm256_mul_ps(load8(w, i), y));
                i += 8;
            }
            for i in n8..c {
                out[i] = w.get(i) * (x[i] * rstd);
            }
        }
    }
}

/// Same contract as [`reference::swiglu::swiglu_forward`].
pub fn swiglu_forward(out: &mut [f32], gate: &[f32], up: &[f32]) -> Result<(), KernelError> {
    const OP: &str = "swiglu_forward";
    check_len(OP, "gate", gate.len(), out.len())?;
    check_len(OP, "up", up.len(), out.len())?;
    const UNIT: usize = 256;
    let n = out.len();
    let isa = current();
    let o = Out(out.as_mut_ptr());
    split(n.div_ceil(UNIT), UNIT, &|u, k| {
        let (s, e) = (u * UNIT, ((u + k) * UNIT).min(n));
        // SAFETY: elements s..e of `out`, disjoint per chunk, e <= out.len().
        let out = unsafe { o.range(s, e - s) };
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 {
            // SAFETY: AVX2+FMA detected; out, gate[s..e] and up[s..e] hold e - s elements.
            unsafe { avx2::swiglu(out, &gate[s..e], &up[s..e]) };
            return Ok(());
        }
        let _ = isa;
        reference::swiglu::swiglu_forward(out, &gate[s..e], &up[s..e])
    })
}

/// Elements of a slice of a SwiGLU output that [`swiglu_forward`] would give: the slice
/// starts at flat index `at` of an output of `total` elements; on the AVX2 path the
/// elements before `total / 8 * 8` take the vector exp, the rest the reference formula
/// (the scalar path is the reference throughout). Lengths are the caller's to check.
pub(crate) fn swiglu_slice(
    out: &mut [f32],
    gate: &[f32],
    up: &[f32],
    at: usize,
    total: usize,
    isa: Isa,
) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        let vec_len = (total / 8 * 8).saturating_sub(at).min(out.len());
        // SAFETY: AVX2+FMA detected; gate and up hold out.len() elements.
        unsafe { avx2::swiglu_at(out, gate, up, vec_len) };
        return;
    }
    let _ = (isa, at, total);
    let r = reference::swiglu::swiglu_forward(out, gate, up);
    debug_assert!(r.is_ok(), "swiglu_slice: lengths are the caller's to match");
}

/// Same contract as [`reference::residual::residual_forward`].
pub fn residual_forward(acc: &mut [f32], x: &[f32]) -> Result<(), KernelError> {
    check_len("residual_forward", "x", x.len(), acc.len())?;
    const UNIT: usize = 256;
    let n = acc.len();
    let o = Out(acc.as_mut_ptr());
    split(n.div_ceil(UNIT), UNIT, &|u, k| {
        let (s, e) = (u * UNIT, ((u + k) * UNIT).min(n));
        // SAFETY: elements s..e of `acc`, disjoint per chunk, e <= acc.len().
        let acc = unsafe { o.range(s, e - s) };
        reference::residual::residual_forward(acc, &x[s..e])
    })
}

/// Same contract as [`reference::rope::rope_forward`].
pub fn rope_forward(
    x: &mut [f32],
    positions: &[u32],
    n_heads: usize,
    head_dim: usize,
    inv_freq: &[f32],
) -> Result<(), KernelError> {
    let row = n_heads * head_dim;
    if head_dim == 0
        || !head_dim.is_multiple_of(2)
        || inv_freq.len() != head_dim / 2
        || x.len() != positions.len() * row
        || row == 0
    {
        // The reference names the problem (or has nothing to do).
        return reference::rope::rope_forward(x, positions, n_heads, head_dim, inv_freq);
    }
    let o = Out(x.as_mut_ptr());
    split(positions.len(), row, &|t, n| {
        // SAFETY: rows t..t+n of `x`, disjoint per chunk, inside x (checked above).
        let x = unsafe { o.range(t * row, n * row) };
        let positions = &positions[t..t + n];
        if head_dim / 2 > MAX_ROPE_HALF {
            return reference::rope::rope_forward(x, positions, n_heads, head_dim, inv_freq);
        }
        rope_rows(x, positions, n_heads, head_dim, inv_freq);
        Ok(())
    })
}

/// x (rows, width) rotated in place, row r by the table's row r, every head of `width`
/// (a multiple of the table's head dim, checked by the caller) as [`rope_forward`] rotates
/// it; rows split across the pool.
pub(crate) fn rope_by_table(
    x: &mut [f32],
    width: usize,
    table: &RopeTable,
) -> Result<(), KernelError> {
    check_len("rope_by_table", "x", x.len(), table.rows() * width)?;
    let o = Out(x.as_mut_ptr());
    split(table.rows(), width, &|r, n| {
        // SAFETY: rows r..r+n of `x`, disjoint per chunk, inside x (checked above).
        let x = unsafe { o.range(r * width, n * width) };
        for (i, row) in x.chunks_exact_mut(width).enumerate() {
            let (sin, cos) = table.row(r + i);
            rotate_heads(row, sin, cos);
        }
        Ok(())
    })
}

/// Widest half head dim whose rotation table [`rope_rows`] keeps on the stack.
const MAX_ROPE_HALF: usize = 128;

/// The reference rotation with each position's sines and cosines computed once for all
/// heads (the reference recomputes them per head): the same angle, the same `sin_cos` and
/// the same arithmetic, so the same bits. head_dim / 2 <= MAX_ROPE_HALF; shapes checked.
fn rope_rows(x: &mut [f32], positions: &[u32], n_heads: usize, head_dim: usize, inv_freq: &[f32]) {
    let half = head_dim / 2;
    let (mut sin, mut cos) = ([0.0f32; MAX_ROPE_HALF], [0.0f32; MAX_ROPE_HALF]);
    for (row, &pos) in x.chunks_exact_mut(n_heads * head_dim).zip(positions) {
        rope_angles(pos, inv_freq, &mut sin[..half], &mut cos[..half]);
        rotate_heads(row, &sin[..half], &cos[..half]);
    }
}

/// sin and cos of `pos * inv_freq[i]` for every i, as the reference computes them.
fn rope_angles(pos: u32, inv_freq: &[f32], sin: &mut [f32], cos: &mut [f32]) {
    for ((s, c), &f) in sin.iter_mut().zip(cos.iter_mut()).zip(inv_freq) {
        (*s, *c) = (pos as f32 * f).sin_cos();
    }
}

/// Rotates every head of `heads` (whole heads of 2 * sin.len() values) in place by one
/// position's angles, with the reference's arithmetic.
pub(crate) fn rotate_heads(heads: &mut [f32], sin: &[f32], cos: &[f32]) {
    let half = sin.len();
    for head in heads.chunks_exact_mut(2 * half) {
        let (lo, hi) = head.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (lo[i], hi[i]);
            lo[i] = a * cos[i] - b * sin[i];
            hi[i] = b * cos[i] + a * sin[i];
        }
    }
}

/// The RoPE angles of one call's rows, computed once and shared by every layer of a
/// forward pass (the fused QKV epilogue, `matmul::RopeOut`): row r holds the sines and
/// cosines of `positions[r] * inv_freq`, bit for bit what [`rope_forward`] and the
/// reference compute. Filling it again reuses its buffers (no allocation once grown).
#[derive(Debug, Clone, Default)]
pub struct RopeTable {
    positions: Vec<u32>,
    inv_freq: Vec<f32>,
    sin: Vec<f32>,
    cos: Vec<f32>,
}

impl RopeTable {
    /// The table for `positions` (one per row) and `inv_freq` (head_dim / 2 values).
    pub fn fill(&mut self, positions: &[u32], inv_freq: &[f32]) -> Result<(), KernelError> {
        if inv_freq.is_empty() {
            return Err(KernelError::Invalid {
                op: "RopeTable::fill",
                arg: "inv_freq",
                reason: "empty (head_dim must be positive and even)".into(),
            });
        }
        let half = inv_freq.len();
        let n = positions.len() * half;
        self.positions.clear();
        self.positions.extend_from_slice(positions);
        self.inv_freq.clear();
        self.inv_freq.extend_from_slice(inv_freq);
        self.sin.resize(n, 0.0);
        self.cos.resize(n, 0.0);
        for ((&pos, s), c) in positions
            .iter()
            .zip(self.sin.chunks_exact_mut(half))
            .zip(self.cos.chunks_exact_mut(half))
        {
            rope_angles(pos, inv_freq, s, c);
        }
        Ok(())
    }

    /// Rows (positions) of the table.
    pub fn rows(&self) -> usize {
        self.positions.len()
    }

    /// The head dim it rotates (2 * inv_freq.len(); 0 before the first fill).
    pub fn head_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// The positions it was filled for.
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// The inverse frequencies it was filled with.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// (sin, cos) of row r.
    pub(crate) fn row(&self, r: usize) -> (&[f32], &[f32]) {
        let half = self.inv_freq.len();
        (&self.sin[r * half..][..half], &self.cos[r * half..][..half])
    }
}
