//! Long documents in bounded pieces, so that memory does not grow with a document's
//! length.
//!
//! The tokenizers crate keeps about 170 bytes per byte of text while it encodes (an
//! alignment per byte, the byte-level copy of the text, ...): one 50 MB line took
//! 8.5 GB in `prepare-data` and 4.2 GB in `train-tokenizer`. A document longer than
//! [`PIECE_BYTES`] is therefore encoded (or fed to the BPE trainer) piece by piece.
//!
//! Cuts fall between two words: before a space (or a newline) with a non-space
//! character on each side, in the second half of the piece. A tokenizer's pieces give
//! the ids of the whole text when the tokenizer encodes `"a b"` as `"a"` then `" b"`
//! ([`CutMode::KeepSpace`]: byte-level BPE, Metaspace pre-tokenizers) or as `"a"` then
//! `"b"` ([`CutMode::DropSpace`]: SentencePiece's `Prepend("▁")` normaliser puts the
//! space back). [`Pieces::probe`] tries both on a few word pairs and picks the one the
//! tokenizer obeys; a tokenizer that obeys neither encodes documents whole (bounded by
//! `--max-document-bytes`).
//!
//! A stretch of [`PIECE_BYTES`] / 2 bytes without such a cut (a long run of Chinese,
//! base64) is cut at a character boundary when the tokenizer decodes two pieces to the
//! text of the whole ("hard cuts", true of byte-level BPE): the ids then differ from
//! the whole encoding only around that cut, and still decode to the same text. Where
//! that does not hold the piece grows to the next word boundary.

use std::ops::Range;

use crate::error::Result;

/// Token ids and each token's byte range in the text.
pub type Encoded = (Vec<u32>, Vec<(usize, usize)>);

/// Longest piece encoded at once: 256 KiB of text, about 45 MB of tokenizer memory.
pub const PIECE_BYTES: usize = 256 << 10;

/// How a text may be cut between words without changing its ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutMode {
    /// `ids("a b") == ids("a") ++ ids(" b")`: the next piece starts with the space.
    KeepSpace,
    /// `ids("a b") == ids("a") ++ ids("b")`: the space between pieces is dropped.
    DropSpace,
}

/// Where a tokenizer's long texts are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pieces {
    /// `None`: never cut (the tokenizer obeys no mode).
    pub mode: Option<CutMode>,
    /// With [`CutMode::KeepSpace`], a newline between words may start a piece too.
    pub newline: bool,
    /// A stretch without word boundaries may be cut anywhere (see the module docs).
    pub hard: bool,
    /// Longest piece, in bytes.
    pub piece_bytes: usize,
}

/// Word pairs the probe joins with a space (or a newline) and encodes whole and apart.
const PROBES: &[(&str, &str)] = &[
    ("hello", "world"),
    ("The", "cat"),
    ("o", "cão"),
    ("ação,", "é"),
    ("1234", "5678"),
    ("end.", "Start"),
    ("(a)", "[b]"),
    ("don't", "stop"),
    ("x", "'s"),
    ("日本", "語"),
    ("😀", "ok"),
    ("a-b", "c_d"),
];

/// Stretches without spaces the probe cuts in two.
const HARD_PROBES: &[&str] = &[
    "helloworld",
    "日本語のテキスト",
    "aGVsbG8gd29ybGQ=",
    "1234567890",
    "ação😀ção",
];

impl Pieces {
    /// Cutting as a byte-level BPE without prefix space allows: at spaces, newlines
    /// and anywhere in long stretches (the tokenizer `train-tokenizer` builds).
    pub fn byte_level(piece_bytes: usize) -> Self {
        Pieces {
            mode: Some(CutMode::KeepSpace),
            newline: true,
            hard: true,
            piece_bytes,
        }
    }

    /// Never cut.
    pub fn whole() -> Self {
        Pieces {
            mode: None,
            newline: false,
            hard: false,
            piece_bytes: usize::MAX,
        }
    }

    /// How the tokenizer whose plain encoding is `encode` and decoding `decode` lets
    /// texts be cut, tried on word pairs (see the module docs).
    pub fn probe(
        piece_bytes: usize,
        encode: impl Fn(&str) -> Result<Vec<u32>>,
        decode: impl Fn(&[u32]) -> Result<String>,
    ) -> Result<Self> {
        let cat = |a: Vec<u32>, b: Vec<u32>| [a, b].concat();
        let obeys = |sep: &str, mode: CutMode| -> Result<bool> {
            for (a, b) in PROBES {
                let whole = encode(&format!("{a}{sep}{b}"))?;
                let apart = match mode {
                    CutMode::KeepSpace => cat(encode(a)?, encode(&format!("{sep}{b}"))?),
                    CutMode::DropSpace => cat(encode(a)?, encode(b)?),
                };
                if whole != apart {
                    return Ok(false);
                }
            }
            Ok(true)
        };
        let mode = if obeys(" ", CutMode::KeepSpace)? {
            Some(CutMode::KeepSpace)
        } else if obeys(" ", CutMode::DropSpace)? {
            Some(CutMode::DropSpace)
        } else {
            None
        };
        let newline = mode == Some(CutMode::KeepSpace) && obeys("\n", CutMode::KeepSpace)?;
        let mut hard = mode.is_some();
        for text in HARD_PROBES {
            if !hard {
                break;
            }
            let whole = decode(&encode(text)?)?;
            for (cut, _) in text.char_indices().skip(1) {
                let apart = cat(encode(&text[..cut])?, encode(&text[cut..])?);
                if decode(&apart)? != whole {
                    hard = false;
                    break;
                }
            }
        }
        Ok(Pieces {
            mode,
            newline,
            hard,
            piece_bytes: piece_bytes.max(8),
        })
    }

