//! `cloudrm gpu-check`: every CUDA op against the CPU scalar reference, on the GPU
//! machine, in one run (scripts/gpu-check.sh).
//!
//! Stage (a): each kernel entry point and the cuBLAS GEMM on seeded random inputs of odd
//! sizes. Inputs are rounded to bf16 once and the same values feed both sides (the
//! reference reads the bf16 as f32); the reference runs in the same process. Metric:
//! relative L2 error ||gpu - ref|| / ||ref|| < 1e-2 (DESIGN.md: bf16-compute paths);
//! NaN or Inf never passes; ids (argmax, embedding errors) must match exactly.
//!
//! Output, in `--out DIR` (created; our two files overwritten, so reruns are safe):
//! `gpu-check.log` (the human log, also echoed to stderr) and `results.jsonl` (one JSON
//! object per check, appended and flushed as it finishes: stage, op, shape, metric,
//! value, threshold, pass, ms; then a summary line). The run fails (non-zero exit) when a
//! check fails or CUDA cannot be opened; without CUDA it stops at once with the typed
//! error.

use std::fs::File;
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::Instant;

use cloudrm_kernels::Weights;
use cloudrm_kernels::cuda::{CudaDevice, CudaError, Kernel, PlanOptions, WorkPlan};
use cloudrm_kernels::reference::attention_paged::{self as refattn, Level, PagedShape};
use cloudrm_kernels::reference::heads::{RewardHeadWeights, reward_head_forward};
use cloudrm_kernels::reference::{embedding, matmul, residual, rmsnorm, rope, swiglu};
use half::bf16;
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// Relative L2 threshold of bf16-compute paths (DESIGN.md).
pub const REL_L2_BF16: f64 = 1e-2;
/// Relative L2 threshold of f32 outputs computed in f32 (the residual stream).
pub const REL_L2_F32: f64 = 1e-5;

#[derive(Debug, Clone)]
pub struct Options {
    pub out: PathBuf,
    pub quick: bool,
    pub seed: u64,
    /// Host side only (inputs, plans, CPU references), no device: tests the harness
    /// itself on a machine without a GPU.
    pub dry_run: bool,
    /// Run only the checks whose "stage op shape" text contains this.
    pub filter: Option<String>,
    /// Stage (c), the benchmark on a random-weight model (skipped with `--quick`).
    pub bench: Option<crate::gpu_bench::BenchSpec>,
    /// Which stages run.
    pub stages: Stages,
    /// Append to the two output files instead of replacing them (one file set for the
    /// stages that scripts/gpu-check.sh runs in separate processes).
    pub append: bool,
    /// A directory with the default model's tokenizer.json and tokenizer_config.json:
    /// stage (b) then also holds the GPU scorer (`--device cuda`) to the CPU scorer.
    pub tokenizer: Option<PathBuf>,
}

/// The stages of one run (`--stages`, a subset of `abc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stages {
    pub a: bool,
    pub b: bool,
    pub c: bool,
}

impl Stages {
    pub const ALL: Stages = Stages {
        a: true,
        b: true,
        c: true,
    };

    /// `abc`, `a`, `bc`, ...: each letter once at most, at least one.
    pub fn parse(s: &str) -> Result<Stages> {
        let mut st = Stages {
            a: false,
            b: false,
            c: false,
        };
        for ch in s.chars() {
            let slot = match ch {
                'a' => &mut st.a,
                'b' => &mut st.b,
                'c' => &mut st.c,
                _ => {
                    return Err(Error::Usage(format!(
                        "--stages {s:?}: '{ch}' is not a stage (use letters of \"abc\")"
                    )));
                }
            };
            if *slot {
                return Err(Error::Usage(format!(
                    "--stages {s:?}: stage '{ch}' is named twice"
                )));
            }
            *slot = true;
        }
        if st
            == (Stages {
                a: false,
                b: false,
                c: false,
            })
        {
            return Err(Error::Usage(
                "--stages is empty (use letters of \"abc\")".into(),
            ));
        }
        Ok(st)
    }

    fn text(self) -> String {
        [(self.a, 'a'), (self.b, 'b'), (self.c, 'c')]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, c)| *c)
            .collect()
    }
}

/// Counts of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    pub passed: usize,
    pub failed: usize,
}

/// The result of one comparison.
struct Outcome {
    metric: &'static str,
    value: f64,
    threshold: f64,
    pass: bool,
    /// GPU time of the op (launch to synchronised), ms.
    ms: f64,
}

impl Outcome {
    fn rel_l2(value: f64, threshold: f64, ms: f64) -> Outcome {
        Outcome {
            metric: "rel_l2",
            value,
            threshold,
            pass: value.is_finite() && value < threshold,
            ms,
        }
    }

    /// A dry run's outcome: the host side ran, nothing was compared.
    fn dry() -> Outcome {
        Outcome {
            metric: "dry",
            value: 0.0,
            threshold: 0.0,
            pass: true,
            ms: 0.0,
        }
    }

    fn exact(mismatches: usize, ms: f64) -> Outcome {
        Outcome {
            metric: "mismatches",
            value: mismatches as f64,
            threshold: 0.0,
            pass: mismatches == 0,
            ms,
        }
    }

    /// The worse of two outcomes (both must pass).
    fn and(self, other: Outcome) -> Outcome {
        if !self.pass || other.pass && self.value >= other.value {
            Outcome {
                ms: self.ms.max(other.ms),
                ..self
            }
        } else {
            Outcome {
                ms: self.ms.max(other.ms),
                ..other
            }
        }
    }
}

/// ||got - want|| / ||want||; infinite when `got` holds a NaN or an infinity.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() || got.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        let d = g as f64 - w as f64;
        num += d * d;
        den += w as f64 * w as f64;
    }
    if den == 0.0 {
        if num == 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        (num / den).sqrt()
    }
}

/// SplitMix64: small, seeded, the same stream on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn f32s(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.unit() * scale).collect()
    }

    /// bf16 values and the same values as f32.
    fn bf16s(&mut self, n: usize, scale: f32, offset: f32) -> (Vec<bf16>, Vec<f32>) {
        let b: Vec<bf16> = (0..n)
            .map(|_| bf16::from_f32(self.unit() * scale + offset))
            .collect();
        let f = b.iter().map(|x| x.to_f32()).collect();
        (b, f)
    }

    /// A permutation of 0..n (scattered block ids).
    fn perm(&mut self, n: usize) -> Vec<u32> {
        let mut v: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
        v
    }
}

fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// The two output files and the running counts.
struct Log {
    text: File,
    jsonl: File,
    report: Report,
    /// Only checks whose "stage op shape" contains this run.
    filter: Option<String>,
}

impl Log {
    fn create(dir: &Path, append: bool) -> Result<Log> {
        let io = |p: &Path| {
            let context = format!("gpu-check: creating {}", p.display());
            move |source| Error::Io { context, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let t = dir.join("gpu-check.log");
        let j = dir.join("results.jsonl");
        let open = |p: &Path| {
            let mut o = std::fs::OpenOptions::new();
            if append {
                o.append(true).create(true);
            } else {
                o.write(true).create(true).truncate(true);
            }
            o.open(p).map_err(io(p))
        };
        Ok(Log {
            text: open(&t)?,
            jsonl: open(&j)?,
            report: Report::default(),
            filter: None,
        })
    }

    /// A line of the human log (also to stderr). Write errors to the log are ignored:
    /// the JSON file and the exit status still tell the result.
    fn line(&mut self, s: &str) {
        eprintln!("{s}");
        let _ = writeln!(self.text, "{s}");
        let _ = self.text.flush();
    }

    fn wants(&self, stage: &str, op: &str, shape: &str) -> bool {
        self.filter
            .as_deref()
            .is_none_or(|f| format!("{stage} {op} {shape}").contains(f))
    }

    /// Notes in the text log (not on stderr) that a check starts, so a crash or a hang
    /// inside it can be located.
    fn running(&mut self, stage: &str, op: &str, shape: &str) {
        let _ = writeln!(self.text, "       {stage} {op:<32} {shape:<48} running");
        let _ = self.text.flush();
    }

    /// Runs one check (unless filtered out) and records it; a panic in it is a failure.
    fn check(&mut self, stage: &str, op: &str, shape: &str, f: impl FnOnce() -> CheckResult) {
        if !self.wants(stage, op, shape) {
            return;
        }
        self.running(stage, op, shape);
        let r = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(panicked(p)));
        self.record(stage, op, shape, r);
    }

    /// A stage (c) benchmark result (counted as passed when it ran).
    fn bench(&mut self, r: std::result::Result<crate::gpu_bench::BenchRecord, CudaError>) {
        match r {
            Ok(b) => {
                self.report.passed += 1;
                let unit = b
                    .extra
                    .get("metric")
                    .and_then(|m| m.as_str())
                    .unwrap_or("tokens/s")
                    .to_string();
                self.line(&format!(
                    "[BENCH] c {:<32} {:<48} {:.1} {unit} {}",
                    b.op, b.shape, b.value, b.extra
                ));
                let mut v = json!({
                    "stage": "c", "op": b.op, "shape": b.shape, "metric": unit,
                    "value": b.value, "pass": true,
                });
                if let (Some(o), Value::Object(extra)) = (v.as_object_mut(), b.extra) {
                    for (k, x) in extra {
                        o.entry(k).or_insert(x);
                    }
                }
                self.json(&v);
            }
            Err(e) => self.record("c", "bench", "", Err(e)),
        }
    }

    fn json(&mut self, v: &Value) {
        let _ = writeln!(self.jsonl, "{v}");
        let _ = self.jsonl.flush();
    }

    fn record(
        &mut self,
        stage: &str,
        op: &str,
        shape: &str,
        r: std::result::Result<Outcome, CudaError>,
    ) {
        match r {
            Ok(o) => {
                if o.pass {
                    self.report.passed += 1;
                } else {
                    self.report.failed += 1;
                }
                let value = if o.metric == "dry" {
                    "dry run".to_string()
                } else if o.metric == "mismatches" {
                    format!("mismatches={}", o.value)
                } else {
                    format!("{}={:.3e} (< {:.0e})", o.metric, o.value, o.threshold)
                };
                self.line(&format!(
                    "[{}] {stage} {op:<32} {shape:<48} {value} {:.3} ms",
                    if o.pass { "PASS" } else { "FAIL" },
                    o.ms
                ));
                self.json(&json!({
                    "stage": stage, "op": op, "shape": shape, "metric": o.metric,
                    "value": o.value, "threshold": o.threshold, "pass": o.pass, "ms": o.ms,
                }));
            }
            Err(e) => {
                self.report.failed += 1;
                self.line(&format!("[FAIL] {stage} {op:<32} {shape:<48} error: {e}"));
                self.json(&json!({
                    "stage": stage, "op": op, "shape": shape, "pass": false,
                    "error": e.to_string(),
                }));
            }
        }
    }
}

/// Runs the whole check; Ok when every check passed.
pub fn run(opts: &Options) -> Result<Report> {
    let mut log = Log::create(&opts.out, opts.append)?;
    log.filter = opts.filter.clone();
    let started = Instant::now();
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    log.line(&format!(
        "cloudrm {} gpu-check: stages {} seed {} quick {} unix time {unix}",
        env!("CARGO_PKG_VERSION"),
        opts.stages.text(),
        opts.seed,
        opts.quick
    ));
    if opts.dry_run {
        log.line("dry run: inputs, plans and CPU references only; nothing runs on a GPU");
        let mut ck = Checks {
            dev: None,
            rng: Rng(opts.seed ^ 0x5eed),
            quick: opts.quick,
            tokenizer: opts.tokenizer.clone(),
        };
        if opts.stages.a {
            ck.stage_a(&mut log);
        }
        if opts.stages.b {
            ck.stage_b(&mut log);
        }
        if let Some(spec) = &opts.bench
            && opts.stages.c
            && log.wants("c", "bench", &spec.name)
        {
            let r = crate::gpu_bench::dry_plans(spec).map(|_| Outcome::dry());
            log.record("c", "bench(plans)", &spec.name, r);
        }
        return finish(&mut log, opts, started, "dry run");
    }
    let dev = match CudaDevice::open(0) {
        Ok(d) => d,
        Err(e) => {
            log.line(&format!("CUDA unavailable: {e}"));
            log.json(
                &json!({"stage": "open", "op": "open", "pass": false, "error": e.to_string()}),
            );
            log.json(&json!({"stage": "summary", "passed": 0, "failed": 1, "total": 1}));
            return Err(Error::Cuda(e));
        }
    };
    let info = dev.info().clone();
    let cublas = dev.cublas_version();
    log.line(&format!(
        "device 0: {} (sm_{}{}, {} SMs, {:.1} GiB), driver {} ({}), NVRTC {}, cuBLAS {}, kernels built for {}",
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.multiprocessors,
        info.total_mem_bytes as f64 / (1u64 << 30) as f64,
        info.driver_version_text(),
        info.driver_version,
        info.nvrtc_version_text(),
        match &cublas {
            Ok(v) => v.to_string(),
            Err(e) => format!("unavailable ({e})"),
        },
        info.arch.compute(),
    ));
    log.json(&json!({
        "stage": "device", "name": info.name,
        "compute_capability": format!("{}.{}", info.compute_capability.0, info.compute_capability.1),
        "multiprocessors": info.multiprocessors, "total_mem_bytes": info.total_mem_bytes,
        "driver_version": info.driver_version_text(), "nvrtc_version": info.nvrtc_version_text(),
        "cublas_version": cublas.as_ref().map(|v| v.to_string()).unwrap_or_else(|e| e.to_string()),
        "ptx_arch": info.arch.compute(), "seed": opts.seed, "quick": opts.quick,
    }));

    // Compile (or read from the PTX cache) and load every module first, timed per file.
    let mut files: Vec<&'static str> = Kernel::ALL.iter().map(|k| k.file()).collect();
    files.dedup();
    for f in files {
        let t = Instant::now();
        let r = dev.module(f).map(|_| Outcome::exact(0, ms(t)));
        log.record("load", f, "nvrtc+cuModuleLoadData", r);
    }
    for k in Kernel::ALL {
        if let Err(e) = dev.function(k) {
            log.record("load", k.name(), "cuModuleGetFunction", Err(e));
        }
    }

    let mut ck = Checks {
        dev: Some(&dev),
        rng: Rng(opts.seed ^ 0x5eed),
        quick: opts.quick,
        tokenizer: opts.tokenizer.clone(),
    };
    if opts.stages.a {
        ck.stage_a(&mut log);
    }
    if opts.stages.b {
        ck.stage_b(&mut log);
    }
    if let Some(spec) = &opts.bench
        && opts.stages.c
        && log.wants("c", "bench", &spec.name)
    {
        log.line(&format!(
            "stage c: {} with random bf16 weights generated on the device",
            spec.name
        ));
        let r = catch_unwind(AssertUnwindSafe(|| {
            crate::gpu_bench::run(&dev, spec, opts.seed, |r| log.bench(r))
        }));
        if let Err(p) = r {
            log.record("c", "bench", &spec.name, Err(panicked(p)));
        }
    }
    finish(&mut log, opts, started, &info.name)
}

/// The summary (log and JSON); an error when a check failed.
fn finish(log: &mut Log, opts: &Options, started: Instant, device: &str) -> Result<Report> {
    let r = log.report;
    let secs = started.elapsed().as_secs_f64();
    log.line(&format!(
        "summary: {} passed, {} failed, {} total in {secs:.1} s",
        r.passed,
        r.failed,
        r.passed + r.failed,
    ));
    log.json(&json!({
        "stage": "summary", "passed": r.passed, "failed": r.failed,
        "total": r.passed + r.failed, "device": device, "seconds": secs,
    }));
    if r.failed > 0 {
        return Err(Error::GpuCheckFailed {
            failed: r.failed,
            total: r.passed + r.failed,
            log: opts.out.join("gpu-check.log"),
        });
    }
    Ok(r)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

type CheckResult = std::result::Result<Outcome, CudaError>;

struct Checks<'d> {
    /// None in a dry run: inputs and CPU references only.
    dev: Option<&'d CudaDevice>,
    rng: Rng,
    quick: bool,
    /// See [`Options::tokenizer`].
    tokenizer: Option<PathBuf>,
}

/// Inputs and reference output of a prefill attention check.
struct PrefillCase {
    /// Blocks in the arenas.
    nb: usize,
    table: Vec<u32>,
    k: Vec<bf16>,
    v: Vec<bf16>,
    q: Vec<bf16>,
    want: Vec<f32>,
}

fn paged(nh: usize, nkv: usize, hs: usize, bs: usize) -> PagedShape {
    PagedShape {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hs,
        block_size: bs,
    }
}

fn inv_freq(hs: usize, theta: f64) -> Vec<f32> {
    (0..hs / 2)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / hs as f64)) as f32)
        .collect()
}

