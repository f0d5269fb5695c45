//! `cloudrm bench`: the numbers the performance claims rest on, measured in one process
//! on the machine at hand.
//!
//! - **load**: mmap + header validation + weight handles of the model directory.
//! - **prefill**: one P-token sequence through the paged engine (the scoring path).
//! - **decode**: single-stream greedy decode of N tokens after that prefill (engine step +
//!   full LM head + argmax), and its roofline fraction: weight bytes read per token times
//!   tokens/s over the read bandwidth measured by this same command.
//! - **critiques**: the CLoud job, K critiques of exactly T tokens (stop tokens ignored)
//!   after a P-token `[prompt, response, COT prompt]` prefix, sampled at temperature 0.5,
//!   rewards read by the dual head: with prefix sharing (one prefill, forked blocks,
//!   cascade attention) and, as the baseline in the same run, without (K private prefills,
//!   plain paged attention); both arms decode in lock step.
//! - **read bandwidth**: a multi-threaded read-only streaming sum over a buffer far larger
//!   than the caches (best of three passes; the buffer advised for 2 MiB pages, the
//!   fastest way this machine streams memory), measured last so it does not count in the
//!   peak RSS reported for the model work.
//!
//! A model directory without a reward head gets the seeded untrained head: the rewards
//! are meaningless, the work is the real job's.

use std::path::Path;
use std::time::Instant;

use cloudrm_kernels::cpu::{dispatch, pool};
use cloudrm_loader::template::ChatTemplate;
use cloudrm_loader::tokenizer::Tokenizer;
use serde::Serialize;

use crate::backend::Cpu;
use crate::cloud::{CloudScorer, CloudTemplate, ScoreOptions};
use crate::engine::{KvCache, PREFILL_ROWS, PagedEngine, lm_greedy};
use crate::error::{Error, Result};
use crate::kv::PrefixKey;
use crate::kv::SeqId;
use crate::model::heads::FeedbackMethod;
use crate::model::weights::HugePages;
use crate::model::{Llama, LogitsMode, ModelError, RewardModel};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Prefill length P (tokens).
    pub prefill_tokens: usize,
    /// Single-stream decode length (tokens).
    pub decode_tokens: usize,
    /// Critiques per job, one job per entry (empty: skip the critique job).
    pub ks: Vec<usize>,
    /// Tokens per critique.
    pub critique_tokens: usize,
    /// Prefix length of the critique job (tokens).
    pub prefix_tokens: usize,
    /// Also run the unshared baseline of the critique job.
    pub unshared: bool,
    /// Bytes of the read-bandwidth buffer (0: skip).
    pub bandwidth_bytes: usize,
    /// Quantise the weights to Q8 after loading (`--quantize q8`).
    pub quantize_q8: bool,
    /// Put the weights on 2 MiB pages after loading, and how (`--hugepages=copy|cache`).
    pub huge_pages: Option<HugePages>,
    /// Without `huge_pages`: copy the weights to 2 MiB pages when the copy fits
    /// ([`crate::model::weights::LlamaWeights::copy_fits`]), as the CLI's decoding jobs
    /// do by default (`--hugepages` unset or `auto`); false keeps the mapping (`off`).
    pub huge_pages_auto: bool,
    /// What the KV cache holds (`--kv-cache`).
    pub kv_cache: KvCache,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            prefill_tokens: 512,
            decode_tokens: 128,
            ks: vec![1, 4, 8, 16],
            critique_tokens: 128,
            prefix_tokens: 512,
            unshared: true,
            bandwidth_bytes: 1 << 30,
            quantize_q8: false,
            huge_pages: None,
            huge_pages_auto: true,
            kv_cache: KvCache::F32,
        }
    }
}

/// The machine a report was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct MachineInfo {
    pub cpu: String,
    pub isa: String,
    pub threads: usize,
    /// Physical cores the process may run on (`null` where the OS does not say).
    pub physical_cores: Option<usize>,
    /// CPUs the process may use (the available parallelism).
    pub logical_cpus: usize,
}

