//! Training: from a checked config and training data to a finished run.
//!
//! ```text
//! pretrain.rs        the entry points: pretrain (prepared data), pretrain_with_data
//! ranks.rs           a run on several ranks: threads on CPU, a process group on GPUs
//! trainer.rs         the loop: steps, logging, validation, checkpoints, early stopping
//!                    (trainer/checkpoints.rs: its saves, and the stop on a signal)
//! setup.rs           before the first step: the checks, the model and optimizer, the
//!                    run folder
//! resume.rs          continuing a run from one of its checkpoints
//! embeddings.rs      what a LoRA run trains of the embeddings and head
//! config.rs          the options (TrainConfig) and their check (CheckedConfig)
//! data_source.rs     prepared data (prepare-data) as training data
//! batches.rs         training data: weighted datasets, epochs, batches
//! step.rs            one optimizer step: forward, backward, gradient sync, update
//! optimizer.rs       AdamW, replicated (ddp) or sharded (zero1, fsdp) over the ranks
//! overlap.rs         ddp: each block's gradients all-reduced as its backward ends
//! fsdp.rs            the model, its gradients and AdamW sharded over the ranks (ZeRO-3)
//! adamw.rs           AdamW itself, and gradient clipping
//! sharded_adamw.rs   AdamW sharded over the ranks (ZeRO-1)
//! schedule.rs        learning-rate schedules
//! checkpoint.rs      checkpoints on disk
//! lock.rs            one run at a time in a run folder (RUN/.lock)
//! preempt.rs         SIGUSR1/SIGTERM: stop after the step with a checkpoint, exit 75
//! saver.rs           checkpoints copied to host memory, written by a thread
//! evaluate.rs        validation loss of a model
//! validate.rs        offline validation of every checkpoint of a run
//! downstream.rs      every checkpoint of a run on downstream tasks (evaluate --out-dir)
//! metrics.rs, loggers.rs, tensorboard.rs   metrics.csv and TensorBoard event files
//! estimate.rs        the memory a run plans for (pretrain --dry-run)
//! ```

pub mod adamw;
pub mod batches;
pub mod checkpoint;
pub mod config;
pub mod data_source;
pub mod downstream;
pub mod embeddings;
pub mod estimate;
pub mod evaluate;
pub mod fsdp;
pub mod lock;
pub mod loggers;
pub mod metrics;
pub mod optimizer;
mod overlap;
pub mod preempt;
pub mod pretrain;
pub mod ranks;
mod resume;
pub mod saver;
pub mod schedule;
mod setup;
pub mod sharded_adamw;
pub mod step;
pub mod tensorboard;
pub mod trainer;
pub mod validate;

pub use config::{CheckedConfig, ToChecked, TrainConfig};
pub use data_source::load_train_data;
pub use pretrain::{pretrain, pretrain_with_data};
pub use trainer::{TrainSummary, Trainer};