impl Checks<'_> {
    fn stage_a(&mut self, log: &mut Log) {
        let rows: &[usize] = &[1, 7, 33];
        for &c in &[576usize, 577] {
            for &t in rows {
                log.check(
                    "a",
                    "embedding_bf16",
                    &format!("T={t},C={c},V=1000"),
                    || self.embedding(t, c),
                );
            }
        }
        log.check(
            "a",
            "embedding_bf16(bad id)",
            "T=7,C=64,id 1000 at t=3",
            || self.embedding_bad_id(),
        );

        for &c in &[576usize, 577, 1025, 4096, 4100, 32772] {
            for &n in rows {
                log.check("a", "rmsnorm_bf16", &format!("rows={n},C={c}"), || {
                    self.rmsnorm(n, c)
                });
                log.check(
                    "a",
                    "residual_rmsnorm_bf16",
                    &format!("rows={n},C={c}"),
                    || self.residual_rmsnorm(n, c),
                );
            }
        }

        for (sh, what) in [
            (paged(9, 3, 64, 16), "prefill"),
            (paged(9, 3, 64, 16), "decode"),
            (paged(32, 8, 128, 16), "prefill"),
            (paged(32, 8, 128, 16), "decode"),
        ] {
            log.check(
                "a",
                "rope_qkv_paged_bf16",
                &format!(
                    "{what},NH={},NKV={},HS={}",
                    sh.n_heads, sh.n_kv_heads, sh.head_dim
                ),
                || self.rope(sh, what == "prefill"),
            );
        }

        let long = if self.quick { 129 } else { 577 };
        let decode_shapes = [
            paged(9, 3, 64, 16),
            paged(4, 4, 64, 16),
            paged(8, 1, 128, 16),
            paged(32, 8, 128, 16),
        ];
        for sh in decode_shapes {
            for lens in [
                vec![long],
                vec![1, 17, 0, 15, 16, long, 33],
                (0..33).map(|i| (i * 37) % (long + 1)).collect(),
            ] {
                log.check(
                    "a",
                    "paged_decode_attention",
                    &format!(
                        "NH={},NKV={},HS={},B={},max_len={}",
                        sh.n_heads,
                        sh.n_kv_heads,
                        sh.head_dim,
                        lens.len(),
                        lens.iter().max().unwrap_or(&0)
                    ),
                    || self.paged_decode(sh, &lens),
                );
            }
        }

        for sh in [
            paged(9, 3, 64, 16),
            paged(32, 8, 128, 16),
            paged(8, 1, 64, 16),
        ] {
            for (k, split) in [
                (3usize, None),
                (16, None),
                (16, Some(64usize)),
                (1, Some(32)),
            ] {
                log.check(
                    "a",
                    "attention_partial+merge(cascade)",
                    &format!(
                        "NH={},NKV={},HS={},K={k},prefix={long},split={split:?}",
                        sh.n_heads, sh.n_kv_heads, sh.head_dim
                    ),
                    || self.cascade(sh, k, long, split),
                );
            }
            log.check(
                "a",
                "attention_partial+merge(prefill)",
                &format!(
                    "NH={},NKV={},HS={},pos0=20,T=17",
                    sh.n_heads, sh.n_kv_heads, sh.head_dim
                ),
                || self.prefill(sh, 20, 17),
            );
        }
        log.check(
            "a",
            "attention_merge_states(empty)",
            "B=3,no positions",
            || self.cascade_all_empty(),
        );

        for &n in rows {
            for (inter, fused) in [(1536usize, true), (1536, false), (578, true)] {
                log.check(
                    "a",
                    "swiglu_bf16",
                    &format!("rows={n},I={inter},fused={fused}"),
                    || self.swiglu(n, inter, fused),
                );
            }
        }

        {
            use cloudrm_sampler::SamplingParams;
            let v = if self.quick { 4099 } else { 49152 };
            let base = SamplingParams::default();
            let cases: [(&str, SamplingParams); 6] = [
                ("greedy+penalty1.01", SamplingParams::cloud_critique()),
                ("T=0.5", SamplingParams::cloud_self_consistency(11)),
                (
                    "T=0.8,top_k=50",
                    SamplingParams {
                        temperature: 0.8,
                        top_k: 50,
                        seed: 12,
                        ..base.clone()
                    },
                ),
                (
                    "T=1,top_p=0.9",
                    SamplingParams {
                        temperature: 1.0,
                        top_p: 0.9,
                        seed: 13,
                        ..base.clone()
                    },
                ),
                (
                    "T=1,min_p=0.05,penalty=1.3",
                    SamplingParams {
                        temperature: 1.0,
                        min_p: 0.05,
                        repetition_penalty: 1.3,
                        seed: 14,
                        ..base.clone()
                    },
                ),
                (
                    "T=0.7,top_k=40,top_p=0.8,min_p=0.01,penalty=1.1",
                    SamplingParams {
                        temperature: 0.7,
                        top_k: 40,
                        top_p: 0.8,
                        min_p: 0.01,
                        repetition_penalty: 1.1,
                        seed: 15,
                        ..base.clone()
                    },
                ),
            ];
            for (name, params) in cases {
                log.check("a", "sample_f32", &format!("{name},V={v},rows=101"), || {
                    self.sample(params, 101, v)
                });
            }
        }

        for (n, seed) in [(1usize, 3u64), (1_000_003, 0x1234_5678_9abc_def0)] {
            log.check("a", "fill_uniform_bf16", &format!("n={n}"), || {
                self.fill_uniform(n, seed)
            });
        }

        for (rows_sel, ld) in [(None, 576usize), (Some(vec![5u32, 0, 2]), 640)] {
            log.check(
                "a",
                "reward_linear_bf16",
                &format!("C=576,ld={ld},rows={rows_sel:?}"),
                || self.reward_linear(rows_sel.clone(), ld),
            );
            log.check(
                "a",
                "reward_dense_tanh+out",
                &format!("C=576,ld={ld},rows={rows_sel:?}"),
                || self.reward_dense(rows_sel.clone(), ld),
            );
        }

        let v = if self.quick { 5000 } else { 49152 };
        log.check(
            "a",
            "argmax_f32",
            &format!("B=7,V={v},ties+NaN rows"),
            || self.argmax(7, v),
        );

        let mut gemms = vec![
            (1usize, 576usize, 576usize),
            (7, 1536, 576),
            (33, 576, 1536),
            (5, 17, 33),
        ];
        if !self.quick {
            gemms.push((7, 49152, 576));
        }
        for (m, n, k) in gemms {
            log.check(
                "a",
                "gemm_bf16(f32 out)",
                &format!("M={m},N={n},K={k}"),
                || self.gemm::<f32>(m, n, k),
            );
            log.check(
                "a",
                "gemm_bf16(bf16 out)",
                &format!("M={m},N={n},K={k}"),
                || self.gemm::<bf16>(m, n, k),
            );
        }

        // Last (a new kernel: a fault in it must not cost the checks above): the
        // tensor-core prefill (G must divide 16): Llama-3 (G = 4), a short prompt
        // after a cached prefix, a long one from 0 with a partial last query tile, G = 1
        // and G = 8 at HS 64.
        let long_t = if self.quick { 77 } else { 333 };
        for (sh, pos0, t) in [
            (paged(32, 8, 128, 16), 20usize, 17usize),
            (paged(32, 8, 128, 16), 0, long_t),
            (paged(4, 4, 64, 16), 5, 70),
            (paged(16, 2, 64, 16), 33, 41),
        ] {
            log.check(
                "a",
                "flash_prefill",
                &format!(
                    "NH={},NKV={},HS={},pos0={pos0},T={t}",
                    sh.n_heads, sh.n_kv_heads, sh.head_dim
                ),
                || self.flash_prefill(sh, pos0, t),
            );
        }
    }

    fn embedding(&mut self, t: usize, c: usize) -> CheckResult {
        let v = 1000;
        let (table, _) = self.rng.bf16s(v * c, 1.0, 0.0);
        let ids: Vec<u32> = (0..t).map(|_| self.rng.below(v) as u32).collect();
        let mut want = vec![0.0; t * c];
        embedding::embedding_forward(&mut want, &ids, Weights::BF16(&table), c)
            .map_err(kernel_err)?;
        let Some(d) = self.dev else {
            return Ok(Outcome::dry());
        };
        let table_d = d.upload(&table)?;
        let ids_d = d.upload_index(&ids)?;
        let mut out = d.alloc_zeros::<f32>(t * c)?;
        let t0 = Instant::now();
        d.embedding(&mut out, &table_d, &ids_d, c)?;
        d.synchronize()?;
        let ms = ms(t0);
        // A pure copy: exact.
        let got = d.download(&out)?;
        let mism = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        Ok(Outcome::exact(mism, ms))
    }

    /// The device-side bad-id path: zero row, flagged position; and the host check.
    fn embedding_bad_id(&mut self) -> CheckResult {
        let (c, v, t) = (64, 1000, 7);
        let (table, _) = self.rng.bf16s(v * c, 1.0, 0.0);
        let mut ids: Vec<u32> = (0..t).map(|_| self.rng.below(v) as u32).collect();
        ids[3] = v as u32;
        let Some(d) = self.dev else {
            return Ok(Outcome::dry());
        };
        let table_d = d.upload(&table)?;
        let ids_d = d.upload_index(&ids)?;
        let mut out = d.upload(&vec![7.0f32; t * c])?;
        let mut flag = d.alloc_zeros::<u32>(1)?;
        let t0 = Instant::now();
        d.embedding_flagged(&mut out, &table_d, &ids_d, c, &mut flag)?;
        d.synchronize()?;
        let ms = ms(t0);
        let mut mism = 0;
        match d.embedding_error(&flag, v) {
            Err(CudaError::TokenOutOfRange { position: 3, .. }) => {}
            _ => mism += 1,
        }
        let got = d.download(&out)?;
        mism += got[3 * c..4 * c].iter().filter(|&&x| x != 0.0).count();
        // The checked wrapper refuses before launching.
        if !matches!(
            d.embedding(&mut out, &table_d, &ids_d, c),
            Err(CudaError::TokenOutOfRange { position: 3, .. })
        ) {
            mism += 1;
        }
        Ok(Outcome::exact(mism, ms))
    }

    fn rmsnorm(&mut self, n: usize, c: usize) -> CheckResult {
        let x = self.rng.f32s(n * c, 3.0);
        let (w, _) = self.rng.bf16s(c, 0.5, 1.0);
        let eps = 1e-5;
        let mut want = vec![0.0; n * c];
        rmsnorm::rmsnorm_forward(&mut want, &x, Weights::BF16(&w), eps).map_err(kernel_err)?;
        let Some(d) = self.dev else {
            return Ok(Outcome::dry());
        };
        let (x_d, w_d) = (d.upload(&x)?, d.upload(&w)?);
        let mut out = d.alloc_zeros::<bf16>(n * c)?;
        let t0 = Instant::now();
        d.rmsnorm(&mut out, &x_d, &w_d, eps)?;
        d.synchronize()?;
        let ms = ms(t0);
        let got = to_f32(&d.download(&out)?);
        Ok(Outcome::rel_l2(rel_l2(&got, &want), REL_L2_BF16, ms))
    }

    fn residual_rmsnorm(&mut self, n: usize, c: usize) -> CheckResult {
        let resid = self.rng.f32s(n * c, 2.0);
        let (delta, delta_f) = self.rng.bf16s(n * c, 1.0, 0.0);
        let (w, _) = self.rng.bf16s(c, 0.5, 1.0);
        let eps = 1e-5;
        let mut want_resid = resid.clone();
        residual::residual_forward(&mut want_resid, &delta_f).map_err(kernel_err)?;
        let mut want = vec![0.0; n * c];
        rmsnorm::rmsnorm_forward(&mut want, &want_resid, Weights::BF16(&w), eps)
            .map_err(kernel_err)?;
        let Some(d) = self.dev else {
            return Ok(Outcome::dry());
        };
        let mut r_d = d.upload(&resid)?;
        let (delta_d, w_d) = (d.upload(&delta)?, d.upload(&w)?);
        let mut out = d.alloc_zeros::<bf16>(n * c)?;
        let t0 = Instant::now();
        d.residual_rmsnorm(&mut r_d, &delta_d, &mut out, &w_d, eps)?;
        d.synchronize()?;
        let ms = ms(t0);
        let got = to_f32(&d.download(&out)?);
        let got_resid = d.download(&r_d)?;
        Ok(
            Outcome::rel_l2(rel_l2(&got, &want), REL_L2_BF16, ms).and(Outcome::rel_l2(
                rel_l2(&got_resid, &want_resid),
                REL_L2_F32,
                ms,
            )),
        )
    }

    /// Prefill: one sequence, 17 tokens from position 5 (crossing blocks). Decode: 7
    /// sequences, one token each, at positions up to 100 000 (sincos precision).
    fn rope(&mut self, sh: PagedShape, prefill: bool) -> CheckResult {
        let (nh, nkv, hs, bs) = (sh.n_heads, sh.n_kv_heads, sh.head_dim, sh.block_size);
        let (positions, token_seq, ld_table, tables, nb): (
            Vec<u32>,
            Vec<u32>,
            usize,
            Vec<u32>,
            usize,
        ) = if prefill {
            let t = 17;
            let pos: Vec<u32> = (5..5 + t as u32).collect();
            let nb = 4;
            let tables = self.rng.perm(nb);
            (pos, vec![0; t], nb, tables, nb)
        } else {
            let pos: Vec<u32> = vec![0, 1, 15, 16, 577, 4097, 100_000];
            let b = pos.len();
            let ld = 100_000 / bs + 1;
            let nb = b + 1;
            let ids = self.rng.perm(nb);
            // Each row maps its token's block to its own id; the rest point at id 0
            // of the permutation's last entry (never written).
            let mut tables = vec![ids[b]; b * ld];
            for (s, &p) in pos.iter().enumerate() {
                tables[s * ld + p as usize / bs] = ids[s];
            }
            (pos, (0..b as u32).collect(), ld, tables, nb)
        };
        let t = positions.len();
        let ld_qkv = (nh + 2 * nkv) * hs;
        let (qkv, qkv_f) = self.rng.bf16s(t * ld_qkv, 2.0, 0.0);
        let arena_len = nb * sh.block_elems();
        let (k0, k0_f) = self.rng.bf16s(arena_len, 1.0, 0.0);
        let (v0, v0_f) = self.rng.bf16s(arena_len, 1.0, 0.0);
        let freq = inv_freq(hs, 100_000.0);

        // Reference: rotate Q and K rows, place K and V at each token's slot.
        let mut want_q = vec![0.0; t * nh * hs];
        let (mut want_k, mut want_v) = (k0_f.clone(), v0_f.clone());
        let mut touched = vec![false; arena_len];
        for i in 0..t {
            let row = &qkv_f[i * ld_qkv..(i + 1) * ld_qkv];
            let mut q = row[..nh * hs].to_vec();
            let mut k = row[nh * hs..(nh + nkv) * hs].to_vec();
            rope::rope_forward(&mut q, &positions[i..i + 1], nh, hs, &freq).map_err(kernel_err)?;
            rope::rope_forward(&mut k, &positions[i..i + 1], nkv, hs, &freq).map_err(kernel_err)?;
            want_q[i * nh * hs..(i + 1) * nh * hs].copy_from_slice(&q);
            let p = positions[i] as usize;
            let s = token_seq[i] as usize;
            let block = tables[s * ld_table + p / bs] as usize;
            let off = (block * bs + p % bs) * nkv * hs;
            want_k[off..off + nkv * hs].copy_from_slice(&k);
            want_v[off..off + nkv * hs].copy_from_slice(&row[(nh + nkv) * hs..]);
            touched[off..off + nkv * hs]
                .iter_mut()
                .for_each(|x| *x = true);
        }

        let Some(d) = self.dev else {
            return Ok(Outcome::dry());
        };
        let qkv_d = d.upload(&qkv)?;
        let (mut k_d, mut v_d) = (d.upload(&k0)?, d.upload(&v0)?);
        let mut q_d = d.alloc_zeros::<bf16>(t * nh * hs)?;
        let pos_d = d.upload_index(&positions)?;
        let seq_d = d.upload_index(&token_seq)?;
        let tab_d = d.upload_index(&tables)?;
        let freq_d = d.upload(&freq)?;
        let t0 = Instant::now();
        d.rope_qkv_paged(
            &mut q_d, &mut k_d, &mut v_d, &qkv_d, &pos_d, &seq_d, &tab_d, ld_table, &freq_d,
            ld_qkv, sh,
        )?;
        d.synchronize()?;
        let ms = ms(t0);
        let got_q = to_f32(&d.download(&q_d)?);
        let got_k = to_f32(&d.download(&k_d)?);
        let got_v = to_f32(&d.download(&v_d)?);
        let pick = |a: &[f32]| -> Vec<f32> {
            a.iter()
                .zip(&touched)
                .filter(|(_, t)| **t)
                .map(|(x, _)| *x)
                .collect()
        };
        // Rows not written must be untouched, bit for bit.
        let untouched_diff = (0..arena_len)
            .filter(|&i| !touched[i] && (got_k[i] != want_k[i] || got_v[i] != want_v[i]))
            .count();
        Ok(Outcome::rel_l2(rel_l2(&got_q, &want_q), REL_L2_BF16, ms)
            .and(Outcome::rel_l2(
                rel_l2(&pick(&got_k), &pick(&want_k)),
                REL_L2_BF16,
                ms,
            ))
            .and(Outcome::exact(
                untouched_diff + (pick(&got_v) != pick(&want_v)) as usize,
                ms,
            )))
    }

    /// Random K/V arenas of `nb` blocks (bf16 and the same as f32).
    #[allow(clippy::type_complexity)]
    fn arenas(&mut self, sh: &PagedShape, nb: usize) -> (Vec<bf16>, Vec<f32>, Vec<bf16>, Vec<f32>) {
        let n = nb * sh.block_elems();
        let (k, kf) = self.rng.bf16s(n, 1.0, 0.0);
        let (v, vf) = self.rng.bf16s(n, 1.0, 0.0);
        (k, kf, v, vf)
    }

    fn paged_decode(&mut self, sh: PagedShape, lens: &[usize]) -> CheckResult {
        let b = lens.len();
        let bs = sh.block_size;
        let ld = lens
            .iter()
            .map(|l| l.div_ceil(bs))
            .max()
            .unwrap_or(0)
            .max(1);
        let nb: usize = lens.iter().map(|l| l.div_ceil(bs)).sum::<usize>().max(1);
        let ids = self.rng.perm(nb);
        let mut tables = vec![0u32; b * ld];
        let mut next = 0;
        for (s, l) in lens.iter().enumerate() {
            for j in 0..l.div_ceil(bs) {
                tables[s * ld + j] = ids[next];
                next += 1;
            }
        }
        let (k, kf, v, vf) = self.arenas(&sh, nb);
        let width = sh.n_heads * sh.head_dim;
        let (q, qf) = self.rng.bf16s(b * width, 4.0, 0.0);
        let mut want = vec![0.0; b * width];
        let rows: Vec<&[u32]> = (0..b).map(|s| &tables[s * ld..(s + 1) * ld]).collect();
        let mut scores = vec![0.0; lens.iter().copied().max().unwrap_or(0).max(1)];
        refattn::paged_decode_attention(&mut want, &qf, &kf, &vf, &rows, lens, sh, &mut scores)
            .map_err(kernel_err)?;
        let Some(d) = self.dev else {
            return Ok(Outcome::dry());
        };
        let (q_d, k_d, v_d) = (d.upload(&q)?, d.upload(&k)?, d.upload(&v)?);
        let tab_d = d.upload_index(&tables)?;
        let lens_u: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
        let lens_d = d.upload_index(&lens_u)?;
        let mut out = d.upload(&vec![bf16::from_f32(f32::NAN); b * width])?;
        let t0 = Instant::now();
        d.paged_decode_attention(&mut out, &q_d, &k_d, &v_d, &tab_d, ld, &lens_d, sh)?;
        d.synchronize()?;
        let ms = ms(t0);
        let got = to_f32(&d.download(&out)?);
        Ok(Outcome::rel_l2(rel_l2(&got, &want), REL_L2_BF16, ms))
    }

    /// A CLoud step: K critiques share a prompt of `prefix` positions; two responses
    /// (the first and second half of the critiques) each add a level; every critique has
    /// its own suffix (lengths 0, 1, BS, ...).
    fn cascade(
        &mut self,
        sh: PagedShape,
        k: usize,
        prefix: usize,
        split: Option<usize>,
    ) -> CheckResult {
        let bs = sh.block_size;
        let half = k.div_ceil(2);
        let mut parts: Vec<(usize, std::ops::Range<usize>)> =
            vec![(prefix, 0..k), (bs + 3, 0..half), (2 * bs - 1, half..k)];
        let suffix: Vec<usize> = (0..k).map(|i| [0, 1, bs, 2 * bs + 5, 33][i % 5]).collect();
        parts.extend(suffix.iter().enumerate().map(|(i, &l)| (l, i..i + 1)));
        let nb: usize = parts
            .iter()
            .map(|(l, _)| l.div_ceil(bs))
            .sum::<usize>()
            .max(1);
        let ids = self.rng.perm(nb);
        let mut next = 0;
        let tables: Vec<Vec<u32>> = parts
            .iter()
            .map(|(l, _)| {
                let t = ids[next..next + l.div_ceil(bs)].to_vec();
                next += t.len();
                t
            })
            .collect();
        let levels: Vec<Level<'_>> = parts[..3]
            .iter()
            .zip(&tables)
            .map(|((l, m), t)| Level {
                block_table: t,
                len: *l,
                members: m.clone(),
            })
            .collect();
        let suffix_tables: Vec<&[u32]> = tables[3..].iter().map(|t| &t[..]).collect();
        let (kk, kf, vv, vf) = self.arenas(&sh, nb);
        let width = sh.n_heads * sh.head_dim;
        let (q, qf) = self.rng.bf16s(k * width, 4.0, 0.0);
        let max_len = parts.iter().map(|(l, _)| *l).max().unwrap_or(0);
        let mut want = vec![0.0; k * width];
        let mut scratch = vec![0.0; refattn::cascade_scratch_len(&sh, k, max_len)];
        refattn::cascade_decode_attention(
            &mut want,
            &qf,
            &kf,
            &vf,
            &levels,
            &suffix_tables,
            &suffix,
            sh,
            &mut scratch,
        )
        .map_err(kernel_err)?;
        let plan = WorkPlan::cascade(
            &levels,
            &suffix_tables,
            &suffix,
            &sh,
            nb,
            PlanOptions {
                split,
                ..PlanOptions::default()
            },
        )?;
        self.run_plan(plan, &q, &kk, &vv, sh, &want)
    }

    /// Random inputs of a causal prefill of `t` tokens at `pos0` (a scattered block
    /// table, both arenas, the queries) and the reference output.
    fn prefill_case(
        &mut self,
        sh: PagedShape,
        pos0: usize,
        t: usize,
    ) -> Result<PrefillCase, CudaError> {
        let nb = (pos0 + t).div_ceil(sh.block_size);
        let table = self.rng.perm(nb);
        let (k, kf, v, vf) = self.arenas(&sh, nb);
        let width = sh.n_heads * sh.head_dim;
        let (q, qf) = self.rng.bf16s(t * width, 4.0, 0.0);
        let mut want = vec![0.0; t * width];
        let mut scratch = vec![0.0; refattn::prefill_scratch_len(&sh, pos0, t)];
        refattn::paged_prefill_attention(&mut want, &qf, &kf, &vf, &table, pos0, sh, &mut scratch)
            .map_err(kernel_err)?;
        Ok(PrefillCase {
            nb,
            table,
            k,
            v,
            q,
            want,
        })
    }

    fn prefill(&mut self, sh: PagedShape, pos0: usize, t: usize) -> CheckResult {
        let PrefillCase {
            nb,
            table,
            k: kk,
            v: vv,
            q,
            want,
        } = self.prefill_case(sh, pos0, t)?;
        let plan = WorkPlan::causal_prefill(
            &table,
            pos0,
            t,
            &sh,
            nb,
            PlanOptions {
                split: Some(32),
                ..PlanOptions::default()
            },
        )?;
        self.run_plan(plan, &q, &kk, &vv, sh, &want)
    }

    /// `flash_prefill` against the reference prefill on the same inputs (and the same
    /// scattered block table) as the partial-kernel prefill check.
    fn flash_prefill(&mut self, sh: PagedShape, pos0: usize, t: usize) -> CheckResult {
        let PrefillCase {
            table,
            k: kk,
            v: vv,
            q,
            want,
            ..
        } = self.prefill_case(sh, pos0, t)?;
        let Some(d) = self.dev else {
            return Ok(Outcome::dry());
        };
        let (q_d, k_d, v_d) = (d.upload(&q)?, d.upload(&kk)?, d.upload(&vv)?);
        let table_d = d.upload_index(&table)?;
        let mut out = d.upload(&vec![bf16::from_f32(f32::NAN); want.len()])?;
        let t0 = Instant::now();
        d.flash_prefill(&mut out, &q_d, &k_d, &v_d, &table_d, pos0, t, sh)?;
        d.synchronize()?;
        let ms = ms(t0);
        let got = to_f32(&d.download(&out)?);
        Ok(Outcome::rel_l2(rel_l2(&got, &want), REL_L2_BF16, ms))
    }

    /// Sequences with no positions at all merge to zero rows, never NaN.
    fn cascade_all_empty(&mut self) -> CheckResult {
        let sh = paged(9, 3, 64, 16);
        let (kk, _, vv, _) = self.arenas(&sh, 1);
        let (q, _) = self.rng.bf16s(3 * 9 * 64, 1.0, 0.0);
        let empty: &[u32] = &[];
        let plan = WorkPlan::cascade(&[], &[empty; 3], &[0; 3], &sh, 1, PlanOptions::default())?;
        self.run_plan(plan, &q, &kk, &vv, sh, &vec![0.0; 3 * 9 * 64])
            .map(|o| match o.metric {
                "dry" => o,
                _ => Outcome::exact(if o.value == 0.0 { 0 } else { 1 }, o.ms),
            })
    }

    fn run_plan(
        &mut self,
        plan: WorkPlan,
        q: &[bf16],
        k: &[bf16],
        v: &[bf16],
        sh: PagedShape,
        want: &[f32],
    ) -> CheckResult {
        let Some(d) = self.dev else {
            return Ok(Outcome::dry());
        };
        let n_states = plan.n_slots.max(1) * sh.n_heads;
        let plan_d = d.upload_plan(plan)?;
        let (q_d, k_d, v_d) = (d.upload(q)?, d.upload(k)?, d.upload(v)?);
        let mut so = d.upload(&vec![f32::NAN; n_states * sh.head_dim])?;
        let mut sl = d.upload(&vec![f32::NAN; n_states])?;
        let mut out = d.upload(&vec![bf16::from_f32(f32::NAN); want.len()])?;
        let t0 = Instant::now();
        d.planned_attention(&mut out, &q_d, &k_d, &v_d, &plan_d, &mut so, &mut sl, sh)?;
        d.synchronize()?;
        let ms = ms(t0);
        let got = to_f32(&d.download(&out)?);
        Ok(Outcome::rel_l2(rel_l2(&got, want), REL_L2_BF16, ms))
    }

    fn swiglu(&mut self, n: usize, inter: usize, fused: bool) -> CheckResult {
        let ld = if fused { 2 * inter } else { inter };
        let (gu, gu_f) = self.rng.bf16s(n * 2 * inter, 4.0, 0.0);
        // Fused: rows [gate | up]; separate: all gate rows, then all up rows.
        let (gate_f, up_f): (Vec<f32>, Vec<f32>) = if fused {
            (
                (0..n)
                    .flat_map(|r| gu_f[r * ld..r * ld + inter].to_vec())
                    .collect(),
                (0..n)
                    .flat_map(|r| gu_f[r * ld + inter..(r + 1) * ld].to_vec())
                    .collect(),
            )
        } else {
            (gu_f[..n * inter].to_vec(), gu_f[n * inter..].to_vec())
        };
        let mut want = vec![0.0; n * inter];
        swiglu::swiglu_forward(&mut want, &gate_f, &up_f).map_err(kernel_err)?;
        let Some(d) = self.dev else {
            return Ok(Outcome::dry());
        };
        let gu_d = d.upload(&gu)?;
        let mut out = d.alloc_zeros::<bf16>(n * inter)?;
        let up_off = if fused { inter } else { n * inter };
        let t0 = Instant::now();
        d.swiglu(&mut out, &gu_d, &gu_d.slice(up_off..), n, inter, ld)?;
        d.synchronize()?;
        let ms = ms(t0);
        let got = to_f32(&d.download(&out)?);
        Ok(Outcome::rel_l2(rel_l2(&got, &want), REL_L2_BF16, ms))
    }

    /// The GPU sampler against cloudrm-sampler's `Sampler` on the same logits, histories
    /// and Philox counters. Rows 0-2 are the edge cases: all NaN (status 1), all -inf
    /// (status 2), two +inf (they share the mass). Statuses must match exactly; greedy ids
    /// exactly; a sampled id may differ only where the coin falls within rounding of a
    /// boundary (the GPU sums in a tree, the CPU in index order): the coin within
    /// `COIN_TOL` of the GPU token's interval in the f64 CDF of the CPU's probabilities,
    /// on at most `SAMPLE_DISAGREEMENT` of the rows. The `seen` scratch must come back all
    /// zero.
    fn sample(
        &mut self,
        params: cloudrm_sampler::SamplingParams,
        rows: usize,
        v: usize,
    ) -> CheckResult {
        use cloudrm_sampler::{Sampler, SamplerError, SeqRng};
        let mut logits: Vec<f32> = self.rng.f32s(rows * v, 3.0);
        logits[..v].fill(f32::NAN);
        logits[v..2 * v].fill(f32::NEG_INFINITY);
        logits[2 * v + 5] = f32::INFINITY;
        logits[2 * v + 17] = f32::INFINITY;
        let mut offsets = vec![0u32];
        let mut hist = Vec::new();
        for r in 0..rows {
            for _ in 0..(r % 7) * 5 {
                // Repeats on purpose: the penalty applies once per distinct id.
                hist.push(self.rng.below(v.min(64 + r * 8)) as u32);
            }
            offsets.push(hist.len() as u32);
        }
        let counters: Vec<u32> = (0..rows as u64)
            .flat_map(|r| {
                let (seq, step) = (1000 + r, 3 + 2 * r);
                [
                    step as u32,
                    (step >> 32) as u32,
                    seq as u32,
                    (seq >> 32) as u32,
                ]
            })
            .collect();
        let mut sampler = Sampler::new(params.clone(), v)
            .map_err(|e| CudaError::bad("sample", "params", e.to_string()))?;
        let mut want_ids = vec![u32::MAX; rows];
        let mut want_status = vec![0u32; rows];
        // The CPU's probabilities and coin per row (sampled rows): what a GPU token that
        // differs is measured against.
        let mut probs: Vec<Vec<f32>> = vec![Vec::new(); rows];
        let mut coins = vec![0f32; rows];
        for r in 0..rows {
            let mut row = logits[r * v..(r + 1) * v].to_vec();
            let h = &hist[offsets[r] as usize..offsets[r + 1] as usize];
            let mut rng = SeqRng::new(params.seed, 1000 + r as u64);
            rng.set_step(3 + 2 * r as u64);
            coins[r] = rng.uniform_at(3 + 2 * r as u64);
            let picked = sampler.sample(&mut row, h, &mut rng);
            if !params.is_greedy() {
                probs[r] = row;
            }
            match picked {
                Ok(t) => want_ids[r] = t,
                Err(SamplerError::AllNan { .. }) => want_status[r] = 1,
                Err(SamplerError::AllMasked { .. }) => want_status[r] = 2,
                Err(e) => return Err(CudaError::bad("sample", "(cpu sampler)", e.to_string())),
            }
        }
        let Some(d) = self.dev else {
            return Ok(Outcome::dry());
        };
        let words = v.div_ceil(32);
        let mut l_d = d.upload(&logits)?;
        let mut ids_d = d.alloc_zeros::<u32>(rows)?;
        let mut st_d = d.alloc_zeros::<u32>(rows)?;
        let mut seen_d = d.alloc_zeros::<u32>(rows * words)?;
        let (off_d, hist_d, ctr_d) = (
            d.upload_index(&offsets)?,
            d.upload_index(&hist)?,
            d.upload_index(&counters)?,
        );
        let gp = crate::backend::cuda::sample_params(&params);
        let t0 = Instant::now();
        d.sample(
            &mut ids_d,
            &mut st_d,
            &mut l_d,
            v,
            v,
            &off_d,
            &hist_d,
            &mut seen_d,
            &ctr_d,
            gp,
        )?;
        d.synchronize()?;
        let ms = ms(t0);
        let (got_ids, got_status) = (d.download(&ids_d)?, d.download(&st_d)?);
        let seen_left = d.download(&seen_d)?.iter().filter(|&&w| w != 0).count();
        let status_bad = got_status
            .iter()
            .zip(&want_status)
            .filter(|(a, b)| a != b)
            .count();
        if status_bad + seen_left > 0 {
            return Ok(Outcome::exact(status_bad + seen_left, ms));
        }
        let ok_rows: Vec<usize> = (0..rows).filter(|&r| want_status[r] == 0).collect();
        let differ = ok_rows
            .iter()
            .filter(|&&r| got_ids[r] != want_ids[r])
            .count();
        if params.is_greedy() {
            return Ok(Outcome::exact(differ, ms));
        }
        let dist = ok_rows
            .iter()
            .filter(|&&r| got_ids[r] != want_ids[r])
            .map(|&r| coin_distance(&probs[r], coins[r], got_ids[r]))
            .fold(0.0f64, f64::max);
        let share = differ as f64 / ok_rows.len().max(1) as f64;
        Ok(sampled_outcome(dist, share, ms))
    }

    /// The device-side weight generator of stage (c): bit-exact against
    /// `reference::init` (the same counter-based hash, no FMA).
    fn fill_uniform(&mut self, n: usize, seed: u64) -> CheckResult {
        let (scale, offset) = (0.0721f32, -0.5f32);
        let mut want = vec![bf16::ZERO; n];
        cloudrm_kernels::reference::init::fill_uniform_bf16(&mut want, seed, 0, scale, offset);
        let Some(d) = self.dev else {
            return Ok(Outcome::dry());
        };
        let mut out = d.alloc_zeros::<bf16>(n)?;
        let t0 = Instant::now();
        d.fill_uniform(&mut out, seed, scale, offset)?;
        d.synchronize()?;
        let ms = ms(t0);
        let got = d.download(&out)?;
        let bad = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        Ok(Outcome::exact(bad, ms))
    }

    /// Hidden rows (7 of them, stride `ld`) and the rows a head reads.
    fn head_inputs(
        &mut self,
        rows: &Option<Vec<u32>>,
        ld: usize,
        c: usize,
    ) -> (Vec<bf16>, Vec<f32>) {
        let n_hidden = 7;
        let (h, hf) = self.rng.bf16s(n_hidden * ld, 2.0, 0.0);
        let picked: Vec<usize> = match rows {
            Some(r) => r.iter().map(|&x| x as usize).collect(),
            None => (0..n_hidden).collect(),
        };
        let dense: Vec<f32> = picked
            .iter()
            .flat_map(|&r| hf[r * ld..r * ld + c].to_vec())
            .collect();
        (h, dense)
    }

    fn reward_linear(&mut self, rows: Option<Vec<u32>>, ld: usize) -> CheckResult {
        let c = 576;
        let (h, dense) = self.head_inputs(&rows, ld, c);
        let (w, _) = self.rng.bf16s(c, 0.1, 0.0);
        let b = 0.25;
        let r_n = dense.len() / c;
        let mut want = vec![0.0; r_n];
        reward_head_forward(
            &mut want,
            &dense,
            &RewardHeadWeights::Linear {
                w: Weights::BF16(&w),
                b,
            },
            &mut [],
        )
        .map_err(kernel_err)?;
        let Some(d) = self.dev else {
            return Ok(Outcome::dry());
        };
        let (h_d, w_d) = (d.upload(&h)?, d.upload(&w)?);
        let rows_d = rows.as_ref().map(|r| d.upload_index(r)).transpose()?;
        let mut out = d.alloc_zeros::<f32>(r_n)?;
        let t0 = Instant::now();
        d.reward_linear(&mut out, &h_d, ld, rows_d.as_ref(), &w_d, b)?;
        d.synchronize()?;
        let ms = ms(t0);
        let got = d.download(&out)?;
        Ok(Outcome::rel_l2(rel_l2(&got, &want), REL_L2_BF16, ms))
    }

    fn reward_dense(&mut self, rows: Option<Vec<u32>>, ld: usize) -> CheckResult {
        let c = 576;
        let (h, dense) = self.head_inputs(&rows, ld, c);
        let (dw, _) = self.rng.bf16s(c * c, 0.08, 0.0);
        let db = self.rng.f32s(c, 0.1);
        let (ow, _) = self.rng.bf16s(c, 0.1, 0.0);
        let ob = -0.5;
        let r_n = dense.len() / c;
        let mut want = vec![0.0; r_n];
        reward_head_forward(
            &mut want,
            &dense,
            &RewardHeadWeights::DenseTanh {
                dense_w: Weights::BF16(&dw),
                dense_b: &db,
                out_w: Weights::BF16(&ow),
                out_b: ob,
            },
            &mut vec![0.0; c],
        )
        .map_err(kernel_err)?;
        let Some(d) = self.dev else {
            return Ok(Outcome::dry());
        };
        let (h_d, dw_d, db_d, ow_d) = (
            d.upload(&h)?,
            d.upload(&dw)?,
            d.upload(&db)?,
            d.upload(&ow)?,
        );
        let rows_d = rows.as_ref().map(|r| d.upload_index(r)).transpose()?;
        let mut z = d.alloc_zeros::<f32>(r_n * c)?;
        let mut out = d.alloc_zeros::<f32>(r_n)?;
        let t0 = Instant::now();
        d.reward_dense_tanh(&mut z, &h_d, ld, rows_d.as_ref(), &dw_d, &db_d)?;
        d.reward_out(&mut out, &z, &ow_d, ob)?;
        d.synchronize()?;
        let ms = ms(t0);
        let got = d.download(&out)?;
        Ok(Outcome::rel_l2(rel_l2(&got, &want), REL_L2_BF16, ms))
    }

    /// Rows: random; with a tie planted before and after the max; with NaNs around the
    /// max; all NaN (no winner); all -inf (index 0); the max in the last valid column.
    fn argmax(&mut self, b: usize, v: usize) -> CheckResult {
        let ld = v + 3;
        let mut logits = self.rng.f32s(b * ld, 10.0);
        for (r, row) in logits.chunks_exact_mut(ld).enumerate() {
            let m = self.rng.below(v);
            match r {
                1 => {
                    row[m] = 50.0;
                    row[v - 1] = 50.0;
                    row[m / 2] = 50.0;
                }
                2 => {
                    row[m] = 40.0;
                    for x in row[..v].iter_mut().step_by(3) {
                        *x = f32::NAN;
                    }
                }
                3 => row[..v].fill(f32::NAN),
                4 => row[..v].fill(f32::NEG_INFINITY),
                5 => row[v - 1] = 99.0,
                _ => {}
            }
            // Past V: larger values that must be ignored.
            row[v..].fill(1e9);
        }
        let want: Vec<u32> = logits
            .chunks_exact(ld)
            .map(|row| cloudrm_sampler::argmax(&row[..v]).map_or(u32::MAX, |i| i as u32))
            .collect();
        let Some(d) = self.dev else {
            return Ok(Outcome::dry());
        };
        let l_d = d.upload(&logits)?;
        let mut ids = d.alloc_zeros::<u32>(b)?;
        let t0 = Instant::now();
        d.argmax(&mut ids, &l_d, v, ld)?;
        d.synchronize()?;
        let ms = ms(t0);
        let got = d.download(&ids)?;
        Ok(Outcome::exact(
            got.iter().zip(&want).filter(|(a, b)| a != b).count(),
            ms,
        ))
    }

    fn gemm<Y: GemmCheck>(&mut self, m: usize, n: usize, k: usize) -> CheckResult {
        let (x, xf) = self.rng.bf16s(m * k, 1.0, 0.0);
        let (w, _) = self.rng.bf16s(n * k, 0.1, 0.0);
        let mut want = vec![0.0; m * n];
        matmul::matmul_forward(&mut want, &xf, Weights::BF16(&w), None, k, n)
            .map_err(kernel_err)?;
        let Some(d) = self.dev else {
            return Ok(Outcome::dry());
        };
        let (x_d, w_d) = (d.upload(&x)?, d.upload(&w)?);
        let mut y = d.alloc_zeros::<Y>(m * n)?;
        let t0 = Instant::now();
        d.gemm_bf16(&mut y, &x_d, &w_d, m, n, k)?;
        d.synchronize()?;
        let ms = ms(t0);
        let got: Vec<f32> = d.download(&y)?.iter().map(|v| v.as_f32()).collect();
        Ok(Outcome::rel_l2(rel_l2(&got, &want), REL_L2_BF16, ms))
    }
}

