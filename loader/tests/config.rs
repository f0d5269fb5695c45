//! config.json parsing: every supported layout and family, and each invalid input.

use cloudrm_loader::config::{ConfigError, LlamaConfig, RopeScaling};

fn parse(s: &str) -> Result<LlamaConfig, ConfigError> {
    LlamaConfig::from_json_str(s, "config.json")
}

const SMOLLM2: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
  "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
  "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
  "rms_norm_eps": 1e-05, "rope_theta": 100000, "max_position_embeddings": 8192,
  "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
  "rope_scaling": null, "torch_dtype": "bfloat16"
}"#;

#[test]
fn smollm2_config() {
    let c = parse(SMOLLM2).unwrap();
    assert_eq!(
        (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim
        ),
        (576, 9, 3, 64)
    );
    assert_eq!((c.q_dim(), c.kv_dim(), c.gqa_group()), (576, 192, 3));
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rope_scaling, RopeScaling::None);
    assert!(c.tie_word_embeddings && !c.qkv_bias && !c.o_bias && !c.mlp_bias);
    assert_eq!(c.eos_token_ids, vec![2]);
    assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
    // Round trip through the HF JSON writer.
    let again = parse(&c.to_hf_json().to_string()).unwrap();
    assert_eq!(again, c);
}

#[test]
fn llama3_rope_scaling_and_eos_list() {
    let s = r#"{"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
      "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
      "vocab_size": 128256, "rope_theta": 500000.0, "eos_token_id": [128001, 128008, 128009],
      "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}}"#;
    let c = parse(s).unwrap();
    assert_eq!(c.head_dim, 128);
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    assert_eq!(
        c.rope_scaling,
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        }
    );
    assert!(!c.tie_word_embeddings, "llama defaults to untied");
    assert_eq!(parse(&c.to_hf_json().to_string()).unwrap(), c);
}

#[test]
fn transformers5_rope_parameters() {
    let s = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
      "rope_parameters": {"rope_type": "default", "rope_theta": 250000.0}}"#;
    let c = parse(s).unwrap();
    assert_eq!(c.rope_theta, 250000.0);
    assert_eq!(c.rope_scaling, RopeScaling::None);
    assert_eq!(c.num_key_value_heads, 4, "NKV defaults to NH");
    let s = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
      "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}"#;
    assert_eq!(
        parse(s).unwrap().rope_scaling,
        RopeScaling::Linear { factor: 2.0 }
    );
}

#[test]
fn qwen2_and_mistral_and_bias_flags() {
    let s = r#"{"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
      "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
      "vocab_size": 151936, "rope_theta": 1000000.0, "tie_word_embeddings": true,
      "sliding_window": 32768}"#;
    let c = parse(s).unwrap();
    assert!(c.qkv_bias && !c.o_bias, "qwen2 has q/k/v bias only");
    assert_eq!(c.sliding_window, Some(32768));
    let s = r#"{"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
      "vocab_size": 100, "head_dim": 32}"#;
    let c = parse(s).unwrap();
    assert_eq!((c.head_dim, c.q_dim()), (32, 128), "explicit head_dim wins");
    let s = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
      "attention_bias": true, "mlp_bias": true}"#;
    let c = parse(s).unwrap();
    assert!(c.qkv_bias && c.o_bias && c.mlp_bias);
}

#[test]
fn invalid_configs_are_typed_errors() {
    assert!(matches!(parse("{not json"), Err(ConfigError::Json { .. })));
    assert!(matches!(
        parse("[1]"),
        Err(ConfigError::InvalidField { .. })
    ));
    let no_hidden = SMOLLM2.replace("\"hidden_size\": 576,", "");
    assert!(
        matches!(parse(&no_hidden), Err(ConfigError::MissingField { field, .. }) if field == "hidden_size")
    );
    let gpt2 = SMOLLM2.replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt2\"");
    assert!(matches!(parse(&gpt2), Err(ConfigError::Unsupported { value, .. }) if value == "gpt2"));
    let bad_kv = SMOLLM2.replace("\"num_key_value_heads\": 3", "\"num_key_value_heads\": 4");
    assert!(
        matches!(parse(&bad_kv), Err(ConfigError::InvalidField { field, .. }) if field == "num_key_value_heads")
    );
    let zero = SMOLLM2.replace("\"num_hidden_layers\": 30", "\"num_hidden_layers\": 0");
    assert!(
        matches!(parse(&zero), Err(ConfigError::InvalidField { field, .. }) if field == "num_hidden_layers")
    );
    let neg = SMOLLM2.replace("\"hidden_size\": 576", "\"hidden_size\": -576");
    assert!(
        matches!(parse(&neg), Err(ConfigError::InvalidField { field, .. }) if field == "hidden_size")
    );
    let gelu = SMOLLM2.replace("\"silu\"", "\"gelu\"");
    assert!(matches!(parse(&gelu), Err(ConfigError::Unsupported { value, .. }) if value == "gelu"));
    let yarn = SMOLLM2.replace(
        "\"rope_scaling\": null",
        "\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0}",
    );
    assert!(matches!(parse(&yarn), Err(ConfigError::Unsupported { value, .. }) if value == "yarn"));
    let l3 = SMOLLM2.replace(
        "\"rope_scaling\": null",
        "\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0}",
    );
    assert!(matches!(parse(&l3), Err(ConfigError::MissingField { .. })));
    let bad_eos = SMOLLM2.replace("\"eos_token_id\": 2", "\"eos_token_id\": \"two\"");
    assert!(
        matches!(parse(&bad_eos), Err(ConfigError::InvalidField { field, .. }) if field == "eos_token_id")
    );
    let odd = r#"{"model_type": "llama", "hidden_size": 60, "intermediate_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100, "head_dim": 15}"#;
    assert!(
        matches!(parse(odd), Err(ConfigError::InvalidField { field, .. }) if field == "head_dim")
    );
    // Errors name the file.
    let err = parse("{").unwrap_err();
    assert!(err.to_string().starts_with("config.json"), "{err}");
}

#[test]
fn hf_json_writes_shortest_float_forms() {
    let c = parse(SMOLLM2).unwrap();
    let v = c.to_hf_json();
    assert_eq!(v["rms_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(v["rope_theta"].as_f64(), Some(100000.0));
}
