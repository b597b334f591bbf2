//! Dialogue augmentation, as Lit-Claire did it: extra copies of a training dialogue whose
//! speaker tags are rewritten, so the model does not tie what is said to one labelling
//! convention.
//!
//! Every match of the turn pattern is a speaker tag; speakers are told apart by the tag's
//! text and numbered 1, 2, ... in order of first appearance. A variant renders all tags
//! in one style:
//!
//! | style       | speaker 3          |
//! |-------------|--------------------|
//! | Intervenant | `[Intervenant 3:]` |
//! | speaker     | `[speaker003:]`    |
//! | Speaker     | `[Speaker 3:]`     |
//! | Locuteur    | `[Locuteur 3:]`    |
//! | anonymous   | `[-:]`             |
//!
//! The first five variants take the styles in an order drawn from the document's seed,
//! numbering speakers by appearance; later ones also permute the numbers. Variants equal
//! to the original or to an earlier variant are dropped, so a document yields at most
//! `n` variants. Everything depends only on the document's key, never on threads.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use regex::Regex;

/// How a variant labels speakers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpeakerStyle {
    Intervenant,
    SpeakerId,
    Speaker,
    Locuteur,
    Anonymous,
}

impl SpeakerStyle {
    /// Every style.
    pub const ALL: [SpeakerStyle; 5] = [
        SpeakerStyle::Intervenant,
        SpeakerStyle::SpeakerId,
        SpeakerStyle::Speaker,
        SpeakerStyle::Locuteur,
        SpeakerStyle::Anonymous,
    ];

    /// The tag of speaker `n` (1-based).
    pub fn tag(self, n: usize) -> String {
        match self {
            SpeakerStyle::Intervenant => format!("[Intervenant {n}:]"),
            SpeakerStyle::SpeakerId => format!("[speaker{n:03}:]"),
            SpeakerStyle::Speaker => format!("[Speaker {n}:]"),
            SpeakerStyle::Locuteur => format!("[Locuteur {n}:]"),
            SpeakerStyle::Anonymous => "[-:]".to_string(),
        }
    }
}

/// Rewrites speaker tags.
#[derive(Debug, Clone)]
pub struct Augmenter {
    pattern: Regex,
    variants: usize,
}

impl Augmenter {
    /// `variants` extra copies per dialogue, tags found by `pattern`.
    pub fn new(pattern: Regex, variants: usize) -> Self {
        Augmenter { pattern, variants }
    }

    /// Up to `n` distinct variants of `text`, none equal to it; none when `text` has no
    /// speaker tag. `key` seeds the choices.
    pub fn variants(&self, text: &str, key: u64) -> Vec<String> {
        if self.variants == 0 {
            return Vec::new();
        }
        // Spans of the tags and the speaker (0-based, by first appearance) of each.
        let mut names: Vec<&str> = Vec::new();
        let mut tags: Vec<(usize, usize, usize)> = Vec::new();
        for m in self.pattern.find_iter(text) {
            let name = m.as_str();
            let who = match names.iter().position(|n| *n == name) {
                Some(i) => i,
                None => {
                    names.push(name);
                    names.len() - 1
                }
            };
            tags.push((m.start(), m.end(), who));
        }
        if tags.is_empty() {
            return Vec::new();
        }

        let mut rng = ChaCha8Rng::seed_from_u64(key);
        let mut styles = SpeakerStyle::ALL;
        styles.shuffle(&mut rng);
        let mut out: Vec<String> = Vec::with_capacity(self.variants);
        let tries = self.variants * 3;
        for k in 0..tries {
            if out.len() == self.variants {
                break;
            }
            let style = styles[k % styles.len()];
            let mut number: Vec<usize> = (1..=names.len()).collect();
            if k >= styles.len() {
                number.shuffle(&mut rng);
            }
            let mut v = String::with_capacity(text.len() + 16 * tags.len());
            let mut at = 0;
            for &(start, end, who) in &tags {
                v.push_str(&text[at..start]);
                v.push_str(&style.tag(number[who]));
                at = end;
            }
            v.push_str(&text[at..]);
            if v != text && !out.contains(&v) {
                out.push(v);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::chunk::DEFAULT_TURN_PATTERN;

    #[test]
    fn rewrites_tags_consistently_and_deterministically() {
        let re = Regex::new(DEFAULT_TURN_PATTERN).unwrap();
        let aug = Augmenter::new(re.clone(), 3);
        let text = "[Intervenant 1:] Bom dia. [Intervenant 2:] Olá! [Intervenant 1:] Tudo bem?";
        let v = aug.variants(text, 7);
        assert_eq!(v, aug.variants(text, 7));
        assert_eq!(v.len(), 3);
        // Words are untouched; only tags change, speaker 1 keeps one tag.
        let plain = |t: &str| re.replace_all(t, "#").into_owned();
        for s in &v {
            assert_ne!(s, text);
            assert_eq!(plain(s), plain(text));
            let tags: Vec<&str> = re.find_iter(s).map(|m| m.as_str()).collect();
            assert_eq!(tags[0], tags[2]);
        }
        assert!(aug.variants("no tags here", 7).is_empty());
    }
}
