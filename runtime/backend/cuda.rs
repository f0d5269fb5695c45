//! The Llama forward on the GPU: `CudaLlama` (weights uploaded from a CPU model, or
//! generated on the device for benchmarks) and `CudaSession` (a paged KV cache and
//! activation buffers allocated once): causal prefill, and greedy decode of K sequences
//! that share a prefilled prompt through the cascade attention plan (the prefix's K/V
//! read once per step for all K). Checked against the CPU model by `cloudrm gpu-check`
//! stage (b) and timed by stage (c). One forward, layer by layer, as
//! `model::llama::forward_chunk`:
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
//! error. Not yet behind the CPU's calls (`--device cuda`): no reward head, no sampling
//! on the GPU (greedy only, the argmax read back each step), no CUDA graphs.

use cloudrm_kernels::Weights;
use cloudrm_kernels::cuda::cudarc::driver::CudaSlice;
use cloudrm_kernels::cuda::{
    CudaDevice, CudaError, DevicePlan, IndexBuf, PlanOptions, SampleParams, WorkPlan, check_len,
};
use cloudrm_kernels::reference::attention_paged::{Level, PagedShape};
use cloudrm_kernels::reference::heads::RewardHeadWeights;
use cloudrm_loader::LlamaConfig;
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

    /// A model of shape `cfg` whose weights are generated on the device
    /// (`fill_uniform_bf16`, seeded): benchmark models too large to carry (stage c of
    /// `cloudrm gpu-check`). Linear weights are uniform with variance 1/fan_in, norms
    /// near 1, the embedding uniform in [-1, 1]: activations stay O(1) through the layers.
    pub fn random(dev: &'d CudaDevice, cfg: &LlamaConfig, seed: u64) -> Result<Self, CudaError> {
        if cfg.qkv_bias || cfg.o_bias || cfg.mlp_bias {
            return Err(unsupported(
                "linear biases are not supported on the GPU yet".into(),
            ));
        }
        if cfg.num_hidden_layers == 0 {
            return Err(unsupported("the model has no layers".into()));
        }
        let (c, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (nh, nkv, hs) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let mut tensor = 0u64;
        let mut fill = |n: usize, scale: f32, offset: f32| -> Result<CudaSlice<bf16>, CudaError> {
            tensor += 1;
            let mut t = dev.alloc_zeros::<bf16>(n)?;
            let s = seed ^ tensor.wrapping_mul(0xd1b5_4a32_d192_ed03);
            dev.fill_uniform(&mut t, s, scale, offset)?;
            Ok(t)
        };
        let lin = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
        let embed = fill(v * c, 1.0, 0.0)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            layers.push(CudaLayer {
                attn_norm: fill(c, 0.1, 1.0)?,
                wqkv: fill((nh + 2 * nkv) * hs * c, lin(c), 0.0)?,
                wo: fill(c * nh * hs, lin(nh * hs), 0.0)?,
                mlp_norm: fill(c, 0.1, 1.0)?,
                wgu: fill(2 * i * c, lin(c), 0.0)?,
                wdown: fill(c * i, lin(i), 0.0)?,
            });
        }
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(fill(v * c, lin(c), 0.0)?)
        };
        let final_norm = fill(c, 0.1, 1.0)?;
        Ok(CudaLlama {
            dev,
            c,
            inter: i,
            vocab: v,
            eps: cfg.rms_norm_eps,
            shape: PagedShape {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hs,
                block_size: BLOCK_SIZE,
            },
            embed,
            lm_head,
            final_norm,
            layers,
            inv_freq: dev.upload(&crate::model::rope::inv_freq(cfg))?,
        })
    }

    /// The cache geometry (heads, head size, block size).
    pub fn shape(&self) -> PagedShape {
        self.shape
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Weight bytes one decode step reads: every layer's matrices and norms, the final
    /// norm and the LM head (the embedding table only through the one row it gathers).
    pub fn decode_weight_bytes(&self) -> usize {
        let layer: usize = self
            .layers
            .iter()
            .map(|l| {
                l.attn_norm.len()
                    + l.wqkv.len()
                    + l.wo.len()
                    + l.mlp_norm.len()
                    + l.wgu.len()
                    + l.wdown.len()
            })
            .sum();
        let lm = self.lm_head.as_ref().unwrap_or(&self.embed).len();
        (layer + self.final_norm.len() + lm + self.c) * 2
    }
}

