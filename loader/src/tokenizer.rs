//! `tokenizer.json` through the `tokenizers` crate, plus the special-token strings of
//! `tokenizer_config.json` and an incremental detokenizer for streaming generation.
//!
//! Encoding with `add_special_tokens = true` runs the tokenizer's post-processor (for
//! Llama 3 that prepends `<|begin_of_text|>`). A rendered chat template already carries
//! its own BOS, so encode template output with `add_special_tokens = false`, as
//! transformers' `apply_chat_template(tokenize=True)` does.
//!
//! Special tokens written literally in the text (`<|im_start|>`) are matched as single
//! tokens whenever they are registered as added tokens in `tokenizer.json`; the
//! `tokenizers` crate does that split before the pre-tokenizer runs.
//!
//! `decode` is the `tokenizers` crate's decode: it does not apply transformers'
//! Python-side `clean_up_tokenization_spaces`.

use std::path::{Path, PathBuf};

use crate::LoaderError;

/// Errors from loading or running a tokenizer. Each variant names the file or token at
/// fault.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "{}: tokenizer.json not found\nhint: download the model's tokenizer.json next to its \
         config.json (Hugging Face checkpoints ship it at the repository root)",
        path.display()
    )]
    Missing { path: PathBuf },
    #[error("{}: invalid tokenizer.json: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{}: invalid tokenizer_config.json: {reason}", path.display())]
    InvalidConfig { path: PathBuf, reason: String },
    #[error(
        "{}: special token {field} = {token:?} is not in the tokenizer's vocabulary",
        path.display()
    )]
    UnknownSpecialToken {
        path: PathBuf,
        field: String,
        token: String,
    },
    #[error("token id {id} is out of range (vocabulary size {vocab})")]
    UnknownId { id: u32, vocab: usize },
    #[error("encoding {text_prefix:?}...: {reason}")]
    Encode { text_prefix: String, reason: String },
    #[error("decoding {n_ids} ids: {reason}")]
    Decode { n_ids: usize, reason: String },
    #[error(
        "streaming decode diverged at token {position}: the window text {window:?} does not \
         start with the previously emitted prefix {prefix:?}"
    )]
    StreamDiverged {
        position: usize,
        prefix: String,
        window: String,
    },
}

/// A loaded `tokenizer.json` with the BOS/EOS strings of `tokenizer_config.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// 1 + the highest id of the model vocabulary and the added tokens.
    vocab_size: usize,
    bos_token: Option<String>,
    eos_token: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads a `tokenizer.json`. No `tokenizer_config.json` is read, so
    /// `bos_token`/`eos_token` are `None`; use [`Tokenizer::from_dir`] for those.
    pub fn from_file(path: &Path) -> Result<Tokenizer, LoaderError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TokenizerError::Missing {
                    path: path.to_path_buf(),
                }
                .into());
            }
            Err(e) => return Err(LoaderError::io(path, e)),
        };
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Invalid {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1);
        Ok(Tokenizer {
            inner,
            vocab_size,
            bos_token: None,
            eos_token: None,
            bos_token_id: None,
            eos_token_id: None,
        })
    }

    /// Loads `dir/tokenizer.json` and, when present, the `bos_token`/`eos_token` of
    /// `dir/tokenizer_config.json` (string or `{"content": ...}` form). A special token
    /// named there but absent from the vocabulary is an error.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer, LoaderError> {
        let mut tok = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let config_path = dir.join("tokenizer_config.json");
        let Some(config) =
            read_tokenizer_config(&config_path).map_err(|e| config_error(&config_path, e))?
        else {
            return Ok(tok);
        };
        for field in ["bos_token", "eos_token"] {
            let Some(token) = special_token_string(&config, field) else {
                continue;
            };
            let id =
                tok.token_to_id(&token)
                    .ok_or_else(|| TokenizerError::UnknownSpecialToken {
                        path: config_path.clone(),
                        field: field.to_string(),
                        token: token.clone(),
                    })?;
            if field == "bos_token" {
                tok.bos_token = Some(token);
                tok.bos_token_id = Some(id);
            } else {
                tok.eos_token = Some(token);
                tok.eos_token_id = Some(id);
            }
        }
        Ok(tok)
    }

    /// Text to ids. Added special tokens written in `text` become their single ids.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding =
            self.inner
                .encode(text, add_special_tokens)
                .map_err(|e| TokenizerError::Encode {
                    text_prefix: text.chars().take(32).collect(),
                    reason: e.to_string(),
                })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Ids to text. Every id must name a token (the `tokenizers` crate would silently
    /// drop unknown ids; here they are [`TokenizerError::UnknownId`]).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(TokenizerError::UnknownId {
                id,
                vocab: self.vocab_size,
            });
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode {
                n_ids: ids.len(),
                reason: e.to_string(),
            })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// 1 + the highest token id, added tokens included: the row count an embedding
    /// table needs. (Ids below it may still be unassigned in unusual tokenizers.)
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    /// The underlying `tokenizers::Tokenizer`, for features not wrapped here.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// An incremental detokenizer; see [`DecodeStream`].
    pub fn decode_stream(&self, skip_special_tokens: bool) -> DecodeStream<'_> {
        DecodeStream {
            tokenizer: self,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }
}

