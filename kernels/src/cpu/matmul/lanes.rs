//! The float-weight (f32, bf16, f16) matmul kernels, one source for every vector width:
//! a macro instantiated over AVX2 registers (8 lanes, tiles of up to 4 input rows by 3
//! weight rows), over AVX-512 registers (16 lanes, 8 x 3 tiles, taken on CPUs with
//! AVX-512F) and over pairs of AVX2 registers standing in for AVX-512 ([`emu`]). Int8
//! weights have their own kernels (`tiled`).
//!
//! The emulated copy runs on any AVX2 machine, so the 16-lane tiling, tails, prefetch
//! bounds and summation order are tested everywhere (`tests/ops_cpu.rs`); what only an
//! AVX-512 machine runs is the handful of one-instruction register ops in
//! `avx512::ops`. Detection also checks those against the reference on a small product
//! before choosing them (see [`self_check`]).
//!
//! Every output is one L-lane FMA chain along the input channels, a horizontal sum, the
//! scalar tail (channels past the last multiple of L), then the bias, whatever the tile
//! shape, so a row gives the same bits alone (the decode GEMV) and batched. Against bf16
//! weights the chain takes each whole block of 2L channels as its even channels, then
//! its odd ones: one load, a shift and a mask give both vectors (no widening
//! instruction), with the input rows deinterleaved to match once per call
//! ([`pair_rows`]); the prefill path widens its weight panels into the same layout.
//! (A 2-core Xeon, `model_stream_269MB/rows1` under `CLOUDRM_ISA=avx512`: 29.1-32.1 ->
//! 31.3-33.4 GiB/s, alternating; docs/benchmarks.md.) Tiles use
//! MR x 3 accumulators: 12 of the 16 ymm registers at 8 lanes; 24 of the 32 zmm at 16
//! lanes, so a K = 8 critique step reads each weight tile from memory once for all eight
//! rows.

use std::ops::Range;

use crate::weights::Weights;

thread_local! {
    /// (call tag, lanes, this thread's paired copy of that call's input), for
    /// [`with_paired`].
    static PAIRED: std::cell::RefCell<(u64, usize, Vec<f32>)> =
        const { std::cell::RefCell::new((0, 0, Vec::new())) };
}

/// `src`'s rows of c channels with each whole block of 2l channels deinterleaved (its
/// even channels, then its odd ones) and the tail as it is: the order in which the
/// l-lane kernels pair bf16 weights (one load, two vectors by a shift and a mask, no
/// widening instruction).
fn pair_rows(dst: &mut [f32], src: &[f32], c: usize, l: usize) {
    #[cfg(target_arch = "x86_64")]
    if (l == 8 || l == 16) && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 detected; the rows' shapes are the same.
        unsafe { pair_rows_avx2(dst, src, c, l) };
        return;
    }
    pair_rows_any(dst, src, c, l)
}

/// [`pair_rows`] for l = 8 or 16 by 16-float shuffles.
///
/// SAFETY: AVX2; dst and src hold the same whole rows of c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pair_rows_avx2(dst: &mut [f32], src: &[f32], c: usize, l: usize) {
    use std::arch::x86_64::*;
    let np = c / (2 * l) * (2 * l);
    for (d, s) in dst.chunks_exact_mut(c).zip(src.chunks_exact(c)) {
        let (dp, sp) = (d.as_mut_ptr(), s.as_ptr());
        let mut k = 0;
        // SAFETY: k + 2l <= np <= c for every block; each 16 floats of a block give 8
        // even channels (to the block's first half) and 8 odd ones (its second half).
        unsafe {
            while k < np {
                for h in 0..l / 8 {
                    let a = _mm256_loadu_ps(sp.add(k + 16 * h));
                    let b = _mm256_loadu_ps(sp.add(k + 16 * h + 8));
                    // Within 128-bit lanes: (a0 a2 b0 b2 | a4 a6 b4 b6), then the 64-bit
                    // quarters in order 0 2 1 3.
                    let e = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
                    let o = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
                    let fix = |v: __m256| {
                        _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(
                            v,
                        )))
                    };
                    _mm256_storeu_ps(dp.add(k + 8 * h), fix(e));
                    _mm256_storeu_ps(dp.add(k + l + 8 * h), fix(o));
                }
                k += 2 * l;
            }
        }
        d[np..].copy_from_slice(&s[np..]);
    }
}

