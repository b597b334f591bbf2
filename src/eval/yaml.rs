//! lm-evaluation-harness task YAMLs whose data are local files.
//!
//! Read: `task`, `include` (merged under the file's own keys, as the harness does),
//! `dataset_path: json | csv` with `dataset_kwargs.data_files` (a path, a list, or
//! splits mapped to either; relative paths are taken from the YAML's folder, else
//! from the working directory), `test_split` (else `validation_split`),
//! `output_type` (default `generate_until`, as in the harness), `description`,
//! `doc_to_text`, `doc_to_target`, `doc_to_choice`, `target_delimiter`,
//! `fewshot_delimiter`, `metric_list` (with `exact_match`'s options),
//! `generation_kwargs` (`until`, `max_gen_toks` and its aliases, greedy only).
//!
//! Refused, each in one line naming the file, line and key: anything that needs
//! Python (`!function`), Parquet files (convert them to JSON Lines), data on the
//! Hub, few-shot prompts (`num_fewshot` > 0), filters other than `take_first`,
//! `repeats` > 1, sampling, prompt-source prompts, `gen_prefix`, multimodal fields,
//! and tasks whose `doc_to_text` gives a choice index (several contexts, one
//! continuation, as winogrande).

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::jsonl::MAX_GEN_TOKS;
use super::metrics::{ExactMatch, Metric};
use super::task::{Doc, Kind, Request, Task, at_line, check_name};
use super::template::{Row, Templates, is_digits, parse_list_literal, to_text};
use crate::error::{IoContext, Result};
use crate::tokenizer::hex;

/// Whether `text` reads as a harness task (a mapping with `task`).
pub fn looks_like(text: &str) -> bool {
    text.lines()
        .any(|l| l.starts_with("task:") || l.starts_with("include:"))
}

/// The 1-based line where top-level `key:` is set in `text` (1 if it is not found).
fn key_line(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .map_or(1, |i| i + 1)
}

/// A YAML file's mapping, `include`s merged, with the texts read (for lines and the
/// fingerprint).
struct Source {
    cfg: Map<String, Value>,
    /// The files read, the task's own first, with their texts.
    texts: Vec<(PathBuf, String)>,
}

fn load_yaml(path: &Path, seen: &mut Vec<PathBuf>) -> Result<Source> {
    let text = std::fs::read_to_string(path).at(path)?;
    // A constructor that runs Python: nothing here can honour it.
    let mut last_key = String::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.split(" #").next().unwrap_or("");
        if let Some((k, _)) = code.split_once(':')
            && !k.trim().is_empty()
            && !k.trim_start().starts_with('-')
        {
            last_key = k.trim().to_string();
        }
        if code.contains("!function") {
            return Err(at_line(
                path,
                i + 1,
                format!(
                    "`{last_key}` is a !function: this task needs Python code (lm-evaluation-harness imports it), which lit-claire cannot run; write the field as a Jinja template, or prepare the documents beforehand"
                ),
            ));
        }
    }
    let value: Value = serde_norway::from_str(&text).map_err(|e| {
        let line = e.location().map_or(1, |l| l.line());
        at_line(path, line, format!("not YAML: {e}"))
    })?;
    let Value::Object(cfg) = value else {
        return Err(at_line(
            path,
            1,
            "neither a lit-claire task file (JSON Lines) nor an lm-evaluation-harness task YAML (a mapping with `task`)",
        ));
    };
    let mut texts = vec![(path.to_path_buf(), text.clone())];
    let Some(include) = cfg.get("include") else {
        return Ok(Source { cfg, texts });
    };
    let line = key_line(&text, "include");
    let Some(name) = include.as_str() else {
        return Err(at_line(path, line, "`include` must name one YAML file"));
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let inc = dir.join(name);
    if seen.contains(&inc) {
        return Err(at_line(path, line, format!("`include: {name}` is a cycle")));
    }
    if !inc.is_file() {
        return Err(at_line(
            path,
            line,
            format!("`include: {name}`: {} does not exist", inc.display()),
        ));
    }
    seen.push(inc.clone());
    let base = load_yaml(&inc, seen)?;
    let mut merged = base.cfg;
    merged.remove("task_list");
    for (k, v) in cfg {
        if k != "include" {
            merged.insert(k, v);
        }
    }
    texts.extend(base.texts);
    Ok(Source { cfg: merged, texts })
}

