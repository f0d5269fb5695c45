//! The resumable eval loop behind `cloudrm eval`.
//!
//! OUT is JSON lines, one line per finished row, written and flushed as soon as the row
//! is done, so an interrupted run keeps everything it finished:
//! - a scored example: an `ExampleResult` object (`id`, `subset`, rewards, `correct`,
//!   critiques);
//! - a data row that could not be read: `{"line": N, "error": "..."}` (JSON lines) or
//!   `{"index": N, "error": "..."}` (arrays, Parquet);
//! - an example the scorer rejected (too long for the context, an empty text):
//!   `{"id": "...", "error": "..."}`. Other scoring failures stop the run.
//!
//! `resume` reads OUT back, skips the ids (and bad rows) it already holds, drops a last
//! line a crash left unfinished, and appends the rest; the summary covers old and new
//! lines.

use crate::eval::Example;
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::EvalError;
use super::formats::{RowRef, Schema, read_examples};
use super::summary::{ExampleResult, Summary};
use crate::cloud::{PairScorer, ScoreOptions};
use crate::error::{Error, Result};
use crate::model::RewardModel;

/// Options of an eval run.
#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    pub score: ScoreOptions,
    /// Row format override (default: detected from the first valid row).
    pub schema: Option<Schema>,
    /// Only the first N rows of the data file (good or bad).
    pub limit: Option<usize>,
    /// Continue an existing OUT instead of refusing to overwrite it.
    pub resume: bool,
    /// Evaluate even with an untrained reward head.
    pub allow_untrained: bool,
    /// Progress on stderr (a bar on a terminal, else a line every 30 s).
    pub progress: bool,
}

/// What an eval run did.
#[derive(Debug, Clone)]
pub struct EvalReport {
    /// Over every line of OUT, old and new.
    pub summary: Summary,
    /// Examples scored by this run.
    pub scored_now: usize,
    /// Finished examples already in OUT (resume).
    pub resumed: usize,
    /// The row format read.
    pub schema: Option<Schema>,
}

/// Refuse an untrained head unless allowed: its rewards are noise, and an accuracy
/// computed from them would be presented as a judgement.
pub fn require_trained_head(
    model: &RewardModel,
    name: &str,
    allow_untrained: bool,
) -> Result<(), EvalError> {
    if model.head_trained() || allow_untrained {
        Ok(())
    } else {
        Err(EvalError::UntrainedHead {
            model: name.to_string(),
        })
    }
}

/// What OUT already holds.
#[derive(Default)]
struct Previous {
    results: Vec<ExampleResult>,
    /// Ids the scorer rejected.
    score_errors: HashSet<String>,
    /// Data rows reported as unreadable ("line:N" / "index:N").
    input_errors: HashSet<String>,
}

fn row_key(at: RowRef) -> String {
    let (k, n) = at.json_key();
    format!("{k}:{n}")
}

/// Read OUT back for `--resume`; cuts off a last line a crash left unfinished.
fn read_previous(out: &Path) -> Result<Previous> {
    let shown = out.display().to_string();
    let io = |source| EvalError::Io {
        path: shown.clone(),
        source,
    };
    let mut prev = Previous::default();
    let bytes = match std::fs::read(out) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(prev),
        Err(e) => return Err(io(e).into()),
    };
    let mut keep = 0usize; // bytes of OUT that hold whole, valid lines
    let mut start = 0usize;
    let mut line_no = 0usize;
    while start < bytes.len() {
        line_no += 1;
        let end = bytes[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|p| start + p + 1);
        let last = end.is_none_or(|e| e >= bytes.len());
        let line = &bytes[start..end.unwrap_or(bytes.len())];
        let parsed = if end.is_none() {
            Err("no newline at the end (an interrupted write)".to_string())
        } else {
            parse_out_line(line, &mut prev)
        };
        match parsed {
            Ok(()) => keep = end.unwrap_or(bytes.len()),
            // An unfinished last line: dropped, its row is scored again.
            Err(_) if last => break,
            Err(reason) => {
                return Err(EvalError::BadOutputLine {
                    path: shown,
                    line: line_no,
                    reason,
                }
                .into());
            }
        }
        start = end.unwrap_or(bytes.len());
    }
    if keep < bytes.len() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(out)
            .map_err(io)?;
        f.set_len(keep as u64).map_err(io)?;
    }
    Ok(prev)
}

