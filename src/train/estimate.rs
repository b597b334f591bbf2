//! Planned memory of a training run, from the model's `config.json` and the run's
//! settings alone: no weights, no data.
//!
//! `lit-claire pretrain --dry-run` prints it; `pretrain` on a GPU compares it with
//! the device's free memory before loading anything. The training engine keeps
//! exactly these buffers, so the formulas below are the plan, not a guess.
//!
//! Shapes: N = micro_batch · T tokens per micro-batch, C hidden size, I MLP width,
//! nh / nkv query and key/value heads, hs head size, L blocks, V vocabulary, r LoRA
//! rank; p bytes per parameter (the precision's parameter dtype), e bytes per
//! activation (its compute dtype), f32 = 4; W ranks (devices × nodes).
//!
//! ```text
//! params       p · (every base parameter, a tied head once, + LoRA A and B
//!                   + the trained rows of new tokens, held apart: n · C, twice untied)
//! grads        p · trainable parameters (LoRA: A and B, and the embeddings and head
//!              --train-embeddings trains: n · C per matrix for `new`, V · C for `all`;
//!              full: all), one flat buffer
//! optimizer    p · 2 · trainable (AdamW's two moments), ÷ W with --strategy zero1
//! activations  what one block saves for its backward:
//!                e · N · ( C             x, the block input
//!                        + C             first norm's output
//!                        + (nh+2nkv)·hs  q, k, v after rotary
//!                        + nh·hs         attention output
//!                        + C             h, only in the sequential residual layout
//!                        + C             second norm's output, when the block has one
//!                        + I | 2·I       MLP pre-activation(s): 2 when gated (SwiGLU)
//!                        + r · (LoRA-adapted linears of the block)
//!                        + in · (each LoRA-adapted linear, when --lora-dropout > 0:
//!                                the dropped-out input its A reads) )
//!              + f32 · 2 · micro_batch · nh · T          attention statistics
//!              × L blocks. With --activation-checkpointing k, a block i with
//!              i % k == 0 keeps only x and its attention output with the statistics
//!              (e·N·(C + nh·hs) + f32·2·micro_batch·nh·T: the recomputation skips
//!              the attention itself), and the backward brings one checkpointed
//!              block's full set back (one more full block).
//! workspace    e · N · (2C + 2I + (nh+2nkv)·hs)   one block's backward transients
//!              + e · N · C                        final norm output
//!              + f32 · 2 · rows · V               one chunk of logits and their gradient,
//!                                                 rows = head_chunk_rows(V, N) (the fused
//!                                                 CPU kernel writes the gradient over the
//!                                                 logits: one of the two; other devices
//!                                                 hold both)
//!              + e · N · C                        embedding output
//!              + e · N · C                        the head's dropped-out LoRA input
//!                                                 (LoRA on the head, --lora-dropout > 0)
//!              + f32 · 14 · micro_batch · nh · T²  off the flash kernel only: see below
//! validation   the scoring pass at each --eval-interval and at the end, after a step's
//!              activations and workspace are freed (so the run needs the larger of
//!              the two, on top of parameters, gradients and optimizer state):
//!                one block's forward at a time, nothing kept across blocks:
//!                e · N · (per-token set of a block above, without dropout's copies)
//!                + f32 · 2 · micro_batch · nh · T
//!              + e · N · C                        the next block's input
//!              + e · N · C                        final norm output
//!              + f32 · rows · V                   one chunk of logits
//!              + f32 · 3 · micro_batch · nh · T²  off the flash kernel only (scores,
//!                                                 probabilities and an f32 copy)
//! ```
//!
//! The flash kernels (the CPU's in f32, CUDA's in every precision for heads up to 128
//! wide) never hold the `(T, T)` scores. Everywhere else (a CPU run in bf16, heads wider
//! than 128 on CUDA, `LIT_CLAIRE_ATTENTION=plain`) attention is the plain composition,
//! and one block's backward
//! differentiates it with candle's autograd: scores, probabilities, their f32 copies
//! and gradients, all `(micro_batch, nh, T, T)`, are live at once. Measured on the CPU
//! with the plain kernels (`attention_bench plain`, 9 heads): 505 MB at T = 1024 and
//! 1968 MB at 2048, 53–54 bytes per score; counted as 14 f32 (56 bytes), an upper
//! bound in bf16 (the scores and probabilities are then half as wide).
//!
//! The LoRA dropout copies are the engine's (`src/model/engine/layers.rs`: a LoRA
//! layer with dropout keeps its masked input for A's gradient); for the Falcon-7B LoRA
//! recipe (dropout 0.05, every target) they nearly double the activations.
//!
//! Not counted: the allocator's and runtime's own overhead (on CPU, the process, its
//! threads and the memory-mapped data; on CUDA, the context and cuBLAS workspace,
//! which exist before the free memory is measured), and the batch's token ids.

