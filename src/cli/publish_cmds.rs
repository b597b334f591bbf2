//! After training: `merge-lora`, `convert-to-hf`, `upload`, `download` and `quantize`.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::DType;
use clap::{Args, ValueEnum};

use crate::error::Result;
use crate::gguf::QuantType;
use crate::hf::export::{ConvertOptions, ExportReport, convert_to_hf, merge_lora};
use crate::hf::shards::parse_size;
use crate::hub::{HubConfig, RepoId, UploadOptions};

#[derive(Debug, Args)]
pub struct MergeLoraArgs {
    /// Base model folder the adapter was trained on.
    #[arg(long)]
    pub checkpoint_dir: PathBuf,
    /// PEFT adapter folder, LoRA checkpoint (RUN/final) or run folder.
    #[arg(long)]
    pub lora_path: PathBuf,
    /// Output folder (a complete Hugging Face model folder).
    #[arg(long)]
    pub save_path: PathBuf,
    /// Replace --save-path if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

/// Dtype of converted weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutDtype {
    Bf16,
    F16,
    F32,
}

impl OutDtype {
    pub(super) fn dtype(self) -> DType {
        match self {
            OutDtype::Bf16 => DType::BF16,
            OutDtype::F16 => DType::F16,
            OutDtype::F32 => DType::F32,
        }
    }
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Training checkpoint (RUN/final, RUN/step-00000100), run folder or adapter.
    #[arg(long)]
    pub input_path: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Base model folder (default: base_checkpoint_dir of training_state.json).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Weights dtype (default: the base model's).
    #[arg(long, value_enum)]
    pub dtype: Option<OutDtype>,
    /// Largest weight file before sharding (decimal KB, MB, GB; KiB, MiB, GiB).
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// Upload the result to this Hub model repository.
    #[arg(long)]
    pub repo_id: Option<String>,
    /// Licence for the model card (default: the base model's).
    #[arg(long)]
    pub license: Option<String>,
    /// Replace --output-dir if it exists.
    #[arg(long)]
    pub overwrite: bool,
    /// Make the repository private when --repo-id creates it.
    #[arg(long)]
    pub private: bool,
    /// Seconds to wait on the Hub: to connect, for each answer, and for an upload or
    /// download to move again when it stalls (a large file only has to keep moving).
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub timeout: f64,
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// Model repository ORG/NAME (created if missing).
    pub repo_id: String,
    /// Folder to upload.
    #[arg(long)]
    pub input_dir: PathBuf,
    /// Commit message.
    #[arg(long)]
    pub message: Option<String>,
    /// Create the repository as private.
    #[arg(long)]
    pub private: bool,
    /// Branch to commit to (created from main if missing).
    #[arg(long)]
    pub revision: Option<String>,
    /// Seconds to wait on the Hub: to connect, for each answer, and for an upload or
    /// download to move again when it stalls (a large file only has to keep moving).
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub timeout: f64,
}

#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// Model repository ORG/NAME.
    #[arg(long)]
    pub repo_id: String,
    /// Folder under which ORG/NAME is created.
    #[arg(long, default_value = "checkpoints")]
    pub checkpoint_dir: PathBuf,
    /// Branch, tag or commit.
    #[arg(long)]
    pub revision: Option<String>,
    /// Seconds to wait on the Hub: to connect, for each answer, and for an upload or
    /// download to move again when it stalls (a large file only has to keep moving).
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub timeout: f64,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Hugging Face model folder (LLaMA, Mistral or Falcon).
    #[arg(long)]
    pub checkpoint_dir: PathBuf,
    /// GGUF file to write.
    #[arg(long)]
    pub output: PathBuf,
    /// f16, q8_0 or q4_0.
    #[arg(long = "type", default_value = "q8_0")]
    pub kind: QuantType,
    /// Replace --output if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

fn describe(r: &ExportReport, started: Instant) {
    eprintln!(
        "wrote {} ({} weight file(s), {:.1} MB, {}{}) in {:.1}s",
        r.out.display(),
        r.weights.files.len(),
        r.weights.total_size as f64 / 1e6,
        crate::config::torch_dtype_name(r.dtype),
        if r.merged > 0 {
            format!(
                ", {} LoRA weight(s) merged{}",
                r.merged,
                if r.untied_head { ", head untied" } else { "" }
            )
        } else {
            String::new()
        },
        started.elapsed().as_secs_f64()
    );
    println!("{}", r.out.display());
}

pub fn merge(a: MergeLoraArgs) -> Result<()> {
    let t = Instant::now();
    let r = merge_lora(&a.checkpoint_dir, &a.lora_path, &a.save_path, a.overwrite)?;
    describe(&r, t);
    Ok(())
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    let max_shard_size = parse_size(&a.max_shard_size)?;
    let repo: Option<RepoId> = a.repo_id.as_deref().map(str::parse).transpose()?;
    let hub = HubConfig::from_env().with_timeout_secs(a.timeout)?;
    if repo.is_some() && hub.token.is_none() {
        // Fail before the conversion, not after it.
        return Err(crate::Error::Usage(format!(
            "--repo-id needs a Hugging Face token with write access: set HF_TOKEN or write it to {}",
            hub.token_source
        )));
    }
    let t = Instant::now();
    let r = convert_to_hf(&ConvertOptions {
        input: a.input_path,
        output_dir: a.output_dir,
        base: a.checkpoint_dir,
        dtype: a.dtype.map(OutDtype::dtype),
        max_shard_size,
        overwrite: a.overwrite,
        license: a.license,
        repo_id: a.repo_id.clone(),
    })?;
    describe(&r, t);
    if let Some(repo) = repo {
        let opts = UploadOptions {
            private: a.private,
            ..Default::default()
        };
        let u = crate::hub::upload(&hub, &repo, &r.out, &opts)?;
        eprintln!("uploaded {} files to {repo}", u.files.len());
    }
    Ok(())
}

pub fn upload(a: UploadArgs) -> Result<()> {
    let repo: RepoId = a.repo_id.parse()?;
    let opts = UploadOptions {
        message: a.message,
        private: a.private,
        revision: a.revision,
    };
    let hub = HubConfig::from_env().with_timeout_secs(a.timeout)?;
    let r = crate::hub::upload(&hub, &repo, &a.input_dir, &opts)?;
    eprintln!(
        "uploaded {} files ({:.1} MB) to {repo}{}",
        r.files.len(),
        r.bytes as f64 / 1e6,
        if r.created_repo {
            " (new repository)"
        } else {
            ""
        }
    );
    if let Some(url) = r.commit_url {
        println!("{url}");
    }
    Ok(())
}

pub fn download(a: DownloadArgs) -> Result<()> {
    let repo: RepoId = a.repo_id.parse()?;
    let r = crate::hub::download(
        &HubConfig::from_env().with_timeout_secs(a.timeout)?,
        &repo,
        &a.checkpoint_dir,
        a.revision.as_deref(),
    )?;
    eprintln!(
        "{} files, {:.1} MB in {}",
        r.files.len(),
        r.bytes as f64 / 1e6,
        r.dir.display()
    );
    println!("{}", r.dir.display());
    Ok(())
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let ty = a.kind;
    let t = Instant::now();
    let r = crate::gguf::llama_cpp::quantize(&a.checkpoint_dir, &a.output, ty, a.overwrite)?;
    for f in &r.fallbacks {
        eprintln!("note: {f}");
    }
    eprintln!(
        "wrote {} ({} architecture, {} tensors, {:.1} MB) in {:.1}s",
        a.output.display(),
        r.arch,
        r.tensors,
        r.bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    println!("{}", a.output.display());
    Ok(())
}
