//! Reading raw documents: `.txt` and `.jsonl` files, each optionally gzip-compressed.
//!
//! - `.txt`: one document per line, or documents separated by lines equal to a
//!   separator (`%` for fortune files, the empty string for blank lines).
//! - `.jsonl`: one JSON object per line, the text under a key (`text` by default);
//!   other fields are kept in the record's raw line.
//!
//! Records stream: a file larger than memory is read line by line, and no line or
//! document may exceed [`ReadOptions::max_document_bytes`] (a file without newlines
//! would otherwise be read whole into memory). Files must be UTF-8 (a UTF-8 byte-order
//! mark at the start is dropped); they are found and opened by [`super::files`], which
//! refuses FIFOs, devices and sockets.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use super::files::is_document_file;
use super::files::{bytes_text, open_regular};
use crate::error::{Error, Result};

/// Default of [`ReadOptions::max_document_bytes`]: 64 MiB.
pub const DEFAULT_MAX_DOCUMENT_BYTES: usize = 64 << 20;

/// How documents are laid out in a text file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextLayout {
    /// Every non-empty line is a document.
    LinePerDocument,
    /// Documents are separated by lines equal to this string (`""`: a blank line).
    Separator(String),
}

impl TextLayout {
    /// `--doc-separator`: `None` is one document per line.
    pub fn from_separator(separator: Option<String>) -> Self {
        separator.map_or(TextLayout::LinePerDocument, TextLayout::Separator)
    }

    /// The separator line, `None` for one document per line.
    pub fn separator(&self) -> Option<&str> {
        match self {
            TextLayout::LinePerDocument => None,
            TextLayout::Separator(s) => Some(s),
        }
    }
}

/// How raw files are read into documents; prepare-data, dedup and train-tokenizer share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOptions {
    /// Layout of `.txt` files.
    pub layout: TextLayout,
    /// Field of `.jsonl` records holding the text.
    pub json_key: String,
    /// Count and skip `.jsonl` lines that are not JSON (or not UTF-8) or lack the key,
    /// instead of failing.
    pub skip_bad_lines: bool,
    /// Longest line, and longest document, read (in bytes of text): a longer one is an
    /// error naming its file and line (`--max-document-bytes`).
    pub max_document_bytes: usize,
}

impl Default for ReadOptions {
    /// One document per line, `text` in jsonl, bad lines are errors.
    fn default() -> Self {
        ReadOptions {
            layout: TextLayout::LinePerDocument,
            json_key: "text".into(),
            skip_bad_lines: false,
            max_document_bytes: DEFAULT_MAX_DOCUMENT_BYTES,
        }
    }
}

impl ReadOptions {
    /// What is wrong with these options, for a usage error.
    pub fn problem(&self) -> Option<&'static str> {
        if self.json_key.is_empty() {
            return Some("--json-key must not be empty");
        }
        (self.max_document_bytes == 0).then_some("--max-document-bytes must be at least 1")
    }

    /// The records of `path`, in the format its extension says.
    pub fn records(&self, path: &Path) -> Result<Records> {
        let mut r = records(path, self.format_of(path), self.skip_bad_lines)?;
        r.max_bytes = self.max_document_bytes;
        Ok(r)
    }

    /// Like [`ReadOptions::records`], counting bytes read into `counter`.
    pub fn records_counted(&self, path: &Path, counter: Arc<AtomicU64>) -> Result<Records> {
        let mut r = records_counted(path, self.format_of(path), self.skip_bad_lines, counter)?;
        r.max_bytes = self.max_document_bytes;
        Ok(r)
    }

    /// The format of `path` from its extension.
    pub fn format_of(&self, path: &Path) -> DocFormat {
        format_of(path, &self.layout, &self.json_key)
    }
}

/// Format of a raw file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocFormat {
    Text(TextLayout),
    Jsonl { key: String },
}

