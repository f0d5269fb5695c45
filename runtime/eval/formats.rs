//! Preference data files -> pairwise examples, one result per row so that one bad row
//! never stops the others.
//!
//! Containers, from the file name: `.json` (a JSON array; a file whose first character
//! is not `[` is read as JSON lines, as some `.json` sets are), `.jsonl`, either with
//! `.gz`, and `.parquet` (read with the arrow-free row API). Rows are numbered by their
//! 1-based line in JSON lines and by their 0-based index in arrays and Parquet files.
//!
//! Row formats (`Schema`), from the fields of the first valid row unless `--format`
//! says:
//! - RewardBench: `prompt, chosen, rejected, subset, id`; its Parquet export names them
//!   `question, response_A (= chosen), response_B (= rejected), subset, id`.
//! - Anthropic HH: `{chosen, rejected}` whole transcripts `"\n\nHuman: ...\n\nAssistant:
//!   ..."` that share everything before the last `"\n\nAssistant:"`. chosen / rejected =
//!   the text after it (one leading space removed). The scorer takes one prompt string,
//!   so the prompt is the shared conversation itself, trimmed: for a single human turn
//!   the `Human: ` label is dropped (prompt = the question); for a multi-turn
//!   conversation the earlier turns stay in the text as the transcript writes them
//!   (`Human: ...\n\nAssistant: ...\n\nHuman: ...`). id = the line number.
//! - LLMBar: `{input, output_1, output_2, label}`, label 1 or 2 names the better output.
//!   id = the row index.
//! - HHH alignment: `{input, targets: {choices: [a, b], labels: [1, 0]}}`, chosen = the
//!   choice labelled 1. id = the row's line or index.
//!
//! Rows of the formats without a subset field (HH, LLMBar, HHH) get the subset
//! `<format>:<file name without extensions>` (e.g. `hhh:harmless`, `hh:test`), so they
//! have their own line in the per-subset accuracy (never a RewardBench section).

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

use serde_json::{Map, Value};

use super::EvalError;

/// Where a row sits in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowRef {
    /// 1-based line of a JSON lines file.
    Line(usize),
    /// 0-based index in a JSON array or a Parquet file.
    Index(usize),
}

impl RowRef {
    /// `{"line": N}` or `{"index": N}` as a JSON (key, value).
    pub fn json_key(&self) -> (&'static str, usize) {
        match *self {
            RowRef::Line(n) => ("line", n),
            RowRef::Index(n) => ("index", n),
        }
    }

    fn number(&self) -> usize {
        match *self {
            RowRef::Line(n) | RowRef::Index(n) => n,
        }
    }
}

/// One pairwise example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub id: String,
    pub subset: Option<String>,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// A parsed row or why it could not be.
pub type Row = Result<Example, EvalError>;

/// How rows are stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    JsonArray,
    JsonLines,
    Parquet,
}

/// Row formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Schema {
    /// RewardBench rows (`prompt, chosen, rejected, subset, id`) or its Parquet export
    /// (`question, response_A, response_B, subset, id`).
    Rewardbench,
    /// Anthropic HH-RLHF `{chosen, rejected}` transcripts.
    Hh,
    /// LLMBar `{input, output_1, output_2, label}`.
    Llmbar,
    /// HHH alignment `{input, targets: {choices, labels}}`.
    Hhh,
}

impl Schema {
    pub fn name(self) -> &'static str {
        match self {
            Schema::Rewardbench => "rewardbench",
            Schema::Hh => "hh",
            Schema::Llmbar => "llmbar",
            Schema::Hhh => "hhh",
        }
    }

    /// The format the fields of an object look like, if any.
    pub fn detect(obj: &Map<String, Value>) -> Option<Schema> {
        let has = |k: &str| obj.contains_key(k);
        if has("targets") && has("input") {
            Some(Schema::Hhh)
        } else if has("output_1") && has("output_2") {
            Some(Schema::Llmbar)
        } else if has("chosen") && has("rejected") {
            Some(if has("prompt") {
                Schema::Rewardbench
            } else {
                Schema::Hh
            })
        } else if has("question") && has("response_A") && has("response_B") && !has("label") {
            Some(Schema::Rewardbench)
        } else {
            None
        }
    }
}