    /// Whether `text` is encoded in more than one piece.
    pub fn cuts(&self, text: &str) -> bool {
        self.mode.is_some() && text.len() > self.piece_bytes
    }

    /// The byte ranges of `text` to encode one after the other: consecutive, except
    /// that [`CutMode::DropSpace`] leaves out the space at each word cut.
    pub fn ranges(&self, text: &str) -> Vec<Range<usize>> {
        if !self.cuts(text) {
            return std::iter::once(0..text.len()).collect();
        }
        let mut out = Vec::new();
        let mut start = 0;
        while start < text.len() {
            let (end, next) = self.next_cut(text, start);
            out.push(start..end);
            start = next;
        }
        out
    }

    /// Whether a piece may end before byte `i` of `text`, which a separator starts.
    fn word_cut(&self, text: &str, i: usize) -> bool {
        let b = text.as_bytes();
        let sep_ok = b[i] == b' ' || (self.newline && b[i] == b'\n');
        sep_ok
            && i + 1 < b.len()
            && text[..i]
                .chars()
                .next_back()
                .is_some_and(|c| !c.is_whitespace())
            && text[i + 1..]
                .chars()
                .next()
                .is_some_and(|c| !c.is_whitespace())
    }

    /// From a piece starting at `start`: where it ends and where the next one starts.
    fn next_cut(&self, text: &str, start: usize) -> (usize, usize) {
        let len = text.len();
        if len - start <= self.piece_bytes {
            return (len, len);
        }
        let skip = |i: usize| match self.mode {
            Some(CutMode::DropSpace) => (i, i + 1),
            _ => (i, i),
        };
        let mut end = start + self.piece_bytes;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        // A word cut in the second half of the window.
        let lo = start + self.piece_bytes / 2;
        if let Some(i) = (lo.max(start + 1)..end)
            .rev()
            .find(|&i| self.word_cut(text, i))
        {
            return skip(i);
        }
        if self.hard && end > start {
            return (end, end);
        }
        // The next word cut after the window, however far.
        match (end..len).find(|&i| self.word_cut(text, i)) {
            Some(i) => skip(i),
            None => (len, len),
        }
    }

    /// Encode `text` piece by piece with `encode` (ids and, when wanted, byte
    /// offsets of each token in its piece): the ids of all pieces in order, with
    /// offsets moved to `text`. Whole when the text is short or cannot be cut. Pieces
    /// go one after the other: the tokenizer's memory is that of one piece.
    pub fn encode(&self, text: &str, encode: impl Fn(&str) -> Result<Encoded>) -> Result<Encoded> {
        let (mut ids, mut offsets) = (Vec::new(), Vec::new());
        self.encode_into(text, &mut ids, &mut offsets, encode)?;
        Ok((ids, offsets))
    }

