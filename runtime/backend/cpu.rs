//! The CPU backend: one method per op, each forwarding to the reference or the fast
//! kernel according to the mode.

use cloudrm_kernels::reference::attention::AttnShape;
use cloudrm_kernels::reference::attention_paged::{Level, PagedShape};
use cloudrm_kernels::reference::heads::{RewardHeadWeights, TopLogit};
use cloudrm_kernels::{KernelError, KvElem, Weights, cpu, reference};

/// Which kernels the CPU backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    /// Scalar reference kernels (the test oracle).
    Reference,
    /// SIMD + threaded kernels dispatched on detected CPU features.
    Fast,
}

#[derive(Debug, Clone, Copy)]
pub struct Cpu {
    pub mode: CpuMode,
}

impl Default for Cpu {
    fn default() -> Self {
        Cpu::fast()
    }
}

impl Cpu {
    pub fn reference() -> Self {
        Cpu {
            mode: CpuMode::Reference,
        }
    }

    pub fn fast() -> Self {
        Cpu {
            mode: CpuMode::Fast,
        }
    }

    pub fn embedding(
        &self,
        out: &mut [f32],
        ids: &[u32],
        table: Weights<'_>,
        channels: usize,
    ) -> Result<(), KernelError> {
        match self.mode {
            CpuMode::Reference => {
                reference::embedding::embedding_forward(out, ids, table, channels)
            }
            CpuMode::Fast => cpu::embedding_forward(out, ids, table, channels),
        }
    }

    pub fn rmsnorm(
        &self,
        out: &mut [f32],
        inp: &[f32],
        weight: Weights<'_>,
        eps: f32,
    ) -> Result<(), KernelError> {
        match self.mode {
            CpuMode::Reference => reference::rmsnorm::rmsnorm_forward(out, inp, weight, eps),
            CpuMode::Fast => cpu::rmsnorm_forward(out, inp, weight, eps),
        }
    }

    pub fn matmul(
        &self,
        out: &mut [f32],
        inp: &[f32],
        weight: Weights<'_>,
        bias: Option<&[f32]>,
        in_features: usize,
        out_features: usize,
    ) -> Result<(), KernelError> {
        match self.mode {
            CpuMode::Reference => {
                reference::matmul::matmul_forward(out, inp, weight, bias, in_features, out_features)
            }
            CpuMode::Fast => cpu::matmul_forward(out, inp, weight, bias, in_features, out_features),
        }
    }