/// The GPU sampler's parameters for the CPU sampler's (the same filters, penalty and
/// Philox key).
pub fn sample_params(p: &cloudrm_sampler::SamplingParams) -> cloudrm_kernels::cuda::SampleParams {
    cloudrm_kernels::cuda::SampleParams {
        temperature: p.temperature,
        top_k: p.top_k as u32,
        top_p: p.top_p,
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty,
        seed: p.seed,
    }
}

/// A reward head on the device (bf16 weights, f32 biases).
pub enum CudaRewardHead {
    /// r = w . h + b
    Linear { w: CudaSlice<bf16>, b: f32 },
    /// r = w_out . tanh(W_dense h + b_dense) + b_out
    DenseTanh {
        dense_w: CudaSlice<bf16>,
        dense_b: CudaSlice<f32>,
        out_w: CudaSlice<bf16>,
        out_b: f32,
    },
}

impl CudaRewardHead {
    /// Uploads a reward head (its weights rounded to bf16).
    pub fn upload(dev: &CudaDevice, head: &RewardHeadWeights<'_>) -> Result<Self, CudaError> {
        Ok(match head {
            RewardHeadWeights::Linear { w, b } => CudaRewardHead::Linear {
                w: dev.upload(&to_bf16(*w))?,
                b: *b,
            },
            RewardHeadWeights::DenseTanh {
                dense_w,
                dense_b,
                out_w,
                out_b,
            } => CudaRewardHead::DenseTanh {
                dense_w: dev.upload(&to_bf16(*dense_w))?,
                dense_b: dev.upload(dense_b)?,
                out_w: dev.upload(&to_bf16(*out_w))?,
                out_b: *out_b,
            },
        })
    }
}

/// Positions per split-K piece of a causal prefill: rows are grouped (one K/V read per
/// group of 32 / G rows), and long contexts are cut in 512-position pieces, enough CTAs
/// without a flood of attention states.
pub const PREFILL_SPLIT: usize = 512;

/// The attention plan of a causal prefill of `n_rows` rows at positions pos0.. of the
/// sequence with block `table`.
pub fn prefill_plan(
    table: &[u32],
    pos0: usize,
    n_rows: usize,
    shape: &PagedShape,
    n_blocks: usize,
) -> Result<WorkPlan, CudaError> {
    WorkPlan::causal_prefill(
        table,
        pos0,
        n_rows,
        shape,
        n_blocks,
        PlanOptions {
            split: Some(PREFILL_SPLIT),
            ..PlanOptions::default()
        },
    )
}

/// The block layout of K sequences decoding after a prefilled prefix they share (the
/// host side of [`CudaSession::decode_shared`], checked without a GPU by
/// `gpu_bench::dry_plans`): the prefix's whole blocks are one cascade level read by all
/// K; a partly filled last prefix block is copied into each sequence's first own block;
/// sequence j's own blocks are `free[j * own..(j + 1) * own]`.
pub struct SharedLayout<'a> {
    shape: PagedShape,
    n_blocks: usize,
    prefix_len: usize,
    /// The prefix's whole blocks.
    shared: &'a [u32],
    /// The prefix's partly filled last block, if any.
    tail_block: Option<u32>,
    free: &'a [u32],
    /// Own blocks per sequence.
    own: usize,
    k: usize,
    /// (K, ld) each sequence's whole table (shared blocks, then its own), for RoPE's
    /// cache writes.
    pub tables: Vec<u32>,
    pub ld: usize,
}

