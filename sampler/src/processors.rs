//! Logits processors and the per-token [`Sampler`].
//!
//! Shapes: V = vocabulary size; `logits` is (V) f32, `history` is the token ids already in the
//! sequence (prompt and/or generated, as the caller decides; HF uses the whole `input_ids`).
//!
//! # Order (the same as Hugging Face transformers `generate`)
//!
//! 0. Sanitise: NaN -> -inf (a NaN is never sampled; all NaN is [`SamplerError::AllNan`]).
//! 1. Repetition penalty, exactly HF `RepetitionPenaltyLogitsProcessor`: for each *distinct*
//!    token id in `history`, `x = if x < 0 { x * penalty } else { x / penalty }`.
//!    Then, if any logit is +inf, the +inf tokens share the distribution (the limit): they
//!    become 0 and every other token -inf. No token above -inf left: [`SamplerError::AllMasked`].
//!    Greedy (temperature 0) stops here: the token is `argmax` (ties -> lowest id).
//! 2. Temperature, HF `TemperatureLogitsWarper` up to a shift: `x = (x - max) / T`. Softmax,
//!    top-k, top-p and min-p are invariant under the shift; it keeps a tiny `T` from
//!    overflowing to +inf (HF computes `x / T`).
//! 3. Top-k, HF `TopKLogitsWarper`: mask `x < kth largest`; ties with the k-th value are kept.
//! 4. Top-p, HF `TopPLogitsWarper`: order tokens ascending (ties: higher id first, i.e. the
//!    exact reverse of "descending value, then ascending id"), accumulate softmax
//!    probabilities in that order (f32), mask every token whose cumulative probability is
//!    `<= 1 - top_p` (threshold `(1 - top_p as f64) as f32`); the most likely token is always
//!    kept.
//! 5. Min-p, HF `MinPLogitsWarper`: mask `p < min_p * p_max` (f32 product).
//! 6. Softmax in place (`sample::softmax_in_place`), one coin from the sequence's
//!    [`SeqRng`], inverse CDF in index order (`sample::sample_from_probs`).
//!
//! Masked tokens are -inf. Probabilities in steps 4-5 are `exp(x - max) / sum`, the sum
//! accumulated in f32 in index order over the whole vocabulary (the same numbers
//! `softmax_in_place` produces).
//!
//! # RNG use
//!
//! Every `Sampler::sample` call advances the RNG cursor by exactly one step. A stochastic token
//! uses draw 0 of that step; a greedy token evaluates no Philox block (it "consumes no draw").
//! So the coin of the t-th token of a sequence is always `uniform(seed, sequence, t)`, whatever
//! the temperature of the earlier tokens.
//!
//! # Cost
//!
//! No allocation per token: the scratch (a (V) u32 index buffer and a (V/64) u64 bitmap) is
//! allocated once in [`Sampler::new`]. Per token: O(V) passes, plus O(V) for top-k selection
//! and O(n log n) for the top-p sort over the n tokens surviving top-k.

use std::cmp::Ordering;

use crate::argmax;
use crate::error::SamplerError;
use crate::params::SamplingParams;
use crate::rng::SeqRng;
use crate::sample::{sample_from_probs, softmax_in_place};

/// Samples tokens for one vocabulary size with fixed parameters; owns its scratch buffers.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    /// (V) token ids: surviving tokens, partially or fully sorted by logit, descending.
    order: Vec<u32>,
    /// (ceil(V / 64)) bitmap of ids already penalised in this call; all zero between calls.
    seen: Vec<u64>,
}

impl Sampler {
    /// Validates `params` and allocates the scratch for a vocabulary of `vocab_size` tokens.
    pub fn new(params: SamplingParams, vocab_size: usize) -> Result<Self, SamplerError> {
        params.validate()?;
        if vocab_size == 0 || vocab_size as u64 > u64::from(u32::MAX) + 1 {
            return Err(SamplerError::InvalidVocabSize { vocab_size });
        }
        Ok(Self {
            params,
            order: vec![0; vocab_size],
            seen: vec![0; vocab_size.div_ceil(64)],
        })
    }

    /// The parameters this sampler applies.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// V, the vocabulary size the sampler was built for.
    pub fn vocab_size(&self) -> usize {
        self.order.len()
    }

