//! Causal grouped-query attention over a KV cache (softmax(q k^T / sqrt(HS)) v).
//! Query row t sits at absolute position `pos0 + t` and attends cache positions
//! 0..=pos0+t. Query head h reads KV head h / (NH / NKV) (transformers `repeat_kv`).
//! f32 throughout; softmax subtracts the row max.

use crate::error::{KernelError, check_len};

/// Shape of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// T: query rows in this call.
    pub n_tokens: usize,
    /// Absolute position of query row 0; the cache must hold pos0 + T positions.
    pub pos0: usize,
    /// NH
    pub n_heads: usize,
    /// NKV
    pub n_kv_heads: usize,
    /// HS
    pub head_dim: usize,
}

impl AttnShape {
    pub fn validate(&self, op: &'static str) -> Result<(), KernelError> {
        if self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
            || self.head_dim == 0
        {
            return Err(KernelError::Invalid {
                op,
                arg: "shape",
                reason: format!(
                    "NH={} must be a positive multiple of NKV={}, HS={} positive",
                    self.n_heads, self.n_kv_heads, self.head_dim
                ),
            });
        }
        Ok(())
    }
}

/// out: (T, NH, HS); q: (T, NH, HS); k_cache, v_cache: (S, NKV, HS) with S >= pos0 + T;
/// scores: scratch of at least pos0 + T elements.
pub fn attention_forward(
    out: &mut [f32],
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    scores: &mut [f32],
    shape: AttnShape,
) -> Result<(), KernelError> {
    const OP: &str = "attention_forward";
    shape.validate(OP)?;
    let AttnShape {
        n_tokens,
        pos0,
        n_heads,
        n_kv_heads,
        head_dim,
    } = shape;
    let q_width = n_heads * head_dim;
    let kv_width = n_kv_heads * head_dim;
    let needed = pos0 + n_tokens;
    check_len(OP, "q", q.len(), n_tokens * q_width)?;
    check_len(OP, "out", out.len(), n_tokens * q_width)?;
    if k_cache.len() < needed * kv_width || v_cache.len() != k_cache.len() {
        return Err(KernelError::Length {
            op: OP,
            arg: "k_cache/v_cache",
            expected: needed * kv_width,
            actual: k_cache.len().min(v_cache.len()),
        });
    }
    if scores.len() < needed {
        return Err(KernelError::Length {
            op: OP,
            arg: "scores",
            expected: needed,
            actual: scores.len(),
        });
    }
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    for t in 0..n_tokens {
        let n_keys = pos0 + t + 1;
        for h in 0..n_heads {
            let kvh = h / group;
            let qh = &q[t * q_width + h * head_dim..][..head_dim];
            let mut max = f32::NEG_INFINITY;
            for (s, score) in scores[..n_keys].iter_mut().enumerate() {
                let kh = &k_cache[s * kv_width + kvh * head_dim..][..head_dim];
                let mut dot = 0.0f32;
                for i in 0..head_dim {
                    dot += qh[i] * kh[i];
                }
                *score = dot * scale;
                max = max.max(*score);
            }
            let mut sum = 0.0f32;
            for score in scores[..n_keys].iter_mut() {
                *score = (*score - max).exp();
                sum += *score;
            }
            let oh = &mut out[t * q_width + h * head_dim..][..head_dim];
            oh.fill(0.0);
            for (s, &p) in scores[..n_keys].iter().enumerate() {
                let vh = &v_cache[s * kv_width + kvh * head_dim..][..head_dim];
                let w = p / sum;
                for i in 0..head_dim {
                    oh[i] += w * vh[i];
                }
            }
        }
    }
    Ok(())
}
