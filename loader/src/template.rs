//! Chat templates (`chat_template.jinja` or `tokenizer_config.json`'s `chat_template`)
//! rendered with minijinja so that the output equals Hugging Face transformers'
//! `apply_chat_template(..., tokenize=False)`.
//!
//! transformers renders with a jinja2 `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True)`, the default (lenient) `Undefined`, `keep_trailing_newline=False`,
//! extra globals `raise_exception` and `strftime_now`, and its own `tojson` filter
//! (`json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
//! no HTML escaping). This module reproduces that environment:
//!
//! - `trim_blocks`, `lstrip_blocks` on; trailing newline of the source dropped (minijinja's
//!   default, like jinja2's).
//! - `UndefinedBehavior::Lenient`, which is jinja2's default `Undefined`: an undefined value
//!   prints as empty, iterates as empty and is false in tests, while an attribute or item
//!   lookup *on* an undefined value is an error (`{{ missing.x }}`); a missing key of a
//!   defined map is merely undefined (`{{ message.tool_calls }}`).
//! - Python string/dict methods (`.strip()`, `.startswith()`, `.split()`, `.items()`, ...)
//!   through `minijinja_contrib::pycompat`.
//! - Printing follows Python's `str()`: `None`, `True`, `False`, lists and dicts in repr form.
//! - Auto-escaping is off whatever the template's name (minijinja would otherwise escape
//!   for a template named `*.json`).
//! - `{% generation %}...{% endgeneration %}` (transformers' AssistantTracker extension) is
//!   accepted and renders its body, as transformers does.
//! - Render variables: `messages`, `add_generation_prompt`, `tools = none`,
//!   `documents = none`, and `bos_token` / `eos_token` only when known (transformers passes
//!   its `special_tokens_map`, which leaves unset tokens out). `custom_tools`,
//!   `date_string` and other template options are left undefined, as transformers does
//!   when the caller passes none.
//!
//! Known differences: `strftime_now` formats the current time in UTC (transformers uses
//! local time) and supports a subset of directives, see [`strftime_utc`];
//! `{% break %}`/`{% continue %}` need minijinja's `loop_controls` feature, which this
//! workspace does not enable (such templates fail with [`TemplateError::Syntax`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};

use crate::LoaderError;
use crate::tokenizer::{ConfigReadError, read_tokenizer_config, special_token_string};

/// Errors from loading or rendering a chat template. Each names the file, field or
/// template at fault.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error(
        "no chat template in {}\nhint: expected chat_template.jinja, or a \"chat_template\" \
         field in tokenizer_config.json (base models often have none: use an instruct model \
         or pass a template)",
        dir.display()
    )]
    Missing { dir: PathBuf },
    #[error(
        "template {name}: syntax error{}: {reason}",
        line.map(|l| format!(" at line {l}")).unwrap_or_default()
    )]
    Syntax {
        name: String,
        reason: String,
        line: Option<usize>,
    },
    #[error("rendering chat template: {reason}")]
    Render { reason: String },
    #[error("{}: invalid JSON: {reason}", path.display())]
    InvalidConfig { path: PathBuf, reason: String },
    #[error("{}: field {field:?}: {reason}", path.display())]
    InvalidField {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error(
        "{}: several chat templates ({}) and none named \"default\"",
        path.display(),
        names.join(", ")
    )]
    NoDefault { path: PathBuf, names: Vec<String> },
}

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Message::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Message::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Message::new("assistant", content)
    }
}