/// One arm of the critique job.
#[derive(Debug, Clone, Serialize)]
pub struct JobArm {
    pub seconds: f64,
    /// Critique tokens decoded (K * T) plus the K end-of-turn steps, per second.
    pub tokens_per_s: f64,
    pub prefix_blocks_allocated: usize,
}

/// The critique job at one K.
#[derive(Debug, Clone, Serialize)]
pub struct CritiqueRow {
    pub k: usize,
    pub prefix_tokens: usize,
    pub critique_tokens: usize,
    pub shared: JobArm,
    pub unshared: Option<JobArm>,
    /// unshared seconds / shared seconds.
    pub speedup: Option<f64>,
    /// This job's shared tokens/s over the K = 1 job's (None when K = 1 was not run).
    pub rate_vs_k1: Option<f64>,
}

/// Everything `cloudrm bench` measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub machine: MachineInfo,
    pub model: String,
    pub weight_dtype: String,
    /// Element type of the KV cache ("f32" or "f16").
    pub kv_cache: String,
    pub decode_weight_bytes_per_token: usize,
    pub load_ms: f64,
    /// Time of the Q8 quantisation after the load (absent without `--quantize q8`).
    pub quantize_ms: Option<f64>,
    /// What the quantisation costs on this model: the q8 logits' relative L2 distance
    /// from the 16-bit model's over every position of a built-in text (not the
    /// calibration text), and the fraction of those positions whose argmax agrees (absent
    /// without `--quantize q8`).
    pub q8_logits_rel_l2: Option<f64>,
    pub q8_argmax_agreement: Option<f64>,
    /// Time of putting the weights on 2 MiB pages after the load (absent when they were
    /// not: `--hugepages=off`, q8, or an auto copy that did not fit).
    pub huge_pages_ms: Option<f64>,
    /// How it was done: "page-cache" (mapped as cached), "reread" (the file's cache
    /// dropped and read back in 2 MiB folios) or "copied".
    pub huge_pages_route: Option<String>,
    /// Whether the route was auto's choice (no `--hugepages=copy|cache`).
    pub huge_pages_auto: bool,
    /// Fraction of the mapped weights the kernel maps with 2 MiB pages after the
    /// single-stream decode (None where unknown), with or without `--hugepages`.
    pub weights_on_huge_pages: Option<f64>,
    pub prefill_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens: usize,
    /// Single-stream decode from an empty context (one token, as llama-bench's tg).
    pub decode_tokens_per_s: f64,
    /// The same decode right after the prefill, i.e. at a depth of `prefill_tokens`
    /// (attention over the prompt's KV adds to every step).
    pub decode_after_prefill_tokens_per_s: f64,
    pub critiques: Vec<CritiqueRow>,
    /// Peak resident set of the process after the model work (before the bandwidth
    /// buffer), MiB.
    pub peak_rss_mib: Option<f64>,
    pub read_bandwidth_gb_s: Option<f64>,
    /// decode_weight_bytes_per_token * decode_tokens_per_s / read bandwidth.
    pub decode_roofline_fraction: Option<f64>,
}