/// GEMM output types the check reads back.
trait GemmCheck:
    cloudrm_kernels::cuda::GemmOut + cloudrm_kernels::cuda::cudarc::driver::ValidAsZeroBits
{
    fn as_f32(&self) -> f32;
}

impl GemmCheck for f32 {
    fn as_f32(&self) -> f32 {
        *self
    }
}

impl GemmCheck for bf16 {
    fn as_f32(&self) -> f32 {
        self.to_f32()
    }
}

/// Whole-model threshold with bf16 weights (DESIGN.md: logits rel. L2 < 2e-2).
pub const REL_L2_MODEL: f64 = 2e-2;
/// Stage (b): most positions whose greedy token may differ from the CPU model's.
pub const MAX_DISAGREEMENT: f64 = 0.1;

impl Checks<'_> {
    /// Stage (b): the Llama forward on the GPU (backend::cuda::CudaLlama) against the CPU
    /// model on seeded random bf16 weights in the default model's shape (2 layers with
    /// --quick): teacher-forced prefill, every position's logits (rel. L2) and greedy
    /// token (agreement).
    fn stage_b(&mut self, log: &mut Log) {
        let layers = if self.quick { 2 } else { 30 };
        let t = if self.quick { 17 } else { 37 };
        let shape = format!("SmolLM2-135M shape, L={layers}, random bf16, T={t}");
        if log.wants("b", "llama", &shape) {
            log.running("b", "llama", &shape);
            match catch_unwind(AssertUnwindSafe(|| self.llama(layers, t)))
                .unwrap_or_else(|p| Err(panicked(p)))
            {
                Ok(records) => {
                    for (op, r) in records {
                        log.record("b", op, &shape, r);
                    }
                }
                Err(e) => log.record("b", "llama", &shape, Err(e)),
            }
        }
        let Some(tok_dir) = self.tokenizer.clone() else {
            log.line("b cloud_scorer: skipped (no --tokenizer DIR)");
            return;
        };
        let layers = if self.quick { 2 } else { 4 };
        let shape = format!("SmolLM2-135M shape, L={layers}, random bf16, untrained CLoud head");
        if !log.wants("b", "cloud_scorer", &shape) {
            return;
        }
        log.running("b", "cloud_scorer", &shape);
        match catch_unwind(AssertUnwindSafe(|| self.scorer(&tok_dir, layers)))
            .unwrap_or_else(|p| Err(panicked(p)))
        {
            Ok(records) => {
                for (op, r) in records {
                    log.record("b", op, &shape, r);
                }
            }
            Err(e) => log.record("b", "cloud_scorer", &shape, Err(e)),
        }
    }

    /// Stage (b) with `--tokenizer DIR`: the GPU scorer (`--device cuda`) against the CPU
    /// scorer, on a random model in the default model's shape (`layers` layers, the
    /// untrained CLoud head) with DIR's tokenizer and chat template:
    /// - `cloud_scorer(classic reward)`: |GPU - CPU| < REWARD_TOL;
    /// - `cloud_scorer(greedy critique)`: K = 1 (greedy, penalty 1.01, at most
    ///   SCORER_TOKENS tokens): the GPU's tokens equal the CPU's for at least the first
    ///   SCORER_AGREE of them (bf16 rounding may flip a near tie later);
    /// - `cloud_scorer(critique reward)`: where the whole critique agreed, |GPU - CPU|
    ///   reward < REWARD_TOL (dry where it parted);
    /// - `cloud_scorer(sampled K=3)`: three critiques at temperature 0.5 run to their end
    ///   with finite rewards, as many as the CPU's; the share of critiques identical to
    ///   the CPU's is the metric (sampling may part at flat rows, see COIN_TOL).
    fn scorer(
        &mut self,
        tok_dir: &Path,
        layers: usize,
    ) -> std::result::Result<Vec<(&'static str, CheckResult)>, CudaError> {
        use crate::cloud::{CloudScorer, CudaScorer, ScoreOptions};
        let model_err = |e: Error| CudaError::BadArgument {
            op: "stage b",
            arg: "(cloud scorer)",
            reason: e.to_string(),
        };
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "cloudrm-gpu-check-scorer-{}-{call}-{layers}",
            std::process::id()
        ));
        let result = (|| {
            write_random_llama(&dir, layers, &mut self.rng).map_err(model_err)?;
            let llama = crate::model::Llama::load_dir(&dir).map_err(model_err)?;
            let rm = crate::model::RewardModel::with_untrained_head(
                llama,
                crate::model::FeedbackMethod::Cloud,
            );
            let tok = cloudrm_loader::tokenizer::Tokenizer::from_dir(tok_dir)
                .map_err(|e| model_err(e.into()))?;
            let tpl = cloudrm_loader::template::ChatTemplate::from_dir(tok_dir)
                .map_err(|e| model_err(e.into()))?;
            let (prompt, response) = (
                "What is the capital of France, and why?",
                "Paris. It has been the seat of government for centuries.",
            );
            let greedy = ScoreOptions {
                k: 1,
                max_critique_tokens: SCORER_TOKENS,
                ..ScoreOptions::default()
            };
            let sampled = ScoreOptions {
                k: 3,
                temperature: Some(0.5),
                seed: 11,
                ..greedy.clone()
            };
            let cpu = CloudScorer::new(&rm, &tok, &tpl);
            let want_classic = cpu.score_classic(prompt, response).map_err(model_err)?;
            let want_greedy = cpu.score(prompt, response, &greedy).map_err(model_err)?;
            let want_sampled = cpu.score(prompt, response, &sampled).map_err(model_err)?;
            let Some(d) = self.dev else {
                return Ok(vec![
                    ("cloud_scorer(classic reward)", Ok(Outcome::dry())),
                    ("cloud_scorer(greedy critique)", Ok(Outcome::dry())),
                    ("cloud_scorer(critique reward)", Ok(Outcome::dry())),
                    ("cloud_scorer(sampled K=3)", Ok(Outcome::dry())),
                ]);
            };
            let gpu = CudaScorer::new(d, &rm, &tok, &tpl).map_err(model_err)?;
            let gpu_err = |e: Error| match e {
                Error::Cuda(c) => c,
                other => model_err(other),
            };
            let abs = |got: f32, want: f32, ms: f64| {
                let diff = (got as f64 - want as f64).abs();
                let diff = if diff.is_nan() { f64::INFINITY } else { diff };
                Outcome {
                    metric: "abs_diff",
                    value: diff,
                    threshold: REWARD_TOL,
                    pass: diff < REWARD_TOL,
                    ms,
                }
            };
            let mut out: Vec<(&'static str, CheckResult)> = Vec::new();
            let t0 = Instant::now();
            out.push((
                "cloud_scorer(classic reward)",
                gpu.score(
                    prompt,
                    response,
                    &ScoreOptions {
                        classic: true,
                        ..greedy.clone()
                    },
                )
                .map_err(gpu_err)
                .map(|g| abs(g.reward, want_classic.reward, ms(t0))),
            ));
            let t0 = Instant::now();
            match gpu.score(prompt, response, &greedy).map_err(gpu_err) {
                Ok(g) => {
                    let ms = ms(t0);
                    let (got, want) = (&g.critique_tokens[0], &want_greedy.critique_tokens[0]);
                    let agree = got.iter().zip(want).take_while(|(a, b)| a == b).count();
                    let whole = got == want;
                    let need = SCORER_AGREE.min(want.len());
                    out.push((
                        "cloud_scorer(greedy critique)",
                        Ok(Outcome {
                            metric: "tokens_agreeing",
                            value: agree as f64,
                            threshold: need as f64,
                            pass: whole || agree >= need,
                            ms,
                        }),
                    ));
                    out.push((
                        "cloud_scorer(critique reward)",
                        Ok(if whole {
                            abs(g.rewards[0], want_greedy.rewards[0], ms)
                        } else {
                            Outcome::dry()
                        }),
                    ));
                }
                Err(e) => out.push(("cloud_scorer(greedy critique)", Err(e))),
            }
            let t0 = Instant::now();
            out.push((
                "cloud_scorer(sampled K=3)",
                gpu.score(prompt, response, &sampled)
                    .map_err(gpu_err)
                    .map(|g| {
                        let same = g
                            .critique_tokens
                            .iter()
                            .zip(&want_sampled.critique_tokens)
                            .filter(|(a, b)| a == b)
                            .count();
                        Outcome {
                            metric: "share_identical",
                            value: same as f64 / sampled.k as f64,
                            threshold: 0.0,
                            pass: g.rewards.len() == sampled.k
                                && g.rewards.iter().all(|r| r.is_finite()),
                            ms: ms(t0),
                        }
                    }),
            ));
            Ok(out)
        })();
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    /// The model checks of stage (b) on one random model:
    /// - `llama_prefill(logits)` / `(greedy ids)`: teacher-forced prefill of T random ids;
    /// - `llama_decode_shared(logits)` / `(greedy ids)`: K sequences sharing the T-token
    ///   prompt (prefilled once; T is not a whole number of blocks, so the partial block
    ///   is copied), each teacher-forced through its CPU greedy continuation of
    ///   DECODE_STEPS tokens, every step's logits against the CPU's;
    /// - `llama_greedy_32`: the same K sequences decoded greedily on the GPU alone; each
    ///   must equal the CPU's tokens, except that a divergence at a near tie (the CPU's
    ///   margin between its token and the GPU's below NEAR_TIE times the logits' standard
    ///   deviation: bf16 rounding may flip it) ends that sequence's comparison.
    #[allow(clippy::type_complexity)]
    fn llama(
        &mut self,
        layers: usize,
        t: usize,
    ) -> std::result::Result<Vec<(&'static str, CheckResult)>, CudaError> {
        let model_err = |e: Error| CudaError::BadArgument {
            op: "stage b",
            arg: "(cpu model)",
            reason: e.to_string(),
        };
        // Unique per call: two checks in one process (tests run in parallel threads)
        // must not write, load and remove the same model dir.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "cloudrm-gpu-check-model-{}-{call}-{layers}",
            std::process::id()
        ));
        let model = write_random_llama(&dir, layers, &mut self.rng)
            .and_then(|()| crate::model::Llama::load_dir(&dir))
            .map_err(model_err);
        let model = match model {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let v = model.config.vocab_size;
        let ids: Vec<u32> = (0..t).map(|_| self.rng.below(v) as u32).collect();
        let k = if self.quick { 2 } else { 3 };
        let first: Vec<u32> = (0..k).map(|_| self.rng.below(v) as u32).collect();
        let cpu = crate::backend::Cpu::fast();
        let result = (|| {
            let mut sess = model.new_session(t, t);
            let want = model
                .forward(&cpu, &mut sess, &ids, crate::model::LogitsMode::All)
                .map_err(model_err)?
                .to_vec();
            let want_ids = argmax_rows(&want, v);
            // The untrained reward head (the default model's), on the last position.
            let head = crate::model::RewardHead::untrained(
                model.config.hidden_size,
                crate::model::UNTRAINED_HEAD_SEED,
            );
            let head_w = head.view(&model.weights);
            let mut want_reward = [0.0f32];
            let mut head_scratch = vec![0.0; model.config.hidden_size];
            cloudrm_kernels::reference::heads::reward_head_forward(
                &mut want_reward,
                sess.last_hidden(),
                &head_w,
                &mut head_scratch,
            )
            .map_err(kernel_err)?;
            // CPU greedy continuations: tokens (first + DECODE_STEPS) and the logits of
            // every step, per sequence.
            let mut cpu_toks: Vec<Vec<u32>> = Vec::with_capacity(k);
            let mut cpu_logits: Vec<Vec<Vec<f32>>> = Vec::with_capacity(k);
            for &f in &first {
                let mut s = model.new_session(t + DECODE_STEPS + 1, t);
                model
                    .forward(&cpu, &mut s, &ids, crate::model::LogitsMode::None)
                    .map_err(model_err)?;
                let (mut toks, mut rows) = (vec![f], Vec::with_capacity(DECODE_STEPS));
                for _ in 0..DECODE_STEPS {
                    let tok = *toks.last().unwrap_or(&f);
                    let l = model
                        .forward(&cpu, &mut s, &[tok], crate::model::LogitsMode::Last)
                        .map_err(model_err)?
                        .to_vec();
                    toks.push(argmax_rows(&l, v)[0]);
                    rows.push(l);
                }
                cpu_toks.push(toks);
                cpu_logits.push(rows);
            }
            // The CLoud critique setting (greedy, repetition penalty 1.01 over the prompt
            // and the tokens so far) through cloudrm-sampler: tokens and penalised logits.
            let critique = cloudrm_sampler::SamplingParams::cloud_critique();
            let mut sampler = cloudrm_sampler::Sampler::new(critique, v)
                .map_err(|e| CudaError::bad("stage b", "(sampler)", e.to_string()))?;
            let mut pen_toks: Vec<Vec<u32>> = Vec::with_capacity(k);
            let mut pen_logits: Vec<Vec<Vec<f32>>> = Vec::with_capacity(k);
            for (j, &f) in first.iter().enumerate() {
                let mut s = model.new_session(t + DECODE_STEPS + 1, t);
                model
                    .forward(&cpu, &mut s, &ids, crate::model::LogitsMode::None)
                    .map_err(model_err)?;
                let mut hist = ids.clone();
                hist.push(f);
                let mut rng = cloudrm_sampler::SeqRng::new(0, j as u64);
                let mut rows = Vec::with_capacity(DECODE_STEPS);
                for _ in 0..DECODE_STEPS {
                    let tok = *hist.last().unwrap_or(&f);
                    let mut l = model
                        .forward(&cpu, &mut s, &[tok], crate::model::LogitsMode::Last)
                        .map_err(model_err)?
                        .to_vec();
                    let next = sampler
                        .sample(&mut l, &hist, &mut rng)
                        .map_err(|e| CudaError::bad("stage b", "(sampler)", e.to_string()))?;
                    hist.push(next);
                    rows.push(l);
                }
                pen_toks.push(hist[t..].to_vec());
                pen_logits.push(rows);
            }
            let Some(d) = self.dev else {
                return Ok(vec![
                    ("llama_prefill(logits)", Ok(Outcome::dry())),
                    ("llama_prefill(greedy ids)", Ok(Outcome::dry())),
                    ("llama_prefill(reward)", Ok(Outcome::dry())),
                    ("llama_decode_shared(logits)", Ok(Outcome::dry())),
                    ("llama_decode_shared(greedy ids)", Ok(Outcome::dry())),
                    ("llama_greedy_32", Ok(Outcome::dry())),
                    (
                        "llama_critique_32(GPU sampler, penalty 1.01)",
                        Ok(Outcome::dry()),
                    ),
                ]);
            };
            let g = crate::backend::cuda::CudaLlama::upload(d, &model)?;
            let mut out: Vec<(&'static str, CheckResult)> = Vec::new();
            let t0 = Instant::now();
            let prefill = (|| {
                use crate::backend::cuda::{CudaRewardHead, CudaSession};
                let nb = t.div_ceil(g.shape().block_size);
                let mut s = CudaSession::new(&g, t, t, nb)?;
                let table: Vec<u32> = (0..nb as u32).collect();
                s.prefill(&table, 0, &ids, true)?;
                let head_d = CudaRewardHead::upload(d, &head_w)?;
                let r = s.rewards(&head_d, &[t as u32 - 1])?;
                Ok::<_, CudaError>((s.logits(t)?, s.argmax(t)?, r))
            })();
            match prefill {
                Ok((logits, got_ids, reward)) => {
                    let ms = ms(t0);
                    out.push((
                        "llama_prefill(logits)",
                        Ok(Outcome::rel_l2(rel_l2(&logits, &want), REL_L2_MODEL, ms)),
                    ));
                    out.push((
                        "llama_prefill(greedy ids)",
                        Ok(disagreement(&got_ids, &want_ids, ms)),
                    ));
                    let diff = (reward[0] as f64 - want_reward[0] as f64).abs();
                    out.push((
                        "llama_prefill(reward)",
                        Ok(Outcome {
                            metric: "abs_diff",
                            value: if diff.is_nan() { f64::INFINITY } else { diff },
                            threshold: REWARD_TOL,
                            pass: diff < REWARD_TOL,
                            ms,
                        }),
                    ));
                }
                Err(e) => out.push(("llama_prefill", Err(e))),
            }
            let (forced, greedy, sampled) = gpu_decode_shared(&g, &ids, &first, &cpu_toks);
            match forced {
                Ok((logits, ms)) => {
                    // Step-major, as the GPU wrote them.
                    let want: Vec<f32> = (0..DECODE_STEPS)
                        .flat_map(|s| cpu_logits.iter().flat_map(move |r| r[s].iter().copied()))
                        .collect();
                    let want_ids = argmax_rows(&want, v);
                    out.push((
                        "llama_decode_shared(logits)",
                        Ok(Outcome::rel_l2(rel_l2(&logits, &want), REL_L2_MODEL, ms)),
                    ));
                    out.push((
                        "llama_decode_shared(greedy ids)",
                        Ok(disagreement(&argmax_rows(&logits, v), &want_ids, ms)),
                    ));
                }
                Err(e) => out.push(("llama_decode_shared", Err(e))),
            }
            out.push((
                "llama_greedy_32",
                greedy.map(|(toks, ms)| Outcome::exact(off_tie(&toks, &cpu_toks, &cpu_logits), ms)),
            ));
            out.push((
                "llama_critique_32(GPU sampler, penalty 1.01)",
                sampled
                    .map(|(toks, ms)| Outcome::exact(off_tie(&toks, &pen_toks, &pen_logits), ms)),
            ));
            Ok(out)
        })();
        drop(model);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }
}