/// A compiled chat template plus the special-token strings it may reference.
pub struct ChatTemplate {
    source: String,
    /// Name the template was compiled under (the file it came from).
    name: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("name", &self.name)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source` (named `chat_template` in errors).
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TemplateError> {
        Self::with_name("chat_template", source.into(), bos_token, eos_token)
    }

    fn with_name(
        name: &str,
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, TemplateError> {
        let mut env = hf_environment();
        env.add_template_owned(name.to_string(), rewrite_generation_tags(&source))
            .map_err(|e| TemplateError::Syntax {
                name: name.to_string(),
                reason: e.detail().map_or_else(|| e.to_string(), str::to_string),
                line: e.line(),
            })?;
        Ok(ChatTemplate {
            source,
            name: name.to_string(),
            bos_token,
            eos_token,
            env,
        })
    }

    /// Loads the template of a model directory. Source, in order:
    /// `dir/chat_template.jinja` (transformers 5 layout); `tokenizer_config.json`'s
    /// `"chat_template"` (a string, or a list of `{"name", "template"}` from which
    /// `"default"` is taken); `dir/chat_template.json`'s `"chat_template"` (processor
    /// layout). BOS/EOS strings come from `tokenizer_config.json` (string or
    /// `{"content": ...}` form).
    pub fn from_dir(dir: &Path) -> Result<ChatTemplate, LoaderError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_tokenizer_config(&config_path).map_err(|e| match e {
            ConfigReadError::Io(e) => LoaderError::io(&config_path, e),
            ConfigReadError::Json(reason) => TemplateError::InvalidConfig {
                path: config_path.clone(),
                reason,
            }
            .into(),
        })?;
        let (bos_token, eos_token) = match &config {
            Some(c) => (
                special_token_string(c, "bos_token"),
                special_token_string(c, "eos_token"),
            ),
            None => (None, None),
        };

        let jinja_path = dir.join("chat_template.jinja");
        if let Some(source) = read_optional(&jinja_path)? {
            return Ok(Self::with_name(
                "chat_template.jinja",
                source,
                bos_token,
                eos_token,
            )?);
        }
        if let Some(config) = &config
            && let Some(source) = template_field(config, &config_path)?
        {
            return Ok(Self::with_name(
                "tokenizer_config.json",
                source,
                bos_token,
                eos_token,
            )?);
        }
        let json_path = dir.join("chat_template.json");
        if let Some(text) = read_optional(&json_path)? {
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| TemplateError::InvalidConfig {
                    path: json_path.clone(),
                    reason: e.to_string(),
                })?;
            if let Some(obj) = value.as_object()
                && let Some(source) = template_field(obj, &json_path)?
            {
                return Ok(Self::with_name(
                    "chat_template.json",
                    source,
                    bos_token,
                    eos_token,
                )?);
            }
        }
        Err(TemplateError::Missing {
            dir: dir.to_path_buf(),
        }
        .into())
    }

    /// Renders `messages` exactly as transformers' `apply_chat_template(messages,
    /// tokenize=False, add_generation_prompt=...)`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let mut vars: BTreeMap<&str, Value> = BTreeMap::new();
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| Value::from_object(MessageObject(m.clone())))
            .collect();
        vars.insert("messages", Value::from(messages));
        vars.insert("add_generation_prompt", Value::from(add_generation_prompt));
        vars.insert("tools", Value::from(()));
        vars.insert("documents", Value::from(()));
        if let Some(bos) = &self.bos_token {
            vars.insert("bos_token", Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            vars.insert("eos_token", Value::from(eos.as_str()));
        }
        let ctx: Value = vars.into_iter().collect();
        let template = self
            .env
            .get_template(&self.name)
            .map_err(|e| render_error(&e))?;
        template.render(ctx).map_err(|e| render_error(&e))
    }

    /// The template text as loaded (before any internal rewriting).
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
}

/// A message as the template sees it: a map with keys in Python dict order (`role`,
/// then `content`), whatever minijinja's own map ordering is, so that `tojson` and
/// `.items()` iterate as transformers' dicts do.
#[derive(Debug)]
struct MessageObject(Message);

impl Object for MessageObject {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.0.role.as_str())),
            "content" => Some(Value::from(self.0.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

fn render_error(e: &minijinja::Error) -> TemplateError {
    let mut reason = match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        let _ = write!(reason, " (line {line})");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(reason, ": {s}");
        source = s.source();
    }
    TemplateError::Render { reason }
}

/// Reads a file that may be absent.
fn read_optional(path: &Path) -> Result<Option<String>, LoaderError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LoaderError::io(path, e)),
    }
}

/// The `"chat_template"` field: a string, or a list of `{"name", "template"}` from which
/// the one named `"default"` is taken (transformers' choice when no name is given and no
/// tools are passed). `Ok(None)` when absent or null.
fn template_field(
    config: &serde_json::Map<String, serde_json::Value>,
    path: &Path,
) -> Result<Option<String>, TemplateError> {
    let field = "chat_template";
    let invalid = |reason: String| TemplateError::InvalidField {
        path: path.to_path_buf(),
        field: field.to_string(),
        reason,
    };
    match config.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(items)) => {
            let mut names = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let name = item.get("name").and_then(|v| v.as_str());
                let template = item.get("template").and_then(|v| v.as_str());
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => {
                        return Err(invalid(format!(
                            "entry {i} is not an object with string \"name\" and \"template\""
                        )));
                    }
                }
            }
            Err(TemplateError::NoDefault {
                path: path.to_path_buf(),
                names,
            })
        }
        Some(other) => Err(invalid(format!(
            "expected a string or a list of {{\"name\", \"template\"}}, found {}",
            json_kind(other)
        ))),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The environment transformers renders chat templates in, rebuilt for minijinja.
