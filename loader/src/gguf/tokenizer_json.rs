//! The GGUF vocabulary (`tokenizer.ggml.*`) as a Hugging Face `tokenizer.json` and
//! `tokenizer_config.json`.
//!
//! Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is supported: the tokens are
//! already in the GPT-2 byte-to-unicode form, merges are `"a b"` strings. The
//! pre-tokenizer is chosen by `tokenizer.ggml.pre` (llama.cpp's `LLAMA_VOCAB_PRE_TYPE`):
//!
//! | pre | pre_tokenizer |
//! | --- | --- |
//! | default, gpt2 | ByteLevel (GPT-2 regex) |
//! | smollm | Sequence[Digits(individual), ByteLevel] |
//! | llama-bpe | Sequence[Split(llama3 regex, isolated), ByteLevel(no regex)] |
//! | qwen2 | NFC normaliser, Sequence[Split(qwen2 regex, isolated), ByteLevel(no regex)] |
//!
//! Token types (`tokenizer.ggml.token_type`, llama.cpp `LLAMA_TOKEN_TYPE_*`): 1 normal,
//! 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte. Control tokens become special
//! added tokens, user-defined tokens non-special added tokens.

use serde_json::{Map, Value, json};

use super::GgufError;
use super::reader::GgufFile;

const TOKEN_TYPE_CONTROL: i128 = 3;
const TOKEN_TYPE_USER_DEFINED: i128 = 4;

/// Llama 3 pre-tokenizer regex (tokenizer.json of Meta-Llama-3).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2 pre-tokenizer regex (tokenizer.json of Qwen2).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The special token ids of the GGUF vocabulary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
}

/// Everything the import writes for the tokenizer.
#[derive(Debug, Clone)]
pub struct TokenizerFiles {
    /// tokenizer.json
    pub tokenizer: Value,
    /// tokenizer_config.json
    pub config: Value,
    pub special: SpecialTokens,
    /// Number of tokens in `tokenizer.ggml.tokens`.
    pub n_tokens: usize,
}

fn byte_level(add_prefix_space: bool, trim_offsets: bool, use_regex: bool) -> Value {
    json!({
        "type": "ByteLevel",
        "add_prefix_space": add_prefix_space,
        "trim_offsets": trim_offsets,
        "use_regex": use_regex,
    })
}

fn split_isolated(regex: &str) -> Value {
    json!({
        "type": "Split",
        "pattern": {"Regex": regex},
        "behavior": "Isolated",
        "invert": false,
    })
}

/// (normalizer, pre_tokenizer, ignore_merges) for a `tokenizer.ggml.pre` name.
fn pre_tokenizer(file: &str, pre: &str) -> Result<(Value, Value, bool), GgufError> {
    Ok(match pre {
        "default" | "gpt2" => (Value::Null, byte_level(false, true, true), false),
        "smollm" => (
            Value::Null,
            json!({
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    byte_level(false, true, true),
                ],
            }),
            false,
        ),
        "llama-bpe" => (
            Value::Null,
            json!({
                "type": "Sequence",
                "pretokenizers": [split_isolated(LLAMA3_REGEX), byte_level(false, true, false)],
            }),
            true,
        ),
        "qwen2" => (
            json!({"type": "NFC"}),
            json!({
                "type": "Sequence",
                "pretokenizers": [split_isolated(QWEN2_REGEX), byte_level(false, false, false)],
            }),
            false,
        ),
        other => {
            return Err(GgufError::UnsupportedPreTokenizer {
                file: file.into(),
                name: other.into(),
            });
        }
    })
}

fn token_id(g: &GgufFile, key: &str, n_tokens: usize) -> Result<Option<u32>, GgufError> {
    match g.get_u32(key)? {
        Some(id) if (id as usize) >= n_tokens => Err(GgufError::BadMetadata {
            file: g.file_name().into(),
            key: key.into(),
            reason: format!("token id {id} is out of range (vocabulary of {n_tokens})"),
        }),
        other => Ok(other),
    }
}

