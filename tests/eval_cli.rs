//! `cloudrm eval` end to end on a tiny CLoud reward model (the default model's tokenizer
//! and chat template, random weights): output lines, a summary consistent with them, a
//! bad data line reported while the others are scored, refusal to overwrite, resume after
//! a crash; and the untrained-head rule (library and CLI).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cloudrm::Error;
use cloudrm::cloud::{CloudScorer, ScoreOptions};
use cloudrm::eval::{EvalError, EvalOptions, require_trained_head, run_eval};
use cloudrm::loader::gguf::OutDtype;
use cloudrm::loader::template::ChatTemplate;
use cloudrm::loader::tokenizer::Tokenizer;
use cloudrm::model::{
    CheckpointLayout, FeedbackMethod, Llama, ModelError, RewardHead, RewardModel,
    UNTRAINED_HEAD_SEED,
};
use common::model::default_model;
use common::tiny::{
    copy_tokenizer, temp_dir, tiny_cloud_reward_dir, tiny_model_dir, tiny_reward_spec,
};
use serde_json::Value;

fn cloudrm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cloudrm"))
}

fn check(out: &Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    (stdout, stderr)
}

/// Six RewardBench rows; line 3 is broken JSON.
const DATA: &str = concat!(
    r#"{"prompt":"What is 2 + 2?","chosen":"4","rejected":"5","subset":"math-prm","id":10}"#,
    "\n",
    r#"{"prompt":"Name a colour.","chosen":"Blue.","rejected":"Seven.","subset":"alpacaeval-easy","id":11}"#,
    "\n",
    r#"{"prompt":"Broken", "chosen": nope}"#,
    "\n",
    r#"{"prompt":"Say hi.","chosen":"Hi!","rejected":"No.","subset":"alpacaeval-easy","id":12}"#,
    "\n",
    r#"{"prompt":"Capital of Italy?","chosen":"Rome.","rejected":"Milan.","subset":"hep-go","id":13}"#,
    "\n",
    r#"{"prompt":"Is ice cold?","chosen":"Yes.","rejected":"No.","subset":"anthropic_hhh","id":14}"#,
    "\n",
);