use std::path::Path;

use crate::config::{Config, MlpKind, QkvLayout, Residual, load_config};
use crate::error::{Error, Result};
use crate::lora::LoraConfig;
use crate::strategy::{DeviceSpec, StrategyKind};

use super::TrainConfig;

/// Rows of the output head computed at once, `N` in equal chunks of at most
/// `max(64, 2^25 / V)` rows: the engine's own definition, so that the plan follows it.
pub use crate::model::engine::head_chunk_rows;

const F32: u64 = 4;
const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// Bytes the training engine plans for, by part.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryEstimate {
    /// Base weights and LoRA matrices.
    pub params: u64,
    /// Gradients of the trainable parameters.
    pub grads: u64,
    /// AdamW's moments (this rank's share).
    pub optimizer: u64,
    /// What the forward saves for the backward.
    pub activations: u64,
    /// Transient buffers of the backward and the head.
    pub workspace: u64,
    /// The validation pass's transients (held when activations and workspace are not).
    pub validation: u64,
    /// Parameters, gradients and optimizer state plus the larger of training's
    /// activations and workspace and validation's transients.
    pub total: u64,
    /// What the numbers assume, in one line.
    pub assumed: String,
}

/// Parameter counts of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    /// Every base parameter, a tied head once ([`Config::num_params`]).
    pub base: u64,
    /// LoRA A and B matrices (0 without LoRA).
    pub lora: u64,
    /// Embedding and head parameters a LoRA run trains (`--train-embeddings`).
    pub embeddings: u64,
    /// Trained rows held apart from the matrices (`--train-embeddings new`).
    pub rows: u64,
    /// Parameters that get a gradient and optimizer state.
    pub trainable: u64,
}

impl ParamCounts {
    pub fn of(model: &Config, lora: Option<&LoraConfig>) -> Self {
        let base = model.num_params() as u64;
        let lora_n = lora.map_or(0, |l| lora_params(model, l));
        ParamCounts {
            base,
            lora: lora_n,
            embeddings: 0,
            rows: 0,
            trainable: if lora.is_some() { lora_n } else { base },
        }
    }

    /// With `(trained, rows)` embedding parameters as
    /// [`super::embeddings::trained_params`] counts them (LoRA only).
    pub fn with_embeddings(self, (trained, rows): (u64, u64)) -> Self {
        ParamCounts {
            embeddings: trained,
            rows,
            trainable: self.trainable + trained,
            ..self
        }
    }
}

/// `(in, out)` of every linear layer of one block that `lora` adapts, as
/// [`crate::lora::attach_new`] attaches them (a fused query/key/value layer gets one
/// adapter when any of the three is targeted).
fn adapted_block_linears(model: &Config, lora: &LoraConfig) -> Vec<(usize, usize)> {
    let (c, hs, i) = (model.hidden_size, model.head_dim, model.intermediate_size);
    let t = lora.targets;
    let mut v = Vec::new();
    match model.qkv_layout {
        QkvLayout::Separate => {
            let widths = [
                (t.query, model.n_head),
                (t.key, model.n_kv_head),
                (t.value, model.n_kv_head),
            ];
            v.extend(widths.iter().filter(|w| w.0).map(|w| (c, w.1 * hs)));
        }
        QkvLayout::FusedBlocked | QkvLayout::FusedGrouped => {
            if t.query || t.key || t.value {
                v.push((c, model.qkv_width()));
            }
        }
    }
    if t.projection {
        v.push((model.n_head * hs, c));
    }
    if t.mlp {
        v.push((c, i));
        if model.mlp == MlpKind::Gated {
            v.push((c, i));
        }
        v.push((i, c));
    }
    v
}

/// LoRA parameters: `r · (in + out)` per adapted linear, the head's included.
pub fn lora_params(model: &Config, lora: &LoraConfig) -> u64 {
    let per = |(n_in, n_out): (usize, usize)| (lora.r * (n_in + n_out)) as u64;
    let block: u64 = adapted_block_linears(model, lora)
        .into_iter()
        .map(per)
        .sum();
    let head = if lora.targets.head {
        per((model.hidden_size, model.vocab_size))
    } else {
        0
    };
    model.n_layer as u64 * block + head
}

