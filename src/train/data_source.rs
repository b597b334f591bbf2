//! Prepared data (`lit-claire prepare-data`) as training data.

use std::path::Path;
use std::sync::Arc;

use super::batches::{DataOrigin, SampleSet, TrainData, TrainDataset};
use crate::data::reader::{PreparedData, Split};
use crate::error::Result;

impl SampleSet for Split {
    fn len(&self) -> usize {
        Split::len(self)
    }

    fn sample(&self, i: usize) -> Result<Vec<u32>> {
        Split::sample(self, i)
    }

    fn doc_starts(&self, i: usize) -> Result<Vec<u32>> {
        Split::doc_starts(self, i)
    }
}

/// Open the prepared folder `dir` for training and validation.
pub fn load_train_data(dir: &Path) -> Result<TrainData> {
    let prepared = PreparedData::open(dir)?;
    Ok(TrainData {
        block_size: prepared.block_size,
        tokenizer_hash: Some(prepared.tokenizer_hash),
        origin: Some(DataOrigin {
            dir: dir.to_path_buf(),
            fingerprint: prepared.fingerprint,
        }),
        datasets: prepared
            .datasets
            .into_iter()
            .map(|d| TrainDataset {
                name: d.name,
                weight: d.weight,
                train: Arc::new(d.train),
                validation: Arc::new(d.validation),
            })
            .collect(),
    })
}
