//! bf16-compute matmul kernels for bf16 weights (AVX512_BF16): the input rows are
//! rounded to bf16 once (round to nearest even, [`round_rows`]), and every output is a
//! chain of `vdpbf16ps` over the input channels, 32 per instruction in 16 lanes, with no
//! widening of the weights at all: twice the multiply-adds of an f32 FMA per
//! instruction, which is what the batched critique step and prefill are bound by.
//!
//! A path that computes in bf16, so it is held to the bf16 tolerance (DESIGN.md), and it
//! is **opt-in**: detection takes it only when `CLOUDRM_ISA=avx512bf16` asks for it, the
//! CPU has AVX-512F and AVX512_BF16, and the kernels pass [`self_check`]. No machine this
//! project is built on has AVX512_BF16, so the kernel logic (tiles, tails, prefetch
//! bounds, summation order) is tested everywhere through [`emu`]: the same macro over
//! pairs of AVX2 registers, each `vdpbf16ps` lane step done as the instruction defines it
//! (the odd pair's exact product added first, then the even one's, each add rounded to
//! nearest even), which differs from the hardware only where it would flush denormal
//! inputs or outputs to zero.
//!
//! Per output: one 16-lane accumulator over the 32-channel steps, its horizontal sum,
//! the scalar tail (channels past the last multiple of 32, each exact bf16 product added
//! in order), then the bias, whatever the tile shape, so a row gives the same bits alone
//! (decode) and batched. Tiles are up to 8 input rows by 3 weight rows (24 of
//! the 32 zmm registers).

use std::cell::RefCell;
use std::ops::Range;

use half::bf16;