/// One document as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The document's text.
    pub text: String,
    /// The record exactly as stored, when it differs from `text`: the JSON line
    /// (without its newline) for jsonl; `None` for text, whose lines are `text`.
    pub raw: Option<String>,
    /// 1-based line where the record starts.
    pub line: usize,
}

impl Record {
    /// The record exactly as stored (see [`Record::raw`]).
    pub fn raw(&self) -> &str {
        self.raw.as_deref().unwrap_or(&self.text)
    }
}

/// The format of `path` from its extension: jsonl files use `json_key`, text files `layout`.
pub fn format_of(path: &Path, layout: &TextLayout, json_key: &str) -> DocFormat {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let name = name.strip_suffix(".gz").unwrap_or(name);
    if name.ends_with(".jsonl") {
        DocFormat::Jsonl {
            key: json_key.to_string(),
        }
    } else {
        DocFormat::Text(layout.clone())
    }
}

/// A buffered reader of `path`, decompressing `.gz` files.
pub fn open_maybe_gz(path: &Path) -> Result<Box<dyn BufRead + Send>> {
    open_counted(path, None)
}

/// Counts the bytes read from a file (compressed bytes for `.gz`), for progress bars.
struct Counting<R> {
    inner: R,
    counter: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn open_counted(path: &Path, counter: Option<Arc<AtomicU64>>) -> Result<Box<dyn BufRead + Send>> {
    let file: File = open_regular(path)?;
    let file: Box<dyn Read + Send> = match counter {
        Some(counter) => Box::new(Counting {
            inner: file,
            counter,
        }),
        None => Box::new(file),
    };
    let inner: Box<dyn Read + Send> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        file
    };
    Ok(Box::new(BufReader::with_capacity(1 << 20, inner)))
}

/// Streams the records of one file.
pub struct Records {
    path: PathBuf,
    reader: Box<dyn BufRead + Send>,
    format: DocFormat,
    line_no: usize,
    skip_bad_lines: bool,
    /// Lines skipped because they were not JSON or lacked the key.
    pub skipped: usize,
    done: bool,
    /// Longest line or document, in bytes.
    max_bytes: usize,
    /// Whether the file is gzip-compressed (for messages).
    gz: bool,
}

/// Open `path` for reading records. With `skip_bad_lines`, jsonl lines that are not
/// JSON objects holding a string under the key are counted in [`Records::skipped`]
/// instead of failing.
pub fn records(path: &Path, format: DocFormat, skip_bad_lines: bool) -> Result<Records> {
    records_from(path, format, skip_bad_lines, open_maybe_gz(path)?)
}

/// Like [`records`], adding every byte read from the file (compressed bytes for `.gz`)
/// to `counter`.
pub fn records_counted(
    path: &Path,
    format: DocFormat,
    skip_bad_lines: bool,
    counter: Arc<AtomicU64>,
) -> Result<Records> {
    records_from(
        path,
        format,
        skip_bad_lines,
        open_counted(path, Some(counter))?,
    )
}

fn records_from(
    path: &Path,
    format: DocFormat,
    skip_bad_lines: bool,
    reader: Box<dyn BufRead + Send>,
) -> Result<Records> {
    Ok(Records {
        path: path.to_path_buf(),
        reader,
        format,
        line_no: 0,
        skip_bad_lines,
        skipped: 0,
        done: false,
        max_bytes: DEFAULT_MAX_DOCUMENT_BYTES,
        gz: path.extension().is_some_and(|e| e == "gz"),
    })
}

/// Why a line could not be read.
enum LineError {
    /// Not UTF-8: the byte offset in the line of the first bad byte, and whether the
    /// line starts like UTF-16.
    NotUtf8 {
        at: usize,
        utf16: bool,
    },
    Other(Error),
}

impl Records {
    /// The next line, without its line ending, in `buf`; false at the end of the file.
    /// A line longer than the limit is an error (nothing past the limit is read).
    fn read_line(&mut self, buf: &mut String) -> Result<bool> {
        match self.read_line_checked(buf) {
            Ok(more) => Ok(more),
            Err(LineError::Other(e)) => Err(e),
            Err(LineError::NotUtf8 { at, utf16 }) => Err(self.not_utf8(at, utf16)),
        }
    }

