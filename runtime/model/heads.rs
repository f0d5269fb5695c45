//! Reward models: a Llama trunk plus a reward head, loaded from either checkpoint layout.
//!
//! - CLoud layout (zankner/CLoud `CLoudRewardModel`): trunk tensors under
//!   `reward_base_model.` (`reward_base_model.model.layers.0...`,
//!   `reward_base_model.lm_head.weight`), head `reward_head.dense.{weight,bias}` (C, C),
//!   (C) and `reward_head.out_proj.{weight,bias}` (1, C), (1): dense -> tanh -> out_proj.
//!   config.json carries `feedback_method` ("vanilla" = classic, "teacher" = CLoud) and
//!   `base_model_name_or_path`; the trunk's shape comes from the same config.json when it
//!   has the Llama fields, else from `base_model_name_or_path` when that names a local
//!   directory (absolute, or relative to the checkpoint) holding a config.json.
//! - Hugging Face `LlamaForSequenceClassification`: trunk under `model.`, head
//!   `score.weight` (1, C) (and `score.bias` (1) when present): a classic reward model
//!   unless config.json says `feedback_method: "teacher"`.
//! - A plain causal LM (no head in the checkpoint) given an **untrained** dense-tanh head
//!   by `RewardModel::with_untrained_head`: owned f32 weights from a seeded init, so
//!   that the CLI can run on the default model before a trained head exists. Its
//!   rewards are noise; `head_trained()` says so and the CLI tells the user.

use std::path::{Path, PathBuf};

use cloudrm_kernels::Weights;
use cloudrm_kernels::reference::heads::RewardHeadWeights;
use cloudrm_loader::LlamaConfig;
use cloudrm_loader::config::ConfigError;
use cloudrm_loader::shards::ShardedSafeTensors;
use serde_json::Value;

use super::weights::{LlamaWeights, WeightHandle, check_shape, handle};
use super::{Llama, ModelError};
use crate::error::Result;

/// How the model produces its reward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedbackMethod {
    /// Classic reward model: the reward is read at the end of the response turn.
    Classic,
    /// Critique-out-Loud: the model writes a critique first; the reward is read at the
    /// end of the critique turn.
    Cloud,
}

/// The checkpoint layout a reward model was loaded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointLayout {
    /// `reward_base_model.*` + `reward_head.*` (zankner/CLoud).
    Cloud,
    /// `model.*` + `score.weight` (Hugging Face sequence classification).
    SequenceClassification,
    /// A plain causal LM (`model.*`, no reward head); the head is untrained.
    CausalLm,
}

/// Seed of the untrained head's init (fixed: the same trunk always gets the same head).
pub const UNTRAINED_HEAD_SEED: u64 = 0x436c_6f75_6448_6561; // "CloudHea"

/// A reward head's parameters inside the mapped checkpoint.
#[derive(Debug, Clone)]
pub enum RewardHead {
    /// r = w . h + b; w: (C).
    Linear { w: WeightHandle, b: f32 },
    /// r = w_out . tanh(W_dense h + b_dense) + b_out; W_dense (C, C), b_dense (C), w_out (C).
    DenseTanh {
        dense_w: WeightHandle,
        dense_b: Vec<f32>,
        out_w: WeightHandle,
        out_b: f32,
    },
    /// The dense-tanh head with owned f32 weights from a seeded init (no training):
    /// W_dense (C, C), b_dense (C), w_out (C), b_out.
    Untrained {
        dense_w: Vec<f32>,
        dense_b: Vec<f32>,
        out_w: Vec<f32>,
        out_b: f32,
    },
}

impl RewardHead {
    /// The head as kernel weights borrowed from `weights`' mapping.
    pub fn view<'a>(&'a self, weights: &'a LlamaWeights) -> RewardHeadWeights<'a> {
        match self {
            RewardHead::Linear { w, b } => RewardHeadWeights::Linear {
                w: weights.get(w),
                b: *b,
            },
            RewardHead::DenseTanh {
                dense_w,
                dense_b,
                out_w,
                out_b,
            } => RewardHeadWeights::DenseTanh {
                dense_w: weights.get(dense_w),
                dense_b,
                out_w: weights.get(out_w),
                out_b: *out_b,
            },
            RewardHead::Untrained {
                dense_w,
                dense_b,
                out_w,
                out_b,
            } => RewardHeadWeights::DenseTanh {
                dense_w: Weights::F32(dense_w),
                dense_b,
                out_w: Weights::F32(out_w),
                out_b: *out_b,
            },
        }
    }

    /// An untrained dense-tanh head for hidden size `c`, initialised like PyTorch's
    /// default `nn.Linear` init (weights and biases uniform in ±1/sqrt(fan_in), fan_in =
    /// C for both layers) from SplitMix64 seeded with `seed`: reproducible across runs
    /// and machines.
    pub fn untrained(c: usize, seed: u64) -> Self {
        let mut state = seed;
        let bound = 1.0 / (c.max(1) as f64).sqrt();
        let mut uniform = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            // 53 random bits -> [0, 1) -> [-bound, bound).
            let u = (z >> 11) as f64 / (1u64 << 53) as f64;
            ((u * 2.0 - 1.0) * bound) as f32
        };
        let dense_w = (0..c * c).map(|_| uniform()).collect();
        let dense_b = (0..c).map(|_| uniform()).collect();
        let out_w = (0..c).map(|_| uniform()).collect();
        let out_b = uniform();
        RewardHead::Untrained {
            dense_w,
            dense_b,
            out_w,
            out_b,
        }
    }

    /// Whether the head was trained (false only for `RewardHead::Untrained`).
    pub fn is_trained(&self) -> bool {
        !matches!(self, RewardHead::Untrained { .. })
    }
}