/// Read one harness task YAML and its data.
pub fn read(path: &Path) -> Result<Task> {
    let src = load_yaml(path, &mut vec![path.to_path_buf()])?;
    let cfg = &src.cfg;
    // Where a key is set: the first file of the chain that sets it.
    let line_of = |key: &str| -> (PathBuf, usize) {
        for (p, t) in &src.texts {
            if t.lines().any(|l| {
                l.strip_prefix(key)
                    .is_some_and(|r| r.trim_start().starts_with(':'))
            }) {
                return (p.clone(), key_line(t, key));
            }
        }
        (path.to_path_buf(), 1)
    };
    let err = |key: &str, msg: String| {
        let (p, l) = line_of(key);
        at_line(&p, l, format!("`{key}`: {msg}"))
    };
    let name = match cfg.get("task") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(_)) => {
            return Err(err(
                "task",
                "a list of tasks (a group): pass the task YAMLs themselves".into(),
            ));
        }
        _ => {
            return Err(at_line(
                path,
                1,
                "neither a lit-claire task file (JSON Lines) nor an lm-evaluation-harness task YAML (no `task` name)",
            ));
        }
    };
    let (p, l) = line_of("task");
    check_name(&name, &p, l)?;

    for key in [
        "use_prompt",
        "gen_prefix",
        "doc_to_image",
        "doc_to_audio",
        "process_results",
        "process_docs",
        "custom_dataset",
        "fewshot_config",
    ] {
        if cfg.get(key).is_some_and(|v| !v.is_null()) {
            return Err(err(
                key,
                "is not supported by lit-claire's reader of task YAMLs".into(),
            ));
        }
    }
    if let Some(n) = cfg.get("num_fewshot").and_then(Value::as_u64)
        && n > 0
    {
        return Err(err(
            "num_fewshot",
            format!("{n}-shot prompts are not supported (only 0-shot)"),
        ));
    }
    if let Some(r) = cfg.get("repeats").and_then(Value::as_u64)
        && r != 1
    {
        return Err(err("repeats", format!("{r}: only 1 is supported")));
    }
    if let Some(f) = cfg.get("filter_list") {
        let only_take_first = f.as_array().is_some_and(|fs| {
            fs.iter().all(|x| {
                x.get("filter")
                    .and_then(Value::as_array)
                    .is_some_and(|fns| {
                        fns.iter().all(|g| {
                            g.get("function").and_then(Value::as_str) == Some("take_first")
                        })
                    })
            })
        });
        if !only_take_first {
            return Err(err(
                "filter_list",
                "filters other than take_first are not supported".into(),
            ));
        }
    }

    let kind_name = cfg
        .get("output_type")
        .and_then(Value::as_str)
        .unwrap_or("generate_until");
    let kind = Kind::parse(kind_name).ok_or_else(|| {
        err(
            "output_type",
            format!("{kind_name:?} is not multiple_choice, loglikelihood, loglikelihood_rolling or generate_until"),
        )
    })?;
    let metrics = match cfg.get("metric_list") {
        None | Some(Value::Null) => kind.default_metrics(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|m| metric(m, kind).map_err(|e| err("metric_list", e)))
            .collect::<Result<Vec<_>>>()?,
        Some(_) => return Err(err("metric_list", "must be a list".into())),
    };

    // Data.
    let (files, data_texts) = data_files(cfg, path, &err)?;
    let mut hasher = Sha256::new();
    for (_, t) in &src.texts {
        hasher.update(t.as_bytes());
    }
    for t in &data_texts {
        hasher.update(t);
    }
    let fingerprint = hex(&hasher.finalize())[..16].to_string();
    let rows = files;

    // Fields.
    let features: HashSet<&str> = rows
        .iter()
        .flat_map(|r| r.row.keys())
        .map(String::as_str)
        .collect();
    let spec = |key: &str| cfg.get(key).filter(|v| !v.is_null());
    let tpl = Templates::new();
    let delim = cfg
        .get("target_delimiter")
        .and_then(Value::as_str)
        .unwrap_or(" ")
        .to_string();
    let fewshot_delim = cfg
        .get("fewshot_delimiter")
        .and_then(Value::as_str)
        .unwrap_or("\n\n")
        .to_string();
    let has_choice = spec("doc_to_choice").is_some();
    let (until, max_gen_toks) =
        generation(cfg, &fewshot_delim).map_err(|e| err("generation_kwargs", e))?;

    let mut docs = Vec::with_capacity(rows.len());
    for (id, r) in rows.iter().enumerate() {
        let row = &r.row;
        let at = |key: &str, msg: String| {
            let (p, l) = line_of(key);
            at_line(
                &r.file,
                r.line,
                format!("{msg} (`{key}` at {}:{l})", p.display()),
            )
        };
        let description = match spec("description") {
            Some(Value::String(s)) if !s.is_empty() => {
                field_text(&tpl, s, row, &features).map_err(|e| at("description", e))?
            }
            _ => String::new(),
        };
        let text_of = |key: &str| -> Result<String> {
            match spec(key) {
                None => Err(at(key, "is missing".into())),
                Some(v) => match resolve(&tpl, v, row, &features, has_choice)
                    .map_err(|e| at(key, e))?
                {
                    Value::String(s) => Ok(s),
                    Value::Number(_) if key == "doc_to_text" && has_choice => Err(at(
                        key,
                        "gives a choice index (one context per choice, as winogrande): not supported".into(),
                    )),
                    other => Ok(to_text(&other)),
                },
            }
        };
        let request = match kind {
            Kind::Rolling => Request::Rolling {
                text: text_of("doc_to_target")?,
            },
            Kind::Loglikelihood => Request::Loglikelihood {
                context: description.clone() + &text_of("doc_to_text")?,
                continuation: text_of("doc_to_target")?,
            },
            Kind::MultipleChoice => {
                let context = description.clone() + &text_of("doc_to_text")?;
                let choices = choices(&tpl, spec("doc_to_choice"), row, &features)
                    .map_err(|e| at("doc_to_choice", e))?;
                if choices.is_empty() {
                    return Err(at("doc_to_choice", "the choice list is empty".into()));
                }
                let target = match spec("doc_to_target") {
                    None => return Err(at("doc_to_target", "is missing".into())),
                    Some(v) => resolve(&tpl, v, row, &features, true)
                        .map_err(|e| at("doc_to_target", e))?,
                };
                let gold = gold(&target, &choices).map_err(|e| at("doc_to_target", e))?;
                Request::Choice {
                    context,
                    continuations: choices.iter().map(|c| format!("{delim}{c}")).collect(),
                    choices,
                    gold,
                }
            }
            Kind::Generate => {
                let context = description.clone() + &text_of("doc_to_text")?;
                let target = match spec("doc_to_target") {
                    None => return Err(at("doc_to_target", "is missing".into())),
                    Some(v) => resolve(&tpl, v, row, &features, has_choice)
                        .map_err(|e| at("doc_to_target", e))?,
                };
                let targets = if has_choice {
                    let choices = choices(&tpl, spec("doc_to_choice"), row, &features)
                        .map_err(|e| at("doc_to_choice", e))?;
                    let g = gold(&target, &choices).map_err(|e| at("doc_to_target", e))?;
                    g.into_iter().map(|i| choices[i].clone()).collect()
                } else {
                    match target {
                        Value::Array(a) => a.iter().map(to_text).collect(),
                        other => vec![to_text(&other)],
                    }
                };
                Request::Generate {
                    context,
                    until: until.clone(),
                    max_gen_toks,
                    targets,
                }
            }
        };
        docs.push(Doc {
            id,
            file: r.file.clone(),
            line: r.line,
            request,
        });
    }
    if docs.is_empty() {
        return Err(err(
            "dataset_kwargs",
            "the data files hold no document".into(),
        ));
    }
    Ok(Task {
        name,
        kind,
        metrics,
        docs,
        file: path.to_path_buf(),
        fingerprint,
    })
}

