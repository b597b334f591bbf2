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
//! optimizer    p · 2 · trainable (AdamW's two moments)
//!
//! zero1        optimizer: f32 · 2 · trainable ÷ W (the shards' moments are f32)
//! fsdp         params:    p · (base + LoRA + rows) ÷ W  this rank's shards
//!                         + p · (outer + one block)    gathered: the embeddings, final
//!                                                      norm and head (and the trained
//!                                                      rows of new tokens) through the
//!                                                      pass, one block at a time
//!              grads:     f32 · trainable ÷ W          the gradient shards
//!                         + p · (outer + one block)'s trainable  their gradient buffers
//!                                                      (the outer unit's: the head's
//!                                                      LoRA and the trained embeddings)
//!                         + f32 · the larger of the two          the flat copy reduced
//!                         + f32 · one block's trainable (GPUs)  the previous block's,
//!                                                      its reduce-scatter in flight
//!              optimizer: f32 · 2 · trainable ÷ W
//!              (W = 1: as ddp, which one rank runs)
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

/// Bytes the training engine plans for, by part: each part is one rank's.
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
    /// Ranks that hold these parts in the same memory: the thread ranks of a CPU run
    /// (`--device cpu --devices N`: one process, each rank with its own copy of every
    /// part), 1 on GPUs (each rank its own device).
    pub ranks: u64,
    /// Parameters, gradients and optimizer state plus the larger of training's
    /// activations and workspace and validation's transients, times `ranks`.
    pub total: u64,
    /// What the numbers assume, in one line.
    pub assumed: String,
}

/// A byte count in checked arithmetic: `None` once it would overflow (a shape no
/// machine holds), carried through every sum and product of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Bytes(Option<u128>);

impl Bytes {
    fn of(n: usize) -> Self {
        Bytes(Some(n as u128))
    }

    fn max(self, other: Bytes) -> Bytes {
        match (self.0, other.0) {
            (Some(a), Some(b)) => Bytes(Some(a.max(b))),
            _ => Bytes(None),
        }
    }

    /// The count as `u64`, or `None` past it.
    fn get(self) -> Option<u64> {
        self.0.and_then(|n| u64::try_from(n).ok())
    }
}

impl std::ops::Add for Bytes {
    type Output = Bytes;
    fn add(self, o: Bytes) -> Bytes {
        Bytes(self.0.zip(o.0).and_then(|(a, b)| a.checked_add(b)))
    }
}

impl std::ops::Mul for Bytes {
    type Output = Bytes;
    fn mul(self, o: Bytes) -> Bytes {
        Bytes(self.0.zip(o.0).and_then(|(a, b)| a.checked_mul(b)))
    }
}

