//! Tokenizer tests on a tiny byte-level BPE `tokenizer.json` built here: the 256 GPT-2
//! byte-level characters, a few merges (including ones that end or start inside a
//! multi-byte UTF-8 character) and the ChatML special tokens.

use std::path::{Path, PathBuf};

use cloudrm_loader::LoaderError;
use cloudrm_loader::tokenizer::{Tokenizer, TokenizerError};
use serde_json::json;

/// GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the rest to U+0100 + n.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

fn bl(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| byte_char(b)).collect()
}

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Merges as (left bytes, right bytes); each result becomes a vocabulary entry.
fn merges() -> Vec<(Vec<u8>, Vec<u8>)> {
    vec![
        (b" ".to_vec(), b"t".to_vec()),
        (b"h".to_vec(), b"e".to_vec()),
        (b" t".to_vec(), b"he".to_vec()),
        (b"i".to_vec(), b"n".to_vec()),
        (b" ".to_vec(), b"a".to_vec()),
        // "é" = C3 A9 as one token.
        (vec![0xC3], vec![0xA9]),
        // A space plus the first byte of a 4-byte emoji: the token ends mid-character.
        (b" ".to_vec(), vec![0xF0]),
        // The first two bytes of "中" (E4 B8 AD): the next token starts mid-character.
        (vec![0xE4], vec![0xB8]),
    ]
}

const N_BASE: usize = SPECIALS.len() + 256;

fn tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (i, s) in SPECIALS.iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
    }
    for b in 0..=255u8 {
        vocab.insert(bl(&[b]), json!(SPECIALS.len() + b as usize));
    }
    let mut merge_strings = Vec::new();
    for (i, (l, r)) in merges().iter().enumerate() {
        let joined: Vec<u8> = l.iter().chain(r).copied().collect();
        vocab.insert(bl(&joined), json!(N_BASE + i));
        merge_strings.push(format!("{} {}", bl(l), bl(r)));
    }
    let added: Vec<_> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
                          "trim_offsets": true, "use_regex": true},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0],
                                                 "tokens": ["<|endoftext|>"]}}
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merge_strings}
    })
}

/// A fresh scratch directory per test (no tempfile crate in this workspace).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "cloudrm-loader-tokenizer-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.0.join(file);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tiny(name: &str) -> (TempDir, Tokenizer) {
    let dir = TempDir::new(name);
    let path = dir.write("tokenizer.json", &tokenizer_json().to_string());
    let tok = Tokenizer::from_file(&path).unwrap();
    (dir, tok)
}

fn id(tok: &Tokenizer, bytes: &[u8]) -> u32 {
    tok.token_to_id(&bl(bytes)).unwrap()
}

const SAMPLES: &[&str] = &[
    "the cat",
    " the in a",
    "café au lait, éé",
    "smile 😀 wink 😉!",
    " 😀😀",
    "中文字符 and 日本語",
    "mixed: naïve 中 😀 é\n\ttabs  double  spaces ",
    "<|im_start|>user\nhé 😀<|im_end|>\n<|im_start|>assistant\n",
    "",
];

#[test]
fn vocab_and_lookup() {
    let (_dir, tok) = tiny("vocab");
    assert_eq!(tok.vocab_size(), N_BASE + merges().len());
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
    assert_eq!(
        tok.id_to_token(SPECIALS.len() as u32 + b'a' as u32),
        Some("a".into())
    );
    assert_eq!(tok.id_to_token(tok.vocab_size() as u32), None);
    assert_eq!(tok.token_to_id("not-a-token"), None);
    // from_file reads no tokenizer_config.json.
    assert_eq!(tok.bos_token(), None);
    assert_eq!(tok.eos_token_id(), None);
}

