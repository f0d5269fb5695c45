//! Stop conditions: stop token ids, stop strings on the decoded text, max tokens.
//!
//! Feed every generated token with the text it decodes to ([`StopChecker::push`]); pieces may
//! be empty (e.g. while a multi-byte character is incomplete). Checks, in this order per token:
//!
//! 1. Stop token id: the generation ends with [`StopKind::Token`]; its piece is not added to
//!    the text (vLLM's default).
//! 2. Stop strings: the piece is appended and the text searched for every stop string, also
//!    across token boundaries (only the tail that can hold a new match is searched). The
//!    earliest match wins (then the lowest stop-string index); the text is cut right before it
//!    and the generation ends with [`StopKind::String`].
//! 3. Max tokens: after `max_tokens` tokens (stop tokens included) the generation ends with
//!    [`FinishReason::Length`].
//!
//! Once finished, further pushes change nothing and return the same reason.

use crate::params::SamplingParams;

/// Which stop condition fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopKind {
    /// A stop token id was generated.
    Token(u32),
    /// The stop string at this index of `stop_strings` appeared in the text.
    String(usize),
}

/// Why a generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop(StopKind),
    /// `max_tokens` tokens were generated.
    Length,
}

/// Result of feeding one token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopStatus {
    /// Keep generating.
    Continue,
    /// The generation is over.
    Finished(FinishReason),
}

/// Incremental stop detection for one sequence.
#[derive(Debug, Clone)]
pub struct StopChecker {
    stop_token_ids: Vec<u32>,
    /// Non-empty stop strings (empty ones are ignored).
    stop_strings: Vec<String>,
    /// Longest stop string in bytes (0 = none).
    max_stop_len: usize,
    max_tokens: usize,
    /// Tokens pushed so far.
    n_tokens: usize,
    /// Decoded text so far (cut before the stop string once one matched).
    text: String,
    finished: Option<FinishReason>,
}

impl StopChecker {
    /// From the stop fields of `params`.
    pub fn new(params: &SamplingParams) -> Self {
        Self::from_parts(
            params.stop_token_ids.clone(),
            params.stop_strings.clone(),
            params.max_tokens,
        )
    }

    /// From explicit parts. Empty stop strings are ignored; `max_tokens == 0` finishes with
    /// `Length` at the first push.
    pub fn from_parts(
        stop_token_ids: Vec<u32>,
        stop_strings: Vec<String>,
        max_tokens: usize,
    ) -> Self {
        let mut stop_strings = stop_strings;
        stop_strings.retain(|s| !s.is_empty());
        let max_stop_len = stop_strings.iter().map(String::len).max().unwrap_or(0);
        Self {
            stop_token_ids,
            stop_strings,
            max_stop_len,
            max_tokens,
            n_tokens: 0,
            text: String::new(),
            finished: None,
        }
    }

    /// Feeds one generated token and the text it decodes to.
    pub fn push(&mut self, token: u32, piece: &str) -> StopStatus {
        if let Some(reason) = &self.finished {
            return StopStatus::Finished(reason.clone());
        }
        self.n_tokens += 1;
        if self.stop_token_ids.contains(&token) {
            return self.finish(FinishReason::Stop(StopKind::Token(token)));
        }
        let old_len = self.text.len();
        self.text.push_str(piece);
        if self.max_stop_len > 0 && !piece.is_empty() {
            // A new match must end inside `piece`, so it starts at most max_stop_len - 1 bytes
            // before it.
            let mut start = old_len.saturating_sub(self.max_stop_len - 1);
            while !self.text.is_char_boundary(start) {
                start -= 1;
            }
            let tail = &self.text[start..];
            let mut best: Option<(usize, usize)> = None;
            for (index, stop) in self.stop_strings.iter().enumerate() {
                if let Some(at) = tail.find(stop.as_str())
                    && best.is_none_or(|(best_at, _)| at < best_at)
                {
                    best = Some((at, index));
                }
            }
            if let Some((at, index)) = best {
                self.text.truncate(start + at);
                return self.finish(FinishReason::Stop(StopKind::String(index)));
            }
        }
        if self.n_tokens >= self.max_tokens {
            return self.finish(FinishReason::Length);
        }
        StopStatus::Continue
    }

    fn finish(&mut self, reason: FinishReason) -> StopStatus {
        self.finished = Some(reason.clone());
        StopStatus::Finished(reason)
    }

    /// The text so far; after a stop-string match, the text before the stop string.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The text that can be shown now: while running, the text minus its longest suffix that
    /// could still grow into a stop string; once finished, all of [`StopChecker::text`].
    pub fn stable_text(&self) -> &str {
        if self.finished.is_some() {
            return &self.text;
        }
        let mut held = 0;
        for stop in &self.stop_strings {
            // Longest proper prefix of `stop` that is a suffix of the text.
            for (len, _) in stop.char_indices().skip(1) {
                if len > held && self.text.ends_with(&stop[..len]) {
                    held = len;
                }
            }
        }
        &self.text[..self.text.len() - held]
    }

