//! All integration tests, in one binary (one link, shared helpers).

mod common;
mod model_cli;
mod data_common;
mod data_prepare;
mod parity;
mod train_parity;
mod trainer;
mod plot;
mod publish_convert;
mod publish_gguf;
mod publish_hub;
mod publish_hub_server;
mod publish_merge;