fn hf_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(|out, _state, value| {
        out.write_str(&py_str(value))
            .map_err(|e| minijinja::Error::new(ErrorKind::WriteFailure, e.to_string()))
    });
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

fn raise_exception(message: Value) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("raise_exception: {}", py_str(&value_or_empty(message))),
    ))
}

fn value_or_empty(v: Value) -> Value {
    if v.is_undefined() { Value::from("") } else { v }
}

fn strftime_now(format: &str) -> Result<String, minijinja::Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let secs = i64::try_from(now.as_secs())
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(strftime_utc(secs, format))
}

/// `time.strftime` of a Unix time in UTC, for the directives chat templates use:
/// `%Y %y %m %-m %d %-d %e %H %-H %I %M %S %p %j %a %A %b %h %B %Z (UTC) %z (+0000) %%`.
/// Unknown directives are copied through unchanged, as glibc's strftime does.
pub fn strftime_utc(unix_secs: i64, format: &str) -> String {
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (
        secs_of_day / 3600,
        (secs_of_day / 60) % 60,
        secs_of_day % 60,
    );
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS[(month - 1) as usize];
    let day_name = DAYS[weekday];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let Some(d) = chars.next() else {
            out.push('%');
            if no_pad {
                out.push('-');
            }
            break;
        };
        let num = |v: i64, width: usize| {
            if no_pad {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        let s = match d {
            'Y' => year.to_string(),
            'y' => num(year.rem_euclid(100), 2),
            'm' => num(month, 2),
            'd' => num(day, 2),
            'e' => format!("{day:2}"),
            'H' => num(hour, 2),
            'I' => num(hour12, 2),
            'M' => num(minute, 2),
            'S' => num(second, 2),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_string(),
            'j' => num(day_of_year, 3),
            'a' => day_name[..3].to_string(),
            'A' => day_name.to_string(),
            'b' | 'h' => month_name[..3].to_string(),
            'B' => month_name.to_string(),
            'Z' => "UTC".to_string(),
            'z' => "+0000".to_string(),
            '%' => "%".to_string(),
            other => {
                if no_pad {
                    format!("%-{other}")
                } else {
                    format!("%{other}")
                }
            }
        };
        out.push_str(&s);
    }
    out
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31), proleptic Gregorian
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, keyword arguments accepted, the first positional
/// argument being `ensure_ascii` as in its Python signature.
fn tojson(
    value: &Value,
    ensure_ascii: Option<bool>,
    kwargs: Kwargs,
) -> Result<Value, minijinja::Error> {
    let ensure_ascii = match kwargs.get::<Option<bool>>("ensure_ascii")? {
        Some(v) => v,
        None => ensure_ascii.unwrap_or(false),
    };
    let indent: Option<String> = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            (None, Some(s)) => Some(s.to_string()),
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        },
    };
    let separators = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(v) if v.len() == 2 => (v[0].clone(), v[1].clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair of strings",
            ));
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let opts = JsonOpts {
        ensure_ascii,
        indent,
        item_sep: separators.0,
        key_sep: separators.1,
        sort_keys,
    };
    let mut out = String::new();
    json_dump(value, &opts, 0, &mut out)?;
    Ok(Value::from(out))
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// Python's `json.dumps` encoder over a minijinja value.
fn json_dump(
    value: &Value,
    opts: &JsonOpts,
    level: usize,
    out: &mut String,
) -> Result<(), minijinja::Error> {
    let not_serializable = |kind: ValueKind| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: object of kind {kind} is not JSON serializable"),
        )
    };
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&py_number(value)),
        ValueKind::String => json_string(value.as_str().unwrap_or(""), opts.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            json_container(items.len(), '[', ']', opts, level, out, |i, out| {
                json_dump(&items[i], opts, level + 1, out)
            })?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or("").to_string(),
                    ValueKind::None => "null".to_string(),
                    ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
                    ValueKind::Number => py_number(&key),
                    kind => return Err(not_serializable(kind)),
                };
                entries.push((key, item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            json_container(entries.len(), '{', '}', opts, level, out, |i, out| {
                let (k, v) = &entries[i];
                json_string(k, opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                json_dump(v, opts, level + 1, out)
            })?;
        }
        kind => return Err(not_serializable(kind)),
    }
    Ok(())
}

