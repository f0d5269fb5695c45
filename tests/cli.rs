//! The `cloudrm` binary end to end: the README's main job on the default model, and the
//! exit status and message of bad invocations.

mod common;

use std::path::Path;
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

/// `cloudrm bench ARGS --json`, which must succeed; its report.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = cloudrm()
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `cloudrm bench` of 8 prefill and 2 decode tokens, no critique job, no bandwidth pass,
/// with `flag`.
fn short_bench(flag: &str) -> serde_json::Value {
    bench_json(&[
        "--prefill",
        "8",
        "--decode",
        "2",
        "--k",
        "--bandwidth-mib",
        "0",
        flag,
    ])
}

/// `CLOUDRM_ISA` caps the SIMD path (the bench names the one in use); an unknown name
/// is reported and ignored; an opt-in path the machine cannot take is reported with the
/// path taken instead.
#[test]
fn cloudrm_isa_caps_the_simd_path() {
    default_model(OutDtype::BF16);
    let tiny = [
        "bench",
        "--prefill",
        "4",
        "--decode",
        "2",
        "--k",
        "--bandwidth-mib",
        "0",
        "--json",
    ];
    let run = |isa: &str| {
        let out = output_within(
            cloudrm().args(tiny).env("CLOUDRM_ISA", isa),
            std::time::Duration::from_secs(300),
        );
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (v["machine"]["isa"].as_str().unwrap().to_string(), stderr)
    };
    let (isa, _) = run("scalar");
    assert_eq!(isa, "scalar");
    let (best, stderr) = run("avx9000");
    assert!(
        stderr.contains("CLOUDRM_ISA") && stderr.contains("avx9000"),
        "{stderr}"
    );
    assert!(
        ["scalar", "avx2", "avx512"].contains(&best.as_str()),
        "{best}"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        assert_ne!(best, "scalar");
        assert_eq!(run("avx2").0, "avx2");
    }
    // The opt-in paths: taken where the machine has them (their detection runs their
    // self-checks, which must not wait on the detection itself), else reported.
    for want in ["avx512bf16", "amx"] {
        let (isa, stderr) = run(want);
        if isa != want {
            assert!(
                stderr.contains(&format!("CLOUDRM_ISA={want} but "))
                    && stderr.contains(&format!("using {isa}")),
                "{stderr}"
            );
        }
        #[cfg(target_arch = "x86_64")]
        if want == "avx512bf16"
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
        {
            assert_eq!(isa, want, "{stderr}");
        }
    }
}

