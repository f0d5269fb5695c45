//! Vector math shared by the fast CPU kernels.

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
}
