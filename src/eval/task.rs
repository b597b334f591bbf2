//! A task as both file formats end up: named documents, each one request of one kind,
//! and the metrics to report.

use std::path::{Path, PathBuf};

use super::metrics::Metric;
use crate::error::Error;

/// The kind of request of a task (the harness's `output_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A context and choices; the best-scored choice is the answer.
    MultipleChoice,
    /// The log-likelihood of a continuation after a context.
    Loglikelihood,
    /// The log-likelihood of a whole document, in windows.
    Rolling,
    /// Greedy generation until a stop string, compared with a target.
    Generate,
}

impl Kind {
    /// The harness's `output_type` (also the `type` of our JSONL format).
    pub fn name(self) -> &'static str {
        match self {
            Kind::MultipleChoice => "multiple_choice",
            Kind::Loglikelihood => "loglikelihood",
            Kind::Rolling => "loglikelihood_rolling",
            Kind::Generate => "generate_until",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        [
            Kind::MultipleChoice,
            Kind::Loglikelihood,
            Kind::Rolling,
            Kind::Generate,
        ]
        .into_iter()
        .find(|k| k.name() == s)
    }

    /// The harness's metrics when a task lists none.
    pub fn default_metrics(self) -> Vec<Metric> {
        match self {
            Kind::MultipleChoice => vec![Metric::Acc, Metric::AccNorm],
            Kind::Loglikelihood => vec![Metric::Perplexity, Metric::Acc],
            Kind::Rolling => vec![
                Metric::WordPerplexity,
                Metric::BytePerplexity,
                Metric::BitsPerByte,
            ],
            Kind::Generate => vec![Metric::ExactMatch(Default::default())],
        }
    }

    /// Whether `m` is defined for this kind of request.
    pub fn allows(self, m: &Metric) -> bool {
        match self {
            Kind::MultipleChoice => matches!(
                m,
                Metric::Acc | Metric::AccNorm | Metric::AccBytes | Metric::ExactMatch(_)
            ),
            Kind::Loglikelihood => matches!(m, Metric::Perplexity | Metric::Acc),
            Kind::Rolling => matches!(
                m,
                Metric::WordPerplexity | Metric::BytePerplexity | Metric::BitsPerByte
            ),
            Kind::Generate => matches!(m, Metric::ExactMatch(_)),
        }
    }
}

/// One document's request, as text.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `continuations[i]` is scored after `context`; `choices[i]` is the choice as the
    /// task names it (without the target delimiter), whose length `acc_norm` divides by.
    Choice {
        context: String,
        continuations: Vec<String>,
        choices: Vec<String>,
        /// Indices of the right choices (one, or several for multiple targets).
        gold: Vec<usize>,
    },
    Loglikelihood {
        context: String,
        continuation: String,
    },
    /// The text scored whole; its words and bytes are counted for the perplexities.
    Rolling { text: String },
    Generate {
        context: String,
        until: Vec<String>,
        max_gen_toks: usize,
        /// Right answers (any matches).
        targets: Vec<String>,
    },
}

/// One document of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    /// Index in the task (the harness's `doc_id`).
    pub id: usize,
    /// Where it comes from: a file and its 1-based line.
    pub file: PathBuf,
    pub line: usize,
    pub request: Request,
}

impl Doc {
    /// An error about this document, naming its file and line.
    pub fn error(&self, msg: impl std::fmt::Display) -> Error {
        at_line(&self.file, self.line, msg)
    }
}

/// A task ready to score.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub name: String,
    pub kind: Kind,
    pub metrics: Vec<Metric>,
    pub docs: Vec<Doc>,
    /// The file that defines it (the YAML, or the JSONL of its requests).
    pub file: PathBuf,
    /// A fingerprint of what defines it (task file and data files): 16 hex digits of
    /// SHA-256.
    pub fingerprint: String,
}

/// An error at `line` of `file`, on one line: `file:line: msg`.
pub fn at_line(file: &Path, line: usize, msg: impl std::fmt::Display) -> Error {
    Error::Data(format!("{}:{line}: {msg}", file.display()))
}

/// Check a task name is usable as a CSV cell and a file name part.
pub fn check_name(name: &str, file: &Path, line: usize) -> crate::Result<()> {
    if name.is_empty() || name.contains([',', '\n', '\r', '"']) {
        return Err(at_line(
            file,
            line,
            format!("task name {name:?} must be non-empty, without commas, quotes or line breaks"),
        ));
    }
    Ok(())
}