/// A field as the harness resolves it (see [`super::template`]): a column, an integer
/// or list as written, or a template with the target rules (`digits → index` when the
/// task has choices, list literals).
fn resolve(
    tpl: &Templates,
    spec: &Value,
    row: &Row,
    features: &HashSet<&str>,
    has_choice: bool,
) -> std::result::Result<Value, String> {
    match spec {
        Value::String(s) if features.contains(s.as_str()) => {
            Ok(row.get(s).cloned().unwrap_or(Value::Null))
        }
        Value::String(s) => {
            let v = tpl.value(s, row)?;
            Ok(match v {
                Value::String(t) if has_choice && is_digits(&t) => {
                    Value::from(t.parse::<u64>().map_err(|e| e.to_string())?)
                }
                Value::String(t) => parse_list_literal(&t).unwrap_or(Value::String(t)),
                // A value evaluated directly was rendered by Python: numbers stay
                // numbers only where the harness would read the digits back.
                Value::Number(n) if !has_choice => Value::String(n.to_string()),
                other => other,
            })
        }
        other => Ok(other.clone()),
    }
}

/// The text of a field that the harness renders (a column, or a template).
fn field_text(
    tpl: &Templates,
    s: &str,
    row: &Row,
    features: &HashSet<&str>,
) -> std::result::Result<String, String> {
    if features.contains(s) {
        Ok(row.get(s).map(to_text).unwrap_or_default())
    } else {
        tpl.render(s, row)
    }
}

