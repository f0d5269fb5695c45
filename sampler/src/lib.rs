//! cloudrm-sampler: logits processors and seeded sampling. The reference semantics that the GPU
//! sampling kernel (`kernels/cuda/sampling.cu`) reproduces.
//!
//! - [`params`]: [`SamplingParams`] and its validation.
//! - [`processors`]: the HF-ordered processors (repetition penalty, temperature, top-k, top-p,
//!   min-p) and the allocation-free per-token [`Sampler`].
//! - [`rng`]: counter-based Philox4x32-10, one stream per sequence ([`SeqRng`]).
//! - [`sample`]: softmax and inverse-CDF selection from a coin (llm.c `sampler.h`).
//! - [`stop`]: stop tokens, stop strings, max tokens ([`StopChecker`]).

pub mod error;
pub mod params;
pub mod processors;
pub mod rng;
pub mod sample;
pub mod stop;

pub use error::SamplerError;
pub use params::SamplingParams;
pub use processors::{Sampler, apply_temperature};
pub use rng::{SeqRng, philox4x32_10, uniform_from_bits};
pub use sample::{sample_from_probs, softmax_in_place};
pub use stop::{FinishReason, StopChecker, StopKind, StopStatus};

/// Index of the largest logit; ties go to the lowest index; NaN never wins. `None` for an empty
/// slice or one that is all NaN. -inf can win when nothing larger is present.
pub fn argmax(logits: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if x <= b => {}
            _ => best = Some((i, x)),
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_picks_first_max() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), Some(1));
        assert_eq!(argmax(&[]), None);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -5.0]), Some(1));
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), Some(0));
        assert_eq!(argmax(&[-0.0, 0.0]), Some(0));
    }

    #[test]
    fn argmax_nan_never_wins() {
        // The old version kept a NaN found at index 0 forever.
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0]), Some(2));
        assert_eq!(argmax(&[1.0, f32::NAN, 0.5]), Some(0));
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), Some(1));
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), None);
        assert_eq!(argmax(&[f32::NAN, f32::INFINITY, f32::INFINITY]), Some(1));
    }
}