/// The kernels over `ops` (a module with `V`, `X`, `zero`, `xzero`, `load`, `dp`,
/// `hsum`) of `$lanes` f32 lanes (2 * `$lanes` bf16 channels per step), compiled for the
/// target features `$feat`, in tiles of up to `$mr` input rows (row blocks `rows`, then
/// 1) by 3 weight rows.
macro_rules! dot_kernels {
    ($feat:literal, $lanes:expr, $mr:expr, rows $($mm:literal)*) => {
        use std::arch::x86_64::*;
        use std::ops::Range;

        use half::bf16;

        use super::super::tiled::for_each_tile;
        use super::product;

        /// f32 lanes per accumulator.
        const L: usize = $lanes;
        /// bf16 channels per step.
        const S: usize = 2 * L;
        /// Input rows per tile.
        const MR: usize = $mr;
        /// Weight rows (output columns) per tile.
        const NR: usize = 3;

        /// out[i * ldo + j] = x_i . w_j + bias_j for i < M, j < N, x_i = x + i * c and
        /// w_j = w + j * c (bf16 bits); the next tile's weight rows (N rows on) are
        /// prefetched.
        ///
        /// SAFETY: the target features; rows i < M of x and j < N of w exist (c
        /// elements each); out[i * ldo + j] writable.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn tile<const M: usize, const N: usize>(
            x: *const u16,
            w: *const u16,
            c: usize,
            out: *mut f32,
            ldo: usize,
            bias: [f32; NR],
        ) {
            let nl = c / S * S;
            let mut acc = [[ops::zero(); N]; M];
            let mut k = 0;
            // SAFETY: k + S <= c for every vector load; prefetches never fault.
            unsafe {
                while k < nl {
                    if (2 * k).is_multiple_of(64) {
                        for j in 0..N {
                            let p = w.wrapping_add((j + N) * c + k);
                            _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                        }
                    }
                    let mut wv = [ops::xzero(); N];
                    for (j, v) in wv.iter_mut().enumerate() {
                        *v = ops::load(w.add(j * c + k));
                    }
                    for (i, row) in acc.iter_mut().enumerate() {
                        let xv = ops::load(x.add(i * c + k));
                        for (a, v) in row.iter_mut().zip(&wv) {
                            *a = ops::dp(*a, xv, *v);
                        }
                    }
                    k += S;
                }
                for (i, row) in acc.iter().enumerate() {
                    for (j, a) in row.iter().enumerate() {
                        let mut t = ops::hsum(*a);
                        for kk in nl..c {
                            t += product(*x.add(i * c + kk), *w.add(j * c + kk));
                        }
                        *out.add(i * ldo + j) = t + bias[j];
                    }
                }
            }
        }

        /// [`tile`] of M rows by n (<= NR) weight rows.
        ///
        /// SAFETY: as [`tile`].
        #[inline]
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn tile_n<const M: usize>(
            n: usize,
            x: *const u16,
            w: *const u16,
            c: usize,
            out: *mut f32,
            ldo: usize,
            bias: [f32; NR],
        ) {
            // SAFETY: forwarded caller guarantees.
            unsafe {
                match n {
                    3 => tile::<M, 3>(x, w, c, out, ldo, bias),
                    2 => tile::<M, 2>(x, w, c, out, ldo, bias),
                    _ => tile::<M, 1>(x, w, c, out, ldo, bias),
                }
            }
        }

        /// Rows 0..m (m <= MR) times weight rows 0..n (n <= NR).
        ///
        /// SAFETY: as [`tile`] for m rows and n weight rows.
        #[inline]
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn tile_any(
            m: usize,
            n: usize,
            x: *const u16,
            w: *const u16,
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
                        $($mm => tile_n::<$mm>(n, x, w, c, o, ldo, bias),)*
                        _ => tile_n::<1>(n, x, w, c, o, ldo, bias),
                    }
                }
                r += mm;
            }
        }

        /// out (rows, oc) columns `cols` = xb (rows, c) . w(cols)^T + bias, xb holding
        /// bf16 bits (rounded inputs).
        ///
        /// SAFETY: the target features present; `xb.len()` a multiple of c, `out` holds
        /// rows * oc, `w` oc * c, `bias` (if any) oc; `cols` within 0..oc.
        #[target_feature(enable = $feat)]
        pub(crate) unsafe fn gemm(
            out: &mut [f32],
            xb: &[u16],
            w: &[bf16],
            bias: Option<&[f32]>,
            c: usize,
            oc: usize,
            cols: Range<usize>,
        ) {
            let rows = xb.len() / c;
            let (x, w, o_ptr) = (xb.as_ptr(), w.as_ptr() as *const u16, out.as_mut_ptr());
            // (One row, decode, takes the 1 x 3 tiles too: 111-112 tok/s against 95 for a
            // single-chain GEMV over one linear stream, on a 2-core Xeon with AVX512_BF16.)
            let bias_of = |o: usize, n: usize| {
                let mut t = [0.0; NR];
                if let Some(b) = bias {
                    t[..n].copy_from_slice(&b[o..o + n]);
                }
                t
            };
            // SAFETY: AVX2 is implied by the features; tiles lie within rows x cols.
            unsafe {
                for_each_tile(rows, c, cols, MR, NR, |r, m, o, n, _| {
                    tile_any(
                        m,
                        n,
                        x.add(r * c),
                        w.add(o * c),
                        c,
                        o_ptr.add(r * oc + o),
                        oc,
                        bias_of(o, n),
                    );
                });
            }
        }
    };
}

/// The exact product of two bf16 values (8-bit significands: exact in f32), for the
/// channels past the last full step.
#[inline]
fn product(x: u16, w: u16) -> f32 {
    f32::from_bits((x as u32) << 16) * f32::from_bits((w as u32) << 16)
}

/// The hardware instantiation: AVX-512F + AVX512_BF16, 16 lanes, tiles of up to 8 x 3.
#[cfg(target_arch = "x86_64")]
pub(super) mod real {
    mod ops {
        use std::arch::x86_64::*;

        pub type V = __m512;
        /// 32 bf16 values.
        pub type X = __m512i;

        #[inline]
        #[target_feature(enable = "avx512f")]
        pub fn zero() -> V {
            _mm512_setzero_ps()
        }

        #[inline]
        #[target_feature(enable = "avx512f")]
        pub fn xzero() -> X {
            _mm512_setzero_si512()
        }

        /// SAFETY: 32 readable bf16 values at p.
        #[inline]
        #[target_feature(enable = "avx512f")]
        pub unsafe fn load(p: *const u16) -> X {
            // SAFETY: see the function's contract.
            unsafe { _mm512_loadu_si512(p as *const _) }
        }

