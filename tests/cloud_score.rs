//! CLoud scoring end to end on a small random reward model that shares the default
//! model's vocabulary, tokenizer and chat template: the sequence layout, K critiques over
//! one prefilled prefix (each reward equals a from-scratch pass over prefix + critique +
//! end-of-turn), determinism, classic mode, compare and best-of-n.

mod common;

use cloudrm::backend::Cpu;
use cloudrm::cloud::{Aggregation, COT_PROMPT, CloudScorer, CloudTemplate, Score, ScoreOptions};
use cloudrm::engine::KvCache;
use cloudrm::loader::gguf::OutDtype;
use cloudrm::loader::template::ChatTemplate;
use cloudrm::loader::tokenizer::Tokenizer;
use cloudrm::model::{LogitsMode, RewardModel};
use common::model::default_model;
use common::tiny::{tiny_cloud_reward_dir, tiny_cloud_reward_dir_edited, tiny_reward_spec};

const PROMPT: &str = "What is the capital of France?";
const RESPONSE: &str = "The capital of France is Paris.";

/// A tiny CLoud-layout reward model with the default model's vocabulary + tokenizer files.
fn tiny_cloud_dir(tag: &str, method: &str) -> std::path::PathBuf {
    tiny_cloud_reward_dir(tag, method, &default_model(OutDtype::BF16), None)
}

#[test]
fn sequence_layout_on_chatml() {
    let dir = default_model(OutDtype::BF16);
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let tpl = ChatTemplate::from_dir(&dir).unwrap();
    let layout = CloudTemplate::new(&tpl, &tok);
    let (prefix, eot) = layout.cloud_prefix(PROMPT, RESPONSE).unwrap();
    assert_eq!(eot, 2, "ChatML end of turn is <|im_end|>");
    let text = tok.decode(&prefix, false).unwrap();
    assert!(
        text.ends_with("to my question:"),
        "prefix ends right after `question:`: {text:?}"
    );
    assert!(
        text.contains(&format!("<|im_start|>assistant\n{RESPONSE}<|im_end|>")),
        "{text:?}"
    );
    assert!(text.contains(COT_PROMPT.trim_end()));
    // Training layout: the prefix, then " " + critique.trim(), then the end of turn.
    let (train, at) = layout
        .training_sequence(PROMPT, RESPONSE, "  Correct and concise.  ")
        .unwrap();
    assert_eq!(
        &train[..prefix.len()],
        &prefix[..],
        "the generation prefix is a token prefix of the training sequence"
    );
    assert_eq!(train[at], 2);
    assert_eq!(at, train.len() - 1);
    assert_eq!(
        tok.decode(&train[prefix.len()..at], false).unwrap(),
        " Correct and concise."
    );
    // Classic: the first two turns, ending with the end of turn after the response.
    let classic = layout.classic_sequence(PROMPT, RESPONSE).unwrap();
    let text = tok.decode(&classic, false).unwrap();
    assert!(text.ends_with(&format!("{RESPONSE}<|im_end|>")), "{text:?}");
    // ChatML does not trim content: leading/trailing spaces of the response survive.
    let spaced = layout.classic_sequence(PROMPT, "  padded  ").unwrap();
    assert!(
        tok.decode(&spaced, false)
            .unwrap()
            .ends_with("assistant\n  padded  <|im_end|>")
    );
}