/// The choices of a row: a list as written, a mapping's values, a column, or a
/// template giving a list.
fn choices(
    tpl: &Templates,
    spec: Option<&Value>,
    row: &Row,
    features: &HashSet<&str>,
) -> std::result::Result<Vec<String>, String> {
    let v = match spec {
        None => return Err("is missing (a multiple-choice task needs it)".into()),
        Some(Value::String(s)) if features.contains(s.as_str()) => {
            row.get(s).cloned().unwrap_or(Value::Null)
        }
        Some(Value::String(s)) => tpl.value(s, row)?,
        Some(Value::Object(m)) => Value::Array(m.values().cloned().collect()),
        Some(other) => other.clone(),
    };
    match v {
        Value::Array(a) => Ok(a.iter().map(to_text).collect()),
        Value::String(s) => match parse_list_literal(&s) {
            Some(Value::Array(a)) => Ok(a.iter().map(to_text).collect()),
            _ => Err(format!("gives {s:?}, not a list of choices")),
        },
        other => Err(format!("gives {other}, not a list of choices")),
    }
}

/// Gold indices from a target: an index, a choice's text, or a list of indices.
fn gold(target: &Value, choices: &[String]) -> std::result::Result<Vec<usize>, String> {
    let one = |v: &Value| -> std::result::Result<usize, String> {
        match v {
            Value::Number(n) => {
                let i = n
                    .as_i64()
                    .ok_or_else(|| format!("gold {n} is not an index"))?;
                if i < 0 || i as usize >= choices.len() {
                    Err(format!(
                        "gold index {i} is out of range: there are {} choices (0..{})",
                        choices.len(),
                        choices.len() - 1
                    ))
                } else {
                    Ok(i as usize)
                }
            }
            Value::String(s) => choices
                .iter()
                .position(|c| c == s)
                .ok_or_else(|| format!("gold {s:?} is not one of the choices")),
            other => Err(format!("gold {other} is neither an index nor a choice")),
        }
    };
    match target {
        Value::Array(a) if !a.is_empty() => a.iter().map(one).collect(),
        Value::Array(_) => Err("the gold list is empty".into()),
        other => Ok(vec![one(other)?]),
    }
}

/// A metric of `metric_list`.
fn metric(m: &Value, kind: Kind) -> std::result::Result<Metric, String> {
    let name = m
        .get("metric")
        .and_then(Value::as_str)
        .ok_or("an entry has no `metric` name")?;
    let default_agg = |metric: &Metric| match metric {
        Metric::Perplexity => "perplexity",
        Metric::WordPerplexity | Metric::BytePerplexity => "weighted_perplexity",
        Metric::BitsPerByte => "bits_per_byte",
        _ => "mean",
    };
    let flag = |k: &str| m.get(k).and_then(Value::as_bool).unwrap_or(false);
    let metric = match name {
        "acc" => Metric::Acc,
        "acc_norm" => Metric::AccNorm,
        "acc_bytes" => Metric::AccBytes,
        "perplexity" => Metric::Perplexity,
        "word_perplexity" => Metric::WordPerplexity,
        "byte_perplexity" => Metric::BytePerplexity,
        "bits_per_byte" => Metric::BitsPerByte,
        "exact_match" => Metric::ExactMatch(ExactMatch {
            regexes_to_ignore: match m.get("regexes_to_ignore") {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
                _ => Vec::new(),
            },
            ignore_case: flag("ignore_case"),
            ignore_punctuation: flag("ignore_punctuation"),
            ignore_numbers: flag("ignore_numbers"),
        }),
        other => {
            return Err(format!(
                "metric {other:?} is not supported (acc, acc_norm, acc_bytes, exact_match, perplexity, word_perplexity, byte_perplexity, bits_per_byte)"
            ));
        }
    };
    if !kind.allows(&metric) {
        return Err(format!("metric {name} is not defined for {}", kind.name()));
    }
    if let Some(agg) = m.get("aggregation").and_then(Value::as_str)
        && agg != default_agg(&metric)
    {
        return Err(format!(
            "metric {name} with aggregation {agg}: only its default, {}, is supported",
            default_agg(&metric)
        ));
    }
    Ok(metric)
}