    fn not_utf8(&self, at: usize, utf16: bool) -> Error {
        let hint = if utf16 {
            "it looks like UTF-16: convert it with iconv -f UTF-16 -t UTF-8"
        } else {
            "convert the file to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)"
        };
        Error::Data(format!(
            "{}:{}: not UTF-8 (bad byte at column {}); {hint}",
            self.path.display(),
            self.line_no,
            at + 1
        ))
    }

    fn read_line_checked(&mut self, buf: &mut String) -> std::result::Result<bool, LineError> {
        use std::io::Read;
        let mut bytes = std::mem::take(buf).into_bytes();
        bytes.clear();
        // Room for the longest line allowed and its "\r\n".
        let limit = self.max_bytes as u64 + 2;
        let n = (&mut self.reader)
            .take(limit)
            .read_until(b'\n', &mut bytes)
            .map_err(|e| LineError::Other(self.io_error(e)))?;
        if n == 0 {
            return Ok(false);
        }
        self.line_no += 1;
        let complete = bytes.ends_with(b"\n");
        if complete {
            bytes.pop();
            if bytes.ends_with(b"\r") {
                bytes.pop();
            }
        }
        if bytes.len() > self.max_bytes || (!complete && n as u64 == limit) {
            return Err(LineError::Other(self.too_long("a line", self.line_no)));
        }
        if self.line_no == 1 && bytes.starts_with(b"\xef\xbb\xbf") {
            bytes.drain(..3);
        }
        match String::from_utf8(bytes) {
            Ok(s) => {
                *buf = s;
                Ok(true)
            }
            Err(e) => {
                let b = e.as_bytes();
                let utf16 = b.starts_with(b"\xff\xfe") || b.starts_with(b"\xfe\xff");
                Err(LineError::NotUtf8 {
                    at: e.utf8_error().valid_up_to(),
                    utf16: utf16 || (b.len() > 1 && b.iter().skip(1).step_by(2).all(|&x| x == 0)),
                })
            }
        }
    }

    fn too_long(&self, what: &str, line: usize) -> Error {
        Error::Data(format!(
            "{}:{line}: {what} longer than {} (--max-document-bytes); split it into smaller documents or raise --max-document-bytes",
            self.path.display(),
            bytes_text(self.max_bytes as u64)
        ))
    }

    fn io_error(&self, e: std::io::Error) -> Error {
        if self.gz
            && matches!(
                e.kind(),
                std::io::ErrorKind::InvalidData
                    | std::io::ErrorKind::InvalidInput
                    | std::io::ErrorKind::UnexpectedEof
            )
        {
            return Error::Data(format!(
                "{}: cannot decompress ({e}); the .gz file is damaged, cut off or not gzip: recompress it or drop the .gz extension",
                self.path.display()
            ));
        }
        Error::io(&self.path, e)
    }

