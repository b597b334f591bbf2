//! All integration tests, in one binary (one link, shared helpers).

mod common;
mod data_common;
mod data_prepare;
mod parity;