/// `cmd`'s output, or a panic naming it if it has not exited within `limit` (it is
/// killed): a hang fails the test instead of stalling the suite.
fn output_within(cmd: &mut Command, limit: std::time::Duration) -> std::process::Output {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut b = Vec::new();
            r.read_to_end(&mut b).unwrap();
            b
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            let stderr = String::from_utf8_lossy(&err.join().unwrap()).to_string();
            panic!("{cmd:?} still running after {limit:?}; stderr: {stderr}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

#[test]
fn bench_reports_every_figure_as_json() {
    default_model(OutDtype::BF16);
    let v = bench_json(&[
        "--prefill",
        "40",
        "--decode",
        "3",
        "--k",
        "1,3",
        "--critique-tokens",
        "3",
        "--prefix",
        "70",
        "--bandwidth-mib",
        "16",
    ]);
    for key in [
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "read_bandwidth_gb_s",
        "decode_roofline_fraction",
        "load_ms",
    ] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {v}");
    }
    assert_eq!(
        v["decode_weight_bytes_per_token"].as_u64(),
        Some(269_030_016),
        "{v}"
    );
    let rows = v["critiques"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    // Each job's rate against the K = 1 job's.
    let rate = |r: &serde_json::Value| r["shared"]["tokens_per_s"].as_f64().unwrap();
    for row in rows {
        let want = rate(row) / rate(&rows[0]);
        let got = row["rate_vs_k1"].as_f64().unwrap();
        assert!((got - want).abs() <= 1e-9 * want, "{row}");
    }
    for (row, k) in rows.iter().zip([1, 3]) {
        assert_eq!(row["k"], k);
        let p = row["prefix_tokens"].as_u64().unwrap();
        assert!(
            (60..=70).contains(&p),
            "prefix of {p} tokens for a target of 70"
        );
        assert!(row["shared"]["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(row["unshared"]["seconds"].as_f64().unwrap() > 0.0);
        // Sharing allocates the prefix once; the baseline K times.
        let shared = row["shared"]["prefix_blocks_allocated"].as_u64().unwrap();
        let unshared = row["unshared"]["prefix_blocks_allocated"].as_u64().unwrap();
        assert!(
            unshared >= shared * k - k,
            "{shared} vs {unshared} at K={k}"
        );
    }
    assert_eq!(v["weight_dtype"], "bf16");
    assert_eq!(v["kv_cache"], "f32");
    assert!(v["quantize_ms"].is_null(), "{v}");
    assert!(v["q8_logits_rel_l2"].is_null() && v["q8_argmax_agreement"].is_null());
    // The machine: by default one thread per physical core, within the CPUs it may use.
    let m = &v["machine"];
    let logical = m["logical_cpus"].as_u64().unwrap();
    let threads = m["threads"].as_u64().unwrap();
    assert!((1..=logical).contains(&threads), "{m}");
    if let Some(cores) = m["physical_cores"].as_u64() {
        assert!((1..=logical).contains(&cores), "{m}");
        if std::env::var("CLOUDRM_THREADS").is_err() {
            assert_eq!(threads, cores, "{m}");
        }
    }
    // --quantize q8: 1.125 bytes per weight (norms stay bf16), quantisation timed.
    let q = bench_json(&[
        "--prefill",
        "8",
        "--decode",
        "2",
        "--k",
        "2",
        "--critique-tokens",
        "2",
        "--prefix",
        "20",
        "--no-unshared",
        "--bandwidth-mib",
        "0",
        "--quantize",
        "q8",
    ]);
    assert_eq!(q["weight_dtype"], "q8", "{q}");
    assert!(q["quantize_ms"].as_f64().unwrap() > 0.0, "{q}");
    // Auto leaves quantised weights where they are (they are copies already).
    assert!(
        q["huge_pages_route"].is_null() && q["huge_pages_auto"] == false,
        "{q}"
    );
    // What q8 costs, measured against the 16-bit model on a built-in text (4.3e-3 and
    // every argmax on the default model).
    let rel = q["q8_logits_rel_l2"].as_f64().unwrap();
    assert!(rel > 0.0 && rel < 1e-2, "{q}");
    assert!(q["q8_argmax_agreement"].as_f64().unwrap() >= 0.9, "{q}");
    let bytes = q["decode_weight_bytes_per_token"].as_u64().unwrap();
    let norms = 2 * (30 * 2 + 1) * 576;
    // Each layer matrix also keeps 16 input columns at 16 bits: 2 bytes per output row
    // and column, and the columns' u32 indices.
    let kept = 30 * (16 * 2 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576) + 7 * 16 * 4);
    assert_eq!(
        bytes,
        (269_030_016 - norms) / 2 * 9 / 8 + norms + kept,
        "{q}"
    );
    assert!(q["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    // --hugepages: the weights put on 2 MiB pages, the step timed and its route named;
    // same bytes per token. A bare --hugepages copies them; =cache maps the page cache
    // (then the mapping is on 2 MiB pages) unless it has to copy.
    for (flag, routes) in [
        ("--hugepages", &["copied"][..]),
        ("--hugepages=cache", &["page-cache", "reread", "copied"][..]),
    ] {
        let h = short_bench(flag);
        assert!(h["huge_pages_ms"].as_f64().unwrap() > 0.0, "{h}");
        let route = h["huge_pages_route"].as_str().unwrap();
        assert!(routes.contains(&route), "{flag}: {h}");
        assert_eq!(h["huge_pages_auto"], false, "{flag}: {h}");
        if route != "copied" {
            assert!(h["weights_on_huge_pages"].as_f64().unwrap() > 0.9, "{h}");
        }
        assert_eq!(
            h["decode_weight_bytes_per_token"].as_u64(),
            Some(269_030_016)
        );
    }
    // An unknown way is a usage error naming the ones there are.
    let out = cloudrm()
        .args(["bench", "--hugepages=fast"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("copy") && stderr.contains("cache"),
        "stderr: {stderr}"
    );
    // Without the flag (auto) the bench, a decoding job, copies the weights to 2 MiB
    // pages where the copy fits in half the available memory (Linux); `off` keeps
    // the mapping.
    if v["huge_pages_route"].is_null() {
        assert!(
            v["huge_pages_ms"].is_null() && v["huge_pages_auto"] == false,
            "{v}"
        );
    } else {
        assert_eq!(v["huge_pages_route"], "copied", "{v}");
        assert!(v["huge_pages_ms"].as_f64().unwrap() > 0.0, "{v}");
        assert_eq!(v["huge_pages_auto"], true, "{v}");
    }
    if cfg!(target_os = "linux") {
        // This machine has the memory (the model is 257 MiB), so auto copied.
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let avail = cloudrm::loader::pages::kb_field(&meminfo, "MemAvailable:").unwrap_or(0);
        if avail > 4 << 30 {
            assert_eq!(v["huge_pages_route"], "copied", "{v}");
        }
    }
    let off = short_bench("--hugepages=off");
    assert!(
        off["huge_pages_ms"].is_null()
            && off["huge_pages_route"].is_null()
            && off["huge_pages_auto"] == false,
        "{off}"
    );
    // Reported with or without --hugepages (Linux reads it from /proc).
    if cfg!(target_os = "linux") {
        let f = v["weights_on_huge_pages"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&f), "{v}");
    }
    // ... and it does not combine with --quantize: a usage error naming both.
    let out = cloudrm()
        .args(["bench", "--hugepages", "--quantize", "q8"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--hugepages") && stderr.contains("--quantize"),
        "stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    // `--k` with no value skips the critique job.
    let e = bench_json(&[
        "--prefill",
        "8",
        "--decode",
        "2",
        "--bandwidth-mib",
        "0",
        "--k",
    ]);
    assert_eq!(e["critiques"].as_array().map(Vec::len), Some(0), "{e}");
    // --kv-cache f16: the same figures over an f16 cache, named in the report.
    let f = bench_json(&[
        "--prefill",
        "20",
        "--decode",
        "2",
        "--k",
        "2",
        "--critique-tokens",
        "2",
        "--prefix",
        "20",
        "--no-unshared",
        "--bandwidth-mib",
        "0",
        "--kv-cache",
        "f16",
    ]);
    assert_eq!(f["kv_cache"], "f16", "{f}");
    assert!(f["decode_after_prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(
        f["critiques"][0]["shared"]["tokens_per_s"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // Without a K = 1 job there is no rate to compare with.
    assert!(f["critiques"][0]["rate_vs_k1"].is_null(), "{f}");
    // Bad arguments are a usage error, not a panic.
    let out = cloudrm()
        .args(["bench", "--quantize", "q4"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("q8"), "stderr: {stderr}");
    // Bad arguments are a usage error, not a panic.
    let out = cloudrm().args(["bench", "--k", "0"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("positive"), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
}

/// Stage (c)'s model shape: a config.json that does not exist is refused before anything
/// runs, with the path named; the built-in shape's plans pass the launch checks (dry run).
#[test]
fn gpu_check_random_weights_config_is_checked_first() {
    let dir = temp_dir("cli-gpu-check-c");
    let out = cloudrm()
        .args(["gpu-check", "--dry-run", "--random-weights"])
        .arg(dir.join("missing").join("config.json"))
        .arg("--out")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("config.json"), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    let log = dry_run_log(&["--filter", "c bench"], &dir.join("out"));
    assert!(log.contains("[PASS] c bench(plans)"), "{log}");
    std::fs::remove_dir_all(dir).ok();
}

/// `cloudrm gpu-check --dry-run ARGS --out OUT`, which must succeed; its log.
fn dry_run_log(args: &[&str], out: &Path) -> String {
    let run = cloudrm()
        .args(["gpu-check", "--dry-run"])
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    std::fs::read_to_string(out.join("gpu-check.log")).unwrap()
}

/// Stage (b)'s scorer check: without `--tokenizer` it is skipped and says so; with the
/// default model's tokenizer its CPU half runs (the CPU scorer on a random model) in a
/// dry run; a folder without tokenizer files is a failed check naming the problem.
#[test]
fn gpu_check_scorer_stage_takes_a_tokenizer() {
    let dir = temp_dir("cli-gpu-check-scorer");
    let tok = default_model(OutDtype::BF16);
    let log = dry_run_log(&["--quick", "--stages", "b"], &dir.join("out"));
    assert!(
        log.contains("cloud_scorer: skipped (no --tokenizer DIR)"),
        "{log}"
    );
    let tok_arg = tok.to_str().unwrap();
    let log = dry_run_log(
        &[
            "--quick",
            "--stages",
            "b",
            "--filter",
            "scorer",
            "--tokenizer",
            tok_arg,
        ],
        &dir.join("out"),
    );
    for op in [
        "classic reward",
        "greedy critique",
        "critique reward",
        "sampled K=3",
    ] {
        assert!(
            log.contains(&format!("[PASS] b cloud_scorer({op})")),
            "{log}"
        );
    }
    let empty = dir.join("no-tokenizer");
    std::fs::create_dir_all(&empty).unwrap();
    let out = cloudrm()
        .args([
            "gpu-check",
            "--dry-run",
            "--quick",
            "--stages",
            "b",
            "--filter",
            "scorer",
        ])
        .arg("--tokenizer")
        .arg(&empty)
        .arg("--out")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let log = std::fs::read_to_string(dir.join("out").join("gpu-check.log")).unwrap();
    assert!(
        log.contains("[FAIL] b cloud_scorer") && log.contains("tokenizer"),
        "{log}"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// `--stages` takes letters of "abc": anything else is refused before anything runs,
/// naming the flag; a valid subset runs only its stages (dry run).
#[test]
fn gpu_check_stages_are_checked() {
    let dir = temp_dir("cli-gpu-check-stages");
    for bad in ["xz", "aa", ""] {
        let out = cloudrm()
            .args([
                "gpu-check",
                "--dry-run",
                "--quick",
                "--stages",
                bad,
                "--out",
            ])
            .arg(dir.join("out"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "--stages {bad:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--stages"), "stderr: {stderr}");
        assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    }
    let log = dry_run_log(&["--quick", "--stages", "b"], &dir.join("out"));
    assert!(log.contains("] b llama_prefill"), "{log}");
    assert!(!log.contains("] a "), "{log}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn gpu_check_without_cuda_fails_fast_with_a_typed_error() {
    let dir = temp_dir("cli-gpu-check").join("out");
    let start = std::time::Instant::now();
    let out = cloudrm()
        .args(["gpu-check", "--quick", "--out"])
        .arg(&dir)
        // The no-GPU path, also on a GPU machine.
        .env("CLOUDRM_NO_CUDA", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(start.elapsed().as_secs() < 30, "took {:?}", start.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CUDA driver is not available"),
        "stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    let log = std::fs::read_to_string(dir.join("gpu-check.log")).unwrap();
    assert!(log.contains("CUDA unavailable"), "{log}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.first().unwrap()["pass"], false);
    assert_eq!(lines.last().unwrap()["stage"], "summary");
    assert_eq!(lines.last().unwrap()["failed"], 1);
    // A rerun overwrites its own files.
    let again = cloudrm()
        .args(["gpu-check", "--out"])
        .arg(&dir)
        .env("CLOUDRM_NO_CUDA", "1")
        .output()
        .unwrap();
    assert!(!again.status.success());
    let n = std::fs::read_to_string(dir.join("results.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(n, lines.len());
    std::fs::remove_dir_all(dir.parent().unwrap()).ok();
}