/// The memory `cfg` plans for on `model` with `seq_len` tokens per sample.
pub fn estimate(model: &Config, cfg: &TrainConfig, seq_len: usize) -> MemoryEstimate {
    let lora = cfg.lora();
    let embeddings = super::embeddings::trained_params(
        cfg,
        model.vocab_size,
        model.hidden_size,
        model.tie_embeddings,
    );
    let counts = ParamCounts::of(model, lora.as_ref()).with_embeddings(embeddings);
    let p = cfg.precision.param_dtype().size_in_bytes() as u64;
    let e = cfg.precision.compute_dtype().size_in_bytes() as u64;
    let world = cfg.world_size().max(1) as u64;

    let params = p * (counts.base + counts.lora + counts.rows);
    let grads = p * counts.trainable;
    let shards = if cfg.strategy == StrategyKind::Zero1 {
        world
    } else {
        1
    };
    let optimizer = (p * 2 * counts.trainable).div_ceil(shards);

    let (mb, t) = (cfg.micro_batch_size as u64, seq_len as u64);
    let n = mb * t;
    let (c, i) = (model.hidden_size as u64, model.intermediate_size as u64);
    let (nh, nkv, hs) = (
        model.n_head as u64,
        model.n_kv_head as u64,
        model.head_dim as u64,
    );
    let qkv = (nh + 2 * nkv) * hs;
    let sequential = model.residual == Residual::Sequential;
    let second_norm = !(model.residual == Residual::Parallel && model.shared_attention_norm);
    let mlp = match model.mlp {
        MlpKind::Gated => 2 * i,
        MlpKind::Plain => i,
    };
    let adapted = lora
        .as_ref()
        .map_or(Vec::new(), |l| adapted_block_linears(model, l));
    let lora_linears = adapted.len() as u64;
    let r = lora.as_ref().map_or(0, |l| l.r) as u64;
    let dropout = lora.as_ref().is_some_and(|l| l.dropout > 0.0);
    let dropped_inputs: u64 = if dropout {
        adapted.iter().map(|&(n_in, _)| n_in as u64).sum()
    } else {
        0
    };
    let per_token = c
        + c
        + qkv
        + nh * hs
        + if sequential { c } else { 0 }
        + if second_norm { c } else { 0 }
        + mlp
        + r * lora_linears
        + dropped_inputs;
    let full_block = e * n * per_token + F32 * 2 * mb * nh * t;
    let input_only = e * n * (c + nh * hs) + F32 * 2 * mb * nh * t;
    let layers = model.n_layer as u64;
    let k = cfg.activation_checkpointing as u64;
    let activations = if k == 0 {
        layers * full_block
    } else {
        let checkpointed = (0..layers).filter(|b| b % k == 0).count() as u64;
        checkpointed * input_only + (layers - checkpointed) * full_block + full_block
    };

    let vocab = model.vocab_size;
    let rows = head_chunk_rows(vocab, n as usize) as u64;
    let head_dropped = lora.as_ref().is_some_and(|l| l.targets.head && dropout);
    let workspace = e * n * (2 * c + 2 * i + qkv)
        + e * n * c
        + F32 * 2 * rows * vocab as u64
        + e * n * c
        + if head_dropped { e * n * c } else { 0 }
        + plain_attention_bytes(cfg, model, seq_len);
    let plain_scores = if uses_flash_kernel(cfg, model) {
        0
    } else {
        F32 * 3 * mb * nh * t * t
    };
    // No dropout in validation: no masked copies of the adapted inputs.
    let validation = e * n * (per_token - dropped_inputs)
        + F32 * 2 * mb * nh * t
        + 2 * e * n * c
        + F32 * rows * vocab as u64
        + plain_scores;

    let total = params + grads + optimizer + (activations + workspace).max(validation);
    MemoryEstimate {
        params,
        grads,
        optimizer,
        activations,
        workspace,
        validation,
        total,
        assumed: assumptions(cfg, model, &counts, lora.as_ref(), seq_len, rows),
    }
}

