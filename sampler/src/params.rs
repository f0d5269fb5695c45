//! Sampling parameters: what one generation request asks of the sampler.
//!
//! "Off" values follow Hugging Face transformers: `top_k == 0`, `top_p == 1.0`, `min_p == 0.0`,
//! `repetition_penalty == 1.0`. `temperature == 0.0` means greedy (argmax after the repetition
//! penalty). Presets for CLoud: [`SamplingParams::cloud_critique`] (greedy critique with
//! repetition penalty 1.01) and [`SamplingParams::cloud_self_consistency`] (temperature 0.5).

use crate::error::SamplerError;

/// Parameters of one generation request. Check them with [`SamplingParams::validate`]
/// (`Sampler::new` does so).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature, finite and >= 0. 0 = greedy (no RNG draw is made).
    pub temperature: f32,
    /// Keep the `top_k` largest logits (ties at the boundary kept). 0 = off.
    pub top_k: usize,
    /// Nucleus mass in (0, 1]. 1.0 = off.
    pub top_p: f32,
    /// Drop tokens with prob < `min_p` * max prob; in [0, 1]. 0 = off.
    pub min_p: f32,
    /// HF repetition penalty, finite and > 0. 1.0 = off.
    pub repetition_penalty: f32,
    /// RNG seed (the Philox key); see `rng.rs`.
    pub seed: u64,
    /// Maximum number of generated tokens, > 0.
    pub max_tokens: usize,
    /// Token ids that end the generation (not included in the output text).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end the generation when they appear in the decoded text; non-empty.
    pub stop_strings: Vec<String>,
}

impl Default for SamplingParams {
    /// Temperature 1.0, every filter off, seed 0, 256 tokens, no stop conditions.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
            max_tokens: 256,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: temperature 0, everything else as [`Default`].
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// CLoud critique generation: greedy with repetition penalty 1.01.
    pub fn cloud_critique() -> Self {
        Self {
            repetition_penalty: 1.01,
            ..Self::greedy()
        }
    }

    /// CLoud self-consistency critiques: temperature 0.5, seeded.
    pub fn cloud_self_consistency(seed: u64) -> Self {
        Self {
            temperature: 0.5,
            seed,
            ..Self::default()
        }
    }

    /// True when sampling reduces to argmax (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every field's domain; the first violation is returned.
    pub fn validate(&self) -> Result<(), SamplerError> {
        fn bad(name: &'static str, value: impl ToString, reason: &'static str) -> SamplerError {
            SamplerError::InvalidParam {
                name,
                value: value.to_string(),
                reason,
            }
        }
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(bad(
                "temperature",
                t,
                "must be finite and >= 0 (0 = greedy)",
            ));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(bad("top_p", p, "must be in (0, 1] (1 = off)"));
        }
        let m = self.min_p;
        if !(0.0..=1.0).contains(&m) {
            return Err(bad("min_p", m, "must be in [0, 1] (0 = off)"));
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Err(bad(
                "repetition_penalty",
                r,
                "must be finite and > 0 (1 = off)",
            ));
        }
        if self.max_tokens == 0 {
            return Err(bad("max_tokens", 0, "must be > 0"));
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return Err(bad(
                "stop_strings",
                "\"\"",
                "stop strings must be non-empty",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_of(err: SamplerError) -> &'static str {
        match err {
            SamplerError::InvalidParam { name, .. } => name,
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn presets_are_valid() {
        for p in [
            SamplingParams::default(),
            SamplingParams::greedy(),
            SamplingParams::cloud_critique(),
            SamplingParams::cloud_self_consistency(7),
        ] {
            assert_eq!(p.validate(), Ok(()), "{p:?}");
        }
        assert!(SamplingParams::greedy().is_greedy());
        assert!(!SamplingParams::default().is_greedy());
        assert_eq!(SamplingParams::default().max_tokens, 256);
        assert_eq!(SamplingParams::cloud_critique().repetition_penalty, 1.01);
        assert_eq!(SamplingParams::cloud_self_consistency(3).temperature, 0.5);
    }

    #[test]
    fn bad_params_rejected() {
        let d = SamplingParams::default;
        let cases: Vec<(SamplingParams, &str)> = vec![
            (
                SamplingParams {
                    temperature: -0.1,
                    ..d()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..d()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::INFINITY,
                    ..d()
                },
                "temperature",
            ),
            (SamplingParams { top_p: 0.0, ..d() }, "top_p"),
            (SamplingParams { top_p: 1.5, ..d() }, "top_p"),
            (
                SamplingParams {
                    top_p: f32::NAN,
                    ..d()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: -0.01,
                    ..d()
                },
                "min_p",
            ),
            (SamplingParams { min_p: 1.01, ..d() }, "min_p"),
            (
                SamplingParams {
                    min_p: f32::NAN,
                    ..d()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..d()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: -1.0,
                    ..d()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: f32::NAN,
                    ..d()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: f32::INFINITY,
                    ..d()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    max_tokens: 0,
                    ..d()
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    stop_strings: vec!["ok".into(), String::new()],
                    ..d()
                },
                "stop_strings",
            ),
        ];
        for (p, want) in cases {
            let err = p.validate().expect_err(want);
            assert!(err.to_string().contains(want), "{err}");
            assert_eq!(name_of(err), want);
        }
    }

    #[test]
    fn boundary_params_accepted() {
        let d = SamplingParams::default;
        for p in [
            SamplingParams { top_p: 1.0, ..d() },
            SamplingParams { top_p: 1e-7, ..d() },
            SamplingParams { min_p: 1.0, ..d() },
            SamplingParams { min_p: 0.0, ..d() },
            SamplingParams { top_k: 0, ..d() },
            SamplingParams {
                top_k: usize::MAX,
                ..d()
            },
            SamplingParams {
                temperature: 0.0,
                ..d()
            },
            SamplingParams {
                repetition_penalty: 1e-3,
                ..d()
            },
        ] {
            assert_eq!(p.validate(), Ok(()), "{p:?}");
        }
    }
}
