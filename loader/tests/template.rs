//! Chat template rendering against transformers' `apply_chat_template`.
//!
//! Expected strings were produced with jinja2 3.1.6 in the environment transformers builds
//! in `_compile_jinja_template`: `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True, extensions=[AssistantTracker, loopcontrols])`, `tojson` overridden
//! with `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
//! globals `raise_exception` and `strftime_now`, rendered with `messages`, `tools=None`,
//! `documents=None`, `add_generation_prompt` and the set special tokens (transformers
//! itself was not installed; the environment was rebuilt from its source). They agree with
//! reasoning through each template by hand.

use std::path::{Path, PathBuf};

use cloudrm_loader::LoaderError;
use cloudrm_loader::template::{ChatTemplate, Message, TemplateError, strftime_utc};

/// SmolLM2-135M-Instruct's ChatML template (default system message when none is given).
const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Meta-Llama-3-8B-Instruct's template: content trimmed, BOS before the first message.
const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

/// Block tags on their own, indented lines: trim_blocks drops the newline after a block
/// tag, lstrip_blocks the indentation before it; the source's final newline is dropped.
const MULTILINE: &str = "{% for message in messages %}
    {% if message['role'] == 'system' %}
<<SYS>>{{ message['content'] }}<</SYS>>
    {% else %}
[{{ message['role'] | upper }}] {{ message['content'] }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]
{% endif %}
";

/// Mistral-Instruct-v0.1 style: `.strip()`, `raise_exception`, bos/eos tokens.
const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + eos_token }}{% endif %}{% endfor %}";

fn render(src: &str, messages: &[Message], gen_prompt: bool) -> Result<String, TemplateError> {
    ChatTemplate::new(src, None, None)
        .unwrap()
        .render(messages, gen_prompt)
}

#[test]
fn smollm2_default_system_message() {
    let t = ChatTemplate::new(SMOLLM2, None, Some("<|im_end|>".into())).unwrap();
    let out = t
        .render(&[Message::user("What is the capital of France?")], true)
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(t.source(), SMOLLM2);
}

#[test]
fn smollm2_explicit_system_message() {
    let out = render(
        SMOLLM2,
        &[
            Message::system("You are terse."),
            Message::user("Hi"),
            Message::assistant("Hello!"),
        ],
        false,
    )
    .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    );
}