/// [`pair_rows`] for any l, element by element (no SIMD needed).
fn pair_rows_any(dst: &mut [f32], src: &[f32], c: usize, l: usize) {
    let np = c / (2 * l) * (2 * l);
    for (d, s) in dst.chunks_exact_mut(c).zip(src.chunks_exact(c)) {
        for (db, sb) in d[..np]
            .chunks_exact_mut(2 * l)
            .zip(s[..np].chunks_exact(2 * l))
        {
            let (even, odd) = db.split_at_mut(l);
            for ((e, o), p) in even.iter_mut().zip(odd).zip(sb.chunks_exact(2)) {
                (*e, *o) = (p[0], p[1]);
            }
        }
        d[np..].copy_from_slice(&s[np..]);
    }
}

/// The lanes of the kernels `isa` runs bf16 weights through here (whose input they pair),
/// if it runs them here: AVX-512 and AVX2; the bf16-compute paths have their own.
pub(super) fn paired_lanes(isa: crate::cpu::dispatch::Isa) -> Option<usize> {
    use crate::cpu::dispatch::Isa;
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 => return Some(avx512::L),
        Isa::Avx2 => return Some(avx2::L),
        _ => {}
    }
    let _ = isa;
    None
}

/// Input rows from which a bf16 call pairs its input once for all threads
/// ([`share_paired`]) instead of once per thread.
pub(super) const SHARE_ROWS: usize = 32;

/// (call tag, lanes, the paired input) of the latest call that shared one; tag 0 while
/// it is being filled.
static SHARED: std::sync::RwLock<(u64, usize, Vec<f32>)> =
    std::sync::RwLock::new((0, 0, Vec::new()));

/// Pairs `inp` for l-lane kernels ([`pair_rows`]) once for call `call`, its rows split
/// over `threads` of the pool, before the call's work items run ([`with_paired`] finds
/// it).
pub(super) fn share_paired(inp: &[f32], c: usize, l: usize, call: u64, threads: usize) {
    const CHUNK: usize = 16;
    let rows = inp.len() / c;
    let mut shared = SHARED.write().unwrap_or_else(|e| e.into_inner());
    shared.0 = 0;
    if shared.2.len() < inp.len() {
        shared.2.resize(inp.len(), 0.0);
    }
    let dst = super::super::pool::SendPtr(shared.2.as_mut_ptr());
    // (No work item of this job takes the lock; a busy pool runs the job inline.)
    super::super::pool::global().run_items(threads, rows.div_ceil(CHUNK), &|i| {
        let r = i * CHUNK..((i + 1) * CHUNK).min(rows);
        // SAFETY: item i alone writes rows r of the buffer, which outlives the job.
        let d = unsafe { std::slice::from_raw_parts_mut(dst.get().add(r.start * c), r.len() * c) };
        pair_rows(d, &inp[r.start * c..r.end * c], c, l);
    });
    (shared.0, shared.1) = (call, l);
}

/// `f(inp paired for l-lane kernels)`: the call's shared pairing ([`share_paired`]) if
/// there is one, else this thread's, made once per call tag.
fn with_paired<R>(
    inp: &[f32],
    c: usize,
    l: usize,
    call: u64,
    f: impl FnOnce(*const f32) -> R,
) -> R {
    if inp.len() / c >= SHARE_ROWS {
        let shared = SHARED.read().unwrap_or_else(|e| e.into_inner());
        if (shared.0, shared.1) == (call, l) {
            return f(shared.2.as_ptr());
        }
    }
    PAIRED.with_borrow_mut(|(tag, lanes, buf)| {
        if (*tag, *lanes) != (call, l) {
            if buf.len() < inp.len() {
                buf.resize(inp.len(), 0.0);
            }
            pair_rows(&mut buf[..inp.len()], inp, c, l);
            (*tag, *lanes) = (call, l);
        }
        f(buf.as_ptr())
    })
}