#[test]
fn cloud_scores_reuse_the_prefix_and_are_deterministic() {
    let dir = tiny_cloud_dir("cloud-score", "teacher");
    let rm = RewardModel::load_dir(&dir).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let tpl = ChatTemplate::from_dir(&default_model(OutDtype::BF16)).unwrap();
    let scorer = CloudScorer::new(&rm, &tok, &tpl);
    let opts = ScoreOptions {
        k: 3,
        seed: 11,
        max_critique_tokens: 8,
        ..Default::default()
    };
    let s = scorer.score(PROMPT, RESPONSE, &opts).unwrap();
    assert_eq!(
        (s.rewards.len(), s.critiques.len(), s.critique_tokens.len()),
        (3, 3, 3)
    );
    assert!(s.rewards.iter().all(|r| r.is_finite()));
    assert!((s.reward - Aggregation::Mean.apply(&s.rewards)).abs() < 1e-6);
    // Same seed, same critiques and rewards (the second run takes the prefix from the
    // cache); K=3 at temperature 0.5 gives distinct samples.
    let again = scorer.score(PROMPT, RESPONSE, &opts).unwrap();
    assert!(again.cached_prefix_tokens > 0);
    // Only the blocks past the cached full ones are computed again.
    assert_eq!(
        again.prefix_blocks_allocated,
        s.prefix_blocks_allocated - again.cached_prefix_tokens / 16
    );
    assert_eq!(
        Score {
            cached_prefix_tokens: 0,
            prefix_blocks_allocated: s.prefix_blocks_allocated,
            ..again
        },
        s
    );
    assert!(
        s.critique_tokens[0] != s.critique_tokens[1]
            || s.critique_tokens[1] != s.critique_tokens[2]
    );
    check_rewards_from_scratch(&rm, &tok, &tpl, &s);
    // K = 16 critiques in lock step: every reward still equals its from-scratch pass.
    let many = ScoreOptions {
        k: 16,
        seed: 5,
        max_critique_tokens: 6,
        ..Default::default()
    };
    let s16 = scorer.score(PROMPT, RESPONSE, &many).unwrap();
    assert_eq!(s16.rewards.len(), 16);
    check_rewards_from_scratch(&rm, &tok, &tpl, &s16);
    // Greedy K=1 is deterministic.
    let greedy = ScoreOptions {
        k: 1,
        max_critique_tokens: 8,
        ..Default::default()
    };
    let g1 = scorer.score(PROMPT, RESPONSE, &greedy).unwrap();
    let g2 = scorer.score(PROMPT, RESPONSE, &greedy).unwrap();
    assert_eq!(
        (g1.rewards, g1.critique_tokens),
        (g2.rewards, g2.critique_tokens)
    );
    // K = 0 is a usage error.
    assert!(
        scorer
            .score(
                PROMPT,
                RESPONSE,
                &ScoreOptions {
                    k: 0,
                    ..Default::default()
                }
            )
            .is_err()
    );
    std::fs::remove_dir_all(dir).ok();
}

/// `kv_cache: F16` scores through an f16 cache: deterministic, close to the f32 cache on
/// the classic path (teacher-forced, nothing sampled), and switching the cache type back
/// and forth on one scorer gives each type's own results (the engine is rebuilt).
#[test]
fn f16_kv_cache_scores_close_to_f32_and_switches_cleanly() {
    let dir = tiny_cloud_dir("cloud-f16-kv", "teacher");
    let rm = RewardModel::load_dir(&dir).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let tpl = ChatTemplate::from_dir(&default_model(OutDtype::BF16)).unwrap();
    let scorer = CloudScorer::new(&rm, &tok, &tpl);
    let f32_opts = ScoreOptions {
        k: 3,
        seed: 4,
        max_critique_tokens: 6,
        ..Default::default()
    };
    let f16_opts = ScoreOptions {
        kv_cache: KvCache::F16,
        ..f32_opts.clone()
    };
    let a = scorer.score(PROMPT, RESPONSE, &f32_opts).unwrap();
    let h = scorer.score(PROMPT, RESPONSE, &f16_opts).unwrap();
    let h2 = scorer.score(PROMPT, RESPONSE, &f16_opts).unwrap();
    let a2 = scorer.score(PROMPT, RESPONSE, &f32_opts).unwrap();
    assert_eq!(
        (&h.rewards, &h.critique_tokens),
        (&h2.rewards, &h2.critique_tokens)
    );
    assert_eq!(
        (&a.rewards, &a.critique_tokens),
        (&a2.rewards, &a2.critique_tokens)
    );
    assert!(h.rewards.iter().all(|r| r.is_finite()) && h.rewards.len() == 3);
    let classic = |opts: &ScoreOptions| {
        let o = ScoreOptions {
            classic: true,
            ..opts.clone()
        };
        scorer.score(PROMPT, RESPONSE, &o).unwrap().reward
    };
    let (r32, r16) = (classic(&f32_opts), classic(&f16_opts));
    assert!(
        (r32 - r16).abs() <= 1e-2 * r32.abs().max(1.0),
        "classic reward {r32} (f32 cache) vs {r16} (f16 cache)"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn classic_compare_and_best_of_n() {
    let dir = tiny_cloud_dir("cloud-classic", "vanilla");
    let rm = RewardModel::load_dir(&dir).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let tpl = ChatTemplate::from_dir(&default_model(OutDtype::BF16)).unwrap();
    let scorer = CloudScorer::new(&rm, &tok, &tpl);
    let opts = ScoreOptions::default();
    let a = scorer.score(PROMPT, "Paris.", &opts).unwrap();
    assert!(
        a.critiques.is_empty() && a.rewards.len() == 1,
        "a vanilla model scores without a critique"
    );
    let cmp = scorer.compare(PROMPT, "Paris.", "Lyon.", &opts).unwrap();
    // The same reward, the prompt's blocks now served from the cache.
    assert_eq!(cmp.a.rewards, a.rewards);
    assert!(cmp.b.cached_prefix_tokens >= 16, "{:?}", cmp.b);
    assert!(cmp.b.prefix_blocks_allocated < cmp.b.prefix_tokens.div_ceil(16));
    let want = 1.0 / (1.0 + (-(cmp.a.reward - cmp.b.reward) as f64).exp());
    assert!((cmp.p_a_preferred as f64 - want).abs() < 1e-6);
    let cands = ["Paris.", "Lyon.", "Marseille.", "I don't know."];
    let (best, scores) = scorer.best_of_n(PROMPT, &cands, &opts).unwrap();
    assert!(scores.iter().all(|s| s.reward <= scores[best].reward));
    assert!(scorer.best_of_n(PROMPT, &[], &opts).is_err());
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn score_command_prints_json() {
    let dir = tiny_cloud_dir("cloud-cli", "teacher");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloudrm"))
        .args([
            "score",
            "--prompt",
            PROMPT,
            "--response",
            RESPONSE,
            "--k",
            "2",
            "--max-critique-tokens",
            "4",
            "--json",
        ])
        .arg("--model")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rewards"].as_array().unwrap().len(), 2);
    assert_eq!(v["critiques"].as_array().unwrap().len(), 2);
    assert!(v["reward"].as_f64().unwrap().is_finite());
    // --kv-cache f16 scores; an unknown cache type is a usage error naming the choices.
    for (kv, ok) in [("f16", true), ("bf16", false)] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloudrm"))
            .args([
                "score",
                "--prompt",
                PROMPT,
                "--response",
                RESPONSE,
                "--k",
                "2",
            ])
            .args([
                "--max-critique-tokens",
                "4",
                "--json",
                "--kv-cache",
                kv,
                "--model",
            ])
            .arg(&dir)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), ok, "--kv-cache {kv}: {stderr}");
        if ok {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["rewards"].as_array().unwrap().len(), 2);
        } else {
            assert!(
                stderr.contains("f16") && !stderr.contains("panicked"),
                "{stderr}"
            );
        }
    }
    // A model dir without a reward head fails with a clear message.
    let plain = default_model(OutDtype::BF16);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloudrm"))
        .args(["score", "--prompt", "p", "--response", "r", "--model"])
        .arg(&plain)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no reward head"));
    std::fs::remove_dir_all(dir).ok();
}

