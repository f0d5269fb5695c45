//! Named, shape-checked handles to the model's weights inside the memory map. A handle
//! is (shard, byte offset, element count, dtype): resolving it is O(1) and copies
//! nothing; biases (small) are the only tensors copied, to f32.

use cloudrm_kernels::Weights;
use cloudrm_kernels::weights::{Q8_GROUP, Q8Slice, quantize_q8};
use cloudrm_loader::safetensors::{HugePageRoute, TensorView};
use cloudrm_loader::shards::ShardedSafeTensors;
use cloudrm_loader::{Dtype, LlamaConfig};
use half::{bf16, f16};

use super::ModelError;
use crate::error::Result;

/// How [`LlamaWeights::use_huge_pages`] puts the weights on 2 MiB pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePages {
    /// Copy them into anonymous huge-page memory.
    Copy,
    /// Map the page cache's 2 MiB folios where the kernel gives them (else copy).
    PageCache,
}

/// Where one weight tensor lies in the mapped checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct WeightHandle {
    shard: usize,
    /// Byte offset inside the shard's mapping.
    offset: usize,
    /// Elements.
    len: usize,
    /// Elements per row (the last dimension).
    row: usize,
    dtype: Dtype,
    /// Index into `LlamaWeights::q8` once the tensor is quantised.
    q8: Option<u32>,
}

/// A quantised copy of one weight matrix (see [`LlamaWeights::quantize_q8`]).
#[derive(Debug)]
struct Q8Tensor {
    q: Vec<i8>,
    scales: Vec<bf16>,
}

/// Per-layer weights. Shapes use the config's letters; linear weights are (out, in).
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// (C)
    pub attn_norm: WeightHandle,
    /// (NH*HS, C)
    pub q_proj: WeightHandle,
    /// (NKV*HS, C)
    pub k_proj: WeightHandle,
    /// (NKV*HS, C)
    pub v_proj: WeightHandle,
    /// (C, NH*HS)
    pub o_proj: WeightHandle,
    /// (NH*HS), (NKV*HS), (NKV*HS) f32 when the config has qkv bias
    pub q_bias: Option<Vec<f32>>,
    pub k_bias: Option<Vec<f32>>,
    pub v_bias: Option<Vec<f32>>,
    /// (C)
    pub o_bias: Option<Vec<f32>>,
    /// (C)
    pub mlp_norm: WeightHandle,
    /// (I, C)
    pub gate_proj: WeightHandle,
    /// (I, C)
    pub up_proj: WeightHandle,
    /// (C, I)
    pub down_proj: WeightHandle,
    /// (I), (I), (C) when the config has mlp bias
    pub gate_bias: Option<Vec<f32>>,
    pub up_bias: Option<Vec<f32>>,
    pub down_bias: Option<Vec<f32>>,
}

/// Every weight of a Llama-family decoder, checked against its config.
#[derive(Debug)]
pub struct LlamaWeights {
    pub files: ShardedSafeTensors,
    /// (V, C)
    pub embed: WeightHandle,
    pub layers: Vec<LayerWeights>,
    /// (C)
    pub final_norm: WeightHandle,
    /// (V, C); the embedding table when tied.
    pub lm_head: WeightHandle,
    /// Quantised matrices (empty unless [`LlamaWeights::quantize_q8`] ran).
    q8: Vec<Q8Tensor>,
}

