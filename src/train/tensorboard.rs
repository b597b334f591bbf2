//! TensorBoard event files in the run folder (`--logger csv,tensorboard`).
//!
//! A file `events.out.tfevents.<unix secs>.<hostname>` is a sequence of records:
//!
//! ```text
//! u64 length (LE) | u32 masked CRC-32C of the 8 length bytes | data | u32 masked CRC-32C of data
//! ```
//!
//! where `masked(c) = ((c >> 15) | (c << 17)) + 0xa282ead8` and each data is a protobuf
//! `Event`. The first event of a file only carries `file_version: "brain.Event:2"`; then
//! each row of `metrics.csv` gives two scalar events:
//!
//! - step = optimizer step: `train/loss`, `train/learning_rate`, `train/grad_norm`,
//!   `train/tokens_per_s`, and on evaluation rows `val/loss`, `val/bpb` (bits per
//!   byte), `val/loss/<dataset>`;
//! - step = training tokens seen: the same values tagged `train_by_tokens/…` and
//!   `val_by_tokens/…` (TensorBoard's x axis is always the step, so the token axis is a
//!   second set of tags).
//!
//! Values are `f32` (the format's `simple_value`); `metrics.csv` keeps full precision.
//!
//! **Resume.** When a run resumes at the checkpoint of step `S` (with `T` tokens), every
//! existing event file is first rewritten (temporary file + rename) without the events
//! past `S` (by-step tags) or past `T` (by-tokens tags), which a killed run wrote after its
//! last checkpoint and which the resumed run computes again. The resumed run then writes a
//! new file whose name sorts after the older ones, so TensorBoard reads one continuous
//! curve with one value per step and tag.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use super::metrics::MetricsRow;
use crate::error::{Error, IoContext, Result};

/// The prefix of every event file name.
pub const EVENT_FILE_PREFIX: &str = "events.out.tfevents.";

// The few fields of TensorBoard's `event.proto` and `summary.proto` this writer uses,
// with their field numbers there.

