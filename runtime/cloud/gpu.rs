//! Scoring on the GPU (`--device cuda`): the requests, options and results of
//! [`CloudScorer`], run by [`CudaSession`] with the model uploaded once in bf16.
//!
//! Classic mode prefills the whole sequence and reads the reward off the last row. CLoud
//! mode prefills the shared prefix once, samples each critique's first token from the
//! prefix logits on the CPU (the CPU sampler and the GPU sampler draw the same Philox
//! coin for (sequence, step)), then decodes the K critiques in lock step over the
//! shared-prefix cascade plan: every step one forward of K rows, the GPU sampler for the
//! rows still writing (only ids come back), and the reward head on the rows that just
//! fed their end-of-turn token (their final-normed hidden states, no second pass). Rows
//! that are done keep a place in the batch (fed the end-of-turn token again, their
//! outputs unused) until the last row closes. Compare and best-of-n score responses one
//! after another (no prompt blocks shared between responses yet).
//!
//! The numbers differ from the CPU's by bf16 rounding (weights, activations, KV cache);
//! `cloudrm gpu-check` holds the GPU scorer to the CPU one on the GPU machine.

use cloudrm_kernels::cuda::{CudaDevice, CudaError};
use cloudrm_loader::template::ChatTemplate;
use cloudrm_loader::tokenizer::Tokenizer;
use cloudrm_sampler::SeqRng;

use super::score::{Feed, best_index, validate};
use super::{CloudScorer, Comparison, Score, ScoreOptions};
use crate::backend::cuda::{CudaLlama, CudaRewardHead, CudaSession, SharedLayout, sample_params};
use crate::error::{Error, Result};
use crate::model::RewardModel;

/// Split-K piece of the cascade plan's attention, in positions (as stage (b) of
/// `gpu-check` decodes: long prefixes spread over more CTAs).
const SPLIT: usize = 64;

/// A reward model on one GPU, with its tokenizer and chat template.
pub struct CudaScorer<'m, 'd> {
    /// CPU-side helpers: sequence layout, validation, sampling options, the first draw.
    cpu: CloudScorer<'m>,
    llama: CudaLlama<'d>,
    head: CudaRewardHead,
}

impl<'m, 'd> CudaScorer<'m, 'd> {
    /// Uploads `model` (bf16 weights, its reward head) to `dev`.
    pub fn new(
        dev: &'d CudaDevice,
        model: &'m RewardModel,
        tokenizer: &'m Tokenizer,
        template: &'m ChatTemplate,
    ) -> Result<Self> {
        let llama = CudaLlama::upload(dev, &model.llama)?;
        let head = CudaRewardHead::upload(dev, &model.head.view(&model.llama.weights))?;
        Ok(CudaScorer {
            cpu: CloudScorer::new(model, tokenizer, template),
            llama,
            head,
        })
    }