    /// Runs steps 0-5 in place: on return `logits` holds the processed logits (masked tokens
    /// -inf). For greedy parameters only steps 0-1 run.
    pub fn process(&mut self, logits: &mut [f32], history: &[u32]) -> Result<(), SamplerError> {
        self.sanitize_and_penalize(logits, history)?;
        if self.params.is_greedy() {
            return Ok(());
        }
        apply_temperature(logits, self.params.temperature);
        let n = self.collect_selectable(logits);
        let n = self.apply_top_k(logits, n);
        let n = self.apply_top_p(logits, n);
        self.apply_min_p(logits, n);
        Ok(())
    }

    /// Picks the next token. `logits` is overwritten: with the penalised logits for greedy
    /// parameters, with the probabilities the token was drawn from otherwise. The RNG cursor
    /// advances by one step (see the module docs).
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        history: &[u32],
        rng: &mut SeqRng,
    ) -> Result<u32, SamplerError> {
        self.process(logits, history)?;
        let vocab = logits.len();
        let index = if self.params.is_greedy() {
            rng.skip();
            argmax(logits).ok_or(SamplerError::AllMasked { vocab, nan: 0 })?
        } else {
            if !softmax_in_place(logits) {
                return Err(SamplerError::AllMasked { vocab, nan: 0 });
            }
            sample_from_probs(logits, rng.next_uniform())
        };
        // index < V <= 2^32 (checked in `new` and `check_len`).
        Ok(index as u32)
    }

    fn check_len(&self, logits: &[f32]) -> Result<(), SamplerError> {
        if logits.is_empty() {
            return Err(SamplerError::EmptyLogits);
        }
        if logits.len() != self.order.len() {
            return Err(SamplerError::VocabMismatch {
                expected: self.order.len(),
                actual: logits.len(),
            });
        }
        Ok(())
    }

    /// Steps 0 and 1.
    fn sanitize_and_penalize(
        &mut self,
        logits: &mut [f32],
        history: &[u32],
    ) -> Result<(), SamplerError> {
        self.check_len(logits)?;
        let vocab = logits.len();
        if let Some(position) = history.iter().position(|&t| t as usize >= vocab) {
            return Err(SamplerError::TokenOutOfRange {
                token: history[position],
                position,
                vocab,
            });
        }
        let mut nan = 0usize;
        for v in logits.iter_mut() {
            if v.is_nan() {
                *v = f32::NEG_INFINITY;
                nan += 1;
            }
        }
        if nan == vocab {
            return Err(SamplerError::AllNan { vocab });
        }
        let penalty = self.params.repetition_penalty;
        if penalty != 1.0 {
            for &token in history {
                let t = token as usize;
                let (word, bit) = (t / 64, 1u64 << (t % 64));
                if self.seen[word] & bit == 0 {
                    self.seen[word] |= bit;
                    let x = logits[t];
                    logits[t] = if x < 0.0 { x * penalty } else { x / penalty };
                }
            }
            // Only history ids set bits, so zeroing their words restores an all-zero bitmap.
            for &token in history {
                self.seen[token as usize / 64] = 0;
            }
        }
        if logits.contains(&f32::INFINITY) {
            for v in logits.iter_mut() {
                *v = if *v == f32::INFINITY {
                    0.0
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
        if !logits.iter().any(|&v| v > f32::NEG_INFINITY) {
            return Err(SamplerError::AllMasked { vocab, nan });
        }
        Ok(())
    }

    /// Fills `order[..n]` with the ids of the tokens above -inf, in id order; returns n.
    fn collect_selectable(&mut self, logits: &[f32]) -> usize {
        let mut n = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > f32::NEG_INFINITY {
                self.order[n] = i as u32;
                n += 1;
            }
        }
        n
    }

    /// Step 3 on `order[..n]`; returns the number of survivors, compacted to the front.
    fn apply_top_k(&mut self, logits: &mut [f32], n: usize) -> usize {
        let k = self.params.top_k;
        if k == 0 || k >= n {
            return n;
        }
        let (_, kth, _) =
            self.order[..n].select_nth_unstable_by(k - 1, |&a, &b| descending(logits, a, b));
        let kth = logits[*kth as usize];
        let mut kept = 0;
        for j in 0..n {
            let id = self.order[j];
            let v = &mut logits[id as usize];
            if *v < kth {
                *v = f32::NEG_INFINITY;
            } else {
                self.order[kept] = id;
                kept += 1;
            }
        }
        kept
    }

    /// Step 4 on `order[..n]`; returns the number of survivors (sorted descending at the front).
    fn apply_top_p(&mut self, logits: &mut [f32], n: usize) -> usize {
        let top_p = self.params.top_p;
        if top_p >= 1.0 || n <= 1 {
            return n;
        }
        let order = &mut self.order[..n];
        order.sort_unstable_by(|&a, &b| descending(logits, a, b));
        let (max, sum) = max_and_sum_exp(logits);
        let threshold = (1.0f64 - f64::from(top_p)) as f32;
        let mut cumulative = 0.0f32;
        let mut kept = n;
        // Ascending order; j == 0 (the most likely token) is always kept.
        for j in (1..n).rev() {
            let id = order[j] as usize;
            cumulative += (logits[id] - max).exp() / sum;
            if cumulative <= threshold {
                logits[id] = f32::NEG_INFINITY;
                kept = j;
            } else {
                break;
            }
        }
        kept
    }

    /// Step 5 on `order[..n]`.
    fn apply_min_p(&mut self, logits: &mut [f32], n: usize) {
        let min_p = self.params.min_p;
        if min_p <= 0.0 {
            return;
        }
        let (max, sum) = max_and_sum_exp(logits);
        // exp(max - max) = 1, so the largest probability is 1 / sum.
        let threshold = min_p * (1.0 / sum);
        for &id in &self.order[..n] {
            let v = &mut logits[id as usize];
            if (*v - max).exp() / sum < threshold {
                *v = f32::NEG_INFINITY;
            }
        }
    }
}

/// Step 2: `x = (x - max) / temperature` for `temperature > 0`; a no-op for `temperature <= 0`
/// (greedy) and for a buffer with nothing above -inf.
pub fn apply_temperature(logits: &mut [f32], temperature: f32) {
    if temperature <= 0.0 || temperature.is_nan() {
        return;
    }
    let max = logits
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    if !max.is_finite() {
        return;
    }
    for v in logits.iter_mut() {
        *v = (*v - max) / temperature;
    }
}

/// Descending by logit, then ascending by id: a total order (no NaN reaches it).
fn descending(logits: &[f32], a: u32, b: u32) -> Ordering {
    logits[b as usize]
        .partial_cmp(&logits[a as usize])
        .unwrap_or(Ordering::Equal)
        .then(a.cmp(&b))
}

/// Max and `sum_i exp(x_i - max)` in index order (f32), as in `softmax_in_place`.
fn max_and_sum_exp(logits: &[f32]) -> (f32, f32) {
    let max = logits
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let sum = logits.iter().fold(0.0f32, |s, &v| s + (v - max).exp());
    (max, sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams, vocab: usize) -> Sampler {
        Sampler::new(params, vocab).expect("valid sampler")
    }

    fn masked(logits: &[f32]) -> Vec<bool> {
        logits.iter().map(|&v| v == f32::NEG_INFINITY).collect()
    }

    #[test]
    fn repetition_penalty_hand_values() {
        // HF: x < 0 ? x * penalty : x / penalty, once per distinct id in the history.
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let mut s = sampler(params, 6);
        let mut logits = [2.0f32, -2.0, 0.5, f32::NEG_INFINITY, 0.0, 3.0];
        s.process(&mut logits, &[0, 1, 1, 3, 4, 0])
            .expect("process");
        // id 0: 2 / 2 = 1 (seen twice, penalised once); id 1: -2 * 2 = -4; id 3: -inf stays;
        // id 4: 0 / 2 = 0; ids 2 and 5 untouched.
        assert_eq!(logits, [1.0, -4.0, 0.5, f32::NEG_INFINITY, 0.0, 3.0]);
        // The bitmap is cleared: a second call penalises again from scratch.
        let mut logits = [2.0f32, -2.0, 0.5, 1.0, 0.0, 3.0];
        s.process(&mut logits, &[0]).expect("process");
        assert_eq!(logits, [1.0, -2.0, 0.5, 1.0, 0.0, 3.0]);

        // CLoud critique preset, penalty 1.01: 1.5 / 1.01 and -0.7 * 1.01 in f32.
        let mut s = sampler(SamplingParams::cloud_critique(), 3);
        let mut logits = [1.5f32, -0.7, 0.25];
        s.process(&mut logits, &[1, 0]).expect("process");
        assert_eq!(logits, [1.5f32 / 1.01, -0.7f32 * 1.01, 0.25]);
    }

    #[test]
    fn repetition_penalty_changes_greedy_choice() {
        // 3.0 / 1.01 = 2.9703 < 2.98, so the repeated token 0 loses to token 1.
        let mut s = sampler(SamplingParams::cloud_critique(), 2);
        let mut rng = SeqRng::new(0, 0);
        assert_eq!(s.sample(&mut [3.0, 2.98], &[0], &mut rng), Ok(1));
        assert_eq!(s.sample(&mut [3.0, 2.98], &[], &mut rng), Ok(0));
        // Greedy evaluates no draw but still advances the cursor one step per token.
        assert_eq!(rng.step(), 2);
    }

    #[test]
    fn temperature_shifts_and_scales() {
        let mut x = [1.0f32, 2.0, 3.0, f32::NEG_INFINITY];
        apply_temperature(&mut x, 0.5);
        assert_eq!(x, [-4.0, -2.0, 0.0, f32::NEG_INFINITY]);
        let mut y = [1.0f32, 2.0];
        apply_temperature(&mut y, 0.0);
        assert_eq!(y, [1.0, 2.0]);
        let mut z = [f32::NEG_INFINITY; 2];
        apply_temperature(&mut z, 2.0);
        assert_eq!(z, [f32::NEG_INFINITY; 2]);
    }

    #[test]
    fn tiny_temperature_does_not_overflow() {
        // HF's x / T would give -inf for both (all masked); the shifted form keeps the max at 0.
        let params = SamplingParams {
            temperature: 1e-38,
            ..SamplingParams::default()
        };
        let mut s = sampler(params, 3);
        let mut rng = SeqRng::new(3, 0);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [-1.0, -2.0, -1.5], &[], &mut rng), Ok(0));
        }
    }

    #[test]
    fn top_k_keeps_ties_at_the_boundary() {
        let params = SamplingParams {
            top_k: 2,
            ..SamplingParams::default()
        };
        let mut s = sampler(params, 5);
        let mut logits = [1.0f32, 3.0, 3.0, 2.0, 3.0];
        s.process(&mut logits, &[]).expect("process");
        assert_eq!(masked(&logits), [true, false, false, true, false]);

        let params = SamplingParams {
            top_k: 2,
            ..SamplingParams::default()
        };
        let mut s = sampler(params, 5);
        let mut logits = [1.0f32, 5.0, 3.0, 2.0, 3.0];
        s.process(&mut logits, &[]).expect("process");
        assert_eq!(masked(&logits), [true, false, false, true, false]);

        // k larger than the vocabulary: nothing masked.
        let params = SamplingParams {
            top_k: 99,
            ..SamplingParams::default()
        };
        let mut s = sampler(params, 3);
        let mut logits = [1.0f32, 5.0, 3.0];
        s.process(&mut logits, &[]).expect("process");
        assert_eq!(masked(&logits), [false; 3]);
    }

    #[test]
    fn top_p_hand_cases() {
        // probs ~ [0.5, 0.25, 0.125, 0.125] (ids 0..4).
        let base = [0.0f32, -(2f32.ln()), -(4f32.ln()), -(4f32.ln())];
        let run = |top_p: f32| {
            let params = SamplingParams {
                top_p,
                ..SamplingParams::default()
            };
            let mut s = sampler(params, 4);
            let mut logits = base;
            s.process(&mut logits, &[]).expect("process");
            masked(&logits)
        };
        // threshold 0.3: ascending cum 0.125 (id 3), 0.25 (id 2) removed; 0.5 (id 1) kept.
        assert_eq!(run(0.7), [false, false, true, true]);
        // threshold 0.2: the tie is broken toward the lower id: id 3 goes first, id 2 stays.
        assert_eq!(run(0.8), [false, false, false, true]);
        // threshold 0.6: only the top token survives.
        assert_eq!(run(0.4), [false, true, true, true]);
        // Tiny top_p still keeps the most likely token.
        assert_eq!(run(1e-6), [false, true, true, true]);
        assert_eq!(run(1.0), [false; 4]);
    }

    #[test]
    fn min_p_hand_cases() {
        let base = [0.0f32, -(2f32.ln()), -(4f32.ln()), -(4f32.ln())];
        let run = |min_p: f32| {
            let params = SamplingParams {
                min_p,
                ..SamplingParams::default()
            };
            let mut s = sampler(params, 4);
            let mut logits = base;
            s.process(&mut logits, &[]).expect("process");
            masked(&logits)
        };
        // p_max = 0.5: min_p 0.3 -> threshold 0.15 removes the two 0.125 tokens.
        assert_eq!(run(0.3), [false, false, true, true]);
        // min_p 0.6 -> threshold 0.3 removes 0.25 too.
        assert_eq!(run(0.6), [false, true, true, true]);
        assert_eq!(run(1.0), [false, true, true, true]);
        assert_eq!(run(0.2), [false; 4]);
    }

    #[test]
    fn nan_and_inf_logits() {
        let mut s = sampler(SamplingParams::default(), 4);
        let mut rng = SeqRng::new(11, 0);
        for _ in 0..200 {
            let t = s
                .sample(&mut [f32::NAN, 1.0, f32::NAN, 0.5], &[], &mut rng)
                .expect("sample");
            assert!(t == 1 || t == 3, "NaN token {t} sampled");
        }
        // +inf tokens share the distribution; other tokens are never drawn.
        let mut counts = [0usize; 4];
        for _ in 0..2000 {
            let t = s
                .sample(&mut [1.0, f32::INFINITY, 2.0, f32::INFINITY], &[], &mut rng)
                .expect("sample");
            counts[t as usize] += 1;
        }
        assert_eq!(counts[0] + counts[2], 0);
        assert!(counts[1] > 800 && counts[3] > 800, "{counts:?}");

        assert_eq!(
            s.sample(&mut [f32::NAN; 4], &[], &mut rng),
            Err(SamplerError::AllNan { vocab: 4 })
        );
        assert_eq!(
            s.sample(
                &mut [
                    f32::NEG_INFINITY,
                    f32::NAN,
                    f32::NEG_INFINITY,
                    f32::NEG_INFINITY
                ],
                &[],
                &mut rng
            ),
            Err(SamplerError::AllMasked { vocab: 4, nan: 1 })
        );

        let mut g = sampler(SamplingParams::greedy(), 4);
        assert_eq!(
            g.sample(&mut [f32::NAN, 1.0, f32::NAN, 0.5], &[], &mut rng),
            Ok(1)
        );
        assert_eq!(
            g.sample(&mut [1.0, f32::INFINITY, 2.0, f32::INFINITY], &[], &mut rng),
            Ok(1)
        );
        assert_eq!(
            g.sample(&mut [f32::NEG_INFINITY; 4], &[], &mut rng),
            Err(SamplerError::AllMasked { vocab: 4, nan: 0 })
        );
    }

    #[test]
    fn shape_and_history_errors() {
        assert_eq!(
            Sampler::new(SamplingParams::default(), 0).map(|_| ()),
            Err(SamplerError::InvalidVocabSize { vocab_size: 0 })
        );
        assert!(matches!(
            Sampler::new(
                SamplingParams {
                    top_p: 0.0,
                    ..SamplingParams::default()
                },
                4
            ),
            Err(SamplerError::InvalidParam { name: "top_p", .. })
        ));
        let mut s = sampler(SamplingParams::default(), 4);
        let mut rng = SeqRng::new(0, 0);
        assert_eq!(
            s.sample(&mut [], &[], &mut rng),
            Err(SamplerError::EmptyLogits)
        );
        assert_eq!(
            s.sample(&mut [0.0; 3], &[], &mut rng),
            Err(SamplerError::VocabMismatch {
                expected: 4,
                actual: 3
            })
        );
        assert_eq!(
            s.sample(&mut [0.0; 4], &[1, 4], &mut rng),
            Err(SamplerError::TokenOutOfRange {
                token: 4,
                position: 1,
                vocab: 4
            })
        );
        // Errors consume no step.
        assert_eq!(rng.step(), 0);
        assert_eq!(s.vocab_size(), 4);
        assert_eq!(s.params(), &SamplingParams::default());
    }

    #[test]
    fn stochastic_sample_leaves_probabilities() {
        let mut s = sampler(SamplingParams::default(), 3);
        let mut rng = SeqRng::new(5, 9);
        let mut logits = [0.0f32, 0.0, f32::NEG_INFINITY];
        let t = s.sample(&mut logits, &[], &mut rng).expect("sample");
        assert_eq!(logits, [0.5, 0.5, 0.0]);
        // coin = uniform(5, 9, 0): token 0 iff coin < 0.5.
        let coin = SeqRng::new(5, 9).uniform_at(0);
        assert_eq!(t, u32::from(coin >= 0.5));
        assert_eq!(rng.step(), 1);
    }
}