#[test]
fn encode_applies_merges_and_specials() {
    let (_dir, tok) = tiny("encode");
    // "the" -> "t" + "he"; " the" -> one merged token "Ġthe".
    let ids = tok.encode("the the", false).unwrap();
    assert_eq!(
        ids,
        vec![id(&tok, b"t"), id(&tok, b"he"), id(&tok, b" the")]
    );
    // Special tokens written in the text are single ids, not byte pieces.
    let ids = tok
        .encode("<|im_start|>user\nhi<|im_end|>\n", false)
        .unwrap();
    assert_eq!(
        ids,
        vec![
            1,
            id(&tok, b"u"),
            id(&tok, b"s"),
            id(&tok, b"e"),
            id(&tok, b"r"),
            id(&tok, b"\n"),
            id(&tok, b"h"),
            id(&tok, b"i"),
            2,
            id(&tok, b"\n"),
        ]
    );
    // The post-processor prepends <|endoftext|> only with add_special_tokens.
    assert_eq!(tok.encode("a", true).unwrap(), vec![0, id(&tok, b"a")]);
    assert_eq!(tok.encode("a", false).unwrap(), vec![id(&tok, b"a")]);
    // Multi-byte merges: "é" is one token; " 😀" is " \xF0" + three byte tokens.
    assert_eq!(
        tok.encode("é", false).unwrap(),
        vec![id(&tok, &[0xC3, 0xA9])]
    );
    assert_eq!(
        tok.encode(" 😀", false).unwrap(),
        vec![
            id(&tok, &[b' ', 0xF0]),
            id(&tok, &[0x9F]),
            id(&tok, &[0x98]),
            id(&tok, &[0x80]),
        ]
    );
    assert_eq!(
        tok.encode("中", false).unwrap(),
        vec![id(&tok, &[0xE4, 0xB8]), id(&tok, &[0xAD])]
    );
}

#[test]
fn decode_round_trips() {
    let (_dir, tok) = tiny("roundtrip");
    for text in SAMPLES {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), *text, "{text:?}");
    }
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
}

#[test]
fn decode_unknown_id_is_an_error() {
    let (_dir, tok) = tiny("unknown");
    let vocab = tok.vocab_size();
    let bad = vocab as u32 + 5;
    match tok.decode(&[4, bad, 5], false) {
        Err(TokenizerError::UnknownId { id, vocab: v }) => {
            assert_eq!(id, bad);
            assert_eq!(v, vocab);
        }
        other => panic!("expected UnknownId, got {other:?}"),
    }
    let mut stream = tok.decode_stream(false);
    assert!(matches!(
        stream.step(u32::MAX),
        Err(TokenizerError::UnknownId { id: u32::MAX, .. })
    ));
}

fn stream_all(tok: &Tokenizer, ids: &[u32], skip: bool) -> (String, usize) {
    let mut stream = tok.decode_stream(skip);
    let mut out = String::new();
    let mut held = 0;
    for &i in ids {
        match stream.step(i).unwrap() {
            Some(piece) => {
                assert!(!piece.is_empty());
                assert!(!piece.ends_with('\u{FFFD}'), "{piece:?}");
                out.push_str(&piece);
            }
            None => held += 1,
        }
    }
    if let Some(rest) = stream.flush().unwrap() {
        out.push_str(&rest);
    }
    (out, held)
}

#[test]
fn decode_stream_equals_decode() {
    let (_dir, tok) = tiny("stream");
    for text in SAMPLES {
        let ids = tok.encode(text, false).unwrap();
        for skip in [false, true] {
            let (streamed, _) = stream_all(&tok, &ids, skip);
            assert_eq!(
                streamed,
                tok.decode(&ids, skip).unwrap(),
                "{text:?} skip={skip}"
            );
        }
    }
}

#[test]
fn decode_stream_holds_incomplete_characters() {
    let (_dir, tok) = tiny("stream-hold");
    // " 😀" is four tokens; the first three end inside the character.
    let ids = tok.encode(" 😀", false).unwrap();
    let mut stream = tok.decode_stream(false);
    assert_eq!(stream.step(ids[0]).unwrap(), None);
    assert_eq!(stream.step(ids[1]).unwrap(), None);
    assert_eq!(stream.step(ids[2]).unwrap(), None);
    assert_eq!(stream.step(ids[3]).unwrap().as_deref(), Some(" 😀"));
    assert_eq!(stream.flush().unwrap(), None);
    // Leading spaces survive token by token.
    let ids = tok.encode("a the", false).unwrap();
    let mut stream = tok.decode_stream(false);
    assert_eq!(stream.step(ids[0]).unwrap().as_deref(), Some("a"));
    assert_eq!(stream.step(ids[1]).unwrap().as_deref(), Some(" the"));
    // Special tokens: empty when skipped, literal otherwise.
    let mut stream = tok.decode_stream(true);
    assert_eq!(stream.step(2).unwrap(), None);
    let mut stream = tok.decode_stream(false);
    assert_eq!(stream.step(2).unwrap().as_deref(), Some("<|im_end|>"));
}