    /// The model this scorer runs.
    pub fn model(&self) -> &'m RewardModel {
        self.cpu.model
    }

    /// Score one response: classic or CLoud as [`CloudScorer::score`] decides.
    pub fn score(&self, prompt: &str, response: &str, opts: &ScoreOptions) -> Result<Score> {
        validate(prompt, response, opts)?;
        if self.cpu.cloud_mode(opts) {
            self.cloud(prompt, response, opts)
        } else {
            self.classic(prompt, response)
        }
    }

    /// Compare two responses to one prompt.
    pub fn compare(
        &self,
        prompt: &str,
        a: &str,
        b: &str,
        opts: &ScoreOptions,
    ) -> Result<Comparison> {
        Ok(Comparison::new(
            self.score(prompt, a, opts)?,
            self.score(prompt, b, opts)?,
        ))
    }

    /// Score every candidate; the index of the best and all scores.
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
        Ok((best_index(&scores), scores))
    }

    fn classic(&self, prompt: &str, response: &str) -> Result<Score> {
        let ids = self.cpu.layout().classic_sequence(prompt, response)?;
        let context = self.model().llama.config.max_position_embeddings;
        if ids.len() > context {
            return Err(super::CloudError::TooLong {
                what: "prompt + response",
                tokens: ids.len(),
                extra: 0,
                context,
            }
            .into());
        }
        let bs = self.llama.shape().block_size;
        let blocks = ids.len().div_ceil(bs);
        let table: Vec<u32> = (0..blocks as u32).collect();
        let mut sess = CudaSession::new(&self.llama, ids.len(), 1, blocks)?;
        sess.prefill(&table, 0, &ids, false)?;
        let reward = sess.rewards(&self.head, &[ids.len() as u32 - 1])?[0];
        Ok(Score {
            reward,
            rewards: vec![reward],
            critiques: vec![],
            critique_tokens: vec![],
            truncated: vec![],
            prefix_tokens: ids.len(),
            cached_prefix_tokens: 0,
            prefix_blocks_allocated: blocks,
        })
    }

    fn cloud(&self, prompt: &str, response: &str, opts: &ScoreOptions) -> Result<Score> {
        let k = opts.k;
        let (prefix, eot) = self.cpu.cloud_layout_checked(prompt, response, opts)?;
        let (mut sampler, mut stops) = self.cpu.sampler_and_stops(opts)?;
        stops.insert(0, eot);
        let params = sample_params(sampler.params());
        let t = prefix.len();
        let bs = self.llama.shape().block_size;
        // Steps: at most max_critique_tokens sampled tokens fed, then the end of turn.
        let steps = opts.max_critique_tokens + 1;
        let prefix_blocks = t.div_ceil(bs);
        let own = SharedLayout::own_blocks(bs, t, steps);
        let n_blocks = prefix_blocks + k * own;
        let table: Vec<u32> = (0..prefix_blocks as u32).collect();
        let free: Vec<u32> = (prefix_blocks as u32..n_blocks as u32).collect();
        let mut sess = CudaSession::new(&self.llama, t.max(k), k, n_blocks)?;
        sess.prefill(&table, 0, &prefix, false)?;
        let prefix_logits = sess.logits(1)?;

        struct Row {
            history: Vec<u32>,
            critique: Vec<u32>,
            truncated: bool,
            closing: bool,
            reward: Option<f32>,
        }
        let mut rows: Vec<Row> = (0..k)
            .map(|_| Row {
                history: prefix.clone(),
                critique: Vec::new(),
                truncated: false,
                closing: false,
                reward: None,
            })
            .collect();
        // Chooses what row i feeds next from its sampled token (the CPU scorer's rule).
        let choose = |row: &mut Row, sampled: u32| -> u32 {
            let Ok(feed) = Feed::choose(row.critique.len(), opts, &stops, || {
                Ok::<u32, std::convert::Infallible>(sampled)
            });
            feed.apply(
                eot,
                &mut row.critique,
                &mut row.history,
                &mut row.truncated,
                &mut row.closing,
            )
        };
        // First tokens: each row's draw at step 0 from the prefix logits, on the CPU.
        let mut cur = Vec::with_capacity(k);
        for (i, row) in rows.iter_mut().enumerate() {
            let mut logits = prefix_logits.clone();
            let mut rng = SeqRng::new(opts.seed, i as u64);
            let s = sampler
                .sample(&mut logits, &row.history, &mut rng)
                .map_err(|e| Error::Usage(e.to_string()))?;
            cur.push(choose(row, s));
        }

        // Each step: rewards of the rows that just fed their end of turn, then the next
        // token of every row still writing (rows done are sampled too, as placeholders:
        // every row's logits are in the batch; their draws are unused); done when every
        // row has its reward.
        sess.decode_shared(&table, t, &cur, steps, &free, Some(SPLIT), |s, se| {
            let closing: Vec<u32> = (0..k)
                .filter(|&i| rows[i].closing && rows[i].reward.is_none())
                .map(|i| i as u32)
                .collect();
            for (&i, r) in closing.iter().zip(se.rewards(&self.head, &closing)?) {
                rows[i as usize].reward = Some(r);
            }
            if rows.iter().all(|r| r.reward.is_some()) {
                return Ok(Vec::new());
            }
            let histories: Vec<&[u32]> = rows.iter().map(|r| r.history.as_slice()).collect();
            let draws: Vec<(u64, u64)> = (0..k as u64).map(|i| (i, s as u64 + 1)).collect();
            let sampled = se.sample(params, &histories, &draws)?;
            Ok(rows
                .iter_mut()
                .zip(sampled)
                .map(|(row, tok)| if row.closing { eot } else { choose(row, tok) })
                .collect())
        })?;
        if let Some(i) = rows.iter().position(|r| r.reward.is_none()) {
            return Err(CudaError::bad(
                "CudaScorer::score",
                "critique",
                format!("critique {i} did not close within {steps} steps"),
            )
            .into());
        }
        let mut score = Score {
            reward: 0.0,
            rewards: Vec::with_capacity(k),
            critiques: Vec::with_capacity(k),
            critique_tokens: Vec::with_capacity(k),
            truncated: Vec::with_capacity(k),
            prefix_tokens: t,
            cached_prefix_tokens: 0,
            prefix_blocks_allocated: prefix_blocks,
        };
        for row in rows {
            self.cpu
                .push_critique(&mut score, row.reward, row.critique, row.truncated)?;
        }
        score.reward = opts.aggregation.apply(&score.rewards);
        Ok(score)
    }
}
