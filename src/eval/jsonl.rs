//! Our plain task format: JSON Lines, one request per line, each naming its task.
//!
//! ```text
//! {"task": "pt_cloze", "type": "multiple_choice", "context": "O gato subiu no", "choices": [" telhado", " mar"], "gold": 0}
//! {"task": "pt_next", "type": "loglikelihood", "context": "Bom", "continuation": " dia"}
//! {"task": "pt_text", "type": "loglikelihood_rolling", "text": "Quem canta seus males espanta."}
//! {"task": "pt_qa", "type": "generate_until", "context": "2 + 2 =", "target": " 4", "until": ["\n"], "max_gen_toks": 8}
//! ```
//!
//! - `type` is the harness's `output_type`; every line of a task has the same.
//! - Choices and continuations are scored exactly as written after the context (no
//!   delimiter is added: put the space in the choice); `acc_norm` divides by a choice's
//!   length in characters. `gold` is an index or a list of indices (any is right).
//! - `target` of a generation is a string or a list of strings (any is right);
//!   `until` defaults to `["\n\n"]` and `max_gen_toks` to 256, as in the harness.
//! - A file may hold several tasks; blank lines are skipped. Documents are numbered
//!   per task in file order (`doc_id`).

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::task::{Doc, Kind, Request, Task, at_line, check_name};
use crate::error::{IoContext, Result};

/// The harness's default number of generated tokens.
pub const MAX_GEN_TOKS: usize = 256;

/// Whether the first non-blank line of `text` looks like our format (an object with
/// `task` and `type`).
pub fn looks_like(text: &str) -> bool {
    text.lines()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .is_some_and(|v| v.get("task").is_some() && v.get("type").is_some())
}

/// Read the tasks of one JSONL file. `fingerprint` identifies the file's content.
pub fn read(path: &Path, fingerprint: &str) -> Result<Vec<Task>> {
    let text = std::fs::read_to_string(path).at(path)?;
    let mut tasks: Vec<Task> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let err = |msg: String| at_line(path, n, msg);
        let v: Value = serde_json::from_str(line).map_err(|e| {
            err(format!(
                "not JSON ({e}); a task file of lit-claire has one JSON object per line"
            ))
        })?;
        let name = v.get("task").and_then(Value::as_str).ok_or_else(|| {
            err("no \"task\" (string): every line names its task, and has a \"type\"".into())
        })?;
        check_name(name, path, n)?;
        let ty = v.get("type").and_then(Value::as_str).unwrap_or("");
        let kind = Kind::parse(ty).ok_or_else(|| {
            err(format!(
                "\"type\" {ty:?} is not multiple_choice, loglikelihood, loglikelihood_rolling or generate_until"
            ))
        })?;
        let t = match index.get(name) {
            Some(&t) => t,
            None => {
                index.insert(name.to_string(), tasks.len());
                tasks.push(Task {
                    name: name.to_string(),
                    kind,
                    metrics: kind.default_metrics(),
                    docs: Vec::new(),
                    file: path.to_path_buf(),
                    fingerprint: fingerprint.to_string(),
                });
                tasks.len() - 1
            }
        };
        let task = &mut tasks[t];
        if task.kind != kind {
            return Err(err(format!(
                "task {name} is {} on its first line but {} here",
                task.kind.name(),
                kind.name()
            )));
        }
        let request = request(&v, kind).map_err(err)?;
        task.docs.push(Doc {
            id: task.docs.len(),
            file: path.to_path_buf(),
            line: n,
            request,
        });
    }
    if tasks.is_empty() {
        return Err(at_line(path, 1, "no request in this task file"));
    }
    Ok(tasks)
}

fn string(v: &Value, key: &str) -> std::result::Result<String, String> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("\"{key}\" must be a string")),
        None => Err(format!("no \"{key}\" (string)")),
    }
}

fn strings(v: &Value, key: &str) -> std::result::Result<Vec<String>, String> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("\"{key}\" must hold strings"))
            })
            .collect(),
        Some(_) => Err(format!("\"{key}\" must be a string or a list of strings")),
        None => Err(format!("no \"{key}\"")),
    }
}

fn request(v: &Value, kind: Kind) -> std::result::Result<Request, String> {
    Ok(match kind {
        Kind::MultipleChoice => {
            let context = string(v, "context")?;
            let choices = match v.get("choices") {
                Some(Value::Array(_)) => strings(v, "choices")?,
                _ => return Err("no \"choices\" (a list of strings)".into()),
            };
            if choices.is_empty() {
                return Err("the choice list is empty".into());
            }
            let gold = gold_indices(v.get("gold"), choices.len())?;
            Request::Choice {
                context,
                continuations: choices.clone(),
                choices,
                gold,
            }
        }
        Kind::Loglikelihood => Request::Loglikelihood {
            context: string(v, "context")?,
            continuation: string(v, "continuation")?,
        },
        Kind::Rolling => Request::Rolling {
            text: string(v, "text")?,
        },
        Kind::Generate => {
            let until = match v.get("until") {
                None => vec!["\n\n".to_string()],
                Some(_) => strings(v, "until")?,
            };
            let max_gen_toks = match v.get("max_gen_toks") {
                None => MAX_GEN_TOKS,
                Some(x) => x
                    .as_u64()
                    .filter(|&n| n > 0)
                    .ok_or("\"max_gen_toks\" must be a positive integer")?
                    as usize,
            };
            let targets = strings(v, "target")?;
            if targets.is_empty() {
                return Err("\"target\" is an empty list".into());
            }
            Request::Generate {
                context: string(v, "context")?,
                until,
                max_gen_toks,
                targets,
            }
        }
    })
}

/// `gold` as indices into `n` choices: an integer or a list of integers.
pub fn gold_indices(gold: Option<&Value>, n: usize) -> std::result::Result<Vec<usize>, String> {
    let one = |x: &Value| -> std::result::Result<usize, String> {
        let i = x
            .as_i64()
            .ok_or_else(|| format!("gold {x} is not an index"))?;
        if i < 0 || i as usize >= n {
            return Err(format!(
                "gold index {i} is out of range: there are {n} choices (0..{})",
                n - 1
            ));
        }
        Ok(i as usize)
    };
    match gold {
        Some(Value::Array(a)) if !a.is_empty() => a.iter().map(one).collect(),
        Some(Value::Array(_)) => Err("the gold list is empty".into()),
        Some(x) => Ok(vec![one(x)?]),
        None => Err("no \"gold\" (the index of the right choice)".into()),
    }
}
