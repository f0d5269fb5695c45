//! Vector math shared by the fast CPU kernels.

/// The vector `exp`s' constants, one set for every width (so each lane of each width does
/// the same operations and gives the same bits): the argument clamp, ln 2 split for
/// Cody-Waite range reduction, and the Cephes degree-6 polynomial, highest term first.
#[cfg(target_arch = "x86_64")]
mod exp_consts {
    pub(super) const MAX: f32 = 88.0;
    pub(super) const MIN: f32 = -87.3;
    pub(super) const LN2_HI: f32 = 0.693_359_4;
    pub(super) const LN2_LO: f32 = -2.121_944_4e-4;
    pub(super) const POLY: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ];
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    /// Eight bf16 values at `p` as f32 (a bf16 is the high half of an f32).
    ///
    /// SAFETY: AVX2; 8 readable elements at p.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn load_bf16x8(p: *const bf16) -> __m256 {
        // SAFETY: see the function's contract.
        unsafe {
            let raw = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
        }
    }

    /// Eight f16 values at `p` as f32.
    ///
    /// SAFETY: AVX2+F16C; 8 readable elements at p.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub(crate) unsafe fn load_f16x8(p: *const f16) -> __m256 {
        // SAFETY: see the function's contract.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }

    /// e^x in eight lanes: Cody-Waite range reduction and the Cephes degree-6 polynomial,
    /// relative error ~2 ulp for arguments in [-87.3, 88]; arguments are clamped to that
    /// range, so below -87.3 it gives ~1e-38 instead of 0 (an absolute error far below f32
    /// resolution of any sum it enters) and above 88 it gives e^88 (~1.65e38) instead of
    /// inf.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn exp(x: __m256) -> __m256 {
        use super::exp_consts::{LN2_HI, LN2_LO, MAX, MIN, POLY};
        let x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(MAX)), _mm256_set1_ps(MIN));
        let fx = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(LN2_LO), r);
        let mut y = _mm256_set1_ps(POLY[0]);
        for c in &POLY[1..] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(*c));
        }
        y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r);
        y = _mm256_add_ps(y, _mm256_set1_ps(1.0));
        let e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(y, _mm256_castsi256_ps(e))
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::avx2::exp`] in sixteen lanes: each lane its operations in its order (the
    /// same bits).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn exp(x: __m512) -> __m512 {
        use super::exp_consts::{LN2_HI, LN2_LO, MAX, MIN, POLY};
        let x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(MAX)), _mm512_set1_ps(MIN));
        let fx = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(LN2_LO), r);
        let mut y = _mm512_set1_ps(POLY[0]);
        for c in &POLY[1..] {
            y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(*c));
        }
        y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r);
        y = _mm512_add_ps(y, _mm512_set1_ps(1.0));
        let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(fx),
            _mm512_set1_epi32(127),
        ));
        _mm512_mul_ps(y, _mm512_castsi512_ps(e))
    }
}
