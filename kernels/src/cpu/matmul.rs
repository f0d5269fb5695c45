//! Fast linear layer (same contract as `reference::matmul::matmul_forward`): work split
//! along the output dimension across threads; each weight row is converted to f32 once
//! per call and dotted with every input row (B rows), AVX2+FMA where available.

use half::{bf16, f16};

use super::dispatch::{Isa, current, num_threads};
use super::pool;
use crate::error::KernelError;
use crate::reference::matmul::check_shapes;
use crate::weights::Weights;

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
    let threads = num_threads().clamp(1, out_features.div_ceil(16).max(1));
    let threads = if rows * in_features * out_features < 1 << 15 {
        1
    } else {
        threads
    };
    // Output columns are split in contiguous chunks; each participant writes its own
    // columns of every row through a raw pointer (disjoint index sets).
    let out_ptr = SendPtr(out.as_mut_ptr());
    let out_len = out.len();
    pool::global().run(threads, &|p, n| {
        let chunk = out_features.div_ceil(n);
        let start = p * chunk;
        let end = ((p + 1) * chunk).min(out_features);
        if start >= end {
            return;
        }
        // SAFETY: every participant writes only columns start..end of each output row,
        // the ranges of different participants are disjoint, and `out` outlives `run`.
        let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get(), out_len) };
        WROW.with_borrow_mut(|wrow| {
            if wrow.len() < in_features {
                wrow.resize(in_features, 0.0);
            }
            compute(
                out,
                inp,
                weight,
                bias,
                in_features,
                out_features,
                start..end,
                &mut wrow[..in_features],
                isa,
            );
        });
    });
    Ok(())
}

thread_local! {
    /// One weight row converted to f32, per thread; grows once to the widest C seen.
    static WROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: used only to hand disjoint column ranges of one buffer to pool participants.
unsafe impl Send for SendPtr {}
// SAFETY: as above; participants never touch the same element.
unsafe impl Sync for SendPtr {}

#[allow(clippy::too_many_arguments)]
fn compute(
    out: &mut [f32],
    inp: &[f32],
    weight: Weights<'_>,
    bias: Option<&[f32]>,
    in_features: usize,
    out_features: usize,
    cols: std::ops::Range<usize>,
    wrow: &mut [f32],
    isa: Isa,
) {
    let rows = inp.len() / in_features;
    for o in cols {
        let w = weight.slice(o * in_features, in_features);
        let b = bias.map_or(0.0, |b| b[o]);
        if rows == 1 {
            out[o] = dot_weights(&inp[..in_features], w, isa) + b;
            continue;
        }
        convert_row(w, wrow, isa);
        for r in 0..rows {
            let x = &inp[r * in_features..][..in_features];
            out[r * out_features + o] = dot_f32(x, wrow, isa) + b;
        }
    }
}

fn convert_row(w: Weights<'_>, dst: &mut [f32], isa: Isa) {
    match w {
        Weights::F32(w) => dst.copy_from_slice(w),
        Weights::BF16(w) => {
            for (d, s) in dst.iter_mut().zip(w) {
                *d = s.to_f32();
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
            }
        };
    }
    let _ = isa;
    match w {
        Weights::F32(w) => scalar_dot(x, w, |v| *v),
        Weights::BF16(w) => scalar_dot(x, w, |v: &bf16| v.to_f32()),
        Weights::F16(w) => scalar_dot(x, w, |v: &f16| v.to_f32()),
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

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
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

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_bf16x8(p: *const bf16) -> __m256 {
        // SAFETY: caller guarantees 8 readable elements at p.
        unsafe {
            let raw = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
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
                let w0 = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(i) as *const __m128i));
                let w1 = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(i + 8) as *const __m128i));
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
                let v = _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i) as *const __m128i));
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), v);
                i += 8;
            }
        }
        for j in n8..n {
            dst[j] = w[j].to_f32();
        }
    }
}