#[test]
fn smollm2_does_not_trim_content() {
    let out = render(SMOLLM2, &[Message::user("  padded question  \n")], true).unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n  padded question  \n<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn llama3_trims_and_prepends_bos() {
    let t = ChatTemplate::new(LLAMA3, Some("<|begin_of_text|>".into()), None).unwrap();
    let out = t
        .render(
            &[
                Message::system("  Be brief. "),
                Message::user("\nHi there  "),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        out,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let out = t.render(&[Message::user("Hi")], false).unwrap();
    assert_eq!(
        out,
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    );
}

#[test]
fn llama3_without_bos_token_is_a_render_error() {
    // transformers leaves unset special tokens out of the render variables, and jinja2's
    // Undefined cannot be concatenated with `+`.
    let err = render(LLAMA3, &[Message::user("Hi")], false).unwrap_err();
    assert!(matches!(err, TemplateError::Render { .. }), "{err:?}");
}

#[test]
fn trim_blocks_and_lstrip_blocks() {
    let out = render(
        MULTILINE,
        &[
            Message::system("sys"),
            Message::user("hello"),
            Message::assistant("hey"),
        ],
        true,
    )
    .unwrap();
    assert_eq!(
        out,
        "<<SYS>>sys<</SYS>>\n[USER] hello\n[ASSISTANT] hey\n[ASSISTANT]\n"
    );
    let out = render(MULTILINE, &[Message::user("hello")], false).unwrap();
    assert_eq!(out, "[USER] hello\n");
}

#[test]
fn whitespace_edge_cases_match_jinja2() {
    let cases = [
        // keep_trailing_newline=False drops exactly one trailing newline.
        ("x\n", "x"),
        ("x\n\n", "x\n"),
        // trim_blocks eats the newline after a block tag; lstrip_blocks only strips
        // whitespace before a tag at the start of a line.
        ("{% if true %}\n  a\n{% endif %}\n", "  a\n"),
        ("  {% if true %}a{% endif %}  \nb", "a  \nb"),
    ];
    for (src, expected) in cases {
        assert_eq!(render(src, &[], false).unwrap(), expected, "{src:?}");
    }
}

#[test]
fn strip_method_and_special_tokens() {
    let t = ChatTemplate::new(MISTRAL, Some("<s>".into()), Some("</s>".into())).unwrap();
    let out = t
        .render(
            &[
                Message::user("  Hi  "),
                Message::assistant(" Hello "),
                Message::user("Bye"),
            ],
            false,
        )
        .unwrap();
    assert_eq!(out, "<s>[INST] Hi [/INST] Hello</s>[INST] Bye [/INST]");
    assert_eq!(t.bos_token(), Some("<s>"));
    assert_eq!(t.eos_token(), Some("</s>"));
}

#[test]
fn raise_exception_is_a_render_error() {
    let t = ChatTemplate::new(MISTRAL, Some("<s>".into()), Some("</s>".into())).unwrap();
    match t.render(&[Message::assistant("x")], false) {
        Err(TemplateError::Render { reason }) => assert!(
            reason.contains("Conversation roles must alternate user/assistant/user/assistant/..."),
            "{reason}"
        ),
        other => panic!("expected Render, got {other:?}"),
    }
}

#[test]
fn python_style_printing() {
    let src = "{{ none }}|{{ true }}|{{ false }}|{{ [1, 'a', none, \"it's\"] }}|{{ {'a': none, 'b': [true]} }}|{{ 1.5 }}|{{ undefined_var }}|{{ messages[0] }}";
    let out = render(src, &[Message::user("x")], false).unwrap();
    assert_eq!(
        out,
        "None|True|False|[1, 'a', None, \"it's\"]|{'a': None, 'b': [True]}|1.5||{'role': 'user', 'content': 'x'}"
    );
}

#[test]
fn tojson_matches_python_json_dumps() {
    // Dict literals use sorted keys: without minijinja's preserve_order feature template
    // dict literals iterate in key order, while Python keeps insertion order.
    let src = "{{ messages | tojson }}\n{{ messages | tojson(indent=2) }}\n{{ {'a': [1, 2.5, 1e20, none, true], 'b': 'é<>&\"\\n'} | tojson }}\n{{ {'a': 'é'} | tojson(ensure_ascii=true) }}\n{{ {'b': 1, 'a': 2} | tojson(sort_keys=true, separators=[',', ':']) }}\n{{ [] | tojson(indent=2) }}";
    let out = render(src, &[Message::user("héllo \"q\"")], false).unwrap();
    assert_eq!(
        out,
        "[{\"role\": \"user\", \"content\": \"héllo \\\"q\\\"\"}]\n[\n  {\n    \"role\": \"user\",\n    \"content\": \"héllo \\\"q\\\"\"\n  }\n]\n{\"a\": [1, 2.5, 1e+20, null, true], \"b\": \"é<>&\\\"\\n\"}\n{\"a\": \"\\u00e9\"}\n{\"a\":2,\"b\":1}\n[]"
    );
}

#[test]
fn render_variables_and_pycompat_methods() {
    let src = "{% if tools is not none %}T{% else %}N{% endif %}{% if custom_tools is defined %}C{% endif %}{% if date_string is defined %}D{% endif %}{% if documents is none %}d{% endif %}{% if bos_token is defined %}B{% endif %}|{{ bos_token }}|{{ messages[0].tool_calls }}|{% for x in nothing %}x{% endfor %}|{{ messages[0]['content'].split(' ')[1] }}|{{ messages[0].content.startswith('a') }}|{{ messages[0].content | length }}";
    let out = render(src, &[Message::user("ab cd")], false).unwrap();
    assert_eq!(out, "Nd||||cd|True|5");

    let src = "{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}{{ messages[0].get('role') }}{{ messages[0].get('nope', 'dflt') }}{{ 'role' in messages[0] }}";
    let out = render(src, &[Message::user("u")], false).unwrap();
    assert_eq!(out, "role=user;content=u;userdfltTrue");
}

#[test]
fn attribute_of_undefined_is_a_render_error() {
    // jinja2: UndefinedError: 'foo' is undefined.
    let err = render("{{ foo.bar }}", &[], false).unwrap_err();
    assert!(matches!(err, TemplateError::Render { .. }), "{err:?}");
}

#[test]
fn generation_tags_render_their_body() {
    let src = "{% for m in messages %}{% if m.role == 'assistant' %}\n  {%- generation -%}\n  {{ m.content }}\n  {%- endgeneration %}\n{% else %}{{ m.content }}\n{% endif %}{% endfor %}";
    let t = ChatTemplate::new(src, None, None).unwrap();
    let out = t
        .render(&[Message::user("q"), Message::assistant("a")], false)
        .unwrap();
    assert_eq!(out, "q\na");
    // The original text is kept.
    assert_eq!(t.source(), src);
}

#[test]
fn strftime() {
    // Expected values from Python's time.strftime(fmt, time.gmtime(secs)).
    assert_eq!(
        strftime_utc(
            1_721_952_000 + 13 * 3600 + 5 * 60 + 9,
            "%d %b %Y %H:%M:%S %A %j %-d %y %I%p %e %%|%Q"
        ),
        "26 Jul 2024 13:05:09 Friday 208 26 24 01PM 26 %|%Q"
    );
    assert_eq!(
        strftime_utc(951_782_400, "%Y-%m-%d %a %B %j"),
        "2000-02-29 Tue February 060"
    );
    assert_eq!(
        strftime_utc(-86_400, "%Y-%m-%d %a %j"),
        "1969-12-31 Wed 365"
    );
    // strftime_now is callable from templates; the date is today's, so check its shape.
    let out = render("{{ strftime_now('%d %b %Y') }}", &[], false).unwrap();
    let parts: Vec<&str> = out.split(' ').collect();
    assert_eq!(parts.len(), 3, "{out}");
    assert_eq!(parts[0].len(), 2);
    assert_eq!(parts[1].len(), 3);
    assert!(parts[2].parse::<u32>().unwrap() >= 2024);
}

#[test]
fn syntax_error_names_template_and_line() {
    match ChatTemplate::new(
        "line one\n{% for m in messages %}\n{{ m.content }",
        None,
        None,
    ) {
        Err(TemplateError::Syntax { name, reason, line }) => {
            assert_eq!(name, "chat_template");
            assert!(!reason.is_empty());
            assert!(matches!(line, Some(2 | 3)), "{line:?}");
        }
        other => panic!("expected Syntax, got {other:?}"),
    }
}

/// A fresh scratch directory per test (no tempfile crate in this workspace).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "cloudrm-loader-template-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.0.join(file);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config_json(chat_template: serde_json::Value) -> String {
    serde_json::json!({
        "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": false},
        "eos_token": "<|eot_id|>",
        "chat_template": chat_template,
    })
    .to_string()
}

#[test]
fn from_dir_string_form() {
    let dir = TempDir::new("string");
    dir.write("tokenizer_config.json", &config_json(LLAMA3.into()));
    let t = ChatTemplate::from_dir(dir.path()).unwrap();
    assert_eq!(t.source(), LLAMA3);
    assert_eq!(t.bos_token(), Some("<|begin_of_text|>"));
    assert_eq!(t.eos_token(), Some("<|eot_id|>"));
    assert_eq!(
        t.render(&[Message::user("Hi")], false).unwrap(),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    );
}

#[test]
fn from_dir_list_form_picks_default() {
    let dir = TempDir::new("list");
    let list = serde_json::json!([
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": SMOLLM2},
        {"name": "rag", "template": "RAG"},
    ]);
    dir.write("tokenizer_config.json", &config_json(list));
    let t = ChatTemplate::from_dir(dir.path()).unwrap();
    assert_eq!(t.source(), SMOLLM2);
}

#[test]
fn from_dir_list_without_default() {
    let dir = TempDir::new("list-no-default");
    let list = serde_json::json!([{"name": "tool_use", "template": "T"}, {"name": "rag", "template": "R"}]);
    let config = dir.write("tokenizer_config.json", &config_json(list));
    match ChatTemplate::from_dir(dir.path()) {
        Err(LoaderError::Template(TemplateError::NoDefault { path, names })) => {
            assert_eq!(path, config);
            assert_eq!(names, ["tool_use", "rag"]);
        }
        other => panic!("expected NoDefault, got {other:?}"),
    }
}

#[test]
fn from_dir_wrong_field_type() {
    let dir = TempDir::new("wrong-type");
    let config = dir.write("tokenizer_config.json", &config_json(serde_json::json!(42)));
    match ChatTemplate::from_dir(dir.path()) {
        Err(LoaderError::Template(TemplateError::InvalidField { path, field, .. })) => {
            assert_eq!(path, config);
            assert_eq!(field, "chat_template");
        }
        other => panic!("expected InvalidField, got {other:?}"),
    }
}

#[test]
fn from_dir_jinja_file_takes_precedence() {
    let dir = TempDir::new("jinja");
    dir.write("tokenizer_config.json", &config_json(LLAMA3.into()));
    dir.write("chat_template.jinja", SMOLLM2);
    let t = ChatTemplate::from_dir(dir.path()).unwrap();
    assert_eq!(t.source(), SMOLLM2);
    // Special tokens still come from tokenizer_config.json.
    assert_eq!(t.bos_token(), Some("<|begin_of_text|>"));
    // A jinja file alone (no tokenizer_config.json) is enough.
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let t = ChatTemplate::from_dir(dir.path()).unwrap();
    assert_eq!(t.source(), SMOLLM2);
    assert_eq!(t.bos_token(), None);
}

#[test]
fn from_dir_syntax_error_names_the_file() {
    let dir = TempDir::new("jinja-syntax");
    dir.write("chat_template.jinja", "{% if %}");
    match ChatTemplate::from_dir(dir.path()) {
        Err(LoaderError::Template(TemplateError::Syntax { name, .. })) => {
            assert_eq!(name, "chat_template.jinja")
        }
        other => panic!("expected Syntax, got {other:?}"),
    }
}

#[test]
fn from_dir_missing_template() {
    let dir = TempDir::new("missing");
    // A config without a chat_template (base model) and no jinja file.
    dir.write(
        "tokenizer_config.json",
        r#"{"eos_token": "</s>", "chat_template": null}"#,
    );
    match ChatTemplate::from_dir(dir.path()) {
        Err(LoaderError::Template(TemplateError::Missing { dir: d })) => assert_eq!(d, dir.path()),
        other => panic!("expected Missing, got {other:?}"),
    }
    let empty = TempDir::new("empty");
    assert!(matches!(
        ChatTemplate::from_dir(empty.path()),
        Err(LoaderError::Template(TemplateError::Missing { .. }))
    ));
}

#[test]
fn from_dir_invalid_json_names_the_file() {
    let dir = TempDir::new("bad-json");
    let config = dir.write("tokenizer_config.json", "{\"chat_template\": \"x\",");
    match ChatTemplate::from_dir(dir.path()) {
        Err(LoaderError::Template(TemplateError::InvalidConfig { path, reason })) => {
            assert_eq!(path, config);
            assert!(!reason.is_empty());
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}
