//! All integration tests, in one binary (one link, shared helpers).

mod common;
mod parity;
mod publish_convert;
mod publish_gguf;
mod publish_hub;
mod publish_hub_server;
mod publish_merge;
