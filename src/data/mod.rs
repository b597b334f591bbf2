//! Data: raw documents in, memory-mapped training shards out, and the corpus tools
//! around it.

pub mod documents;