/// The kernels over `ops` (a module with `V`, `zero`, `loadx`, `loadw`, `fma`, `hsum`)
/// of `$lanes` lanes, compiled for the target features `$feat`, in tiles of up to `$mr`
/// input rows, the row blocks being `rows` (MR, 4, 3, 2 as far as they are <= MR) and 1.
macro_rules! lane_kernels {
    ($feat:literal, $lanes:expr, $mr:expr, rows $($mm:literal)*, gemv $gemv:literal) => {
        use std::arch::x86_64::*;
        use std::ops::Range;

        use super::super::tiled::{
            BF16, F16, F32, GEMV_PREFETCH, PACK, PACK_ROWS, elem, for_each_tile, load1, widen,
        };
        use super::with_paired;
        use crate::weights::Weights;

        /// Lanes per vector.
        pub(crate) const L: usize = $lanes;
        /// Input rows per tile.
        const MR: usize = $mr;
        /// Weight rows (output columns) per tile.
        const NR: usize = 3;
        /// One input row through [`gemv`] (one linear stream of weight rows, each one FMA
        /// chain) rather than the 1 x 3 tiles (three chains, the next tile prefetched).
        /// The same bits either way; which is faster was measured per path.
        const GEMV: bool = $gemv;

        /// out[i * ldo + j] = x_i . w_j + bias_j for i < M, j < N, where x_i = x + i * c
        /// (f32) and w_j = w + j * c (DT). With `PF`, the next tile's weight rows (N rows
        /// on) are prefetched.
        ///
        /// SAFETY: the target features; rows i < M of x and j < N of w exist (c elements
        /// each); out[i * ldo + j] writable.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn tile<const DT: u8, const M: usize, const N: usize, const PF: bool>(
            x: *const f32,
            w: *const u8,
            c: usize,
            out: *mut f32,
            ldo: usize,
            bias: [f32; NR],
        ) {
            let es = elem::<DT>();
            let nl = c / L * L;
            let np = paired_channels::<DT>(c);
            let mut acc = [[ops::zero(); N]; M];
            let mut k = 0;
            // SAFETY: k + 2L <= c for every pair load, k + L <= c for every vector load;
            // prefetches never fault.
            unsafe {
                // bf16 weights: whole blocks of 2L channels, each as its even channels
                // then its odd ones (x paired to match, `pair_rows`).
                while k < np {
                    if PF && (k * es).is_multiple_of(64) {
                        for j in 0..N {
                            let p = w.wrapping_add(((j + N) * c + k) * es);
                            _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                        }
                    }
                    let mut we = [ops::zero(); N];
                    let mut wo = [ops::zero(); N];
                    for j in 0..N {
                        (we[j], wo[j]) = ops::loadw2(w.add((j * c + k) * es));
                    }
                    for (i, row) in acc.iter_mut().enumerate() {
                        let xv = ops::loadx(x.add(i * c + k));
                        for (a, v) in row.iter_mut().zip(&we) {
                            *a = ops::fma(xv, *v, *a);
                        }
                    }
                    for (i, row) in acc.iter_mut().enumerate() {
                        let xv = ops::loadx(x.add(i * c + k + L));
                        for (a, v) in row.iter_mut().zip(&wo) {
                            *a = ops::fma(xv, *v, *a);
                        }
                    }
                    k += 2 * L;
                }
                while k < nl {
                    if PF && (k * es).is_multiple_of(64) {
                        for j in 0..N {
                            let p = w.wrapping_add(((j + N) * c + k) * es);
                            _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                        }
                    }
                    let mut wv = [ops::zero(); N];
                    for (j, v) in wv.iter_mut().enumerate() {
                        *v = ops::loadw::<DT>(w.add((j * c + k) * es));
                    }
                    for (i, row) in acc.iter_mut().enumerate() {
                        let xv = ops::loadx(x.add(i * c + k));
                        for (a, v) in row.iter_mut().zip(&wv) {
                            *a = ops::fma(xv, *v, *a);
                        }
                    }
                    k += L;
                }
                for (i, row) in acc.iter().enumerate() {
                    for (j, a) in row.iter().enumerate() {
                        let mut t = ops::hsum(*a);
                        for kk in nl..c {
                            t += *x.add(i * c + kk) * load1::<DT>(w.add(j * c * es), kk);
                        }
                        *out.add(i * ldo + j) = t + bias[j];
                    }
                }
            }
        }

        /// Rows 0..m (any m) times weight rows 0..n (n <= NR), in row blocks of MR, 4, 3,
        /// 2 and 1.
        ///
        /// SAFETY: as [`tile`] for m rows and n weight rows.
        #[inline]
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn tile_any<const DT: u8, const PF: bool>(
            m: usize,
            n: usize,
            x: *const f32,
            w: *const u8,
            c: usize,
            out: *mut f32,
            ldo: usize,
            bias: [f32; NR],
        ) {
            let mut r = 0;
            while r < m {
                let mm = match m - r {
                    left if left >= MR => MR,
                    left if left >= 4 => 4,
                    left => left,
                };
                // SAFETY: rows r..r + mm lie within 0..m.
                unsafe {
                    let (x, o) = (x.add(r * c), out.add(r * ldo));
                    match mm {
                        $($mm => tile_n::<DT, $mm, PF>(n, x, w, c, o, ldo, bias),)*
                        _ => tile_n::<DT, 1, PF>(n, x, w, c, o, ldo, bias),
                    }
                }
                r += mm;
            }
        }

        /// [`tile`] of M rows by n (<= NR) weight rows.
        ///
        /// SAFETY: as [`tile`].
        #[inline]
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn tile_n<const DT: u8, const M: usize, const PF: bool>(
            n: usize,
            x: *const f32,
            w: *const u8,
            c: usize,
            out: *mut f32,
            ldo: usize,
            bias: [f32; NR],
        ) {
            // SAFETY: forwarded caller guarantees.
            unsafe {
                match n {
                    3 => tile::<DT, M, 3, PF>(x, w, c, out, ldo, bias),
                    2 => tile::<DT, M, 2, PF>(x, w, c, out, ldo, bias),
                    _ => tile::<DT, M, 1, PF>(x, w, c, out, ldo, bias),
                }
            }
        }

        /// One input row (decode): the weight rows one after another as one prefetched
        /// linear stream, each output summed exactly as [`tile`] sums it.
        ///
        /// SAFETY: the target features; x holds c floats, every o in cols names a weight
        /// row of c elements, out[o] writable.
        #[target_feature(enable = $feat)]
        unsafe fn gemv<const DT: u8>(
            out: *mut f32,
            x: *const f32,
            w: *const u8,
            bias: Option<&[f32]>,
            c: usize,
            cols: Range<usize>,
        ) {
            let es = elem::<DT>();
            let nl = c / L * L;
            let np = paired_channels::<DT>(c);
            // SAFETY: see the function's contract; prefetches never fault.
            unsafe {
                for o in cols {
                    let wo = w.add(o * c * es);
                    let mut acc = ops::zero();
                    let mut k = 0;
                    while k < np {
                        if (k * es).is_multiple_of(64) {
                            _mm_prefetch::<_MM_HINT_T0>(
                                wo.wrapping_add(k * es + GEMV_PREFETCH) as *const i8
                            );
                        }
                        let (e, d) = ops::loadw2(wo.add(k * es));
                        acc = ops::fma(ops::loadx(x.add(k)), e, acc);
                        acc = ops::fma(ops::loadx(x.add(k + L)), d, acc);
                        k += 2 * L;
                    }
                    while k < nl {
                        if (k * es).is_multiple_of(64) {
                            _mm_prefetch::<_MM_HINT_T0>(
                                wo.wrapping_add(k * es + GEMV_PREFETCH) as *const i8
                            );
                        }
                        acc = ops::fma(ops::loadx(x.add(k)), ops::loadw::<DT>(wo.add(k * es)), acc);
                        k += L;
                    }
                    let mut t = ops::hsum(acc);
                    for kk in nl..c {
                        t += *x.add(kk) * load1::<DT>(wo, kk);
                    }
                    *out.add(o) = t + bias.map_or(0.0, |b| b[o]);
                }
            }
        }

        /// Channels of a row taken as pairs of vectors (bf16 weights): the whole blocks of
        /// 2L. None for other weights.
        #[inline]
        const fn paired_channels<const DT: u8>(c: usize) -> usize {
            if DT == BF16 { c / (2 * L) * (2 * L) } else { 0 }
        }

        /// dst[..n * c] = n weight rows of c elements at `src` as f32, bf16 rows laid out
        /// as [`tile`] pairs them (each whole block of 2L channels as its even channels,
        /// then its odd ones; the tail in order), so the f32 tiles over dst and a paired
        /// input sum in the bf16 tiles' order. Asks for the next n rows as it goes.
        ///
        /// SAFETY: the target features; n * c readable elements at src, writable at dst.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn widen_rows<const DT: u8>(src: *const u8, dst: *mut f32, n: usize, c: usize) {
            let es = elem::<DT>();
            let np = paired_channels::<DT>(c);
            // SAFETY: see the function's contract; prefetches never fault.
            unsafe {
                if np == 0 {
                    widen::<DT>(src, dst, n * c);
                    return;
                }
                for j in 0..n {
                    let (s, d) = (src.add(j * c * es), dst.add(j * c));
                    let mut k = 0;
                    while k < np {
                        if (k * es).is_multiple_of(64) {
                            _mm_prefetch::<_MM_HINT_T0>(
                                s.wrapping_add((n * c + k) * es) as *const i8
                            );
                        }
                        let (e, o) = ops::loadw2(s.add(k * es));
                        ops::storex(d.add(k), e);
                        ops::storex(d.add(k + L), o);
                        k += 2 * L;
                    }
                    for kk in k..c {
                        *d.add(kk) = load1::<DT>(s, kk);
                    }
                }
            }
        }

        /// The input x holds rows x c floats (for bf16 weights paired, [`super::pair_rows`]).
        ///
        /// SAFETY: the target features; x readable as above, `out` holds rows * oc, w
        /// oc * c elements of type DT, `bias` (if any) oc; cols within 0..oc.
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn gemm_dt<const DT: u8>(
            out: &mut [f32],
            x: *const f32,
            rows: usize,
            w: *const u8,
            bias: Option<&[f32]>,
            c: usize,
            oc: usize,
            cols: Range<usize>,
        ) {
            let es = elem::<DT>();
            let o_ptr = out.as_mut_ptr();
            if rows == 1 && GEMV {
                // SAFETY: forwarded caller guarantees.
                unsafe { gemv::<DT>(o_ptr, x, w, bias, c, cols) };
                return;
            }
            let bias_of = |o: usize, n: usize| {
                let mut t = [0.0; NR];
                if let Some(b) = bias {
                    t[..n].copy_from_slice(&b[o..o + n]);
                }
                t
            };
            if DT != F32 && rows >= PACK_ROWS {
                // Prefill: each column block's 16-bit weight rows widened once per panel
                // into an L1 buffer (exact, and the sums keep their order).
                PACK.with_borrow_mut(|buf| {
                    if buf.len() < NR * c {
                        buf.resize(NR * c, 0.0);
                    }
                    let bp = buf.as_mut_ptr();
                    for_each_tile(rows, c, cols, MR, NR, |r, m, o, n, first| {
                        // SAFETY: forwarded caller guarantees; the tile lies within rows
                        // x cols; `buf` holds NR * c >= n * c floats.
                        unsafe {
                            if first {
                                widen_rows::<DT>(w.add(o * c * es), bp, n, c);
                            }
                            tile_any::<F32, false>(
                                m,
                                n,
                                x.add(r * c),
                                bp as *const u8,
                                c,
                                o_ptr.add(r * oc + o),
                                oc,
                                bias_of(o, n),
                            );
                        }
                    });
                });
                return;
            }
            for_each_tile(rows, c, cols, MR, NR, |r, m, o, n, _| {
                // SAFETY: forwarded caller guarantees; the tile lies within rows x cols.
                unsafe {
                    tile_any::<DT, true>(
                        m,
                        n,
                        x.add(r * c),
                        w.add(o * c * es),
                        c,
                        o_ptr.add(r * oc + o),
                        oc,
                        bias_of(o, n),
                    );
                }
            });
        }

        /// out (rows, oc) columns `cols` = inp (rows, c) . weight(cols)^T + bias for
        /// float weights; false (nothing written) for int8 weights. `call` tags the
        /// input (`matmul::next_call`): a thread pairs a bf16 call's input once.
        ///
        /// SAFETY: the target features present; `inp.len()` a multiple of c, `out` holds
        /// rows * oc, `weight` oc * c, `bias` (if any) oc; `cols` within 0..oc.
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn gemm(
            out: &mut [f32],
            inp: &[f32],
            weight: Weights<'_>,
            bias: Option<&[f32]>,
            c: usize,
            oc: usize,
            cols: Range<usize>,
            call: u64,
        ) -> bool {
            let (x, rows) = (inp.as_ptr(), inp.len() / c);
            // SAFETY: forwarded caller guarantees; a paired input holds inp.len() floats.
            unsafe {
                match weight {
                    Weights::F32(w) => {
                        gemm_dt::<F32>(out, x, rows, w.as_ptr() as _, bias, c, oc, cols)
                    }
                    Weights::BF16(w) => with_paired(inp, c, L, call, |x| {
                        gemm_dt::<BF16>(out, x, rows, w.as_ptr() as _, bias, c, oc, cols)
                    }),
                    Weights::F16(w) => {
                        gemm_dt::<F16>(out, x, rows, w.as_ptr() as _, bias, c, oc, cols)
                    }
                    Weights::Q8(_) => return false,
                }
            }
            true
        }
    };
}