/// Bytes of generation's KV cache after `tokens` tokens of `batch` rows went through
/// a model computing in a dtype of `elem` bytes: per layer, keys and values of
/// `nkv · hs` per token, all of them for a global layer, the last `w − 1` for a layer
/// with a sliding window of `w` (what a later query can still see).
pub fn kv_cache_bytes(model: &Config, elem: usize, batch: usize, tokens: usize) -> u64 {
    let per_token = (2 * batch * model.n_kv_head * model.head_dim * elem) as u64;
    model
        .windows
        .iter()
        .map(|w| match w {
            crate::config::AttentionWindow::Global => tokens,
            crate::config::AttentionWindow::Sliding(w) => tokens.min(w.saturating_sub(1)),
        })
        .map(|kept| kept as u64 * per_token)
        .sum()
}

/// Whether attention runs on a flash kernel, which never holds the `(T, T)` scores: on
/// the CPU in f32, on CUDA in every precision for heads up to 128 wide (see
/// [`crate::model::fused::flash_serves_run`]).
pub fn uses_flash_kernel(cfg: &TrainConfig, model: &Config) -> bool {
    crate::model::fused::flash_serves_run(
        cfg.device != DeviceSpec::Cpu,
        cfg.precision.compute_dtype(),
        model.head_dim,
    )
}

/// One block's plain attention in its backward, off the flash kernel (module docs):
/// 14 f32 per score of `(micro_batch, nh, T, T)`; 0 on the flash kernel.
fn plain_attention_bytes(cfg: &TrainConfig, model: &Config, seq_len: usize) -> u64 {
    if uses_flash_kernel(cfg, model) {
        return 0;
    }
    let t = seq_len as u64;
    F32 * 14 * cfg.micro_batch_size as u64 * model.n_head as u64 * t * t
}

fn assumptions(
    cfg: &TrainConfig,
    model: &Config,
    counts: &ParamCounts,
    lora: Option<&LoraConfig>,
    seq_len: usize,
    rows: u64,
) -> String {
    let embeddings = match (counts.embeddings, counts.rows) {
        (0, _) => String::new(),
        (n, 0) => format!(" and {} of the embeddings and head", grouped(n)),
        (n, _) => format!(" and {} in the rows of new tokens", grouped(n)),
    };
    let what = match lora {
        Some(l) => format!(
            "LoRA r{} ({} base + {} adapter parameters, only the adapter{embeddings} trained; {})",
            l.r,
            grouped(counts.base),
            grouped(counts.lora),
            if l.dropout > 0.0 {
                "dropout keeps a masked copy of each adapted input"
            } else {
                "no dropout"
            }
        ),
        None => format!("full fine-tuning ({} parameters)", grouped(counts.base)),
    };
    let ckpt = match cfg.activation_checkpointing {
        0 => "no activation checkpointing".to_string(),
        1 => "activation checkpointing of every block".to_string(),
        k => format!("activation checkpointing of every {k}-th block"),
    };
    let world = cfg.world_size();
    let ranks = if world == 1 {
        "1 rank".to_string()
    } else if cfg.strategy == StrategyKind::Zero1 {
        format!("{world} ranks, optimizer state sharded (zero1)")
    } else {
        format!("{world} ranks, each with the whole optimizer state (ddp)")
    };
    let runtime = match cfg.device {
        DeviceSpec::Cpu => "on CPU nothing is added for the process and its allocator",
        DeviceSpec::Cuda(_) => {
            "the CUDA context and cuBLAS workspace are not counted (they exist before free memory is measured)"
        }
    };
    let attention = if uses_flash_kernel(cfg, model) {
        "attention by the flash kernel (no (T, T) scores kept)".to_string()
    } else {
        format!(
            "attention without a flash kernel (the CPU one takes f32, the CUDA one heads up to 128 wide): one block's (T, T) scores and their gradients in the workspace, {}",
            human(plain_attention_bytes(cfg, model, seq_len))
        )
    };
    format!(
        "assumes {what}; micro-batch {} × {seq_len} tokens; {} (parameters {:?}, activations {:?}); AdamW; {ckpt}; head in chunks of {rows} rows; {attention}; {ranks}; {runtime}",
        cfg.micro_batch_size,
        cfg.precision,
        cfg.precision.param_dtype(),
        cfg.precision.compute_dtype(),
    )
}

/// `1234567` as `1,234,567`.
fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Bytes in GiB from 1 GiB up, else in MiB.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else {
        format!("{:.1} MiB", b / MIB)
    }
}

