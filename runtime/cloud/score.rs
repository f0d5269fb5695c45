//! Scoring with a reward model: classic (reward at the end of the response) or CLoud
//! (K critiques continuing one shared prefix, reward at the end of each critique,
//! aggregated), plus compare and best-of-n on top.
//!
//! Decoding follows the CLoud reference settings: greedy with repetition penalty 1.01
//! for one critique; temperature 0.5 for self-consistency (K > 1); stop at the
//! end-of-turn token (or the tokenizer's EOS, taken as end of turn); at most 1024 new
//! tokens, after which the end-of-turn token is fed anyway. Feeding the end-of-turn
//! token is the forward step that yields the reward: no second pass over the sequence.

use cloudrm_loader::template::ChatTemplate;
use cloudrm_loader::tokenizer::Tokenizer;
use cloudrm_sampler::{Sampler, SamplingParams, SeqRng};

use super::template::CloudTemplate;
use crate::backend::Cpu;
use crate::error::{Error, Result};
use crate::model::{FeedbackMethod, LogitsMode, RewardModel};

/// How the K rewards become one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aggregation {
    #[default]
    Mean,
    Median,
    Min,
    Max,
}

impl Aggregation {
    pub fn apply(self, xs: &[f32]) -> f32 {
        if xs.is_empty() {
            return f32::NAN;
        }
        match self {
            Aggregation::Mean => {
                (xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64) as f32
            }
            Aggregation::Min => xs.iter().copied().fold(f32::INFINITY, f32::min),
            Aggregation::Max => xs.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            Aggregation::Median => {
                let mut v = xs.to_vec();
                v.sort_by(f32::total_cmp);
                let n = v.len();
                if n % 2 == 1 {
                    v[n / 2]
                } else {
                    (v[n / 2 - 1] + v[n / 2]) / 2.0
                }
            }
        }
    }
}

/// Scoring options.
#[derive(Debug, Clone)]
pub struct ScoreOptions {
    /// Critiques per response (self-consistency); 1 = one greedy critique.
    pub k: usize,
    /// Sampling temperature; `None` = 0 for K = 1, 0.5 for K > 1.
    pub temperature: Option<f32>,
    pub top_p: f32,
    pub repetition_penalty: f32,
    pub seed: u64,
    pub max_critique_tokens: usize,
    pub aggregation: Aggregation,
    /// Score without a critique even if the model is a CLoud model.
    pub classic: bool,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions {
            k: 1,
            temperature: None,
            top_p: 1.0,
            repetition_penalty: 1.01,
            seed: 0,
            max_critique_tokens: 1024,
            aggregation: Aggregation::Mean,
            classic: false,
        }
    }
}

/// The score of one response.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// Aggregated reward.
    pub reward: f32,
    /// (K) per-critique rewards (one entry in classic mode).
    pub rewards: Vec<f32>,
    /// (K) critique texts (empty in classic mode).
    pub critiques: Vec<String>,
    /// (K) critique token ids, without the end-of-turn token.
    pub critique_tokens: Vec<Vec<u32>>,
    /// (K) whether each critique hit the token limit before its end-of-turn token.
    pub truncated: Vec<bool>,
    /// Tokens of the shared prefix (classic: the whole sequence).
    pub prefix_tokens: usize,
}

/// The outcome of comparing two responses to one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub a: Score,
    pub b: Score,
    /// Bradley-Terry probability that A is preferred: sigmoid(r_a - r_b).
    pub p_a_preferred: f32,
}

/// A reward model with its tokenizer and chat template, ready to score.
pub struct CloudScorer<'m> {
    pub model: &'m RewardModel,
    pub tokenizer: &'m Tokenizer,
    pub template: &'m ChatTemplate,
    pub cpu: Cpu,
}

impl<'m> CloudScorer<'m> {
    pub fn new(
        model: &'m RewardModel,
        tokenizer: &'m Tokenizer,
        template: &'m ChatTemplate,
    ) -> Self {
        CloudScorer {
            model,
            tokenizer,
            template,
            cpu: Cpu::fast(),
        }
    }