impl<'a> SharedLayout<'a> {
    /// The layout of `k` sequences decoding `steps` tokens after `prefix_len` positions of
    /// `prefix_table`, own blocks taken from `free` (ids outside the prefix's blocks).
    pub fn new(
        shape: PagedShape,
        n_blocks: usize,
        prefix_table: &'a [u32],
        prefix_len: usize,
        k: usize,
        steps: usize,
        free: &'a [u32],
    ) -> Result<Self, CudaError> {
        const OP: &str = "SharedLayout::new";
        let bs = shape.block_size;
        let (full, tail) = (prefix_len / bs, prefix_len % bs);
        if prefix_table.len() < prefix_len.div_ceil(bs) {
            return Err(CudaError::bad(
                OP,
                "prefix_table",
                format!(
                    "{} block ids do not cover {prefix_len} positions",
                    prefix_table.len()
                ),
            ));
        }
        if k == 0 {
            return Err(CudaError::bad(OP, "k", "no sequences"));
        }
        let own = Self::own_blocks(bs, prefix_len, steps);
        if free.len() < k * own {
            return Err(CudaError::bad(
                OP,
                "free",
                format!(
                    "{} free blocks; {k} sequences of {} positions past the shared blocks need {}",
                    free.len(),
                    tail + steps + 1,
                    k * own
                ),
            ));
        }
        let shared = &prefix_table[..full];
        let ld = full + own;
        let tables = (0..k)
            .flat_map(|j| shared.iter().chain(&free[j * own..(j + 1) * own]).copied())
            .collect();
        Ok(SharedLayout {
            shape,
            n_blocks,
            prefix_len,
            shared,
            tail_block: (tail > 0).then(|| prefix_table[full]),
            free,
            own,
            k,
            tables,
            ld,
        })
    }

    /// Own blocks each sequence needs: the prefix's partly filled last block's positions
    /// and `steps` new ones (+1), in blocks of `block_size`.
    pub fn own_blocks(block_size: usize, prefix_len: usize, steps: usize) -> usize {
        (prefix_len % block_size + steps + 1).div_ceil(block_size)
    }

    /// Sequence j's own blocks.
    pub fn own(&self, j: usize) -> &'a [u32] {
        &self.free[j * self.own..(j + 1) * self.own]
    }

    /// The partly filled prefix block and the blocks it must be copied to.
    pub fn tail_copy(&self) -> Option<(u32, Vec<u32>)> {
        self.tail_block
            .map(|b| (b, (0..self.k).map(|j| self.own(j)[0]).collect()))
    }

    /// The position every sequence feeds at step s.
    pub fn position(&self, s: usize) -> u32 {
        (self.prefix_len + s) as u32
    }

    /// The cascade plan of step s: the shared level, then each sequence's own positions
    /// (the prefix's tail and s + 1 new ones), split-K pieces of `split` positions.
    pub fn plan(&self, s: usize, split: Option<usize>) -> Result<WorkPlan, CudaError> {
        let bs = self.shape.block_size;
        let levels = [Level {
            block_table: self.shared,
            len: self.shared.len() * bs,
            members: 0..self.k,
        }];
        let own_tables: Vec<&[u32]> = (0..self.k).map(|j| self.own(j)).collect();
        let suffix_lens = vec![self.prefix_len % bs + s + 1; self.k];
        WorkPlan::cascade(
            if self.shared.is_empty() { &[] } else { &levels },
            &own_tables,
            &suffix_lens,
            &self.shape,
            self.n_blocks,
            PlanOptions {
                split,
                ..PlanOptions::default()
            },
        )
    }
}

/// How a forward's rows attend.
enum Attention {
    /// Partial + merge kernels as the plan says (prefill, decode, cascade).
    Planned(WorkPlan),
    /// Causal prefill of one sequence at positions pos0.. on the tensor cores.
    Flash { pos0: usize },
}

/// The rows of one forward call: token ids at positions, each of a sequence whose block
/// table is a row of `tables`.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    pub ids: &'a [u32],
    pub positions: &'a [u32],
    /// Per row: its sequence's row of `tables`.
    pub seqs: &'a [u32],
    /// (n_seqs, ld_table) block ids; each row covers its sequence's positions.
    pub tables: &'a [u32],
    pub ld_table: usize,
}