/// Stage (a), sampled rows: how far (a share of the row's probability mass) the coin may
/// lie from the interval of the token the GPU drew, in the f64 inverse CDF of the CPU
/// sampler's probabilities. Where the two differ, only summation order may separate them:
/// over a flat row of V = 49152 (T = 0.5 on logits in [-3, 3], every token ~2e-5 of the
/// mass) the CPU's index-order f32 sum drifts by up to ~1.4e-5, so the tokens differ on
/// ~20 % of such rows (seen on an H200; the kernel's emulation gives the same share),
/// while the kernel's tree sums keep its token on the coin (distance 0 in the emulation).
/// A wrong kernel draws from another distribution: a temperature 10 % off reaches
/// 8e-4, a token the CPU filtered out or a top-k/top-p error whole tokens' mass.
pub const COIN_TOL: f64 = 5e-5;
/// Stage (a), sampled rows: the largest share of rows whose token may differ at all
/// (summation order at a flat row: ~20 %; an index off by one: all of them).
pub const SAMPLE_DISAGREEMENT: f64 = 0.5;
/// Stage (b): the largest |GPU reward - CPU reward| (the issue's 1e-2).
pub const REWARD_TOL: f64 = 1e-2;
/// Stage (b), the scorers: critique tokens at most.
const SCORER_TOKENS: usize = 24;
/// Stage (b), the scorers: leading greedy critique tokens that must agree.
const SCORER_AGREE: usize = 8;
/// Tokens past the first that stage (b) decodes per sequence (32 tokens in all).
const DECODE_STEPS: usize = 31;
/// Stage (b) greedy: a divergence counts as a near tie when the CPU's margin is below
/// this many standard deviations of that step's logits. The bf16 emulation of the GPU
/// pipeline (tests::emulate_stage_b) flips tokens at margins up to 0.034 sd over 300
/// random positions at 30 layers; a wrong kernel flips them at whole standard deviations.
const NEAR_TIE: f32 = 0.1;