/// Build tokenizer.json and tokenizer_config.json from the GGUF metadata;
/// `model_max_length` is the context length. The tokenizer.json is checked by loading
/// it with the `tokenizers` crate.
pub fn build(g: &GgufFile, model_max_length: usize) -> Result<TokenizerFiles, GgufError> {
    let file = g.file_name();
    let bad = |reason: String| GgufError::BadTokenizer {
        file: file.into(),
        reason,
    };
    let model = g
        .get_str("tokenizer.ggml.model")?
        .ok_or_else(|| GgufError::MissingKey {
            file: file.into(),
            key: "tokenizer.ggml.model".into(),
        })?;
    if model != "gpt2" {
        return Err(GgufError::UnsupportedTokenizer {
            file: file.into(),
            model: model.into(),
        });
    }
    let tokens =
        g.get_str_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| GgufError::MissingKey {
                file: file.into(),
                key: "tokenizer.ggml.tokens".into(),
            })?;
    if tokens.is_empty() || u32::try_from(tokens.len()).is_err() {
        return Err(bad(format!("{} tokens", tokens.len())));
    }
    let merges = g.get_str_array("tokenizer.ggml.merges")?.unwrap_or(&[]);
    let token_types = g.get_array("tokenizer.ggml.token_type")?;
    if let Some(tt) = token_types
        && tt.len() != tokens.len()
    {
        return Err(GgufError::BadMetadata {
            file: file.into(),
            key: "tokenizer.ggml.token_type".into(),
            reason: format!("{} entries for {} tokens", tt.len(), tokens.len()),
        });
    }
    let pre = g.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let (normalizer, pre_tok, ignore_merges) = pre_tokenizer(file, pre)?;

    let n = tokens.len();
    let special = SpecialTokens {
        bos: token_id(g, "tokenizer.ggml.bos_token_id", n)?,
        eos: token_id(g, "tokenizer.ggml.eos_token_id", n)?,
        pad: token_id(g, "tokenizer.ggml.padding_token_id", n)?,
        unk: token_id(g, "tokenizer.ggml.unknown_token_id", n)?,
        add_bos: g.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
        add_eos: g.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
    };

    let mut vocab = Map::with_capacity(n);
    let mut added = Vec::new();
    let mut added_decoder = Map::new();
    for (id, tok) in tokens.iter().enumerate() {
        if !vocab.contains_key(tok) {
            vocab.insert(tok.clone(), json!(id));
        }
        let ty = match token_types {
            Some(tt) => tt.int_at(id).ok_or_else(|| GgufError::WrongType {
                file: file.into(),
                key: "tokenizer.ggml.token_type".into(),
                expected: "array of integers",
                actual: "array",
            })?,
            None => 1,
        };
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            let is_special = ty == TOKEN_TYPE_CONTROL;
            added.push(json!({
                "id": id,
                "content": tok,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": is_special,
            }));
            added_decoder.insert(
                id.to_string(),
                json!({
                    "content": tok,
                    "lstrip": false,
                    "normalized": false,
                    "rstrip": false,
                    "single_word": false,
                    "special": is_special,
                }),
            );
        }
    }
    let mut merge_pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let (a, b) = m.split_once(' ').ok_or_else(|| {
            bad(format!(
                "merge {i} {m:?} is not two tokens separated by a space"
            ))
        })?;
        merge_pairs.push(json!([a, b]));
    }

    let tok_str = |id: Option<u32>| id.map(|i| tokens[i as usize].clone());
    let mut post = byte_level(true, false, true);
    if special.add_bos || special.add_eos {
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut specials = Map::new();
        let mut edge = |id: Option<u32>, key: &str| -> Result<Option<Value>, GgufError> {
            let id = id.ok_or_else(|| GgufError::MissingKey {
                file: file.into(),
                key: key.into(),
            })?;
            let t = tokens[id as usize].clone();
            specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
            Ok(Some(json!({"SpecialToken": {"id": t, "type_id": 0}})))
        };
        let bos = if special.add_bos {
            edge(special.bos, "tokenizer.ggml.bos_token_id")?
        } else {
            None
        };
        let eos = if special.add_eos {
            edge(special.eos, "tokenizer.ggml.eos_token_id")?
        } else {
            None
        };
        let wrap = |seq: &str, ids: &mut Vec<Value>| {
            if let Some(b) = &bos {
                ids.push(b.clone());
            }
            ids.push(json!({"Sequence": {"id": seq, "type_id": 0}}));
            if let Some(e) = &eos {
                ids.push(e.clone());
            }
        };
        wrap("A", &mut single);
        wrap("A", &mut pair);
        wrap("B", &mut pair);
        post = json!({
            "type": "Sequence",
            "processors": [
                post,
                {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials},
            ],
        });
    }

    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tok,
        "post_processor": post,
        "decoder": byte_level(true, true, true),
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": merge_pairs,
        },
    });
    let text = serde_json::to_string(&tokenizer).map_err(|e| bad(e.to_string()))?;
    text.parse::<tokenizers::Tokenizer>()
        .map_err(|e| bad(format!("the tokenizers crate rejects the result: {e}")))?;

    let mut config = json!({
        "add_bos_token": special.add_bos,
        "add_eos_token": special.add_eos,
        "added_tokens_decoder": added_decoder,
        "bos_token": tok_str(special.bos),
        "clean_up_tokenization_spaces": false,
        "eos_token": tok_str(special.eos),
        "model_max_length": model_max_length,
        "pad_token": tok_str(special.pad),
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": tok_str(special.unk),
    });
    if let (Some(t), Some(obj)) = (
        g.get_str("tokenizer.chat_template")?,
        config.as_object_mut(),
    ) {
        obj.insert("chat_template".into(), json!(t));
    }
    Ok(TokenizerFiles {
        tokenizer,
        config,
        special,
        n_tokens: n,
    })
}
