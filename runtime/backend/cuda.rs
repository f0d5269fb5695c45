//! The Llama forward on the GPU, first scaffold: a teacher-forced prefill of one
//! sequence (every position's logits and greedy ids), checked against the CPU model by
//! `cloudrm gpu-check` stage (b). Layer by layer, as `model::llama::forward_chunk`:
//!
//! ```text
//! x = embed(ids)                                   f32 residual (T, C)
//! xn = rmsnorm(x) * attn_norm[0]                   bf16 (T, C)
//! per layer l:
//!   qkv = xn . Wqkv^T                              cuBLAS, Wqkv = [Wq; Wk; Wv] (fused at upload)
//!   q, cache[l] = rope_qkv_paged(qkv)              RoPE, K/V into the paged cache
//!   att = attention(q, cache[l])                   partial + merge, causal prefill plan
//!   x += att . Wo^T; xn = rmsnorm(x) * mlp_norm    cuBLAS + residual_rmsnorm
//!   gu = xn . Wgu^T                                cuBLAS, Wgu = [Wgate; Wup] (fused at upload)
//!   act = silu(gate) * up                          swiglu (ld 2I)
//!   x += act . Wdown^T; xn = rmsnorm(x) * next     next = attn_norm[l+1] or the final norm
//! logits = xn . Wlm^T (f32); ids = argmax(logits)
//! ```
//!
//! Weights are uploaded once as bf16 (f32/f16 checkpoints are rounded). Biases are not
//! supported yet (Llama and SmolLM2 have none): such a model is refused with a typed
//! error. Not yet a `Backend`: no decode step, sessions or reward head.

use cloudrm_kernels::Weights;
use cloudrm_kernels::cuda::cudarc::driver::CudaSlice;
use cloudrm_kernels::cuda::{CudaDevice, CudaError, PlanOptions, WorkPlan};
use cloudrm_kernels::reference::attention_paged::PagedShape;
use half::bf16;

use crate::model::Llama;
use crate::model::WeightHandle;
use crate::model::weights::LayerWeights;

/// Positions per cache block.
const BLOCK_SIZE: usize = 16;

fn to_bf16(w: Weights<'_>) -> Vec<bf16> {
    match w {
        Weights::BF16(s) => s.to_vec(),
        other => (0..other.len())
            .map(|i| bf16::from_f32(other.get(i)))
            .collect(),
    }
}

/// One layer's weights on the device, bf16.
struct CudaLayer {
    /// (C)
    attn_norm: CudaSlice<bf16>,
    /// (NH*HS + 2*NKV*HS, C): q_proj, k_proj, v_proj rows stacked
    wqkv: CudaSlice<bf16>,
    /// (C, NH*HS)
    wo: CudaSlice<bf16>,
    /// (C)
    mlp_norm: CudaSlice<bf16>,
    /// (2I, C): gate_proj then up_proj rows
    wgu: CudaSlice<bf16>,
    /// (C, I)
    wdown: CudaSlice<bf16>,
}

/// A Llama model's weights on one GPU.
pub struct CudaLlama<'d> {
    dev: &'d CudaDevice,
    c: usize,
    inter: usize,
    vocab: usize,
    eps: f32,
    shape: PagedShape,
    /// (V, C)
    embed: CudaSlice<bf16>,
    /// (V, C); None when tied to the embedding
    lm_head: Option<CudaSlice<bf16>>,
    /// (C)
    final_norm: CudaSlice<bf16>,
    layers: Vec<CudaLayer>,
    /// (HS/2)
    inv_freq: CudaSlice<f32>,
}

fn unsupported(reason: String) -> CudaError {
    CudaError::BadArgument {
        op: "CudaLlama::upload",
        arg: "model",
        reason,
    }
}

impl<'d> CudaLlama<'d> {
    /// Uploads every weight (bf16), fusing Q|K|V and gate|up.
    pub fn upload(dev: &'d CudaDevice, model: &Llama) -> Result<Self, CudaError> {
        let cfg = &model.config;
        let w = &model.weights;
        if cfg.qkv_bias || cfg.o_bias || cfg.mlp_bias {
            return Err(unsupported(
                "linear biases are not supported on the GPU yet".into(),
            ));
        }
        let shape = PagedShape {
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            block_size: BLOCK_SIZE,
        };
        let get = |h: &WeightHandle| to_bf16(w.get(h));
        let layer = |lw: &LayerWeights| -> Result<CudaLayer, CudaError> {
            let mut qkv = get(&lw.q_proj);
            qkv.extend(get(&lw.k_proj));
            qkv.extend(get(&lw.v_proj));
            let mut gu = get(&lw.gate_proj);
            gu.extend(get(&lw.up_proj));
            Ok(CudaLayer {
                attn_norm: dev.upload(&get(&lw.attn_norm))?,
                wqkv: dev.upload(&qkv)?,
                wo: dev.upload(&get(&lw.o_proj))?,
                mlp_norm: dev.upload(&get(&lw.mlp_norm))?,
                wgu: dev.upload(&gu)?,
                wdown: dev.upload(&get(&lw.down_proj))?,
            })
        };
        let layers = w.layers.iter().map(layer).collect::<Result<Vec<_>, _>>()?;
        if layers.is_empty() {
            return Err(unsupported("the model has no layers".into()));
        }
        let tied = cfg.tie_word_embeddings;
        Ok(CudaLlama {
            dev,
            c: cfg.hidden_size,
            inter: cfg.intermediate_size,
            vocab: cfg.vocab_size,
            eps: cfg.rms_norm_eps,
            shape,
            embed: dev.upload(&get(&w.embed))?,
            lm_head: if tied {
                None
            } else {
                Some(dev.upload(&get(&w.lm_head))?)
            },
            final_norm: dev.upload(&get(&w.final_norm))?,
            layers,
            inv_freq: dev.upload(&model.inv_freq)?,
        })
    }