/// Each reward equals a from-scratch contiguous pass over prefix + critique + end of turn.
fn check_rewards_from_scratch(
    rm: &RewardModel,
    tok: &Tokenizer,
    tpl: &ChatTemplate,
    s: &cloudrm::cloud::Score,
) {
    check_rewards_from_scratch_for(rm, tok, tpl, PROMPT, RESPONSE, s)
}

fn check_rewards_from_scratch_for(
    rm: &RewardModel,
    tok: &Tokenizer,
    tpl: &ChatTemplate,
    prompt: &str,
    response: &str,
    s: &cloudrm::cloud::Score,
) {
    let (prefix, eot) = CloudTemplate::new(tpl, tok)
        .cloud_prefix(prompt, response)
        .unwrap();
    assert_eq!(s.prefix_tokens, prefix.len());
    for (k, crit) in s.critique_tokens.iter().enumerate() {
        let mut ids = prefix.clone();
        ids.extend(crit);
        ids.push(eot);
        let mut sess = rm.llama.new_session(ids.len(), 64);
        rm.llama
            .forward(&Cpu::reference(), &mut sess, &ids, LogitsMode::None)
            .unwrap();
        let mut r = [0.0];
        let mut scratch = vec![0.0; rm.llama.config.hidden_size];
        rm.rewards(sess.last_hidden(), &mut r, &mut scratch)
            .unwrap();
        assert!(
            (r[0] - s.rewards[k]).abs() < 1e-4 * r[0].abs().max(1.0),
            "critique {k}: {} vs {}",
            s.rewards[k],
            r[0]
        );
    }
}