        /// a + the pairwise bf16 dot products of x and w, lane by lane.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bf16")]
        pub fn dp(a: V, x: X, w: X) -> V {
            // SAFETY: __m512i and __m512bh are both 64 bytes of plain bits.
            let (x, w) = unsafe {
                (
                    std::mem::transmute::<X, __m512bh>(x),
                    std::mem::transmute::<X, __m512bh>(w),
                )
            };
            _mm512_dpbf16_ps(a, x, w)
        }

        #[inline]
        #[target_feature(enable = "avx512f")]
        pub fn hsum(v: V) -> f32 {
            _mm512_reduce_add_ps(v)
        }
    }

    dot_kernels!("avx512f,avx512bf16,avx2,fma,f16c", 16, 8, rows 8 4 3 2);
}

/// The same kernels over pairs of AVX2 registers, `vdpbf16ps` done lane by lane as the
/// instruction defines it: for tests of the kernel logic on machines without
/// AVX512_BF16, and the reference of [`self_check`]'s tiling checks.
#[cfg(target_arch = "x86_64")]
pub(super) mod emu {
    mod ops {
        use std::arch::x86_64::*;

        /// Lanes 0..8 and 8..16.
        pub type V = [__m256; 2];
        /// Channels 0..16 and 16..32.
        pub type X = [__m256i; 2];

        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn zero() -> V {
            [_mm256_setzero_ps(); 2]
        }

        #[inline]
        #[target_feature(enable = "avx2")]
        pub fn xzero() -> X {
            [_mm256_setzero_si256(); 2]
        }

        /// SAFETY: 32 readable bf16 values at p.
        #[inline]
        #[target_feature(enable = "avx2")]
        pub unsafe fn load(p: *const u16) -> X {
            // SAFETY: see the function's contract.
            unsafe {
                [
                    _mm256_loadu_si256(p as *const __m256i),
                    _mm256_loadu_si256(p.add(16) as *const __m256i),
                ]
            }
        }

        /// Lane l += x[2l+1] * w[2l+1], then += x[2l] * w[2l] (exact products, each add
        /// rounded: an FMA of an exact product is that add).
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        pub fn dp(a: V, x: X, w: X) -> V {
            let hi = _mm256_set1_epi32(0xFFFF_0000_u32 as i32);
            let mut r = a;
            for h in 0..2 {
                let (xo, wo) = (_mm256_and_si256(x[h], hi), _mm256_and_si256(w[h], hi));
                let (xe, we) = (_mm256_slli_epi32::<16>(x[h]), _mm256_slli_epi32::<16>(w[h]));
                r[h] = _mm256_fmadd_ps(_mm256_castsi256_ps(xo), _mm256_castsi256_ps(wo), r[h]);
                r[h] = _mm256_fmadd_ps(_mm256_castsi256_ps(xe), _mm256_castsi256_ps(we), r[h]);
            }
            r
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        pub fn hsum(v: V) -> f32 {
            // SAFETY: the target features are enabled here.
            unsafe { super::super::super::avx2::hsum(_mm256_add_ps(v[0], v[1])) }
        }
    }

    dot_kernels!("avx2,fma,f16c", 16, 8, rows 8 4 3 2);
}

/// dst[i] = the bf16 bits of src[i] rounded to nearest even, a NaN kept a (quiet) NaN,
/// as `half::bf16::from_f32` rounds; sixteen at a time with AVX2 where the CPU has it.
pub(crate) fn round_rows(dst: &mut [u16], src: &[f32]) {
    debug_assert_eq!(dst.len(), src.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if super::super::dispatch::has_avx2() {
        // SAFETY: AVX2 detected; the lengths are equal.
        done = unsafe { round_avx2(dst, src) };
    }
    for (d, &s) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = bf16::from_f32(s).to_bits();
    }
}

/// The whole multiples of 16 of [`round_rows`]; returns how many were done.
///
/// SAFETY: AVX2; `dst.len() == src.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn round_avx2(dst: &mut [u16], src: &[f32]) -> usize {
    use std::arch::x86_64::*;
    let n = src.len() / 16 * 16;
    let round = |v: __m256| {
        let b = _mm256_castps_si256(v);
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
        let r = _mm256_srli_epi32::<16>(_mm256_add_epi32(
            b,
            _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)),
        ));
        let q = _mm256_or_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(0x40));
        let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        _mm256_blendv_epi8(r, q, nan)
    };
    let mut i = 0;
    // SAFETY: i + 16 <= n <= len for every load and store.
    unsafe {
        while i < n {
            let a = round(_mm256_loadu_ps(src.as_ptr().add(i)));
            let b = round(_mm256_loadu_ps(src.as_ptr().add(i + 8)));
            // packus interleaves 128-bit halves: [a0-3 b0-3 a4-7 b4-7] -> reorder.
            let p = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(a, b));
            _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, p);
            i += 16;
        }
    }
    n
}

