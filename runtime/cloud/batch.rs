//! Continuous batching of CLoud requests: many `(prompt, response)` requests, K critiques
//! each, decoded in one lock-step batch over the paged engine.
//!
//! - **Admission.** Requests are admitted in order while the batch has room for their K
//!   rows (`max_rows`) and the cache has free blocks for their prefix and critiques; a
//!   request whose rows have all fed their end-of-turn token leaves the batch (its
//!   blocks are freed, its full prefix blocks stay in the prefix cache) and the next
//!   waiting request is admitted before the following step.
//! - **Prefill** of an admitted request reuses every cached full block of its prefix: the
//!   prompt shared by compared responses, or by best-of-n candidates, is computed once.
//! - **Nested cascade levels.** Each step groups the rows by request and builds the
//!   levels from the owners' block tables: blocks held by every request of a run of
//!   adjacent requests form one level for all their rows (e.g. the prompt of A and B),
//!   and each request's remaining full prefix blocks form a level for its own K rows
//!   (the response), recursively; each row's unshared tail is its suffix. Every shared
//!   block is read once per step for all the rows that share it.
//! - Results are per request, in request order; per-request sampling streams are the
//!   ones `score` uses alone (seed, critique index), so batching changes which rows run
//!   together, not what each row samples.

use std::collections::VecDeque;
use std::ops::Range;

use cloudrm_sampler::Sampler;

use super::score::{
    BLOCK, CloudScorer, Comparison, CritiqueRow, Samplers, Score, ScoreOptions, validate,
};
use crate::engine::{PREFILL_ROWS, PagedEngine, SharedLevel};
use crate::error::{Error, Result};
use crate::kv::{BlockId, SeqId};

/// Rows a batch holds at most (the engine's `max_rows` when this scorer builds it).
const MAX_BATCH_ROWS: usize = 64;

/// An admitted request.
struct Group {
    req: usize,
    owner: SeqId,
    /// Full blocks of the owner's prefix.
    full_blocks: usize,
    rows: Vec<CritiqueRow>,
    cached: usize,
    allocated: usize,
}

/// A validated request: its CLoud prefix and end-of-turn token.
struct Prepared {
    prefix: Vec<u32>,
    eot: u32,
    /// Blocks it needs while live: the prefix plus each critique's own tail (+1 for a
    /// copied partial prefix block and +1 for the end-of-turn token).
    need: usize,
}

