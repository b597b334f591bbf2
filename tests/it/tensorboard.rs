//! `--logger csv,tensorboard`: the event files, read back record by record with a decoder
//! written here (length, both masked CRC-32Cs, the protobuf fields), hold one value per
//! step and tag, equal to `metrics.csv`, also when a run was killed and resumed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lit_claire::train::loggers::Logger;
use lit_claire::train::{Trainer, pretrain_with_data};

use crate::common::*;
use crate::trainer::{config, data};

/// An event as stored: wall time, step, file version, (tag, value) pairs.
#[derive(Debug, Default)]
struct Event {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    values: Vec<(String, f32)>,
}

/// TFRecord's masked CRC: ((c >> 15) | (c << 17)) + 0xa282ead8.
fn masked(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
        .rotate_right(15)
        .wrapping_add(0xa282_ead8)
}

fn varint(b: &[u8], pos: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = b[*pos];
        *pos += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte < 0x80 {
            break;
        }
    }
    v
}

/// The fields of a protobuf message: (field number, wire type, payload bytes or varint).
fn fields(b: &[u8]) -> Vec<(u64, u64, Vec<u8>, u64)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        let key = varint(b, &mut pos);
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = varint(b, &mut pos);
                out.push((field, wire, Vec::new(), v));
            }
            1 => {
                out.push((field, wire, b[pos..pos + 8].to_vec(), 0));
                pos += 8;
            }
            2 => {
                let n = varint(b, &mut pos) as usize;
                out.push((field, wire, b[pos..pos + n].to_vec(), 0));
                pos += n;
            }
            5 => {
                out.push((field, wire, b[pos..pos + 4].to_vec(), 0));
                pos += 4;
            }
            w => panic!("wire type {w}"),
        }
    }
    out
}

fn decode_event(b: &[u8]) -> Event {
    let mut e = Event::default();
    for (field, _, bytes, v) in fields(b) {
        match field {
            1 => e.wall_time = f64::from_le_bytes(bytes.try_into().unwrap()),
            2 => e.step = v as i64,
            3 => e.file_version = Some(String::from_utf8(bytes).unwrap()),
            5 => {
                for (f, _, value, _) in fields(&bytes) {
                    assert_eq!(f, 1, "Summary field");
                    let (mut tag, mut x) = (String::new(), None);
                    for (f, _, b, _) in fields(&value) {
                        match f {
                            1 => tag = String::from_utf8(b).unwrap(),
                            2 => x = Some(f32::from_le_bytes(b.try_into().unwrap())),
                            other => panic!("Value field {other}"),
                        }
                    }
                    e.values.push((tag, x.expect("simple_value")));
                }
            }
            other => panic!("Event field {other}"),
        }
    }
    e
}

/// Every record of an event file, checking both CRCs of each.
fn read_records(path: &Path) -> Vec<Event> {
    let b = std::fs::read(path).unwrap();
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < b.len() {
        let len = &b[pos..pos + 8];
        assert_eq!(
            masked(len),
            u32::from_le_bytes(b[pos + 8..pos + 12].try_into().unwrap()),
            "length CRC at {pos}"
        );
        let n = u64::from_le_bytes(len.try_into().unwrap()) as usize;
        let data = &b[pos + 12..pos + 12 + n];
        let crc = u32::from_le_bytes(b[pos + 12 + n..pos + 16 + n].try_into().unwrap());
        assert_eq!(masked(data), crc, "data CRC at {pos}");
        out.push(decode_event(data));
        pos += 16 + n;
    }
    out
}

fn event_files(run: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .collect();
    files.sort();
    files
}

/// tag → step → values, over the run's files in name order (TensorBoard's order).
fn scalars(run: &Path) -> BTreeMap<String, Vec<(i64, f32)>> {
    let mut out: BTreeMap<String, Vec<(i64, f32)>> = BTreeMap::new();
    for f in event_files(run) {
        let events = read_records(&f);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        assert!(events[0].wall_time > 1.6e9);
        for e in &events[1..] {
            for (tag, v) in &e.values {
                out.entry(tag.clone()).or_default().push((e.step, *v));
            }
        }
    }
    out
}

/// `metrics.csv` as column name → (step, tokens, value) for the non-empty cells.
fn csv_columns(run: &Path) -> BTreeMap<String, Vec<(i64, i64, f64)>> {
    let text = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    let mut out: BTreeMap<String, Vec<(i64, i64, f64)>> = BTreeMap::new();
    for l in lines {
        let c: Vec<&str> = l.split(',').collect();
        let (step, tokens) = (c[0].parse().unwrap(), c[2].parse().unwrap());
        for (name, cell) in head.iter().zip(&c) {
            if !cell.is_empty() {
                out.entry(name.to_string()).or_default().push((
                    step,
                    tokens,
                    cell.parse().unwrap(),
                ));
            }
        }
    }
    out
}