/// A KV cache arena and activation buffers for one model, allocated once and reused by
/// every step (prefill chunks, decode steps of up to `max_rows` sequences).
pub struct CudaSession<'m, 'd> {
    m: &'m CudaLlama<'d>,
    max_rows: usize,
    max_logit_rows: usize,
    n_blocks: usize,
    /// Per layer (NB, BS, NKV, HS).
    k_cache: Vec<CudaSlice<bf16>>,
    v_cache: Vec<CudaSlice<bf16>>,
    /// (max_rows, C) f32 residual stream
    x: CudaSlice<f32>,
    /// (max_rows, C)
    xn: CudaSlice<bf16>,
    /// (max_rows, (NH + 2 NKV) HS)
    qkv: CudaSlice<bf16>,
    /// (max_rows, NH HS)
    q: CudaSlice<bf16>,
    att: CudaSlice<bf16>,
    /// (max_rows, C)
    proj: CudaSlice<bf16>,
    /// (max_rows, 2I)
    gu: CudaSlice<bf16>,
    /// (max_rows, I)
    act: CudaSlice<bf16>,
    /// Attention states of the partial pass; grown when a plan needs more slots.
    states_o: CudaSlice<f32>,
    states_lse: CudaSlice<f32>,
    /// (max_logit_rows, V) f32 and their argmax (max_logit_rows)
    logits: CudaSlice<f32>,
    ids: CudaSlice<u32>,
    /// Rows of `logits` / `ids` the last forward wrote.
    n_logits: usize,
    /// Rows of the last forward (their final-normed hidden states are in `xn`).
    last_rows: usize,
    /// The sampler's per-row bitmap (max_logit_rows, ceil(V / 32)), all zero between
    /// calls; allocated at the first `sample`.
    seen: Option<CudaSlice<u32>>,
    /// (max_logit_rows) the sampler's per-row status
    status: CudaSlice<u32>,
    /// Per-step index buffers (refilled in place) and the attention plan.
    ids_d: IndexBuf,
    pos_d: IndexBuf,
    seq_d: IndexBuf,
    table_d: IndexBuf,
    plan_d: Option<DevicePlan>,
    /// Prefill attention on the tensor cores (`flash_prefill_bf16_*`) where the shape
    /// allows it; off by default until a GPU run has checked it end to end.
    flash_prefill: bool,
    hist_off_d: IndexBuf,
    hist_d: IndexBuf,
    ctr_d: IndexBuf,
}

impl<'m, 'd> CudaSession<'m, 'd> {
    /// Buffers for forwards of at most `max_rows` rows producing logits for at most
    /// `max_logit_rows` of them, and a cache of `n_blocks` blocks per layer.
    pub fn new(
        m: &'m CudaLlama<'d>,
        max_rows: usize,
        max_logit_rows: usize,
        n_blocks: usize,
    ) -> Result<Self, CudaError> {
        const OP: &str = "CudaSession::new";
        if max_rows == 0 || n_blocks == 0 || max_logit_rows > max_rows {
            return Err(CudaError::bad(
                OP,
                "sizes",
                format!(
                    "max_rows={max_rows} and n_blocks={n_blocks} must be positive, max_logit_rows={max_logit_rows} at most max_rows"
                ),
            ));
        }
        let d = m.dev;
        let sh = m.shape;
        let (c, inter, v) = (m.c, m.inter, m.vocab);
        let (nh, nkv, hs) = (sh.n_heads, sh.n_kv_heads, sh.head_dim);
        let arena = n_blocks * sh.block_elems();
        let mut k_cache = Vec::with_capacity(m.layers.len());
        let mut v_cache = Vec::with_capacity(m.layers.len());
        for _ in &m.layers {
            k_cache.push(d.alloc_zeros::<bf16>(arena)?);
            v_cache.push(d.alloc_zeros::<bf16>(arena)?);
        }
        let r = max_rows;
        Ok(CudaSession {
            m,
            max_rows,
            max_logit_rows,
            n_blocks,
            k_cache,
            v_cache,
            x: d.alloc_zeros(r * c)?,
            xn: d.alloc_zeros(r * c)?,
            qkv: d.alloc_zeros(r * (nh + 2 * nkv) * hs)?,
            q: d.alloc_zeros(r * nh * hs)?,
            att: d.alloc_zeros(r * nh * hs)?,
            proj: d.alloc_zeros(r * c)?,
            gu: d.alloc_zeros(r * 2 * inter)?,
            act: d.alloc_zeros(r * inter)?,
            states_o: d.alloc_zeros(nh * hs)?,
            states_lse: d.alloc_zeros(nh)?,
            logits: d.alloc_zeros(max_logit_rows.max(1) * v)?,
            ids: d.alloc_zeros(max_logit_rows.max(1))?,
            n_logits: 0,
            last_rows: 0,
            seen: None,
            status: d.alloc_zeros(max_logit_rows.max(1))?,
            ids_d: d.upload_index(&[])?,
            pos_d: d.upload_index(&[])?,
            seq_d: d.upload_index(&[])?,
            table_d: d.upload_index(&[])?,
            plan_d: None,
            flash_prefill: false,
            hist_off_d: d.upload_index(&[])?,
            hist_d: d.upload_index(&[])?,
            ctr_d: d.upload_index(&[])?,
        })
    }

    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    /// Run `prefill`'s attention on the tensor cores (`flash_prefill`) when `on` and the
    /// model's shape allows it (HS 64 or 128, G dividing 16); returns whether it will.
    pub fn set_flash_prefill(&mut self, on: bool) -> bool {
        self.flash_prefill =
            on && cloudrm_kernels::cuda::launch::flash_prefill_supported(&self.m.shape);
        self.flash_prefill
    }

