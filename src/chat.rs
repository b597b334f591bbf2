//! An interactive conversation with history, for dialogue models such as Claire.
//!
//! Each exchange appends `"{user_tag} {message}\n{bot_tag}"` to the transcript and
//! lets the model continue it until end-of-sequence or until it starts a new speaker
//! turn (a line beginning with `[`), as Claire's transcripts look like
//! `[Intervenant 1:] Bonjour ! [Intervenant 2:] ...`. When the transcript outgrows the
//! context, the oldest turns are dropped.

use crate::error::Result;
use crate::generate::{Sampling, TextStream, generate};
use crate::model::Gpt;
use crate::tokenizer::Tokenizer;

/// A conversation in progress.
pub struct ChatSession<'a> {
    pub model: &'a Gpt,
    pub tokenizer: &'a Tokenizer,
    pub user_tag: String,
    pub bot_tag: String,
    pub sampling: Sampling,
    pub max_new_tokens: usize,
    /// Completed turns, oldest first.
    turns: Vec<String>,
}

impl<'a> ChatSession<'a> {
    pub fn new(
        model: &'a Gpt,
        tokenizer: &'a Tokenizer,
        sampling: Sampling,
        max_new_tokens: usize,
    ) -> Self {
        ChatSession {
            model,
            tokenizer,
            user_tag: "[Intervenant 1:]".into(),
            bot_tag: "[Intervenant 2:]".into(),
            sampling,
            max_new_tokens,
            turns: Vec::new(),
        }
    }

    /// The prompt for `message` given the history, cut to fit the context.
    fn prompt(&mut self, message: &str) -> Result<Vec<u32>> {
        let budget = self
            .model
            .cfg
            .block_size
            .saturating_sub(self.max_new_tokens)
            .max(1);
        loop {
            let mut text = self.turns.join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(&format!(
                "{} {}\n{}",
                self.user_tag,
                message.trim(),
                self.bot_tag
            ));
            let ids = self.tokenizer.encode(&text)?;
            if ids.len() <= budget || self.turns.is_empty() {
                let skip = ids.len().saturating_sub(budget);
                return Ok(ids[skip..].to_vec());
            }
            self.turns.remove(0);
        }
    }

    /// Answer `message`, streaming text to `on_text`; returns the answer.
    pub fn respond(
        &mut self,
        message: &str,
        mut on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<String> {
        let ids = self.prompt(message)?;
        let mut stream = TextStream::after(self.tokenizer, &ids)?;
        let mut answer = String::new();
        let mut printed = 0;
        let stop = self.tokenizer.eos_ids.clone();
        generate(
            self.model,
            &ids,
            self.max_new_tokens,
            &self.sampling,
            &stop,
            |id| {
                if stop.contains(&id) {
                    return Ok(false);
                }
                answer.push_str(&stream.push(id)?);
                let (show, turn_ended) = to_show(&answer, printed);
                if !show.is_empty() {
                    on_text(&answer[show.clone()])?;
                    printed = show.end;
                }
                if turn_ended {
                    answer.truncate(show.end);
                    return Ok(false);
                }
                Ok(true)
            },
        )?;
        let answer = answer.trim().to_string();
        self.turns.push(format!(
            "{} {}\n{} {}",
            self.user_tag,
            message.trim(),
            self.bot_tag,
            answer
        ));
        Ok(answer)
    }
}

/// What of the answer so far to show, given that `printed` bytes were shown: from there
/// (past the space the model starts its turn with, after the tag) up to a new speaker
/// turn, which ends the answer (the bool).
fn to_show(answer: &str, printed: usize) -> (std::ops::Range<usize>, bool) {
    let cut = answer.find("\n[");
    let end = cut.unwrap_or(answer.len());
    let start = printed
        .max(answer.len() - answer.trim_start().len())
        .min(end);
    (start..end, cut.is_some())
}

#[cfg(test)]
mod tests {
    use super::to_show;

    #[test]
    fn shows_the_answer_without_its_leading_space_up_to_the_next_turn() {
        assert_eq!(to_show(" ", 0), (1..1, false));
        assert_eq!(to_show("  non", 0), (2..5, false));
        assert_eq!(to_show("  non merci", 5), (5..11, false));
        assert_eq!(to_show(" non\n[Intervenant 1:]", 0), (1..4, true));
        assert_eq!(to_show(" non\n[", 4), (4..4, true));
        assert_eq!(to_show("\n[Intervenant", 0), (0..0, true));
    }
}