fn argmax_rows(logits: &[f32], v: usize) -> Vec<u32> {
    logits
        .chunks_exact(v)
        .map(|row| cloudrm_sampler::argmax(row).map_or(u32::MAX, |i| i as u32))
        .collect()
}

/// The distance, as a share of the row's mass, between `coin` (in [0, 1)) and the
/// interval of token `id` in the f64 inverse CDF (index order) of `probs`: 0 when the
/// coin falls inside it, infinite for an id out of range or no mass at all. A token with
/// no probability has an empty interval at its place in the CDF.
pub fn coin_distance(probs: &[f32], coin: f32, id: u32) -> f64 {
    let total: f64 = probs.iter().map(|&p| f64::from(p.max(0.0))).sum();
    let id = id as usize;
    if id >= probs.len() || !total.is_finite() || total <= 0.0 {
        return f64::INFINITY;
    }
    let below: f64 = probs[..id].iter().map(|&p| f64::from(p.max(0.0))).sum();
    let (lo, hi) = (
        below / total,
        (below + f64::from(probs[id].max(0.0))) / total,
    );
    let c = f64::from(coin);
    if c < lo {
        lo - c
    } else if c >= hi {
        c - hi
    } else {
        0.0
    }
}

/// The outcome of the sampled rows of one parameter set: the largest coin distance of a
/// GPU token that differs from the CPU's, and the share of such rows.
fn sampled_outcome(dist: f64, share: f64, ms: f64) -> Outcome {
    let d = Outcome {
        metric: "coin_distance",
        value: dist,
        threshold: COIN_TOL,
        pass: dist <= COIN_TOL,
        ms,
    };
    let s = Outcome {
        metric: "disagreement",
        value: share,
        threshold: SAMPLE_DISAGREEMENT,
        pass: share <= SAMPLE_DISAGREEMENT,
        ms,
    };
    match (d.pass, s.pass) {
        (true, false) => s,
        _ => d,
    }
}