fn eval_cmd(model: &Path, data: &Path, out: &Path) -> Command {
    let mut c = cloudrm();
    c.arg("eval")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(["--max-critique-tokens", "3", "--json"]);
    c
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn results(path: &Path) -> Vec<Value> {
    lines(path)
        .into_iter()
        .filter(|v| v.get("correct").is_some())
        .collect()
}

fn scored_this_run(stderr: &str) -> usize {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("scored "))
        .unwrap_or_else(|| panic!("no `scored N` line in: {stderr}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

struct Setup {
    dir: PathBuf,
    model: PathBuf,
    data: PathBuf,
    out: PathBuf,
}

fn setup(tag: &str) -> Setup {
    let src = default_model(OutDtype::BF16);
    let model = tiny_cloud_reward_dir(&format!("{tag}-model"), "teacher", &src, None);
    let dir = temp_dir(tag);
    let data = dir.join("rb.jsonl");
    std::fs::write(&data, DATA).unwrap();
    let out = dir.join("out.jsonl");
    Setup {
        dir,
        model,
        data,
        out,
    }
}

#[test]
fn eval_writes_rows_and_a_consistent_summary_then_resumes() {
    let s = setup("eval-cli");
    let summary_path = s.dir.join("summary.json");
    let out = eval_cmd(&s.model, &s.data, &s.out)
        .arg("--summary-json")
        .arg(&summary_path)
        .output()
        .unwrap();
    let (stdout, stderr) = check(&out);
    assert!(out.status.success(), "stderr: {stderr}");
    assert!(stderr.contains("line 3: invalid JSON"), "stderr: {stderr}");
    assert_eq!(scored_this_run(&stderr), 5);

    let all = lines(&s.out);
    assert_eq!(all.len(), 6, "5 results + 1 bad line");
    let bad: Vec<_> = all.iter().filter(|v| v.get("line").is_some()).collect();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0]["line"], 3);
    assert!(bad[0]["error"].as_str().unwrap().contains("invalid JSON"));
    let rows = results(&s.out);
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["10", "11", "12", "13", "14"]);
    let mut correct = 0;
    for r in &rows {
        let (c, j) = (
            r["chosen_reward"].as_f64().unwrap(),
            r["rejected_reward"].as_f64().unwrap(),
        );
        assert_eq!(r["correct"].as_bool().unwrap(), c > j, "{r}");
        correct += (c > j) as usize;
        assert_eq!(r["chosen_rewards"].as_array().unwrap().len(), 1);
        assert_eq!(r["chosen_critiques"].as_array().unwrap().len(), 1);
        assert_eq!(r["rejected_critiques"].as_array().unwrap().len(), 1);
    }

    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["scored"], 5);
    assert_eq!(summary["correct"], correct);
    assert_eq!(summary["input_errors"], 1);
    assert_eq!(summary["head_trained"], true);
    assert_eq!(summary["format"], "rewardbench");
    let acc = summary["accuracy"].as_f64().unwrap();
    assert!((acc - correct as f64 / 5.0).abs() < 1e-12);
    let easy: Vec<_> = rows
        .iter()
        .filter(|r| r["subset"] == "alpacaeval-easy")
        .collect();
    let easy_correct = easy.iter().filter(|r| r["correct"] == true).count();
    assert_eq!(summary["subsets"]["alpacaeval-easy"]["n"], 2);
    assert_eq!(
        summary["subsets"]["alpacaeval-easy"]["correct"],
        easy_correct
    );
    let chat = summary["official"]["Chat"].as_f64().unwrap();
    assert!((chat - easy_correct as f64 / 2.0).abs() < 1e-12);
    assert_eq!(summary["official"]["Chat Hard"], Value::Null);
    assert_eq!(summary["plain"]["Score"], Value::Null);
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    assert_eq!(written, summary);

    // A second run without --resume refuses to overwrite.
    let before = std::fs::read(&s.out).unwrap();
    let out = eval_cmd(&s.model, &s.data, &s.out).output().unwrap();
    let (_, stderr) = check(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&s.out.display().to_string()) && stderr.contains("--resume"),
        "stderr: {stderr}"
    );
    assert_eq!(std::fs::read(&s.out).unwrap(), before, "OUT untouched");

    // A crash: the last result gone and the one before it half-written.
    let text = String::from_utf8(before.clone()).unwrap();
    let kept: Vec<&str> = text.lines().collect();
    let n_keep = kept.len() - 2; // results 10, 11, bad line 3, 12
    let mut crashed = kept[..n_keep].join("\n");
    crashed.push('\n');
    crashed.push_str(&kept[n_keep][..kept[n_keep].len() / 2]);
    std::fs::write(&s.out, &crashed).unwrap();
    let out = eval_cmd(&s.model, &s.data, &s.out)
        .arg("--resume")
        .output()
        .unwrap();
    let (stdout, stderr) = check(&out);
    assert!(out.status.success(), "stderr: {stderr}");
    assert_eq!(
        scored_this_run(&stderr),
        2,
        "only ids 13 and 14 are scored again"
    );
    let after = std::fs::read_to_string(&s.out).unwrap();
    assert!(
        after.starts_with(&format!("{}\n", kept[..n_keep].join("\n"))),
        "finished lines kept as they were"
    );
    let all = lines(&s.out);
    assert_eq!(all.len(), 6, "the bad line is not repeated: {after}");
    let ids: Vec<String> = results(&s.out)
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["10", "11", "12", "13", "14"]);
    // Deterministic scoring: the same rows and the same summary as the first run.
    assert_eq!(after.as_bytes(), &before[..]);
    let resumed: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(resumed["scored"], 5);
    assert_eq!(resumed["scored_this_run"], 2);
    assert_eq!(resumed["official"], summary["official"]);

    // Resuming a finished run scores nothing.
    let out = eval_cmd(&s.model, &s.data, &s.out)
        .arg("--resume")
        .output()
        .unwrap();
    let (_, stderr) = check(&out);
    assert!(out.status.success(), "stderr: {stderr}");
    assert_eq!(scored_this_run(&stderr), 0);
    assert_eq!(std::fs::read(&s.out).unwrap(), before);

    std::fs::remove_dir_all(&s.dir).ok();
    std::fs::remove_dir_all(&s.model).ok();
}

#[test]
fn eval_human_summary_and_limit() {
    let s = setup("eval-cli-human");
    let out = cloudrm()
        .arg("eval")
        .arg("--model")
        .arg(&s.model)
        .arg("--data")
        .arg(&s.data)
        .arg("--out")
        .arg(&s.out)
        .args(["--limit", "2", "--classic"])
        .output()
        .unwrap();
    let (stdout, stderr) = check(&out);
    assert!(out.status.success(), "stderr: {stderr}");
    assert!(stdout.contains("pairs; ties count as wrong"), "{stdout}");
    assert!(stdout.contains("RewardBench sections"), "{stdout}");
    let rows = results(&s.out);
    assert_eq!(rows.len(), 2);
    assert!(rows[0]["chosen_critiques"].as_array().unwrap().is_empty());
    std::fs::remove_dir_all(&s.dir).ok();
    std::fs::remove_dir_all(&s.model).ok();
}

