//! Selection of a token from a distribution, separate from the RNG draw (llm.c `sampler.h`:
//! `sample_mult(probs, n, coin)`). The coin comes from `rng.rs`; this file never draws.
//!
//! Shapes: V = vocabulary size. All arithmetic is f32, sums in index order.

/// Numerically stable softmax in place over a (V) f32 buffer: `p_i = exp(x_i - max) / sum_j
/// exp(x_j - max)`, the sum accumulated in f32 in index order, then one division per element.
///
/// Defined edge cases: NaN entries get probability 0; -inf entries get 0; if any entry is
/// +inf, the +inf entries share the mass equally (the limit) and the rest get 0; if no entry
/// is above -inf (or the slice is empty), every output is 0 and the function returns `false`.
/// Returns `true` when the output is a distribution.
pub fn softmax_in_place(x: &mut [f32]) -> bool {
    let mut max = f32::NEG_INFINITY;
    for &v in x.iter() {
        if v > max {
            max = v;
        }
    }
    if max == f32::NEG_INFINITY {
        x.iter_mut().for_each(|v| *v = 0.0);
        return false;
    }
    if max == f32::INFINITY {
        let mut n_inf = 0usize;
        for v in x.iter_mut() {
            if *v == f32::INFINITY {
                *v = 1.0;
                n_inf += 1;
            } else {
                *v = 0.0;
            }
        }
        let share = 1.0 / n_inf as f32;
        x.iter_mut().filter(|v| **v == 1.0).for_each(|v| *v = share);
        return true;
    }
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        // NaN > max is false; map NaN to 0 explicitly (exp(NaN) would be NaN).
        let e = if v.is_nan() { 0.0 } else { (*v - max).exp() };
        *v = e;
        sum += e;
    }
    // sum >= exp(0) = 1 because the max element contributes exactly 1.
    for v in x.iter_mut() {
        *v /= sum;
    }
    true
}

/// Inverse-CDF selection in index order: the first index `i` with `probs[i] > 0` and
/// `coin < probs[0] + ... + probs[i]` (f32 running sum in index order). `coin` should be in
/// `[0, 1)`.
///
/// When rounding leaves `coin` at or above the total (or `coin` is NaN), the last index with
/// a nonzero probability is returned. A zero-probability index is never returned unless no
/// entry is positive (or the slice is empty), in which case the result is 0; callers that can
/// hit that case check the distribution first (`Sampler` does).
pub fn sample_from_probs(probs: &[f32], coin: f32) -> usize {
    let mut cdf = 0.0f32;
    let mut last_nonzero = 0usize;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cdf += p;
            last_nonzero = i;
            if coin < cdf {
                return i;
            }
        }
    }
    last_nonzero
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_matches_formula() {
        // exp([0, ln2, ln3] - ln3) / sum = [1, 2, 3] / 6
        let mut x = [0.0f32, 2f32.ln(), 3f32.ln()];
        assert!(softmax_in_place(&mut x));
        for (got, want) in x.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn softmax_edge_cases() {
        let mut x = [f32::NAN, 0.0, f32::NEG_INFINITY, 0.0];
        assert!(softmax_in_place(&mut x));
        assert_eq!(x, [0.0, 0.5, 0.0, 0.5]);

        let mut x = [1.0, f32::INFINITY, 3.0, f32::INFINITY];
        assert!(softmax_in_place(&mut x));
        assert_eq!(x, [0.0, 0.5, 0.0, 0.5]);

        let mut x = [f32::NEG_INFINITY, f32::NAN];
        assert!(!softmax_in_place(&mut x));
        assert_eq!(x, [0.0, 0.0]);

        let mut x: [f32; 0] = [];
        assert!(!softmax_in_place(&mut x));

        // Huge logits do not overflow thanks to the max subtraction.
        let mut x = [1e30f32, 1e30, -1e30];
        assert!(softmax_in_place(&mut x));
        assert_eq!(x, [0.5, 0.5, 0.0]);
    }

    #[test]
    fn inverse_cdf_boundaries() {
        let p = [0.25f32, 0.0, 0.5, 0.25];
        assert_eq!(sample_from_probs(&p, 0.0), 0);
        assert_eq!(sample_from_probs(&p, 0.2499), 0);
        assert_eq!(sample_from_probs(&p, 0.25), 2);
        assert_eq!(sample_from_probs(&p, 0.7499), 2);
        assert_eq!(sample_from_probs(&p, 0.75), 3);
        assert_eq!(sample_from_probs(&p, 0.999_999_94), 3);
        // Coin above the total (rounding): the last nonzero index, never a zero entry.
        let q = [0.3f32, 0.3, 0.0];
        assert_eq!(sample_from_probs(&q, 0.9), 1);
        assert_eq!(sample_from_probs(&q, f32::NAN), 1);
        // A negative coin still never selects a zero-probability entry.
        assert_eq!(sample_from_probs(&[0.0, 1.0], -0.5), 1);
        // Degenerate inputs: defined, no panic.
        assert_eq!(sample_from_probs(&[], 0.5), 0);
        assert_eq!(sample_from_probs(&[0.0, 0.0], 0.5), 0);
        assert_eq!(sample_from_probs(&[f32::NAN, 0.5], 0.1), 1);
    }
}