/// Run the benchmark on the model in `dir` (a reward model, or a plain causal LM which
/// gets the untrained head). `progress` receives one line per finished stage.
pub fn run(dir: &Path, cfg: &BenchConfig, mut progress: impl FnMut(&str)) -> Result<BenchReport> {
    if cfg.prefill_tokens == 0 || cfg.decode_tokens == 0 || cfg.ks.contains(&0) {
        return Err(Error::Usage(
            "bench: prefill, decode and every K must be positive".into(),
        ));
    }
    let cpu = Cpu::fast();
    let t0 = Instant::now();
    let mut model = match RewardModel::load_dir(dir) {
        Ok(m) => m,
        Err(Error::Model(ModelError::NoRewardHead { .. })) => {
            RewardModel::with_untrained_head(Llama::load_dir(dir)?, FeedbackMethod::Cloud)
        }
        Err(e) => return Err(e),
    };
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    // Milliseconds of an optional step after the load (None when not asked for).
    let timed = |on: bool, step: &mut dyn FnMut() -> Result<()>| -> Result<Option<f64>> {
        if !on {
            return Ok(None);
        }
        let t = Instant::now();
        step()?;
        Ok(Some(t.elapsed().as_secs_f64() * 1e3))
    };
    let tokenizer = Tokenizer::from_dir(dir)?;
    // q8's accuracy: the 16-bit logits of a built-in text, then the quantised ones.
    let accuracy_ids = filler_ids(&tokenizer, ACCURACY_TOKENS)?;
    let before = match cfg.quantize_q8 {
        true => Some(all_logits(&model.llama, &cpu, &accuracy_ids)?),
        false => None,
    };
    // (The calibration pass over the built-in text is part of the quantisation time.)
    let quantize_ms = timed(cfg.quantize_q8, &mut || {
        model.llama.quantize_q8_with_text(&cpu, &tokenizer)
    })?;
    let (mut q8_logits_rel_l2, mut q8_argmax_agreement) = (None, None);
    if let Some(want) = before {
        let got = all_logits(&model.llama, &cpu, &accuracy_ids)?;
        let (rel, agree) = logits_agreement(&got, &want, model.llama.config.vocab_size);
        (q8_logits_rel_l2, q8_argmax_agreement) = (Some(rel), Some(agree));
    }
    let weights = &mut model.llama.weights;
    let huge_pages_auto = cfg.huge_pages.is_none() && cfg.huge_pages_auto && weights.copy_fits();
    let huge_pages = cfg
        .huge_pages
        .or(huge_pages_auto.then_some(HugePages::Copy));
    let mut route = None;
    let huge_pages_ms = timed(huge_pages.is_some(), &mut || {
        if let Some(how) = huge_pages {
            route = Some(weights.use_huge_pages(how)?.name().to_string());
        }
        Ok(())
    })?;
    let template = ChatTemplate::from_dir(dir)?;
    let llama = &model.llama;
    let context = llama.config.max_position_embeddings;
    if cfg.prefill_tokens + cfg.decode_tokens > context
        || cfg.prefix_tokens + cfg.critique_tokens + 1 > context
    {
        return Err(Error::Usage(format!(
            "bench: the lengths asked for exceed the model's context of {context} tokens"
        )));
    }
    let w = &llama.weights;
    let weight_dtype = w.get(&w.lm_head).dtype_name().to_string();
    let bytes_per_token = w.decode_bytes_per_token();
    progress(&format!("load: {load_ms:.1} ms"));

    // Prefill + single-stream decode through the paged engine.
    let text_ids = filler_ids(&tokenizer, cfg.prefill_tokens)?;
    let blocks = (cfg.prefill_tokens + cfg.decode_tokens).div_ceil(16) + 2;
    let mut engine = PagedEngine::with_cache(llama, blocks, 16, PREFILL_ROWS, cfg.kv_cache)?;
    // Warm-up: first touch of the mapped weights and the worker pool.
    let (warm, _, _) = engine.prefill(llama, &cpu, &text_ids[..1])?;
    engine.free(warm)?;
    drop(engine);
    let mut engine = PagedEngine::with_cache(llama, blocks, 16, PREFILL_ROWS, cfg.kv_cache)?;
    // The best of PREFILL_RUNS prefills in the same engine (as PyTorch's baseline script
    // takes the best of 3 and llama-bench averages repeats): the first also pays the
    // first touch of the KV arena and the kernels' buffers. The last one is kept for the
    // decode after it. Each run under its own prefix-cache key, so none finds the
    // blocks of the one before in the cache.
    let mut prefill_s = f64::INFINITY;
    let mut run = 0;
    let (seq, logits) = loop {
        engine.set_prefix_key(PrefixKey {
            adapter: u64::MAX - run as u64,
        });
        debug_assert_eq!(engine.cached_prefix_len(&text_ids), 0);
        let t0 = Instant::now();
        let (seq, logits, _) = engine.prefill(llama, &cpu, &text_ids)?;
        prefill_s = prefill_s.min(t0.elapsed().as_secs_f64());
        run += 1;
        if run == PREFILL_RUNS {
            break (seq, logits);
        }
        engine.free(seq)?;
    };
    progress(&format!(
        "prefill {}: {:.1} tokens/s",
        cfg.prefill_tokens,
        cfg.prefill_tokens as f64 / prefill_s
    ));
    let depth_tps = cfg.decode_tokens as f64
        / decode_run(llama, &cpu, &mut engine, seq, &logits, cfg.decode_tokens)?;
    drop(engine);
    progress(&format!(
        "decode {} after the prefill: {depth_tps:.1} tokens/s",
        cfg.decode_tokens
    ));
    let mut engine = PagedEngine::with_cache(llama, blocks, 16, PREFILL_ROWS, cfg.kv_cache)?;
    let (seq, logits, _) = engine.prefill(llama, &cpu, &text_ids[..1])?;
    let decode_tps = cfg.decode_tokens as f64
        / decode_run(llama, &cpu, &mut engine, seq, &logits, cfg.decode_tokens)?;
    drop(engine);
    let weights_on_huge_pages = llama.weights.huge_page_fraction();
    progress(&format!(
        "decode {}: {decode_tps:.1} tokens/s",
        cfg.decode_tokens
    ));

    // The critique job.
    let prompt = prompt_for_prefix(&tokenizer, &template, cfg.prefix_tokens)?;
    let response = "It depends on the details.";
    let mut critiques = Vec::new();
    for &k in &cfg.ks {
        let shared = critique_arm(
            &model, &tokenizer, &template, &prompt, response, k, cfg, true,
        )?;
        let unshared = if cfg.unshared {
            Some(critique_arm(
                &model, &tokenizer, &template, &prompt, response, k, cfg, false,
            )?)
        } else {
            None
        };
        let speedup = unshared.as_ref().map(|u| u.1.seconds / shared.1.seconds);
        progress(&format!(
            "critiques K={k}: shared {:.2} s ({:.1} tok/s){}",
            shared.1.seconds,
            shared.1.tokens_per_s,
            match &unshared {
                Some(u) => format!(
                    ", unshared {:.2} s ({:.1} tok/s), speedup {:.2}x",
                    u.1.seconds,
                    u.1.tokens_per_s,
                    speedup.unwrap_or(0.0)
                ),
                None => String::new(),
            }
        ));
        critiques.push(CritiqueRow {
            k,
            prefix_tokens: shared.0,
            critique_tokens: cfg.critique_tokens,
            shared: shared.1,
            unshared: unshared.map(|u| u.1),
            speedup,
            rate_vs_k1: None,
        });
    }
    if let Some(k1) = critiques
        .iter()
        .find(|r| r.k == 1)
        .map(|r| r.shared.tokens_per_s)
    {
        for r in &mut critiques {
            r.rate_vs_k1 = Some(r.shared.tokens_per_s / k1);
        }
    }
    let peak_rss_mib = peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64);
    let read_bandwidth_gb_s = if cfg.bandwidth_bytes > 0 {
        let bw = read_bandwidth(cfg.bandwidth_bytes);
        progress(&format!("read bandwidth: {:.2} GB/s", bw / 1e9));
        Some(bw / 1e9)
    } else {
        None
    };
    let decode_roofline_fraction =
        read_bandwidth_gb_s.map(|bw| bytes_per_token as f64 * decode_tps / (bw * 1e9));
    Ok(BenchReport {
        machine: MachineInfo {
            cpu: cpu_model(),
            isa: dispatch::current().name().to_string(),
            threads: dispatch::num_threads(),
            physical_cores: dispatch::physical_cores(),
            logical_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        },
        model: dir
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        weight_dtype,
        kv_cache: cfg.kv_cache.to_string(),
        decode_weight_bytes_per_token: bytes_per_token,
        load_ms,
        quantize_ms,
        q8_logits_rel_l2,
        q8_argmax_agreement,
        huge_pages_ms,
        huge_pages_route: route,
        huge_pages_auto,
        weights_on_huge_pages,
        prefill_tokens: cfg.prefill_tokens,
        prefill_tokens_per_s: cfg.prefill_tokens as f64 / prefill_s,
        decode_tokens: cfg.decode_tokens,
        decode_tokens_per_s: decode_tps,
        decode_after_prefill_tokens_per_s: depth_tps,
        critiques,
        peak_rss_mib,
        read_bandwidth_gb_s,
        decode_roofline_fraction,
    })
}

