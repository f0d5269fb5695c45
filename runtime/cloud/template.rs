//! The CLoud sequence layout, rendered with the model's own chat template:
//! user = prompt; assistant = response; user = `COT_PROMPT + critique`.
//!
//! One rule for the critique text (zankner/CLoud is inconsistent; its quirks are not
//! copied): the generation prefix ends right after `question:` (no trailing space); the
//! model writes the critique with its own leading space; the scored sequence is exactly
//! the prefix, the generated tokens and the end-of-turn token (no re-tokenisation). In
//! training data the critique turn's content is `question:` + " " + critique.trim().
//! Classic mode: only the first two turns; the reward is read at the end-of-turn token
//! that closes the assistant turn.
//!
//! The end-of-turn token is found from the template itself: the text it renders right
//! after a turn's content starts with it (`<|im_end|>` for ChatML, `<|eot_id|>` for
//! Llama 3), so no model family is hard-coded.

use cloudrm_loader::template::{ChatTemplate, Message};
use cloudrm_loader::tokenizer::Tokenizer;

use crate::error::{Error, Result};

/// The critique request of the released CLoud checkpoints, trailing space included.
pub const COT_PROMPT: &str = "The following is a break down on the correctness and usefulness of the assistant's response to my question: ";

/// A private-use marker no real text contains; rendering cuts there.
const CUT: &str = "\u{E000}cloudrm-cut\u{E001}";

/// A chat template + tokenizer pair that lays out CLoud sequences.
pub struct CloudTemplate<'a> {
    pub template: &'a ChatTemplate,
    pub tokenizer: &'a Tokenizer,
}

impl<'a> CloudTemplate<'a> {
    pub fn new(template: &'a ChatTemplate, tokenizer: &'a Tokenizer) -> Self {
        CloudTemplate {
            template,
            tokenizer,
        }
    }

    /// Render `messages` as they are and with the cut marker after the last turn's
    /// content. The text before the marker, shortened to what both renderings share,
    /// is exactly what the template writes up to the end of that content, whether or
    /// not it trims the content (Llama 3 trims, ChatML does not). The end-of-turn token
    /// is the first token of what follows in the real rendering.
    fn cut(&self, messages: &[Message]) -> Result<(String, u32)> {
        let (before, after) = split_after_last_content(self.template, messages)?;
        let after = after.as_str();
        let after_ids = self.tokenizer.encode(after, false)?;
        let Some(&eot) = after_ids.first() else {
            return Err(Error::Usage(
                "the chat template writes nothing after a turn's content; no end-of-turn token"
                    .into(),
            ));
        };
        // The end-of-turn token must be a whole token of the rendered text (a special
        // token), not the first piece of ordinary text.
        let eot_text = self.tokenizer.decode(&[eot], false)?;
        if !after.starts_with(&eot_text) || self.tokenizer.token_to_id(&eot_text) != Some(eot) {
            return Err(Error::Usage(format!(
                "the text after a turn ({after:?}) does not start with a single end-of-turn token"
            )));
        }
        Ok((before, eot))
    }

    /// Token ids of the critique-generation prefix (ending right after `question:`) and
    /// the end-of-turn token id.
    pub fn cloud_prefix(&self, prompt: &str, response: &str) -> Result<(Vec<u32>, u32)> {
        let messages = [
            Message::user(prompt),
            Message::assistant(response),
            Message::user(COT_PROMPT.trim_end()),
        ];
        let (text, eot) = self.cut(&messages)?;
        Ok((self.tokenizer.encode(&text, false)?, eot))
    }

    /// Token ids of the classic sequence, ending with the end-of-turn token that closes
    /// the assistant turn (where the classic reward is read).
    pub fn classic_sequence(&self, prompt: &str, response: &str) -> Result<Vec<u32>> {
        let messages = [Message::user(prompt), Message::assistant(response)];
        let (text, eot) = self.cut(&messages)?;
        let mut ids = self.tokenizer.encode(&text, false)?;
        ids.push(eot);
        Ok(ids)
    }

    /// The training sequence for a given critique text: the critique turn's content is
    /// `question:` + " " + critique.trim(); returns (ids, index of the end-of-turn token).
    pub fn training_sequence(
        &self,
        prompt: &str,
        response: &str,
        critique: &str,
    ) -> Result<(Vec<u32>, usize)> {
        let request = format!("{} {}", COT_PROMPT.trim_end(), critique.trim());
        let messages = [
            Message::user(prompt),
            Message::assistant(response),
            Message::user(&request),
        ];
        let (text, eot) = self.cut(&messages)?;
        let mut ids = self.tokenizer.encode(&text, false)?;
        ids.push(eot);
        let at = ids.len() - 1;
        Ok((ids, at))
    }
}

/// The template's rendering of `messages` split right after the last turn's content:
/// (everything up to the end of that content, everything after it). Found by rendering
/// the messages as they are and with a marker after the last content; the two renderings
/// part where the content ends, whether or not the template trims it.
pub fn split_after_last_content(
    template: &ChatTemplate,
    messages: &[Message],
) -> Result<(String, String)> {
    let real = template.render(messages, false)?;
    let mut marked = messages.to_vec();
    if let Some(last) = marked.last_mut() {
        last.content.push_str(CUT);
    }
    let text = template.render(&marked, false)?;
    let Some(at) = text.find(CUT) else {
        return Err(Error::Usage(
            "the chat template dropped the content of the last turn; cannot lay out a CLoud sequence".into(),
        ));
    };
    let shared = common_prefix_len(&real, &text[..at]);
    Ok((real[..shared].to_string(), real[shared..].to_string()))
}

/// Length in bytes of the longest common prefix of `a` and `b` (on a char boundary).
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}
