//! Tiny random Llama checkpoints written to a temp dir (Hugging Face layout).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use cloudrm::loader::Dtype;
use cloudrm::loader::safetensors::{WriteTensor, write_safetensors};
use half::{bf16, f16};
use serde_json::json;

use super::Rng;

/// Shape of a tiny test model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub tied: bool,
    pub model_type: &'static str,
    pub dtype: Dtype,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            hidden: 48,
            intermediate: 80,
            layers: 2,
            heads: 6,
            kv_heads: 2,
            vocab: 97,
            tied: true,
            model_type: "llama",
            dtype: Dtype::F32,
            seed: 7,
        }
    }
}

/// A fresh, empty temp dir unique to this test.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "cloudrm-test-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tensors (name, shape, f32 data) of a spec, seeded.
pub fn tiny_tensors(spec: &TinySpec) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = Rng::new(spec.seed);
    let hd = spec.hidden / spec.heads;
    let (c, i, v) = (spec.hidden, spec.intermediate, spec.vocab);
    let (q, kv) = (spec.heads * hd, spec.kv_heads * hd);
    let mut t = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n = shape.iter().product();
        let data = rng.vec(n, scale).into_iter().map(|x| x + offset).collect();
        t.push((name, shape, data));
    };
    push("model.embed_tokens.weight".into(), vec![v, c], 1.0, 0.0);
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}.");
        push(format!("{p}input_layernorm.weight"), vec![c], 0.2, 1.0);
        push(format!("{p}self_attn.q_proj.weight"), vec![q, c], 0.3, 0.0);
        push(format!("{p}self_attn.k_proj.weight"), vec![kv, c], 0.3, 0.0);
        push(format!("{p}self_attn.v_proj.weight"), vec![kv, c], 0.3, 0.0);
        push(format!("{p}self_attn.o_proj.weight"), vec![c, q], 0.3, 0.0);
        if spec.model_type == "qwen2" {
            push(format!("{p}self_attn.q_proj.bias"), vec![q], 0.1, 0.0);
            push(format!("{p}self_attn.k_proj.bias"), vec![kv], 0.1, 0.0);
            push(format!("{p}self_attn.v_proj.bias"), vec![kv], 0.1, 0.0);
        }
        push(
            format!("{p}post_attention_layernorm.weight"),
            vec![c],
            0.2,
            1.0,
        );
        push(format!("{p}mlp.gate_proj.weight"), vec![i, c], 0.3, 0.0);
        push(format!("{p}mlp.up_proj.weight"), vec![i, c], 0.3, 0.0);
        push(format!("{p}mlp.down_proj.weight"), vec![c, i], 0.3, 0.0);
    }
    push("model.norm.weight".into(), vec![c], 0.2, 1.0);
    if !spec.tied {
        push("lm_head.weight".into(), vec![v, c], 0.5, 0.0);
    }
    t
}

pub fn tiny_config(spec: &TinySpec) -> serde_json::Value {
    json!({
        "model_type": spec.model_type,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "vocab_size": spec.vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": spec.tied,
        "eos_token_id": 2,
        "bos_token_id": 1,
    })
}

fn encode(data: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => data
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::F16 => data
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
        _ => data.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    }
}

/// Write `tensors` + `config` as a model dir.
pub fn write_model(
    dir: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    config: &serde_json::Value,
    dtype: Dtype,
) {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, d)| encode(d, dtype)).collect();
    let writes: Vec<WriteTensor<'_>> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| WriteTensor {
            name,
            dtype,
            shape,
            data,
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &writes, None).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
}

/// A tiny model written to a temp dir and loaded; the dir is removed once loaded (the
/// mapped file stays readable until the model is dropped).
pub fn load_tiny_model(tag: &str, spec: &TinySpec) -> cloudrm::model::Llama {
    let dir = tiny_model_dir(tag, spec);
    let m = cloudrm::model::Llama::load_dir(&dir).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    m
}

/// Write a tiny model for `spec` into a fresh temp dir and return the dir.
pub fn tiny_model_dir(tag: &str, spec: &TinySpec) -> PathBuf {
    let dir = temp_dir(tag);
    write_model(&dir, &tiny_tensors(spec), &tiny_config(spec), spec.dtype);
    dir
}

/// A dense-tanh head's (dense_w (C*C), dense_b (C), out_w (C), out_b).
pub type HeadWeights = (Vec<f32>, Vec<f32>, Vec<f32>, f32);

/// A tiny CLoud-layout reward model (`reward_base_model.*` + dense-tanh `reward_head.*`)
/// with `vocab` 49152 so that it can borrow the default model's tokenizer files, copied
/// from `tokenizer_src`. `head` = (dense_w (C*C), dense_b (C), out_w (C), out_b); `None`
/// = seeded random.
pub fn tiny_cloud_reward_dir(
    tag: &str,
    method: &str,
    tokenizer_src: &Path,
    head: Option<HeadWeights>,
) -> PathBuf {
    tiny_cloud_reward_dir_edited(tag, method, tokenizer_src, head, |_, _| {})
}

/// [`tiny_cloud_reward_dir`] with `edit` applied to each trunk tensor (by its name, before
/// the `reward_base_model.` prefix) first.
pub fn tiny_cloud_reward_dir_edited(
    tag: &str,
    method: &str,
    tokenizer_src: &Path,
    head: Option<HeadWeights>,
    edit: impl Fn(&str, &mut [f32]),
) -> PathBuf {
    let spec = tiny_reward_spec();
    let c = spec.hidden;
    let mut rng = Rng::new(3);
    let (dw, db, ow, ob) =
        head.unwrap_or_else(|| (rng.vec(c * c, 0.3), rng.vec(c, 0.1), rng.vec(c, 0.5), 0.1));
    let mut t: Vec<_> = tiny_tensors(&spec)
        .into_iter()
        .map(|(n, s, mut d)| {
            edit(&n, &mut d);
            (format!("reward_base_model.{n}"), s, d)
        })
        .collect();
    t.push(("reward_head.dense.weight".into(), vec![c, c], dw));
    t.push(("reward_head.dense.bias".into(), vec![c], db));
    t.push(("reward_head.out_proj.weight".into(), vec![1, c], ow));
    t.push(("reward_head.out_proj.bias".into(), vec![1], vec![ob]));
    let mut cfg = tiny_config(&spec);
    cfg["feedback_method"] = method.into();
    let dir = temp_dir(tag);
    write_model(&dir, &t, &cfg, Dtype::F32);
    copy_tokenizer(tokenizer_src, &dir);
    dir
}

/// The trunk shape of `tiny_cloud_reward_dir` (and of its plain-LM twin).
pub fn tiny_reward_spec() -> TinySpec {
    TinySpec {
        vocab: 49152,
        hidden: 32,
        intermediate: 48,
        heads: 4,
        kv_heads: 2,
        tied: false,
        ..Default::default()
    }
}

/// Copy tokenizer.json and tokenizer_config.json (chat template) from `src` into `dir`.
pub fn copy_tokenizer(src: &Path, dir: &Path) {
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
}

/// The logits of every position of `ids` from a fresh session (64-token blocks).
pub fn all_logits(
    model: &cloudrm::model::Llama,
    cpu: &cloudrm::backend::Cpu,
    ids: &[u32],
) -> Vec<f32> {
    let mut sess = model.new_session(64, 64);
    model
        .forward(cpu, &mut sess, ids, cloudrm::model::LogitsMode::All)
        .unwrap()
        .to_vec()
}
