//! Downstream evaluation, scored as lm-evaluation-harness 0.4 scores it: what
//! continual pretraining gained on the new language and what it forgot of the old.
//!
//! ```text
//! task files ─ jsonl / yaml (+ template) ─→ Task: docs, each one text request
//!        requests: the harness's encoding rules ─→ token requests
//!        score: prefixes shared, batched by length, one forward (model::engine)
//!        metrics: acc, acc_norm, perplexities, exact match, standard errors
//!        output: tables, JSON lines, logged samples, eval_results.csv (run: walk)
//! ```
//!
//! - [`task`]: what a task is once read; [`jsonl`]: our JSON Lines format;
//!   [`yaml`]: harness task YAMLs with local data, through [`template`] (Jinja).
//! - [`requests`]: the harness's rules for turning text into token requests (trailing
//!   spaces, joint encoding, truncation, rolling windows), written down there.
//! - [`score`]: running them through the model's one forward pass.
//! - [`metrics`]: per-document values, aggregates and standard errors; [`pyrandom`]:
//!   Python's generator, for the harness's bootstrap.
//! - [`output`]: what is printed and written. Every checkpoint of a run is scored by
//!   `train::downstream`, and a run's own validations by [`TaskSet`].

pub mod jsonl;
pub mod metrics;
pub mod output;
pub mod pyrandom;
pub mod requests;
pub mod score;
pub mod task;
pub mod template;
pub mod yaml;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::model::engine::Infer;
use crate::model::{Gpt, check_ids};
use crate::tokenizer::{Tokenizer, hex};
use metrics::{DocValues, Metric, MetricValue, argmax};
use requests::{Encoder, TokenRequest};
use task::{Request, Task};

/// How to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Continuations scored per forward pass.
    pub batch_size: usize,
    /// The context window L (default: the model's); the harness's `max_length`.
    pub max_length: Option<usize>,
    /// Score only the first N documents of each task (the harness's `--limit`).
    pub limit: Option<usize>,
    /// Bootstrap resamples for the standard error of `perplexity`.
    pub bootstrap_iters: usize,
    /// Print progress on stderr.
    pub progress: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            batch_size: 16,
            max_length: None,
            limit: None,
            bootstrap_iters: metrics::BOOTSTRAP_ITERS,
            progress: false,
        }
    }
}

/// One request's result, as the harness logs it with `--log_samples`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Sample {
    pub task: String,
    pub doc_id: usize,
    /// The choice (0 for other kinds).
    pub index: usize,
    /// Summed over the windows of a rolling document.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loglikelihood: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_greedy: Option<bool>,
    /// The generated text (generation tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
}

/// The scores of one task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskResult {
    pub task: String,
    pub fingerprint: String,
    pub metrics: Vec<MetricValue>,
    pub samples: Vec<Sample>,
}

/// Tasks scored during training, at each validation (`pretrain --eval-tasks`), with
/// the base model's tokenizer: each metric of each task is a column `task/metric` of
/// `metrics.csv` and a TensorBoard scalar.
#[derive(Debug, Clone)]
pub struct TaskSet {
    pub tasks: Vec<Task>,
    tokenizer: Tokenizer,
}

impl TaskSet {
    /// Read the tasks of `paths` (bad ones fail now, before training) and the
    /// tokenizer of the model folder `model_dir`.
    pub fn load(paths: &[PathBuf], model_dir: &Path) -> Result<Self> {
        Ok(TaskSet {
            tasks: load_tasks(paths)?,
            tokenizer: Tokenizer::from_dir(model_dir)?,
        })
    }

    /// `task/metric` for every metric of every task, in order.
    pub fn columns(&self) -> Vec<String> {
        self.tasks
            .iter()
            .flat_map(|t| {
                t.metrics
                    .iter()
                    .map(move |m| format!("{}/{}", t.name, m.name()))
            })
            .collect()
    }

    /// The value of each column for `model`.
    pub fn score(&self, model: &Gpt, batch_size: usize) -> Result<Vec<f64>> {
        self.score_with(&mut Infer::whole(model), batch_size)
    }