/// The rows of a data file.
#[derive(Debug)]
pub struct Dataset {
    pub container: Container,
    /// The row format used (`None` when no row was a JSON object to detect it from).
    pub schema: Option<Schema>,
    pub rows: Vec<Row>,
}

/// The container a file name implies.
pub fn container_of(path: &Path) -> Option<(Container, bool)> {
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    let (stem, gz) = match name.strip_suffix(".gz") {
        Some(s) => (s.to_string(), true),
        None => (name, false),
    };
    if stem.ends_with(".jsonl") {
        Some((Container::JsonLines, gz))
    } else if stem.ends_with(".json") {
        Some((Container::JsonArray, gz))
    } else if stem.ends_with(".parquet") && !gz {
        Some((Container::Parquet, false))
    } else {
        None
    }
}

/// Read every row of `path`; `schema` overrides the detection from the first valid row.
pub fn read_examples(path: &Path, schema: Option<Schema>) -> Result<Dataset, EvalError> {
    let shown = path.display().to_string();
    let io = |source| EvalError::Io {
        path: shown.clone(),
        source,
    };
    let named = container_of(path);
    let (container, gz) = match named {
        Some(c) => c,
        None if schema.is_some() => {
            // Forced row format: sniff the container from the bytes.
            let mut head = [0u8; 4];
            let n = std::fs::File::open(path)
                .and_then(|mut f| f.read(&mut head))
                .map_err(io)?;
            if &head[..n] == b"PAR1" {
                (Container::Parquet, false)
            } else {
                (Container::JsonArray, head[..n.min(2)] == [0x1f, 0x8b])
            }
        }
        None => {
            return Err(EvalError::UnknownFormat {
                path: shown,
                reason: "unknown extension".into(),
            });
        }
    };
    if container == Container::Parquet {
        let objects = parquet_rows(path)?;
        if objects.is_empty() {
            return Err(EvalError::Empty { path: shown });
        }
        let values = objects
            .into_iter()
            .enumerate()
            .map(|(i, o)| (RowRef::Index(i), Ok(Value::Object(o))))
            .collect();
        return finish(path, Container::Parquet, values, schema);
    }
    let bytes = std::fs::read(path).map_err(io)?;
    let bytes = if gz {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(io)?;
        out
    } else {
        bytes
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8 text ({e})"),
        ))
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    if text.trim().is_empty() {
        return Err(EvalError::Empty { path: shown });
    }
    // A `.json` file that is not an array is read as JSON lines.
    let container = if container == Container::JsonArray && !text.trim_start().starts_with('[') {
        Container::JsonLines
    } else {
        container
    };
    let values: Vec<(RowRef, Result<Value, String>)> = match container {
        Container::JsonArray => {
            let items: Vec<Value> =
                serde_json::from_str(text).map_err(|e| EvalError::BadJsonFile {
                    path: shown.clone(),
                    message: e.to_string(),
                })?;
            if items.is_empty() {
                return Err(EvalError::Empty { path: shown });
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (RowRef::Index(i), Ok(v)))
                .collect()
        }
        _ => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                (
                    RowRef::Line(i + 1),
                    serde_json::from_str::<Value>(l).map_err(|e| e.to_string()),
                )
            })
            .collect(),
    };
    finish(path, container, values, schema)
}

/// The file name without its extensions (`test.jsonl.gz` -> `test`).
fn file_stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    name.split('.').next().unwrap_or_default().to_string()
}