/// One arm of the critique job: (prefix tokens, timing).
/// Greedy-decode `n` tokens of `seq` (whose last logits are in `logits`); seconds. Each
/// step picks its token with the fused LM head + top-1 (no logits written), as
/// `cloudrm generate` does.
fn decode_run(
    llama: &Llama,
    cpu: &Cpu,
    engine: &mut PagedEngine,
    seq: SeqId,
    logits: &[f32],
    n: usize,
) -> Result<f64> {
    let mut next = cloudrm_sampler::argmax(logits).unwrap_or(0) as u32;
    let t0 = Instant::now();
    for _ in 0..n {
        let hidden = engine.decode_step(llama, cpu, &[seq], &[next], None)?;
        next = lm_greedy(llama, cpu, hidden)?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

#[allow(clippy::too_many_arguments)]
fn critique_arm(
    model: &RewardModel,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    prompt: &str,
    response: &str,
    k: usize,
    cfg: &BenchConfig,
    share: bool,
) -> Result<(usize, JobArm)> {
    let opts = ScoreOptions {
        k,
        seed: 7,
        temperature: Some(0.5),
        max_critique_tokens: cfg.critique_tokens,
        share_prefix: share,
        ignore_stops: true,
        kv_cache: cfg.kv_cache,
        ..Default::default()
    };
    // A fresh scorer per arm: nothing cached from an earlier arm.
    let scorer = CloudScorer::new(model, tokenizer, template);
    let t0 = Instant::now();
    let s = scorer.score_cloud(prompt, response, &opts)?;
    let seconds = t0.elapsed().as_secs_f64();
    let steps: usize = s.critique_tokens.iter().map(|c| c.len() + 1).sum();
    // The job is K x T tokens (plus the K end-of-turn steps) or its figures mean nothing.
    if steps != k * (cfg.critique_tokens + 1) {
        return Err(Error::Usage(format!(
            "bench: the K = {k} critique job decoded {steps} steps, not {k} x ({} + 1)",
            cfg.critique_tokens
        )));
    }
    Ok((
        s.prefix_tokens,
        JobArm {
            seconds,
            tokens_per_s: steps as f64 / seconds,
            prefix_blocks_allocated: s.prefix_blocks_allocated,
        },
    ))
}

const FILLER: &str = "Reward models read a prompt and a response, write a critique of the \
    response, and then score it. The critique names what is right and what is wrong, \
    step by step, before a number is given. ";

/// Positions of the built-in text `--quantize q8` is measured on.
const ACCURACY_TOKENS: usize = 32;

/// The logits of every position of `ids`, run as one sequence.
fn all_logits(llama: &Llama, cpu: &Cpu, ids: &[u32]) -> Result<Vec<f32>> {
    let mut sess = llama.new_session(ids.len(), ids.len());
    Ok(llama
        .forward(cpu, &mut sess, ids, LogitsMode::All)?
        .to_vec())
}

/// Relative L2 distance of `got` from `want` (rows of `vocab` logits), and the fraction
/// of rows whose argmax (the first largest) agrees.
fn logits_agreement(got: &[f32], want: &[f32], vocab: usize) -> (f64, f64) {
    let rows = || {
        got.chunks_exact(vocab.max(1))
            .zip(want.chunks_exact(vocab.max(1)))
    };
    let agree = rows()
        .filter(|(g, w)| cloudrm_sampler::argmax(g) == cloudrm_sampler::argmax(w))
        .count();
    let rel = crate::gpu_check::rel_l2(got, want);
    (rel, agree as f64 / rows().count().max(1) as f64)
}

/// Exactly `n` token ids of natural text.
fn filler_ids(tokenizer: &Tokenizer, n: usize) -> Result<Vec<u32>> {
    let once = tokenizer.encode(FILLER, false)?;
    if once.is_empty() {
        return Err(Error::Usage(
            "bench: the tokenizer encodes no tokens".into(),
        ));
    }
    Ok(once.iter().copied().cycle().take(n).collect())
}

/// A prompt whose CLoud prefix (with the bench response) is as close to `target` tokens
/// as whole filler words allow (never longer).
fn prompt_for_prefix(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    target: usize,
) -> Result<String> {
    let layout = CloudTemplate::new(template, tokenizer);
    let words: Vec<&str> = FILLER.split_whitespace().collect();
    let text = |n: usize| -> String {
        words
            .iter()
            .cycle()
            .take(n.max(1))
            .copied()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let len = |n: usize| -> Result<usize> {
        Ok(layout
            .cloud_prefix(&text(n), "It depends on the details.")?
            .0
            .len())
    };
    // Tokens grow monotonically with words: binary search the most words that fit.
    let (mut lo, mut hi) = (1usize, target.max(2));
    if len(lo)? > target {
        return Ok(text(lo));
    }
    while len(hi)? <= target {
        hi *= 2;
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if len(mid)? <= target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(text(lo))
}

/// Timed prefills of the bench, of which the best is reported.
const PREFILL_RUNS: usize = 3;

/// Best-of-three read bandwidth (bytes/s) of a multi-threaded streaming sum over
/// `bytes` of f32 (on 2 MiB pages where the kernel gives them).
fn read_bandwidth(bytes: usize) -> f64 {
    let n = (bytes / 4).max(1 << 16);
    // On 2 MiB pages where the kernel gives them, as `--hugepages` weights are: the
    // roofline is what the machine's memory can stream, not what 4 KiB pages allow.
    let mut map = memmap2::MmapOptions::new().len(n * 4).map_anon();
    let mut heap = Vec::new();
    let buf: &mut [f32] = match &mut map {
        Ok(m) => {
            #[cfg(target_os = "linux")]
            let _ = m.advise(memmap2::Advice::HugePage);
            bytemuck::cast_slice_mut(&mut m[..])
        }
        Err(_) => {
            heap.resize(n, 0.0f32);
            &mut heap
        }
    };
    buf.fill(1.0);
    let buf = &*buf;
    let threads = dispatch::num_threads();
    let mut best = 0.0f64;
    for _ in 0..3 {
        let sums: Vec<std::sync::Mutex<f32>> =
            (0..threads).map(|_| std::sync::Mutex::new(0.0)).collect();
        let t0 = Instant::now();
        pool::global().run(threads, &|p, parts| {
            let chunk = n.div_ceil(parts);
            let part = &buf[(p * chunk).min(n)..((p + 1) * chunk).min(n)];
            let s = stream_sum(part);
            if let Ok(mut slot) = sums[p].lock() {
                *slot = s;
            }
        });
        let dt = t0.elapsed().as_secs_f64();
        let total: f32 = sums.iter().filter_map(|m| m.lock().ok().map(|v| *v)).sum();
        std::hint::black_box(total);
        best = best.max((n * 4) as f64 / dt);
    }
    best
}

/// Sum with 32 independent lanes (vectorised by the compiler without reassociation).
fn stream_sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; 32];
    let mut chunks = xs.chunks_exact(32);
    for c in &mut chunks {
        for i in 0..32 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// VmHWM of this process (Linux), bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    cloudrm_loader::pages::kb_field(&status, "VmHWM:")
}

/// The CPU's model name (Linux), or the architecture.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

impl BenchReport {
    /// A human-readable table.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s += &format!(
            "machine: {} ({} threads; {} cores, {} CPUs; {} path)\nmodel: {} ({} weights, {:.1} MB read per decode token, {} KV cache)\n",
            self.machine.cpu,
            self.machine.threads,
            self.machine
                .physical_cores
                .map_or_else(|| "?".to_string(), |c| c.to_string()),
            self.machine.logical_cpus,
            self.machine.isa,
            self.model,
            self.weight_dtype,
            self.decode_weight_bytes_per_token as f64 / 1e6,
            self.kv_cache
        );
        s += &format!("load (mmap + validate): {:.1} ms\n", self.load_ms);
        if let Some(q) = self.quantize_ms {
            s += &format!("quantise to q8: {q:.1} ms\n");
        }
        if let (Some(rel), Some(agree)) = (self.q8_logits_rel_l2, self.q8_argmax_agreement) {
            s += &format!(
                "q8 logits: {rel:.2e} relative L2 from the 16-bit model's, argmax agreement \
                 {agree:.3} ({ACCURACY_TOKENS} positions of a built-in text)\n"
            );
        }
        if let Some(h) = self.huge_pages_ms {
            let route = self.huge_pages_route.as_deref().unwrap_or("?");
            let why = if self.huge_pages_auto {
                ", auto: the job decodes; --hugepages=off keeps the mapping"
            } else {
                ""
            };
            s += &format!("weights onto 2 MiB pages ({route}{why}): {h:.1} ms\n");
        }
        if let Some(f) = self.weights_on_huge_pages {
            s += &format!("weights mapped with 2 MiB pages: {:.0}%", f * 100.0);
            if f < 0.5 && self.huge_pages_ms.is_none() {
                // The file's cached pages are small folios: --hugepages rereads them
                // (once; later runs map them as they are).
                s += " (--hugepages puts them there: decode streams them faster)";
            }
            s += "\n";
        }
        s += &format!(
            "prefill {} tokens: {:.1} tokens/s\n",
            self.prefill_tokens, self.prefill_tokens_per_s
        );
        s += &format!(
            "decode {} tokens (single stream, from an empty context like llama-bench tg): {:.1} tokens/s",
            self.decode_tokens, self.decode_tokens_per_s
        );
        if let (Some(bw), Some(f)) = (self.read_bandwidth_gb_s, self.decode_roofline_fraction) {
            s += &format!(
                ", {:.0}% of the read-bandwidth roofline ({bw:.2} GB/s -> {:.1} tokens/s)",
                f * 100.0,
                bw * 1e9 / self.decode_weight_bytes_per_token as f64
            );
        }
        s += "\n";
        s += &format!(
            "decode {} tokens after the {}-token prefill: {:.1} tokens/s\n",
            self.decode_tokens, self.prefill_tokens, self.decode_after_prefill_tokens_per_s
        );
        if !self.critiques.is_empty() {
            s +=
                "critique job (K x T tokens after a shared prefix; seconds, aggregate tokens/s):\n";
            s += "   K  prefix     T   shared_s  shared_tok/s  vs_K=1  unshared_s  unshared_tok/s  speedup\n";
            for r in &self.critiques {
                s += &format!(
                    "{:>4}  {:>6}  {:>4}  {:>9.2}  {:>12.1}  {:>6}",
                    r.k,
                    r.prefix_tokens,
                    r.critique_tokens,
                    r.shared.seconds,
                    r.shared.tokens_per_s,
                    r.rate_vs_k1
                        .map_or_else(|| "-".to_string(), |x| format!("{x:.2}x"))
                );
                match &r.unshared {
                    Some(u) => {
                        s += &format!(
                            "  {:>10.2}  {:>14.1}  {:>6.2}x\n",
                            u.seconds,
                            u.tokens_per_s,
                            r.speedup.unwrap_or(0.0)
                        )
                    }
                    None => s += "\n",
                }
            }
        }
        if let Some(rss) = self.peak_rss_mib {
            s += &format!("peak RSS (model work): {rss:.0} MiB\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::logits_agreement;

    #[test]
    fn logits_agreement_measures_distance_and_argmax() {
        let want = [1.0f32, 3.0, 2.0, 0.0, 4.0, 0.0];
        assert_eq!(logits_agreement(&want, &want, 3), (0.0, 1.0));
        // Row 0's argmax moves (column 1 to 2), row 1's stays; the distance is
        // |(0, -1, 2, 0, 0, 0)| / |want| = sqrt(5 / 30).
        let got = [1.0f32, 2.0, 4.0, 0.0, 4.0, 0.0];
        let (rel, agree) = logits_agreement(&got, &want, 3);
        assert!((rel - (5.0f64 / 30.0).sqrt()).abs() < 1e-12, "{rel}");
        assert_eq!(agree, 0.5);
    }
}
