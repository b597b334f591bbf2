//! `demo`: the pipeline end to end on the built-in tiny model and sample corpus.

use std::path::PathBuf;

use clap::Args;

use crate::demo::{DemoOptions, run_demo};
use crate::error::Result;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where everything goes (model, data, run, demo.json).
    #[arg(long, default_value = "out/demo")]
    pub out_dir: PathBuf,
    /// Training steps (default: the recipe's, lit_recipes/tiny-lora.toml).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Prompt for the final generation.
    #[arg(long, default_value = "O amor é como")]
    pub prompt: String,
    /// Replace a previous demo in --out-dir.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn demo(a: DemoArgs) -> Result<()> {
    let r = run_demo(&DemoOptions {
        out_dir: a.out_dir,
        max_steps: a.max_steps,
        prompt: a.prompt,
        overwrite: a.overwrite,
    })?;
    println!("model        {}", r.model_dir.display());
    println!(
        "data         {} ({} training tokens)",
        r.data_dir.display(),
        r.train_tokens
    );
    println!(
        "run          {} ({} LoRA steps)",
        r.run_dir.display(),
        r.steps
    );
    for (label, completion) in [("base", &r.base_completion), ("adapted", &r.completion)] {
        let text = format!("{}{}", r.prompt, completion);
        for (i, line) in text.lines().enumerate() {
            let head = if i == 0 {
                format!("{label:<13}")
            } else {
                " ".repeat(13)
            };
            println!("{head}{}", line.trim_end());
        }
    }
    println!("validation   {}", r.validation_csv.display());
    println!("plot         {}", r.plot.display());
    println!("report       {}", r.report.display());
    println!(
        "validation loss on the Portuguese fortunes: {:.4} -> {:.4} (perplexity {:.1} -> {:.1}) in {:.0} s",
        r.base_val_loss,
        r.tuned_val_loss,
        r.base_val_loss.exp(),
        r.tuned_val_loss.exp(),
        r.seconds
    );
    Ok(())
}
