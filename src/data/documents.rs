//! Reading raw documents: `.txt` and `.jsonl` files, each optionally gzip-compressed.
//!
//! - `.txt`: one document per line, or documents separated by lines equal to a
//!   separator (`%` for fortune files, the empty string for blank lines).
//! - `.jsonl`: one JSON object per line, the text under a key (`text` by default);
//!   other fields are kept in the record's raw line.
//!
//! Records stream: a file larger than memory is read line by line.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, IoContext, Result};

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
    /// Count and skip `.jsonl` lines that are not JSON or lack the key, instead of failing.
    pub skip_bad_lines: bool,
}

impl Default for ReadOptions {
    /// One document per line, `text` in jsonl, bad lines are errors.
    fn default() -> Self {
        ReadOptions {
            layout: TextLayout::LinePerDocument,
            json_key: "text".into(),
            skip_bad_lines: false,
        }
    }
}

impl ReadOptions {
    /// What is wrong with these options, for a usage error.
    pub fn problem(&self) -> Option<&'static str> {
        self.json_key
            .is_empty()
            .then_some("--json-key must not be empty")
    }

    /// The records of `path`, in the format its extension says.
    pub fn records(&self, path: &Path) -> Result<Records> {
        records(path, self.format_of(path), self.skip_bad_lines)
    }

    /// Like [`ReadOptions::records`], counting bytes read into `counter`.
    pub fn records_counted(&self, path: &Path, counter: Arc<AtomicU64>) -> Result<Records> {
        records_counted(path, self.format_of(path), self.skip_bad_lines, counter)
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
    /// The record exactly as stored: the JSON line (without its newline) for jsonl,
    /// the document's lines for text.
    pub raw: String,
    /// 1-based line where the record starts.
    pub line: usize,
}

/// Whether a path names a file we read (`.txt`, `.jsonl`, `.json` lines, and `.gz` of them).
pub fn is_document_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let name = name.strip_suffix(".gz").unwrap_or(name);
    name.ends_with(".txt") || name.ends_with(".jsonl")
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
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::missing(path, "no such input file"),
        _ => Error::io(path, e),
    })?;
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
    })
}

impl Records {
    fn read_line(&mut self, buf: &mut String) -> Result<bool> {
        buf.clear();
        let n = self.reader.read_line(buf).at(&self.path)?;
        if n == 0 {
            return Ok(false);
        }
        self.line_no += 1;
        if buf.ends_with('\n') {
            buf.pop();
            if buf.ends_with('\r') {
                buf.pop();
            }
        }
        Ok(true)
    }

    fn next_record(&mut self) -> Result<Option<Record>> {
        let mut line = String::new();
        match self.format.clone() {
            DocFormat::Jsonl { key } => loop {
                if !self.read_line(&mut line)? {
                    return Ok(None);
                }
                if line.trim().is_empty() {
                    continue;
                }
                let parsed: std::result::Result<serde_json::Value, _> = serde_json::from_str(&line);
                let text = match &parsed {
                    Ok(v) => v.get(&key).and_then(|t| t.as_str()).map(String::from),
                    Err(_) => None,
                };
                match text {
                    Some(text) => {
                        return Ok(Some(Record {
                            text,
                            raw: line,
                            line: self.line_no,
                        }));
                    }
                    None if self.skip_bad_lines => self.skipped += 1,
                    None => {
                        let why = match parsed {
                            Err(e) => format!("not JSON ({e})"),
                            Ok(_) => format!("no string field \"{key}\""),
                        };
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
                        text: line.clone(),
                        raw: line,
                        line: self.line_no,
                    }));
                }
            },
            DocFormat::Text(TextLayout::Separator(sep)) => {
                let mut doc: Vec<String> = Vec::new();
                let mut start = 0;
                loop {
                    let more = self.read_line(&mut line)?;
                    let at_sep =
                        more && (line == sep || (sep.is_empty() && line.trim().is_empty()));
                    if !more || at_sep {
                        let text = doc.join("\n");
                        if !text.trim().is_empty() {
                            return Ok(Some(Record {
                                raw: text.clone(),
                                text,
                                line: start,
                            }));
                        }
                        if !more {
                            return Ok(None);
                        }
                        doc.clear();
                        continue;
                    }
                    if doc.is_empty() {
                        start = self.line_no;
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
        assert_eq!(first.raw, "{\"text\": \"hi\", \"id\": 3}");
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
