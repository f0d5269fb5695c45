//! `config.json` of Llama-family checkpoints (llama, mistral, qwen2).
//!
//! Accepts both the transformers 4 layout (`rope_theta`, `rope_scaling`) and the
//! transformers 5 layout (`rope_parameters`), validates the shape fields, and can write
//! the config back as a Hugging Face `config.json` (used by the GGUF import).

use std::path::Path;

use serde_json::{Map, Value, json};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: invalid JSON: {source}")]
    Json {
        file: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{file}: missing field `{field}`")]
    MissingField { file: String, field: String },
    #[error("{file}: field `{field}` has an invalid value: {reason}")]
    InvalidField {
        file: String,
        field: String,
        reason: String,
    },
    #[error("{file}: unsupported {what} `{value}` (supported: {supported})")]
    Unsupported {
        file: String,
        what: String,
        value: String,
        supported: String,
    },
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.x wavelength-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

/// The shape and numerics of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `model_type`: "llama", "mistral" or "qwen2".
    pub model_type: String,
    /// C
    pub hidden_size: usize,
    /// I
    pub intermediate_size: usize,
    /// L
    pub num_hidden_layers: usize,
    /// NH
    pub num_attention_heads: usize,
    /// NKV
    pub num_key_value_heads: usize,
    /// HS
    pub head_dim: usize,
    /// V
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (qwen2 always; llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (llama `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (llama `mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Mistral sliding window, when set (recorded; attention windows are not applied).
    pub sliding_window: Option<usize>,
    /// `torch_dtype` / `dtype` as written.
    pub torch_dtype: Option<String>,
}

fn get_usize(
    obj: &Map<String, Value>,
    file: &str,
    field: &str,
) -> Result<Option<usize>, ConfigError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|x| Some(x as usize))
            .ok_or_else(|| ConfigError::InvalidField {
                file: file.into(),
                field: field.into(),
                reason: format!("expected a non-negative integer, got {v}"),
            }),
    }
}

fn req_usize(obj: &Map<String, Value>, file: &str, field: &str) -> Result<usize, ConfigError> {
    let v = get_usize(obj, file, field)?.ok_or_else(|| ConfigError::MissingField {
        file: file.into(),
        field: field.into(),
    })?;
    if v == 0 {
        return Err(ConfigError::InvalidField {
            file: file.into(),
            field: field.into(),
            reason: "must be positive".into(),
        });
    }
    Ok(v)
}

fn get_f32(obj: &Map<String, Value>, file: &str, field: &str) -> Result<Option<f32>, ConfigError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x as f32)),
            _ => Err(ConfigError::InvalidField {
                file: file.into(),
                field: field.into(),
                reason: format!("expected a finite number, got {v}"),
            }),
        },
    }
}

fn get_bool(
    obj: &Map<String, Value>,
    file: &str,
    field: &str,
) -> Result<Option<bool>, ConfigError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(ConfigError::InvalidField {
            file: file.into(),
            field: field.into(),
            reason: format!("expected true or false, got {v}"),
        }),
    }
}

fn token_ids(obj: &Map<String, Value>, file: &str, field: &str) -> Result<Vec<u32>, ConfigError> {
    let bad = |v: &Value| ConfigError::InvalidField {
        file: file.into(),
        field: field.into(),
        reason: format!("expected a token id or a list of token ids, got {v}"),
    };
    match obj.get(field) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| bad(v))
            })
            .collect(),
        Some(v) => v
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .map(|x| vec![x])
            .ok_or_else(|| bad(v)),
    }
}

