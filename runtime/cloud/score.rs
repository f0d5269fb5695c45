//! Scoring with a reward model: classic (reward at the end of the response) or CLoud
//! (K critiques continuing one shared prefix, reward at the end of each critique,
//! aggregated), plus compare and best-of-n on top.
//!
//! Decoding follows the CLoud reference settings: greedy with repetition penalty 1.01
//! for one critique; temperature 0.5 for self-consistency (K > 1); stop at the
//! end-of-turn token (or the tokenizer's EOS, taken as end of turn); at most 1024 new
//! tokens, after which the end-of-turn token is fed anyway. Feeding the end-of-turn
//! token is the forward step that yields the reward: no second pass over the sequence.

use std::cell::RefCell;
use std::sync::Mutex;

use cloudrm_kernels::cpu::{dispatch, pool};
use cloudrm_loader::template::ChatTemplate;
use cloudrm_loader::tokenizer::Tokenizer;
use cloudrm_sampler::{Sampler, SamplerError, SamplingParams, SeqRng};

use super::CloudError;
use super::template::CloudTemplate;
use crate::backend::Cpu;
use crate::engine::{KvCache, PagedEngine};
use crate::error::{Error, Result};
use crate::kv::{PrefixKey, SeqId};

/// Prefix-cache keys of the unshared baseline's private prefills (one per critique).
const UNSHARED_KEY_BASE: u64 = 1 << 62;
use crate::model::{FeedbackMethod, RewardModel};

/// KV block size of the scoring engine (positions).
pub(super) const BLOCK: usize = 16;

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
    /// Share the prefix between the K critiques (one prefill, forked blocks, cascade
    /// attention). `false` prefills K private copies and attends each on its own: the
    /// baseline that sharing is measured and tested against.
    pub share_prefix: bool,
    /// Benchmarks: stop tokens are sampled as ordinary tokens, so every critique runs
    /// exactly `max_critique_tokens` tokens before its end-of-turn token is fed.
    pub ignore_stops: bool,
    /// What the KV cache holds: f32 (default) or f16 (half the attention bytes per step;
    /// rewards move by the rounding of every cached K and V).
    pub kv_cache: KvCache,
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
            share_prefix: true,
            ignore_stops: false,
            kv_cache: KvCache::F32,
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
    /// Leading prefix tokens whose K/V came from the prefix cache of an earlier request
    /// (the prompt shared by compared responses, a response scored again).
    pub cached_prefix_tokens: usize,
    /// KV blocks allocated for the prefix by this request (once when shared, K times
    /// when not).
    pub prefix_blocks_allocated: usize,
}

/// The outcome of comparing two responses to one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub a: Score,
    pub b: Score,
    /// Bradley-Terry probability that A is preferred: sigmoid(r_a - r_b).
    pub p_a_preferred: f32,
}

impl Comparison {
    /// The comparison of two scores: P(A preferred) = sigmoid(r_a - r_b).
    pub fn new(a: Score, b: Score) -> Self {
        let p = 1.0 / (1.0 + (-(a.reward as f64 - b.reward as f64)).exp());
        Comparison {
            a,
            b,
            p_a_preferred: p as f32,
        }
    }
}

