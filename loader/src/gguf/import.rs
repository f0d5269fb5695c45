//! Import a llama / qwen2 GGUF into the Hugging Face layout: model.safetensors,
//! config.json, tokenizer.json, tokenizer_config.json, generation_config.json.
//!
//! Shapes: a GGUF tensor with `ne = [C_in, C_out]` (ne[0] fastest) is the row-major HF
//! weight of shape `[C_out, C_in]`, so the data is copied as is and the shape reversed.
//!
//! RoPE rows: llama.cpp's `convert_hf_to_gguf.py` (LlamaModel.permute) stores q_proj and
//! k_proj of llama-arch models as
//! `w.reshape(n_head, 2, head_dim / 2, in).swapaxes(1, 2).reshape(out, in)`, i.e. GGUF
//! row `h*HS + 2*i + s` is HF row `h*HS + s*HS/2 + i` (s in {0, 1}, i < HS/2), which
//! turns HF's rotate-half RoPE into llama.cpp's interleaved-pair RoPE. The import
//! applies the inverse ([`unpermute_rows`]); k uses n_head_kv. qwen2 is not permuted.
//!
//! Letters: C hidden, I intermediate, V vocab, NH heads, NKV kv heads, HS head dim.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use half::{bf16, f16};
use serde_json::{Value, json};

use super::reader::GgufFile;
use super::{GgufError, ImportOptions, ImportReport, OutDtype, tokenizer_json};
use crate::LoaderError;
use crate::config::{LlamaConfig, RopeScaling};
use crate::dtype::Dtype;
use crate::safetensors::{WriteTensor, write_safetensors};

/// The Hugging Face name of a GGUF tensor of a llama-family model, `None` when the
/// name is not one of the llama tensors.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty()
        || !layer.bytes().all(|b| b.is_ascii_digit())
        || (layer.len() > 1 && layer.starts_with('0'))
    {
        return None;
    }
    let (part, suffix) = rest.split_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// llama.cpp's q/k row permutation (HF rotate-half order -> GGUF interleaved order):
/// `out[h*HS + 2*i + s] = w[h*HS + s*HS/2 + i]`. `data` is `n_rows` rows of `row_len`.
/// `None` when the sizes do not divide (rows by `n_head`, HS by 2).
pub fn permute_rows(
    data: &[f32],
    n_rows: usize,
    row_len: usize,
    n_head: usize,
) -> Option<Vec<f32>> {
    reorder_rows(data, n_rows, row_len, n_head, false)
}

/// The inverse of [`permute_rows`] (GGUF interleaved order -> HF rotate-half order):
/// `out[h*HS + s*HS/2 + i] = w[h*HS + 2*i + s]`.
pub fn unpermute_rows(
    data: &[f32],
    n_rows: usize,
    row_len: usize,
    n_head: usize,
) -> Option<Vec<f32>> {
    reorder_rows(data, n_rows, row_len, n_head, true)
}

