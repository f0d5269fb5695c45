//! Chat templates (tokenizer_config.json or chat_template.jinja) rendered with minijinja. (skeleton)

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("no chat template in {dir}")]
    Missing { dir: String },
}
