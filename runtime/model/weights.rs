//! Named, shape-checked handles to the model's weights inside the memory map. A handle
//! is (shard, byte offset, element count, dtype): resolving it is O(1) and copies
//! nothing; biases (small) are the only tensors copied, to f32.

use cloudrm_kernels::Weights;
use cloudrm_kernels::weights::{Q8_GROUP, Q8Fit, Q8Slice, q8_keep_len, quantize_q8_keep};
use cloudrm_loader::safetensors::{HugePageRoute, TensorView};
use cloudrm_loader::shards::ShardedSafeTensors;
use cloudrm_loader::{Dtype, LlamaConfig};
use half::{bf16, f16};

use super::ModelError;
use super::llama::InputEnergies;
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
    /// Rows' length, and the input columns kept at 16 bits with their values
    /// (`Q8Keep`; empty for the embedding and the LM head).
    row: usize,
    keep_cols: Vec<u32>,
    keep_vals: Vec<bf16>,
}

/// Where a matrix's input energies come from (they rank its input columns for keeping
/// at 16 bits and weight its scale search): measured, or a weight-only estimate of each
/// input channel's energy.
#[derive(Debug, Clone, Copy)]
enum InputsOf {
    /// Not known (an embedding table not tied to the head: its rows are looked up).
    None,
    /// Measured: `InputEnergies::layers[layer][kind]`.
    Measured { layer: usize, kind: usize },
    /// The LM head's: measured (`InputEnergies::head`) when given, else as `Norm` of the
    /// final norm.
    Head(WeightHandle),
    /// The output of an RMSNorm with these weights (Q/K/V, gate/up): channel j's energy
    /// ~ g_j^2.
    Norm(WeightHandle),
    /// The attention's output (O): channel (head h, dim d) carries a mix of V's channel
    /// (kv head of h, d), whose energy ~ |row of V scaled by the attention norm|^2.
    Attention {
        v: WeightHandle,
        norm: WeightHandle,
        head_dim: usize,
        group: usize,
    },
    /// SwiGLU's output (down): channel j ~ silu(gate_j . n) * (up_j . n), n the MLP
    /// norm's output: energy ~ |gate_j scaled by the norm|^2 |up_j scaled by the norm|^2.
    Mlp {
        gate: WeightHandle,
        up: WeightHandle,
        norm: WeightHandle,
    },
}