    /// Causal prefill of `ids` at positions pos0.. of the sequence with block `table`
    /// (the earlier positions already in the cache); logits for every row when
    /// `all_logits`, else for the last row only.
    pub fn prefill(
        &mut self,
        table: &[u32],
        pos0: usize,
        ids: &[u32],
        all_logits: bool,
    ) -> Result<(), CudaError> {
        let t = ids.len();
        let attn = if self.flash_prefill {
            Attention::Flash { pos0 }
        } else {
            Attention::Planned(prefill_plan(table, pos0, t, &self.m.shape, self.n_blocks)?)
        };
        let positions: Vec<u32> = (pos0..pos0 + t).map(|p| p as u32).collect();
        let seqs = vec![0u32; t];
        let rows = Rows {
            ids,
            positions: &positions,
            seqs: &seqs,
            tables: table,
            ld_table: table.len(),
        };
        let logit_rows = if all_logits {
            0..t
        } else {
            t.saturating_sub(1)..t
        };
        self.forward_with(&rows, attn, logit_rows)
    }

    /// One forward of `rows` through every layer, attention as `plan` says (its query
    /// sequence b is row b: a causal prefill plan has one per row, a decode plan one per
    /// sequence), then the final norm, the LM head and the argmax for `logit_rows`.
    pub fn forward(
        &mut self,
        rows: &Rows<'_>,
        plan: WorkPlan,
        logit_rows: std::ops::Range<usize>,
    ) -> Result<(), CudaError> {
        self.forward_with(rows, Attention::Planned(plan), logit_rows)
    }