#[test]
fn decode_stream_flush_emits_dangling_bytes() {
    let (_dir, tok) = tiny("stream-flush");
    // A lone lead byte never completes: decode gives U+FFFD, the stream holds it until flush.
    let ids = [id(&tok, b"a"), id(&tok, &[0xF0])];
    assert_eq!(tok.decode(&ids, false).unwrap(), "a\u{FFFD}");
    let (streamed, held) = stream_all(&tok, &ids, false);
    assert_eq!(streamed, "a\u{FFFD}");
    assert_eq!(held, 1);
    // An invalid byte in the middle comes out as soon as valid text follows it.
    let ids = [id(&tok, &[0xF0]), id(&tok, b"a")];
    let mut stream = tok.decode_stream(false);
    assert_eq!(stream.step(ids[0]).unwrap(), None);
    assert_eq!(stream.step(ids[1]).unwrap().as_deref(), Some("\u{FFFD}a"));
}

#[test]
fn from_dir_reads_special_tokens() {
    let dir = TempDir::new("from-dir");
    dir.write("tokenizer.json", &tokenizer_json().to_string());
    // bos in string form, eos in AddedToken-object form.
    dir.write(
        "tokenizer_config.json",
        &json!({
            "bos_token": "<|endoftext|>",
            "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": false},
            "pad_token": null
        })
        .to_string(),
    );
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.bos_token(), Some("<|endoftext|>"));
    assert_eq!(tok.bos_token_id(), Some(0));
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert_eq!(tok.eos_token_id(), Some(2));
}

#[test]
fn from_dir_without_config_has_no_special_tokens() {
    let dir = TempDir::new("no-config");
    dir.write("tokenizer.json", &tokenizer_json().to_string());
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.bos_token(), None);
    assert_eq!(tok.eos_token(), None);
}

#[test]
fn from_dir_unknown_special_token() {
    let dir = TempDir::new("unknown-special");
    dir.write("tokenizer.json", &tokenizer_json().to_string());
    let config = dir.write("tokenizer_config.json", r#"{"eos_token": "</s>"}"#);
    match Tokenizer::from_dir(dir.path()) {
        Err(LoaderError::Tokenizer(TokenizerError::UnknownSpecialToken { path, field, token })) => {
            assert_eq!(path, config);
            assert_eq!(field, "eos_token");
            assert_eq!(token, "</s>");
        }
        other => panic!("expected UnknownSpecialToken, got {other:?}"),
    }
}

#[test]
fn from_dir_invalid_config() {
    let dir = TempDir::new("bad-config");
    dir.write("tokenizer.json", &tokenizer_json().to_string());
    let config = dir.write("tokenizer_config.json", "{\"eos_token\": ");
    match Tokenizer::from_dir(dir.path()) {
        Err(LoaderError::Tokenizer(TokenizerError::InvalidConfig { path, .. })) => {
            assert_eq!(path, config)
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn missing_file() {
    let dir = TempDir::new("missing");
    let path = dir.path().join("tokenizer.json");
    let err = Tokenizer::from_file(&path).unwrap_err();
    assert!(err.to_string().contains("hint:"), "{err}");
    match err {
        LoaderError::Tokenizer(TokenizerError::Missing { path: p }) => assert_eq!(p, path),
        other => panic!("expected Missing, got {other:?}"),
    }
    match Tokenizer::from_dir(dir.path()) {
        Err(LoaderError::Tokenizer(TokenizerError::Missing { path: p })) => assert_eq!(p, path),
        other => panic!("expected Missing, got {other:?}"),
    }
}

#[test]
fn invalid_json() {
    let dir = TempDir::new("invalid");
    for (i, text) in ["{not json", r#"{"model": {"type": "Nope"}}"#, "[]"]
        .iter()
        .enumerate()
    {
        let path = dir.write(&format!("tokenizer{i}.json"), text);
        match Tokenizer::from_file(&path) {
            Err(LoaderError::Tokenizer(TokenizerError::Invalid { path: p, reason })) => {
                assert_eq!(p, path);
                assert!(!reason.is_empty());
            }
            other => panic!("expected Invalid for {text:?}, got {other:?}"),
        }
    }
}
