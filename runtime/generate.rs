//! Decoding loops. Greedy for now; the sampler crate's processors plug in with the
//! CLoud inference issue.

use cloudrm_kernels::reference::heads::TopLogit;

use crate::backend::Cpu;
use crate::error::Result;
use crate::model::{Llama, LogitsMode, Session};

/// Options of a greedy generation.
#[derive(Debug, Clone)]
pub struct GreedyOptions {
    /// Stop after this many new tokens.
    pub max_tokens: usize,
    /// Stop (after emitting nothing more) when one of these is produced.
    pub stop_ids: Vec<u32>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was produced (it is not part of the output).
    StopToken(u32),
    /// `max_tokens` reached.
    MaxTokens,
    /// The callback asked to stop.
    Callback,
}

/// Prefill `prompt` after the session's cached positions, then decode greedily, calling
/// `on_token` with each new token (return `false` to stop). Returns the new tokens.
pub fn greedy(
    model: &Llama,
    cpu: &Cpu,
    sess: &mut Session,
    prompt: &[u32],
    opts: &GreedyOptions,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<(Vec<u32>, StopReason)> {
    let mut out = Vec::with_capacity(opts.max_tokens);
    if opts.max_tokens == 0 {
        return Ok((out, StopReason::MaxTokens));
    }
    // Only the argmax is needed: the fused LM head + top-1 never writes the logits. Same
    // choice as `cloudrm_sampler::argmax` over the logits: the first maximum, NaN skipped
    // (token 0 if every logit is NaN).
    let (c, vocab) = (model.config.hidden_size, model.config.vocab_size);
    let lm_head = model.weights.get(&model.weights.lm_head);
    let mut best = [TopLogit {
        token: 0,
        logit: 0.0,
    }];
    model.forward(cpu, sess, prompt, LogitsMode::None)?;
    loop {
        cpu.lm_head_topk(&mut best, sess.last_hidden(), lm_head, c, vocab, 1)?;
        let next = if best[0].logit.is_nan() {
            0
        } else {
            best[0].token
        };
        if opts.stop_ids.contains(&next) {
            return Ok((out, StopReason::StopToken(next)));
        }
        out.push(next);
        if !on_token(next)? {
            return Ok((out, StopReason::Callback));
        }
        if out.len() >= opts.max_tokens {
            return Ok((out, StopReason::MaxTokens));
        }
        model.forward(cpu, sess, &[next], LogitsMode::None)?;
    }
}
