//! `plot`: loss curves of runs, and their best checkpoints.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::error::{Error, Result};
use crate::plot::{PlotOptions, XAxis, YAxis, best_checkpoint, plot_runs};

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Run directories (the --out-dir of `lit-claire pretrain`).
    #[arg(required = true, value_name = "RUN")]
    pub runs: Vec<PathBuf>,
    /// Image to write: a .png or .svg file.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// What the x axis shows.
    #[arg(long, value_enum, default_value_t = XArg::Step)]
    pub x: XArg,
    /// What the y axis shows: the loss per token, or validation bits per byte (which
    /// runs with different tokenizers share).
    #[arg(long, value_enum, default_value_t = YArg::Loss)]
    pub y: YArg,
    /// Lower end of the loss axis.
    #[arg(long)]
    pub min_loss: Option<f64>,
    /// Upper end of the loss axis.
    #[arg(long)]
    pub max_loss: Option<f64>,
    /// Print the best checkpoint of each run (lowest validation loss) to stdout:
    /// RUN<TAB>checkpoint<TAB>step<TAB>val_loss ("-" fields when a run has none).
    #[arg(long)]
    pub best: bool,
}

/// `--x`: optimizer steps, training tokens or wall-clock hours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum XArg {
    Step,
    Tokens,
    Hours,
}

/// `--y`: loss per token or bits per byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum YArg {
    Loss,
    Bpb,
}

impl From<YArg> for YAxis {
    fn from(y: YArg) -> Self {
        match y {
            YArg::Loss => YAxis::Loss,
            YArg::Bpb => YAxis::Bpb,
        }
    }
}

impl From<XArg> for XAxis {
    fn from(x: XArg) -> Self {
        match x {
            XArg::Step => XAxis::Step,
            XArg::Tokens => XAxis::Tokens,
            XArg::Hours => XAxis::Hours,
        }
    }
}

pub fn plot(a: PlotArgs) -> Result<()> {
    if a.output.is_none() && !a.best {
        return Err(Error::Usage(
            "nothing to do: give --output curves.png (or .svg) and/or --best".into(),
        ));
    }
    if let Some(output) = &a.output {
        let opts = PlotOptions {
            x: a.x.into(),
            y: a.y.into(),
            min_loss: a.min_loss,
            max_loss: a.max_loss,
            ..PlotOptions::new(output)
        };
        let summary = plot_runs(&a.runs, &opts)?;
        for w in &summary.warnings {
            eprintln!("warning: {w}");
        }
        eprintln!(
            "wrote {} ({} run{}, loss axis {})",
            summary.output.display(),
            summary.runs.len(),
            if summary.runs.len() == 1 { "" } else { "s" },
            if summary.y.log { "log" } else { "linear" },
        );
    }
    if a.best {
        // Every run is read before any line is printed.
        let bests = a
            .runs
            .iter()
            .map(|r| best_checkpoint(r))
            .collect::<Result<Vec<_>>>()?;
        for (run, best) in a.runs.iter().zip(bests) {
            match best {
                Some(b) => println!(
                    "{}\t{}\t{}\t{:.6}",
                    run.display(),
                    b.checkpoint,
                    b.step,
                    b.val_loss
                ),
                None => {
                    eprintln!(
                        "note: {}: no checkpoint with a validation loss yet",
                        run.display()
                    );
                    println!("{}\t-\t-\t-", run.display());
                }
            }
        }
    }
    Ok(())
}
