//! Tokenizer parity with an independent implementation: llama.cpp's tokenizer on the
//! same GGUF (ids in tests/golden/tokenizer_llamacpp.json, with the command that made
//! them), against our tokenizer.json built by the GGUF import.

mod common;

use std::path::Path;

use cloudrm::loader::gguf::OutDtype;
use cloudrm::loader::tokenizer::Tokenizer;
use common::model::default_model;
use serde_json::Value;

#[test]
fn ids_match_llama_cpp() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tokenizer_llamacpp.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(v["magic"], "cloudrm-tokenizer-golden");
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 50, "only {} cases", cases.len());
    let tok = Tokenizer::from_dir(&default_model(OutDtype::BF16)).unwrap();
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, false).unwrap();
        if got != want {
            failures.push(format!(
                "{text:?}:\n  ours      {got:?}\n  llama.cpp {want:?}"
            ));
        }
        // Decoding gives the text back (byte-level BPE is lossless).
        assert_eq!(
            tok.decode(&got, false).unwrap(),
            text,
            "round trip of {text:?}"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
