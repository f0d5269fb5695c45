//! The golden fixture of the default model (tests/golden/smollm2_golden.json and
//! smollm2_case0_logits.safetensors, made by scripts/reference/dump_golden.py).
#![allow(dead_code)]

use std::path::Path;

use cloudrm::loader::safetensors::SafeTensors;
use serde_json::Value;

/// One golden text: its ids, transformers' last-position top-20 logits and logsumexp,
/// per-layer hidden norms, final-norm output norm and 20 greedy tokens.
pub struct Case {
    pub text: String,
    pub ids: Vec<u32>,
    pub top20: Vec<(u32, f32)>,
    pub logsumexp: f64,
    pub layer_norms: Vec<f32>,
    pub final_norm: f32,
    pub greedy20: Vec<u32>,
}

/// The golden cases and case 0's full last-position logits.
pub fn load_fixture() -> (Vec<Case>, Vec<f32>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let text = std::fs::read_to_string(dir.join("smollm2_golden.json")).expect("golden fixture");
    let v: Value = serde_json::from_str(&text).expect("fixture JSON");
    assert_eq!(v["magic"], "cloudrm-golden", "fixture magic");
    assert_eq!(v["version"], 1, "fixture version");
    let f32s = |x: &Value| -> Vec<f32> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|y| y.as_f64().unwrap() as f32)
            .collect()
    };
    let u32s = |x: &Value| -> Vec<u32> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|y| y.as_u64().unwrap() as u32)
            .collect()
    };
    let cases = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().unwrap().to_string(),
            ids: u32s(&c["ids"]),
            top20: c["last_top20"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
                .collect(),
            logsumexp: c["last_logsumexp"].as_f64().unwrap(),
            layer_norms: f32s(&c["layer_out_norms"]),
            final_norm: c["final_norm_norm"].as_f64().unwrap() as f32,
            greedy20: u32s(&c["greedy20"]),
        })
        .collect();
    let st =
        SafeTensors::open(&dir.join("smollm2_case0_logits.safetensors")).expect("logits fixture");
    let logits = st.tensor("logits").unwrap().to_f32_vec().unwrap();
    (cases, logits)
}