    fn layout(&self) -> CloudTemplate<'_> {
        CloudTemplate::new(self.template, self.tokenizer)
    }

    fn reward_of(&self, hidden: &[f32]) -> Result<f32> {
        let mut r = [0.0f32];
        let mut scratch = vec![0.0; self.model.llama.config.hidden_size];
        self.model.rewards(hidden, &mut r, &mut scratch)?;
        Ok(r[0])
    }

    /// Score one response: classic or CLoud according to the model and `opts.classic`.
    pub fn score(&self, prompt: &str, response: &str, opts: &ScoreOptions) -> Result<Score> {
        if opts.classic || self.model.method == FeedbackMethod::Classic {
            self.score_classic(prompt, response)
        } else {
            self.score_cloud(prompt, response, opts)
        }
    }

    /// Classic mode: the reward at the end-of-turn token closing the response.
    pub fn score_classic(&self, prompt: &str, response: &str) -> Result<Score> {
        let ids = self.layout().classic_sequence(prompt, response)?;
        let llama = &self.model.llama;
        let mut sess = llama.new_session(ids.len(), 64);
        llama.forward(&self.cpu, &mut sess, &ids, LogitsMode::None)?;
        let reward = self.reward_of(sess.last_hidden())?;
        Ok(Score {
            reward,
            rewards: vec![reward],
            critiques: vec![],
            critique_tokens: vec![],
            truncated: vec![],
            prefix_tokens: ids.len(),
        })
    }

    /// CLoud mode: K critiques continuing the shared prefix, each scored at its
    /// end-of-turn token; the prefix is prefilled once.
    pub fn score_cloud(&self, prompt: &str, response: &str, opts: &ScoreOptions) -> Result<Score> {
        if opts.k == 0 {
            return Err(Error::Usage(
                "K (critiques per response) must be at least 1".into(),
            ));
        }
        let (prefix, eot) = self.layout().cloud_prefix(prompt, response)?;
        let llama = &self.model.llama;
        let vocab = llama.config.vocab_size;
        let temperature = opts
            .temperature
            .unwrap_or(if opts.k > 1 { 0.5 } else { 0.0 });
        let params = SamplingParams {
            temperature,
            top_p: opts.top_p,
            repetition_penalty: opts.repetition_penalty,
            seed: opts.seed,
            max_tokens: opts.max_critique_tokens.max(1),
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(params, vocab).map_err(|e| Error::Usage(e.to_string()))?;
        let mut stops: Vec<u32> = vec![eot];
        stops.extend(self.tokenizer.eos_token_id());
        stops.extend(llama.config.eos_token_ids.iter().copied());

        let capacity = prefix.len() + opts.max_critique_tokens + 1;
        let mut sess = llama.new_session(capacity, 64);
        let prefix_logits = llama
            .forward(&self.cpu, &mut sess, &prefix, LogitsMode::Last)?
            .to_vec();
        let mut logits = vec![0.0f32; vocab];
        let mut history: Vec<u32> = Vec::with_capacity(capacity);
        let mut score = Score {
            reward: 0.0,
            rewards: Vec::with_capacity(opts.k),
            critiques: Vec::with_capacity(opts.k),
            critique_tokens: Vec::with_capacity(opts.k),
            truncated: Vec::with_capacity(opts.k),
            prefix_tokens: prefix.len(),
        };
        for k in 0..opts.k {
            sess.truncate(prefix.len());
            logits.copy_from_slice(&prefix_logits);
            history.clear();
            history.extend_from_slice(&prefix);
            let mut rng = SeqRng::new(opts.seed, k as u64);
            let mut critique = Vec::new();
            let mut truncated = true;
            while critique.len() < opts.max_critique_tokens {
                let next = sampler
                    .sample(&mut logits, &history, &mut rng)
                    .map_err(|e| Error::Usage(e.to_string()))?;
                if stops.contains(&next) {
                    truncated = false;
                    break;
                }
                critique.push(next);
                history.push(next);
                let l = llama.forward(&self.cpu, &mut sess, &[next], LogitsMode::Last)?;
                logits.copy_from_slice(l);
            }
            // Feeding the end-of-turn token is the step whose hidden state is scored.
            llama.forward(&self.cpu, &mut sess, &[eot], LogitsMode::None)?;
            let reward = self.reward_of(sess.last_hidden())?;
            score.rewards.push(reward);
            score
                .critiques
                .push(self.tokenizer.decode(&critique, true)?.trim().to_string());
            score.critique_tokens.push(critique);
            score.truncated.push(truncated);
        }
        score.reward = opts.aggregation.apply(&score.rewards);
        Ok(score)
    }

    /// Compare two responses to one prompt.
    pub fn compare(
        &self,
        prompt: &str,
        a: &str,
        b: &str,
        opts: &ScoreOptions,
    ) -> Result<Comparison> {
        let sa = self.score(prompt, a, opts)?;
        let sb = self.score(prompt, b, opts)?;
        let p = 1.0 / (1.0 + (-(sa.reward as f64 - sb.reward as f64)).exp());
        Ok(Comparison {
            a: sa,
            b: sb,
            p_a_preferred: p as f32,
        })
    }

    /// Score every candidate; returns the index of the best and all scores.
    pub fn best_of_n(
        &self,
        prompt: &str,
        candidates: &[&str],
        opts: &ScoreOptions,
    ) -> Result<(usize, Vec<Score>)> {
        if candidates.is_empty() {
            return Err(Error::Usage(
                "best-of-n needs at least one candidate".into(),
            ));
        }
        let scores = candidates
            .iter()
            .map(|c| self.score(prompt, c, opts))
            .collect::<Result<Vec<_>>>()?;
        let best = scores
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.reward.total_cmp(&y.1.reward))
            .map_or(0, |(i, _)| i);
        Ok((best, scores))
    }
}
