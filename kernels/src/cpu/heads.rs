//! Fast output heads (same contract as `reference::heads`): the LM rows of the dual-head
//! step are gathered into one contiguous block and go through the fast matmul together,
//! so the LM head's weights are read once per step for all generating rows; the reward
//! head's dense layer uses the fast matmul too.

use std::cell::RefCell;

use super::dispatch::{current, num_threads};
use super::matmul::{block_forward, matmul_forward, next_call};
use super::pool::{self, SendPtr};
use crate::error::{KernelError, check_len};
use crate::reference::heads::{
    RewardHeadWeights, TopLogit, check_dual_head, check_topk, top_order,
};
use crate::weights::Weights;

/// Vocabulary columns per work item of [`lm_head_topk`]: the item's logits (rows x this)
/// stay in L1/L2, and the LM head is split into enough items for every thread.
const TOPK_BLOCK: usize = 384;

/// Fills slots sorted in [`top_order`] that cannot be confused with a real logit: after
/// every number and every NaN of a real token.
const EMPTY: TopLogit = TopLogit {
    token: u32::MAX,
    logit: f32::NAN,
};

/// Insert `c` into `best` (sorted in [`top_order`], fixed length k) if it ranks inside.
#[inline]
fn offer(best: &mut [TopLogit], c: TopLogit) {
    let k = best.len();
    if top_order(c, best[k - 1]).is_ge() {
        return;
    }
    let mut i = k - 1;
    while i > 0 && top_order(c, best[i - 1]).is_lt() {
        best[i] = best[i - 1];
        i -= 1;
    }
    best[i] = c;
}

/// Fused LM head + top-k (see `reference::heads::lm_head_topk`): the vocabulary is cut
/// into blocks of [`TOPK_BLOCK`] columns claimed by the pool's threads; each block's
/// logits are computed into a per-thread buffer by the same code as the fast matmul (the
/// same values bit for bit) and only its k best per row are kept, so the (B, V) logits are
/// never written. The blocks' candidates are merged in block order.
pub fn lm_head_topk(
    out: &mut [TopLogit],
    hidden: &[f32],
    lm_head: Weights<'_>,
    channels: usize,
    vocab: usize,
    k: usize,
) -> Result<(), KernelError> {
    const OP: &str = "lm_head_topk";
    let rows = check_topk(
        OP,
        out.len(),
        hidden.len(),
        lm_head.len(),
        channels,
        vocab,
        k,
    )?;
    lm_head.check_rows(OP, channels)?;
    if rows == 0 {
        return Ok(());
    }
    let isa = current();
    let call = next_call();
    let blocks = vocab.div_ceil(TOPK_BLOCK);
    let threads = if rows * channels * vocab < 1 << 15 {
        1
    } else {
        num_threads()
    };
    CANDIDATES.with_borrow_mut(|cand| {
        cand.clear();
        cand.resize(blocks * rows * k, EMPTY);
        let cand_ptr = SendPtr(cand.as_mut_ptr());
        pool::global().run_ranges(threads, blocks, &|blk| {
            let cols = blk * TOPK_BLOCK..((blk + 1) * TOPK_BLOCK).min(vocab);
            BLOCK.with_borrow_mut(|buf| {
                buf.resize(rows * cols.len(), 0.0);
                block_forward(buf, hidden, lm_head, channels, cols.clone(), isa, call);
                for r in 0..rows {
                    // SAFETY: block blk alone writes its k slots of each row; the buffer
                    // holds blocks * rows * k and outlives the job.
                    let best = unsafe {
                        std::slice::from_raw_parts_mut(cand_ptr.get().add((blk * rows + r) * k), k)
                    };
                    let logits = &buf[r * cols.len()..(r + 1) * cols.len()];
                    for (j, &logit) in logits.iter().enumerate() {
                        offer(
                            best,
                            TopLogit {
                                token: (cols.start + j) as u32,
                                logit,
                            },
                        );
                    }
                }
            });
        });
        for r in 0..rows {
            let best = &mut out[r * k..(r + 1) * k];
            best.fill(EMPTY);
            for blk in 0..blocks {
                // (Unfilled EMPTY slots never rank inside `best`, which starts as EMPTY.)
                for &c in &cand[(blk * rows + r) * k..][..k] {
                    offer(best, c);
                }
            }
        }
    });
    Ok(())
}

thread_local! {
    /// One block's logits (rows, TOPK_BLOCK), per thread.
    static BLOCK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per block and row, its k best (the calling thread's).
    static CANDIDATES: RefCell<Vec<TopLogit>> = const { RefCell::new(Vec::new()) };
}

thread_local! {
    /// Gathered LM rows (R_lm, C); grows once to the largest batch seen.
    static GATHER: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// rewards: (B); hidden: (B, C); scratch: (C).
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
    match *head {
        RewardHeadWeights::Linear { w, b } => {
            matmul_forward(rewards, hidden, w, Some(&[b]), c, 1)?;
        }
        RewardHeadWeights::DenseTanh {
            dense_w,
            dense_b,
            out_w,
            out_b,
        } => {
            if scratch.len() < c {
                return Err(KernelError::Length {
                    op: OP,
                    arg: "scratch",
                    expected: c,
                    actual: scratch.len(),
                });
            }
            for (r, h) in rewards.iter_mut().zip(hidden.chunks_exact(c)) {
                let z = &mut scratch[..c];
                matmul_forward(z, h, dense_w, Some(dense_b), c, c)?;
                for v in z.iter_mut() {
                    *v = v.tanh();
                }
                let mut out = [0.0f32];
                matmul_forward(&mut out, z, out_w, Some(&[out_b]), c, 1)?;
                *r = out[0];
            }
        }
    }
    Ok(())
}

/// The dual-head step (see `reference::heads::dual_head_forward` for shapes).
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
    if !lm_rows.is_empty() {
        GATHER.with_borrow_mut(|g| -> Result<(), KernelError> {
            g.clear();
            for &r in lm_rows {
                g.extend_from_slice(&hidden[r * channels..(r + 1) * channels]);
            }
            matmul_forward(logits, g, lm_head, None, channels, vocab)
        })?;
    }
    for (&r, out) in reward_rows.iter().zip(rewards.iter_mut()) {
        let h = &hidden[r * channels..(r + 1) * channels];
        reward_head_forward(std::slice::from_mut(out), h, reward_head, scratch)?;
    }
    Ok(())
}