fn disagreement(got: &[u32], want: &[u32], ms: f64) -> Outcome {
    let n = want.len().max(1);
    let d = got.iter().zip(want).filter(|(a, b)| a != b).count() + want.len().abs_diff(got.len());
    let value = d as f64 / n as f64;
    Outcome {
        metric: "disagreement",
        value,
        threshold: MAX_DISAGREEMENT,
        pass: value <= MAX_DISAGREEMENT,
        ms,
    }
}

/// How many sequences diverge from the CPU's other than at a near tie.
fn off_tie(got: &[Vec<u32>], want: &[Vec<u32>], rows: &[Vec<Vec<f32>>]) -> usize {
    got.iter()
        .zip(want)
        .zip(rows)
        .filter(|((g, w), r)| !same_or_near_tie(g, w, r))
        .count()
}

/// Whether the GPU's greedy tokens `got` equal the CPU's `want` up to their first
/// difference at a near tie (see `NEAR_TIE`); `rows[s]` are the CPU logits that chose
/// want[s + 1].
fn same_or_near_tie(got: &[u32], want: &[u32], rows: &[Vec<f32>]) -> bool {
    if got.len() != want.len() {
        return false;
    }
    let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) else {
        return true;
    };
    let Some(row) = i.checked_sub(1).and_then(|s| rows.get(s)) else {
        return false;
    };
    let (w, g) = (want[i] as usize, got[i] as usize);
    let (Some(&lw), Some(&lg)) = (row.get(w), row.get(g)) else {
        return false;
    };
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let sd = (row.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n).sqrt();
    lw - lg <= NEAR_TIE * sd
}

/// Stage (b) on the GPU: prefill `prompt` once, then (1) K sequences teacher-forced
/// through `cpu_toks` (the logits of every step, step-major, and the ms), (2) the same K
/// decoded greedily (their tokens and the ms), (3) the same K decoded by the GPU sampler
/// in the CLoud critique setting (greedy, repetition penalty 1.01 over the prompt and
/// the tokens so far).
#[allow(clippy::type_complexity)]
fn gpu_decode_shared(
    g: &crate::backend::cuda::CudaLlama<'_>,
    prompt: &[u32],
    first: &[u32],
    cpu_toks: &[Vec<u32>],
) -> (
    std::result::Result<(Vec<f32>, f64), CudaError>,
    std::result::Result<(Vec<Vec<u32>>, f64), CudaError>,
    std::result::Result<(Vec<Vec<u32>>, f64), CudaError>,
) {
    use crate::backend::cuda::CudaSession;
    let k = first.len();
    let t = prompt.len();
    let bs = g.shape().block_size;
    let nb_prefix = t.div_ceil(bs);
    let own = crate::backend::cuda::SharedLayout::own_blocks(bs, t, DECODE_STEPS);
    let n_blocks = nb_prefix + k * own;
    let table: Vec<u32> = (0..nb_prefix as u32).collect();
    let free: Vec<u32> = (nb_prefix as u32..n_blocks as u32).collect();
    let mut sess = match CudaSession::new(g, t.max(k), k, n_blocks)
        .and_then(|mut s| s.prefill(&table, 0, prompt, false).map(|()| s))
    {
        Ok(s) => s,
        Err(e) => {
            let again = || CudaError::bad("stage b", "(session)", e.to_string());
            return (Err(again()), Err(again()), Err(again()));
        }
    };
    let t0 = Instant::now();
    let mut logits = Vec::new();
    let forced = sess
        .decode_shared(&table, t, first, DECODE_STEPS, &free, Some(64), |s, se| {
            logits.extend(se.logits(k)?);
            Ok(cpu_toks.iter().map(|c| c[s + 1]).collect())
        })
        .map(|_| (logits, ms(t0)));
    let t0 = Instant::now();
    let greedy = sess
        .decode_shared(&table, t, first, DECODE_STEPS, &free, Some(64), |_, se| {
            se.argmax(k)
        })
        .map(|toks| (toks, ms(t0)));
    let params = cloudrm_kernels::cuda::SampleParams {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repetition_penalty: 1.01,
        seed: 0,
    };
    let mut hist: Vec<Vec<u32>> = first
        .iter()
        .map(|&f| {
            let mut h = prompt.to_vec();
            h.push(f);
            h
        })
        .collect();
    let t0 = Instant::now();
    let sampled = sess
        .decode_shared(&table, t, first, DECODE_STEPS, &free, Some(64), |s, se| {
            let refs: Vec<&[u32]> = hist.iter().map(|h| h.as_slice()).collect();
            let draws: Vec<(u64, u64)> = (0..k as u64).map(|j| (j, s as u64)).collect();
            let next = se.sample(params, &refs, &draws)?;
            for (h, &n) in hist.iter_mut().zip(&next) {
                h.push(n);
            }
            Ok(next)
        })
        .map(|toks| (toks, ms(t0)));
    (forced, greedy, sampled)
}

