//! The `cloudrm` binary end to end: the README's main job on the default model, and the
//! exit status and message of bad invocations.

mod common;

use std::process::Command;

use cloudrm::loader::gguf::OutDtype;
use common::model::default_model;
use common::tiny::temp_dir;

fn cloudrm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cloudrm"))
}

#[test]
fn generate_answers_paris() {
    // Make sure the model is in the cache first (same path the binary takes).
    default_model(OutDtype::BF16);
    let out = cloudrm()
        .args([
            "generate",
            "--chat",
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "32",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Paris"), "no Paris in: {stdout}");
}

#[test]
fn bad_model_dir_fails_cleanly() {
    let dir = temp_dir("cli-empty");
    let out = cloudrm()
        .args(["generate", "--prompt", "hi", "--model"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("config.json"), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn import_of_missing_file_fails_cleanly() {
    let dir = temp_dir("cli-import");
    let out = cloudrm()
        .arg("import")
        .arg(dir.join("nope.gguf"))
        .arg(dir.join("out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nope.gguf"), "stderr: {stderr}");
    assert!(!dir.join("out").exists(), "nothing half-written");
    std::fs::remove_dir_all(dir).ok();
}