fn parse_out_line(line: &[u8], prev: &mut Previous) -> std::result::Result<(), String> {
    let text = std::str::from_utf8(line).map_err(|e| e.to_string())?.trim();
    if text.is_empty() {
        return Ok(());
    }
    let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    if obj.contains_key("correct") {
        let r: ExampleResult = serde_json::from_value(v).map_err(|e| e.to_string())?;
        prev.results.push(r);
    } else if obj.contains_key("error") {
        if let Some(id) = obj.get("id").and_then(Value::as_str) {
            prev.score_errors.insert(id.to_string());
        } else if let Some(n) = obj.get("line").and_then(Value::as_u64) {
            prev.input_errors.insert(row_key(RowRef::Line(n as usize)));
        } else if let Some(n) = obj.get("index").and_then(Value::as_u64) {
            prev.input_errors.insert(row_key(RowRef::Index(n as usize)));
        } else {
            return Err("an error line without `id`, `line` or `index`".into());
        }
    } else {
        return Err("neither a result nor an error".into());
    }
    Ok(())
}

/// Progress on stderr: an indicatif bar on a terminal, else a plain line every 30 s.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: usize,
    done: usize,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    fn new(total: usize, enabled: bool) -> Self {
        let bar = enabled.then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(total as u64),
                indicatif::ProgressDrawTarget::stderr(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} pairs  {elapsed_precise} elapsed, eta {eta_precise}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            total,
            done: 0,
            started: now,
            last_line: now,
        }
    }

    fn tick(&mut self) {
        self.done += 1;
        let Some(bar) = &self.bar else { return };
        bar.inc(1);
        if bar.is_hidden() && self.last_line.elapsed() >= Duration::from_secs(30) {
            self.last_line = Instant::now();
            let per = self.started.elapsed().as_secs_f64() / self.done as f64;
            let eta = per * (self.total - self.done) as f64;
            eprintln!(
                "eval: {}/{} pairs, {:.1} s/pair, eta {:.0} s",
                self.done, self.total, per, eta
            );
        }
    }

    fn println(&self, msg: &str) {
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.suspend(|| eprintln!("{msg}")),
            _ => eprintln!("{msg}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Evaluate `scorer` on the pairs of `data`, writing OUT line by line.
pub fn run_eval(
    scorer: &dyn PairScorer,
    model_name: &str,
    data: &Path,
    out: &Path,
    opts: &EvalOptions,
) -> Result<EvalReport> {
    require_trained_head(scorer.reward_model(), model_name, opts.allow_untrained)?;
    let shown = out.display().to_string();
    let io = |source| EvalError::Io {
        path: shown.clone(),
        source,
    };
    let non_empty = std::fs::metadata(out).is_ok_and(|m| m.len() > 0);
    if non_empty && !opts.resume {
        return Err(EvalError::OutputExists { path: shown }.into());
    }
    let dataset = read_examples(data, opts.schema)?;
    let mut prev = if opts.resume {
        read_previous(out)?
    } else {
        Previous::default()
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .map_err(io)?;
    let mut write_line = |v: &Value| -> Result<()> {
        let mut line = v.to_string();
        line.push('\n');
        file.write_all(line.as_bytes()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(())
    };

    let rows: Vec<_> = match opts.limit {
        Some(n) => dataset.rows.into_iter().take(n).collect(),
        None => dataset.rows,
    };
    let resumed = prev.results.len();
    let mut done: HashSet<String> = prev.results.iter().map(|r| r.id.clone()).collect();
    done.extend(prev.score_errors.iter().cloned());
    let todo = rows
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|e| !done.contains(&e.id)))
        .count();
    let mut progress = Progress::new(todo, opts.progress);
    let data_shown = data.display().to_string();
    let mut scored_now = 0usize;
    // Examples are compared in windows, each window one continuous batch (its rows decode
    // together): about 32 critique rows per window.
    let window = (32 / (2 * opts.score.k.max(1))).clamp(1, 16);
    let mut pending: Vec<Example> = Vec::with_capacity(window);
    let flush = |pending: &mut Vec<Example>,
                 prev: &mut Previous,
                 done: &mut HashSet<String>,
                 progress: &mut Progress,
                 scored_now: &mut usize,
                 write_line: &mut dyn FnMut(&Value) -> Result<()>|
     -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let triples: Vec<(&str, &str, &str)> = pending
            .iter()
            .map(|e| (e.prompt.as_str(), e.chosen.as_str(), e.rejected.as_str()))
            .collect();
        let results = scorer.compare_many(&triples, &opts.score)?;
        for (ex, res) in pending.drain(..).zip(results) {
            match res {
                Ok(c) => {
                    let r = ExampleResult {
                        id: ex.id.clone(),
                        subset: ex.subset,
                        chosen_reward: c.a.reward,
                        rejected_reward: c.b.reward,
                        correct: ExampleResult::is_correct(c.a.reward, c.b.reward),
                        p_chosen: c.p_a_preferred,
                        chosen_rewards: c.a.rewards,
                        rejected_rewards: c.b.rewards,
                        chosen_critiques: c.a.critiques,
                        rejected_critiques: c.b.critiques,
                    };
                    let v = serde_json::to_value(&r).map_err(|e| Error::Usage(e.to_string()))?;
                    write_line(&v)?;
                    prev.results.push(r);
                    *scored_now += 1;
                }
                // The example itself cannot be scored: recorded, the run goes on.
                Err(Error::Cloud(e)) => {
                    progress.println(&format!("warning: example {:?}: {e}", ex.id));
                    write_line(&serde_json::json!({"id": ex.id, "error": e.to_string()}))?;
                    prev.score_errors.insert(ex.id.clone());
                }
                Err(e) => return Err(e),
            }
            done.insert(ex.id);
            progress.tick();
        }
        Ok(())
    };
    for row in rows {
        let ex = match row {
            Ok(ex) => ex,
            Err(e) => {
                let Some(at) = e.row() else {
                    return Err(e.into());
                };
                progress.println(&format!("warning: {data_shown}: {e}"));
                if prev.input_errors.insert(row_key(at)) {
                    let (k, n) = at.json_key();
                    let mut obj = serde_json::Map::new();
                    obj.insert(k.into(), n.into());
                    obj.insert("error".into(), e.to_string().into());
                    write_line(&Value::Object(obj))?;
                }
                continue;
            }
        };
        if done.contains(&ex.id) || pending.iter().any(|p| p.id == ex.id) {
            continue;
        }
        pending.push(ex);
        if pending.len() >= window
            && let Err(e) = flush(
                &mut pending,
                &mut prev,
                &mut done,
                &mut progress,
                &mut scored_now,
                &mut write_line,
            )
        {
            progress.finish();
            return Err(e);
        }
    }
    if let Err(e) = flush(
        &mut pending,
        &mut prev,
        &mut done,
        &mut progress,
        &mut scored_now,
        &mut write_line,
    ) {
        progress.finish();
        return Err(e);
    }
    progress.finish();
    // Later lines of one id win (there are none unless OUT was edited by hand).
    let mut by_id: BTreeMap<&str, &ExampleResult> = BTreeMap::new();
    let mut order = Vec::new();
    for r in &prev.results {
        if by_id.insert(&r.id, r).is_none() {
            order.push(r.id.as_str());
        }
    }
    let results: Vec<ExampleResult> = order.iter().map(|id| by_id[id].clone()).collect();
    let summary = Summary::new(&results, prev.input_errors.len(), prev.score_errors.len());
    Ok(EvalReport {
        summary,
        scored_now,
        resumed,
        schema: dataset.schema,
    })
}