impl LlamaWeights {
    /// Resolve every tensor the config calls for, under `prefix` (e.g. "" or
    /// "reward_base_model."), checking dtype, shape and alignment.
    pub fn load(files: ShardedSafeTensors, cfg: &LlamaConfig, prefix: &str) -> Result<Self> {
        let c = cfg.hidden_size;
        let (q, kv, i, v) = (
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        {
            let get =
                |name: &str, shape: &[usize]| handle(&files, &format!("{prefix}{name}"), shape);
            let bias = |name: &str, n: usize| -> Result<Vec<f32>> {
                let full = format!("{prefix}{name}");
                let view = files.tensor(&full)?;
                check_shape(&full, &view, &[n])?;
                Ok(view.to_f32_vec()?)
            };
            for l in 0..cfg.num_hidden_layers {
                let p = format!("model.layers.{l}.");
                let opt_bias = |on: bool, name: &str, n: usize| -> Result<Option<Vec<f32>>> {
                    if on {
                        bias(&format!("{p}{name}"), n).map(Some)
                    } else {
                        Ok(None)
                    }
                };
                layers.push(LayerWeights {
                    attn_norm: get(&format!("{p}input_layernorm.weight"), &[c])?,
                    q_proj: get(&format!("{p}self_attn.q_proj.weight"), &[q, c])?,
                    k_proj: get(&format!("{p}self_attn.k_proj.weight"), &[kv, c])?,
                    v_proj: get(&format!("{p}self_attn.v_proj.weight"), &[kv, c])?,
                    o_proj: get(&format!("{p}self_attn.o_proj.weight"), &[c, q])?,
                    q_bias: opt_bias(cfg.qkv_bias, "self_attn.q_proj.bias", q)?,
                    k_bias: opt_bias(cfg.qkv_bias, "self_attn.k_proj.bias", kv)?,
                    v_bias: opt_bias(cfg.qkv_bias, "self_attn.v_proj.bias", kv)?,
                    o_bias: opt_bias(cfg.o_bias, "self_attn.o_proj.bias", c)?,
                    mlp_norm: get(&format!("{p}post_attention_layernorm.weight"), &[c])?,
                    gate_proj: get(&format!("{p}mlp.gate_proj.weight"), &[i, c])?,
                    up_proj: get(&format!("{p}mlp.up_proj.weight"), &[i, c])?,
                    down_proj: get(&format!("{p}mlp.down_proj.weight"), &[c, i])?,
                    gate_bias: opt_bias(cfg.mlp_bias, "mlp.gate_proj.bias", i)?,
                    up_bias: opt_bias(cfg.mlp_bias, "mlp.up_proj.bias", i)?,
                    down_bias: opt_bias(cfg.mlp_bias, "mlp.down_proj.bias", c)?,
                });
            }
        }
        let embed = handle(
            &files,
            &format!("{prefix}model.embed_tokens.weight"),
            &[v, c],
        )?;
        let final_norm = handle(&files, &format!("{prefix}model.norm.weight"), &[c])?;
        let lm_head = if cfg.tie_word_embeddings {
            embed
        } else {
            handle(&files, &format!("{prefix}lm_head.weight"), &[v, c])?
        };
        Ok(LlamaWeights {
            files,
            embed,
            layers,
            final_norm,
            lm_head,
            q8: Vec::new(),
        })
    }

    /// Quantise every matrix (the layers' projections, the embedding and the LM head,
    /// once when tied) to Q8: int8 with one bf16 scale per 16 inputs, 1.125 bytes per
    /// weight. Norm weights stay as they are. Each matrix's mapped pages are released once
    /// it is quantised, so only the quantised copy stays resident. Idempotent.
    pub fn quantize_q8(&mut self) -> Result<()> {
        if !self.q8.is_empty() {
            return Ok(());
        }
        let tied =
            self.lm_head.shard == self.embed.shard && self.lm_head.offset == self.embed.offset;
        let mut handles: Vec<&mut WeightHandle> = Vec::new();
        for l in &mut self.layers {
            handles.extend([
                &mut l.q_proj,
                &mut l.k_proj,
                &mut l.v_proj,
                &mut l.o_proj,
                &mut l.gate_proj,
                &mut l.up_proj,
                &mut l.down_proj,
            ]);
        }
        handles.push(&mut self.embed);
        if !tied {
            handles.push(&mut self.lm_head);
        }
        let files = &self.files;
        // Quantise on all pool threads, one tensor per work item.
        let sources: Vec<WeightHandle> = handles.iter().map(|h| **h).collect();
        let slots: Vec<std::sync::Mutex<Option<Result<Q8Tensor>>>> = sources
            .iter()
            .map(|_| std::sync::Mutex::new(None))
            .collect();
        cloudrm_kernels::cpu::pool::global().run_items(
            cloudrm_kernels::cpu::dispatch::num_threads(),
            sources.len(),
            &|i| {
                let r = quantize_tensor(files, &sources[i]);
                *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            },
        );
        let mut q8 = Vec::with_capacity(slots.len());
        for (h, slot) in handles.into_iter().zip(slots) {
            let t = slot
                .into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(|| {
                    Err(ModelError::Quantize("tensor not quantised".into()).into())
                })?;
            h.q8 = Some(q8.len() as u32);
            q8.push(t);
        }
        if tied {
            self.lm_head = self.embed;
        }
        self.q8 = q8;
        Ok(())
    }

    /// Put the mapped checkpoint on 2 MiB pages: decode streams every weight per token,
    /// and 2 MiB pages spare it most TLB misses (+9-17% weight-streaming rate, +11-25%
    /// single-stream decode measured on the development machine).
    /// - [`HugePages::Copy`]: a copy into anonymous huge-page memory
    ///   (`ShardedSafeTensors::make_resident`; tens of ms per 100 MB at load, no
    ///   page-cache sharing between processes). On the development machine (a VM) the
    ///   weights stream 15-25 % faster from it than from the page cache's 2 MiB folios.
    /// - [`HugePages::PageCache`]: without a copy where the kernel keeps the file's page
    ///   cache in 2 MiB folios, reading the file back once if its cached pages are small
    ///   (`ShardedSafeTensors::use_huge_pages`); else the copy.
    ///
    /// Returns the route taken. Refused after [`Self::quantize_q8`]: the quantised copies
    /// are ordinary allocations and the mapping is then mostly unused.
    pub fn use_huge_pages(&mut self, how: HugePages) -> Result<HugePageRoute> {
        if self.is_quantized() {
            return Err(crate::Error::Usage(
                "huge pages apply to the checkpoint's own 16/32-bit weights, not to weights quantised to q8"
                    .into(),
            ));
        }
        Ok(match how {
            HugePages::Copy => {
                self.files.make_resident()?;
                HugePageRoute::Copied
            }
            HugePages::PageCache => self.files.use_huge_pages()?,
        })
    }

    /// The fraction of the mapped checkpoint the kernel maps with 2 MiB pages now (None
    /// where unknown, e.g. not Linux).
    pub fn huge_page_fraction(&self) -> Option<f64> {
        let (huge, all) = self.files.huge_page_bytes()?;
        Some(if all == 0 {
            0.0
        } else {
            huge as f64 / all as f64
        })
    }

    /// Whether [`Self::quantize_q8`] ran.
    pub fn is_quantized(&self) -> bool {
        !self.q8.is_empty()
    }

    /// Bytes of weights one decode token reads: every layer matrix and norm, the final
    /// norm and the LM head (the embedding contributes one row, ignored here).
    pub fn decode_bytes_per_token(&self) -> usize {
        let bytes = |h: &WeightHandle| self.get(h).bytes();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [
                    &l.attn_norm,
                    &l.q_proj,
                    &l.k_proj,
                    &l.v_proj,
                    &l.o_proj,
                    &l.mlp_norm,
                    &l.gate_proj,
                    &l.up_proj,
                    &l.down_proj,
                ]
                .into_iter()
                .map(bytes)
                .sum::<usize>()
            })
            .sum();
        layers + bytes(&self.final_norm) + bytes(&self.lm_head)
    }

    /// The tensor behind a handle, borrowed from the mapping.
    #[inline]
    pub fn get(&self, h: &WeightHandle) -> Weights<'_> {
        if let Some(t) = h.q8.and_then(|i| self.q8.get(i as usize)) {
            // Made by `quantize_q8` as whole groups; a mismatch (impossible) degrades to
            // an empty slice as below.
            return Q8Slice::new(&t.q, &t.scales)
                .map(Weights::Q8)
                .unwrap_or(Weights::F32(&[]));
        }
        mapped(&self.files, h)
    }

    /// Bytes of every distinct weight tensor (the decode roofline's numerator).
    pub fn weight_bytes(&self) -> usize {
        let f = |h: &WeightHandle| self.get(h).bytes();
        let per_layer: usize = self
            .layers
            .iter()
            .map(|l| {
                f(&l.attn_norm)
                    + f(&l.q_proj)
                    + f(&l.k_proj)
                    + f(&l.v_proj)
                    + f(&l.o_proj)
                    + f(&l.mlp_norm)
                    + f(&l.gate_proj)
                    + f(&l.up_proj)
                    + f(&l.down_proj)
            })
            .sum();
        let head =
            if self.lm_head.offset == self.embed.offset && self.lm_head.shard == self.embed.shard {
                0
            } else {
                f(&self.lm_head)
            };
        per_layer + f(&self.embed) + f(&self.final_norm) + head
    }
}