    fn forward_with(
        &mut self,
        rows: &Rows<'_>,
        attn: Attention,
        logit_rows: std::ops::Range<usize>,
    ) -> Result<(), CudaError> {
        const OP: &str = "CudaSession::forward";
        let m = self.m;
        let d = m.dev;
        let t = rows.ids.len();
        if t == 0 || t > self.max_rows {
            return Err(CudaError::bad(
                OP,
                "ids",
                format!("{t} rows; 1..={} allowed", self.max_rows),
            ));
        }
        check_len(OP, "positions", rows.positions.len(), t)?;
        check_len(OP, "seqs", rows.seqs.len(), t)?;
        match &attn {
            Attention::Planned(plan) if plan.n_seqs != t => {
                return Err(CudaError::bad(
                    OP,
                    "plan",
                    format!("{} query sequences for {t} rows", plan.n_seqs),
                ));
            }
            Attention::Flash { .. } if rows.seqs.iter().any(|&s| s != 0) => {
                return Err(CudaError::bad(
                    OP,
                    "seqs",
                    "the tensor-core prefill attends one sequence (table row 0)".to_string(),
                ));
            }
            _ => {}
        }
        if logit_rows.start > logit_rows.end
            || logit_rows.end > t
            || logit_rows.len() > self.max_logit_rows
        {
            return Err(CudaError::bad(
                OP,
                "logit_rows",
                format!(
                    "{}..{} must lie within the {t} rows and span at most {}",
                    logit_rows.start, logit_rows.end, self.max_logit_rows
                ),
            ));
        }
        let sh = m.shape;
        let (c, inter, v) = (m.c, m.inter, m.vocab);
        let (nh, nkv, hs) = (sh.n_heads, sh.n_kv_heads, sh.head_dim);
        let qkv_w = (nh + 2 * nkv) * hs;
        // Nothing of an earlier forward may be read once this one starts.
        self.n_logits = 0;
        self.last_rows = 0;

        // The step's index buffers and plan reuse their device allocations (nothing is
        // allocated per step once the largest step has been seen).
        d.refill_index(&mut self.ids_d, rows.ids)?;
        d.refill_index(&mut self.pos_d, rows.positions)?;
        d.refill_index(&mut self.seq_d, rows.seqs)?;
        d.refill_index(&mut self.table_d, rows.tables)?;
        let flash_pos0 = match attn {
            Attention::Planned(plan) => {
                let n_states = plan.n_slots.max(1) * nh;
                if self.states_lse.len() < n_states {
                    self.states_o = d.alloc_zeros(n_states * hs)?;
                    self.states_lse = d.alloc_zeros(n_states)?;
                }
                match &mut self.plan_d {
                    Some(p) => d.refill_plan(p, plan)?,
                    None => self.plan_d = Some(d.upload_plan(plan)?),
                }
                None
            }
            Attention::Flash { pos0 } => Some(pos0),
        };
        let (ids_d, pos_d, seq_d, table_d) = (&self.ids_d, &self.pos_d, &self.seq_d, &self.table_d);

        let mut x = self.x.slice_mut(0..t * c);
        let mut xn = self.xn.slice_mut(0..t * c);
        let mut qkv = self.qkv.slice_mut(0..t * qkv_w);
        let mut q = self.q.slice_mut(0..t * nh * hs);
        let mut att = self.att.slice_mut(0..t * nh * hs);
        let mut proj = self.proj.slice_mut(0..t * c);
        let mut gu = self.gu.slice_mut(0..t * 2 * inter);
        let mut act = self.act.slice_mut(0..t * inter);

        d.embedding(&mut x, &m.embed, ids_d, c)?;
        d.rmsnorm(&mut xn, &x, &m.layers[0].attn_norm, m.eps)?;
        for (l, lw) in m.layers.iter().enumerate() {
            d.gemm_bf16(&mut qkv, &xn, &lw.wqkv, t, qkv_w, c)?;
            d.rope_qkv_paged(
                &mut q,
                &mut self.k_cache[l],
                &mut self.v_cache[l],
                &qkv,
                pos_d,
                seq_d,
                table_d,
                rows.ld_table,
                &m.inv_freq,
                qkv_w,
                sh,
            )?;
            match (flash_pos0, self.plan_d.as_ref()) {
                (Some(pos0), _) => d.flash_prefill(
                    &mut att,
                    &q,
                    &self.k_cache[l],
                    &self.v_cache[l],
                    table_d,
                    pos0,
                    t,
                    sh,
                )?,
                (None, Some(plan_d)) => d.planned_attention(
                    &mut att,
                    &q,
                    &self.k_cache[l],
                    &self.v_cache[l],
                    plan_d,
                    &mut self.states_o,
                    &mut self.states_lse,
                    sh,
                )?,
                (None, None) => {
                    return Err(CudaError::bad(
                        OP,
                        "plan",
                        "no plan was uploaded".to_string(),
                    ));
                }
            }
            d.gemm_bf16(&mut proj, &att, &lw.wo, t, c, nh * hs)?;
            d.residual_rmsnorm(&mut x, &proj, &mut xn, &lw.mlp_norm, m.eps)?;
            d.gemm_bf16(&mut gu, &xn, &lw.wgu, t, 2 * inter, c)?;
            d.swiglu(&mut act, &gu, &gu.slice(inter..), t, inter, 2 * inter)?;
            d.gemm_bf16(&mut proj, &act, &lw.wdown, t, c, inter)?;
            let next = match m.layers.get(l + 1) {
                Some(n) => &n.attn_norm,
                None => &m.final_norm,
            };
            d.residual_rmsnorm(&mut x, &proj, &mut xn, next, m.eps)?;
        }
        let n = logit_rows.len();
        self.n_logits = n;
        self.last_rows = t;
        if n > 0 {
            let lm = m.lm_head.as_ref().unwrap_or(&m.embed);
            let hidden = xn.slice(logit_rows.start * c..logit_rows.end * c);
            let mut logits = self.logits.slice_mut(0..n * v);
            d.gemm_bf16(&mut logits, &hidden, lm, n, v, c)?;
            let mut ids = self.ids.slice_mut(0..n);
            d.argmax(&mut ids, &logits, v, v)?;
        }
        Ok(())
    }