    fn next_record(&mut self) -> Result<Option<Record>> {
        let mut line = String::new();
        match self.format.clone() {
            DocFormat::Jsonl { key } => loop {
                match self.read_line_checked(&mut line) {
                    Ok(true) => {}
                    Ok(false) => return Ok(None),
                    Err(LineError::NotUtf8 { .. }) if self.skip_bad_lines => {
                        self.skipped += 1;
                        continue;
                    }
                    Err(LineError::NotUtf8 { at, utf16 }) => {
                        return Err(self.not_utf8(at, utf16));
                    }
                    Err(LineError::Other(e)) => return Err(e),
                }
                if line.trim().is_empty() {
                    continue;
                }
                let text = match serde_json::from_str::<serde_json::Value>(&line) {
                    Ok(serde_json::Value::Object(mut o)) => match o.remove(&key) {
                        Some(serde_json::Value::String(t)) => Ok(t),
                        _ => Err(format!("no string field \"{key}\"")),
                    },
                    Ok(_) => Err(format!("no string field \"{key}\"")),
                    Err(e) => Err(format!("not JSON ({e})")),
                };
                match text {
                    Ok(text) => {
                        return Ok(Some(Record {
                            text,
                            raw: Some(line),
                            line: self.line_no,
                        }));
                    }
                    Err(_) if self.skip_bad_lines => self.skipped += 1,
                    Err(why) => {
                        return Err(Error::Data(format!(
                            "{}:{}: {why}; fix the line, pick the field with --json-key, or pass --skip-bad-lines",
                            self.path.display(),
                            self.line_no
                        )));
                    }
                }
            },
            DocFormat::Text(TextLayout::LinePerDocument) => loop {
                if !self.read_line(&mut line)? {
                    return Ok(None);
                }
                if !line.trim().is_empty() {
                    return Ok(Some(Record {
                        text: std::mem::take(&mut line),
                        raw: None,
                        line: self.line_no,
                    }));
                }
            },
            DocFormat::Text(TextLayout::Separator(sep)) => {
                let mut doc: Vec<String> = Vec::new();
                let mut start = 0;
                // Bytes of the document so far, its newlines included.
                let mut size = 0usize;
                loop {
                    let more = self.read_line(&mut line)?;
                    let at_sep =
                        more && (line == sep || (sep.is_empty() && line.trim().is_empty()));
                    if !more || at_sep {
                        let text = doc.join("\n");
                        if !text.trim().is_empty() {
                            return Ok(Some(Record {
                                raw: None,
                                text,
                                line: start,
                            }));
                        }
                        if !more {
                            return Ok(None);
                        }
                        doc.clear();
                        size = 0;
                        continue;
                    }
                    if doc.is_empty() {
                        start = self.line_no;
                    }
                    size += line.len() + !doc.is_empty() as usize;
                    if size > self.max_bytes {
                        return Err(self.too_long("a document", start));
                    }
                    doc.push(line.clone());
                }
            }
        }
    }
}

impl Iterator for Records {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_record() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        if name.ends_with(".gz") {
            let f = File::create(&p).unwrap();
            let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            gz.write_all(text.as_bytes()).unwrap();
            gz.finish().unwrap();
        } else {
            std::fs::write(&p, text).unwrap();
        }
        p
    }

    fn texts(path: &Path, format: DocFormat) -> Vec<String> {
        records(path, format, false)
            .unwrap()
            .map(|r| r.unwrap().text)
            .collect()
    }

    #[test]
    fn separator_layout_reads_fortunes() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "f.txt", "one\ntwo\n%\nthree\n%\n");
        let got = texts(&p, DocFormat::Text(TextLayout::Separator("%".into())));
        assert_eq!(got, vec!["one\ntwo", "three"]);
    }

    #[test]
    fn blank_line_separator_and_gzip() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "f.txt.gz", "a\nb\n\n\nc\n");
        let got = texts(&p, DocFormat::Text(TextLayout::Separator(String::new())));
        assert_eq!(got, vec!["a\nb", "c"]);
    }

    #[test]
    fn jsonl_keeps_raw_line_and_names_bad_line() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "f.jsonl",
            "{\"text\": \"hi\", \"id\": 3}\n{\"oops\": 1}\n",
        );
        let fmt = DocFormat::Jsonl { key: "text".into() };
        let mut r = records(&p, fmt.clone(), false).unwrap();
        let first = r.next().unwrap().unwrap();
        assert_eq!(first.text, "hi");
        assert_eq!(first.raw(), "{\"text\": \"hi\", \"id\": 3}");
        let err = r.next().unwrap().unwrap_err().to_string();
        assert!(
            err.contains("f.jsonl:2") && err.contains("--skip-bad-lines"),
            "{err}"
        );
        let mut r = records(&p, fmt, true).unwrap();
        assert_eq!(r.by_ref().count(), 1);
        assert_eq!(r.skipped, 1);
    }
}
