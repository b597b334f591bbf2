//! lit-claire: continual pretraining of open LLMs with optional LoRA, on candle.
//!
//! The pipeline, each step a library function that a CLI command wraps:
//! `download` → `prepare-data` → `pretrain` → `validate` / `plot` → `merge-lora` →
//! `convert-to-hf` → `upload` / `quantize`, plus `perplexity`, `generate` and `chat`.
//!
//! Module map:
//! - [`config`]: one [`config::Config`] for every family, read from `config.json`.
//! - [`model`]: the decoder's weights (attention, MLP, norms, rotary, LoRA-capable
//!   linear), its one forward/backward pass (`model::engine`, with the loss), the fused
//!   kernels, the weight-name tables per family and the safetensors reader.
//! - [`hf`]: Hugging Face model folders: loading, PEFT adapters, export, LoRA merge.
//! - [`gguf`]: GGUF files for llama.cpp (`quantize`).
//! - [`lora`]: targeting, attaching and merging adapters.
//! - [`strategy`]: device, precision and ranks.
//! - [`plot`]: loss curves of runs and their best checkpoints.
//! - [`eval`]: downstream tasks scored as lm-evaluation-harness scores them.
//! - [`tokenizer`], [`perplexity`], [`generate`], [`chat`].
//! - [`vocab`]: `adapt-vocab` (a new vocabulary on a pretrained model) and `init-model`.
//! - [`hub`]: uploading to and downloading from the Hugging Face Hub.
//! - [`cli`]: the command-line front end.

pub mod allocator;
pub mod bench;
pub mod chat;
pub mod cli;
pub mod config;
pub mod data;
pub mod demo;
pub mod error;
pub mod eval;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod hub;
pub mod io;
pub mod lora;
pub mod model;
pub mod perplexity;
pub mod plot;
pub mod strategy;
pub mod tokenizer;
pub mod train;
pub mod vocab;

pub use error::{Error, Result};