/// Each tag of the event files holds what its `metrics.csv` column holds, one value
/// per step (by step) and per token count (by tokens).
fn check_against_csv(run: &Path) {
    let tb = scalars(run);
    let csv = csv_columns(run);
    let mut pairs = vec![
        ("loss", "train/loss"),
        ("learning_rate", "train/learning_rate"),
        ("grad_norm", "train/grad_norm"),
        ("tokens_per_s", "train/tokens_per_s"),
        ("val_loss", "val/loss"),
    ];
    let per_dataset =
        ["fortunes", "short"].map(|d| (format!("val_loss/{d}"), format!("val/loss/{d}")));
    pairs.extend(per_dataset.iter().map(|(a, b)| (a.as_str(), b.as_str())));
    for (column, tag) in pairs {
        let want = &csv[column];
        let by_tokens =
            tag.replacen("train/", "train_by_tokens/", 1)
                .replacen("val/", "val_by_tokens/", 1);
        for (tag, x) in [(tag.to_string(), 0), (by_tokens, 1)] {
            let got = &tb[&tag];
            assert_eq!(got.len(), want.len(), "{tag}: {got:?} vs {want:?}");
            for ((s, v), w) in got.iter().zip(want) {
                let w_step = if x == 0 { w.0 } else { w.1 };
                assert_eq!(*s, w_step, "{tag}");
                // tokens_per_s is rounded to 0.1 in the CSV.
                let tol = if column == "tokens_per_s" { 0.051 } else { 0.0 };
                assert!(
                    (*v as f64 - (w.2 as f32) as f64).abs() <= tol + 1e-6 * w.2.abs(),
                    "{tag} at {s}: {v} vs {}",
                    w.2
                );
            }
        }
    }
    // By step: every step once, in order; by tokens: strictly increasing.
    for (tag, values) in &tb {
        let steps: Vec<i64> = values.iter().map(|(s, _)| *s).collect();
        assert!(steps.windows(2).all(|w| w[0] < w[1]), "{tag}: {steps:?}");
    }
    let steps: Vec<i64> = tb["train/loss"].iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
}

#[test]
fn tensorboard_events_of_a_resumed_run_read_as_one_run() {
    let straight = temp_dir();
    let broken = temp_dir();
    let mut cfg = config(straight.path());
    cfg.logger = vec![Logger::Csv, Logger::Tensorboard];
    pretrain_with_data(&cfg, data(33)).unwrap();
    check_against_csv(straight.path());
    assert_eq!(event_files(straight.path()).len(), 1);

    // Killed after step 7; the newest checkpoint is step 6.
    let mut cfg2 = cfg.clone();
    cfg2.out_dir = broken.path().to_path_buf();
    Trainer::new(&cfg2, data(33)).unwrap().run(Some(7)).unwrap();
    let first = event_files(broken.path());
    assert_eq!(first.len(), 1);
    let had: Vec<i64> = read_records(&first[0]).iter().map(|e| e.step).collect();
    assert!(had.contains(&7), "{had:?}");
    // A kill in the middle of a record leaves a truncated tail.
    let mut bytes = std::fs::read(&first[0]).unwrap();
    bytes.extend_from_slice(&[7, 0, 0]);
    std::fs::write(&first[0], &bytes).unwrap();

    cfg2.resume = Some("auto".into());
    pretrain_with_data(&cfg2, data(33)).unwrap();
    let files = event_files(broken.path());
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(files[0], first[0]);
    // The first segment was cut back to the checkpoint (step 6 and its tokens).
    let tokens_at_6 = csv_columns(broken.path())["loss"][5].1;
    for e in &read_records(&files[0])[1..] {
        let by_tokens = e.values[0].0.contains("_by_tokens/");
        let limit = if by_tokens { tokens_at_6 } else { 6 };
        assert!(e.step <= limit, "{e:?}");
    }
    check_against_csv(broken.path());
    // Training values of the resumed run are those of the uninterrupted one.
    let (a, b) = (scalars(straight.path()), scalars(broken.path()));
    for tag in ["train/loss", "val/loss", "train_by_tokens/loss"] {
        assert_eq!(a[tag], b[tag], "{tag}");
    }
}

#[test]
fn logger_flag_needs_csv_and_defaults_to_it() {
    let dir = temp_dir();
    let mut cfg = config(dir.path());
    assert_eq!(cfg.logger, vec![Logger::Csv]);
    cfg.logger = vec![Logger::Tensorboard];
    let e = Trainer::new(&cfg, data(33)).err().unwrap().to_string();
    assert!(
        e.contains("--logger") && e.contains("csv,tensorboard"),
        "{e}"
    );
    // csv only: no event files.
    cfg.logger = vec![Logger::Csv];
    cfg.max_steps = Some(2);
    pretrain_with_data(&cfg, data(33)).unwrap();
    assert!(event_files(dir.path()).is_empty());
}
