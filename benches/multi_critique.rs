//! The multi-critique job on the default model's trunk: K critiques after a shared
//! prefix, with prefix sharing (one prefill, forked blocks, cascade attention) against
//! the same job without sharing (K private prefills, plain paged attention), both arms
//! batched in lock step, measured in the same run. The default model has no trained
//! reward head, so a seeded random linear head is attached through a second shard: the
//! rewards are meaningless, the work is the real job's.
//!
//! `cargo bench --bench multi_critique` (env: CLOUDRM_BENCH_K="1,4,8,16",
//! CLOUDRM_BENCH_PREFIX=512, CLOUDRM_BENCH_TOKENS=128).

use std::path::{Path, PathBuf};
use std::time::Instant;

use cloudrm::cloud::{CloudScorer, ScoreOptions};
use cloudrm::hub;
use cloudrm::loader::Dtype;
use cloudrm::loader::gguf::OutDtype;
use cloudrm::loader::safetensors::{WriteTensor, write_safetensors};
use cloudrm::loader::template::ChatTemplate;
use cloudrm::loader::tokenizer::Tokenizer;
use cloudrm::model::RewardModel;

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// A reward-model dir: the default model's files (linked) + a shard with `score.weight`.
fn reward_dir(base: &Path) -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("cloudrm-bench-rm-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(base.join(f), dir.join(f))?;
    }
    let trunk = dir.join("model-00001-of-00002.safetensors");
    if !trunk.exists() {
        std::fs::hard_link(base.join("model.safetensors"), &trunk)
            .or_else(|_| std::fs::copy(base.join("model.safetensors"), &trunk).map(|_| ()))?;
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json"))?)?;
    let c = config["hidden_size"].as_u64().unwrap_or(576) as usize;
    let mut state = 0x1234_5678u64;
    let w: Vec<u8> = (0..c)
        .flat_map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1).to_le_bytes()
        })
        .collect();
    write_safetensors(
        &dir.join("model-00002-of-00002.safetensors"),
        &[WriteTensor {
            name: "score.weight",
            dtype: Dtype::F32,
            shape: &[1, c],
            data: &w,
        }],
        None,
    )
    .map_err(std::io::Error::other)?;
    let st =
        cloudrm::loader::safetensors::SafeTensors::open(&trunk).map_err(std::io::Error::other)?;
    let mut map = serde_json::Map::new();
    for name in st.names() {
        map.insert(name.to_string(), "model-00001-of-00002.safetensors".into());
    }
    map.insert(
        "score.weight".into(),
        "model-00002-of-00002.safetensors".into(),
    );
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())?;
    let mut cfg = config;
    cfg["feedback_method"] = "teacher".into();
    std::fs::write(dir.join("config.json"), cfg.to_string())?;
    Ok(dir)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let base = match hub::ensure_default_model(OutDtype::BF16) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipping multi_critique: default model unavailable: {e}");
            return;
        }
    };
    let dir = match reward_dir(&base) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipping multi_critique: cannot build the reward dir: {e}");
            return;
        }
    };
    // `cargo test --benches` runs this once in test mode: keep it tiny there.
    let quick = !std::env::args().any(|a| a == "--bench");
    let ks = if quick {
        vec![2]
    } else {
        env_list("CLOUDRM_BENCH_K", "1,4,8,16")
    };
    let prefix_words = if quick {
        16
    } else {
        env_list("CLOUDRM_BENCH_PREFIX", "512")[0]
    };
    let tokens = if quick {
        2
    } else {
        env_list("CLOUDRM_BENCH_TOKENS", "128")[0]
    };
    let rm = RewardModel::load_dir(&dir).expect("reward dir loads");
    let tok = Tokenizer::from_dir(&dir).expect("tokenizer");
    let tpl = ChatTemplate::from_dir(&dir).expect("template");
    // A prompt of about `prefix_words` tokens.
    let prompt = "Explain the following carefully. ".to_string()
        + &"reward models score responses ".repeat(prefix_words / 4);
    let response = "It depends on the details.";
    // Warm-up: first touch of the mapped weights and the worker pool.
    let warm = ScoreOptions {
        k: 1,
        max_critique_tokens: 1,
        ..Default::default()
    };
    CloudScorer::new(&rm, &tok, &tpl)
        .score(&prompt, response, &warm)
        .expect("warm-up");
    println!("K  shared_s  unshared_s  speedup  shared_tok/s  unshared_tok/s  prefix_tokens");
    for &k in &ks {
        let mut row = Vec::new();
        let mut prefix_tokens = 0;
        for share in [true, false] {
            let scorer = CloudScorer::new(&rm, &tok, &tpl);
            let opts = ScoreOptions {
                k,
                seed: 7,
                temperature: Some(0.5),
                max_critique_tokens: tokens,
                share_prefix: share,
                ignore_stops: true,
                ..Default::default()
            };
            let t0 = Instant::now();
            let s = scorer.score(&prompt, response, &opts).expect("score");
            let dt = t0.elapsed().as_secs_f64();
            let n: usize = s.critique_tokens.iter().map(|c| c.len() + 1).sum();
            prefix_tokens = s.prefix_tokens;
            row.push((dt, n as f64 / dt));
        }
        println!(
            "{k:<2} {:>8.2} {:>11.2} {:>8.2} {:>13.1} {:>15.1} {:>14}",
            row[0].0,
            row[1].0,
            row[1].0 / row[0].0,
            row[0].1,
            row[1].1,
            prefix_tokens
        );
    }
    std::fs::remove_dir_all(dir).ok();
}