fn reorder_rows(
    data: &[f32],
    n_rows: usize,
    row_len: usize,
    n_head: usize,
    inverse: bool,
) -> Option<Vec<f32>> {
    if n_head == 0 || !n_rows.is_multiple_of(n_head) || n_rows.checked_mul(row_len)? != data.len() {
        return None;
    }
    let head_dim = n_rows / n_head;
    if !head_dim.is_multiple_of(2) {
        return None;
    }
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for s in 0..2 {
            for i in 0..half {
                let hf_row = h * head_dim + s * half + i;
                let gguf_row = h * head_dim + 2 * i + s;
                let (dst, src) = if inverse {
                    (hf_row, gguf_row)
                } else {
                    (gguf_row, hf_row)
                };
                out[dst * row_len..(dst + 1) * row_len]
                    .copy_from_slice(&data[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    Some(out)
}

/// What an architecture needs from the import.
struct Arch {
    name: String,
    model_type: &'static str,
    /// Undo llama.cpp's q/k RoPE permutation.
    permute_qk: bool,
}

fn arch(g: &GgufFile) -> Result<Arch, GgufError> {
    let name = g
        .get_str("general.architecture")?
        .ok_or_else(|| GgufError::MissingKey {
            file: g.file_name().into(),
            key: "general.architecture".into(),
        })?;
    let (model_type, permute_qk) = match name {
        "llama" => ("llama", true),
        "qwen2" => ("qwen2", false),
        other => {
            return Err(GgufError::UnsupportedArchitecture {
                file: g.file_name().into(),
                arch: other.into(),
            });
        }
    };
    Ok(Arch {
        name: name.into(),
        model_type,
        permute_qk,
    })
}

fn req_usize(g: &GgufFile, key: &str) -> Result<usize, GgufError> {
    g.get_usize(key)?.ok_or_else(|| GgufError::MissingKey {
        file: g.file_name().into(),
        key: key.into(),
    })
}

fn bad_meta(g: &GgufFile, key: &str, reason: String) -> GgufError {
    GgufError::BadMetadata {
        file: g.file_name().into(),
        key: key.into(),
        reason,
    }
}

/// The model config from the GGUF metadata and tensor list (tokens from the tokenizer).
fn build_config(
    g: &GgufFile,
    a: &Arch,
    special: &tokenizer_json::SpecialTokens,
    n_tokens: usize,
    dtype: OutDtype,
) -> Result<LlamaConfig, GgufError> {
    let k = |s: &str| format!("{}.{s}", a.name);
    let hidden_size = req_usize(g, &k("embedding_length"))?;
    let num_hidden_layers = req_usize(g, &k("block_count"))?;
    let intermediate_size = req_usize(g, &k("feed_forward_length"))?;
    let num_attention_heads = req_usize(g, &k("attention.head_count"))?;
    let num_key_value_heads = g
        .get_usize(&k("attention.head_count_kv"))?
        .unwrap_or(num_attention_heads);
    let max_position_embeddings = req_usize(g, &k("context_length"))?;
    let eps_key = k("attention.layer_norm_rms_epsilon");
    let rms_norm_eps = g.get_f64(&eps_key)?.ok_or_else(|| GgufError::MissingKey {
        file: g.file_name().into(),
        key: eps_key.clone(),
    })? as f32;
    let rope_theta = g.get_f64(&k("rope.freq_base"))?.unwrap_or(10000.0) as f32;
    if num_attention_heads == 0 {
        return Err(bad_meta(
            g,
            &k("attention.head_count"),
            "must be positive".into(),
        ));
    }
    let head_dim = match g.get_usize(&k("attention.key_length"))? {
        Some(hd) => hd,
        None => {
            if !hidden_size.is_multiple_of(num_attention_heads) {
                return Err(bad_meta(
                    g,
                    &k("embedding_length"),
                    format!("{hidden_size} is not a multiple of {num_attention_heads} heads"),
                ));
            }
            hidden_size / num_attention_heads
        }
    };
    for key in [k("attention.value_length"), k("rope.dimension_count")] {
        if let Some(v) = g.get_usize(&key)?
            && v != head_dim
        {
            return Err(bad_meta(
                g,
                &key,
                format!("{v} differs from the head dim {head_dim} (not supported)"),
            ));
        }
    }
    let rope_scaling = match g.get_str(&k("rope.scaling.type"))? {
        None | Some("none") => RopeScaling::None,
        Some("linear") => {
            let key = k("rope.scaling.factor");
            let factor = g.get_f64(&key)?.ok_or_else(|| GgufError::MissingKey {
                file: g.file_name().into(),
                key,
            })? as f32;
            RopeScaling::Linear { factor }
        }
        Some(other) => {
            return Err(bad_meta(
                g,
                &k("rope.scaling.type"),
                format!("`{other}` is not supported"),
            ));
        }
    };

    let embed = g
        .tensor("token_embd.weight")
        .ok_or_else(|| GgufError::MissingTensor {
            file: g.file_name().into(),
            tensor: "token_embd.weight".into(),
        })?;
    let vocab_size = match embed.dims.as_slice() {
        [_, rows] => usize::try_from(*rows).unwrap_or(usize::MAX),
        _ => {
            return Err(GgufError::BadShape {
                file: g.file_name().into(),
                tensor: embed.name.clone(),
                reason: format!("dims {:?}, expected 2", embed.dims),
            });
        }
    };
    if let Some(v) = g.get_usize(&k("vocab_size"))?
        && v != vocab_size
    {
        return Err(bad_meta(
            g,
            &k("vocab_size"),
            format!("{v} differs from token_embd's {vocab_size} rows"),
        ));
    }
    if n_tokens > vocab_size {
        return Err(bad_meta(
            g,
            "tokenizer.ggml.tokens",
            format!("{n_tokens} tokens but token_embd has {vocab_size} rows"),
        ));
    }
    let has = |n: &str| g.tensor(n).is_some();
    Ok(LlamaConfig {
        model_type: a.model_type.into(),
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        vocab_size,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings: !has("output.weight"),
        qkv_bias: has("blk.0.attn_q.bias"),
        o_bias: has("blk.0.attn_output.bias"),
        mlp_bias: has("blk.0.ffn_up.bias"),
        bos_token_id: special.bos,
        eos_token_ids: special.eos.into_iter().collect(),
        pad_token_id: special.pad,
        sliding_window: None,
        torch_dtype: Some(dtype.torch_name().into()),
    })
}

/// The HF shape a tensor must have under `cfg`, `None` for names outside the model.
fn expected_shape(gguf_name: &str, cfg: &LlamaConfig) -> Option<Vec<usize>> {
    let (c, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
    match gguf_name {
        "token_embd.weight" | "output.weight" => return Some(vec![v, c]),
        "output_norm.weight" => return Some(vec![c]),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.parse::<usize>().ok()? >= cfg.num_hidden_layers {
        return None;
    }
    Some(match rest {
        "attn_norm.weight" | "ffn_norm.weight" => vec![c],
        "attn_q.weight" => vec![q, c],
        "attn_k.weight" | "attn_v.weight" => vec![kv, c],
        "attn_output.weight" => vec![c, q],
        "ffn_gate.weight" | "ffn_up.weight" => vec![i, c],
        "ffn_down.weight" => vec![c, i],
        "attn_q.bias" if cfg.qkv_bias => vec![q],
        "attn_k.bias" | "attn_v.bias" if cfg.qkv_bias => vec![kv],
        "attn_output.bias" if cfg.o_bias => vec![c],
        "ffn_gate.bias" | "ffn_up.bias" if cfg.mlp_bias => vec![i],
        "ffn_down.bias" if cfg.mlp_bias => vec![c],
        _ => return None,
    })
}

/// Every GGUF tensor name the model needs under `cfg`.
fn required_tensors(cfg: &LlamaConfig) -> Vec<String> {
    let mut names = vec![
        "token_embd.weight".to_string(),
        "output_norm.weight".to_string(),
    ];
    if !cfg.tie_word_embeddings {
        names.push("output.weight".into());
    }
    for l in 0..cfg.num_hidden_layers {
        let mut parts = vec![
            "attn_norm.weight",
            "ffn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_down.weight",
        ];
        if cfg.qkv_bias {
            parts.extend(["attn_q.bias", "attn_k.bias", "attn_v.bias"]);
        }
        if cfg.o_bias {
            parts.push("attn_output.bias");
        }
        if cfg.mlp_bias {
            parts.extend(["ffn_gate.bias", "ffn_up.bias", "ffn_down.bias"]);
        }
        names.extend(parts.into_iter().map(|p| format!("blk.{l}.{p}")));
    }
    names
}

fn to_bytes(values: &[f32], dtype: OutDtype) -> Vec<u8> {
    match dtype {
        OutDtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        OutDtype::F16 => values
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
        OutDtype::BF16 => values
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect(),
    }
}

/// One converted tensor.
struct OutTensor {
    name: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn convert_tensors(
    g: &GgufFile,
    a: &Arch,
    cfg: &LlamaConfig,
    dtype: OutDtype,
) -> Result<Vec<OutTensor>, GgufError> {
    let file = g.file_name();
    for name in required_tensors(cfg) {
        if g.tensor(&name).is_none() {
            return Err(GgufError::MissingTensor {
                file: file.into(),
                tensor: name,
            });
        }
    }
    let mut out = Vec::with_capacity(g.tensors().len());
    for t in g.tensors() {
        let unexpected = || GgufError::UnexpectedTensor {
            file: file.into(),
            tensor: t.name.clone(),
            arch: a.name.clone(),
        };
        let hf = hf_tensor_name(&t.name).ok_or_else(unexpected)?;
        let expected = expected_shape(&t.name, cfg).ok_or_else(unexpected)?;
        let shape = t.shape();
        if shape != expected {
            return Err(GgufError::TensorShape {
                file: file.into(),
                tensor: t.name.clone(),
                expected,
                actual: shape,
            });
        }
        let mut values = g.dequantize(&t.name)?;
        let n_head = if t.name.ends_with(".attn_q.weight") || t.name.ends_with(".attn_q.bias") {
            Some(cfg.num_attention_heads)
        } else if t.name.ends_with(".attn_k.weight") || t.name.ends_with(".attn_k.bias") {
            Some(cfg.num_key_value_heads)
        } else {
            None
        };
        if let (true, Some(n_head)) = (a.permute_qk, n_head) {
            let n_rows = shape[0];
            let row_len = shape.get(1).copied().unwrap_or(1);
            values = unpermute_rows(&values, n_rows, row_len, n_head).ok_or_else(|| {
                GgufError::BadShape {
                    file: file.into(),
                    tensor: t.name.clone(),
                    reason: format!(
                        "{n_rows} rows do not split into {n_head} heads of an even head dim"
                    ),
                }
            })?;
        }
        out.push(OutTensor {
            name: hf,
            shape,
            data: to_bytes(&values, dtype),
        });
    }
    Ok(out)
}

/// Removes a directory on drop unless disarmed.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn temp_dir_next_to(out_dir: &Path) -> Result<TempDir, LoaderError> {
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| LoaderError::io(&parent, e))?;
    let stem = out_dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "import".into());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let path = parent.join(format!(
        ".{stem}.gguf-import-{}-{nanos}",
        std::process::id()
    ));
    fs::create_dir(&path).map_err(|e| LoaderError::io(&path, e))?;
    Ok(TempDir { path, keep: false })
}

fn write_json(path: &Path, v: &Value) -> Result<(), LoaderError> {
    let mut text = serde_json::to_vec_pretty(v)
        .map_err(|e| LoaderError::io(path, std::io::Error::other(e)))?;
    text.push(b'\n');
    fs::write(path, text).map_err(|e| LoaderError::io(path, e))
}

const OUTPUT_FILES: [&str; 5] = [
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

/// Move the finished files from `tmp` into `out_dir`: one rename of the directory when
/// `out_dir` is absent or empty, else one rename per file (each atomic).
fn publish(tmp: &mut TempDir, out_dir: &Path) -> Result<(), LoaderError> {
    if fs::rename(&tmp.path, out_dir).is_ok() {
        tmp.keep = true;
        return Ok(());
    }
    if !out_dir.is_dir() {
        return Err(LoaderError::io(
            out_dir,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "output path exists and is not a directory",
            ),
        ));
    }
    for f in OUTPUT_FILES {
        let dst = out_dir.join(f);
        fs::rename(tmp.path.join(f), &dst).map_err(|e| LoaderError::io(&dst, e))?;
    }
    Ok(())
}

pub(super) fn import(
    gguf: &Path,
    out_dir: &Path,
    opts: &ImportOptions,
) -> Result<ImportReport, LoaderError> {
    let g = GgufFile::open(gguf)?;
    let a = arch(&g)?;
    let ctx_key = format!("{}.context_length", a.name);
    let ctx = req_usize(&g, &ctx_key)?;
    let tok = tokenizer_json::build(&g, ctx)?;
    let cfg = build_config(&g, &a, &tok.special, tok.n_tokens, opts.dtype)?;
    let config_json = cfg.to_hf_json();
    // Validate the written form with the same parser the runtime uses.
    let config_text = serde_json::to_string(&config_json)
        .map_err(|e| LoaderError::io("config.json", std::io::Error::other(e)))?;
    LlamaConfig::from_json_str(&config_text, "config.json (from GGUF metadata)")?;

    let tensors = convert_tensors(&g, &a, &cfg, opts.dtype)?;
    let st_dtype = match opts.dtype {
        OutDtype::F32 => Dtype::F32,
        OutDtype::F16 => Dtype::F16,
        OutDtype::BF16 => Dtype::BF16,
    };
    let views: Vec<WriteTensor<'_>> = tensors
        .iter()
        .map(|t| WriteTensor {
            name: &t.name,
            dtype: st_dtype,
            shape: &t.shape,
            data: &t.data,
        })
        .collect();

    let mut generation = serde_json::Map::new();
    for (key, id) in [
        ("bos_token_id", tok.special.bos),
        ("eos_token_id", tok.special.eos),
        ("pad_token_id", tok.special.pad),
    ] {
        if let Some(id) = id {
            generation.insert(key.into(), json!(id));
        }
    }

    let mut tmp = temp_dir_next_to(out_dir)?;
    let st_path = tmp.path.join("model.safetensors");
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(&st_path, &views, Some(&meta))?;
    let bytes_written = fs::metadata(&st_path)
        .map_err(|e| LoaderError::io(&st_path, e))?
        .len();
    write_json(&tmp.path.join("config.json"), &config_json)?;
    write_json(&tmp.path.join("tokenizer.json"), &tok.tokenizer)?;
    write_json(&tmp.path.join("tokenizer_config.json"), &tok.config)?;
    write_json(
        &tmp.path.join("generation_config.json"),
        &Value::Object(generation),
    )?;
    publish(&mut tmp, out_dir)?;
    Ok(ImportReport {
        tensors: views.len(),
        bytes_written,
    })
}