/// Writes a seeded random Llama in SmolLM2-135M's shape with `layers` layers (bf16,
/// tied embeddings) as config.json + model.safetensors into `dir`. Linear weights are
/// uniform with variance 1/fan_in, norms near 1, the embedding uniform in [-1, 1].
fn write_random_llama(dir: &Path, layers: usize, rng: &mut Rng) -> Result<()> {
    use cloudrm_loader::Dtype;
    use cloudrm_loader::safetensors::{WriteTensor, write_safetensors};
    let (c, i, nh, nkv, v) = (576usize, 1536usize, 9usize, 3usize, 49152usize);
    let hs = c / nh;
    let (q, kv) = (nh * hs, nkv * hs);
    let io = |source| Error::Io {
        context: format!("gpu-check: writing the random model into {}", dir.display()),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let bytes = (0..n)
            .flat_map(|_| bf16::from_f32(rng.unit() * scale + offset).to_le_bytes())
            .collect();
        tensors.push((name, shape, bytes));
    };
    let lin = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    push("model.embed_tokens.weight".into(), vec![v, c], 1.0, 0.0);
    for l in 0..layers {
        let p = format!("model.layers.{l}.");
        push(format!("{p}input_layernorm.weight"), vec![c], 0.1, 1.0);
        push(
            format!("{p}self_attn.q_proj.weight"),
            vec![q, c],
            lin(c),
            0.0,
        );
        push(
            format!("{p}self_attn.k_proj.weight"),
            vec![kv, c],
            lin(c),
            0.0,
        );
        push(
            format!("{p}self_attn.v_proj.weight"),
            vec![kv, c],
            lin(c),
            0.0,
        );
        push(
            format!("{p}self_attn.o_proj.weight"),
            vec![c, q],
            lin(q),
            0.0,
        );
        push(
            format!("{p}post_attention_layernorm.weight"),
            vec![c],
            0.1,
            1.0,
        );
        push(format!("{p}mlp.gate_proj.weight"), vec![i, c], lin(c), 0.0);
        push(format!("{p}mlp.up_proj.weight"), vec![i, c], lin(c), 0.0);
        push(format!("{p}mlp.down_proj.weight"), vec![c, i], lin(i), 0.0);
    }
    push("model.norm.weight".into(), vec![c], 0.1, 1.0);
    let writes: Vec<WriteTensor<'_>> = tensors
        .iter()
        .map(|(name, shape, data)| WriteTensor {
            name,
            dtype: Dtype::BF16,
            shape,
            data,
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &writes, None)?;
    let config = json!({
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": c,
        "intermediate_size": i,
        "num_hidden_layers": layers,
        "num_attention_heads": nh,
        "num_key_value_heads": nkv,
        "vocab_size": v,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": true,
        "eos_token_id": 2,
        "bos_token_id": 1,
        "torch_dtype": "bfloat16",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).map_err(io)?;
    Ok(())
}

fn panicked(p: Box<dyn std::any::Any + Send>) -> CudaError {
    let text = p
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".to_string());
    CudaError::BadArgument {
        op: "gpu-check",
        arg: "(panic in the check harness)",
        reason: text,
    }
}

fn kernel_err(e: cloudrm_kernels::KernelError) -> CudaError {
    CudaError::BadArgument {
        op: "reference",
        arg: "(cpu reference)",
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_l2_never_passes_nan() {
        assert_eq!(rel_l2(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!(rel_l2(&[f32::NAN, 2.0], &[1.0, 2.0]).is_infinite());
        assert!(rel_l2(&[f32::INFINITY], &[1.0]).is_infinite());
        assert!(rel_l2(&[1.0], &[0.0]).is_infinite());
        assert!(!Outcome::rel_l2(f64::NAN, 1e-2, 0.0).pass);
        assert!((rel_l2(&[1.0, 0.0], &[0.0, 1.0]) - 2f64.sqrt()).abs() < 1e-12);
    }

    /// sampling.cu's algorithm, step for step, in Rust (1024 "threads": the chunked
    /// inverse CDF, the radix select, the top-p binary search over order keys), so its
    /// logic is checked against the CPU `Sampler` here; gpu-check runs the kernel itself.
    fn emulate_sample_kernel(
        x: &mut [f32],
        hist: &[u32],
        counter: [u32; 4],
        p: &cloudrm_sampler::SamplingParams,
    ) -> (u32, u32) {
        const NONE: u32 = u32::MAX;
        let v = x.len();
        let nan = x.iter().filter(|f| f.is_nan()).count();
        x.iter_mut()
            .filter(|f| f.is_nan())
            .for_each(|f| *f = f32::NEG_INFINITY);
        if nan == v {
            return (NONE, 1);
        }
        if p.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &t in hist {
                if seen.insert(t) {
                    let f = x[t as usize];
                    x[t as usize] = if f < 0.0 {
                        f * p.repetition_penalty
                    } else {
                        f / p.repetition_penalty
                    };
                }
            }
        }
        if x.contains(&f32::INFINITY) {
            x.iter_mut().for_each(|f| {
                *f = if *f == f32::INFINITY {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            });
        }
        let sel = |f: f32| f > f32::NEG_INFINITY;
        let n_sel = x.iter().filter(|&&f| sel(f)).count();
        if n_sel == 0 {
            return (NONE, 2);
        }
        let max0 = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let top = x.iter().position(|&f| f == max0).unwrap() as u32;
        if p.temperature <= 0.0 {
            return (top, 0);
        }
        x.iter_mut().for_each(|f| *f = (*f - max0) / p.temperature);
        let key = |f: f32| {
            let b = f.to_bits();
            if b & 0x8000_0000 != 0 {
                !b
            } else {
                b | 0x8000_0000
            }
        };
        let unkey = |k: u32| {
            f32::from_bits(if k & 0x8000_0000 != 0 {
                k & 0x7fff_ffff
            } else {
                !k
            })
        };
        if p.top_k > 0 && p.top_k < n_sel {
            let (mut prefix, mut mask, mut want) = (0u32, 0u32, p.top_k as u32);
            for shift in [24u32, 16, 8, 0] {
                let mut h = [0u32; 256];
                for &f in x.iter() {
                    let k = key(f);
                    if sel(f) && k & mask == prefix {
                        h[((k >> shift) & 255) as usize] += 1;
                    }
                }
                let (mut acc, mut d) = (0u32, 255u32);
                for b in (0..256).rev() {
                    if acc + h[b] >= want {
                        d = b as u32;
                        break;
                    }
                    acc += h[b];
                }
                prefix |= d << shift;
                mask |= 255 << shift;
                want -= acc;
            }
            let kth = unkey(prefix);
            x.iter_mut()
                .filter(|f| **f < kth)
                .for_each(|f| *f = f32::NEG_INFINITY);
        }
        let max_sum = |x: &[f32]| {
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            (m, x.iter().map(|&f| (f - m).exp()).sum::<f32>())
        };
        let (mx, sum) = max_sum(x);
        let thr = crate::backend::cuda::sample_params(p).top_p_threshold();
        if thr >= 0.0 && n_sel > 1 {
            let top_now = x.iter().position(|&f| f == mx).unwrap();
            let okey = |f: f32, id: usize| ((key(f) as u64) << 32) | (!(id as u32)) as u64;
            let (mut lo, mut hi, mut found) = (0u64, u64::MAX, None);
            for _ in 0..65 {
                if lo > hi {
                    break;
                }
                let mid = lo + (hi - lo) / 2;
                let mass: f32 = x
                    .iter()
                    .enumerate()
                    .filter(|&(i, &f)| sel(f) && okey(f, i) <= mid)
                    .map(|(_, &f)| (f - mx).exp() / sum)
                    .sum();
                if mass <= thr {
                    found = Some(mid);
                    if mid == u64::MAX {
                        break;
                    }
                    lo = mid + 1;
                } else {
                    if mid == 0 {
                        break;
                    }
                    hi = mid - 1;
                }
            }
            if let Some(k) = found {
                for (i, f) in x.iter_mut().enumerate() {
                    if i != top_now && sel(*f) && okey(*f, i) <= k {
                        *f = f32::NEG_INFINITY;
                    }
                }
            }
        }
        if p.min_p > 0.0 {
            let (m2, s2) = max_sum(x);
            let t = p.min_p * (1.0 / s2);
            x.iter_mut()
                .filter(|f| (**f - m2).exp() / s2 < t)
                .for_each(|f| *f = f32::NEG_INFINITY);
        }
        let nt = 1024;
        // The kernel's block sum: per-thread strided partials, then a tree over threads.
        let (mx, _) = max_sum(x);
        let mut partial: Vec<f32> = (0..nt)
            .map(|t| x.iter().skip(t).step_by(nt).map(|&f| (f - mx).exp()).sum())
            .collect();
        while partial.len() > 1 {
            let half = partial.len() / 2;
            for i in 0..half {
                partial[i] += partial[i + half];
            }
            partial.truncate(half);
        }
        let sum = partial[0];
        let chunk = v.div_ceil(nt);
        let prob = |f: f32| (f - mx).exp() / sum;
        let coin = cloudrm_sampler::uniform_from_bits(
            cloudrm_sampler::philox4x32_10(counter, [p.seed as u32, (p.seed >> 32) as u32])[0],
        );
        let mut offset = 0.0f32;
        let mut last_nz = None;
        for t in 0..nt {
            let (c0, c1) = ((t * chunk).min(v), ((t + 1) * chunk).min(v));
            let mut cdf = offset;
            let mut local = 0.0f32;
            for (i, &f) in x.iter().enumerate().take(c1).skip(c0) {
                let pr = prob(f);
                if pr > 0.0 {
                    cdf += pr;
                    local += pr;
                    last_nz = Some(i);
                    if coin < cdf {
                        return (i as u32, 0);
                    }
                }
            }
            offset += local;
        }
        (last_nz.map_or(top, |i| i as u32), 0)
    }

    /// The kernel's emulation against the CPU sampler over the six parameter sets of
    /// stage (a), `rows` rows each at vocabulary `v` (scales 3 and 8 alternating when
    /// `peaked`, else stage (a)'s 3). Returns (rows that differ, rows, the largest coin
    /// distance of a differing row).
    fn emulated_vs_cpu(v: usize, rows: u64, peaked: bool) -> (usize, usize, f64) {
        use cloudrm_sampler::{Sampler, SamplerError, SamplingParams, SeqRng};
        let base = SamplingParams::default();
        let sets = [
            SamplingParams::cloud_critique(),
            SamplingParams::cloud_self_consistency(3),
            SamplingParams {
                temperature: 0.8,
                top_k: 50,
                seed: 4,
                ..base.clone()
            },
            SamplingParams {
                temperature: 1.0,
                top_k: 1,
                seed: 4,
                ..base.clone()
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 0.9,
                seed: 5,
                ..base.clone()
            },
            SamplingParams {
                temperature: 2.0,
                top_p: 0.3,
                seed: 5,
                ..base.clone()
            },
            SamplingParams {
                temperature: 1.0,
                min_p: 0.05,
                repetition_penalty: 1.3,
                seed: 6,
                ..base.clone()
            },
            SamplingParams {
                temperature: 0.7,
                top_k: 40,
                top_p: 0.8,
                min_p: 0.01,
                repetition_penalty: 1.1,
                seed: 7,
                ..base.clone()
            },
        ];
        let mut rng = Rng(99);
        let (mut total, mut differ) = (0usize, 0usize);
        let mut worst = 0.0f64;
        for p in sets {
            let mut sampler = Sampler::new(p.clone(), v).unwrap();
            for r in 0..rows {
                // Peaked rows (scale 8) put real mass on few tokens; some exact ties.
                let scale = if r % 2 == 0 || !peaked { 3.0 } else { 8.0 };
                let mut row = rng.f32s(v, scale);
                if r % 5 == 0 {
                    row[7] = row[3];
                }
                match r {
                    0 => row.fill(f32::NAN),
                    1 => row.fill(f32::NEG_INFINITY),
                    2 => {
                        row[5] = f32::INFINITY;
                        row[17] = f32::INFINITY;
                    }
                    _ => {}
                }
                let hist: Vec<u32> = (0..(r % 7) * 5)
                    .map(|_| rng.below(v.min(64 + r as usize * 8)) as u32)
                    .collect();
                let (seq, step) = (1000 + r, 3 + 2 * r);
                let counter = [
                    step as u32,
                    (step >> 32) as u32,
                    seq as u32,
                    (seq >> 32) as u32,
                ];
                let mut a = row.clone();
                let mut srng = SeqRng::new(p.seed, seq);
                srng.set_step(step);
                let want = match sampler.sample(&mut a, &hist, &mut srng) {
                    Ok(t) => (t, 0),
                    Err(SamplerError::AllNan { .. }) => (u32::MAX, 1),
                    Err(SamplerError::AllMasked { .. }) => (u32::MAX, 2),
                    Err(e) => panic!("{e}"),
                };
                let got = emulate_sample_kernel(&mut row, &hist, counter, &p);
                assert_eq!(got.1, want.1, "status, row {r}, {p:?}");
                if p.is_greedy() {
                    assert_eq!(got, want, "greedy row {r}");
                }
                total += 1;
                differ += usize::from(got != want);
                if got != want {
                    worst = worst.max(coin_distance(&a, srng.uniform_at(step), got.0));
                }
            }
        }
        (differ, total, worst)
    }

    #[test]
    fn the_sampling_kernels_algorithm_agrees_with_the_cpu_sampler() {
        // Only sums in another order separate them: a coin or a threshold within rounding.
        let (differ, total, worst) = emulated_vs_cpu(3001, 40, true);
        println!("{differ} of {total} rows differ, coin distance at most {worst:.2e}");
        assert!(differ * 100 <= total, "{differ} of {total} rows differ");
        assert!(worst <= COIN_TOL / 10.0, "{worst}");
        // Stage (a)'s own sizes: V = 49152, flat rows. More rows differ (the CPU's
        // index-order sum drifts), each within rounding.
        let (differ, total, worst) = emulated_vs_cpu(49152, 24, false);
        println!("V=49152: {differ} of {total} rows differ, coin distance at most {worst:.2e}");
        assert!(
            differ as f64 <= SAMPLE_DISAGREEMENT * total as f64,
            "{differ} of {total}"
        );
        assert!(worst <= COIN_TOL / 5.0, "{worst}");
    }

    /// Samples `rows` flat rows of the full SmolLM2 vocabulary with the kernel's emulation
    /// at `gpu_t` and the CPU sampler at T = 0.5; returns (largest coin distance of a
    /// differing row, share of differing rows).
    fn flat_rows(rows: u64, gpu_t: f32, shift: u32) -> (f64, f64) {
        use cloudrm_sampler::{Sampler, SamplingParams, SeqRng};
        let v = 49152;
        let p = SamplingParams::cloud_self_consistency(11);
        let q = SamplingParams {
            temperature: gpu_t,
            ..p.clone()
        };
        let mut sampler = Sampler::new(p.clone(), v).unwrap();
        let mut rng = Rng(5);
        let (mut worst, mut differ) = (0.0f64, 0usize);
        for r in 0..rows {
            let row = rng.f32s(v, 3.0);
            let (seq, step) = (1000 + r, 3 + 2 * r);
            let counter = [step as u32, 0, seq as u32, 0];
            let mut a = row.clone();
            let mut srng = SeqRng::new(p.seed, seq);
            srng.set_step(step);
            let coin = srng.uniform_at(step);
            let want = sampler.sample(&mut a, &[], &mut srng).unwrap();
            let got =
                (emulate_sample_kernel(&mut row.clone(), &[], counter, &q).0 + shift) % v as u32;
            if got != want {
                differ += 1;
                worst = worst.max(coin_distance(&a, coin, got));
            }
        }
        (worst, differ as f64 / rows as f64)
    }

    /// The case an H200 showed: flat rows of V = 49152 at T = 0.5 differ often through
    /// summation order alone, always at a coin distance far below COIN_TOL; a wrong
    /// temperature or an index off by one fails the stage (a) rule.
    #[test]
    fn flat_rows_differ_only_within_rounding() {
        let (dist, share) = flat_rows(60, 0.5, 0);
        println!("flat rows: {share:.3} differ, coin distance at most {dist:.2e}");
        assert!(dist <= COIN_TOL / 5.0, "{dist}");
        assert!(share <= SAMPLE_DISAGREEMENT, "{share}");
        assert!(sampled_outcome(dist, share, 0.0).pass);
        let (dist, share) = flat_rows(30, 0.55, 0);
        println!("T 0.55 for 0.5: {share:.3} differ, coin distance up to {dist:.2e}");
        assert!(!sampled_outcome(dist, share, 0.0).pass, "{dist} {share}");
        let (dist, share) = flat_rows(30, 0.5, 1);
        println!("index + 1: {share:.3} differ, coin distance up to {dist:.2e}");
        assert!(!sampled_outcome(dist, share, 0.0).pass, "{dist} {share}");
    }

    #[test]
    fn coin_distance_hand_values() {
        let p = [0.25f32, 0.0, 0.5, 0.25];
        // CDF: [0, .25) -> 0, empty at .25 -> 1, [.25, .75) -> 2, [.75, 1) -> 3.
        assert_eq!(coin_distance(&p, 0.1, 0), 0.0);
        assert_eq!(coin_distance(&p, 0.5, 2), 0.0);
        assert!((coin_distance(&p, 0.5, 0) - 0.25).abs() < 1e-9);
        assert!((coin_distance(&p, 0.5, 3) - 0.25).abs() < 1e-9);
        assert!((coin_distance(&p, 0.3, 1) - 0.05).abs() < 1e-7);
        // Unnormalised probabilities are measured as shares of their total.
        assert!((coin_distance(&[2.0, 2.0], 0.75, 0) - 0.25).abs() < 1e-9);
        assert_eq!(coin_distance(&p, 0.5, 4), f64::INFINITY);
        assert_eq!(coin_distance(&[0.0, 0.0], 0.5, 0), f64::INFINITY);
        // The outcome: both rules must hold; the failing one is reported.
        assert!(sampled_outcome(1e-6, 0.2, 0.0).pass);
        let o = sampled_outcome(1e-3, 0.2, 0.0);
        assert!(!o.pass && o.metric == "coin_distance");
        let o = sampled_outcome(1e-6, 0.9, 0.0);
        assert!(!o.pass && o.metric == "disagreement");
    }

    #[test]
    fn greedy_divergence_is_accepted_only_at_a_near_tie() {
        // CPU logits of step 0 (choosing want[1]) and step 1 (choosing want[2]).
        let mut row0 = vec![0.0f32; 8];
        row0[3] = 10.0;
        row0[5] = 9.99; // a near tie with token 3
        row0[6] = 2.0;
        let rows = vec![row0.clone(), row0];
        let want = [1u32, 3, 3];
        assert!(same_or_near_tie(&[1, 3, 3], &want, &rows));
        // Diverges at token 1 to the near-tied 5: accepted.
        assert!(same_or_near_tie(&[1, 5, 0], &want, &rows));
        // Diverges to 6, far below: rejected; at the first token (no logits): rejected.
        assert!(!same_or_near_tie(&[1, 6, 3], &want, &rows));
        assert!(!same_or_near_tie(&[2, 3, 3], &want, &rows));
        assert!(!same_or_near_tie(&[1, 3], &want, &rows));
        // Disagreement counts mismatches and missing ids.
        let d = disagreement(&[1, 2, 3], &[1, 2, 4, 5], 0.0);
        assert!((d.value - 0.5).abs() < 1e-12 && !d.pass);
        assert!(disagreement(&[7; 20], &[7; 20], 0.0).pass);
    }

    /// Every check's host side (inputs, plans, CPU references) runs without panicking
    /// and the files are written, on a machine without a GPU.
    #[test]
    fn dry_run_exercises_every_check_host_side() {
        let out =
            std::env::temp_dir().join(format!("cloudrm-gpu-check-dry-{}", std::process::id()));
        let r = run(&Options {
            out: out.clone(),
            quick: true,
            seed: 7,
            dry_run: true,
            filter: None,
            bench: Some(crate::gpu_bench::BenchSpec::llama3_8b()),
            stages: Stages::ALL,
            append: false,
            tokenizer: None,
        })
        .unwrap();
        assert_eq!(r.failed, 0);
        assert!(r.passed > 60, "{r:?}");
        let log = std::fs::read_to_string(out.join("gpu-check.log")).unwrap();
        assert!(log.contains("llama_prefill(logits)"), "{log}");
        let jsonl = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
        assert_eq!(jsonl.lines().count(), r.passed + 1);
        std::fs::remove_dir_all(out).ok();
    }

    /// `--stages` parses letters of "abc" once each; anything else is a usage error.
    #[test]
    fn stages_parse() {
        assert_eq!(Stages::parse("abc").unwrap(), Stages::ALL);
        let b = Stages::parse("b").unwrap();
        assert!(!b.a && b.b && !b.c);
        assert_eq!(Stages::parse("ca").unwrap().text(), "ac");
        for bad in ["", "ab d", "aa", "x"] {
            let e = Stages::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--stages"), "{bad:?}: {e}");
        }
    }

    /// Stages run one per process append to one file set: the second run keeps the
    /// first run's records; without --append the files are replaced.
    #[test]
    fn stages_append_to_one_file_set() {
        let out =
            std::env::temp_dir().join(format!("cloudrm-gpu-check-append-{}", std::process::id()));
        let opts = |stages: &str, append: bool| Options {
            out: out.clone(),
            quick: true,
            seed: 3,
            dry_run: true,
            filter: None,
            bench: Some(crate::gpu_bench::BenchSpec::llama3_8b()),
            stages: Stages::parse(stages).unwrap(),
            append,
            tokenizer: None,
        };
        let lines = || {
            std::fs::read_to_string(out.join("results.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        };
        let ra = run(&opts("a", false)).unwrap();
        let stage_of = |v: &Value| v["stage"].as_str().unwrap().to_string();
        let first = lines();
        assert_eq!(first.len(), ra.passed + 1);
        assert!(first[..ra.passed].iter().all(|v| stage_of(v) == "a"));
        let rb = run(&opts("bc", true)).unwrap();
        let both = lines();
        assert_eq!(both.len(), ra.passed + rb.passed + 2);
        assert_eq!(both[..first.len()], first[..]);
        let later: Vec<String> = both[first.len()..].iter().map(stage_of).collect();
        assert!(later.iter().any(|s| s == "b") && later.iter().any(|s| s == "c"));
        assert!(!later.iter().any(|s| s == "a"), "{later:?}");
        let log = std::fs::read_to_string(out.join("gpu-check.log")).unwrap();
        assert!(
            log.contains("stages a ") && log.contains("stages bc "),
            "{log}"
        );
        // Without --append the files start again.
        let rb2 = run(&opts("b", false)).unwrap();
        assert_eq!(lines().len(), rb2.passed + 1);
        std::fs::remove_dir_all(out).ok();
    }

    fn round_bf16(v: &mut [f32]) {
        for x in v.iter_mut() {
            *x = bf16::from_f32(*x).to_f32();
        }
    }

    /// Stage (b)'s numerics on the CPU: the GPU pipeline's order of ops and its bf16
    /// roundings (normed rows, QKV, rotated q/k, attention output, projections, SwiGLU)
    /// emulated with the CPU kernels, against the CPU model. Shows that the stage (b)
    /// thresholds hold for a correct GPU forward. Returns (logits rel. L2, disagreement).
    fn emulate_stage_b(layers: usize, t: usize) -> (f64, f64, f64, f64) {
        use cloudrm_kernels::cpu;
        use cloudrm_kernels::reference::attention::{AttnShape, attention_forward};
        let dir = std::env::temp_dir().join(format!(
            "cloudrm-gpu-check-emulate-{}-{layers}",
            std::process::id()
        ));
        let mut rng = Rng(11);
        write_random_llama(&dir, layers, &mut rng).unwrap();
        let model = crate::model::Llama::load_dir(&dir).unwrap();
        let cfg = model.config.clone();
        let w = &model.weights;
        let (c, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (nh, nkv, hs) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let (q_d, kv_d) = (nh * hs, nkv * hs);
        let eps = cfg.rms_norm_eps;
        let ids: Vec<u32> = (0..t).map(|_| rng.below(v) as u32).collect();
        let mut sess = model.new_session(t, t);
        let want = model
            .forward(
                &crate::backend::Cpu::fast(),
                &mut sess,
                &ids,
                crate::model::LogitsMode::All,
            )
            .unwrap()
            .to_vec();

        let pos: Vec<u32> = (0..t as u32).collect();
        let mut x = vec![0.0; t * c];
        cpu::embedding_forward(&mut x, &ids, w.get(&w.embed), c).unwrap();
        let mut xn = vec![0.0; t * c];
        cpu::rmsnorm_forward(&mut xn, &x, w.get(&w.layers[0].attn_norm), eps).unwrap();
        round_bf16(&mut xn);
        let (mut q, mut k, mut vv) = (vec![0.0; t * q_d], vec![0.0; t * kv_d], vec![0.0; t * kv_d]);
        let mut att = vec![0.0; t * q_d];
        let mut scores = vec![0.0; t];
        let mut proj = vec![0.0; t * c];
        let (mut g, mut u, mut act) = (vec![0.0; t * i], vec![0.0; t * i], vec![0.0; t * i]);
        for (l, lw) in w.layers.iter().enumerate() {
            cpu::matmul_forward(&mut q, &xn, w.get(&lw.q_proj), None, c, q_d).unwrap();
            cpu::matmul_forward(&mut k, &xn, w.get(&lw.k_proj), None, c, kv_d).unwrap();
            cpu::matmul_forward(&mut vv, &xn, w.get(&lw.v_proj), None, c, kv_d).unwrap();
            for b in [&mut q, &mut k, &mut vv] {
                round_bf16(b);
            }
            cpu::rope_forward(&mut q, &pos, nh, hs, &model.inv_freq).unwrap();
            cpu::rope_forward(&mut k, &pos, nkv, hs, &model.inv_freq).unwrap();
            round_bf16(&mut q);
            round_bf16(&mut k);
            let shape = AttnShape {
                n_tokens: t,
                pos0: 0,
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hs,
            };
            attention_forward(&mut att, &q, &k, &vv, &mut scores, shape).unwrap();
            round_bf16(&mut att);
            cpu::matmul_forward(&mut proj, &att, w.get(&lw.o_proj), None, q_d, c).unwrap();
            round_bf16(&mut proj);
            cpu::residual_forward(&mut x, &proj).unwrap();
            cpu::rmsnorm_forward(&mut xn, &x, w.get(&lw.mlp_norm), eps).unwrap();
            round_bf16(&mut xn);
            cpu::matmul_forward(&mut g, &xn, w.get(&lw.gate_proj), None, c, i).unwrap();
            cpu::matmul_forward(&mut u, &xn, w.get(&lw.up_proj), None, c, i).unwrap();
            round_bf16(&mut g);
            round_bf16(&mut u);
            cpu::swiglu_forward(&mut act, &g, &u).unwrap();
            round_bf16(&mut act);
            cpu::matmul_forward(&mut proj, &act, w.get(&lw.down_proj), None, i, c).unwrap();
            round_bf16(&mut proj);
            cpu::residual_forward(&mut x, &proj).unwrap();
            let next = match w.layers.get(l + 1) {
                Some(n) => w.get(&n.attn_norm),
                None => w.get(&w.final_norm),
            };
            cpu::rmsnorm_forward(&mut xn, &x, next, eps).unwrap();
            round_bf16(&mut xn);
        }
        let mut logits = vec![0.0; t * v];
        cpu::matmul_forward(&mut logits, &xn, w.get(&w.lm_head), None, c, v).unwrap();
        // The untrained reward head at the last position: f32 weights and hidden on the
        // CPU; bf16 weights (as uploaded) and the bf16 hidden on the GPU.
        let head = crate::model::RewardHead::untrained(c, crate::model::UNTRAINED_HEAD_SEED);
        let crate::model::RewardHead::Untrained {
            dense_w,
            dense_b,
            out_w,
            out_b,
        } = &head
        else {
            unreachable!("untrained heads are dense-tanh")
        };
        let reward = |h: &[f32], dw: &[f32], ow: &[f32]| -> f64 {
            let mut r = [0.0f32];
            let mut z = vec![0.0; c];
            cloudrm_kernels::reference::heads::reward_head_forward(
                &mut r,
                h,
                &cloudrm_kernels::reference::heads::RewardHeadWeights::DenseTanh {
                    dense_w: Weights::F32(dw),
                    dense_b,
                    out_w: Weights::F32(ow),
                    out_b: *out_b,
                },
                &mut z,
            )
            .unwrap();
            r[0] as f64
        };
        let want_r = reward(sess.last_hidden(), dense_w, out_w);
        let (mut dw, mut ow) = (dense_w.clone(), out_w.clone());
        round_bf16(&mut dw);
        round_bf16(&mut ow);
        let got_r = reward(&xn[(t - 1) * c..], &dw, &ow);
        drop(model);
        std::fs::remove_dir_all(&dir).ok();
        let am = |l: &[f32]| -> Vec<Option<usize>> {
            l.chunks_exact(v).map(cloudrm_sampler::argmax).collect()
        };
        let disagree = am(&logits)
            .iter()
            .zip(am(&want))
            .filter(|(a, b)| **a != *b)
            .count() as f64
            / t as f64;
        // The largest CPU margin (in standard deviations of the row) at which the
        // emulated GPU picked another token: what the near-tie rule must cover.
        let worst_margin = am(&logits)
            .iter()
            .zip(am(&want))
            .enumerate()
            .filter(|(_, (a, b))| **a != *b)
            .map(|(r, (a, b))| {
                let row = &want[r * v..(r + 1) * v];
                let (w, g) = (b.unwrap_or(0), a.unwrap_or(0));
                let n = v as f32;
                let mean = row.iter().sum::<f32>() / n;
                let sd = (row.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n).sqrt();
                ((row[w] - row[g]) / sd) as f64
            })
            .fold(0.0f64, f64::max);
        (
            rel_l2(&logits, &want),
            disagree,
            (got_r - want_r).abs(),
            worst_margin,
        )
    }

    #[test]
    fn stage_b_thresholds_hold_for_bf16_activations() {
        let (e, d, r, m) = emulate_stage_b(2, 17);
        println!(
            "2 layers: logits rel L2 {e:.3e}, disagreement {d:.3}, reward diff {r:.2e}, worst flipped margin {m:.4} sd"
        );
        assert!(e < REL_L2_MODEL / 2.0 && d <= MAX_DISAGREEMENT, "{e} {d}");
        assert!(r < REWARD_TOL / 2.0, "{r}");
        assert!(m < f64::from(NEAR_TIE) / 2.0, "{m}");
    }

    /// The default model's depth (about 10 s on 2 cores): run with --ignored. Seen
    /// 2026-11-27: logits rel. L2 1.17e-2, 1 of 37 greedy tokens different (at 300
    /// positions: 11 flips, the worst at a margin of 0.034 sd).
    #[test]
    #[ignore]
    fn stage_b_thresholds_hold_for_bf16_activations_30_layers() {
        let (e, d, r, m) = emulate_stage_b(30, 37);
        println!(
            "30 layers: logits rel L2 {e:.3e}, disagreement {d:.3}, reward diff {r:.2e}, worst flipped margin {m:.4} sd"
        );
        assert!(e < REL_L2_MODEL && d <= MAX_DISAGREEMENT, "{e} {d}");
        assert!(r < REWARD_TOL, "{r}");
        assert!(m < f64::from(NEAR_TIE) / 2.0, "{m}");
    }
}