/// Input columns each layer matrix keeps at 16 bits under `--quantize q8`: 16 (fewer for
/// rows under 512 elements), 2.8 % of a 576-wide row. On the default model (the golden
/// texts, scales max|w| / 127) this takes the logits' error from 2.13e-2 relative L2 to
/// 1.18e-2 with columns ranked on the calibration text, 1.67e-2 ranked from the weights,
/// for 3.3 % more bytes per decode token; with the scales searched
/// ([`Q8Fit::Search`], weighted by the same energies) 8.08e-3 and 1.04e-2
/// (docs/benchmarks.md).
const KEEP_COLS: usize = 16;

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
    /// Attention head size and query heads per KV head (for ranking O's inputs).
    head_dim: usize,
    kv_group: usize,
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
            head_dim: cfg.head_dim,
            kv_group: (cfg.num_attention_heads / cfg.num_key_value_heads.max(1)).max(1),
        })
    }

    /// Quantise every matrix (the layers' projections, the embedding and the LM head,
    /// once when tied) to Q8: int8 with one bf16 scale per 16 inputs, 1.125 bytes per
    /// weight. Norm weights stay as they are. Each matrix's mapped pages are released once
    /// it is quantised, so only the quantised copy stays resident. Idempotent.
    pub fn quantize_q8(&mut self) -> Result<()> {
        self.quantize_q8_with(None)
    }

    /// [`Self::quantize_q8`], the kept input columns ranked and the scales searched by
    /// measured input energies when given (`Llama::quantize_q8_calibrated`), else by the
    /// weight-only estimate. An empty vector of `energies` (or no layers) means not
    /// measured: that input takes the estimate. Energies that do not fit the model (a
    /// layer count or a width other than the matrices', a non-finite or negative value)
    /// are a typed error, before anything is quantised.
    pub fn quantize_q8_with(&mut self, energies: Option<&InputEnergies>) -> Result<()> {
        if !self.q8.is_empty() {
            return Ok(());
        }
        if let Some(e) = energies {
            self.check_energies(e)?;
        }
        let tied =
            self.lm_head.shard == self.embed.shard && self.lm_head.offset == self.embed.offset;
        let (head_dim, group) = (self.head_dim, self.kv_group);
        let n_layers = self.layers.len();
        let mut handles: Vec<(&mut WeightHandle, InputsOf)> = Vec::new();
        for (li, l) in self.layers.iter_mut().enumerate() {
            let measured = |kind: usize| {
                energies
                    .and_then(|e| e.layers.get(li))
                    .filter(|e| !e[kind].is_empty())
                    .map(|_| InputsOf::Measured { layer: li, kind })
            };
            let (an, mn) = (InputsOf::Norm(l.attn_norm), InputsOf::Norm(l.mlp_norm));
            let attn = InputsOf::Attention {
                v: l.v_proj,
                norm: l.attn_norm,
                head_dim,
                group,
            };
            let mlp = InputsOf::Mlp {
                gate: l.gate_proj,
                up: l.up_proj,
                norm: l.mlp_norm,
            };
            let (an, attn, mn, mlp) = (
                measured(0).unwrap_or(an),
                measured(1).unwrap_or(attn),
                measured(2).unwrap_or(mn),
                measured(3).unwrap_or(mlp),
            );
            handles.extend([
                (&mut l.q_proj, an),
                (&mut l.k_proj, an),
                (&mut l.v_proj, an),
                (&mut l.o_proj, attn),
                (&mut l.gate_proj, mn),
                (&mut l.up_proj, mn),
                (&mut l.down_proj, mlp),
            ]);
        }
        let head = InputsOf::Head(self.final_norm);
        handles.push((&mut self.embed, if tied { head } else { InputsOf::None }));
        if !tied {
            handles.push((&mut self.lm_head, head));
        }
        let files = &self.files;
        let sources: Vec<(WeightHandle, InputsOf)> =
            handles.iter().map(|(h, k)| (**h, *k)).collect();
        // Work items: the embedding and the head, one each, first (the largest: claimed
        // first, they do not leave one thread working alone at the end), then a layer's
        // attention matrices (4) and its MLP matrices (3). An item ranks all its matrices'
        // inputs before it quantises any, so O's ranking reads V (and down's gate and up)
        // before their mapped pages are released.
        let mut items: Vec<std::ops::Range<usize>> =
            (7 * n_layers..sources.len()).map(|i| i..i + 1).collect();
        for l in 0..n_layers {
            items.push(7 * l..7 * l + 4);
            items.push(7 * l + 4..7 * l + 7);
        }
        let slots: Vec<std::sync::Mutex<Option<Result<Q8Tensor>>>> = sources
            .iter()
            .map(|_| std::sync::Mutex::new(None))
            .collect();
        cloudrm_kernels::cpu::pool::global().run_items(
            cloudrm_kernels::cpu::dispatch::num_threads(),
            items.len(),
            &|it| {
                let range = items[it].clone();
                let scores: Vec<Vec<f64>> = sources[range.clone()]
                    .iter()
                    .map(|(h, inputs)| input_scores(files, h.row, *inputs, energies))
                    .collect();
                for (i, score) in range.zip(scores) {
                    let (h, inputs) = &sources[i];
                    let keep = match inputs {
                        InputsOf::Head(_) | InputsOf::None => Vec::new(),
                        _ if score.len() != h.row => Vec::new(),
                        _ => top_columns(&score, KEEP_COLS.min(h.row / 32)),
                    };
                    let r = quantize_tensor(files, h, keep, importance(&score, h.row));
                    *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                }
            },
        );
        let mut q8 = Vec::with_capacity(slots.len());
        for ((h, _), slot) in handles.into_iter().zip(slots) {
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

    /// [`Self::quantize_q8_with`]'s check of `e` against the model's matrices.
    fn check_energies(&self, e: &InputEnergies) -> Result<()> {
        let bad = |what: String| Err(ModelError::Quantize(format!("input energies {what}")).into());
        if !e.layers.is_empty() && e.layers.len() != self.layers.len() {
            return bad(format!(
                "for {} layers; the model has {}",
                e.layers.len(),
                self.layers.len()
            ));
        }
        // `v` against rows of `row`; `what` names it (made only for the message).
        let check = |v: &[f64], row: usize, what: &dyn Fn() -> String| -> Result<()> {
            if !v.is_empty() && v.len() != row {
                return bad(format!(
                    "{}: {} channels, its matrix's rows {row}",
                    what(),
                    v.len()
                ));
            }
            match v.iter().position(|x| !x.is_finite() || *x < 0.0) {
                Some(j) => bad(format!("{}: {} at channel {j}", what(), v[j])),
                None => Ok(()),
            }
        };
        const KINDS: [&str; 4] = ["Q/K/V", "O", "gate/up", "down"];
        for (li, (el, l)) in e.layers.iter().zip(&self.layers).enumerate() {
            let rows = [l.q_proj.row, l.o_proj.row, l.gate_proj.row, l.down_proj.row];
            for (kind, (v, row)) in el.iter().zip(rows).enumerate() {
                check(v, row, &|| format!("of layer {li}'s {} input", KINDS[kind]))?;
            }
        }
        check(&e.head, self.lm_head.row, &|| "of the head's input".into())
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

    /// Whether a [`HugePages::Copy`] fits comfortably: the memory Linux reports available
    /// (`MemAvailable`) holds the mapped checkpoint twice over (the copy, and as much
    /// again for everything else). False where unknown (not Linux, no /proc), for
    /// weights already copied and for quantised ones.
    pub fn copy_fits(&self) -> bool {
        if self.is_quantized() {
            return false;
        }
        let mapped: usize = self
            .files
            .files()
            .iter()
            .filter(|f| !f.is_resident())
            .map(|f| f.mapped_bytes().len())
            .sum();
        mapped > 0
            && std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| mem_available(&m))
                .is_some_and(|avail| avail / 2 >= mapped as u64)
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
            return Q8Slice::with_keep(&t.q, &t.scales, t.row, &t.keep_cols, &t.keep_vals)
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

/// Each input column's energy, by the estimate `inputs` names, of a matrix with rows of
/// `row` elements (empty when not known).
fn input_scores(
    files: &ShardedSafeTensors,
    row: usize,
    inputs: InputsOf,
    energies: Option<&InputEnergies>,
) -> Vec<f64> {
    let f32s = |h: &WeightHandle| mapped(files, h);
    // Per row of `m`, |row scaled by g|^2 (f32 products, f64 sums).
    let scaled_norms = |m: &WeightHandle, g: &[f64]| -> Vec<f64> {
        let w = f32s(m);
        let c = g.len().max(1);
        let g: Vec<f32> = g.iter().map(|&v| v as f32).collect();
        let mut row = vec![0f32; c];
        (0..w.len() / c)
            .map(|r| {
                match w.slice(r * c, c) {
                    Weights::BF16(s) => row.iter_mut().zip(s).for_each(|(d, v)| *d = v.to_f32()),
                    Weights::F16(s) => row.iter_mut().zip(s).for_each(|(d, v)| *d = v.to_f32()),
                    Weights::F32(s) => row.copy_from_slice(s),
                    other => row
                        .iter_mut()
                        .enumerate()
                        .for_each(|(j, d)| *d = other.get(j)),
                }
                row.chunks(16)
                    .zip(g.chunks(16))
                    .map(|(a, b)| {
                        a.iter().zip(b).map(|(x, y)| (x * y) * (x * y)).sum::<f32>() as f64
                    })
                    .sum()
            })
            .collect()
    };
    let norm = |h: &WeightHandle| -> Vec<f64> {
        let w = f32s(h);
        (0..w.len()).map(|j| w.get(j) as f64).collect()
    };
    match inputs {
        InputsOf::None => Vec::new(),
        InputsOf::Measured { layer, kind } => energies
            .and_then(|e| e.layers.get(layer))
            .map(|e| e[kind].clone())
            .unwrap_or_default(),
        InputsOf::Head(g) => match energies {
            Some(e) if e.head.len() == row => e.head.clone(),
            _ => norm(&g).iter().map(|g| g * g).collect(),
        },
        InputsOf::Norm(g) => norm(&g).iter().map(|g| g * g).collect(),
        InputsOf::Attention {
            v,
            norm: g,
            head_dim,
            group,
        } => {
            let vn = scaled_norms(&v, &norm(&g));
            (0..row)
                .map(|j| {
                    let (h, d) = (j / head_dim.max(1), j % head_dim.max(1));
                    vn.get(h / group * head_dim + d).copied().unwrap_or(0.0)
                })
                .collect()
        }
        InputsOf::Mlp { gate, up, norm: g } => {
            let g = norm(&g);
            let (gn, un) = (scaled_norms(&gate, &g), scaled_norms(&up, &g));
            gn.iter().zip(&un).map(|(a, b)| a * b).collect()
        }
    }
}

/// The `k` columns of the highest `score` (the input columns to keep at 16 bits),
/// ascending.
fn top_columns(score: &[f64], k: usize) -> Vec<u32> {
    let row = score.len();
    if k == 0 || row == 0 {
        return Vec::new();
    }
    let mut order: Vec<u32> = (0..row as u32).collect();
    order.sort_by(|&a, &b| {
        score[b as usize]
            .total_cmp(&score[a as usize])
            .then(a.cmp(&b))
    });
    order.truncate(k);
    order.sort_unstable();
    order
}

/// Each input column's weight for the Q8 scale search ([`Q8Fit::Search`]): the scores
/// over their mean (f32 keeps their ratios however large the energies), or `None` (all
/// columns alike) when they are not known or not usable.
fn importance(score: &[f64], row: usize) -> Option<Vec<f32>> {
    let mean = score.iter().sum::<f64>() / score.len().max(1) as f64;
    if score.len() != row || !mean.is_finite() || mean <= 0.0 {
        return None;
    }
    let a: Vec<f32> = score.iter().map(|&v| (v / mean) as f32).collect();
    a.iter().all(|v| v.is_finite() && *v >= 0.0).then_some(a)
}

/// One matrix of the mapping quantised to Q8, with the input columns `keep_cols` kept
/// at 16 bits.
fn quantize_tensor(
    files: &ShardedSafeTensors,
    h: &WeightHandle,
    keep_cols: Vec<u32>,
    importance: Option<Vec<f32>>,
) -> Result<Q8Tensor> {
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
    let mut keep_vals = vec![bf16::ZERO; q8_keep_len(h.len / h.row, keep_cols.len())];
    let fit = Q8Fit::Search(importance.as_deref());
    quantize_q8_keep(
        src,
        h.row,
        &keep_cols,
        fit,
        &mut q,
        &mut scales,
        &mut keep_vals,
    )
    .map_err(|e| ModelError::Quantize(e.to_string()))?;
    // Best effort: failing to drop the 16-bit pages costs memory, not correctness.
    if let Some(f) = files.files().get(h.shard) {
        let _ = f.release_range(h.offset, h.len * h.dtype.size());
    }
    Ok(Q8Tensor {
        q,
        scales,
        row: h.row,
        keep_cols,
        keep_vals,
    })
}

/// `MemAvailable` of a /proc/meminfo text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    cloudrm_loader::pages::kb_field(meminfo, "MemAvailable:")
}

#[cfg(test)]
mod tests {
    use super::mem_available;

    #[test]
    fn mem_available_reads_the_kb_line() {
        let m = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(mem_available(m), Some(20_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots kB\n"), None);
        assert_eq!(mem_available("MemAvailable: 5 MB\n"), None);
    }
}