    /// Several linear layers over the same input, with the input's RMSNorm and the first
    /// layers' RoPE when `fusion` asks (the attention block's QKV). The reference runs
    /// the norm into `xn` (rows x C; untouched without a norm or on the fast path), the
    /// matmuls, then the rotations; the fast path fuses them all into one pool job (the
    /// bits of its unfused ops).
    pub fn matmul_many(
        &self,
        layers: &mut [cpu::Linear<'_>],
        inp: &[f32],
        in_features: usize,
        fusion: cpu::Fusion<'_>,
        xn: &mut [f32],
    ) -> Result<(), KernelError> {
        match self.mode {
            CpuMode::Reference => {
                let x = match fusion.norm {
                    Some(n) => reference_norm("matmul_many", xn, inp, n)?,
                    None => inp,
                };
                for l in layers.iter_mut() {
                    reference::matmul::matmul_forward(
                        l.out,
                        x,
                        l.weight,
                        l.bias,
                        in_features,
                        l.out_features,
                    )?;
                }
                if let Some(rope) = fusion.rope {
                    let t = rope.table;
                    let hd = t.head_dim().max(1);
                    for l in layers.iter_mut().take(rope.layers) {
                        let heads = l.out_features / hd;
                        reference::rope::rope_forward(
                            l.out,
                            t.positions(),
                            heads,
                            hd,
                            t.inv_freq(),
                        )?;
                    }
                }
                Ok(())
            }
            CpuMode::Fast => cpu::matmul_forward_many_fused(layers, inp, in_features, fusion),
        }
    }

    /// The MLP input half: act = silu(n . gate^T + gb) * (n . up^T + ub), n = inp or
    /// rmsnorm(inp) with `norm`. The reference runs the norm into `xn`, the two matmuls
    /// into `gate_buf` and `up_buf`, then SwiGLU; the fast path fuses all of it into one
    /// pool job (same bits as the fast unfused sequence) and leaves the buffers untouched.
    #[allow(clippy::too_many_arguments)]
    pub fn gate_up_swiglu(
        &self,
        act: &mut [f32],
        gate_buf: &mut [f32],
        up_buf: &mut [f32],
        xn: &mut [f32],
        inp: &[f32],
        norm: Option<cpu::NormIn<'_>>,
        gate: (Weights<'_>, Option<&[f32]>),
        up: (Weights<'_>, Option<&[f32]>),
        in_features: usize,
        out_features: usize,
    ) -> Result<(), KernelError> {
        match self.mode {
            CpuMode::Reference => {
                let (c, oc) = (in_features, out_features);
                let x = match norm {
                    Some(n) => reference_norm("gate_up_swiglu", xn, inp, n)?,
                    None => inp,
                };
                reference::matmul::matmul_forward(gate_buf, x, gate.0, gate.1, c, oc)?;
                reference::matmul::matmul_forward(up_buf, x, up.0, up.1, c, oc)?;
                reference::swiglu::swiglu_forward(act, gate_buf, up_buf)
            }
            CpuMode::Fast => cpu::matmul_swiglu(
                act,
                inp,
                gate.0,
                gate.1,
                up.0,
                up.1,
                in_features,
                out_features,
                norm,
            ),
        }
    }

    pub fn attention(
        &self,
        out: &mut [f32],
        q: &[f32],
        k_cache: &[f32],
        v_cache: &[f32],
        scores: &mut [f32],
        shape: AttnShape,
    ) -> Result<(), KernelError> {
        match self.mode {
            CpuMode::Reference => {
                reference::attention::attention_forward(out, q, k_cache, v_cache, scores, shape)
            }
            CpuMode::Fast => cpu::attention_forward(out, q, k_cache, v_cache, scores, shape),
        }
    }

    /// Causal prefill attention of T rows at positions pos0.. over the paged cache (f32 or
    /// f16 arenas).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_prefill_attention<T: KvElem>(
        &self,
        out: &mut [f32],
        q: &[f32],
        k_arena: &[T],
        v_arena: &[T],
        table: &[u32],
        pos0: usize,
        shape: PagedShape,
        scratch: &mut [f32],
    ) -> Result<(), KernelError> {
        match self.mode {
            CpuMode::Reference => reference::attention_paged::paged_prefill_attention(
                out, q, k_arena, v_arena, table, pos0, shape, scratch,
            ),
            CpuMode::Fast => {
                cpu::paged_prefill_attention(out, q, k_arena, v_arena, table, pos0, shape, scratch)
            }
        }
    }

    /// One decode query per sequence over its whole paged context.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_decode_attention<T: KvElem>(
        &self,
        out: &mut [f32],
        q: &[f32],
        k_arena: &[T],
        v_arena: &[T],
        tables: &[&[u32]],
        lens: &[usize],
        shape: PagedShape,
        scratch: &mut [f32],
    ) -> Result<(), KernelError> {
        match self.mode {
            CpuMode::Reference => reference::attention_paged::paged_decode_attention(
                out, q, k_arena, v_arena, tables, lens, shape, scratch,
            ),
            CpuMode::Fast => {
                cpu::paged_decode_attention(out, q, k_arena, v_arena, tables, lens, shape, scratch)
            }
        }
    }

    /// Cascade decode attention: shared levels once per group, then each suffix.
    #[allow(clippy::too_many_arguments)]
    pub fn cascade_decode_attention<T: KvElem>(
        &self,
        out: &mut [f32],
        q: &[f32],
        k_arena: &[T],
        v_arena: &[T],
        levels: &[Level<'_>],
        suffix_tables: &[&[u32]],
        suffix_lens: &[usize],
        shape: PagedShape,
        scratch: &mut [f32],
    ) -> Result<(), KernelError> {
        match self.mode {
            CpuMode::Reference => reference::attention_paged::cascade_decode_attention(
                out,
                q,
                k_arena,
                v_arena,
                levels,
                suffix_tables,
                suffix_lens,
                shape,
                scratch,
            ),
            CpuMode::Fast => cpu::cascade_decode_attention(
                out,
                q,
                k_arena,
                v_arena,
                levels,
                suffix_tables,
                suffix_lens,
                shape,
                scratch,
            ),
        }
    }

    /// The `k` best tokens of each final-normed hidden row (B, C) under the LM head
    /// (V, C), without writing the (B, V) logits on the fast path (see
    /// `kernels::reference::heads::lm_head_topk` for the order).
    pub fn lm_head_topk(
        &self,
        out: &mut [TopLogit],
        hidden: &[f32],
        lm_head: Weights<'_>,
        channels: usize,
        vocab: usize,
        k: usize,
    ) -> Result<(), KernelError> {
        match self.mode {
            CpuMode::Reference => {
                reference::heads::lm_head_topk(out, hidden, lm_head, channels, vocab, k)
            }
            CpuMode::Fast => cpu::lm_head_topk(out, hidden, lm_head, channels, vocab, k),
        }
    }

    /// The dual-head step: LM logits (R_lm, V) for `lm_rows` and rewards (R_rw) for
    /// `reward_rows` of the final-normed hidden rows (B, C).
    #[allow(clippy::too_many_arguments)]
    pub fn dual_head(
        &self,
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
        let f = match self.mode {
            CpuMode::Reference => reference::heads::dual_head_forward,
            CpuMode::Fast => cpu::dual_head_forward,
        };
        f(
            logits,
            rewards,
            hidden,
            channels,
            lm_rows,
            reward_rows,
            lm_head,
            reward_head,
            scratch,
        )
    }

    pub fn swiglu(&self, out: &mut [f32], gate: &[f32], up: &[f32]) -> Result<(), KernelError> {
        match self.mode {
            CpuMode::Reference => reference::swiglu::swiglu_forward(out, gate, up),
            CpuMode::Fast => cpu::swiglu_forward(out, gate, up),
        }
    }

    pub fn residual(&self, acc: &mut [f32], x: &[f32]) -> Result<(), KernelError> {
        match self.mode {
            CpuMode::Reference => reference::residual::residual_forward(acc, x),
            CpuMode::Fast => cpu::residual_forward(acc, x),
        }
    }
}

/// The reference RMSNorm of `inp` into the front of `xn` (a typed error when too short).
fn reference_norm<'a>(
    op: &'static str,
    xn: &'a mut [f32],
    inp: &[f32],
    n: cpu::NormIn<'_>,
) -> Result<&'a [f32], KernelError> {
    let have = xn.len();
    let xn = xn
        .get_mut(..inp.len())
        .ok_or_else(|| KernelError::Invalid {
            op,
            arg: "xn",
            reason: format!("{have} elements for {} inputs", inp.len()),
        })?;
    reference::rmsnorm::rmsnorm_forward(xn, inp, n.weight, n.eps)?;
    Ok(xn)
}