/// Detect the schema and turn parsed values into rows.
fn finish(
    file: &Path,
    container: Container,
    values: Vec<(RowRef, Result<Value, String>)>,
    schema: Option<Schema>,
) -> Result<Dataset, EvalError> {
    let path = &file.display().to_string();
    let schema = match schema {
        Some(s) => Some(s),
        None => match values
            .iter()
            .find_map(|(_, v)| v.as_ref().ok()?.as_object())
        {
            Some(obj) => Some(Schema::detect(obj).ok_or_else(|| EvalError::UnknownSchema {
                path: path.to_string(),
                fields: obj.keys().cloned().collect::<Vec<_>>().join(", "),
            })?),
            None => None,
        },
    };
    let default_subset = match schema {
        Some(Schema::Rewardbench) | None => None,
        Some(s) => Some(format!("{}:{}", s.name(), file_stem(file))),
    };
    let mut seen = HashSet::new();
    let rows = values
        .into_iter()
        .map(|(at, v)| {
            let v = v.map_err(|message| EvalError::BadJson { at, message })?;
            let obj = v.as_object().ok_or(EvalError::NotObject { at })?;
            let mut ex = match schema {
                Some(Schema::Rewardbench) => rewardbench(obj, at),
                Some(Schema::Hh) => hh(obj, at),
                Some(Schema::Llmbar) => llmbar(obj, at),
                Some(Schema::Hhh) => hhh(obj, at),
                None => Err(EvalError::NotObject { at }),
            }?;
            if ex.subset.is_none() {
                ex.subset.clone_from(&default_subset);
            }
            if !seen.insert(ex.id.clone()) {
                return Err(EvalError::DuplicateId { at, id: ex.id });
            }
            Ok(ex)
        })
        .collect();
    Ok(Dataset {
        container,
        schema,
        rows,
    })
}

fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// A required string field, under its name or an alias.
fn text(
    obj: &Map<String, Value>,
    at: RowRef,
    field: &'static str,
    alias: Option<&str>,
) -> Result<String, EvalError> {
    let v = obj
        .get(field)
        .or_else(|| alias.and_then(|a| obj.get(a)))
        .ok_or(EvalError::MissingField { at, field })?;
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(EvalError::BadField {
            at,
            field,
            found: kind(other),
            expected: "a string",
        }),
    }
}

fn rewardbench(obj: &Map<String, Value>, at: RowRef) -> Result<Example, EvalError> {
    let prompt = text(obj, at, "prompt", Some("question"))?;
    let chosen = text(obj, at, "chosen", Some("response_A"))?;
    let rejected = text(obj, at, "rejected", Some("response_B"))?;
    let subset = match obj.get("subset") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(EvalError::BadField {
                at,
                field: "subset",
                found: kind(other),
                expected: "a string",
            });
        }
    };
    let id = match obj.get("id") {
        None | Some(Value::Null) => at.number().to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(EvalError::BadField {
                at,
                field: "id",
                found: kind(other),
                expected: "a string or a number",
            });
        }
    };
    Ok(Example {
        id,
        subset,
        prompt,
        chosen,
        rejected,
    })
}

const ASSISTANT: &str = "\n\nAssistant:";
const HUMAN: &str = "\n\nHuman:";

fn hh(obj: &Map<String, Value>, at: RowRef) -> Result<Example, EvalError> {
    let chosen = text(obj, at, "chosen", None)?;
    let rejected = text(obj, at, "rejected", None)?;
    fn split<'t>(t: &'t str, field: &str, at: RowRef) -> Result<(&'t str, &'t str), EvalError> {
        t.rfind(ASSISTANT)
            .map(|i| (&t[..i], &t[i + ASSISTANT.len()..]))
            .ok_or_else(|| EvalError::BadTranscript {
                at,
                reason: format!("`{field}` has no \"\\n\\nAssistant:\" turn"),
            })
    }
    let (pc, c) = split(&chosen, "chosen", at)?;
    let (pr, r) = split(&rejected, "rejected", at)?;
    if pc != pr {
        return Err(EvalError::BadTranscript {
            at,
            reason: "`chosen` and `rejected` do not share the conversation before their last \
                     assistant turn"
                .into(),
        });
    }
    let prompt = if pc.starts_with(HUMAN) && !pc.contains(ASSISTANT) {
        pc[HUMAN.len()..].trim().to_string()
    } else {
        pc.trim().to_string()
    };
    let strip = |s: &str| s.strip_prefix(' ').unwrap_or(s).to_string();
    Ok(Example {
        id: at.number().to_string(),
        subset: None,
        prompt,
        chosen: strip(c),
        rejected: strip(r),
    })
}

