//! Decoding loops. Greedy for now; the sampler crate's processors plug in with the
//! CLoud inference issue.

use crate::backend::Cpu;
use crate::engine::lm_greedy;
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
    // Only the argmax is needed: the fused LM head + top-1 never writes the logits.
    model.forward(cpu, sess, prompt, LogitsMode::None)?;
    loop {
        let next = lm_greedy(model, cpu, sess.last_hidden())?;
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