    /// Copies cache block `src` of every layer's K and V into each block of `dsts` (a
    /// partly filled last prefix block becomes each sequence's own first block).
    pub fn copy_block(&mut self, src: u32, dsts: &[u32]) -> Result<(), CudaError> {
        let be = self.m.shape.block_elems();
        let nb = self.n_blocks as u32;
        if let Some(&bad) = std::iter::once(&src).chain(dsts).find(|&&b| b >= nb) {
            return Err(CudaError::bad(
                "CudaSession::copy_block",
                "blocks",
                format!("block {bad} is outside the arena of {nb} blocks"),
            ));
        }
        if dsts.is_empty() {
            return Ok(());
        }
        let d = self.m.dev;
        let mut tmp = d.alloc_zeros::<bf16>(be)?;
        let at = |b: u32| b as usize * be..(b as usize + 1) * be;
        for cache in self.k_cache.iter_mut().chain(self.v_cache.iter_mut()) {
            d.copy(&cache.slice(at(src)), &mut tmp)?;
            for &dst in dsts {
                d.copy(&tmp, &mut cache.slice_mut(at(dst)))?;
            }
        }
        Ok(())
    }

    /// Greedy decoding of K = `first.len()` sequences that share the first `prefix_len`
    /// positions of the sequence at `prefix_table` (already in the cache): the cascade
    /// plan reads the prefix's whole blocks once per step for all K; a partly filled last
    /// prefix block is copied into each sequence's first own block. Sequence j is fed
    /// `first[j]` at position `prefix_len`; after forward s (of `steps`) the next K
    /// tokens are `next(s, self)` (greedy: `|_, s| s.argmax(k)`; sampling: `s.sample(..)`;
    /// teacher forcing: read `s.logits(k)` and return the forced tokens; an empty list
    /// ends decoding there). Returns each sequence's tokens (first[j], then those fed
    /// after it). Own blocks are taken, in order, from `free` (ids outside the prefix's
    /// whole blocks).
    #[allow(clippy::too_many_arguments)]
    pub fn decode_shared(
        &mut self,
        prefix_table: &[u32],
        prefix_len: usize,
        first: &[u32],
        steps: usize,
        free: &[u32],
        split: Option<usize>,
        mut next: impl FnMut(usize, &mut Self) -> Result<Vec<u32>, CudaError>,
    ) -> Result<Vec<Vec<u32>>, CudaError> {
        const OP: &str = "CudaSession::decode_shared";
        let k = first.len();
        if k > self.max_rows || k > self.max_logit_rows {
            return Err(CudaError::bad(
                OP,
                "first",
                format!(
                    "{k} sequences; 1..={} allowed",
                    self.max_rows.min(self.max_logit_rows)
                ),
            ));
        }
        let layout = SharedLayout::new(
            self.m.shape,
            self.n_blocks,
            prefix_table,
            prefix_len,
            k,
            steps,
            free,
        )?;
        if let Some((src, dsts)) = layout.tail_copy() {
            self.copy_block(src, &dsts)?;
        }
        let seqs: Vec<u32> = (0..k as u32).collect();
        let mut out: Vec<Vec<u32>> = first.iter().map(|&t| vec![t]).collect();
        let mut cur = first.to_vec();
        for s in 0..steps {
            let positions = vec![layout.position(s); k];
            let rows = Rows {
                ids: &cur,
                positions: &positions,
                seqs: &seqs,
                tables: &layout.tables,
                ld_table: layout.ld,
            };
            self.forward(&rows, layout.plan(s, split)?, 0..k)?;
            cur = next(s, self)?;
            if cur.is_empty() {
                break;
            }
            check_len(OP, "next(..)", cur.len(), k)?;
            for (o, &t) in out.iter_mut().zip(&cur) {
                o.push(t);
            }
        }
        Ok(out)
    }

