//! Output heads on the final-normed hidden state h (C):
//! - LM head: logits = W_lm h (V), a matmul (see matmul.rs);
//! - reward head, linear: r = w . h + b (Hugging Face `score` of
//!   LlamaForSequenceClassification: w (1, C), no bias);
//! - reward head, dense-tanh (released CLoud checkpoints, zankner/CLoud `RewardHead`,
//!   dropout is identity at inference): r = w_out . tanh(W_dense h + b_dense) + b_out;
//! - dual-head step: for a batch of hidden rows, LM logits for the rows still generating
//!   and the reward for the rows that just fed their end-of-turn token, in one call.
//!
//! f32 accumulation.

use crate::error::{KernelError, check_len};
use crate::reference::matmul::matmul_forward;
use crate::weights::Weights;

/// A reward head's parameters, borrowed in their stored dtypes.
#[derive(Debug, Clone, Copy)]
pub enum RewardHeadWeights<'a> {
    /// r = w . h + b; w: (C).
    Linear { w: Weights<'a>, b: f32 },
    /// r = w_out . tanh(W_dense h + b_dense) + b_out; W_dense: (C, C), b_dense: (C), w_out: (C).
    DenseTanh {
        dense_w: Weights<'a>,
        dense_b: &'a [f32],
        out_w: Weights<'a>,
        out_b: f32,
    },
}

impl RewardHeadWeights<'_> {
    /// C, the hidden size the head reads.
    pub fn channels(&self) -> usize {
        match self {
            RewardHeadWeights::Linear { w, .. } => w.len(),
            RewardHeadWeights::DenseTanh { out_w, .. } => out_w.len(),
        }
    }
}

/// rewards: (B); hidden: (B, C); scratch: (C) (used by the dense-tanh head).
pub fn reward_head_forward(
    rewards: &mut [f32],
    hidden: &[f32],
    head: &RewardHeadWeights<'_>,
    scratch: &mut [f32],
) -> Result<(), KernelError> {
    const OP: &str = "reward_head_forward";
    let c = head.channels();
    if c == 0 {
        return Err(KernelError::Invalid {
            op: OP,
            arg: "head",
            reason: "empty weights".into(),
        });
    }
    check_len(OP, "hidden", hidden.len(), rewards.len() * c)?;
    if let RewardHeadWeights::DenseTanh {
        dense_w, dense_b, ..
    } = head
    {
        check_len(OP, "dense_w", dense_w.len(), c * c)?;
        check_len(OP, "dense_b", dense_b.len(), c)?;
        if scratch.len() < c {
            return Err(KernelError::Length {
                op: OP,
                arg: "scratch",
                expected: c,
                actual: scratch.len(),
            });
        }
    }
    for (r, h) in rewards.iter_mut().zip(hidden.chunks_exact(c)) {
        *r = match *head {
            RewardHeadWeights::Linear { w, b } => dot(h, w) + b,
            RewardHeadWeights::DenseTanh {
                dense_w,
                dense_b,
                out_w,
                out_b,
            } => {
                let z = &mut scratch[..c];
                matmul_forward(z, h, dense_w, Some(dense_b), c, c)?;
                for v in z.iter_mut() {
                    *v = v.tanh();
                }
                dot(z, out_w) + out_b
            }
        };
    }
    Ok(())
}

/// The dual-head step. hidden: (B, C) final-normed rows; `lm_rows` (R_lm) and
/// `reward_rows` (R_rw) index into the B rows; logits: (R_lm, V); rewards: (R_rw);
/// lm_head: (V, C); scratch: (C).
#[allow(clippy::too_many_arguments)]
pub fn dual_head_forward(
    logits: &mut [f32],
    rewards: &mut [f32],
    hidden: &[f32],
    channels: usize,
    lm_rows: &[usize],
    reward_rows: &[usize],
    lm_head: Weights<'_>,
    reward_head: &RewardHeadWeights<'_>,
    scratch: &mut [f32],
) -> Result<(), KernelError> {
    let vocab = check_dual_head(
        logits.len(),
        rewards.len(),
        hidden.len(),
        channels,
        lm_rows,
        reward_rows,
        lm_head.len(),
        reward_head,
    )?;
    for (&r, out) in lm_rows.iter().zip(logits.chunks_exact_mut(vocab.max(1))) {
        let h = &hidden[r * channels..(r + 1) * channels];
        matmul_forward(out, h, lm_head, None, channels, vocab)?;
    }
    for (&r, out) in reward_rows.iter().zip(rewards.iter_mut()) {
        let h = &hidden[r * channels..(r + 1) * channels];
        reward_head_forward(std::slice::from_mut(out), h, reward_head, scratch)?;
    }
    Ok(())
}