pub(crate) fn check_shape(name: &str, view: &TensorView<'_>, expected: &[usize]) -> Result<()> {
    if view.shape != expected {
        return Err(ModelError::ShapeMismatch {
            tensor: name.to_string(),
            expected: expected.to_vec(),
            actual: view.shape.to_vec(),
        }
        .into());
    }
    Ok(())
}

pub(crate) fn handle(
    files: &ShardedSafeTensors,
    name: &str,
    shape: &[usize],
) -> Result<WeightHandle> {
    let view = files.tensor(name)?;
    check_shape(name, &view, shape)?;
    if !matches!(view.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
        return Err(ModelError::UnsupportedDtype {
            tensor: name.to_string(),
            dtype: view.dtype.to_string(),
        }
        .into());
    }
    let align = view.dtype.size();
    if !(view.data.as_ptr() as usize).is_multiple_of(align) {
        return Err(ModelError::Misaligned {
            tensor: name.to_string(),
            align,
        }
        .into());
    }
    // Find the shard whose mapping holds this view, and the view's offset inside it.
    let ptr = view.data.as_ptr() as usize;
    for (shard, f) in files.files().iter().enumerate() {
        let base = f.mapped_bytes().as_ptr() as usize;
        let end = base + f.mapped_bytes().len();
        if ptr >= base && ptr + view.data.len() <= end {
            return Ok(WeightHandle {
                shard,
                offset: ptr - base,
                len: view.numel(),
                row: shape.last().copied().unwrap_or(1),
                dtype: view.dtype,
                q8: None,
            });
        }
    }
    Err(ModelError::Misaligned {
        tensor: name.to_string(),
        align,
    }
    .into())
}