/// `until` and `max_gen_toks` of `generation_kwargs` (greedy only).
fn generation(
    cfg: &Map<String, Value>,
    fewshot_delim: &str,
) -> std::result::Result<(Vec<String>, usize), String> {
    let Some(Value::Object(g)) = cfg.get("generation_kwargs") else {
        return Ok((vec![fewshot_delim.to_string()], MAX_GEN_TOKS));
    };
    let until = match g.get("until") {
        None => vec![fewshot_delim.to_string()],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().map(to_text).collect(),
        Some(other) => return Err(format!("until {other} must be a string or a list")),
    };
    let max = [
        "max_gen_toks",
        "max_new_tokens",
        "max_tokens",
        "max_completion_tokens",
    ]
    .iter()
    .find_map(|k| g.get(*k).and_then(Value::as_u64))
    .map_or(MAX_GEN_TOKS, |n| n as usize);
    let temperature = g.get("temperature").and_then(Value::as_f64).unwrap_or(0.0);
    let sample = match g.get("do_sample").and_then(Value::as_bool) {
        Some(s) => s,
        None => temperature > 0.0,
    };
    if sample {
        return Err(
            "sampling (do_sample, temperature > 0) is not supported: generation is greedy".into(),
        );
    }
    Ok((until, max))
}

/// One data row and where it is.
struct DataRow {
    row: Row,
    file: PathBuf,
    line: usize,
}

/// The rows of the evaluation split, every row holding every column (missing ones
/// null, as a dataset's table has them), and the raw bytes of the files read.
fn data_files(
    cfg: &Map<String, Value>,
    yaml: &Path,
    err: &dyn Fn(&str, String) -> crate::Error,
) -> Result<(Vec<DataRow>, Vec<Vec<u8>>)> {
    let dataset = cfg
        .get("dataset_path")
        .and_then(Value::as_str)
        .unwrap_or("");
    match dataset {
        "json" | "csv" => {}
        "parquet" => {
            return Err(err(
                "dataset_path",
                "Parquet files are not read: convert them to JSON Lines (pandas: read_parquet(p).to_json(out, orient='records', lines=True, force_ascii=False)) and use dataset_path: json".into(),
            ));
        }
        "" => {
            return Err(err(
                "dataset_path",
                "is missing: use json or csv with dataset_kwargs.data_files".into(),
            ));
        }
        other => {
            return Err(err(
                "dataset_path",
                format!(
                    "{other} is not local data: download the files and use dataset_path: json (or csv) with dataset_kwargs.data_files"
                ),
            ));
        }
    }
    let files = cfg
        .get("dataset_kwargs")
        .and_then(|k| k.get("data_files"))
        .ok_or_else(|| err("dataset_kwargs", "has no data_files".into()))?;
    let split = cfg
        .get("test_split")
        .or(cfg.get("validation_split"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            err(
                "test_split",
                "neither test_split nor validation_split is set".into(),
            )
        })?;
    let paths = match files {
        Value::String(_) | Value::Array(_) if split == "train" => files.clone(),
        Value::String(_) | Value::Array(_) => {
            return Err(err(
                "dataset_kwargs",
                format!("data_files without split names are the split \"train\", not {split:?}"),
            ));
        }
        Value::Object(m) => m.get(split).cloned().ok_or_else(|| {
            err(
                "dataset_kwargs",
                format!(
                    "data_files has no split {split:?} (it has {})",
                    m.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        })?,
        _ => {
            return Err(err(
                "dataset_kwargs",
                "data_files must be a path, a list or a mapping".into(),
            ));
        }
    };
    let paths: Vec<String> = match paths {
        Value::String(s) => vec![s],
        Value::Array(a) => a.iter().map(to_text).collect(),
        other => {
            return Err(err(
                "dataset_kwargs",
                format!("data file {other} is not a path"),
            ));
        }
    };
    let dir = yaml.parent().unwrap_or(Path::new("."));
    let mut rows = Vec::new();
    let mut raw = Vec::new();
    for p in paths {
        if p.contains('*') || p.contains("://") {
            return Err(err(
                "dataset_kwargs",
                format!("data file {p}: only plain local paths are read"),
            ));
        }
        let rel = dir.join(&p);
        let file = if Path::new(&p).is_absolute() || !rel.exists() {
            PathBuf::from(&p)
        } else {
            rel
        };
        if !file.is_file() {
            return Err(err(
                "dataset_kwargs",
                format!(
                    "data file {p} not found (looked in {} and the working directory)",
                    dir.display()
                ),
            ));
        }
        let bytes = std::fs::read(&file).at(&file)?;
        let text =
            String::from_utf8(bytes.clone()).map_err(|_| at_line(&file, 1, "not UTF-8 text"))?;
        if dataset == "csv" {
            rows.extend(csv_rows(&file, &text)?);
        } else {
            rows.extend(json_rows(&file, &text)?);
        }
        raw.push(bytes);
    }
    let columns: BTreeSet<String> = rows.iter().flat_map(|r| r.row.keys().cloned()).collect();
    for r in &mut rows {
        for c in &columns {
            r.row.entry(c.clone()).or_insert(Value::Null);
        }
    }
    Ok((rows, raw))
}

/// JSON Lines, or one JSON array of objects (its rows then all at line 1).
fn json_rows(file: &Path, text: &str) -> Result<Vec<DataRow>> {
    let mut out = Vec::new();
    if text.trim_start().starts_with('[') {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| at_line(file, e.line(), format!("not JSON: {e}")))?;
        for x in v.as_array().into_iter().flatten() {
            let Value::Object(row) = x else {
                return Err(at_line(file, 1, "the array must hold objects"));
            };
            out.push(DataRow {
                row: row.clone(),
                file: file.to_path_buf(),
                line: 1,
            });
        }
        return Ok(out);
    }
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(row)) => out.push(DataRow {
                row,
                file: file.to_path_buf(),
                line: i + 1,
            }),
            Ok(_) => return Err(at_line(file, i + 1, "each line must be a JSON object")),
            Err(e) => return Err(at_line(file, i + 1, format!("not JSON: {e}"))),
        }
    }
    Ok(out)
}