/// Estimates side by side, one column per `(heading, estimate)`, one line per part,
/// then the first one's assumptions.
pub fn table(columns: &[(&str, &MemoryEstimate)]) -> String {
    const LABEL: usize = 16;
    let widths: Vec<usize> = columns.iter().map(|(h, _)| h.len().max(10)).collect();
    let mut out = String::new();
    if columns.iter().any(|(h, _)| !h.is_empty()) {
        out.push_str(&format!("{:LABEL$}", ""));
        for ((h, _), width) in columns.iter().zip(&widths) {
            out.push_str(&format!("  {h:>width$}"));
        }
        out.push('\n');
    }
    type Part = fn(&MemoryEstimate) -> u64;
    let parts: [(&str, Part); 7] = [
        ("parameters", |m| m.params),
        ("gradients", |m| m.grads),
        ("optimizer state", |m| m.optimizer),
        ("activations", |m| m.activations),
        ("workspace", |m| m.workspace),
        ("validation", |m| m.validation),
        ("total", |m| m.total),
    ];
    for (label, part) in parts {
        out.push_str(&format!("{label:LABEL$}"));
        for ((_, m), width) in columns.iter().zip(&widths) {
            out.push_str(&format!("  {:>width$}", human(part(m))));
        }
        out.push('\n');
    }
    if let Some((_, m)) = columns.first() {
        out.push_str(&m.assumed);
    }
    out
}

impl std::fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&table(&[("", self)]))
    }
}

/// Tokens per sample of `cfg`'s run before the data is loaded: the prepared data's
/// (`DATA/metadata.json`'s `max_length`) when `--data-dir` holds it, else the model's
/// context. Returns the length and where it comes from.
pub fn planned_seq_len(cfg: &TrainConfig, model: &Config) -> Result<(usize, String)> {
    use crate::data::metadata::{METADATA_FILE, Metadata};
    let path = cfg.data_dir.join(METADATA_FILE);
    if cfg.data_dir.as_os_str().is_empty() || !path.is_file() {
        return Ok((
            model.block_size,
            "the model's context (config.json): no prepared data at --data-dir".into(),
        ));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let meta: Metadata = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(&path, format!("not prepare-data metadata: {e}")))?;
    Ok((meta.max_length, format!("{}", path.display())))
}

/// `checkpoint_dir/config.json`, or one line saying how to get it.
fn model_config(dir: &Path) -> Result<Config> {
    let path = dir.join("config.json");
    if path.is_file() {
        return load_config(dir);
    }
    // checkpoints/ORG/NAME is where `download` puts ORG/NAME.
    let parts: Vec<_> = dir
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let repo = match parts.as_slice() {
        [.., c, org, name] if c == "checkpoints" => format!("{org}/{name}"),
        _ => "ORG/NAME".to_string(),
    };
    Err(Error::missing(
        &path,
        format!(
            "--dry-run reads only the model's config.json; fetch the model with `lit-claire download --repo-id {repo}` or point --checkpoint-dir at a Hugging Face folder"
        ),
    ))
}

/// What `pretrain --dry-run` prints: the plan of `cfg` (and, when it does not
/// checkpoint activations, the same with `--activation-checkpointing 1`), from
/// `config.json` and, if any, the prepared data's `metadata.json` and the model's
/// `vocab_adaptation.json`; nothing else is read or written. On a CUDA device of a
/// CUDA build, also whether it fits the free memory now.
pub fn dry_run(cfg: &TrainConfig) -> Result<String> {
    let model = model_config(&cfg.checkpoint_dir)?;
    let (seq_len, from) = planned_seq_len(cfg, &model)?;
    // A --train-embeddings the model cannot have is refused here as in the run.
    super::embeddings::plan(cfg, None)?;
    let given = estimate(&model, cfg, seq_len);
    let mut out = format!(
        "memory plan of {} ({} on {}), {seq_len} tokens per sample from {from}\n",
        cfg.checkpoint_dir.display(),
        model.family.model_type(),
        cfg.device
    );
    if cfg.activation_checkpointing == 0 {
        let mut ckpt = cfg.clone();
        ckpt.activation_checkpointing = 1;
        let with = estimate(&model, &ckpt, seq_len);
        out.push_str(&table(&[
            ("as given", &given),
            ("--activation-checkpointing 1", &with),
        ]));
    } else {
        out.push_str(&table(&[("as given", &given)]));
    }
    if let DeviceSpec::Cuda(_) = cfg.device {
        out.push('\n');
        out.push_str(&match device_free(cfg)? {
            Some(free) => does_not_fit(&model, cfg, seq_len, free)
                .unwrap_or_else(|| format!("{}: fits, {} free now", cfg.device, human(free))),
            None => format!(
                "{}: free memory not checked, this lit-claire was built without CUDA",
                cfg.device
            ),
        });
    }
    Ok(out)
}