/// Incremental detokenizer for streaming generation.
///
/// Push one id at a time with [`DecodeStream::step`]; it returns the newly completed
/// text, or `None` while the decoded bytes end in an incomplete UTF-8 sequence (the text
/// ends in U+FFFD) or nothing new appeared. The concatenation of all returned pieces,
/// followed by [`DecodeStream::flush`], equals `decode(all ids)`.
///
/// Technique (Hugging Face text-generation-inference `decode_token`): keep two offsets
/// into the ids, `prefix_offset <= read_offset`. Decode `ids[prefix..read]` and
/// `ids[prefix..]`; if the second is longer and does not end in U+FFFD, emit the
/// difference and move `prefix` to `read`, `read` to the end. Decoding a window that
/// starts one token back keeps decoder context (leading-space stripping of Metaspace /
/// `Strip` decoders, byte-level merges) identical to the full decode. Cost per step is
/// O(window), the window being the tokens since the last emitted piece plus one.
pub struct DecodeStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    /// All ids pushed so far.
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl DecodeStream<'_> {
    /// Pushes `id`; returns the text it completes, if any.
    pub fn step(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        if self.tokenizer.inner.id_to_token(id).is_none() {
            return Err(TokenizerError::UnknownId {
                id,
                vocab: self.tokenizer.vocab_size,
            });
        }
        self.ids.push(id);
        let piece = self.pending()?;
        match piece {
            Some(text) if !text.ends_with('\u{FFFD}') => {
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                Ok(Some(text))
            }
            _ => Ok(None),
        }
    }

    /// Emits whatever is still held back (text ending in U+FFFD because the sequence
    /// ended inside, or on, an invalid UTF-8 sequence). Call once after the last step.
    pub fn flush(&mut self) -> Result<Option<String>, TokenizerError> {
        let piece = self.pending()?;
        if piece.is_some() {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        Ok(piece)
    }

    /// The ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Text of `ids[prefix..]` beyond that of `ids[prefix..read]`, `None` when empty.
    fn pending(&self) -> Result<Option<String>, TokenizerError> {
        let (prefix, read) = (self.prefix_offset, self.read_offset);
        let window = &self.ids[prefix..];
        let prefix_text = self
            .tokenizer
            .decode(&self.ids[prefix..read], self.skip_special_tokens)?;
        let new_text = self.tokenizer.decode(window, self.skip_special_tokens)?;
        if new_text.len() <= prefix_text.len() {
            return Ok(None);
        }
        match new_text.strip_prefix(prefix_text.as_str()) {
            Some(rest) => Ok(Some(rest.to_string())),
            None => Err(TokenizerError::StreamDiverged {
                position: self.ids.len() - 1,
                prefix: prefix_text,
                window: new_text,
            }),
        }
    }
}

/// Why `tokenizer_config.json` could not be used.
pub(crate) enum ConfigReadError {
    Io(std::io::Error),
    Json(String),
}

fn config_error(path: &Path, e: ConfigReadError) -> LoaderError {
    match e {
        ConfigReadError::Io(e) => LoaderError::io(path, e),
        ConfigReadError::Json(reason) => TokenizerError::InvalidConfig {
            path: path.to_path_buf(),
            reason,
        }
        .into(),
    }
}

/// Reads `tokenizer_config.json` as a JSON object; `Ok(None)` when the file is absent.
pub(crate) fn read_tokenizer_config(
    path: &Path,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, ConfigReadError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ConfigReadError::Io(e)),
    };
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(ConfigReadError::Json(
            "expected a JSON object at the top level".to_string(),
        )),
        Err(e) => Err(ConfigReadError::Json(e.to_string())),
    }
}

/// A special token field of `tokenizer_config.json`: either a string or an
/// AddedToken object `{"content": "...", ...}`; `None` for null, absent or other shapes.
pub(crate) fn special_token_string(
    config: &serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> Option<String> {
    match config.get(field)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}