    /// Teacher-forced prefill of `ids` at positions 0..T: every position's logits
    /// (T, V) f32 and their argmax (T).
    pub fn prefill_logits(&self, ids: &[u32]) -> Result<(Vec<f32>, Vec<u32>), CudaError> {
        const OP: &str = "CudaLlama::prefill_logits";
        let d = self.dev;
        let t = ids.len();
        if t == 0 {
            return Err(CudaError::BadArgument {
                op: OP,
                arg: "ids",
                reason: "empty".into(),
            });
        }
        let sh = self.shape;
        let (c, inter, v) = (self.c, self.inter, self.vocab);
        let (nh, nkv, hs) = (sh.n_heads, sh.n_kv_heads, sh.head_dim);
        let qkv_w = (nh + 2 * nkv) * hs;
        let nb = t.div_ceil(BLOCK_SIZE);
        let table: Vec<u32> = (0..nb as u32).collect();
        let positions: Vec<u32> = (0..t as u32).collect();

        let ids_d = d.upload_index(ids)?;
        let pos_d = d.upload_index(&positions)?;
        let seq_d = d.upload_index(&vec![0; t])?;
        let table_d = d.upload_index(&table)?;
        let plan = WorkPlan::causal_prefill(
            &table,
            0,
            t,
            &sh,
            nb,
            PlanOptions {
                split: Some(64),
                ..PlanOptions::default()
            },
        )?;
        let n_states = plan.n_slots.max(1) * nh;
        let plan_d = d.upload_plan(plan)?;

        let mut x = d.alloc_zeros::<f32>(t * c)?;
        let mut xn = d.alloc_zeros::<bf16>(t * c)?;
        let mut qkv = d.alloc_zeros::<bf16>(t * qkv_w)?;
        let mut q = d.alloc_zeros::<bf16>(t * nh * hs)?;
        let mut att = d.alloc_zeros::<bf16>(t * nh * hs)?;
        let mut proj = d.alloc_zeros::<bf16>(t * c)?;
        let mut gu = d.alloc_zeros::<bf16>(t * 2 * inter)?;
        let mut act = d.alloc_zeros::<bf16>(t * inter)?;
        let mut states_o = d.alloc_zeros::<f32>(n_states * hs)?;
        let mut states_lse = d.alloc_zeros::<f32>(n_states)?;
        let mut logits = d.alloc_zeros::<f32>(t * v)?;
        let mut out_ids = d.alloc_zeros::<u32>(t)?;
        let arena = nb * sh.block_elems();
        let mut k_cache: Vec<CudaSlice<bf16>> = Vec::with_capacity(self.layers.len());
        let mut v_cache: Vec<CudaSlice<bf16>> = Vec::with_capacity(self.layers.len());
        for _ in &self.layers {
            k_cache.push(d.alloc_zeros::<bf16>(arena)?);
            v_cache.push(d.alloc_zeros::<bf16>(arena)?);
        }

        d.embedding(&mut x, &self.embed, &ids_d, c)?;
        d.rmsnorm(&mut xn, &x, &self.layers[0].attn_norm, self.eps)?;
        for (l, lw) in self.layers.iter().enumerate() {
            d.gemm_bf16(&mut qkv, &xn, &lw.wqkv, t, qkv_w, c)?;
            d.rope_qkv_paged(
                &mut q,
                &mut k_cache[l],
                &mut v_cache[l],
                &qkv,
                &pos_d,
                &seq_d,
                &table_d,
                nb,
                &self.inv_freq,
                qkv_w,
                sh,
            )?;
            d.planned_attention(
                &mut att,
                &q,
                &k_cache[l],
                &v_cache[l],
                &plan_d,
                &mut states_o,
                &mut states_lse,
                sh,
            )?;
            d.gemm_bf16(&mut proj, &att, &lw.wo, t, c, nh * hs)?;
            d.residual_rmsnorm(&mut x, &proj, &mut xn, &lw.mlp_norm, self.eps)?;
            d.gemm_bf16(&mut gu, &xn, &lw.wgu, t, 2 * inter, c)?;
            d.swiglu(&mut act, &gu, &gu.slice(inter..), t, inter, 2 * inter)?;
            d.gemm_bf16(&mut proj, &act, &lw.wdown, t, c, inter)?;
            let next = match self.layers.get(l + 1) {
                Some(n) => &n.attn_norm,
                None => &self.final_norm,
            };
            d.residual_rmsnorm(&mut x, &proj, &mut xn, next, self.eps)?;
        }
        let lm = self.lm_head.as_ref().unwrap_or(&self.embed);
        d.gemm_bf16(&mut logits, &xn, lm, t, v, c)?;
        d.argmax(&mut out_ids, &logits, v, v)?;
        let logits_h = d.download(&logits)?;
        let ids_h = d.download(&out_ids)?;
        Ok((logits_h, ids_h))
    }
}