#[test]
fn prefix_cache_serves_later_requests() {
    let dir = tiny_cloud_dir("cloud-cache", "teacher");
    let rm = RewardModel::load_dir(&dir).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let tpl = ChatTemplate::from_dir(&default_model(OutDtype::BF16)).unwrap();
    let scorer = CloudScorer::new(&rm, &tok, &tpl);
    let opts = ScoreOptions {
        k: 2,
        seed: 4,
        max_critique_tokens: 5,
        ..Default::default()
    };
    let first = scorer.score(PROMPT, RESPONSE, &opts).unwrap();
    assert_eq!(
        first.cached_prefix_tokens, 0,
        "a cold engine has nothing cached"
    );
    // The same response again: its prefix's full blocks come from the cache, and the
    // score is the same.
    let again = scorer.score(PROMPT, RESPONSE, &opts).unwrap();
    assert!(
        again.cached_prefix_tokens >= (first.prefix_tokens - 1) / 16 * 16 - 16,
        "{}",
        again.cached_prefix_tokens
    );
    assert!(again.cached_prefix_tokens > 0);
    assert_eq!(again.rewards, first.rewards);
    assert_eq!(again.critique_tokens, first.critique_tokens);
    // Chosen vs rejected: the second response reuses the blocks of the shared prompt.
    let cmp = scorer
        .compare(
            "Name a primary colour, please.",
            "Red.",
            "Green is primary.",
            &opts,
        )
        .unwrap();
    assert!(
        cmp.b.cached_prefix_tokens >= 16,
        "the prompt's blocks are shared: {}",
        cmp.b.cached_prefix_tokens
    );
    check_rewards_from_scratch_for(
        &rm,
        &tok,
        &tpl,
        "Name a primary colour, please.",
        "Green is primary.",
        &cmp.b,
    );
    std::fs::remove_dir_all(dir).ok();
}

/// A Llama-3-style template (content trimmed) over the default model's ChatML tokens.
#[test]
fn sequence_layout_on_a_trimming_template() {
    let dir = default_model(OutDtype::BF16);
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let src = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n\\n' + message['content'] | trim + '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n\\n' }}{% endif %}";
    let tpl = ChatTemplate::new(src, None, Some("<|im_end|>".into())).unwrap();
    let layout = CloudTemplate::new(&tpl, &tok);
    // Trailing spaces of the response are trimmed, as the template itself does.
    let classic = layout.classic_sequence(PROMPT, "  padded  ").unwrap();
    let text = tok.decode(&classic, false).unwrap();
    assert!(
        text.ends_with("<|im_start|>assistant\n\npadded<|im_end|>"),
        "{text:?}"
    );
    let (prefix, eot) = layout.cloud_prefix(PROMPT, " Paris. ").unwrap();
    assert_eq!(eot, 2);
    let text = tok.decode(&prefix, false).unwrap();
    assert!(text.ends_with("assistant\n\nParis.<|im_end|><|im_start|>user\n\nThe following is a break down on the correctness and usefulness of the assistant's response to my question:"), "{text:?}");
    let (train, at) = layout
        .training_sequence(PROMPT, " Paris. ", " Correct. ")
        .unwrap();
    assert_eq!(&train[..prefix.len()], &prefix[..]);
    assert_eq!(
        tok.decode(&train[prefix.len()..at], false).unwrap(),
        " Correct."
    );
    assert_eq!(train[at], 2);
}

