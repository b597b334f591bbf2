//! All integration tests, in one binary (one link, shared helpers).

mod checks;
mod common;
mod lora_grads;
mod parity;
mod unseen;