    /// [`TaskSet::score`] with the model's blocks wherever it takes them (with
    /// `--strategy fsdp`, gathered one at a time for each forward; every rank must
    /// call it).
    pub fn score_with(&self, model: &mut Infer<'_>, batch_size: usize) -> Result<Vec<f64>> {
        let opts = EvalOptions {
            batch_size,
            ..EvalOptions::default()
        };
        let results = evaluate_with(model, &self.tokenizer, &self.tasks, &opts)?;
        Ok(results
            .iter()
            .flat_map(|r| r.metrics.iter().map(|m| m.value))
            .collect())
    }
}

/// Read the tasks of files and folders: `.jsonl` files of ours and harness `.yaml` /
/// `.yml` files (a folder's, recursively, minus the data files its YAMLs name).
pub fn load_tasks(paths: &[PathBuf]) -> Result<Vec<Task>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut found)?;
            found.sort();
            files.extend(found);
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            return Err(Error::missing(
                p,
                "--tasks takes task files (.jsonl, .yaml) and folders of them",
            ));
        }
    }
    // YAMLs first: the data files they name are not task files of ours.
    let (yamls, others): (Vec<PathBuf>, Vec<PathBuf>) = files
        .into_iter()
        .partition(|f| matches!(f.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")));
    let mut tasks = Vec::new();
    let mut data: Vec<PathBuf> = Vec::new();
    for y in &yamls {
        let t = yaml::read(y)?;
        data.extend(t.docs.iter().map(|d| canonical(&d.file)));
        tasks.push(t);
    }
    for f in others {
        if data.contains(&canonical(&f)) {
            continue;
        }
        let text = std::fs::read_to_string(&f).at(&f)?;
        let is_jsonl = f.extension().and_then(|e| e.to_str()) == Some("jsonl");
        if is_jsonl && jsonl::looks_like(&text) {
            let fp = hex(&Sha256::digest(text.as_bytes()))[..16].to_string();
            tasks.extend(jsonl::read(&f, &fp)?);
        } else if yaml::looks_like(&text) {
            tasks.push(yaml::read(&f)?);
        } else if paths.contains(&f) || is_jsonl {
            let line = text
                .lines()
                .position(|l| !l.trim().is_empty())
                .map_or(1, |i| i + 1);
            return Err(task::at_line(
                &f,
                line,
                "neither a lit-claire task file (JSON Lines whose objects have \"task\" and \"type\") nor an lm-evaluation-harness task YAML (with `task`)",
            ));
        }
    }
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    for t in &tasks {
        if let Some(other) = seen.insert(t.name.clone(), t.file.clone()) {
            return Err(Error::Data(format!(
                "task {} is defined twice: in {} and in {}",
                t.name,
                other.display(),
                t.file.display()
            )));
        }
    }
    if tasks.is_empty() {
        return Err(Error::Usage("--tasks: no task file found".into()));
    }
    Ok(tasks)
}

fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).at(dir)? {
        let p = e.at(dir)?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("jsonl" | "yaml" | "yml")
        ) {
            out.push(p);
        }
    }
    Ok(())
}

/// Where a token request came from.
#[derive(Clone, Copy)]
struct Origin {
    task: usize,
    doc: usize,
    /// Choice, or rolling window.
    part: usize,
}

/// Evaluate `model` (with its tokenizer `tok`) on `tasks`.
pub fn evaluate(
    model: &Gpt,
    tok: &Tokenizer,
    tasks: &[Task],
    opts: &EvalOptions,
) -> Result<Vec<TaskResult>> {
    evaluate_with(&mut Infer::whole(model), tok, tasks, opts)
}