/// The AVX2 instantiation: 8 lanes, tiles of up to 4 x 3.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    pub(super) mod ops {
        use std::arch::x86_64::*;

        pub(super) use super::super::super::avx2::hsum;
        pub(super) use super::super::super::tiled::load8 as loadw;

        pub type V = __m256;

        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn zero() -> V {
            _mm256_setzero_ps()
        }

        /// SAFETY: 8 readable floats at p.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub unsafe fn loadx(p: *const f32) -> V {
            // SAFETY: see the function's contract.
            unsafe { _mm256_loadu_ps(p) }
        }

        /// 16 bf16 weights at p as f32: the even channels, then the odd ones.
        ///
        /// SAFETY: 16 readable bf16 at p.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub unsafe fn loadw2(p: *const u8) -> (V, V) {
            // SAFETY: see the function's contract.
            let v = unsafe { _mm256_loadu_si256(p as *const __m256i) };
            let hi = _mm256_set1_epi32(0xffff_0000_u32 as i32);
            (
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
                _mm256_castsi256_ps(_mm256_and_si256(v, hi)),
            )
        }

        /// SAFETY: 8 writable floats at p.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub unsafe fn storex(p: *mut f32, v: V) {
            // SAFETY: see the function's contract.
            unsafe { _mm256_storeu_ps(p, v) }
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        pub fn fma(x: V, w: V, a: V) -> V {
            _mm256_fmadd_ps(x, w, a)
        }
    }

    // (The GEMV: chosen on a Zen 3 machine, where the AVX2 path is the default.)
    lane_kernels!("avx2,fma,f16c", 8, 4, rows 4 3 2, gemv true);
}