    /// [`Pieces::encode`], appending to `ids` and `offsets`; room for all the ids is
    /// reserved once, from the first piece's tokens per byte.
    pub fn encode_into(
        &self,
        text: &str,
        ids: &mut Vec<u32>,
        offsets: &mut Vec<(usize, usize)>,
        encode: impl Fn(&str) -> Result<Encoded>,
    ) -> Result<()> {
        if !self.cuts(text) {
            let (i, o) = encode(text)?;
            ids.extend_from_slice(&i);
            if offsets.is_empty() {
                *offsets = o;
            } else {
                offsets.extend_from_slice(&o);
            }
            return Ok(());
        }
        let mut prev_end = 0;
        for (n, r) in self.ranges(text).into_iter().enumerate() {
            let (piece_ids, piece_offsets) = encode(&text[r.clone()])?;
            if n == 0 {
                let per_byte = piece_ids.len() as f64 / r.len().max(1) as f64;
                let estimate = (per_byte * text.len() as f64 * 1.05) as usize + 16;
                ids.reserve(estimate);
                if !piece_offsets.is_empty() {
                    offsets.reserve(estimate);
                }
            }
            ids.extend_from_slice(&piece_ids);
            // A dropped space belongs to the token the tokenizer put it back into: the
            // piece's first, which is that space alone when the next one starts at 0 too.
            let dropped = r.start > prev_end;
            for (k, &(s, e)) in piece_offsets.iter().enumerate() {
                let o = match (dropped && k == 0 && s == 0, piece_offsets.get(1)) {
                    (true, Some(&(0, _))) => (prev_end, r.start),
                    (true, _) => (prev_end, e + r.start),
                    (false, _) => (s + r.start, e + r.start),
                };
                offsets.push(o);
            }
            prev_end = r.end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(rel: &str) -> tokenizers::Tokenizer {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
        tokenizers::Tokenizer::from_file(p).unwrap()
    }

    fn probe(t: &tokenizers::Tokenizer, piece: usize) -> Pieces {
        Pieces::probe(
            piece,
            |s| Ok(t.encode(s, false)?.get_ids().to_vec()),
            |ids| Ok(t.decode(ids, false)?),
        )
        .unwrap()
    }

    fn both(t: &tokenizers::Tokenizer, s: &str) -> Result<Encoded> {
        let e = t.encode(s, false)?;
        Ok((e.get_ids().to_vec(), e.get_offsets().to_vec()))
    }

    fn fortunes() -> String {
        let p =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/fortunes-br.txt");
        std::fs::read_to_string(p).unwrap()
    }

    #[test]
    fn probes_pick_keep_space_for_byte_level_and_drop_space_for_sentencepiece() {
        let bl = probe(&load("tests/fixtures/reference/llama/tokenizer.json"), 64);
        assert_eq!(bl.mode, Some(CutMode::KeepSpace));
        assert!(bl.newline && bl.hard);
        let spm = probe(&load("tests/fixtures/spm_tokenizer/tokenizer.json"), 64);
        assert_eq!(spm.mode, Some(CutMode::DropSpace));
        assert!(!spm.newline);
    }

    #[test]
    fn pieces_give_the_ids_and_offsets_of_the_whole_text() {
        // Documents joined by spaces into one long line, and the corpus as it is
        // (newlines, `%` lines): cut every ~64 bytes.
        let text = fortunes();
        let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for rel in [
            "tests/fixtures/reference/llama/tokenizer.json",
            "tests/fixtures/spm_tokenizer/tokenizer.json",
        ] {
            let t = load(rel);
            let probed = probe(&t, 64);
            // Word cuts only: the very ids and offsets of the whole text.
            let pieces = Pieces {
                hard: false,
                ..probed
            };
            for text in [&line, &text] {
                let whole = both(&t, text).unwrap();
                assert!(pieces.ranges(text).len() > 100);
                let cut = pieces.encode(text, |s| both(&t, s)).unwrap();
                let first = |a: &[u32], b: &[u32]| a.iter().zip(b).position(|(x, y)| x != y);
                assert!(
                    cut.0 == whole.0,
                    "{rel}: ids differ from {:?} on ({} vs {})",
                    first(&cut.0, &whole.0),
                    cut.0.len(),
                    whole.0.len()
                );
                if let Some(k) = (0..cut.1.len()).find(|&k| cut.1[k] != whole.1[k]) {
                    panic!(
                        "{rel}: offsets differ at token {k}: {:?} vs {:?}",
                        &cut.1[k.saturating_sub(2)..k + 2],
                        &whole.1[k.saturating_sub(2)..k + 2]
                    );
                }
            }
            // Hard cuts too: the same text back.
            if probed.hard {
                let cut = probed.encode(&text, |s| both(&t, s)).unwrap();
                assert_eq!(t.decode(&cut.0, false).unwrap(), text, "{rel}");
            }
        }
    }

    #[test]
    fn ranges_cover_the_text_and_stay_bounded() {
        let p = Pieces::byte_level(16);
        let text = "aaaa bbbb cccc dddd eeee ffff gggg hhhh iiii jjjjjjjjjjjjjjjjjjjjjjjjjjjjjjjjjjjjjj kk";
        let r = p.ranges(text);
        assert_eq!(r.first().unwrap().start, 0);
        assert_eq!(r.last().unwrap().end, text.len());
        for w in r.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        assert!(r.iter().all(|r| r.len() <= 16), "{r:?}");
        // Without hard cuts a long word stays whole; multi-byte characters are never split.
        let soft = Pieces {
            hard: false,
            ..Pieces::byte_level(16)
        };
        let r = soft.ranges(text);
        assert!(
            r.iter()
                .any(|r| text[r.clone()].starts_with(" jjj") && r.len() > 16)
        );
        let cjk = "日本語".repeat(20);
        let r = p.ranges(&cjk);
        assert!(r.len() > 1 && r.iter().all(|r| cjk.is_char_boundary(r.start)));
        assert_eq!(r.iter().map(|r| &cjk[r.clone()]).collect::<String>(), cjk);
    }
}