thread_local! {
    /// (call tag, this thread's rounded input of that call).
    static ROUNDED: RefCell<(u64, Vec<u16>)> = const { RefCell::new((0, Vec::new())) };
}

/// `f(inp rounded to bf16)`, through this thread's buffer: rounded once per `call` tag
/// (every work item of one matmul call shares the input; see `super::next_call`).
pub(super) fn with_rounded<R>(inp: &[f32], call: u64, f: impl FnOnce(&[u16]) -> R) -> R {
    ROUNDED.with_borrow_mut(|(tag, buf)| {
        if *tag != call {
            buf.resize(inp.len(), 0);
            round_rows(buf, inp);
            *tag = call;
        }
        f(buf)
    })
}

/// Rounded inputs (rows x c, bf16 bits), bf16 weights (oc x c) and a bias for the
/// self-checks: fixed values of order one, no two neighbours alike.
pub(super) fn test_inputs(rows: usize, c: usize, oc: usize) -> (Vec<u16>, Vec<bf16>, Vec<f32>) {
    let x: Vec<f32> = (0..rows * c)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0 + 1.0 / 1024.0)
        .collect();
    let mut xb = vec![0u16; x.len()];
    round_rows(&mut xb, &x);
    let w: Vec<bf16> = (0..oc * c)
        .map(|i| bf16::from_f32(((i * 53 % 97) as f32 - 48.0) / 128.0))
        .collect();
    let bias: Vec<f32> = (0..oc).map(|j| j as f32 / 8.0).collect();
    (xb, w, bias)
}

/// Whether `kernel` (the gemm's contract over all columns, on rounded inputs) matches
/// the reference on the same rounded inputs (so only the summation order differs) within
/// 1e-4 relative to 1 + |value|, on [`test_inputs`] of rows x c against oc outputs, and
/// on the first row alone.
pub(super) fn agrees_with_reference(
    rows: usize,
    c: usize,
    oc: usize,
    kernel: &impl Fn(&mut [f32], &[u16], &[bf16], Option<&[f32]>, usize, usize),
) -> bool {
    let (xb, w, bias) = test_inputs(rows, c, oc);
    let xr: Vec<f32> = xb
        .iter()
        .map(|&b| f32::from_bits((b as u32) << 16))
        .collect();
    [1, rows].into_iter().all(|r| {
        let mut want = vec![0.0f32; r * oc];
        let mut got = vec![f32::NAN; r * oc];
        let ok = crate::reference::matmul::matmul_forward(
            &mut want,
            &xr[..r * c],
            crate::Weights::BF16(&w),
            Some(&bias),
            c,
            oc,
        )
        .is_ok();
        kernel(&mut got, &xb[..r * c], &w, Some(&bias), c, oc);
        ok && got
            .iter()
            .zip(&want)
            .all(|(g, e)| (g - e).abs() <= 1e-4 * (1.0 + e.abs()))
    })
}

/// Whether the kernels agree with the reference on 11 x 77 inputs (two full steps and a
/// tail) against 7 outputs, and on one row.
fn agrees(kernel: impl Fn(&mut [f32], &[u16], &[bf16], Option<&[f32]>, usize, usize)) -> bool {
    agrees_with_reference(11, 77, 7, &kernel)
}