/// The AVX-512 instantiation (chosen by dispatch on CPUs with AVX-512F).
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    mod ops {
        use std::arch::x86_64::*;

        use super::super::super::tiled::{BF16, F32};

        pub type V = __m512;

        #[inline]
        #[target_feature(enable = "avx512f")]
        pub fn zero() -> V {
            _mm512_setzero_ps()
        }

        /// SAFETY: 16 readable floats at p.
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub unsafe fn loadx(p: *const f32) -> V {
            // SAFETY: see the function's contract.
            unsafe { _mm512_loadu_ps(p) }
        }

        /// 16 weights of type DT at p as f32 (bf16: the high half of an f32; f16 by
        /// the hardware conversion).
        ///
        /// SAFETY: 16 readable elements of type DT at p.
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub unsafe fn loadw<const DT: u8>(p: *const u8) -> V {
            // SAFETY: see the function's contract.
            unsafe {
                match DT {
                    F32 => _mm512_loadu_ps(p as *const f32),
                    BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                        _mm256_loadu_si256(p as *const __m256i),
                    ))),
                    _ => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
                }
            }
        }

        /// 32 bf16 weights at p as f32: the even channels, then the odd ones (each
        /// bf16 is the high half of an f32).
        ///
        /// SAFETY: 32 readable bf16 at p.
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub unsafe fn loadw2(p: *const u8) -> (V, V) {
            // SAFETY: see the function's contract.
            let v = unsafe { _mm512_loadu_si512(p as *const __m512i) };
            let hi = _mm512_set1_epi32(0xffff_0000_u32 as i32);
            (
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
                _mm512_castsi512_ps(_mm512_and_si512(v, hi)),
            )
        }

        /// SAFETY: 16 writable floats at p.
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub unsafe fn storex(p: *mut f32, v: V) {
            // SAFETY: see the function's contract.
            unsafe { _mm512_storeu_ps(p, v) }
        }

        #[inline]
        #[target_feature(enable = "avx512f")]
        pub fn fma(x: V, w: V, a: V) -> V {
            _mm512_fmadd_ps(x, w, a)
        }

        #[inline]
        #[target_feature(enable = "avx512f")]
        pub fn hsum(v: V) -> f32 {
            _mm512_reduce_add_ps(v)
        }
    }

    // (The 1 x 3 tiles for one row: decode 99-100 against 87-88 tok/s through the GEMV on
    // a 2-core Xeon with AVX-512, docs/benchmarks.md.)
    lane_kernels!("avx512f,avx2,fma,f16c", 16, 8, rows 8 4 3 2, gemv false);
}

