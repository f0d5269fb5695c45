//! The Llama forward pass, written layer by layer against the CPU backend (llm.c's
//! `gpt2_forward`). A `Session` owns the KV cache and every activation buffer, sized once
//! for a maximum context and a prefill chunk, so the per-token path does not allocate.
//!
//! Letters: T tokens in a chunk, C hidden, NH/NKV heads, HS head size, I MLP width,
//! V vocab, L layers, S session capacity (positions).

use std::path::Path;

use cloudrm_kernels::cpu::{Fusion, Linear, NormIn, RopeOut, RopeTable};
use cloudrm_kernels::reference::attention::AttnShape;
use cloudrm_loader::LlamaConfig;
use cloudrm_loader::shards::ShardedSafeTensors;

use super::weights::{LayerWeights, LlamaWeights};
use super::{ModelError, rope};
use crate::backend::Cpu;
use crate::error::Result;

/// A loaded Llama-family decoder (weights memory-mapped).
#[derive(Debug)]
pub struct Llama {
    pub config: LlamaConfig,
    pub weights: LlamaWeights,
    /// (HS/2)
    pub inv_freq: Vec<f32>,
}

/// Which logits a forward call computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// Only the last position's (V).
    Last,
    /// Every position's of this call (T, V).
    All,
    /// None: only the KV cache and the final hidden state are updated.
    None,
}

/// Per-layer statistics at the last position of a forward call (golden tests).
#[derive(Debug, Clone, Default)]
pub struct Trace {
    /// (L) L2 norm of the residual stream after each layer.
    pub layer_out_norms: Vec<f32>,
    /// L2 norm of the final-normed hidden state.
    pub final_norm_norm: f32,
    /// When Some, the energy of every layer's matrix inputs over all positions of the
    /// call's last chunk is added here ([`InputEnergies`]).
    pub inputs: Option<InputEnergies>,
}

/// The energy (sum of squares over positions) of each input channel of the model's
/// matrices.
#[derive(Debug, Clone, Default)]
pub struct InputEnergies {
    /// Per layer: `[attention norm output (Q, K, V), attention output (O), MLP norm
    /// output (gate, up), SwiGLU output (down)]`.
    pub layers: Vec<[Vec<f64>; 4]>,
    /// The final norm's output (the LM head's input).
    pub head: Vec<f64>,
}

/// Add each channel's sum of squares over the rows of `x` (rows of `c`) to `e`.
fn add_energy(e: &mut Vec<f64>, x: &[f32], c: usize) {
    if e.len() != c {
        *e = vec![0.0; c];
    }
    for row in x.chunks_exact(c) {
        for (d, &v) in e.iter_mut().zip(row) {
            *d += (v as f64) * (v as f64);
        }
    }
}

/// The text `--quantize q8` runs through the 16-bit model to find each matrix's most
/// energetic input channels (a dialogue with a critique, the kind of text a CLoud
/// reward model reads).
pub const CALIBRATION_TEXT: &str = include_str!("calibration.txt");

/// KV cache and activation buffers for one sequence.
#[derive(Debug)]
pub struct Session {
    /// S
    capacity: usize,
    /// max T per chunk
    chunk: usize,
    /// positions filled
    pos: usize,
    /// (L, S, NKV*HS)
    k_cache: Vec<f32>,
    /// (L, S, NKV*HS)
    v_cache: Vec<f32>,
    /// (T, C) residual stream
    x: Vec<f32>,
    /// (T, C) normed input of a sublayer
    xn: Vec<f32>,
    /// (T, NH*HS)
    q: Vec<f32>,
    /// (T, NKV*HS)
    k: Vec<f32>,
    /// (T, NKV*HS)
    v: Vec<f32>,
    /// (T, NH*HS)
    att: Vec<f32>,
    /// (T, C)
    proj: Vec<f32>,
    /// (T, I)
    gate: Vec<f32>,
    /// (T, I)
    up: Vec<f32>,
    /// (T, I)
    act: Vec<f32>,
    /// (S) attention scores
    scores: Vec<f32>,
    /// (T) positions of the chunk
    positions: Vec<u32>,
    /// RoPE angles of the chunk's positions (filled once per chunk, read by every layer)
    rope: RopeTable,
    /// (T, V) or (V)
    logits: Vec<f32>,
    /// (C) final-normed hidden state of the last position
    hidden: Vec<f32>,
}