    /// Samples the next token of each of the first `draws.len()` logit rows of the last
    /// forward on the GPU (`sample_f32`: cloudrm-sampler's semantics and Philox coin);
    /// only the ids come back. `histories[j]` are the ids row j penalises (empty without
    /// a repetition penalty), `draws[j]` = (sequence, step) of its Philox draw. The
    /// logits are consumed (overwritten). A row left with nothing to sample is an error.
    pub fn sample(
        &mut self,
        params: SampleParams,
        histories: &[&[u32]],
        draws: &[(u64, u64)],
    ) -> Result<Vec<u32>, CudaError> {
        const OP: &str = "CudaSession::sample";
        let n = draws.len();
        self.check_logit_rows(OP, n)?;
        check_len(OP, "histories", histories.len(), n)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let d = self.m.dev;
        let v = self.m.vocab;
        let words = v.div_ceil(32);
        if self
            .seen
            .as_ref()
            .is_none_or(|s| s.len() < self.max_logit_rows * words)
        {
            self.seen = Some(d.alloc_zeros::<u32>(self.max_logit_rows.max(1) * words)?);
        }
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0u32);
        let mut ids: Vec<u32> = Vec::new();
        for h in histories {
            ids.extend_from_slice(h);
            offsets.push(ids.len() as u32);
        }
        let counters: Vec<u32> = draws
            .iter()
            .flat_map(|&(seq, step)| {
                [
                    step as u32,
                    (step >> 32) as u32,
                    seq as u32,
                    (seq >> 32) as u32,
                ]
            })
            .collect();
        d.refill_index(&mut self.hist_off_d, &offsets)?;
        d.refill_index(&mut self.hist_d, &ids)?;
        d.refill_index(&mut self.ctr_d, &counters)?;
        let Some(seen) = self.seen.as_mut() else {
            unreachable!("allocated above")
        };
        let mut seen_v = seen.slice_mut(0..n * words);
        let mut status = self.status.slice_mut(0..n);
        let mut out = self.ids.slice_mut(0..n);
        let mut logits = self.logits.slice_mut(0..n * v);
        d.sample(
            &mut out,
            &mut status,
            &mut logits,
            v,
            v,
            &self.hist_off_d,
            &self.hist_d,
            &mut seen_v,
            &self.ctr_d,
            params,
        )?;
        let st = d.download(&status)?;
        if let Some((j, &s)) = st.iter().enumerate().find(|&(_, &s)| s != 0) {
            let why = if s == 1 {
                "every logit is NaN"
            } else {
                "no token is left above -inf"
            };
            return Err(CudaError::bad(OP, "logits", format!("row {j}: {why}")));
        }
        // The logits are scratch now; the ids are the sampled tokens.
        self.n_logits = 0;
        d.download(&self.ids.slice(0..n))
    }

    /// The dual head's reward half: rewards of rows `rows` of the last forward (their
    /// final-normed hidden states, which the LM head read too: no second pass), e.g. the
    /// rows that just fed their end-of-turn token (synchronises).
    pub fn rewards(&self, head: &CudaRewardHead, rows: &[u32]) -> Result<Vec<f32>, CudaError> {
        const OP: &str = "CudaSession::rewards";
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= self.last_rows) {
            return Err(CudaError::bad(
                OP,
                "rows",
                format!("row {r}; the last forward had {} rows", self.last_rows),
            ));
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let d = self.m.dev;
        let c = self.m.c;
        let rows_d = d.upload_index(rows)?;
        let hidden = self.xn.slice(0..self.last_rows * c);
        let mut out = d.alloc_zeros::<f32>(rows.len())?;
        match head {
            CudaRewardHead::Linear { w, b } => {
                d.reward_linear(&mut out, &hidden, c, Some(&rows_d), w, *b)?;
            }
            CudaRewardHead::DenseTanh {
                dense_w,
                dense_b,
                out_w,
                out_b,
            } => {
                let mut z = d.alloc_zeros::<f32>(rows.len() * c)?;
                d.reward_dense_tanh(&mut z, &hidden, c, Some(&rows_d), dense_w, dense_b)?;
                d.reward_out(&mut out, &z, out_w, *out_b)?;
            }
        }
        d.download(&out)
    }

    /// The first `n` rows of logits of the last forward, (n, V) f32 (synchronises).
    pub fn logits(&self, n: usize) -> Result<Vec<f32>, CudaError> {
        self.check_logit_rows("CudaSession::logits", n)?;
        self.m.dev.download(&self.logits.slice(0..n * self.m.vocab))
    }

    /// The argmax ids of the first `n` logit rows of the last forward (synchronises).
    pub fn argmax(&self, n: usize) -> Result<Vec<u32>, CudaError> {
        self.check_logit_rows("CudaSession::argmax", n)?;
        self.m.dev.download(&self.ids.slice(0..n))
    }

    fn check_logit_rows(&self, op: &'static str, n: usize) -> Result<(), CudaError> {
        if n > self.n_logits {
            return Err(CudaError::bad(
                op,
                "n",
                format!("{n} rows asked; the last forward wrote {}", self.n_logits),
            ));
        }
        Ok(())
    }
}