/// The same kernels over pairs of AVX2 registers: for tests of the kernel logic on
/// machines without AVX-512, and for [`self_check`]'s comparison.
#[cfg(target_arch = "x86_64")]
pub(super) mod emu {
    mod ops {
        use std::arch::x86_64::*;

        use super::super::super::tiled::{BF16, F32};
        use crate::cpu::simd::avx2::{load_bf16x8, load_f16x8};

        /// Lanes 0..8 and 8..16.
        pub type V = [__m256; 2];

        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn zero() -> V {
            [_mm256_setzero_ps(); 2]
        }

        /// SAFETY: 16 readable floats at p.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub unsafe fn loadx(p: *const f32) -> V {
            // SAFETY: see the function's contract.
            unsafe { [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))] }
        }

        /// SAFETY: 16 readable elements of type DT at p.
        #[inline]
        #[target_feature(enable = "avx2,f16c")]
        pub unsafe fn loadw<const DT: u8>(p: *const u8) -> V {
            // SAFETY: see the function's contract.
            unsafe {
                match DT {
                    F32 => loadx(p as *const f32),
                    BF16 => [
                        load_bf16x8(p as *const half::bf16),
                        load_bf16x8((p as *const half::bf16).add(8)),
                    ],
                    _ => [
                        load_f16x8(p as *const half::f16),
                        load_f16x8((p as *const half::f16).add(8)),
                    ],
                }
            }
        }

        /// 32 bf16 weights at p as f32: the even channels, then the odd ones (lanes
        /// 0..8 from the first 16 weights, 8..16 from the next; the 8-lane op on each).
        ///
        /// SAFETY: 32 readable bf16 at p.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub unsafe fn loadw2(p: *const u8) -> (V, V) {
            use super::super::avx2::ops::loadw2 as half;
            // SAFETY: see the function's contract (16 bf16 at p, 16 at p + 32 bytes).
            let ((ea, oa), (eb, ob)) = unsafe { (half(p), half(p.add(32))) };
            ([ea, eb], [oa, ob])
        }

        /// SAFETY: 16 writable floats at p.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub unsafe fn storex(p: *mut f32, v: V) {
            use super::super::avx2::ops::storex as half;
            // SAFETY: see the function's contract.
            unsafe {
                half(p, v[0]);
                half(p.add(8), v[1]);
            }
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        pub fn fma(x: V, w: V, a: V) -> V {
            [
                _mm256_fmadd_ps(x[0], w[0], a[0]),
                _mm256_fmadd_ps(x[1], w[1], a[1]),
            ]
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        pub fn hsum(v: V) -> f32 {
            // SAFETY: the target features are enabled here.
            unsafe { super::super::super::avx2::hsum(_mm256_add_ps(v[0], v[1])) }
        }
    }

    lane_kernels!("avx2,fma,f16c", 16, 8, rows 8 4 3 2, gemv false);
}