    /// Tokens pushed so far (stop tokens included).
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Why the generation ended, if it has.
    pub fn finish_reason(&self) -> Option<&FinishReason> {
        self.finished.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker(ids: &[u32], strings: &[&str], max: usize) -> StopChecker {
        StopChecker::from_parts(
            ids.to_vec(),
            strings.iter().map(|s| s.to_string()).collect(),
            max,
        )
    }

    #[test]
    fn stop_token_ends_without_its_text() {
        let mut c = checker(&[2], &[], 10);
        assert_eq!(c.push(5, "Hello"), StopStatus::Continue);
        assert_eq!(
            c.push(2, "<|im_end|>"),
            StopStatus::Finished(FinishReason::Stop(StopKind::Token(2)))
        );
        assert_eq!(c.text(), "Hello");
        // Finished is sticky.
        assert_eq!(
            c.push(7, " more"),
            StopStatus::Finished(FinishReason::Stop(StopKind::Token(2)))
        );
        assert_eq!(c.text(), "Hello");
        assert_eq!(c.n_tokens(), 2);
    }

    #[test]
    fn stop_string_split_across_tokens() {
        let mut c = checker(&[], &["</critique>"], 100);
        for piece in ["The answer", " is fine.</cr", "iti"] {
            assert_eq!(c.push(1, piece), StopStatus::Continue, "{piece}");
        }
        assert_eq!(c.stable_text(), "The answer is fine.");
        assert_eq!(
            c.push(1, "que> trailing"),
            StopStatus::Finished(FinishReason::Stop(StopKind::String(0)))
        );
        assert_eq!(c.text(), "The answer is fine.");
        assert_eq!(c.stable_text(), "The answer is fine.");
    }

    #[test]
    fn stop_string_one_char_per_token_and_earliest_wins() {
        let mut c = checker(&[], &["cd", "bcde"], 100);
        let mut status = StopStatus::Continue;
        for ch in ["a", "b", "c", "d", "e"] {
            status = c.push(0, ch);
            if status != StopStatus::Continue {
                break;
            }
        }
        // "cd" completes first (at "d"); "bcde" never gets the chance.
        assert_eq!(
            status,
            StopStatus::Finished(FinishReason::Stop(StopKind::String(0)))
        );
        assert_eq!(c.text(), "ab");

        // Within one piece, the earliest start wins regardless of list order.
        let mut c = checker(&[], &["cd", "bc"], 100);
        assert_eq!(
            c.push(0, "abcd"),
            StopStatus::Finished(FinishReason::Stop(StopKind::String(1)))
        );
        assert_eq!(c.text(), "a");
    }

    #[test]
    fn stop_string_multibyte_and_empty_pieces() {
        let mut c = checker(&[], &["é!"], 100);
        assert_eq!(c.push(0, "caf"), StopStatus::Continue);
        assert_eq!(c.push(0, ""), StopStatus::Continue);
        assert_eq!(c.push(0, "é"), StopStatus::Continue);
        assert_eq!(c.stable_text(), "caf");
        assert_eq!(
            c.push(0, "!x"),
            StopStatus::Finished(FinishReason::Stop(StopKind::String(0)))
        );
        assert_eq!(c.text(), "caf");
    }

    #[test]
    fn max_tokens_and_precedence() {
        let mut c = checker(&[9], &["END"], 3);
        assert_eq!(c.push(1, "a"), StopStatus::Continue);
        assert_eq!(c.push(1, "b"), StopStatus::Continue);
        // Third token hits both a stop string and the limit: the stop string wins.
        assert_eq!(
            c.push(1, "END"),
            StopStatus::Finished(FinishReason::Stop(StopKind::String(0)))
        );
        let mut c = checker(&[9], &["END"], 2);
        assert_eq!(c.push(1, "a"), StopStatus::Continue);
        assert_eq!(c.push(1, "b"), StopStatus::Finished(FinishReason::Length));
        assert_eq!(c.finish_reason(), Some(&FinishReason::Length));
        assert_eq!(c.text(), "ab");
        let mut c = checker(&[], &[""], 0);
        assert_eq!(c.push(1, "a"), StopStatus::Finished(FinishReason::Length));
    }

    #[test]
    fn from_params() {
        let p = SamplingParams {
            stop_token_ids: vec![2],
            stop_strings: vec!["\n\n".into()],
            max_tokens: 4,
            ..SamplingParams::greedy()
        };
        let mut c = StopChecker::new(&p);
        assert_eq!(c.push(3, "x\n"), StopStatus::Continue);
        assert_eq!(
            c.push(3, "\ny"),
            StopStatus::Finished(FinishReason::Stop(StopKind::String(0)))
        );
        assert_eq!(c.text(), "x");
    }
}