impl LlamaConfig {
    /// Read and validate `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, crate::LoaderError> {
        let text = std::fs::read_to_string(path).map_err(|e| crate::LoaderError::io(path, e))?;
        Ok(Self::from_json_str(&text, &path.display().to_string())?)
    }

    /// Parse and validate a `config.json` text; `file` names it in errors.
    pub fn from_json_str(text: &str, file: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|source| ConfigError::Json {
            file: file.into(),
            source,
        })?;
        let obj = value.as_object().ok_or_else(|| ConfigError::InvalidField {
            file: file.into(),
            field: "<root>".into(),
            reason: "expected a JSON object".into(),
        })?;
        // transformers 5 nests the language model's config for some multimodal types;
        // Llama-family causal LMs keep it flat.
        let model_type = obj
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| ConfigError::MissingField {
                file: file.into(),
                field: "model_type".into(),
            })?
            .to_string();
        if !matches!(model_type.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(ConfigError::Unsupported {
                file: file.into(),
                what: "model_type".into(),
                value: model_type,
                supported: "llama, mistral, qwen2".into(),
            });
        }
        if let Some(act) = obj.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(ConfigError::Unsupported {
                file: file.into(),
                what: "hidden_act".into(),
                value: act.into(),
                supported: "silu".into(),
            });
        }
        let hidden_size = req_usize(obj, file, "hidden_size")?;
        let intermediate_size = req_usize(obj, file, "intermediate_size")?;
        let num_hidden_layers = req_usize(obj, file, "num_hidden_layers")?;
        let num_attention_heads = req_usize(obj, file, "num_attention_heads")?;
        let num_key_value_heads =
            get_usize(obj, file, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        let vocab_size = req_usize(obj, file, "vocab_size")?;
        let invalid = |field: &str, reason: String| ConfigError::InvalidField {
            file: file.into(),
            field: field.into(),
            reason,
        };
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"
                ),
            ));
        }
        let head_dim = match get_usize(obj, file, "head_dim")? {
            Some(0) => return Err(invalid("head_dim", "must be positive".into())),
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(invalid(
                        "hidden_size",
                        format!(
                            "{hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(invalid(
                "head_dim",
                format!("{head_dim} must be even for RoPE"),
            ));
        }
        let rms_norm_eps = get_f32(obj, file, "rms_norm_eps")?.unwrap_or(1e-6);
        if rms_norm_eps <= 0.0 {
            return Err(invalid("rms_norm_eps", "must be positive".into()));
        }

        // RoPE: transformers 5 writes `rope_parameters` (with rope_theta inside);
        // transformers 4 writes `rope_theta` and `rope_scaling`.
        let rope_params = match obj.get("rope_parameters") {
            Some(Value::Object(m)) => Some(m),
            None | Some(Value::Null) => None,
            Some(v) => {
                return Err(invalid(
                    "rope_parameters",
                    format!("expected an object, got {v}"),
                ));
            }
        };
        let rope_theta = match rope_params.and_then(|m| m.get("rope_theta")) {
            Some(_) => get_f32(rope_params.unwrap_or(obj), file, "rope_theta")?,
            None => get_f32(obj, file, "rope_theta")?,
        }
        .unwrap_or(10000.0);
        if rope_theta <= 0.0 {
            return Err(invalid("rope_theta", "must be positive".into()));
        }
        let scaling_obj = match (rope_params, obj.get("rope_scaling")) {
            (Some(m), _) => Some(m),
            (None, Some(Value::Object(m))) => Some(m),
            (None, None | Some(Value::Null)) => None,
            (None, Some(v)) => {
                return Err(invalid(
                    "rope_scaling",
                    format!("expected an object, got {v}"),
                ));
            }
        };
        let max_position_embeddings =
            get_usize(obj, file, "max_position_embeddings")?.unwrap_or(2048);
        let rope_scaling = match scaling_obj {
            None => RopeScaling::None,
            Some(m) => {
                let kind = m
                    .get("rope_type")
                    .or_else(|| m.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear {
                        factor: get_f32(m, file, "factor")?.ok_or_else(|| {
                            ConfigError::MissingField {
                                file: file.into(),
                                field: "rope_scaling.factor".into(),
                            }
                        })?,
                    },
                    "llama3" => {
                        let need = |f: &str| -> Result<f32, ConfigError> {
                            get_f32(m, file, f)?.ok_or_else(|| ConfigError::MissingField {
                                file: file.into(),
                                field: format!("rope_scaling.{f}"),
                            })
                        };
                        RopeScaling::Llama3 {
                            factor: need("factor")?,
                            low_freq_factor: need("low_freq_factor")?,
                            high_freq_factor: need("high_freq_factor")?,
                            original_max_position_embeddings: get_usize(
                                m,
                                file,
                                "original_max_position_embeddings",
                            )?
                            .ok_or_else(|| ConfigError::MissingField {
                                file: file.into(),
                                field: "rope_scaling.original_max_position_embeddings".into(),
                            })?,
                        }
                    }
                    other => {
                        return Err(ConfigError::Unsupported {
                            file: file.into(),
                            what: "rope scaling type".into(),
                            value: other.into(),
                            supported: "default, linear, llama3".into(),
                        });
                    }
                }
            }
        };

        let attention_bias = get_bool(obj, file, "attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = if model_type == "qwen2" {
            (true, false)
        } else {
            (attention_bias, attention_bias)
        };
        let mlp_bias = get_bool(obj, file, "mlp_bias")?.unwrap_or(false);
        let tie_word_embeddings = get_bool(obj, file, "tie_word_embeddings")?.unwrap_or(false);
        let first_id = |field: &str| -> Result<Option<u32>, ConfigError> {
            Ok(token_ids(obj, file, field)?.first().copied())
        };
        Ok(LlamaConfig {
            bos_token_id: first_id("bos_token_id")?,
            eos_token_ids: token_ids(obj, file, "eos_token_id")?,
            pad_token_id: first_id("pad_token_id")?,
            sliding_window: get_usize(obj, file, "sliding_window")?,
            torch_dtype: obj
                .get("torch_dtype")
                .or_else(|| obj.get("dtype"))
                .and_then(Value::as_str)
                .map(str::to_string),
            model_type,
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
            tie_word_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias,
        })
    }

    /// GQA group size NH / NKV.
    pub fn gqa_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Width of the q projection, NH * HS.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of each of the k and v projections, NKV * HS.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// This config as a Hugging Face `config.json` value (transformers 4 layout, which
    /// transformers 5 also reads).
    pub fn to_hf_json(&self) -> Value {
        let architectures = match self.model_type.as_str() {
            "mistral" => "MistralForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            _ => "LlamaForCausalLM",
        };
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::None => Value::Null,
            RopeScaling::Linear { factor } => {
                json!({"rope_type": "linear", "factor": f32_json(*factor)})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({
                "rope_type": "llama3",
                "factor": f32_json(*factor),
                "low_freq_factor": f32_json(*low_freq_factor),
                "high_freq_factor": f32_json(*high_freq_factor),
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let mut v = json!({
            "architectures": [architectures],
            "model_type": self.model_type,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": f32_json(self.rms_norm_eps),
            "rope_theta": f32_json(self.rope_theta),
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias && self.model_type != "qwen2",
            "attention_dropout": 0.0,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "initializer_range": 0.02,
            "use_cache": true,
        });
        if let Some(m) = v.as_object_mut() {
            if let Some(w) = self.sliding_window {
                m.insert("sliding_window".into(), json!(w));
            }
            if let Some(d) = &self.torch_dtype {
                m.insert("torch_dtype".into(), json!(d));
            }
        }
        v
    }
}

/// An f32 as the JSON number of its shortest decimal form (1e-5, not 9.99999974e-6).
fn f32_json(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}