/// Whether the AVX-512 kernels agree with the reference on a small product for every
/// float weight type (one row and a batch; sizes with tails): detection runs this once
/// before choosing the 16-lane path, so a CPU or toolchain on which they misbehave keeps
/// the 8-lane kernels.
#[cfg(target_arch = "x86_64")]
pub(crate) fn self_check() -> bool {
    agrees_with_reference(|out, inp, w, bias, c, oc| {
        // SAFETY: called only once AVX-512F (with AVX2, FMA, F16C) is detected; the
        // shapes are consistent.
        unsafe { avx512::gemm(out, inp, w, bias, c, oc, 0..oc, super::next_call()) }
    })
}

/// Whether `kernel` (`gemm`'s contract over all columns; false when it declines the
/// weights) matches the reference within 1e-4 (relative to 1 + |value|) on 11 x 45
/// inputs against 7 outputs, and on one row, for f32, bf16 and f16 weights.
fn agrees_with_reference(
    kernel: impl Fn(&mut [f32], &[f32], Weights<'_>, Option<&[f32]>, usize, usize) -> bool,
) -> bool {
    let (rows, c, oc) = (11usize, 45usize, 7usize);
    let x: Vec<f32> = (0..rows * c)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
        .collect();
    let wf: Vec<f32> = (0..oc * c)
        .map(|i| ((i * 53 % 97) as f32 - 48.0) / 128.0)
        .collect();
    let wb: Vec<half::bf16> = wf.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let wh: Vec<half::f16> = wf.iter().map(|&v| half::f16::from_f32(v)).collect();
    let bias: Vec<f32> = (0..oc).map(|j| j as f32 / 8.0).collect();
    [Weights::F32(&wf), Weights::BF16(&wb), Weights::F16(&wh)]
        .into_iter()
        .all(|w| {
            [1, rows].into_iter().all(|r| {
                let inp = &x[..r * c];
                let mut want = vec![0.0f32; r * oc];
                let mut got = vec![f32::NAN; r * oc];
                crate::reference::matmul::matmul_forward(&mut want, inp, w, Some(&bias), c, oc)
                    .is_ok()
                    && kernel(&mut got, inp, w, Some(&bias), c, oc)
                    && got
                        .iter()
                        .zip(&want)
                        .all(|(g, e)| (g - e).abs() <= 1e-4 * (1.0 + e.abs()))
            })
        })
}

/// [`emu`]'s kernels over columns `cols` (single-threaded): the 16-lane kernels' logic on
/// any AVX2 machine. False (nothing written) without AVX2 or for int8 weights.
///
/// The caller checked the shapes (`check_shapes`) and that `cols` lies within 0..oc.
pub(super) fn emulated(
    out: &mut [f32],
    inp: &[f32],
    weight: Weights<'_>,
    bias: Option<&[f32]>,
    c: usize,
    oc: usize,
    cols: Range<usize>,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::super::dispatch::detected() >= super::super::dispatch::Isa::Avx2 {
        // SAFETY: AVX2, FMA and F16C detected; shapes checked by the caller.
        return unsafe { emu::gemm(out, inp, weight, bias, c, oc, cols, super::next_call()) };
    }
    let _ = (out, inp, weight, bias, c, oc, cols);
    false
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Whole blocks of 2l channels deinterleave (evens, then odds), the tail stays in
    /// order, each row on its own.
    #[test]
    fn pair_rows_deinterleaves_whole_blocks_per_row() {
        let src: Vec<f32> = (0..18).map(|v| v as f32).collect();
        let mut dst = vec![f32::NAN; 18];
        pair_rows(&mut dst, &src, 9, 2);
        let want = [0, 2, 1, 3, 4, 6, 5, 7, 8, 9, 11, 10, 12, 13, 15, 14, 16, 17];
        assert_eq!(dst, want.map(|v| v as f32));
        pair_rows(&mut dst[..3], &src[..3], 3, 2);
        assert_eq!(dst[..3], [0.0, 1.0, 2.0]);
        // The shuffled widths agree with the general loop.
        let src: Vec<f32> = (0..3 * 77).map(|v| v as f32).collect();
        for l in [8, 16] {
            let (mut a, mut b) = (vec![0.0; src.len()], vec![0.0; src.len()]);
            pair_rows(&mut a, &src, 77, l);
            pair_rows_any(&mut b, &src, 77, l);
            assert_eq!(a, b, "l = {l}");
            assert_eq!(a[..3], [0.0, 2.0, 4.0]);
            assert_eq!(a[l..l + 2], [1.0, 3.0]);
        }
    }

    /// The detection guard accepts the 16-lane kernels' logic (the emulated copy) and
    /// rejects a kernel that is off in one output, one that writes nothing, and one that
    /// declines the weights.
    #[test]
    fn self_check_accepts_the_kernels_and_rejects_broken_ones() {
        if crate::cpu::dispatch::detected() < crate::cpu::dispatch::Isa::Avx2 {
            eprintln!("skipped: this CPU lacks AVX2, which the emulation runs on");
            return;
        }
        let emu = |out: &mut [f32], inp: &[f32], w: Weights<'_>, b: Option<&[f32]>, c, oc| {
            // SAFETY: AVX2, FMA and F16C detected above; consistent shapes.
            unsafe {
                emu::gemm(
                    out,
                    inp,
                    w,
                    b,
                    c,
                    oc,
                    0..oc,
                    crate::cpu::matmul::next_call(),
                )
            }
        };
        assert!(agrees_with_reference(emu));
        assert!(!agrees_with_reference(|out, inp, w, b, c, oc| {
            let ok = emu(out, inp, w, b, c, oc);
            out[out.len() / 2] += 1e-2;
            ok
        }));
        assert!(!agrees_with_reference(|_, _, _, _, _, _| true));
        assert!(!agrees_with_reference(|_, _, _, _, _, _| false));
        // Where the CPU has AVX-512, the real kernels must pass (detection would hide a
        // failure behind the AVX2 fallback).
        if std::arch::is_x86_feature_detected!("avx512f") {
            assert!(
                self_check(),
                "the AVX-512 kernels disagree with the reference"
            );
        } else {
            eprintln!("the AVX-512 kernels not run: this CPU lacks AVX-512F");
        }
    }
}
