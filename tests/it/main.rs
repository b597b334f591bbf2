//! All integration tests, in one binary (one link, shared helpers).

mod common;
mod model_cli;
mod parity;
mod train_parity;
mod trainer;
mod plot;