/// Free memory of `cfg`'s CUDA device now (None without the `cuda` feature).
#[cfg(feature = "cuda")]
fn device_free(cfg: &TrainConfig) -> Result<Option<u64>> {
    free_memory(&crate::strategy::Strategy::new(cfg.device, cfg.precision)?.device)
}

#[cfg(not(feature = "cuda"))]
fn device_free(_cfg: &TrainConfig) -> Result<Option<u64>> {
    Ok(None)
}

/// Free memory of `device` in bytes now; None on CPU (the estimate is not checked
/// there: the operating system pages rather than refuses).
#[cfg(feature = "cuda")]
pub fn free_memory(device: &candle_core::Device) -> Result<Option<u64>> {
    match device {
        candle_core::Device::Cuda(d) => {
            let (free, _total) = d
                .cuda_stream()
                .context()
                .mem_get_info()
                .map_err(|e| Error::Msg(format!("free GPU memory: {e}")))?;
            Ok(Some(free as u64))
        }
        _ => Ok(None),
    }
}

/// Free memory of `device` in bytes now; None on CPU (the estimate is not checked
/// there: the operating system pages rather than refuses).
#[cfg(not(feature = "cuda"))]
pub fn free_memory(_device: &candle_core::Device) -> Result<Option<u64>> {
    Ok(None)
}

/// None when `cfg` fits in `free` bytes; otherwise one line saying so, with the
/// micro-batch size (a divisor of the batch size) and/or `--activation-checkpointing
/// 1` that would fit.
pub fn does_not_fit(
    model: &Config,
    cfg: &TrainConfig,
    seq_len: usize,
    free: u64,
) -> Option<String> {
    let need = estimate(model, cfg, seq_len);
    if need.total <= free {
        return None;
    }
    let with = |micro: usize, ckpt: usize| {
        let mut c = cfg.clone();
        c.micro_batch_size = micro;
        c.activation_checkpointing = ckpt;
        estimate(model, &c, seq_len).total
    };
    // Micro-batch sizes the batch size allows, largest first.
    let smaller: Vec<usize> = (1..cfg.micro_batch_size)
        .rev()
        .filter(|m| cfg.batch_size % m == 0)
        .collect();
    let ckpt = cfg.activation_checkpointing;
    let mut fixes = Vec::new();
    if let Some(&m) = smaller.iter().find(|&&m| with(m, ckpt) <= free) {
        fixes.push(format!("--micro-batch-size {m} ({})", human(with(m, ckpt))));
    }
    if ckpt != 1 {
        let full = with(cfg.micro_batch_size, 1);
        if full <= free {
            fixes.push(format!("--activation-checkpointing 1 ({})", human(full)));
        } else if let Some(&m) = smaller.iter().find(|&&m| with(m, 1) <= free) {
            fixes.push(format!(
                "--micro-batch-size {m} --activation-checkpointing 1 ({})",
                human(with(m, 1))
            ));
        }
    }
    let parts = format!(
        "parameters {}, gradients {}, optimizer {}, activations {}, workspace {}",
        human(need.params),
        human(need.grads),
        human(need.optimizer),
        human(need.activations),
        human(need.workspace)
    );
    let advice = if fixes.is_empty() {
        format!(
            "even --micro-batch-size 1 --activation-checkpointing 1 needs {}: train LoRA (--lora-r 16), shard the optimizer state (--strategy zero1 over more --devices) or use a larger device",
            human(with(1, 1))
        )
    } else {
        format!("{} would fit", fixes.join(" or "))
    };
    Some(format!(
        "{}: the run needs about {} ({parts}) but {} is free; {advice} (`pretrain --dry-run` prints the plan)",
        cfg.device,
        human(need.total),
        human(free)
    ))
}

/// Refuse a run that will not fit its device, before any weights load: on a CUDA
/// device, the estimate against the free memory now. Nothing on CPU.
pub fn check_device_memory(
    model: &Config,
    cfg: &TrainConfig,
    seq_len: usize,
    device: &candle_core::Device,
) -> Result<()> {
    match free_memory(device)? {
        Some(free) => match does_not_fit(model, cfg, seq_len, free) {
            Some(why) => Err(Error::Usage(why)),
            None => Ok(()),
        },
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