/// [`evaluate`] with the model's blocks wherever it takes them ([`Infer`]).
pub fn evaluate_with(
    infer: &mut Infer<'_>,
    tok: &Tokenizer,
    tasks: &[Task],
    opts: &EvalOptions,
) -> Result<Vec<TaskResult>> {
    let model = infer.model();
    let max_len = opts.max_length.unwrap_or(model.cfg.block_size);
    if max_len == 0 || max_len > model.cfg.block_size {
        return Err(Error::Usage(format!(
            "--max-length {max_len} must be between 1 and the model's context, {}",
            model.cfg.block_size
        )));
    }
    let enc = Encoder::new(tok, max_len)?;
    let limit = |t: &Task| opts.limit.unwrap_or(usize::MAX).min(t.docs.len());

    // Text → token requests.
    let mut reqs: Vec<TokenRequest> = Vec::new();
    let mut origins: Vec<Origin> = Vec::new();
    for (ti, t) in tasks.iter().enumerate() {
        let mut warned = false;
        for d in &t.docs[..limit(t)] {
            let pairs: Vec<TokenRequest> = match &d.request {
                Request::Choice {
                    context,
                    continuations,
                    ..
                } => continuations
                    .iter()
                    .map(|c| enc.pair(context, c))
                    .collect::<Result<_>>()?,
                Request::Loglikelihood {
                    context,
                    continuation,
                } => vec![enc.pair(context, continuation)?],
                Request::Rolling { text } => enc.rolling(text)?,
                Request::Generate { .. } => continue,
            };
            for (part, r) in pairs.into_iter().enumerate() {
                if r.continuation.is_empty() && !matches!(d.request, Request::Rolling { .. }) {
                    return Err(d.error(format!("{}: a continuation encodes to no token", t.name)));
                }
                if r.continuation.len() > max_len {
                    return Err(d.error(format!(
                        "{}: a continuation of {} tokens is longer than the context window of {max_len}",
                        t.name,
                        r.continuation.len()
                    )));
                }
                if r.len() > max_len + 1 && !warned {
                    eprintln!(
                        "warning: {}:{}: task {}: a request of {} tokens is longer than the context window of {max_len}; it and any other such request of this task lose tokens from the left of their context, as in lm-evaluation-harness",
                        d.file.display(),
                        d.line,
                        t.name,
                        r.len()
                    );
                    warned = true;
                }
                check_ids(
                    &model.cfg,
                    &r.context,
                    &format!("{}:{}", d.file.display(), d.line),
                )?;
                check_ids(
                    &model.cfg,
                    &r.continuation,
                    &format!("{}:{}", d.file.display(), d.line),
                )?;
                reqs.push(r);
                origins.push(Origin {
                    task: ti,
                    doc: d.id,
                    part,
                });
            }
        }
    }
    let total = reqs.len();
    let mut last = std::time::Instant::now();
    let scored = score::score_requests(infer, &reqs, max_len, opts.batch_size, |done| {
        if opts.progress && (last.elapsed().as_secs_f64() > 5.0 || done == total) {
            eprintln!("scored {done}/{total} requests");
            last = std::time::Instant::now();
        }
    })?;
    // (task, doc) → parts' scores.
    let mut by_doc: HashMap<(usize, usize), Vec<score::Scored>> = HashMap::new();
    for (o, s) in origins.iter().zip(scored) {
        let v = by_doc.entry((o.task, o.doc)).or_default();
        debug_assert_eq!(v.len(), o.part);
        v.push(s);
    }

    let mut results = Vec::with_capacity(tasks.len());
    for (ti, t) in tasks.iter().enumerate() {
        let docs = &t.docs[..limit(t)];
        let mut samples = Vec::new();
        let mut values: Vec<DocValues> = t
            .metrics
            .iter()
            .map(|m| match m {
                Metric::Perplexity => DocValues::Perplexity(Vec::new()),
                Metric::WordPerplexity | Metric::BytePerplexity => DocValues::Weighted {
                    items: Vec::new(),
                    bits: false,
                },
                Metric::BitsPerByte => DocValues::Weighted {
                    items: Vec::new(),
                    bits: true,
                },
                _ => DocValues::Mean(Vec::new()),
            })
            .collect();
        let mut done_gen = 0;
        for d in docs {
            let parts = by_doc.get(&(ti, d.id)).map(Vec::as_slice).unwrap_or(&[]);
            let sample =
                |index: usize, s: Option<&score::Scored>, response: Option<String>| Sample {
                    task: t.name.clone(),
                    doc_id: d.id,
                    index,
                    loglikelihood: s.map(|s| s.loglikelihood),
                    is_greedy: s.map(|s| s.is_greedy),
                    response,
                };
            match &d.request {
                Request::Choice { choices, gold, .. } => {
                    let lls: Vec<f64> = parts.iter().map(|s| s.loglikelihood).collect();
                    let norm = |len: &dyn Fn(&String) -> usize| -> Vec<f64> {
                        lls.iter()
                            .zip(choices)
                            .map(|(l, c)| l / len(c) as f64)
                            .collect()
                    };
                    let pred = argmax(&lls);
                    let pred_norm = argmax(&norm(&|c| c.chars().count()));
                    let pred_bytes = argmax(&norm(&|c| c.len()));
                    let hit = |p: usize| f64::from(u8::from(gold.contains(&p)));
                    let greedy = f64::from(u8::from(gold.iter().any(|&g| parts[g].is_greedy)));
                    for (m, v) in t.metrics.iter().zip(&mut values) {
                        if let DocValues::Mean(xs) = v {
                            xs.push(match m {
                                Metric::Acc => hit(pred),
                                Metric::AccNorm => hit(pred_norm),
                                Metric::AccBytes => hit(pred_bytes),
                                _ => greedy,
                            });
                        }
                    }
                    for (i, s) in parts.iter().enumerate() {
                        samples.push(sample(i, Some(s), None));
                    }
                }
                Request::Loglikelihood { .. } => {
                    let s = parts[0];
                    for v in &mut values {
                        match v {
                            DocValues::Perplexity(xs) => xs.push(s.loglikelihood),
                            DocValues::Mean(xs) => xs.push(f64::from(u8::from(s.is_greedy))),
                            DocValues::Weighted { .. } => {}
                        }
                    }
                    samples.push(sample(0, Some(&s), None));
                }
                Request::Rolling { text } => {
                    let ll: f64 = parts.iter().map(|s| s.loglikelihood).sum();
                    for (m, v) in t.metrics.iter().zip(&mut values) {
                        if let DocValues::Weighted { items, .. } = v {
                            let count = match m {
                                Metric::WordPerplexity => metrics::count_words(text),
                                _ => text.len(),
                            };
                            items.push((ll, count));
                        }
                    }
                    samples.push(Sample {
                        is_greedy: None,
                        ..sample(
                            0,
                            Some(&score::Scored {
                                loglikelihood: ll,
                                is_greedy: false,
                            }),
                            None,
                        )
                    });
                }
                Request::Generate {
                    context,
                    until,
                    max_gen_toks,
                    targets,
                } => {
                    let ctx = enc.encode(context)?;
                    check_ids(
                        &model.cfg,
                        &ctx,
                        &format!("{}:{}", d.file.display(), d.line),
                    )?;
                    if ctx.is_empty() {
                        return Err(d.error(format!("{}: the context encodes to no token", t.name)));
                    }
                    let text =
                        score::generate_until(infer, tok, &ctx, until, *max_gen_toks, max_len)?;
                    for (m, v) in t.metrics.iter().zip(&mut values) {
                        if let (Metric::ExactMatch(em), DocValues::Mean(xs)) = (m, v) {
                            let hit = targets.iter().any(|g| em.matches(&text, g));
                            xs.push(f64::from(u8::from(hit)));
                        }
                    }
                    samples.push(sample(0, None, Some(text)));
                    done_gen += 1;
                    if opts.progress && done_gen % 10 == 0 {
                        eprintln!("{}: generated {done_gen}/{}", t.name, docs.len());
                    }
                }
            }
        }
        let metrics = t
            .metrics
            .iter()
            .zip(&values)
            .map(|(m, v)| {
                let (value, stderr) = v.aggregate(opts.bootstrap_iters);
                MetricValue {
                    task: t.name.clone(),
                    metric: m.name().to_string(),
                    value,
                    stderr,
                    samples: docs.len(),
                }
            })
            .collect();
        results.push(TaskResult {
            task: t.name.clone(),
            fingerprint: t.fingerprint.clone(),
            metrics,
            samples,
        });
    }
    Ok(results)
}