impl std::iter::Sum for Bytes {
    fn sum<I: Iterator<Item = Bytes>>(iter: I) -> Bytes {
        iter.fold(Bytes::of(0), |a, b| a + b)
    }
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
    /// The counts, saturating at `u64::MAX` ([`ParamCounts::checked`] says when).
    pub fn of(model: &Config, lora: Option<&LoraConfig>) -> Self {
        let sat = |b: Bytes| b.get().unwrap_or(u64::MAX);
        let (base, lora_n) = Self::counts(model, lora);
        let (base, lora_n) = (sat(base), sat(lora_n));
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
            trainable: self.trainable.saturating_add(trained),
            ..self
        }
    }

    /// The counts, or `None` when one does not fit a `u64`.
    pub fn checked(model: &Config, lora: Option<&LoraConfig>) -> Option<Self> {
        let (base, lora_n) = Self::counts(model, lora);
        let (base, lora_n) = (base.get()?, lora_n.get()?);
        Some(ParamCounts {
            base,
            lora: lora_n,
            embeddings: 0,
            rows: 0,
            trainable: if lora.is_some() { lora_n } else { base },
        })
    }

    fn counts(model: &Config, lora: Option<&LoraConfig>) -> (Bytes, Bytes) {
        let base = Bytes(model.param_count());
        let lora_n = lora.map_or(Bytes::of(0), |l| lora_count(model, l));
        (base, lora_n)
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

/// LoRA parameters: `r · (in + out)` per adapted linear, the head's included
/// (saturating at `u64::MAX`).
pub fn lora_params(model: &Config, lora: &LoraConfig) -> u64 {
    lora_count(model, lora).get().unwrap_or(u64::MAX)
}

fn lora_count(model: &Config, lora: &LoraConfig) -> Bytes {
    let r = Bytes::of(lora.r);
    let per = |(n_in, n_out): (usize, usize)| r * (Bytes::of(n_in) + Bytes::of(n_out));
    let block: Bytes = adapted_block_linears(model, lora)
        .into_iter()
        .map(per)
        .sum();
    let head = if lora.targets.head {
        per((model.hidden_size, model.vocab_size))
    } else {
        Bytes::of(0)
    };
    Bytes::of(model.n_layer) * block + head
}

/// Parameters of one block, and of everything outside the blocks (embeddings, learned
/// positions, final norm, an untied head), base and LoRA: `(block base, block LoRA,
/// outer base, outer LoRA)`.
fn unit_counts(model: &Config, lora: Option<&LoraConfig>) -> (Bytes, Bytes, Bytes, Bytes) {
    let b = Bytes::of;
    let total = Bytes(model.param_count());
    let mut bare = model.clone();
    bare.n_layer = 0;
    let outer = Bytes(bare.param_count());
    let block = match (total.0, outer.0) {
        (Some(t), Some(o)) if model.n_layer > 0 => Bytes(Some((t - o) / model.n_layer as u128)),
        (Some(_), Some(_)) => b(0),
        _ => Bytes(None),
    };
    let (block_lora, head_lora) = match lora {
        None => (b(0), b(0)),
        Some(l) => {
            let per = |(n_in, n_out): (usize, usize)| b(l.r) * (b(n_in) + b(n_out));
            let blk = adapted_block_linears(model, l).into_iter().map(per).sum();
            let head = if l.targets.head {
                per((model.hidden_size, model.vocab_size))
            } else {
                b(0)
            };
            (blk, head)
        }
    };
    (block, block_lora, outer, head_lora)
}

/// One rank's parameters, gradients and optimizer state under `cfg.strategy` (module
/// docs): `(params, grads, optimizer)`.
fn sharded_parts(
    model: &Config,
    cfg: &TrainConfig,
    lora: Option<&LoraConfig>,
    (trained_rows, rows_apart): (u64, u64),
) -> (Bytes, Bytes, Bytes) {
    let b = Bytes::of;
    let (base, lora_n) = ParamCounts::counts(model, lora);
    // The rows of new tokens --train-embeddings trains (LoRA runs): trained, and held
    // apart from the matrices.
    let (trained_rows, rows_apart) = (
        Bytes(Some(u128::from(trained_rows))),
        Bytes(Some(u128::from(rows_apart))),
    );
    let trainable = if lora.is_some() {
        lora_n + trained_rows
    } else {
        base
    };
    let p = b(cfg.precision.param_dtype().size_in_bytes());
    let f32 = b(F32 as usize);
    let world = cfg.devices.saturating_mul(cfg.num_nodes).max(1);
    let shard = |x: Bytes| Bytes(x.0.map(|a| a.div_ceil(world as u128)));
    // One rank: zero1 keeps its state whole; fsdp runs its sharded code all the same.
    let kind = if world == 1 && cfg.strategy == StrategyKind::Zero1 {
        StrategyKind::Ddp
    } else {
        cfg.strategy
    };
    match kind {
        StrategyKind::Ddp => {
            // On several ranks each block's gradients are summed as its backward ends
            // (`overlap.rs`): a block's sums (flat f32 buckets) wait until the next
            // block's are queued, so two blocks' are held; on a GPU their flat inputs
            // too, read by NCCL's side stream until then.
            let in_flight = if world > 1 {
                let (block, block_lora, _, _) = unit_counts(model, lora);
                let block_trained = if lora.is_some() { block_lora } else { block };
                let copies = match cfg.device {
                    DeviceSpec::Cuda(_) => 4,
                    DeviceSpec::Cpu => 2,
                };
                f32 * b(copies) * block_trained
            } else {
                b(0)
            };
            (
                p * (base + lora_n + rows_apart),
                p * trainable + in_flight,
                p * b(2) * trainable,
            )
        }
        StrategyKind::Zero1 => (
            p * (base + lora_n + rows_apart),
            p * trainable,
            shard(f32 * b(2) * trainable),
        ),
        StrategyKind::Fsdp => {
            let (block, block_lora, outer, head_lora) = unit_counts(model, lora);
            // The embeddings a LoRA run trains are the outer unit's: its gradient
            // buffers hold them, and the rows of new tokens are gathered with it.
            let (block_trained, outer_trained) = match lora {
                Some(_) => (block_lora, head_lora + trained_rows),
                None => (block, outer),
            };
            let gathered = outer + head_lora + rows_apart + block + block_lora;
            // On GPUs a block's flat copy stays until the next block's is made: its
            // reduce-scatter runs on NCCL's side stream meanwhile.
            let in_flight = match cfg.device {
                DeviceSpec::Cuda(_) => f32 * block_trained,
                DeviceSpec::Cpu => b(0),
            };
            (
                shard(p * (base + lora_n + rows_apart)) + p * gathered,
                shard(f32 * trainable)
                    + p * (outer_trained + block_trained)
                    + f32 * outer_trained.max(block_trained)
                    + in_flight,
                shard(f32 * b(2) * trainable),
            )
        }
    }
}

/// Ranks whose parts share one memory: the thread ranks of a CPU run, one process
/// for all of them; 1 on GPUs, where each rank has its own device.
pub fn ranks_sharing_memory(cfg: &TrainConfig) -> u64 {
    match cfg.device {
        DeviceSpec::Cpu => cfg.devices.saturating_mul(cfg.num_nodes).max(1) as u64,
        DeviceSpec::Cuda(_) => 1,
    }
}

/// The memory `cfg` plans for on `model` with `seq_len` tokens per sample. Fails,
/// naming the sizes, on a plan past 2^64 bytes (counted without overflow): no machine
/// holds it.
pub fn estimate(model: &Config, cfg: &TrainConfig, seq_len: usize) -> Result<MemoryEstimate> {
    let lora = cfg.lora();
    let b = Bytes::of;
    let zero = b(0);
    let embeddings = super::embeddings::trained_params(
        cfg,
        model.vocab_size,
        model.hidden_size,
        model.tie_embeddings,
    );
    let e = b(cfg.precision.compute_dtype().size_in_bytes());
    let f32 = b(F32 as usize);

    let (params, grads, optimizer) = sharded_parts(model, cfg, lora.as_ref(), embeddings);
    let (mb, t) = (b(cfg.micro_batch_size), b(seq_len));
    let n = mb * t;
    let (c, i) = (b(model.hidden_size), b(model.intermediate_size));
    let (nh, nkv, hs) = (b(model.n_head), b(model.n_kv_head), b(model.head_dim));
    let qkv = (nh + b(2) * nkv) * hs;
    let sequential = model.residual == Residual::Sequential;
    let second_norm = !(model.residual == Residual::Parallel && model.shared_attention_norm);
    let mlp = match model.mlp {
        MlpKind::Gated => b(2) * i,
        MlpKind::Plain => i,
    };
    let adapted = lora
        .as_ref()
        .map_or(Vec::new(), |l| adapted_block_linears(model, l));
    let lora_linears = b(adapted.len());
    let r = b(lora.as_ref().map_or(0, |l| l.r));
    let dropout = lora.as_ref().is_some_and(|l| l.dropout > 0.0);
    let dropped_inputs: Bytes = if dropout {
        adapted.iter().map(|&(n_in, _)| b(n_in)).sum()
    } else {
        zero
    };
    let when = |yes: bool, x: Bytes| if yes { x } else { zero };
    let per_token_eval =
        c + c + qkv + nh * hs + when(sequential, c) + when(second_norm, c) + mlp + r * lora_linears;
    let per_token = per_token_eval + dropped_inputs;
    let stats = f32 * b(2) * mb * nh * t;
    let full_block = e * n * per_token + stats;
    let input_only = e * n * (c + nh * hs) + stats;
    let layers = model.n_layer;
    let k = cfg.activation_checkpointing;
    let activations = if k == 0 {
        b(layers) * full_block
    } else {
        // Blocks 0, k, 2k, ... below `layers`.
        let checkpointed = layers.div_ceil(k);
        b(checkpointed) * input_only + b(layers - checkpointed) * full_block + full_block
    };

    let vocab = b(model.vocab_size);
    // The engine's chunk of rows (at most the tokens, at most 2^25 / V rows or 64).
    let rows = b(match n.get().and_then(|n| usize::try_from(n).ok()) {
        Some(n) => head_chunk_rows(model.vocab_size, n),
        None => head_chunk_rows(model.vocab_size, usize::MAX),
    });
    let head_dropped = lora.as_ref().is_some_and(|l| l.targets.head && dropout);
    let plain = !uses_flash_kernel(cfg, model);
    let scores = mb * nh * t * t;
    let workspace = e * n * (b(2) * c + b(2) * i + qkv)
        + e * n * c
        + f32 * b(2) * rows * vocab
        + e * n * c
        + when(head_dropped, e * n * c)
        + when(plain, f32 * b(14) * scores);
    // No dropout in validation: no masked copies of the adapted inputs.
    let validation = e * n * per_token_eval
        + stats
        + b(2) * e * n * c
        + f32 * rows * vocab
        + when(plain, f32 * b(3) * scores);

    let ranks = ranks_sharing_memory(cfg);
    let per_rank = params + grads + optimizer + (activations + workspace).max(validation);
    let total = Bytes(Some(u128::from(ranks))) * per_rank;
    let parts = [
        ("parameters", params),
        ("gradients", grads),
        ("optimizer state", optimizer),
        ("activations", activations),
        ("workspace", workspace),
        ("validation", validation),
        ("total", total),
    ];
    if let Some((part, _)) = parts.iter().find(|(_, x)| x.get().is_none()) {
        return Err(Error::Usage(format!(
            "the memory plan's {part} alone is past 2^64 bytes (16 EiB), more than any machine holds: micro-batch {} × {seq_len} tokens per sample (--micro-batch-size, and the data's max_length or the model's max_position_embeddings), hidden size {}, {} layers, vocabulary {}{}{}",
            cfg.micro_batch_size,
            model.hidden_size,
            model.n_layer,
            model.vocab_size,
            lora.as_ref()
                .map_or(String::new(), |l| format!(", --lora-r {}", l.r)),
            if ranks > 1 {
                format!(", {ranks} CPU ranks (--devices)")
            } else {
                String::new()
            }
        )));
    }
    let get = |x: Bytes| x.get().unwrap_or(u64::MAX);
    let counts = ParamCounts::of(model, lora.as_ref()).with_embeddings(embeddings);
    Ok(MemoryEstimate {
        params: get(params),
        grads: get(grads),
        optimizer: get(optimizer),
        activations: get(activations),
        workspace: get(workspace),
        validation: get(validation),
        ranks,
        total: get(total),
        assumed: assumptions(cfg, model, &counts, lora.as_ref(), seq_len, get(rows)),
    })
}

/// Bytes of generation's KV cache after `tokens` tokens of `batch` rows went through
/// a model computing in a dtype of `elem` bytes: per layer, keys and values of
/// `nkv · hs` per token, all of them for a global layer, the last `w − 1` for a layer
/// with a sliding window of `w` (what a later query can still see).
/// Saturates at `u64::MAX` rather than wrapping.
pub fn kv_cache_bytes(model: &Config, elem: usize, batch: usize, tokens: usize) -> u64 {
    let b = Bytes::of;
    let per_token = b(2) * b(batch) * b(model.n_kv_head) * b(model.head_dim) * b(elem);
    model
        .windows
        .iter()
        .map(|w| match w {
            crate::config::AttentionWindow::Global => tokens,
            crate::config::AttentionWindow::Sliding(w) => tokens.min(w.saturating_sub(1)),
        })
        .map(|kept| b(kept) * per_token)
        .sum::<Bytes>()
        .get()
        .unwrap_or(u64::MAX)
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
    let (b, t) = (Bytes::of, Bytes::of(seq_len));
    (b(F32 as usize) * b(14) * b(cfg.micro_batch_size) * b(model.n_head) * t * t)
        .get()
        .unwrap_or(u64::MAX)
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
    let world = cfg.devices.saturating_mul(cfg.num_nodes);
    let mut ranks = if world == 1 && cfg.strategy == StrategyKind::Fsdp {
        "1 rank, fsdp (its sharded code, each shard the whole model: nothing saved)".to_string()
    } else if world == 1 {
        "1 rank".to_string()
    } else if cfg.strategy == StrategyKind::Zero1 {
        format!("{world} ranks, optimizer state sharded (zero1)")
    } else if cfg.strategy == StrategyKind::Fsdp {
        format!(
            "{world} ranks, parameters, gradients and optimizer state sharded (fsdp: each rank keeps 1/{world} of them, and gathers the embeddings and head for a pass and one block at a time)"
        )
    } else {
        format!("{world} ranks, each with the whole optimizer state (ddp)")
    };
    let sharing = ranks_sharing_memory(cfg);
    if sharing > 1 {
        ranks.push_str(&format!(
            "; on CPU the {sharing} ranks are threads of one process, each with its own copy of every part: the parts are one rank's, the total is {sharing} times their sum"
        ));
    }
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
    let mut out = part_rows(columns);
    if let Some((_, m)) = columns.first() {
        out.push_str(&m.assumed);
    }
    out
}

/// The heading (when a column has one) and one line per part of [`table`].
fn part_rows(columns: &[(&str, &MemoryEstimate)]) -> String {
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
    type Part = fn(&MemoryEstimate) -> String;
    let mut parts: Vec<(&str, Part)> = vec![
        ("parameters", |m| human(m.params)),
        ("gradients", |m| human(m.grads)),
        ("optimizer state", |m| human(m.optimizer)),
        ("activations", |m| human(m.activations)),
        ("workspace", |m| human(m.workspace)),
        ("validation", |m| human(m.validation)),
    ];
    // CPU thread ranks: the parts above are one rank's, the total counts every rank.
    if columns.iter().any(|(_, m)| m.ranks > 1) {
        parts.push(("ranks (threads)", |m| format!("× {}", m.ranks)));
    }
    parts.push(("total", |m| human(m.total)));
    for (label, part) in parts {
        out.push_str(&format!("{label:LABEL$}"));
        for ((_, m), width) in columns.iter().zip(&widths) {
            out.push_str(&format!("  {:>width$}", part(m)));
        }
        out.push('\n');
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
    dry_run_on(cfg, None)
}

/// [`dry_run`], and for a run of several ranks the plan of one rank under each
/// `--strategy`, naming the least sharded that fits `device_memory` bytes per device
/// (or, on a CUDA device of a CUDA build, its free memory now).
pub fn dry_run_on(cfg: &TrainConfig, device_memory: Option<u64>) -> Result<String> {
    let model = model_config(&cfg.checkpoint_dir)?;
    let (seq_len, from) = planned_seq_len(cfg, &model)?;
    // A --train-embeddings the model cannot have is refused here as in the run.
    super::embeddings::plan(cfg, None)?;
    let planned = |c: &TrainConfig| {
        estimate(&model, c, seq_len).map_err(|e| match e {
            Error::Usage(m) => Error::Usage(format!(
                "{}: {m}; the {seq_len} tokens per sample come from {from}",
                cfg.checkpoint_dir.join("config.json").display()
            )),
            other => other,
        })
    };
    let given = planned(cfg)?;
    let mut out = format!(
        "memory plan of {} ({} on {}), {seq_len} tokens per sample from {from}\n",
        cfg.checkpoint_dir.display(),
        model.family.model_type(),
        cfg.device
    );
    if cfg.activation_checkpointing == 0 {
        let mut ckpt = cfg.clone();
        ckpt.activation_checkpointing = 1;
        let with = planned(&ckpt)?;
        out.push_str(&table(&[
            ("as given", &given),
            ("--activation-checkpointing 1", &with),
        ]));
    } else {
        out.push_str(&table(&[("as given", &given)]));
    }
    let free = match cfg.device {
        DeviceSpec::Cuda(_) if device_memory.is_none() => device_free(cfg)?,
        _ => None,
    };
    if cfg.devices.saturating_mul(cfg.num_nodes) > 1 || device_memory.is_some() {
        out.push_str("\n\n");
        out.push_str(&strategy_report(
            &model,
            cfg,
            seq_len,
            device_memory.or(free),
        )?);
    }
    if let DeviceSpec::Cuda(_) = cfg.device {
        out.push('\n');
        out.push_str(&match free {
            Some(free) => does_not_fit(&model, cfg, seq_len, free)?
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
/// 1` that would fit. Fails as [`estimate`] does.
pub fn does_not_fit(
    model: &Config,
    cfg: &TrainConfig,
    seq_len: usize,
    free: u64,
) -> Result<Option<String>> {
    let need = estimate(model, cfg, seq_len)?;
    if need.total <= free {
        return Ok(None);
    }
    let with = |micro: usize, ckpt: usize| {
        let mut c = cfg.clone();
        c.micro_batch_size = micro;
        c.activation_checkpointing = ckpt;
        estimate(model, &c, seq_len).map_or(u64::MAX, |m| m.total)
    };
    let ckpt = cfg.activation_checkpointing;
    let fits = |m: usize, k: usize| with(m, k) <= free;
    // The largest smaller micro-batch that divides the batch size and fits: the plan
    // grows with the micro-batch, so a bisection finds the largest that fits, then a
    // bounded walk down finds a divisor (1 always is one). Nothing per candidate is
    // kept, whatever the sizes.
    let smaller = |k: usize| -> Option<usize> {
        let (mut lo, mut hi) = (1usize, cfg.micro_batch_size.saturating_sub(1));
        if hi == 0 || !fits(1, k) {
            return None;
        }
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if fits(mid, k) { lo = mid } else { hi = mid - 1 }
        }
        (1..=lo)
            .rev()
            .take(1 << 16)
            .find(|m| cfg.batch_size % m == 0)
            .or(Some(1))
    };
    let mut fixes = Vec::new();
    if let Some(m) = smaller(ckpt) {
        fixes.push(format!("--micro-batch-size {m} ({})", human(with(m, ckpt))));
    }
    if ckpt != 1 {
        let full = with(cfg.micro_batch_size, 1);
        if full <= free {
            fixes.push(format!("--activation-checkpointing 1 ({})", human(full)));
        } else if let Some(m) = smaller(1) {
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
            "even --micro-batch-size 1 --activation-checkpointing 1 needs {}: train LoRA (--lora-r 16), shard the model over more --devices (--strategy fsdp; `--dry-run --devices N --device-memory GIB` names what fits) or use a larger device",
            human(with(1, 1))
        )
    } else {
        format!("{} would fit", fixes.join(" or "))
    };
    Ok(Some(format!(
        "{}: the run needs about {} ({parts}) but {} is free; {advice} (`pretrain --dry-run` prints the plan)",
        cfg.device,
        human(need.total),
        human(free)
    )))
}

/// Refuse a run that will not fit its device, before any weights load: a plan past
/// 2^64 bytes anywhere ([`estimate`]); on a CUDA device, the estimate against the free
/// memory now.
pub fn check_device_memory(
    model: &Config,
    cfg: &TrainConfig,
    seq_len: usize,
    device: &candle_core::Device,
) -> Result<()> {
    estimate(model, cfg, seq_len)?;
    match free_memory(device)? {
        Some(free) => match does_not_fit(model, cfg, seq_len, free)? {
            Some(why) => Err(Error::Usage(why)),
            None => Ok(()),
        },
        None => Ok(()),
    }
}

mod by_strategy;
pub use by_strategy::{STRATEGIES, by_strategy, smallest_fitting, strategy_report};

#[cfg(test)]
mod tests;
