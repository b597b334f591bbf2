//! `evaluate`.

use std::path::PathBuf;

use clap::Args;

use super::{Format, RuntimeArgs};
use crate::error::{Error, Result};
use crate::eval::output::{json_lines, samples_jsonl, table};
use crate::eval::{EvalOptions, evaluate, load_tasks};
use crate::hf::load_model;
use crate::tokenizer::Tokenizer;
use crate::train::downstream::{RunEvaluation, evaluate_run};

#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// Task files and folders: JSON Lines of lit-claire, or lm-evaluation-harness task
    /// YAMLs with local data files.
    #[arg(long, num_args = 1.., required = true)]
    pub tasks: Vec<PathBuf>,
    /// One model: a Hugging Face folder.
    #[arg(long, conflicts_with = "out_dir", required_unless_present = "out_dir")]
    pub checkpoint_dir: Option<PathBuf>,
    /// PEFT adapter folder applied to --checkpoint-dir.
    #[arg(long, requires = "checkpoint_dir")]
    pub adapter: Option<PathBuf>,
    /// A training run: its base model and every checkpoint, appended to
    /// RUN/eval_results.csv (pairs already there are skipped).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// The CSV of --out-dir (default RUN/eval_results.csv); with --checkpoint-dir,
    /// also append its rows there (checkpoint named after the folder, step 0).
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// text: a table; json: one object per task and metric on stdout.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Write one JSON line per request (task, doc_id, index, loglikelihood, is_greedy).
    #[arg(long)]
    pub log_samples: Option<PathBuf>,
    /// Continuations scored per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Context window in tokens (default: the model's); longer requests lose tokens
    /// from the left, as in lm-evaluation-harness.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Only the first N documents of each task.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn evaluate_cmd(a: EvaluateArgs) -> Result<()> {
    if a.batch_size == 0 {
        return Err(Error::Usage("--batch-size must be at least 1".into()));
    }
    let tasks = load_tasks(&a.tasks)?;
    let strategy = a.runtime.strategy()?;
    let opts = EvalOptions {
        batch_size: a.batch_size,
        max_length: a.max_length,
        limit: a.limit,
        progress: true,
        ..EvalOptions::default()
    };
    let mut samples = String::new();
    let print = |name: Option<&str>, results: &[crate::eval::TaskResult]| match a.format {
        Format::Json => {
            for l in json_lines(results, name) {
                println!("{l}");
            }
        }
        Format::Text => print!("{}", table(results, name)),
    };
    let start = std::time::Instant::now();
    if let Some(run) = &a.out_dir {
        let r = RunEvaluation {
            run,
            tasks: &tasks,
            opts: &opts,
            csv: a.csv.clone(),
        };
        let scored = evaluate_run(&r, &strategy, |c| {
            print(Some(&c.checkpoint), &c.results);
            samples.push_str(&samples_jsonl(&c.results, Some(&c.checkpoint)));
            Ok(())
        })?;
        if scored.is_empty() {
            eprintln!(
                "every checkpoint of {} is already scored on these tasks",
                run.display()
            );
        }
    } else {
        let dir = a.checkpoint_dir.as_ref().expect("clap requires it");
        let model = load_model(dir, &strategy.build_options(false), a.adapter.as_deref())?;
        let tok = Tokenizer::from_dir(dir)?;
        let results = evaluate(&model, &tok, &tasks, &opts)?;
        print(None, &results);
        samples = samples_jsonl(&results, None);
        if let Some(csv) = &a.csv {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            crate::eval::output::append_csv(csv, &name, 0, &results)?;
        }
    }
    eprintln!("evaluated in {:.1}s", start.elapsed().as_secs_f64());
    if let Some(path) = &a.log_samples {
        crate::io::write_atomic(path, samples.as_bytes())?;
    }
    Ok(())
}