impl CloudScorer<'_> {
    /// Score every `(prompt, response)` with K critiques each (CLoud mode), continuously
    /// batched (see the module docs). The first invalid request fails the whole call
    /// before any work; use [`CloudScorer::score`] per request to isolate failures.
    pub fn score_batch(
        &self,
        requests: &[(&str, &str)],
        opts: &ScoreOptions,
    ) -> Result<Vec<Score>> {
        let prepared = requests
            .iter()
            .map(|&(prompt, response)| self.prepare(prompt, response, opts))
            .collect::<Result<Vec<_>>>()?;
        self.score_prepared(&prepared, opts)
    }

    /// A request checked and laid out for the batch.
    fn prepare(&self, prompt: &str, response: &str, opts: &ScoreOptions) -> Result<Prepared> {
        validate(prompt, response, opts)?;
        let (prefix, eot) = self.cloud_layout_checked(prompt, response, opts)?;
        let per_seq = (opts.max_critique_tokens + 1).div_ceil(BLOCK) + 1;
        let need = prefix.len().div_ceil(BLOCK) + opts.k * per_seq + 1;
        Ok(Prepared { prefix, eot, need })
    }

    /// [`CloudScorer::score_batch`] on prepared requests.
    fn score_prepared(&self, prepared: &[Prepared], opts: &ScoreOptions) -> Result<Vec<Score>> {
        if prepared.is_empty() {
            return Ok(Vec::new());
        }
        let k = opts.k;
        let (sampler, stops) = self.sampler_and_stops(opts)?;
        // Engine: rows for as many requests as fit MAX_BATCH_ROWS (at least one), blocks
        // for the largest of them at once plus room for cached prefixes.
        let per_batch = (MAX_BATCH_ROWS / k).clamp(1, prepared.len());
        let mut needs: Vec<usize> = prepared.iter().map(|p| p.need).collect();
        needs.sort_unstable_by(|a, b| b.cmp(a));
        let max_prefix = prepared.iter().map(|p| p.prefix.len()).max().unwrap_or(0);
        let blocks: usize =
            needs[..per_batch].iter().sum::<usize>() + 4 * max_prefix.div_ceil(BLOCK);
        let rows = (per_batch * k).max(PREFILL_ROWS);
        let mut slot = self.engine_slot().borrow_mut();
        if !slot.as_ref().is_some_and(|e| {
            e.num_blocks() >= blocks && e.max_rows() >= rows && e.kv_cache() == opts.kv_cache
        }) {
            *slot = Some(PagedEngine::with_cache(
                &self.model.llama,
                blocks,
                BLOCK,
                rows,
                opts.kv_cache,
            )?);
        }
        let Some(engine) = slot.as_mut() else {
            return Err(Error::Usage("scoring engine unavailable".into()));
        };
        let mut groups: Vec<Group> = Vec::new();
        let result = self.run_batch(engine, prepared, opts, &sampler, &stops, &mut groups);
        // On error, release whatever is still live (the cache stays consistent).
        for g in groups.drain(..) {
            for r in &g.rows {
                let _ = engine.free(r.seq);
            }
            let _ = engine.free(g.owner);
        }
        result
    }

    /// Compare many `(prompt, a, b)` triples. Each triple is checked on its own (its
    /// error is its own result); in CLoud mode every valid triple's two responses run in
    /// ONE continuous batch, so the rows of all of them decode together and each prompt's
    /// blocks are shared by its two responses. Classic mode compares one by one.
    pub fn compare_many(
        &self,
        triples: &[(&str, &str, &str)],
        opts: &ScoreOptions,
    ) -> Result<Vec<Result<Comparison>>> {
        if !(self.cloud_mode(opts) && opts.share_prefix) {
            return Ok(triples
                .iter()
                .map(|&(p, a, b)| self.compare(p, a, b, opts))
                .collect());
        }
        let mut out: Vec<Option<Result<Comparison>>> = Vec::with_capacity(triples.len());
        let mut prepared = Vec::new();
        let mut slots = Vec::new();
        for (i, &(p, a, b)) in triples.iter().enumerate() {
            let pair = self
                .prepare(p, a, opts)
                .and_then(|pa| Ok((pa, self.prepare(p, b, opts)?)));
            match pair {
                Ok((pa, pb)) => {
                    prepared.push(pa);
                    prepared.push(pb);
                    slots.push(i);
                    out.push(None);
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        let mut scores = self.score_prepared(&prepared, opts)?.into_iter();
        for i in slots {
            let (Some(a), Some(b)) = (scores.next(), scores.next()) else {
                return Err(Error::Usage("the scoring batch lost a response".into()));
            };
            out[i] = Some(Ok(Comparison::new(a, b)));
        }
        out.into_iter()
            .map(|r| r.ok_or_else(|| Error::Usage("a comparison was not scored".into())))
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn run_batch(
        &self,
        engine: &mut PagedEngine,
        prepared: &[Prepared],
        opts: &ScoreOptions,
        sampler: &Sampler,
        stops: &[u32],
        groups: &mut Vec<Group>,
    ) -> Result<Vec<Score>> {
        let llama = &self.model.llama;
        let cpu = &self.cpu;
        let vocab = llama.config.vocab_size;
        let c = llama.config.hidden_size;
        let k = opts.k;
        let mut queue: VecDeque<usize> = (0..prepared.len()).collect();
        let mut results: Vec<Option<Score>> = vec![None; prepared.len()];
        let lm_head = llama.weights.get(&llama.weights.lm_head);
        let head = self.model.head.view(&llama.weights);
        let mut lm_out: Vec<f32> = Vec::new();
        let mut rewards: Vec<f32> = Vec::new();
        let mut scratch = vec![0.0f32; c];
        let mut seqs = Vec::new();
        let mut tokens = Vec::new();
        let mut live: Vec<(usize, usize)> = Vec::new();
        let mut lm_rows = Vec::new();
        let mut reward_rows = Vec::new();
        let samplers = Samplers::new(sampler);
        loop {
            // Admission.
            while let Some(&r) = queue.front() {
                let live_rows: usize = groups
                    .iter()
                    .map(|g| g.rows.iter().filter(|x| x.reward.is_none()).count())
                    .sum();
                let p = &prepared[r];
                // Blocks are reserved for a live request's whole need (its critiques
                // grow block by block), so admitted work never runs out of cache.
                let reserved: usize = groups.iter().map(|g| prepared[g.req].need).sum();
                if !groups.is_empty()
                    && (live_rows + k > engine.max_rows()
                        || reserved + p.need > engine.num_blocks())
                {
                    break;
                }
                queue.pop_front();
                let cached = engine.cached_prefix_len(&p.prefix);
                let (owner, logits, _) = engine.prefill(llama, cpu, &p.prefix)?;
                // Blocks computed and filled for this prefix (cached ones are reused).
                let allocated = p.prefix.len().div_ceil(BLOCK) - cached / BLOCK;
                let children = match engine.fork(owner, k) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = engine.free(owner);
                        return Err(e);
                    }
                };
                // Room for each critique up front (up to a bound), as `lock_step`: in its
                // token lists and its block list, so the decode steps opening a block
                // allocate nothing.
                let critique_room = opts.max_critique_tokens.min(4096);
                for &c in &children {
                    engine.reserve(c, p.prefix.len() + critique_room + 1)?;
                }
                let rows = children
                    .into_iter()
                    .enumerate()
                    .map(|(i, seq)| {
                        CritiqueRow::new(seq, i, &logits, &p.prefix, critique_room, opts)
                    })
                    .collect();
                groups.push(Group {
                    req: r,
                    owner,
                    full_blocks: p.prefix.len() / BLOCK,
                    rows,
                    cached,
                    allocated,
                });
            }
            if groups.is_empty() {
                break;
            }
            // Next token of every live row, rows grouped by request.
            seqs.clear();
            tokens.clear();
            live.clear();
            let mut spans: Vec<(usize, Range<usize>)> = Vec::new();
            samplers.draw(
                groups.iter_mut().flat_map(|g| g.rows.iter_mut()),
                opts.max_critique_tokens,
            );
            for (gi, g) in groups.iter_mut().enumerate() {
                let eot = prepared[g.req].eot;
                let start = seqs.len();
                for (ri, row) in g.rows.iter_mut().enumerate() {
                    if row.reward.is_some() {
                        continue;
                    }
                    let next = row.feed_next(opts, stops, eot)?;
                    seqs.push(row.seq);
                    tokens.push(next);
                    live.push((gi, ri));
                }
                if seqs.len() > start {
                    spans.push((gi, start..seqs.len()));
                }
            }
            let levels = self.levels(engine, groups, &spans)?;
            let hidden = engine.decode_step_levels(llama, cpu, &seqs, &tokens, &levels)?;
            // The dual-head step: rewards for the rows that fed their end of turn, LM
            // logits (one batched matmul) for the rows still writing.
            lm_rows.clear();
            reward_rows.clear();
            for (b, &(gi, ri)) in live.iter().enumerate() {
                if groups[gi].rows[ri].closing {
                    reward_rows.push(b);
                } else {
                    lm_rows.push(b);
                }
            }
            lm_out.resize(lm_rows.len() * vocab, 0.0);
            rewards.resize(reward_rows.len(), 0.0);
            self.cpu.dual_head(
                &mut lm_out,
                &mut rewards,
                hidden,
                c,
                &lm_rows,
                &reward_rows,
                lm_head,
                &head,
                &mut scratch,
            )?;
            let (mut j_lm, mut j_rw) = (0, 0);
            for &(gi, ri) in &live {
                let row = &mut groups[gi].rows[ri];
                if row.closing {
                    row.reward = Some(rewards[j_rw]);
                    j_rw += 1;
                } else {
                    row.logits
                        .copy_from_slice(&lm_out[j_lm * vocab..(j_lm + 1) * vocab]);
                    j_lm += 1;
                }
            }
            // Finished requests leave the batch.
            let mut i = 0;
            while i < groups.len() {
                if groups[i].rows.iter().all(|r| r.reward.is_some()) {
                    let g = groups.remove(i);
                    for r in &g.rows {
                        engine.free(r.seq)?;
                    }
                    engine.free(g.owner)?;
                    let req = g.req;
                    results[req] = Some(self.finish(g, prepared[req].prefix.len(), opts)?);
                } else {
                    i += 1;
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.ok_or_else(|| Error::Usage("a batched request was not scored".into())))
            .collect()
    }

    /// Nested cascade levels for the step's row spans (see the module docs).
    fn levels(
        &self,
        engine: &PagedEngine,
        groups: &[Group],
        spans: &[(usize, Range<usize>)],
    ) -> Result<Vec<SharedLevel>> {
        let mut tables: Vec<&[BlockId]> = Vec::with_capacity(spans.len());
        for (gi, _) in spans {
            let g = &groups[*gi];
            tables.push(&engine.kv().block_table(g.owner)?[..g.full_blocks]);
        }
        let mut out = Vec::new();
        nest(&tables, spans, groups, 0, 0..spans.len(), &mut out);
        Ok(out)
    }

    /// A finished request's score.
    fn finish(&self, g: Group, prefix_tokens: usize, opts: &ScoreOptions) -> Result<Score> {
        let mut score = Score {
            reward: 0.0,
            rewards: Vec::with_capacity(g.rows.len()),
            critiques: Vec::with_capacity(g.rows.len()),
            critique_tokens: Vec::with_capacity(g.rows.len()),
            truncated: Vec::with_capacity(g.rows.len()),
            prefix_tokens,
            cached_prefix_tokens: g.cached,
            prefix_blocks_allocated: g.allocated,
        };
        for row in g.rows {
            self.push_critique(&mut score, row.reward, row.critique, row.truncated)?;
        }
        score.reward = opts.aggregation.apply(&score.rewards);
        Ok(score)
    }
}

/// Levels for the spans `idx` whose tables agree on blocks `..start`: the blocks all of
/// them share from `start` on form one level over all their rows; then each run of spans
/// with the same next block recurses; a lone span takes the rest of its table.
fn nest(
    tables: &[&[BlockId]],
    spans: &[(usize, Range<usize>)],
    groups: &[Group],
    start: usize,
    idx: Range<usize>,
    out: &mut Vec<SharedLevel>,
) {
    if idx.is_empty() {
        return;
    }
    let rows = spans[idx.start].1.start..spans[idx.end - 1].1.end;
    let owner = groups[spans[idx.start].0].owner;
    if idx.len() == 1 {
        let t = tables[idx.start];
        if t.len() > start {
            out.push(SharedLevel {
                owner,
                blocks: start..t.len(),
                members: rows,
            });
        }
        return;
    }
    // Longest common run of blocks from `start`.
    let mut end = start;
    loop {
        let b = tables[idx.start].get(end);
        if b.is_some() && idx.clone().all(|i| tables[i].get(end) == b) {
            end += 1;
        } else {
            break;
        }
    }
    if end > start {
        out.push(SharedLevel {
            owner,
            blocks: start..end,
            members: rows,
        });
    }
    // Runs of adjacent spans with the same block at `end`.
    let mut i = idx.start;
    while i < idx.end {
        let b = tables[i].get(end);
        let mut j = i + 1;
        while j < idx.end && b.is_some() && tables[j].get(end) == b {
            j += 1;
        }
        nest(tables, spans, groups, end, i..j, out);
        i = j;
    }
}