/// A reward model with its tokenizer and chat template, ready to score.
pub struct CloudScorer<'m> {
    pub model: &'m RewardModel,
    pub tokenizer: &'m Tokenizer,
    pub template: &'m ChatTemplate,
    pub cpu: Cpu,
    /// The paged engine, kept across calls so that its prefix cache serves later
    /// requests; grown (and its cache dropped) when a request needs more blocks or rows.
    engine: RefCell<Option<PagedEngine>>,
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
            engine: RefCell::new(None),
        }
    }

    pub(super) fn layout(&self) -> CloudTemplate<'_> {
        CloudTemplate::new(self.template, self.tokenizer)
    }

    fn reward_of(&self, hidden: &[f32]) -> Result<f32> {
        let mut r = [0.0f32];
        let mut scratch = vec![0.0; self.model.llama.config.hidden_size];
        self.model.rewards(hidden, &mut r, &mut scratch)?;
        Ok(r[0])
    }

    /// Appends one finished critique to `score`: its reward (NaN if it never closed),
    /// its text (decoded, trimmed), its tokens and whether it was truncated.
    pub(super) fn push_critique(
        &self,
        score: &mut Score,
        reward: Option<f32>,
        critique: Vec<u32>,
        truncated: bool,
    ) -> Result<()> {
        score.rewards.push(reward.unwrap_or(f32::NAN));
        score
            .critiques
            .push(self.tokenizer.decode(&critique, true)?.trim().to_string());
        score.critique_tokens.push(critique);
        score.truncated.push(truncated);
        Ok(())
    }

    /// Whether `opts` scores with critiques on this model.
    pub(super) fn cloud_mode(&self, opts: &ScoreOptions) -> bool {
        !opts.classic && self.model.method != FeedbackMethod::Classic
    }

    /// Score one response: classic or CLoud according to the model and `opts.classic`.
    pub fn score(&self, prompt: &str, response: &str, opts: &ScoreOptions) -> Result<Score> {
        validate(prompt, response, opts)?;
        if !self.cloud_mode(opts) {
            self.classic_checked(prompt, response, opts.kv_cache)
        } else {
            self.cloud_checked(prompt, response, opts)
        }
    }

    /// Classic mode: the reward at the end-of-turn token closing the response.
    pub fn score_classic(&self, prompt: &str, response: &str) -> Result<Score> {
        validate(prompt, response, &ScoreOptions::default())?;
        self.classic_checked(prompt, response, KvCache::F32)
    }

    /// `score_classic` on an already validated request, with a `cache` KV cache.
    fn classic_checked(&self, prompt: &str, response: &str, cache: KvCache) -> Result<Score> {
        let ids = self.layout().classic_sequence(prompt, response)?;
        let llama = &self.model.llama;
        let context = llama.config.max_position_embeddings;
        if ids.len() > context {
            return Err(CloudError::TooLong {
                what: "prompt + response",
                tokens: ids.len(),
                extra: 0,
                context,
            }
            .into());
        }
        // Through the paged engine: fast causal attention, and the prefix cache serves
        // the prompt shared by compared responses.
        let blocks = ids.len().div_ceil(BLOCK);
        let mut slot = self.engine.borrow_mut();
        if slot.as_ref().is_none_or(|e| {
            e.num_blocks() <= blocks
                || e.max_rows() < crate::engine::PREFILL_ROWS
                || e.kv_cache() != cache
        }) {
            *slot = Some(PagedEngine::with_cache(
                llama,
                4 * blocks + 1,
                BLOCK,
                crate::engine::PREFILL_ROWS,
                cache,
            )?);
        }
        let Some(engine) = slot.as_mut() else {
            return Err(Error::Usage("scoring engine unavailable".into()));
        };
        let cached = engine.cached_prefix_len(&ids);
        let (seq, _, hidden) = engine.prefill(llama, &self.cpu, &ids)?;
        engine.free(seq)?;
        let reward = self.reward_of(&hidden)?;
        Ok(Score {
            reward,
            rewards: vec![reward],
            critiques: vec![],
            critique_tokens: vec![],
            truncated: vec![],
            prefix_tokens: ids.len(),
            cached_prefix_tokens: cached,
            prefix_blocks_allocated: blocks - cached / BLOCK,
        })
    }

    /// CLoud mode: the shared prefix is prefilled once into the paged cache, forked K
    /// times without copying, and the K critiques are decoded in lock step (one batched
    /// pass per step, the prefix K/V read once for all rows by cascade attention). A row
    /// that samples its end of turn feeds the end-of-turn token in the next step, and that
    /// step's hidden state is its reward: rows finish at different steps.
    pub fn score_cloud(&self, prompt: &str, response: &str, opts: &ScoreOptions) -> Result<Score> {
        validate(prompt, response, opts)?;
        self.cloud_checked(prompt, response, opts)
    }

    /// The scoring engine slot (kept across calls for its prefix cache).
    pub(super) fn engine_slot(&self) -> &RefCell<Option<PagedEngine>> {
        &self.engine
    }

    /// The CLoud prefix and end-of-turn token of a validated request, checked against
    /// the context length.
    pub(super) fn cloud_layout_checked(
        &self,
        prompt: &str,
        response: &str,
        opts: &ScoreOptions,
    ) -> Result<(Vec<u32>, u32)> {
        let (prefix, eot) = self.layout().cloud_prefix(prompt, response)?;
        let context = self.model.llama.config.max_position_embeddings;
        if prefix.len() + opts.max_critique_tokens + 1 > context {
            return Err(CloudError::TooLong {
                what: "prompt + response",
                tokens: prefix.len(),
                extra: opts.max_critique_tokens + 1,
                context,
            }
            .into());
        }
        Ok((prefix, eot))
    }

    /// The critique sampler for `opts` and the tokens that end a critique.
    pub(super) fn sampler_and_stops(&self, opts: &ScoreOptions) -> Result<(Sampler, Vec<u32>)> {
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
        let sampler = Sampler::new(params, vocab).map_err(|e| CloudError::InvalidOption {
            name: "sampling",
            value: format!("temperature {temperature}, top-p {}", opts.top_p),
            reason: e.to_string(),
        })?;
        let mut stops: Vec<u32> = Vec::new();
        stops.extend(self.tokenizer.eos_token_id());
        stops.extend(llama.config.eos_token_ids.iter().copied());
        Ok((sampler, stops))
    }

    /// `score_cloud` on an already validated request.
    fn cloud_checked(&self, prompt: &str, response: &str, opts: &ScoreOptions) -> Result<Score> {
        if opts.share_prefix {
            let mut scores = self.score_batch(&[(prompt, response)], opts)?;
            return scores
                .pop()
                .ok_or_else(|| Error::Usage("the scoring batch returned nothing".into()));
        }
        let k = opts.k;
        let (prefix, eot) = self.cloud_layout_checked(prompt, response, opts)?;
        let llama = &self.model.llama;
        let (sampler, mut stops) = self.sampler_and_stops(opts)?;
        stops.insert(0, eot);

        // Blocks: the prefix once, plus each critique's own tail (+1 for a copied
        // partial prefix block and +1 for the end-of-turn token).
        let per_seq = (opts.max_critique_tokens + 1).div_ceil(BLOCK) + 1;
        let prefix_blocks = prefix.len().div_ceil(BLOCK);
        let num_blocks = k * (prefix_blocks + per_seq) + 1;
        let mut slot = self.engine.borrow_mut();
        let reuse = slot.as_ref().is_some_and(|e| {
            e.num_blocks() >= num_blocks && e.max_rows() >= k && e.kv_cache() == opts.kv_cache
        });
        if !reuse {
            // Room for a few requests' cached prefixes beside this one.
            let blocks = num_blocks + 4 * prefix.len().div_ceil(BLOCK);
            *slot = Some(PagedEngine::with_cache(
                llama,
                blocks,
                BLOCK,
                k.max(crate::engine::PREFILL_ROWS),
                opts.kv_cache,
            )?);
        }
        let Some(engine) = slot.as_mut() else {
            return Err(Error::Usage("scoring engine unavailable".into()));
        };
        let before = engine.used_blocks();
        let mut score = self.unshared_job(engine, &prefix, eot, opts, sampler, &stops)?;
        score.prefix_blocks_allocated = score.prefix_blocks_allocated.saturating_sub(before);
        score.prefix_tokens = prefix.len();
        score.cached_prefix_tokens = 0;
        Ok(score)
    }

    /// K private prefills (each under its own prefix-cache key, so nothing is shared)
    /// and plain paged attention: the baseline for the shared job.
    fn unshared_job(
        &self,
        engine: &mut PagedEngine,
        prefix: &[u32],
        eot: u32,
        opts: &ScoreOptions,
        sampler: Sampler,
        stops: &[u32],
    ) -> Result<Score> {
        let llama = &self.model.llama;
        let mut seqs = Vec::with_capacity(opts.k);
        let mut logits = None;
        let mut result = Ok(());
        for i in 0..opts.k {
            engine.set_prefix_key(PrefixKey {
                adapter: UNSHARED_KEY_BASE + i as u64,
            });
            match engine.prefill(llama, &self.cpu, prefix) {
                Ok((seq, l, _)) => {
                    seqs.push(seq);
                    logits.get_or_insert(l);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        engine.set_prefix_key(PrefixKey::BASE);
        let used = engine.used_blocks();
        let score = result.and_then(|()| {
            let logits = logits.unwrap_or_default();
            self.lock_step(
                engine, None, &seqs, prefix, logits, eot, opts, &sampler, stops,
            )
        });
        for &seq in &seqs {
            engine.free(seq)?;
        }
        let mut score = score?;
        score.prefix_blocks_allocated = used;
        Ok(score)
    }

    #[allow(clippy::too_many_arguments)]
    fn lock_step(
        &self,
        engine: &mut PagedEngine,
        owner: Option<SeqId>,
        children: &[SeqId],
        prefix: &[u32],
        prefix_logits: Vec<f32>,
        eot: u32,
        opts: &ScoreOptions,
        sampler: &Sampler,
        stops: &[u32],
    ) -> Result<Score> {
        let k = children.len();
        let llama = &self.model.llama;
        let vocab = llama.config.vocab_size;
        let c = llama.config.hidden_size;

        let reserve = opts.max_critique_tokens.min(4096);
        let mut rows: Vec<CritiqueRow> = children
            .iter()
            .enumerate()
            .map(|(i, &seq)| CritiqueRow::new(seq, i, &prefix_logits, prefix, reserve, opts))
            .collect();
        let samplers = Samplers::new(sampler);
        let mut seqs = Vec::with_capacity(k);
        let mut tokens = Vec::with_capacity(k);
        let mut live = Vec::with_capacity(k);
        let mut lm_out = vec![0.0f32; k * vocab];
        let mut rewards = vec![0.0f32; k];
        let mut lm_rows = Vec::with_capacity(k);
        let mut reward_rows = Vec::with_capacity(k);
        let mut scratch = vec![0.0f32; c];
        let lm_head = llama.weights.get(&llama.weights.lm_head);
        let head = self.model.head.view(&llama.weights);
        loop {
            seqs.clear();
            tokens.clear();
            live.clear();
            samplers.draw(rows.iter_mut(), opts.max_critique_tokens);
            for (i, row) in rows.iter_mut().enumerate() {
                if row.reward.is_some() {
                    continue;
                }
                let next = row.feed_next(opts, stops, eot)?;
                seqs.push(row.seq);
                tokens.push(next);
                live.push(i);
            }
            if seqs.is_empty() {
                break;
            }
            let hidden = engine.decode_step(
                llama,
                &self.cpu,
                &seqs,
                &tokens,
                owner.map(|o| (o, prefix.len())),
            )?;
            // The dual-head step: rewards for the rows that fed their end of turn, LM
            // logits (one batched matmul) for the rows still writing.
            lm_rows.clear();
            reward_rows.clear();
            for (b, &i) in live.iter().enumerate() {
                if rows[i].closing {
                    reward_rows.push(b);
                } else {
                    lm_rows.push(b);
                }
            }
            self.cpu.dual_head(
                &mut lm_out[..lm_rows.len() * vocab],
                &mut rewards[..reward_rows.len()],
                hidden,
                c,
                &lm_rows,
                &reward_rows,
                lm_head,
                &head,
                &mut scratch,
            )?;
            let (mut j_lm, mut j_rw) = (0, 0);
            for &i in &live {
                let row = &mut rows[i];
                if row.closing {
                    row.reward = Some(rewards[j_rw]);
                    j_rw += 1;
                } else {
                    row.logits
                        .copy_from_slice(&lm_out[j_lm * vocab..(j_lm + 1) * vocab]);
                    j_lm += 1;
                }
            }
        }
        let mut score = Score {
            reward: 0.0,
            rewards: Vec::with_capacity(k),
            critiques: Vec::with_capacity(k),
            critique_tokens: Vec::with_capacity(k),
            truncated: Vec::with_capacity(k),
            prefix_tokens: prefix.len(),
            cached_prefix_tokens: 0,
            prefix_blocks_allocated: 0,
        };
        for row in rows {
            self.push_critique(&mut score, row.reward, row.critique, row.truncated)?;
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
        let (sa, sb) = if self.cloud_mode(opts) && opts.share_prefix {
            validate(prompt, a, opts)?;
            validate(prompt, b, opts)?;
            let mut s = self
                .score_batch(&[(prompt, a), (prompt, b)], opts)?
                .into_iter();
            match (s.next(), s.next()) {
                (Some(sa), Some(sb)) => (sa, sb),
                _ => return Err(Error::Usage("the scoring batch lost a response".into())),
            }
        } else {
            (self.score(prompt, a, opts)?, self.score(prompt, b, opts)?)
        };
        Ok(Comparison::new(sa, sb))
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
        let scores = if self.cloud_mode(opts) && opts.share_prefix {
            let reqs: Vec<(&str, &str)> = candidates.iter().map(|c| (prompt, *c)).collect();
            self.score_batch(&reqs, opts)?
        } else {
            candidates
                .iter()
                .map(|c| self.score(prompt, c, opts))
                .collect::<Result<Vec<_>>>()?
        };
        Ok((best_index(&scores), scores))
    }
}

/// The index of the highest reward (the last of equal ones; 0 for none).
pub(super) fn best_index(scores: &[Score]) -> usize {
    scores
        .iter()
        .enumerate()
        .max_by(|x, y| x.1.reward.total_cmp(&y.1.reward))
        .map_or(0, |(i, _)| i)
}

/// Request checks shared by every scoring path.
pub(super) fn validate(prompt: &str, response: &str, opts: &ScoreOptions) -> Result<()> {
    if prompt.trim().is_empty() {
        return Err(CloudError::EmptyText { field: "prompt" }.into());
    }
    if response.trim().is_empty() {
        return Err(CloudError::EmptyText { field: "response" }.into());
    }
    if opts.k == 0 {
        return Err(CloudError::InvalidOption {
            name: "k",
            value: "0".into(),
            reason: "at least one critique per response".into(),
        }
        .into());
    }
    if let Some(t) = opts.temperature
        && !(t >= 0.0 && t.is_finite())
    {
        return Err(CloudError::InvalidOption {
            name: "temperature",
            value: t.to_string(),
            reason: "must be a finite number >= 0".into(),
        }
        .into());
    }
    if opts.max_critique_tokens == 0 {
        return Err(CloudError::InvalidOption {
            name: "max_critique_tokens",
            value: "0".into(),
            reason: "a critique needs at least one token".into(),
        }
        .into());
    }
    Ok(())
}

/// What a critique row feeds at its next step (one rule for every scorer: the CPU job,
/// the batch scorer and the CUDA job).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Feed {
    /// A critique token: appended to the critique (and the row's history) and fed.
    Token(u32),
    /// The end-of-turn token: fed, and its step gives the row's reward. `truncated`: the
    /// critique reached `max_critique_tokens`, rather than drawing a stop token.
    EndOfTurn { truncated: bool },
}

impl Feed {
    /// The feed of a row that has `written` critique tokens: the end of turn once it has
    /// `max_critique_tokens`, else its drawn token (`draw` runs only then), a stop token
    /// ending the critique unless `ignore_stops` (benchmarks: a drawn stop, the end of
    /// turn included, is then an ordinary critique token, so every critique runs to its
    /// cap).
    pub(super) fn choose<E>(
        written: usize,
        opts: &ScoreOptions,
        stops: &[u32],
        draw: impl FnOnce() -> std::result::Result<u32, E>,
    ) -> std::result::Result<Feed, E> {
        if written >= opts.max_critique_tokens {
            return Ok(Feed::EndOfTurn { truncated: true });
        }
        let t = draw()?;
        Ok(if !opts.ignore_stops && stops.contains(&t) {
            Feed::EndOfTurn { truncated: false }
        } else {
            Feed::Token(t)
        })
    }

    /// Applies the feed to a row's state and returns the token to feed (`eot` for the
    /// end of turn).
    pub(super) fn apply(
        self,
        eot: u32,
        critique: &mut Vec<u32>,
        history: &mut Vec<u32>,
        truncated: &mut bool,
        closing: &mut bool,
    ) -> u32 {
        match self {
            Feed::Token(t) => {
                critique.push(t);
                history.push(t);
                t
            }
            Feed::EndOfTurn { truncated: cut } => {
                *truncated |= cut;
                *closing = true;
                eot
            }
        }
    }
}

/// One critique being written (the batch scorer's rows and the unshared arm's).
pub(super) struct CritiqueRow {
    pub seq: SeqId,
    pub logits: Vec<f32>,
    pub history: Vec<u32>,
    pub rng: SeqRng,
    pub critique: Vec<u32>,
    pub truncated: bool,
    /// The end-of-turn token has been chosen; the next step feeds it.
    pub closing: bool,
    pub reward: Option<f32>,
    /// The token just drawn from `logits` ([`Samplers::draw`]), taken by the step.
    pub drawn: Option<std::result::Result<u32, SamplerError>>,
}

impl CritiqueRow {
    /// Critique `index` of a request on sequence `seq`, after `prefix` whose last logits
    /// are `logits`, with room for `room` critique tokens up front (no reallocation while
    /// decoding); its sampling stream is (seed, index), as `score` alone uses it.
    pub(super) fn new(
        seq: SeqId,
        index: usize,
        logits: &[f32],
        prefix: &[u32],
        room: usize,
        opts: &ScoreOptions,
    ) -> Self {
        let mut history = Vec::with_capacity(prefix.len() + room);
        history.extend_from_slice(prefix);
        CritiqueRow {
            seq,
            logits: logits.to_vec(),
            history,
            rng: SeqRng::new(opts.seed, index as u64),
            critique: Vec::with_capacity(room),
            truncated: false,
            closing: false,
            reward: None,
            drawn: None,
        }
    }

    /// What the row feeds next ([`Feed`]): its drawn token, or `eot` when it closes.
    pub(super) fn feed_next(
        &mut self,
        opts: &ScoreOptions,
        stops: &[u32],
        eot: u32,
    ) -> Result<u32> {
        let feed = Feed::choose(self.critique.len(), opts, stops, || self.take_drawn())?;
        Ok(feed.apply(
            eot,
            &mut self.critique,
            &mut self.history,
            &mut self.truncated,
            &mut self.closing,
        ))
    }

    /// The token just drawn, or the sampler's error as a usage error.
    pub(super) fn take_drawn(&mut self) -> Result<u32> {
        self.drawn
            .take()
            .ok_or_else(|| Error::Usage("a critique row was not sampled".into()))?
            .map_err(|e| Error::Usage(e.to_string()))
    }
}

/// Identical copies of one sampler, one per pool thread, so a step's draws (a softmax
/// over the whole vocabulary per row: about 4 % of the K = 8 critique job, all on the
/// calling thread) run on the kernel pool. A draw depends only on its row's logits,
/// history and RNG (a sampler's scratch is reset by every call), so which thread, and
/// which copy, makes it does not change the token.
pub(super) struct Samplers(Vec<Mutex<Sampler>>);

impl Samplers {
    pub(super) fn new(sampler: &Sampler) -> Self {
        Samplers(
            (0..dispatch::num_threads().max(1))
                .map(|_| Mutex::new(sampler.clone()))
                .collect(),
        )
    }

    /// Draws the next token of every row still writing (no reward yet, fewer than `cap`
    /// critique tokens) into its `drawn`, the rows spread over the pool.
    pub(super) fn draw<'a>(&self, rows: impl Iterator<Item = &'a mut CritiqueRow>, cap: usize) {
        let rows: Vec<Mutex<&'a mut CritiqueRow>> = rows
            .filter(|r| r.reward.is_none() && r.critique.len() < cap)
            .map(Mutex::new)
            .collect();
        let samplers = &self.0;
        pool::global().run_items(samplers.len(), rows.len(), &|i| {
            let mut row = rows[i].lock().unwrap_or_else(|e| e.into_inner());
            let row = &mut **row;
            // A free copy, or wait for the first (only when more draws run than copies).
            let mut sampler = samplers
                .iter()
                .find_map(|m| m.try_lock().ok())
                .unwrap_or_else(|| samplers[0].lock().unwrap_or_else(|e| e.into_inner()));
            row.drawn = Some(sampler.sample(&mut row.logits, &row.history, &mut row.rng));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The feed rule: a full critique closes (truncated) without drawing; a drawn stop
    /// closes it unless stops are ignored, when it is an ordinary token (the end of turn
    /// included), so a benchmark's critiques all run to their cap.
    #[test]
    fn feed_rule_closes_on_cap_and_on_stops_unless_ignored() {
        let (eot, stop) = (2u32, 0u32);
        let stops = [eot, stop];
        let opts = ScoreOptions {
            max_critique_tokens: 3,
            ..Default::default()
        };
        let ignoring = ScoreOptions {
            ignore_stops: true,
            ..opts.clone()
        };
        let never = || -> Result<u32> { panic!("a full critique drew a token") };
        let draw = |t: u32| move || -> Result<u32> { Ok(t) };
        for o in [&opts, &ignoring] {
            assert_eq!(
                Feed::choose(3, o, &stops, never).unwrap(),
                Feed::EndOfTurn { truncated: true }
            );
            assert_eq!(Feed::choose(0, o, &stops, draw(7)).unwrap(), Feed::Token(7));
        }
        for t in stops {
            assert_eq!(
                Feed::choose(2, &opts, &stops, draw(t)).unwrap(),
                Feed::EndOfTurn { truncated: false }
            );
            assert_eq!(
                Feed::choose(2, &ignoring, &stops, draw(t)).unwrap(),
                Feed::Token(t)
            );
        }
        // A draw's error is the feed's error.
        let e = Feed::choose(0, &opts, &stops, || Err(Error::Usage("bad draw".into())));
        assert!(e.unwrap_err().to_string().contains("bad draw"));
        // Applying: a token extends the critique and the history; the end of turn
        // closes the row and feeds eot.
        let (mut critique, mut history) = (vec![5], vec![1, 5]);
        let (mut truncated, mut closing) = (false, false);
        let mut apply = |f: Feed| {
            f.apply(
                eot,
                &mut critique,
                &mut history,
                &mut truncated,
                &mut closing,
            )
        };
        assert_eq!(apply(Feed::Token(eot)), eot);
        assert_eq!(apply(Feed::EndOfTurn { truncated: true }), eot);
        assert_eq!((critique, history), (vec![5, eot], vec![1, 5, eot]));
        assert!(truncated && closing);
    }

    /// The pool's draws are the draws made one row after another: each row's token comes
    /// from its own logits, history and RNG whichever thread or copy makes it, a row whose
    /// sampler fails gets its own error, and finished rows do not draw.
    #[test]
    fn pooled_draws_equal_sequential_draws() {
        let params = SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            repetition_penalty: 1.1,
            ..Default::default()
        };
        let vocab = 997;
        let sampler = Sampler::new(params, vocab).unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let n_rows = 13;
        let logits: Vec<Vec<f32>> = (0..n_rows)
            .map(|r| {
                if r == 5 {
                    vec![f32::NAN; vocab]
                } else {
                    (0..vocab).map(|_| next() * 8.0 - 4.0).collect()
                }
            })
            .collect();
        let history: Vec<Vec<u32>> = (0..n_rows)
            .map(|r| (0..r as u32 * 3).map(|t| t * 7 % vocab as u32).collect())
            .collect();
        for threads in [1, 2, 3] {
            dispatch::set_num_threads(threads);
            let mut want = Vec::new();
            let mut seq = sampler.clone();
            for r in 0..n_rows {
                let mut l = logits[r].clone();
                let mut rng = SeqRng::new(41, r as u64);
                // Two steps per row, so the RNG cursor moves as in a critique.
                let a = seq.sample(&mut l.clone(), &history[r], &mut rng);
                let b = seq.sample(&mut l, &history[r], &mut rng);
                want.push((a, b));
            }
            let samplers = Samplers::new(&sampler);
            let opts = ScoreOptions {
                seed: 41,
                ..Default::default()
            };
            let mut rows: Vec<CritiqueRow> = (0..n_rows)
                .map(|r| CritiqueRow::new(SeqId(r as u64), r, &logits[r], &history[r], 4, &opts))
                .collect();
            // Row 9 has its reward and row 11 its full critique: neither draws.
            rows[9].reward = Some(0.5);
            rows[11].critique = vec![1, 2];
            let mut got = Vec::new();
            for _ in 0..2 {
                for (row, l) in rows.iter_mut().zip(&logits) {
                    row.logits.copy_from_slice(l);
                }
                samplers.draw(rows.iter_mut(), 2);
                got.push(rows.iter_mut().map(|r| r.drawn.take()).collect::<Vec<_>>());
            }
            for (r, (a, b)) in want.iter().enumerate() {
                if r == 9 || r == 11 {
                    assert!(got[0][r].is_none() && got[1][r].is_none(), "row {r} drew");
                    continue;
                }
                assert_eq!(
                    Some(a),
                    got[0][r].as_ref(),
                    "row {r}, step 0, {threads} threads"
                );
                assert_eq!(
                    Some(b),
                    got[1][r].as_ref(),
                    "row {r}, step 1, {threads} threads"
                );
            }
            assert!(matches!(got[0][5], Some(Err(SamplerError::AllNan { .. }))));
        }
        dispatch::set_num_threads(0);
    }
}