impl Session {
    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forget the cached positions after `len` (truncate); `reset()` is `truncate(0)`.
    pub fn truncate(&mut self, len: usize) {
        self.pos = self.pos.min(len);
    }

    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Final-normed hidden state of the last position of the last forward call (C).
    pub fn last_hidden(&self) -> &[f32] {
        &self.hidden
    }
}

impl Llama {
    /// Load config.json and the safetensors checkpoint from a Hugging Face layout dir.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let files = ShardedSafeTensors::open_dir(dir)?;
        Self::from_parts(config, files, "")
    }

    /// Build from a parsed config and opened checkpoint; tensors are looked up under
    /// `prefix` (e.g. "reward_base_model." for CLoud checkpoints).
    pub fn from_parts(
        config: LlamaConfig,
        files: ShardedSafeTensors,
        prefix: &str,
    ) -> Result<Self> {
        let weights = LlamaWeights::load(files, &config, prefix)?;
        let inv_freq = rope::inv_freq(&config);
        Ok(Llama {
            config,
            weights,
            inv_freq,
        })
    }

    /// A session holding up to `capacity` positions, prefilling at most `chunk` tokens
    /// per pass. All buffers are allocated here, once.
    pub fn new_session(&self, capacity: usize, chunk: usize) -> Session {
        let cfg = &self.config;
        let chunk = chunk.max(1);
        let (c, q, kv, i, v, l) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
            cfg.vocab_size,
            cfg.num_hidden_layers,
        );
        Session {
            capacity,
            chunk,
            pos: 0,
            k_cache: vec![0.0; l * capacity * kv],
            v_cache: vec![0.0; l * capacity * kv],
            x: vec![0.0; chunk * c],
            xn: vec![0.0; chunk * c],
            q: vec![0.0; chunk * q],
            k: vec![0.0; chunk * kv],
            v: vec![0.0; chunk * kv],
            att: vec![0.0; chunk * q],
            proj: vec![0.0; chunk * c],
            gate: vec![0.0; chunk * i],
            up: vec![0.0; chunk * i],
            act: vec![0.0; chunk * i],
            scores: vec![0.0; capacity],
            positions: vec![0; chunk],
            rope: RopeTable::default(),
            logits: vec![0.0; chunk * v],
            hidden: vec![0.0; c],
        }
    }

    /// [`InputEnergies`] of the model's matrices over `ids`, run as one sequence in
    /// chunks of 64 tokens (the activations of one chunk in memory at a time).
    pub fn input_energies(&self, cpu: &Cpu, ids: &[u32]) -> Result<InputEnergies> {
        const CHUNK: usize = 64;
        if ids.is_empty() {
            return Err(ModelError::EmptyInput.into());
        }
        let mut sess = self.new_session(ids.len(), CHUNK);
        let mut trace = Trace {
            inputs: Some(InputEnergies::default()),
            ..Trace::default()
        };
        for piece in ids.chunks(CHUNK) {
            self.forward_traced(cpu, &mut sess, piece, LogitsMode::None, Some(&mut trace))?;
        }
        Ok(trace.inputs.unwrap_or_default())
    }

    /// `--quantize q8` with each layer matrix's kept input columns
    /// ([`cloudrm_kernels::weights::Q8Keep`]) the most energetic over `ids` run through
    /// the 16-bit model (e.g. [`CALIBRATION_TEXT`] tokenised), and every scale searched
    /// with those energies as weights, rather than the weight-only estimate
    /// [`super::weights::LlamaWeights::quantize_q8`] uses.
    pub fn quantize_q8_calibrated(&mut self, cpu: &Cpu, ids: &[u32]) -> Result<()> {
        if self.weights.is_quantized() {
            return Ok(());
        }
        let energies = self.input_energies(cpu, ids)?;
        self.weights.quantize_q8_with(Some(&energies))
    }

    /// [`Self::quantize_q8_calibrated`] over [`CALIBRATION_TEXT`] as `tokenizer` reads
    /// it: what `--quantize q8` does.
    pub fn quantize_q8_with_text(
        &mut self,
        cpu: &Cpu,
        tokenizer: &cloudrm_loader::tokenizer::Tokenizer,
    ) -> Result<()> {
        let ids = tokenizer.encode(CALIBRATION_TEXT, false)?;
        self.quantize_q8_calibrated(cpu, &ids)
    }

    /// Run `ids` (appended after the session's cached positions) and return the logits
    /// the mode asks for: (V) for `Last`, (T, V) for `All`, empty for `None`.
    pub fn forward<'s>(
        &self,
        cpu: &Cpu,
        sess: &'s mut Session,
        ids: &[u32],
        mode: LogitsMode,
    ) -> Result<&'s [f32]> {
        self.forward_traced(cpu, sess, ids, mode, None)
    }

    /// `forward`, recording per-layer norms at the last position into `trace`.
    /// `LogitsMode::All` needs `ids.len() <= chunk`.
    pub fn forward_traced<'s>(
        &self,
        cpu: &Cpu,
        sess: &'s mut Session,
        ids: &[u32],
        mode: LogitsMode,
        mut trace: Option<&mut Trace>,
    ) -> Result<&'s [f32]> {
        if ids.is_empty() {
            return Err(ModelError::EmptyInput.into());
        }
        let needed = sess.pos + ids.len();
        if needed > sess.capacity {
            return Err(ModelError::ContextFull {
                needed,
                capacity: sess.capacity,
            }
            .into());
        }
        let vocab = self.config.vocab_size;
        if let Some((position, &id)) = ids
            .iter()
            .enumerate()
            .find(|&(_, &id)| id as usize >= vocab)
        {
            return Err(ModelError::TokenOutOfRange {
                id,
                position: sess.pos + position,
                vocab,
            }
            .into());
        }
        if mode == LogitsMode::All && ids.len() > sess.chunk {
            return Err(crate::Error::Usage(format!(
                "LogitsMode::All needs at most {} tokens per call (the session's chunk), got {}",
                sess.chunk,
                ids.len()
            )));
        }
        let n_chunks = ids.len().div_ceil(sess.chunk);
        for (ci, chunk) in ids.chunks(sess.chunk).enumerate() {
            let last = ci + 1 == n_chunks;
            let tr = if last { trace.as_deref_mut() } else { None };
            self.forward_chunk(cpu, sess, chunk, tr)?;
        }
        let t = ids.len().min(sess.chunk);
        let last_t = (ids.len() - 1) % sess.chunk;
        let cfg = &self.config;
        let c = cfg.hidden_size;
        // Final norm of the rows that need it, then the LM head.
        let lm_head = self.weights.get(&self.weights.lm_head);
        let final_norm = self.weights.get(&self.weights.final_norm);
        match mode {
            LogitsMode::All => {
                cpu.rmsnorm(
                    &mut sess.xn[..t * c],
                    &sess.x[..t * c],
                    final_norm,
                    cfg.rms_norm_eps,
                )?;
                sess.hidden
                    .copy_from_slice(&sess.xn[last_t * c..(last_t + 1) * c]);
                cpu.matmul(
                    &mut sess.logits[..t * vocab],
                    &sess.xn[..t * c],
                    lm_head,
                    None,
                    c,
                    vocab,
                )?;
                Ok(&sess.logits[..t * vocab])
            }
            LogitsMode::Last | LogitsMode::None => {
                cpu.rmsnorm(
                    &mut sess.hidden,
                    &sess.x[last_t * c..(last_t + 1) * c],
                    final_norm,
                    cfg.rms_norm_eps,
                )?;
                if let Some(tr) = trace {
                    tr.final_norm_norm = l2(&sess.hidden);
                }
                if mode == LogitsMode::None {
                    return Ok(&sess.logits[..0]);
                }
                cpu.matmul(
                    &mut sess.logits[..vocab],
                    &sess.hidden,
                    lm_head,
                    None,
                    c,
                    vocab,
                )?;
                Ok(&sess.logits[..vocab])
            }
        }
    }

    /// One chunk of at most `sess.chunk` tokens through every layer; leaves the residual
    /// stream in `sess.x[..T*C]` and appends K/V to the cache.
    fn forward_chunk(
        &self,
        cpu: &Cpu,
        sess: &mut Session,
        ids: &[u32],
        mut trace: Option<&mut Trace>,
    ) -> Result<()> {
        let cfg = &self.config;
        let w = &self.weights;
        let t = ids.len();
        let (c, qd, kvd, idim) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        let (nh, nkv, hs) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let pos0 = sess.pos;
        let cap = sess.capacity;
        for (i, p) in sess.positions[..t].iter_mut().enumerate() {
            *p = (pos0 + i) as u32;
        }
        sess.rope.fill(&sess.positions[..t], &self.inv_freq)?;
        if let Some(tr) = trace.as_deref_mut() {
            tr.layer_out_norms.clear();
        }
        let x = &mut sess.x[..t * c];
        cpu.embedding(x, ids, w.get(&w.embed), c)?;
        let eps = cfg.rms_norm_eps;
        // (Taken out of the trace for the loop, put back after it.)
        let mut energies = trace.as_deref_mut().and_then(|tr| tr.inputs.take());
        if let Some(e) = energies.as_mut() {
            e.layers.resize_with(w.layers.len(), Default::default);
        }
        for (l, lw) in w.layers.iter().enumerate() {
            // Attention block: x += o_proj(attn(rope(q), rope(k), v)) on rmsnorm(x).
            let xn = &mut sess.xn[..t * c];
            if let Some(e) = energies.as_mut() {
                cpu.rmsnorm(xn, x, w.get(&lw.attn_norm), eps)?;
                add_energy(&mut e.layers[l][0], xn, c);
            }
            let q = &mut sess.q[..t * qd];
            let k = &mut sess.k[..t * kvd];
            let v = &mut sess.v[..t * kvd];
            qkv_proj(cpu, self, lw, x, &sess.rope, q, k, v, xn)?;
            let layer_k = &mut sess.k_cache[l * cap * kvd..(l + 1) * cap * kvd];
            let layer_v = &mut sess.v_cache[l * cap * kvd..(l + 1) * cap * kvd];
            layer_k[pos0 * kvd..(pos0 + t) * kvd].copy_from_slice(k);
            layer_v[pos0 * kvd..(pos0 + t) * kvd].copy_from_slice(v);
            let att = &mut sess.att[..t * qd];
            cpu.attention(
                att,
                q,
                &layer_k[..(pos0 + t) * kvd],
                &layer_v[..(pos0 + t) * kvd],
                &mut sess.scores,
                AttnShape {
                    n_tokens: t,
                    pos0,
                    n_heads: nh,
                    n_kv_heads: nkv,
                    head_dim: hs,
                },
            )?;
            let proj = &mut sess.proj[..t * c];
            cpu.matmul(proj, att, w.get(&lw.o_proj), lw.o_bias.as_deref(), qd, c)?;
            cpu.residual(x, proj)?;
            if let Some(e) = energies.as_mut() {
                add_energy(&mut e.layers[l][1], att, qd);
                cpu.rmsnorm(xn, x, w.get(&lw.mlp_norm), eps)?;
                add_energy(&mut e.layers[l][2], xn, c);
            }
            mlp_block(
                cpu,
                self,
                lw,
                x,
                MlpBuffers {
                    xn,
                    gate: &mut sess.gate[..t * idim],
                    up: &mut sess.up[..t * idim],
                    act: &mut sess.act[..t * idim],
                    proj,
                },
            )?;
            if let Some(e) = energies.as_mut() {
                add_energy(&mut e.layers[l][3], &sess.act[..t * idim], idim);
            }
            if let Some(tr) = trace.as_deref_mut() {
                tr.layer_out_norms.push(l2(&x[(t - 1) * c..]));
            }
        }
        if let Some(e) = energies.as_mut() {
            let xn = &mut sess.xn[..t * c];
            cpu.rmsnorm(xn, x, w.get(&w.final_norm), eps)?;
            add_energy(&mut e.head, xn, c);
        }
        if let Some(tr) = trace {
            tr.inputs = energies;
        }
        sess.pos += t;
        Ok(())
    }
}

