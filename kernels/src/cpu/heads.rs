//! Fast output heads (same contract as `reference::heads`): the LM rows of the dual-head
//! step are gathered into one contiguous block and go through the fast matmul together,
//! so the LM head's weights are read once per step for all generating rows; the reward
//! head's dense layer uses the fast matmul too.

use std::cell::RefCell;

use super::matmul::matmul_forward;
use crate::error::{KernelError, check_len};
use crate::reference::heads::{RewardHeadWeights, check_dual_head};
use crate::weights::Weights;

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