#[test]
fn eval_without_model_refuses_the_untrained_default_head() {
    let dir = temp_dir("eval-cli-untrained");
    let data = dir.join("d.jsonl");
    std::fs::write(&data, DATA).unwrap();
    let out_path = dir.join("out.jsonl");
    let out = cloudrm()
        .arg("eval")
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out_path)
        .output()
        .unwrap();
    let (_, stderr) = check(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("untrained") && stderr.contains("--allow-untrained"),
        "stderr: {stderr}"
    );
    assert!(!out_path.exists(), "nothing written");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn score_without_model_warns_and_says_untrained() {
    default_model(OutDtype::BF16);
    let out = cloudrm()
        .args([
            "score",
            "--prompt",
            "What is the capital of France?",
            "--response",
            "Paris.",
            "--classic",
            "--json",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = check(&out);
    assert!(out.status.success(), "stderr: {stderr}");
    assert!(
        stderr.contains(
            "warning: the reward head of the default model (SmolLM2-135M-Instruct) is untrained: \
             rewards are random noise, not a judgement"
        ),
        "stderr: {stderr}"
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["head_trained"], false);
    assert!(v["reward"].as_f64().unwrap().is_finite());
}

#[test]
fn untrained_head_is_refused_by_the_library_and_flows_through_the_kernels() {
    let spec = tiny_reward_spec();
    let c = spec.hidden;
    let plain = tiny_model_dir("eval-untrained-plain", &spec);
    // A plain LM directory is still not a reward model.
    let err = RewardModel::load_dir(&plain).unwrap_err();
    assert!(
        matches!(err, Error::Model(ModelError::NoRewardHead { .. })),
        "{err}"
    );

    let untrained =
        RewardModel::with_untrained_head(Llama::load_dir(&plain).unwrap(), FeedbackMethod::Cloud);
    assert!(!untrained.head_trained());
    assert_eq!(untrained.layout, CheckpointLayout::CausalLm);
    let err = require_trained_head(&untrained, "tiny", false).unwrap_err();
    assert!(matches!(err, EvalError::UntrainedHead { .. }));
    assert!(err.to_string().contains("--allow-untrained"), "{err}");
    require_trained_head(&untrained, "tiny", true).unwrap();

    // The seeded init: reproducible, PyTorch Linear-style bounds.
    let RewardHead::Untrained {
        dense_w,
        dense_b,
        out_w,
        out_b,
    } = RewardHead::untrained(c, UNTRAINED_HEAD_SEED)
    else {
        panic!("not an untrained head")
    };
    let bound = 1.0 / (c as f32).sqrt();
    assert!(
        dense_w
            .iter()
            .chain(&dense_b)
            .chain(&out_w)
            .all(|x| x.abs() <= bound)
    );
    assert!(dense_w.iter().any(|&x| x != 0.0));
    match &untrained.head {
        RewardHead::Untrained { dense_w: w, .. } => assert_eq!(w, &dense_w),
        other => panic!("{other:?}"),
    }

    // The same weights stored as a CLoud checkpoint give the same rewards on the CLoud
    // path (the owned head goes through the same dual-head kernels).
    let src = default_model(OutDtype::BF16);
    copy_tokenizer(&src, &plain);
    let stored = tiny_cloud_reward_dir(
        "eval-untrained-stored",
        "teacher",
        &src,
        Some((dense_w, dense_b, out_w, out_b)),
    );
    let trained_twin = RewardModel::load_dir(&stored).unwrap();
    assert!(trained_twin.head_trained());
    let tok = Tokenizer::from_dir(&plain).unwrap();
    let tpl = ChatTemplate::from_dir(&plain).unwrap();
    let opts = ScoreOptions {
        k: 2,
        max_critique_tokens: 4,
        ..Default::default()
    };
    let a = CloudScorer::new(&untrained, &tok, &tpl)
        .score("Is water wet?", "Yes.", &opts)
        .unwrap();
    let b = CloudScorer::new(&trained_twin, &tok, &tpl)
        .score("Is water wet?", "Yes.", &opts)
        .unwrap();
    assert_eq!(a.rewards.len(), 2);
    assert!(a.rewards.iter().all(|r| r.is_finite()));
    assert_eq!(a.rewards, b.rewards);
    assert_eq!(a.critiques, b.critiques);
    let classic = CloudScorer::new(&untrained, &tok, &tpl)
        .score_classic("Is water wet?", "Yes.")
        .unwrap();
    let classic_twin = CloudScorer::new(&trained_twin, &tok, &tpl)
        .score_classic("Is water wet?", "Yes.")
        .unwrap();
    assert_eq!(classic.reward, classic_twin.reward);

    // The library entry point the CLI uses refuses it too, unless allowed.
    let data = plain.join("d.jsonl");
    std::fs::write(&data, DATA).unwrap();
    let out = plain.join("out.jsonl");
    let scorer = CloudScorer::new(&untrained, &tok, &tpl);
    let mut eval_opts = EvalOptions {
        score: ScoreOptions {
            max_critique_tokens: 2,
            ..Default::default()
        },
        ..Default::default()
    };
    let err = run_eval(&scorer, "tiny", &data, &out, &eval_opts).unwrap_err();
    assert!(
        matches!(err, Error::Eval(EvalError::UntrainedHead { .. })),
        "{err}"
    );
    assert!(!out.exists(), "refused before writing anything");
    eval_opts.allow_untrained = true;
    let report = run_eval(&scorer, "tiny", &data, &out, &eval_opts).unwrap();
    assert_eq!(report.scored_now, 5);
    assert_eq!(report.summary.input_errors, 1);
    std::fs::remove_dir_all(plain).ok();
    std::fs::remove_dir_all(stored).ok();
}