fn llmbar(obj: &Map<String, Value>, at: RowRef) -> Result<Example, EvalError> {
    let prompt = text(obj, at, "input", None)?;
    let o1 = text(obj, at, "output_1", None)?;
    let o2 = text(obj, at, "output_2", None)?;
    let label = obj
        .get("label")
        .ok_or(EvalError::MissingField { at, field: "label" })?;
    let (chosen, rejected) = match label.as_u64() {
        Some(1) => (o1, o2),
        Some(2) => (o2, o1),
        _ => {
            return Err(EvalError::BadLabel {
                at,
                value: label.to_string(),
                reason: "expected 1 or 2 (the better output)".into(),
            });
        }
    };
    Ok(Example {
        id: at.number().to_string(),
        subset: None,
        prompt,
        chosen,
        rejected,
    })
}

fn hhh(obj: &Map<String, Value>, at: RowRef) -> Result<Example, EvalError> {
    let prompt = text(obj, at, "input", None)?;
    let targets = obj.get("targets").ok_or(EvalError::MissingField {
        at,
        field: "targets",
    })?;
    let bad = |field: &'static str, found: &Value, expected: &'static str| EvalError::BadField {
        at,
        field,
        found: kind(found),
        expected,
    };
    let t = targets
        .as_object()
        .ok_or_else(|| bad("targets", targets, "an object"))?;
    let choices = t.get("choices").ok_or(EvalError::MissingField {
        at,
        field: "targets.choices",
    })?;
    let labels = t.get("labels").ok_or(EvalError::MissingField {
        at,
        field: "targets.labels",
    })?;
    let choices: Vec<&str> = match choices.as_array() {
        Some(a) if a.len() == 2 && a.iter().all(Value::is_string) => {
            a.iter().filter_map(Value::as_str).collect()
        }
        _ => {
            return Err(bad("targets.choices", choices, "an array of two strings"));
        }
    };
    let bad_label = || EvalError::BadLabel {
        at,
        value: labels.to_string(),
        reason: "expected [1, 0] or [0, 1]".into(),
    };
    let l: Vec<u64> = labels
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let (chosen, rejected) = match l.as_slice() {
        [1, 0] => (choices[0], choices[1]),
        [0, 1] => (choices[1], choices[0]),
        _ => return Err(bad_label()),
    };
    Ok(Example {
        id: at.number().to_string(),
        subset: None,
        prompt,
        chosen: chosen.to_string(),
        rejected: rejected.to_string(),
    })
}

/// Every row of a Parquet file as a JSON object (strings, numbers, null; other types as
/// their display text).
fn parquet_rows(path: &Path) -> Result<Vec<Map<String, Value>>, EvalError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;

    let shown = path.display().to_string();
    let perr = |e: parquet::errors::ParquetError| EvalError::Parquet {
        path: shown.clone(),
        message: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(|source| EvalError::Io {
        path: shown.clone(),
        source,
    })?;
    let reader = SerializedFileReader::new(file).map_err(perr)?;
    let mut out = Vec::new();
    for row in reader.get_row_iter(None).map_err(perr)? {
        let row = row.map_err(perr)?;
        let mut obj = Map::new();
        for (name, field) in row.get_column_iter() {
            let v = match field {
                Field::Null => Value::Null,
                Field::Bool(b) => Value::Bool(*b),
                Field::Str(s) => Value::String(s.clone()),
                Field::Byte(x) => (*x).into(),
                Field::Short(x) => (*x).into(),
                Field::Int(x) => (*x).into(),
                Field::Long(x) => (*x).into(),
                Field::UByte(x) => (*x).into(),
                Field::UShort(x) => (*x).into(),
                Field::UInt(x) => (*x).into(),
                Field::ULong(x) => (*x).into(),
                Field::Bytes(b) => match std::str::from_utf8(b.data()) {
                    Ok(s) => Value::String(s.to_string()),
                    Err(_) => Value::String(field.to_string()),
                },
                other => Value::String(other.to_string()),
            };
            obj.insert(name.clone(), v);
        }
        out.push(obj);
    }
    Ok(out)
}