/// Scratch of the MLP block for T rows.
pub(crate) struct MlpBuffers<'a> {
    /// (T, C)
    pub xn: &'a mut [f32],
    /// (T, I)
    pub gate: &'a mut [f32],
    /// (T, I)
    pub up: &'a mut [f32],
    /// (T, I)
    pub act: &'a mut [f32],
    /// (T, C)
    pub proj: &'a mut [f32],
}

/// The attention block's input half on T rows of the residual stream x (T, C): q, k, v =
/// the Q, K and V projections of rmsnorm(x) (the layer's attention norm), q and k rotated
/// by `rope` (the call's positions). One fused call: on the fast path one pool job, with
/// no normalised copy of x written (`xn` is the reference path's scratch).
#[allow(clippy::too_many_arguments)]
pub(crate) fn qkv_proj(
    cpu: &Cpu,
    model: &Llama,
    lw: &LayerWeights,
    x: &[f32],
    rope: &RopeTable,
    q: &mut [f32],
    k: &mut [f32],
    v: &mut [f32],
    xn: &mut [f32],
) -> Result<()> {
    let w = &model.weights;
    let c = model.config.hidden_size;
    let rows = (x.len() / c).max(1);
    let (qd, kvd) = (q.len() / rows, k.len() / rows);
    cpu.matmul_many(
        &mut [
            Linear {
                out: q,
                weight: w.get(&lw.q_proj),
                bias: lw.q_bias.as_deref(),
                out_features: qd,
            },
            Linear {
                out: k,
                weight: w.get(&lw.k_proj),
                bias: lw.k_bias.as_deref(),
                out_features: kvd,
            },
            Linear {
                out: v,
                weight: w.get(&lw.v_proj),
                bias: lw.v_bias.as_deref(),
                out_features: kvd,
            },
        ],
        x,
        c,
        Fusion {
            norm: Some(NormIn {
                weight: w.get(&lw.attn_norm),
                eps: model.config.rms_norm_eps,
            }),
            rope: Some(RopeOut {
                table: rope,
                layers: 2,
            }),
        },
        xn,
    )?;
    Ok(())
}