fn json_container(
    len: usize,
    open: char,
    close: char,
    opts: &JsonOpts,
    level: usize,
    out: &mut String,
    mut item: impl FnMut(usize, &mut String) -> Result<(), minijinja::Error>,
) -> Result<(), minijinja::Error> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..len {
        if i > 0 {
            out.push_str(&opts.item_sep);
        }
        if let Some(ind) = &opts.indent {
            out.push('\n');
            out.push_str(&ind.repeat(level + 1));
        }
        item(i, out)?;
    }
    if let Some(ind) = &opts.indent {
        out.push('\n');
        out.push_str(&ind.repeat(level));
    }
    out.push(close);
    Ok(())
}

/// A JSON string literal as Python's json module writes it.
fn json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `str()` of a value, as jinja2 prints it.
fn py_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::String => value.as_str().unwrap_or("").to_string(),
        _ => py_repr(value),
    }
}

/// Python's `repr()` of a value (strings quoted, `None`, `True`, lists and dicts).
fn py_repr(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".to_string(),
        ValueKind::Bool => (if value.is_true() { "True" } else { "False" }).to_string(),
        ValueKind::Number => py_number(value),
        ValueKind::String => py_string_repr(value.as_str().unwrap_or("")),
        ValueKind::Seq => match value.try_iter() {
            Ok(items) => {
                let parts: Vec<String> = items.map(|v| py_repr(&v)).collect();
                format!("[{}]", parts.join(", "))
            }
            Err(_) => value.to_string(),
        },
        ValueKind::Map => match value.try_iter() {
            Ok(keys) => {
                let parts: Vec<String> = keys
                    .map(|k| {
                        let v = value.get_item(&k).unwrap_or(Value::UNDEFINED);
                        format!("{}: {}", py_repr(&k), py_repr(&v))
                    })
                    .collect();
                format!("{{{}}}", parts.join(", "))
            }
            Err(_) => value.to_string(),
        },
        _ => value.to_string(),
    }
}

/// Python's repr of an int or float (`1.0`, `1e+16`, `1e-05`, `nan`, `inf`).
fn py_number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(x) => py_float_repr(x),
        Err(_) => value.to_string(),
    }
}

fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".to_string();
    }
    if x.is_infinite() {
        return (if x > 0.0 { "inf" } else { "-inf" }).to_string();
    }
    if x == 0.0 {
        return (if x.is_sign_negative() { "-0.0" } else { "0.0" }).to_string();
    }
    // Shortest round-trip digits and decimal exponent, e.g. "1.2345e3".
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if x < 0.0 { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp >= 0 {
            if n > exp + 1 {
                let (int, frac) = digits.split_at((exp + 1) as usize);
                format!("{int}.{frac}")
            } else {
                format!("{digits}{}.0", "0".repeat((exp + 1 - n) as usize))
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        };
        format!("{sign}{body}")
    } else {
        let mant = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mant}e{esign}{:02}", exp.abs())
    }
}

fn py_string_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Rewrites transformers' `{% generation %}` / `{% endgeneration %}` block tags (its
/// AssistantTracker extension, which renders the body unchanged) to `{% if true %}` /
/// `{% endif %}`, keeping whitespace-control markers so that output is identical.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        match parse_generation_tag(tag) {
            Some((len, replacement)) => {
                out.push_str(&replacement);
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// If `tag` starts with `{%[-+]? (end)?generation [-+]?%}`, its length and replacement.
fn parse_generation_tag(tag: &str) -> Option<(usize, String)> {
    let body = tag.strip_prefix("{%")?;
    let mut i = 0;
    let bytes = body.as_bytes();
    let open_marker = match bytes.first() {
        Some(b'-') => "-",
        Some(b'+') => "+",
        _ => "",
    };
    i += open_marker.len();
    while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    let (keyword_len, replacement) = if body[i..].starts_with("endgeneration") {
        ("endgeneration".len(), "endif")
    } else if body[i..].starts_with("generation") {
        ("generation".len(), "if true")
    } else {
        return None;
    };
    i += keyword_len;
    let ws_start = i;
    while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    if i == ws_start && !matches!(bytes.get(i), Some(b'-' | b'+' | b'%')) {
        return None;
    }
    let close_marker = match bytes.get(i) {
        Some(b'-') => "-",
        Some(b'+') => "+",
        _ => "",
    };
    i += close_marker.len();
    if !body[i..].starts_with("%}") {
        return None;
    }
    i += 2;
    Some((
        2 + i,
        format!("{{%{open_marker} {replacement} {close_marker}%}}"),
    ))
}
