//! Training: the optimizer, schedules, batches, one step, and the trainer loop.

pub mod adamw;
pub mod batches;
pub mod checkpoint;
pub mod config;
pub mod data_source;
pub mod estimate;
pub mod evaluate;
pub mod loggers;
pub mod metrics;
pub mod optimizer;
pub mod pretrain;
pub mod ranks;
mod resume;
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