/// `tensorflow.Event`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// `oneof what`: the first event of a file.
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    /// `oneof what`: scalars.
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` holding a scalar.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    /// `oneof value`: a scalar.
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// CRC-32C as TFRecord stores it (masked, so that a CRC of data holding CRCs is not
/// degenerate).
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One record: length, its CRC, the data, its CRC.
pub fn encode_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// The events of the file at `path`, in order. A truncated last record (a run killed
/// while writing it) ends the file; a complete record whose CRC does not match is an
/// error.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).at(path)?;
    let mut events = Vec::new();
    let mut pos = 0usize;
    while pos + 12 <= bytes.len() {
        let len_bytes = &bytes[pos..pos + 8];
        let len_crc = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().expect("4 bytes"));
        if masked_crc32c(len_bytes) != len_crc {
            return Err(corrupt(path, pos));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let start = pos + 12;
        let Some(end) = start.checked_add(len).filter(|e| e + 4 <= bytes.len()) else {
            break; // truncated: the writer was killed mid-record
        };
        let data = &bytes[start..end];
        let crc = u32::from_le_bytes(bytes[end..end + 4].try_into().expect("4 bytes"));
        if masked_crc32c(data) != crc {
            return Err(corrupt(path, pos));
        }
        let event = Event::decode(data).map_err(|e| {
            Error::bad_file(
                path,
                format!("record at byte {pos} is no TensorBoard event ({e}); move the file away to resume"),
            )
        })?;
        events.push(event);
        pos = end + 4;
    }
    Ok(events)
}

fn corrupt(path: &Path, pos: usize) -> Error {
    Error::bad_file(
        path,
        format!("record at byte {pos} fails its CRC-32C check; move the file away to resume"),
    )
}

/// The event files of `run`, oldest first (the order TensorBoard reads them in).
pub fn event_files(run: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    if !run.is_dir() {
        return Ok(files);
    }
    for entry in std::fs::read_dir(run).at(run)? {
        let path = entry.at(run)?.path();
        let is_events = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(EVENT_FILE_PREFIX));
        if is_events && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Whether a tag's step is the token count (else the optimizer step).
fn by_tokens(tag: &str) -> bool {
    tag.starts_with("train_by_tokens/") || tag.starts_with("val_by_tokens/")
}

/// Whether `event` belongs to a run stopped at `step` after `tokens` tokens.
fn within(event: &Event, step: usize, tokens: u64) -> bool {
    let Some(summary) = &event.summary else {
        return true; // file_version and other bookkeeping
    };
    let limit = match summary.value.first() {
        Some(v) if by_tokens(&v.tag) => tokens as i64,
        _ => step as i64,
    };
    event.step <= limit
}

/// Appends the scalars of each metrics row to a new event file in the run folder.
pub struct TensorBoardWriter {
    path: PathBuf,
    file: File,
    /// `val/loss/<dataset>` suffixes, in the order of [`MetricsRow::val_per_dataset`].
    datasets: Vec<String>,
    /// `task/<task>/<metric>` suffixes, in the order of [`MetricsRow::tasks`].
    tasks: Vec<String>,
}

impl TensorBoardWriter {
    /// A new event file in `run`. When resuming at `resume = (step, tokens)`, the older
    /// event files are first cut back to that point (see the module doc).
    pub fn open(run: &Path, datasets: &[String], resume: Option<(usize, u64)>) -> Result<Self> {
        Self::cut_back(run, resume)?;
        let old = event_files(run)?;
        let now = unix_secs();
        // The new file must sort after the older ones (TensorBoard reads them in name
        // order), even when a run resumes within the second it stopped in.
        let newest = old.iter().filter_map(|p| file_secs(p)).max();
        let secs = match newest {
            Some(n) if n >= now => n + 1,
            _ => now,
        };
        let path = run.join(format!("{EVENT_FILE_PREFIX}{secs}.{}", hostname()));
        let first = encode_record(
            &Event {
                wall_time: wall_time(),
                step: 0,
                file_version: Some("brain.Event:2".into()),
                summary: None,
            }
            .encode_to_vec(),
        );
        let mut file = File::create(&path).at(&path)?;
        file.write_all(&first).at(&path)?;
        file.flush().at(&path)?;
        Ok(TensorBoardWriter {
            path,
            file,
            datasets: datasets.to_vec(),
            tasks: Vec::new(),
        })
    }

    /// Also write the downstream task metrics, tagged `task/<task>/<metric>`.
    pub fn with_tasks(mut self, tasks: &[String]) -> Self {
        self.tasks = tasks.to_vec();
        self
    }

    /// When resuming at `resume = (step, tokens)`: rewrite the event files of `run`
    /// without the events past that point.
    pub fn cut_back(run: &Path, resume: Option<(usize, u64)>) -> Result<()> {
        match resume {
            Some((step, tokens)) => truncate_events(&event_files(run)?, step, tokens),
            None => Ok(()),
        }
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The scalars of `row`, by step and by tokens.
    pub fn write(&mut self, row: &MetricsRow) -> Result<()> {
        // (group, name, value): tagged `group/name` by step, `group_by_tokens/name` by tokens.
        let mut scalars: Vec<(&str, String, f64)> = vec![
            ("train", "loss".into(), row.loss),
            ("train", "learning_rate".into(), row.learning_rate),
            ("train", "grad_norm".into(), row.grad_norm),
            ("train", "tokens_per_s".into(), row.tokens_per_s),
        ];
        if let Some(v) = row.val_loss {
            scalars.push(("val", "loss".into(), v));
        }
        if let Some(v) = row.val_bpb {
            scalars.push(("val", "bpb".into(), v));
        }
        for (name, v) in self.datasets.iter().zip(&row.val_per_dataset) {
            if let Some(v) = v {
                scalars.push(("val", format!("loss/{name}"), *v));
            }
        }
        for (name, v) in self.tasks.iter().zip(&row.tasks) {
            if let Some(v) = v {
                scalars.push(("task", name.clone(), *v));
            }
        }
        let wall_time = wall_time();
        let event = |step: u64, suffix: &str| Event {
            wall_time,
            step: step as i64,
            file_version: None,
            summary: Some(Summary {
                value: scalars
                    .iter()
                    .map(|(group, name, v)| SummaryValue {
                        tag: format!("{group}{suffix}/{name}"),
                        simple_value: Some(*v as f32),
                    })
                    .collect(),
            }),
        };
        let mut bytes = encode_record(&event(row.step as u64, "").encode_to_vec());
        bytes.extend(encode_record(
            &event(row.tokens, "_by_tokens").encode_to_vec(),
        ));
        self.file.write_all(&bytes).at(&self.path)?;
        self.file.flush().at(&self.path)
    }
}

/// Rewrite each of `files` (atomically) without the events past `step` / `tokens`.
fn truncate_events(files: &[PathBuf], step: usize, tokens: u64) -> Result<()> {
    for path in files {
        let events = read_events(path)?;
        let kept: Vec<&Event> = events.iter().filter(|e| within(e, step, tokens)).collect();
        if kept.len() == events.len() {
            continue; // nothing past the checkpoint
        }
        let bytes: Vec<u8> = kept
            .iter()
            .flat_map(|e| encode_record(&e.encode_to_vec()))
            .collect();
        crate::io::write_atomic(path, &bytes)?;
    }
    Ok(())
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The `<unix secs>` of an event file's name.
fn file_secs(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix(EVENT_FILE_PREFIX)?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// This machine's name, for the file name (as TensorFlow names event files); `localhost`
/// when unknown.
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.' || *c == '_')
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The masked CRC of TFRecord: the CRC-32C check value of "123456789" is
    /// 0xe3069283; rotated right by 15 bits plus 0xa282ead8 it is 0xc78ab0e5.
    #[test]
    fn masked_crc_of_the_check_string() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
    }

    #[test]
    fn a_truncated_tail_is_dropped_a_bad_crc_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = TensorBoardWriter::open(dir.path(), &[], None).unwrap();
        w.write(&MetricsRow {
            step: 1,
            tokens: 10,
            loss: 2.5,
            ..Default::default()
        })
        .unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let mut bytes = std::fs::read(&path).unwrap();
        assert_eq!(read_events(&path).unwrap().len(), 3);
        // Killed mid-record: the complete records remain.
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(read_events(&path).unwrap().len(), 2);
        // A flipped bit in the second record's data.
        let first = 16 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        bytes[first + 12] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = read_events(&path).unwrap_err().to_string();
        assert!(
            e.contains("CRC-32C") && e.contains("move the file away"),
            "{e}"
        );
    }
}