/// A reward model: trunk (with its LM head, for critiques) + reward head.
#[derive(Debug)]
pub struct RewardModel {
    pub llama: Llama,
    pub head: RewardHead,
    pub method: FeedbackMethod,
    pub layout: CheckpointLayout,
}

impl RewardModel {
    /// Load a reward model directory in either layout.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .map_err(|e| cloudrm_loader::LoaderError::io(&config_path, e))?;
        let file = config_path.display().to_string();
        let raw: Value = serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            file: file.clone(),
            source,
        })?;
        let method = match raw.get("feedback_method") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "vanilla" => Some(FeedbackMethod::Classic),
            Some(Value::String(s)) if s == "teacher" => Some(FeedbackMethod::Cloud),
            Some(other) => {
                return Err(ModelError::BadFeedbackMethod {
                    file,
                    value: other.to_string(),
                }
                .into());
            }
        };
        let config = match LlamaConfig::from_json_str(&text, &file) {
            Ok(c) => c,
            Err(own_err) => base_config(dir, &raw, &file, own_err)?,
        };
        let files = ShardedSafeTensors::open_dir(dir)?;
        let layout = if files.info("reward_head.out_proj.weight").is_some() {
            CheckpointLayout::Cloud
        } else if files.info("score.weight").is_some() {
            CheckpointLayout::SequenceClassification
        } else {
            return Err(ModelError::NoRewardHead {
                dir: dir.to_path_buf(),
            }
            .into());
        };
        let c = config.hidden_size;
        // `layout` is Cloud or SequenceClassification here (CausalLm has no head).
        let head = match layout {
            CheckpointLayout::Cloud => {
                let dense_w = handle(&files, "reward_head.dense.weight", &[c, c])?;
                let out_w = handle(&files, "reward_head.out_proj.weight", &[1, c])?;
                let dense_b = small(&files, "reward_head.dense.bias", c)?;
                let out_b = small(&files, "reward_head.out_proj.bias", 1)?[0];
                RewardHead::DenseTanh {
                    dense_w,
                    dense_b,
                    out_w,
                    out_b,
                }
            }
            CheckpointLayout::SequenceClassification | CheckpointLayout::CausalLm => {
                let w = handle(&files, "score.weight", &[1, c])?;
                let b = if files.info("score.bias").is_some() {
                    small(&files, "score.bias", 1)?[0]
                } else {
                    0.0
                };
                RewardHead::Linear { w, b }
            }
        };
        let prefix = match layout {
            CheckpointLayout::Cloud => "reward_base_model.",
            CheckpointLayout::SequenceClassification | CheckpointLayout::CausalLm => "",
        };
        let llama = Llama::from_parts(config, files, prefix)?;
        Ok(RewardModel {
            llama,
            head,
            method: method.unwrap_or(FeedbackMethod::Classic),
            layout,
        })
    }

    /// A plain causal LM as a reward model with an untrained head (see
    /// `RewardHead::untrained`, seeded with `UNTRAINED_HEAD_SEED`): it runs, and its
    /// rewards are random noise. `head_trained()` is false.
    pub fn with_untrained_head(llama: Llama, method: FeedbackMethod) -> Self {
        let head = RewardHead::untrained(llama.config.hidden_size, UNTRAINED_HEAD_SEED);
        RewardModel {
            llama,
            head,
            method,
            layout: CheckpointLayout::CausalLm,
        }
    }

    /// Whether the reward head was trained: false for `with_untrained_head` models,
    /// whose rewards are noise.
    pub fn head_trained(&self) -> bool {
        self.head.is_trained()
    }

    /// Rewards (B) of final-normed hidden rows (B, C), on the reference reward head.
    pub fn rewards(&self, hidden: &[f32], out: &mut [f32], scratch: &mut [f32]) -> Result<()> {
        let head = self.head.view(&self.llama.weights);
        cloudrm_kernels::reference::heads::reward_head_forward(out, hidden, &head, scratch)?;
        Ok(())
    }
}

/// A small tensor (bias) copied to f32, shape-checked.
fn small(files: &ShardedSafeTensors, name: &str, n: usize) -> Result<Vec<f32>> {
    let view = files.tensor(name)?;
    check_shape(name, &view, &[n])?;
    Ok(view.to_f32_vec()?)
}

/// The trunk config from `base_model_name_or_path` when the checkpoint's own
/// config.json lacks the Llama fields.
fn base_config(dir: &Path, raw: &Value, file: &str, own_err: ConfigError) -> Result<LlamaConfig> {
    let Some(base) = raw.get("base_model_name_or_path").and_then(Value::as_str) else {
        return Err(own_err.into());
    };
    let candidate = {
        let p = PathBuf::from(base);
        if p.is_absolute() { p } else { dir.join(p) }
    };
    let base_cfg = candidate.join("config.json");
    if !base_cfg.is_file() {
        return Err(ModelError::BaseConfig {
            file: file.to_string(),
            base: base.to_string(),
            reason: format!(
                "{file} has no Llama fields ({own_err}), and `base_model_name_or_path` is not a local \
                 directory with a config.json; hint: copy the base model's config.json fields into {file}"
            ),
        }
        .into());
    }
    Ok(LlamaConfig::from_file(&base_cfg)?)
}
