//! Data: raw documents in, memory-mapped training shards out, and the corpus tools
//! around it.

pub mod dedup;
pub mod documents;
pub mod minhash;
pub mod train_tokenizer;
