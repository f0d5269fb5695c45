//! Named, shape-checked handles to the model's weights inside the memory map. A handle
//! is (shard, byte offset, element count, dtype): resolving it is O(1) and copies
//! nothing; biases (small) are the only tensors copied, to f32.

use cloudrm_kernels::Weights;
use cloudrm_loader::safetensors::TensorView;
use cloudrm_loader::shards::ShardedSafeTensors;
use cloudrm_loader::{Dtype, LlamaConfig};
use half::{bf16, f16};

use super::ModelError;
use crate::error::Result;

/// Where one weight tensor lies in the mapped checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct WeightHandle {
    shard: usize,
    /// Byte offset inside the shard's mapping.
    offset: usize,
    /// Elements.
    len: usize,
    dtype: Dtype,
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
        })
    }

    /// Bytes of weights one decode token reads: every layer matrix and norm, the final
    /// norm and the LM head (the embedding contributes one row, ignored here).
    pub fn decode_bytes_per_token(&self) -> usize {
        let bytes = |h: &WeightHandle| {
            let w = self.get(h);
            w.len() * w.elem_size()
        };
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
        let bytes = self
            .files
            .files()
            .get(h.shard)
            .map(|f| f.mapped_bytes())
            .and_then(|b| b.get(h.offset..h.offset + h.len * h.dtype.size()))
            .unwrap_or(&[]);
        // Alignment and length were checked when the handle was made; a failed cast
        // (impossible) degrades to an empty slice, which kernels reject with an error.
        match h.dtype {
            Dtype::BF16 => {
                Weights::BF16(bytemuck::try_cast_slice::<u8, bf16>(bytes).unwrap_or(&[]))
            }
            Dtype::F16 => Weights::F16(bytemuck::try_cast_slice::<u8, f16>(bytes).unwrap_or(&[])),
            _ => Weights::F32(bytemuck::try_cast_slice::<u8, f32>(bytes).unwrap_or(&[])),
        }
    }

    /// Bytes of every distinct weight tensor (the decode roofline's numerator).
    pub fn weight_bytes(&self) -> usize {
        let f = |h: &WeightHandle| h.len * h.dtype.size();
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
                dtype: view.dtype,
            });
        }
    }
    Err(ModelError::Misaligned {
        tensor: name.to_string(),
        align,
    }
    .into())
}