/// The MLP block on T rows of the residual stream x (T, C):
/// x += down(silu(gate(n)) * up(n)), n = rmsnorm(x) (taken in by the gate/up call's input
/// pass on the fast path). Shared by the contiguous forward and the paged engine.
pub(crate) fn mlp_block(
    cpu: &Cpu,
    model: &Llama,
    lw: &LayerWeights,
    x: &mut [f32],
    b: MlpBuffers<'_>,
) -> Result<()> {
    let cfg = &model.config;
    let w = &model.weights;
    let (c, idim) = (cfg.hidden_size, cfg.intermediate_size);
    cpu.gate_up_swiglu(
        b.act,
        b.gate,
        b.up,
        b.xn,
        x,
        Some(NormIn {
            weight: w.get(&lw.mlp_norm),
            eps: cfg.rms_norm_eps,
        }),
        (w.get(&lw.gate_proj), lw.gate_bias.as_deref()),
        (w.get(&lw.up_proj), lw.up_bias.as_deref()),
        c,
        idim,
    )?;
    cpu.matmul(
        b.proj,
        b.act,
        w.get(&lw.down_proj),
        lw.down_bias.as_deref(),
        idim,
        c,
    )?;
    cpu.residual(x, b.proj)?;
    Ok(())
}

fn l2(x: &[f32]) -> f32 {
    x.iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt() as f32
}