/// Whether the AVX512_BF16 kernels agree with the reference (see
/// [`agrees_with_reference`]): detection runs this once before taking the path.
#[cfg(target_arch = "x86_64")]
pub(crate) fn self_check() -> bool {
    agrees(|out, xb, w, bias, c, oc| {
        // SAFETY: called only once AVX-512F and AVX512_BF16 (with AVX2, FMA, F16C) are
        // detected; the shapes are consistent.
        unsafe { real::gemm(out, xb, w, bias, c, oc, 0..oc) }
    })
}

/// out (rows, oc) columns `cols` = round(inp) . weight(cols)^T + bias through the
/// hardware kernels, the rounded input shared by every item of `call`.
///
/// SAFETY: AVX-512F, AVX512_BF16, AVX2, FMA and F16C present; shapes as the gemm's.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm(
    out: &mut [f32],
    inp: &[f32],
    w: &[bf16],
    bias: Option<&[f32]>,
    c: usize,
    oc: usize,
    cols: Range<usize>,
    call: u64,
) {
    with_rounded(inp, call, |xb| {
        // SAFETY: forwarded caller guarantees.
        unsafe { real::gemm(out, xb, w, bias, c, oc, cols) }
    })
}

/// [`emu`]'s kernels over columns `cols` on the calling thread, the input rounded first
/// (once per `call` tag and thread): false (nothing written) without AVX2.
///
/// The caller checked the shapes and that `cols` lies within 0..oc.
#[allow(clippy::too_many_arguments)]
pub(super) fn emulated(
    out: &mut [f32],
    inp: &[f32],
    w: &[bf16],
    bias: Option<&[f32]>,
    c: usize,
    oc: usize,
    cols: Range<usize>,
    call: u64,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::super::dispatch::detected() >= super::super::dispatch::Isa::Avx2 {
        with_rounded(inp, call, |xb| {
            // SAFETY: AVX2, FMA and F16C detected; shapes checked by the caller.
            unsafe { emu::gemm(out, xb, w, bias, c, oc, cols) }
        });
        return true;
    }
    let _ = (out, inp, w, bias, c, oc, cols, call);
    false
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The vector rounding is `half`'s scalar one (round to nearest even), specials
    /// included.
    #[test]
    fn rounding_to_bf16_matches_the_scalar_rule() {
        let mut v: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            f32::from_bits(0x3F80_8000), // a tie: stays even
            f32::from_bits(0x3F81_8000), // a tie: rounds up to even
            f32::from_bits(0x3F80_8001),
            f32::MAX,
            f32::MIN_POSITIVE / 3.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7F80_0001), // a signalling NaN stays a NaN
        ];
        v.extend((0..37).map(|i| (i as f32 - 18.3) * 0.77e-3));
        let mut got = vec![0u16; v.len()];
        round_rows(&mut got, &v);
        for (&x, &g) in v.iter().zip(&got) {
            assert_eq!(g, bf16::from_f32(x).to_bits(), "{x:e}");
            if x.is_nan() {
                assert!(f32::from_bits((g as u32) << 16).is_nan());
            }
        }
    }

    /// The detection guard accepts the kernels' logic (the emulated copy) and rejects a
    /// kernel off in one output and one that writes nothing.
    #[test]
    fn self_check_accepts_the_kernels_and_rejects_broken_ones() {
        if crate::cpu::dispatch::detected() < crate::cpu::dispatch::Isa::Avx2 {
            eprintln!("skipped: this CPU lacks AVX2, which the emulation runs on");
            return;
        }
        let emu = |out: &mut [f32], xb: &[u16], w: &[bf16], b: Option<&[f32]>, c, oc| {
            // SAFETY: AVX2, FMA and F16C detected above; consistent shapes.
            unsafe { emu::gemm(out, xb, w, b, c, oc, 0..oc) }
        };
        assert!(agrees(emu));
        assert!(!agrees(|out, xb, w, b, c, oc| {
            emu(out, xb, w, b, c, oc);
            out[out.len() / 2] += 1e-2;
        }));
        assert!(!agrees(|_, _, _, _, _, _| {}));
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
        {
            assert!(
                self_check(),
                "the AVX512_BF16 kernels disagree with the reference"
            );
        } else {
            eprintln!("the AVX512_BF16 kernels not run: this CPU lacks AVX512_BF16");
        }
    }
}