fn dot(x: &[f32], w: Weights<'_>) -> f32 {
    let mut acc = 0.0f32;
    for (i, &v) in x.iter().enumerate() {
        acc += v * w.get(i);
    }
    acc
}

/// The O(1) argument checks shared by every dual-head implementation; returns V.
#[allow(clippy::too_many_arguments)]
pub fn check_dual_head(
    logits_len: usize,
    rewards_len: usize,
    hidden_len: usize,
    channels: usize,
    lm_rows: &[usize],
    reward_rows: &[usize],
    lm_head_len: usize,
    reward_head: &RewardHeadWeights<'_>,
) -> Result<usize, KernelError> {
    const OP: &str = "dual_head_forward";
    if channels == 0 || !hidden_len.is_multiple_of(channels) {
        return Err(KernelError::Invalid {
            op: OP,
            arg: "hidden",
            reason: format!("{} elements is not a multiple of C={channels}", hidden_len),
        });
    }
    let rows = hidden_len / channels;
    if !lm_head_len.is_multiple_of(channels) {
        return Err(KernelError::Invalid {
            op: OP,
            arg: "lm_head",
            reason: format!("{} elements is not a multiple of C={channels}", lm_head_len),
        });
    }
    let vocab = lm_head_len / channels;
    check_len(OP, "logits", logits_len, lm_rows.len() * vocab)?;
    check_len(OP, "rewards", rewards_len, reward_rows.len())?;
    check_len(OP, "reward_head", reward_head.channels(), channels)?;
    if let Some(&bad) = lm_rows.iter().chain(reward_rows).find(|&&r| r >= rows) {
        return Err(KernelError::Invalid {
            op: OP,
            arg: "rows",
            reason: format!("row {bad} is out of range for B={rows}"),
        });
    }
    Ok(vocab)
}

/// A token and its logit, as returned by [`lm_head_topk`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopLogit {
    pub token: u32,
    pub logit: f32,
}

/// The order of [`lm_head_topk`]: higher logit first, NaN after every number, ties (and
/// NaNs among themselves) by the lower token id. `Less` = comes first.
#[inline]
pub fn top_order(a: TopLogit, b: TopLogit) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (a.logit.is_nan(), b.logit.is_nan()) {
        (false, true) => Ordering::Less,
        (true, false) => Ordering::Greater,
        (true, true) => a.token.cmp(&b.token),
        (false, false) => b
            .logit
            .partial_cmp(&a.logit)
            .unwrap_or(Ordering::Equal)
            .then(a.token.cmp(&b.token)),
    }
}

/// Checks of [`lm_head_topk`]; returns the row count.
pub fn check_topk(
    op: &'static str,
    out: usize,
    hidden: usize,
    weight: usize,
    channels: usize,
    vocab: usize,
    k: usize,
) -> Result<usize, KernelError> {
    if channels == 0 || vocab == 0 || vocab > u32::MAX as usize {
        return Err(KernelError::Invalid {
            op,
            arg: "shape",
            reason: format!("channels {channels} and vocab {vocab} must be in 1..=2^32-1"),
        });
    }
    if k == 0 || k > vocab {
        return Err(KernelError::Invalid {
            op,
            arg: "k",
            reason: format!("{k}; must be in 1..={vocab}"),
        });
    }
    if !hidden.is_multiple_of(channels) {
        return Err(KernelError::Invalid {
            op,
            arg: "hidden",
            reason: format!("{hidden} elements is not whole rows of {channels}"),
        });
    }
    check_len(op, "weight", weight, vocab * channels)?;
    let rows = hidden / channels;
    check_len(op, "out", out, rows * k)?;
    Ok(rows)
}

/// The `k` largest logits of each row of `hidden` (B, C) against the LM head (V, C), in
/// [`top_order`], into `out` (B, k). The fast version never writes the (B, V) logits;
/// this one computes them with the reference matmul and sorts.
pub fn lm_head_topk(
    out: &mut [TopLogit],
    hidden: &[f32],
    lm_head: Weights<'_>,
    channels: usize,
    vocab: usize,
    k: usize,
) -> Result<(), KernelError> {
    let rows = check_topk(
        "lm_head_topk",
        out.len(),
        hidden.len(),
        lm_head.len(),
        channels,
        vocab,
        k,
    )?;
    let mut logits = vec![0.0f32; vocab];
    let mut all: Vec<TopLogit> = Vec::with_capacity(vocab);
    for r in 0..rows {
        let h = &hidden[r * channels..(r + 1) * channels];
        matmul_forward(&mut logits, h, lm_head, None, channels, vocab)?;
        all.clear();
        all.extend(logits.iter().enumerate().map(|(t, &logit)| TopLogit {
            token: t as u32,
            logit,
        }));
        all.sort_by(|a, b| top_order(*a, *b));
        out[r * k..(r + 1) * k].copy_from_slice(&all[..k]);
    }
    Ok(())
}
