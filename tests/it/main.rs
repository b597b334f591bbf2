//! All integration tests, in one binary (one link, shared helpers).

mod checks;
mod common;
mod corpus_dedup;
mod corpus_tokenizer;
mod data_common;
mod data_errors;
mod data_megatron;
mod data_prepare;
mod demo;
mod layout;
mod lora_fused;
mod lora_grads;
mod model_cli;
mod parity;
mod pipeline;
mod plot;
mod publish_convert;
mod publish_gguf;
mod publish_hub;
mod publish_hub_server;
mod publish_merge;
mod real_model;
mod tensorboard;
mod train_parity;
mod trainer;
mod unseen;
