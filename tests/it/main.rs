//! All integration tests, in one binary (one link, shared helpers).

mod common;
mod corpus_dedup;
mod corpus_tokenizer;
mod parity;