/// The tensor behind a handle as stored in the mapping (never the quantised copy).
fn mapped<'a>(files: &'a ShardedSafeTensors, h: &WeightHandle) -> Weights<'a> {
    let bytes = files
        .files()
        .get(h.shard)
        .map(|f| f.mapped_bytes())
        .and_then(|b| b.get(h.offset..h.offset + h.len * h.dtype.size()))
        .unwrap_or(&[]);
    // Alignment and length were checked when the handle was made; a failed cast
    // (impossible) degrades to an empty slice, which kernels reject with an error.
    match h.dtype {
        Dtype::BF16 => Weights::BF16(bytemuck::try_cast_slice::<u8, bf16>(bytes).unwrap_or(&[])),
        Dtype::F16 => Weights::F16(bytemuck::try_cast_slice::<u8, f16>(bytes).unwrap_or(&[])),
        _ => Weights::F32(bytemuck::try_cast_slice::<u8, f32>(bytes).unwrap_or(&[])),
    }
}

/// One matrix of the mapping quantised to Q8.
fn quantize_tensor(files: &ShardedSafeTensors, h: &WeightHandle) -> Result<Q8Tensor> {
    let src = mapped(files, h);
    if src.len() != h.len || h.row == 0 || !h.row.is_multiple_of(Q8_GROUP) {
        return Err(ModelError::Quantize(format!(
            "a matrix with rows of {} elements cannot be quantised in groups of {Q8_GROUP} per \
             row (hidden_size, intermediate_size and the attention width must be multiples of \
             {Q8_GROUP})",
            h.row
        ))
        .into());
    }
    let mut q = vec![0i8; h.len];
    let mut scales = vec![bf16::ZERO; h.len / Q8_GROUP];
    quantize_q8(src, &mut q, &mut scales).map_err(|e| ModelError::Quantize(e.to_string()))?;
    // Best effort: failing to drop the 16-bit pages costs memory, not correctness.
    if let Some(f) = files.files().get(h.shard) {
        let _ = f.release_range(h.offset, h.len * h.dtype.size());
    }
    Ok(Q8Tensor { q, scales })
}