#[test]
fn bad_requests_are_typed_errors() {
    use cloudrm::Error;
    use cloudrm::cloud::CloudError;
    let dir = tiny_cloud_dir("cloud-bad", "teacher");
    let rm = RewardModel::load_dir(&dir).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let tpl = ChatTemplate::from_dir(&dir).unwrap();
    let scorer = CloudScorer::new(&rm, &tok, &tpl);
    let ok = ScoreOptions {
        max_critique_tokens: 4,
        ..Default::default()
    };
    let err = scorer.score("  ", RESPONSE, &ok).unwrap_err();
    assert!(
        matches!(err, Error::Cloud(CloudError::EmptyText { field: "prompt" })),
        "{err}"
    );
    let err = scorer.score(PROMPT, "", &ok).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Cloud(CloudError::EmptyText { field: "response" })
        ),
        "{err}"
    );
    let err = scorer
        .score(PROMPT, RESPONSE, &ScoreOptions { k: 0, ..ok.clone() })
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Cloud(CloudError::InvalidOption { name: "k", .. })
        ),
        "{err}"
    );
    let err = scorer
        .score(
            PROMPT,
            RESPONSE,
            &ScoreOptions {
                temperature: Some(-0.5),
                ..ok.clone()
            },
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Cloud(CloudError::InvalidOption {
                name: "temperature",
                ..
            })
        ),
        "{err}"
    );
    let err = scorer
        .score(
            PROMPT,
            RESPONSE,
            &ScoreOptions {
                top_p: 0.0,
                ..ok.clone()
            },
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Cloud(CloudError::InvalidOption {
                name: "sampling",
                ..
            })
        ),
        "{err}"
    );
    // Longer than the tiny model's 256-position context, with and without a critique.
    let long = "word ".repeat(400);
    let err = scorer.score(PROMPT, &long, &ok).unwrap_err();
    assert!(
        matches!(err, Error::Cloud(CloudError::TooLong { context: 256, .. })),
        "{err}"
    );
    let err = scorer
        .score(
            PROMPT,
            &long,
            &ScoreOptions {
                classic: true,
                ..ok.clone()
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::Cloud(CloudError::TooLong { .. })),
        "{err}"
    );
    // The default 1024 critique tokens do not fit a 256-position model either.
    let err = scorer
        .score(PROMPT, RESPONSE, &ScoreOptions::default())
        .unwrap_err();
    assert!(
        matches!(err, Error::Cloud(CloudError::TooLong { extra: 1025, .. })),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn compare_and_best_of_n_commands() {
    let dir = tiny_cloud_dir("cloud-cli2", "teacher");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloudrm"))
            .args(args)
            .arg("--model")
            .arg(&dir)
            .args(["--max-critique-tokens", "3", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let v = run(&[
        "compare", "--prompt", PROMPT, "--a", "Paris.", "--b", "Lyon.",
    ]);
    let p = v["p_a_preferred"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p));
    assert!(
        v["b"]["cached_prefix_tokens"].as_u64().unwrap() > 0,
        "B reuses the prompt's blocks"
    );
    let v = run(&[
        "best-of-n",
        "--prompt",
        PROMPT,
        "--candidate",
        "Paris.",
        "--candidate",
        "Lyon.",
        "--candidate",
        "Nice.",
    ]);
    assert_eq!(v["scores"].as_array().unwrap().len(), 3);
    assert!(v["best"].as_u64().unwrap() < 3);
    // Bad option: a clear message and a non-zero exit, no panic.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloudrm"))
        .args(["score", "--prompt", PROMPT, "--response", "", "--model"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("response is empty") && !stderr.contains("panicked"),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// Self-consistency with prefix sharing against K independent sequences without sharing
/// (same seeds): identical sampled tokens, rewards within 1e-5, and the prefix's blocks
/// allocated once instead of K times.
#[test]
fn shared_prefix_equals_independent_sequences() {
    let dir = tiny_cloud_dir("cloud-share", "teacher");
    let rm = RewardModel::load_dir(&dir).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let tpl = ChatTemplate::from_dir(&dir).unwrap();
    for k in [1usize, 3, 8] {
        // Fresh scorers so neither arm benefits from the other's prefix cache.
        let shared = CloudScorer::new(&rm, &tok, &tpl)
            .score(
                PROMPT,
                RESPONSE,
                &ScoreOptions {
                    k,
                    seed: 21,
                    max_critique_tokens: 6,
                    ..Default::default()
                },
            )
            .unwrap();
        let alone = CloudScorer::new(&rm, &tok, &tpl)
            .score(
                PROMPT,
                RESPONSE,
                &ScoreOptions {
                    k,
                    seed: 21,
                    max_critique_tokens: 6,
                    share_prefix: false,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(
            shared.critique_tokens, alone.critique_tokens,
            "K={k}: sampled tokens differ"
        );
        for (a, b) in shared.rewards.iter().zip(&alone.rewards) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "K={k}: reward {a} vs {b}"
            );
        }
        let prefix_blocks = shared.prefix_tokens.div_ceil(16);
        assert_eq!(
            shared.prefix_blocks_allocated, prefix_blocks,
            "K={k}: shared prefix allocated once"
        );
        assert_eq!(
            alone.prefix_blocks_allocated,
            k * prefix_blocks,
            "K={k}: unshared allocates K copies"
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

/// The CLoud and classic layouts against tests/golden/cloud_layout.json, made without
/// cloudrm: transformers renders the templates, llama.cpp tokenizes (ChatML), and the
/// official Llama-3-Instruct template (content trimmed) gives the strings.
#[test]
fn layouts_match_the_golden_fixture() {
    use cloudrm::cloud::split_after_last_content;
    use cloudrm::loader::template::Message;
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/cloud_layout.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(v["magic"], "cloudrm-cloud-layout-golden");
    let dir = default_model(OutDtype::BF16);
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let chatml = ChatTemplate::from_dir(&dir).unwrap();
    let layout = CloudTemplate::new(&chatml, &tok);
    let llama3_src = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";
    let llama3 = ChatTemplate::new(
        llama3_src,
        Some("<|begin_of_text|>".into()),
        Some("<|eot_id|>".into()),
    )
    .unwrap();
    let ids = |x: &serde_json::Value| -> Vec<u32> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|y| y.as_u64().unwrap() as u32)
            .collect()
    };
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 4);
    for case in cases {
        let (p, r) = (
            case["prompt"].as_str().unwrap(),
            case["response"].as_str().unwrap(),
        );
        assert_eq!(
            layout.classic_sequence(p, r).unwrap(),
            ids(&case["chatml_classic_ids"]),
            "classic {p:?}"
        );
        assert_eq!(
            layout.cloud_prefix(p, r).unwrap().0,
            ids(&case["chatml_cloud_prefix_ids"]),
            "cloud {p:?}"
        );
        // Llama 3: strings only (its tokenizer is not available offline).
        let two = [Message::user(p), Message::assistant(r)];
        let (before, after) = split_after_last_content(&llama3, &two).unwrap();
        assert!(after.starts_with("<|eot_id|>"));
        assert_eq!(
            before + "<|eot_id|>",
            case["llama3_classic_text"].as_str().unwrap(),
            "llama3 classic {p:?}"
        );
        let three = [
            Message::user(p),
            Message::assistant(r),
            Message::user(COT_PROMPT.trim_end()),
        ];
        let (before, _) = split_after_last_content(&llama3, &three).unwrap();
        assert_eq!(
            before,
            case["llama3_cloud_prefix_text"].as_str().unwrap(),
            "llama3 cloud {p:?}"
        );
    }
}

/// Same critique tokens, rewards within `tol` relative.
fn assert_same_score(got: &Score, want: &Score, tol: f32, what: &str) {
    assert_eq!(got.critique_tokens, want.critique_tokens, "{what}: tokens");
    for (g, w) in got.rewards.iter().zip(&want.rewards) {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}: reward {g} vs {w}"
        );
    }
    assert_eq!(got.truncated, want.truncated, "{what}: truncation");
}

#[test]
fn batched_requests_equal_requests_scored_alone() {
    let dir = tiny_cloud_dir("cloud-batch", "teacher");
    let rm = RewardModel::load_dir(&dir).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let tpl = ChatTemplate::from_dir(&default_model(OutDtype::BF16)).unwrap();
    // A long shared prompt (several full blocks) so the nested levels are real: the
    // prompt's blocks shared by every request, each response's blocks by its K rows.
    let prompt = format!(
        "{PROMPT} {}",
        "Please answer in one short sentence. ".repeat(6)
    );
    let responses = [
        "Paris.",
        "The capital of France is Paris, a city on the Seine.",
        "Lyon.",
        "I am not sure, but I think it might be Marseille or maybe Paris.",
        "Paris, of course.",
    ];
    // Greedy, so that the comparison is exact: this random model's next-token
    // distributions are nearly uniform over 49152 tokens, where sampling flips on
    // differences in the last bit (the nested levels sum attention in another order).
    for (k, max_tokens) in [(3usize, 9usize), (1, 6), (40, 4)] {
        let opts = ScoreOptions {
            k,
            temperature: Some(0.0),
            seed: 11,
            max_critique_tokens: max_tokens,
            ..Default::default()
        };
        // Each alone, on a fresh scorer (no cache shared with the batch).
        let alone: Vec<Score> = responses
            .iter()
            .map(|r| {
                CloudScorer::new(&rm, &tok, &tpl)
                    .score(&prompt, r, &opts)
                    .unwrap()
            })
            .collect();
        let scorer = CloudScorer::new(&rm, &tok, &tpl);
        let reqs: Vec<(&str, &str)> = responses.iter().map(|r| (prompt.as_str(), *r)).collect();
        let batch = scorer.score_batch(&reqs, &opts).unwrap();
        assert_eq!(batch.len(), responses.len());
        for (i, (b, a)) in batch.iter().zip(&alone).enumerate() {
            assert_same_score(b, a, 1e-4, &format!("K={k} request {i}"));
        }
        // The prompt's full blocks are computed once: later requests find them cached.
        assert_eq!(batch[0].cached_prefix_tokens, 0);
        for b in &batch[1..] {
            assert!(
                b.cached_prefix_tokens >= 16,
                "K={k}: a later request recomputed the shared prompt ({} cached)",
                b.cached_prefix_tokens
            );
        }
        for (b, a) in batch.iter().zip(&alone).skip(1) {
            assert!(b.prefix_blocks_allocated < a.prefix_blocks_allocated);
        }
        // compare and best_of_n run as batches and agree with the requests alone.
        let cmp = scorer
            .compare(&prompt, responses[0], responses[1], &opts)
            .unwrap();
        assert_same_score(&cmp.a, &alone[0], 1e-4, "compare a");
        assert_same_score(&cmp.b, &alone[1], 1e-4, "compare b");
        let (best, scores) = scorer.best_of_n(&prompt, &responses, &opts).unwrap();
        for (s, a) in scores.iter().zip(&alone) {
            assert_same_score(s, a, 1e-4, "best-of-n");
        }
        assert!(scores.iter().all(|s| s.reward <= scores[best].reward));
    }
    // Sampled batches are reproducible run to run.
    let opts = ScoreOptions {
        k: 4,
        seed: 5,
        max_critique_tokens: 6,
        ..Default::default()
    };
    let reqs: Vec<(&str, &str)> = responses.iter().map(|r| (PROMPT, *r)).collect();
    let one = CloudScorer::new(&rm, &tok, &tpl)
        .score_batch(&reqs, &opts)
        .unwrap();
    let two = CloudScorer::new(&rm, &tok, &tpl)
        .score_batch(&reqs, &opts)
        .unwrap();
    assert_eq!(one, two);
    assert!(
        one[0]
            .critique_tokens
            .iter()
            .any(|c| *c != one[0].critique_tokens[0])
    );
    // An invalid request fails the batch before any work, with a typed error.
    let scorer = CloudScorer::new(&rm, &tok, &tpl);
    let err = scorer
        .score_batch(
            &[(PROMPT, "Paris."), (PROMPT, "  ")],
            &ScoreOptions::default(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("response"), "{err}");
    assert!(
        scorer
            .score_batch(&[], &ScoreOptions::default())
            .unwrap()
            .is_empty()
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn compare_many_isolates_bad_triples_and_matches_compare() {
    let dir = tiny_cloud_dir("cloud-compare-many", "teacher");
    let rm = RewardModel::load_dir(&dir).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let tpl = ChatTemplate::from_dir(&default_model(OutDtype::BF16)).unwrap();
    let opts = ScoreOptions {
        k: 2,
        temperature: Some(0.0),
        max_critique_tokens: 5,
        ..Default::default()
    };
    let triples = [
        (PROMPT, "Paris.", "Lyon."),
        (PROMPT, "", "Lyon."),
        ("Name a colour.", "Blue.", "A chair."),
    ];
    let scorer = CloudScorer::new(&rm, &tok, &tpl);
    let got = scorer.compare_many(&triples, &opts).unwrap();
    assert_eq!(got.len(), 3);
    let err = got[1].as_ref().unwrap_err();
    assert!(err.to_string().contains("response"), "{err}");
    for i in [0, 2] {
        let (p, a, b) = triples[i];
        let want = CloudScorer::new(&rm, &tok, &tpl)
            .compare(p, a, b, &opts)
            .unwrap();
        let c = got[i].as_ref().unwrap();
        assert_same_score(&c.a, &want.a, 1e-4, "compare_many a");
        assert_same_score(&c.b, &want.b, 1e-4, "compare_many b");
        assert!((c.p_a_preferred - want.p_a_preferred).abs() < 1e-4);
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Templates a CLoud sequence cannot be laid out with are typed errors, not panics.
#[test]
fn unusable_templates_are_errors() {
    let dir = default_model(OutDtype::BF16);
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let cases = [
        // Nothing after a turn's content: no end-of-turn token.
        (
            "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}",
            "no end-of-turn token",
        ),
        // Ordinary text after the content, not a special token.
        (
            "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' END\\n' }}{% endfor %}",
            "single end-of-turn token",
        ),
        // The content is dropped.
        (
            "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_end|>' }}{% endfor %}",
            "dropped the content",
        ),
    ];
    for (src, want) in cases {
        let tpl = ChatTemplate::new(src, None, None).unwrap();
        let layout = CloudTemplate::new(&tpl, &tok);
        let err = layout.cloud_prefix(PROMPT, RESPONSE).unwrap_err();
        assert!(err.to_string().contains(want), "{src}: {err}");
        assert!(layout.classic_sequence(PROMPT, RESPONSE).is_err(), "{src}");
    }
}

/// `--device`: `cuda` without a usable GPU is an error naming the cause (never a panic),
/// `auto` falls back to the CPU and says so (same result as `--device cpu`), CPU-only
/// options with `cuda` are usage errors naming the option; eval takes the flag too.
/// CUDA is disabled through `CLOUDRM_NO_CUDA` so this holds on GPU machines too.
#[test]
fn device_flag_cuda_errors_and_auto_falls_back() {
    let dir = tiny_cloud_dir("cloud-device", "teacher");
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloudrm"))
            .args(["score", "--prompt", PROMPT, "--response", RESPONSE])
            .args(["--k", "2", "--max-critique-tokens", "4", "--json"])
            .args(extra)
            .arg("--model")
            .arg(&dir)
            .env("CLOUDRM_NO_CUDA", "1")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, cpu, stderr) = run(&["--device", "cpu"]);
    assert!(ok, "{stderr}");
    let (ok, auto, stderr) = run(&["--device", "auto"]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("scoring on the CPU"), "{stderr}");
    assert_eq!(auto, cpu, "auto without a GPU is the CPU run");
    let (ok, _, stderr) = run(&["--device", "cuda"]);
    assert!(!ok);
    assert!(
        stderr.contains("CLOUDRM_NO_CUDA") && !stderr.contains("panicked"),
        "{stderr}"
    );
    for opt in [
        &["--quantize", "q8"][..],
        &["--hugepages"],
        &["--kv-cache", "f16"],
    ] {
        let mut args = vec!["--device", "cuda"];
        args.extend_from_slice(opt);
        let (ok, _, stderr) = run(&args);
        assert!(!ok, "{args:?}");
        assert!(
            stderr.contains(opt[0]) && stderr.contains("--device cpu"),
            "{stderr}"
        );
        // auto takes the CPU for them.
        args[1] = "auto";
        let (ok, _, stderr) = run(&args);
        assert!(ok && stderr.contains("CPU option"), "{args:?}: {stderr}");
    }
    // eval: cuda fails before anything is written; auto goes on on the CPU (here to the
    // missing data file's error).
    let eval = |device: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloudrm"))
            .args(["eval", "--data"])
            .arg(dir.join("missing.jsonl"))
            .arg("--out")
            .arg(dir.join("eval-out.jsonl"))
            .args(["--device", device, "--model"])
            .arg(&dir)
            .env("CLOUDRM_NO_CUDA", "1")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let stderr = eval("cuda");
    assert!(
        stderr.contains("CLOUDRM_NO_CUDA") && !stderr.contains("missing.jsonl"),
        "{stderr}"
    );
    let stderr = eval("auto");
    assert!(
        stderr.contains("scoring on the CPU") && stderr.contains("missing.jsonl"),
        "{stderr}"
    );
    assert!(!dir.join("eval-out.jsonl").exists());
    std::fs::remove_dir_all(dir).ok();
}

/// `ignore_stops` (what `cloudrm bench` scores with): every critique runs to its cap even
/// when the end-of-turn token is drawn, on the shared, unshared and batch scorers. The
/// model here draws the end of turn almost surely (residual stream = its constant
/// embedding, the LM head's end-of-turn row aligned with it), so without the option every
/// critique is empty.
#[test]
fn ignore_stops_runs_every_critique_to_its_cap() {
    let tok = Tokenizer::from_dir(&default_model(OutDtype::BF16)).unwrap();
    let eot = tok.token_to_id("<|im_end|>").unwrap() as usize;
    let c = tiny_reward_spec().hidden;
    // A constant embedding, no attention or MLP output, a unit final norm and an LM head
    // whose end-of-turn row is a large multiple of it.
    let src = default_model(OutDtype::BF16);
    let dir = tiny_cloud_reward_dir_edited("cloud-ignore-stops", "teacher", &src, None, |n, d| {
        if n.ends_with("embed_tokens.weight") || n == "model.norm.weight" {
            d.iter_mut().for_each(|x| *x = 1.0);
        } else if n.ends_with("o_proj.weight") || n.ends_with("down_proj.weight") {
            d.iter_mut().for_each(|x| *x = 0.0);
        } else if n == "lm_head.weight" {
            d[eot * c..(eot + 1) * c].iter_mut().for_each(|x| *x = 10.0);
        }
    });
    let rm = RewardModel::load_dir(&dir).unwrap();
    let tpl = ChatTemplate::from_dir(&default_model(OutDtype::BF16)).unwrap();
    let scorer = CloudScorer::new(&rm, &tok, &tpl);
    let cap = 5;
    let opts = ScoreOptions {
        k: 3,
        temperature: Some(1.0),
        seed: 4,
        max_critique_tokens: cap,
        ..Default::default()
    };
    // Stops honoured: the first draw is the end of turn.
    let s = scorer.score(PROMPT, RESPONSE, &opts).unwrap();
    assert!(s.critique_tokens.iter().all(|c| c.is_empty()), "{s:?}");
    assert_eq!(s.truncated, vec![false; 3]);
    let ignoring = ScoreOptions {
        ignore_stops: true,
        ..opts
    };
    let check = |s: &Score, what: &str| {
        for c in &s.critique_tokens {
            assert_eq!(c.len(), cap, "{what}: {c:?}");
            assert!(c.contains(&(eot as u32)), "{what}: {c:?}");
        }
        assert_eq!(s.truncated, vec![true; 3], "{what}");
        assert!(s.rewards.iter().all(|r| r.is_finite()), "{what}");
    };
    check(
        &scorer.score(PROMPT, RESPONSE, &ignoring).unwrap(),
        "shared",
    );
    let unshared = ScoreOptions {
        share_prefix: false,
        ..ignoring.clone()
    };
    check(
        &scorer.score(PROMPT, RESPONSE, &unshared).unwrap(),
        "unshared",
    );
    let batch = scorer
        .score_batch(&[(PROMPT, RESPONSE), (PROMPT, "Lyon.")], &ignoring)
        .unwrap();
    for (i, s) in batch.iter().enumerate() {
        check(s, &format!("batch request {i}"));
    }
    std::fs::remove_dir_all(dir).ok();
}