/// A CSV with a header, each column typed as pandas would: integers, floats, booleans
/// when every cell of the column is one, else strings; empty cells are null.
fn csv_rows(file: &Path, text: &str) -> Result<Vec<DataRow>> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = rdr
        .headers()
        .map_err(|e| at_line(file, 1, format!("not CSV: {e}")))?
        .iter()
        .map(str::to_string)
        .collect();
    let mut cells: Vec<(usize, Vec<String>)> = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map_or(1, |p| p.line() as usize);
            at_line(file, line, format!("not CSV: {e}"))
        })?;
        let line = rec.position().map_or(1, |p| p.line() as usize);
        cells.push((line, rec.iter().map(str::to_string).collect()));
    }
    let typed = |col: usize| -> u8 {
        let vals = cells
            .iter()
            .filter_map(|(_, r)| r.get(col))
            .filter(|s| !s.is_empty());
        let vals: Vec<&String> = vals.collect();
        if !vals.is_empty() && vals.iter().all(|s| s.parse::<i64>().is_ok()) {
            0
        } else if !vals.is_empty() && vals.iter().all(|s| s.parse::<f64>().is_ok()) {
            1
        } else if !vals.is_empty() && vals.iter().all(|s| *s == "True" || *s == "False") {
            2
        } else {
            3
        }
    };
    let types: Vec<u8> = (0..headers.len()).map(typed).collect();
    Ok(cells
        .into_iter()
        .map(|(line, r)| {
            let row = headers
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    let s = r.get(i).cloned().unwrap_or_default();
                    let v = if s.is_empty() {
                        Value::Null
                    } else {
                        match types[i] {
                            0 => Value::from(s.parse::<i64>().unwrap_or_default()),
                            1 => Value::from(s.parse::<f64>().unwrap_or_default()),
                            2 => Value::Bool(s == "True"),
                            _ => Value::String(s),
                        }
                    };
                    (h.clone(), v)
                })
                .collect();
            DataRow {
                row,
                file: file.to_path_buf(),
                line,
            }
        })
        .collect())
}
