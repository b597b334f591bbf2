//! All integration tests, in one binary (one link, shared helpers).

mod common;
mod data_common;
mod data_errors;
mod data_megatron;
mod data_prepare;
mod parity;
