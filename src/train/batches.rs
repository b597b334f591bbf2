//! Training data as the trainer sees it: weighted datasets, the order of an epoch,
//! and batches with padding masked out of the loss.
//!
//! An epoch draws from every dataset `d` `round(weight_d · len_d)` samples: a weight
//! of 1 uses each sample once, 2 twice, 0.5 a random half. All draws are then
//! shuffled together with a generator seeded by `(seed, epoch)`, so the order of any
//! epoch can be recomputed on resume. The order does not depend on the number of
//! ranks: optimizer step `k` of an epoch takes its positions `[k·G, (k+1)·G)`, `G` the
//! global batch (batch size × ranks), and rank `r` the `r`-th of `W` equal slices of
//! them, so a run is the same computation on any number of ranks.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// Random access to token samples (a split of a prepared dataset, or memory in tests).
pub trait SampleSet: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Tokens of sample `i`: at most the block size; shorter samples are padded.
    fn sample(&self, i: usize) -> Result<Vec<u32>>;
    /// Where documents start inside sample `i` besides its first token: ascending
    /// offsets in `1..len` (packed samples). Empty: the sample is one document (or
    /// its boundaries are not known).
    fn doc_starts(&self, _i: usize) -> Result<Vec<u32>> {
        Ok(Vec::new())
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Packed samples held in memory: `samples[i]` with its document starts `starts[i]`
/// (see [`SampleSet::doc_starts`]).
#[derive(Debug, Clone, Default)]
pub struct PackedSamples {
    pub samples: Vec<Vec<u32>>,
    pub starts: Vec<Vec<u32>>,
}

impl PackedSamples {
    /// Documents laid back to back and cut every `block_size` tokens, as
    /// `prepare-data --padding false` does.
    pub fn pack(documents: &[Vec<u32>], block_size: usize) -> Self {
        let mut out = PackedSamples::default();
        let (mut cur, mut starts) = (Vec::new(), Vec::new());
        for doc in documents {
            if !cur.is_empty() {
                starts.push(cur.len() as u32);
            }
            for &id in doc {
                cur.push(id);
                if cur.len() == block_size {
                    out.samples.push(std::mem::take(&mut cur));
                    out.starts.push(std::mem::take(&mut starts));
                }
            }
        }
        if !cur.is_empty() {
            out.samples.push(cur);
            out.starts.push(starts);
        }
        out
    }
}

impl SampleSet for PackedSamples {
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn sample(&self, i: usize) -> Result<Vec<u32>> {
        Ok(self.samples[i].clone())
    }
    fn doc_starts(&self, i: usize) -> Result<Vec<u32>> {
        Ok(self.starts[i].clone())
    }
}

/// Sample `i` of `set` and its document starts; none with `cross_document` (the
/// documents of a packed sample then see each other).
pub fn sample_with_starts(
    set: &dyn SampleSet,
    i: usize,
    cross_document: bool,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let starts = if cross_document {
        Vec::new()
    } else {
        set.doc_starts(i)?
    };
    Ok((set.sample(i)?, starts))
}

/// Samples held in memory.
impl SampleSet for Vec<Vec<u32>> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn sample(&self, i: usize) -> Result<Vec<u32>> {
        Ok(self[i].clone())
    }
}

/// One dataset with its splits and sampling weight.
#[derive(Clone)]
pub struct TrainDataset {
    pub name: String,
    pub weight: f64,
    pub train: Arc<dyn SampleSet>,
    pub validation: Arc<dyn SampleSet>,
}

/// Everything the trainer reads.
#[derive(Clone)]
pub struct TrainData {
    /// Tokens per sample (inputs are the first `block_size − 1`).
    pub block_size: usize,
    /// Hash of the tokenizer the data was prepared with, if known.
    pub tokenizer_hash: Option<String>,
    /// The prepared folder the data comes from (None for data made in memory).
    pub origin: Option<DataOrigin>,
    pub datasets: Vec<TrainDataset>,
}

/// Where prepared data was read from.
#[derive(Debug, Clone, PartialEq)]
pub struct DataOrigin {
    pub dir: std::path::PathBuf,
    /// [`PreparedData::fingerprint`](crate::data::reader::PreparedData::fingerprint).
    pub fingerprint: String,
}

/// A position in the data: which epoch, and how many samples of its order were
/// consumed (by all ranks together, so a position means the same on any world size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DataPosition {
    pub epoch: usize,
    pub offset: usize,
}

impl DataPosition {
    /// Positions, in the epoch's order, of `rank`'s `per_rank` samples of the step that
    /// starts here with `world` ranks: its slice of the global batch.
    pub fn share(&self, per_rank: usize, rank: usize) -> std::ops::Range<usize> {
        let start = self.offset + rank * per_rank;
        start..start + per_rank
    }
}

/// More draws per epoch than this is a weight out of proportion (the epoch's order is
/// held in memory, 8 bytes a draw).
pub const MAX_EPOCH_DRAWS: f64 = 1e9;

impl TrainData {
    /// What to call the data in messages: its folder, if it has one.
    fn label(&self) -> String {
        self.origin
            .as_ref()
            .map_or("the training data".into(), |o| o.dir.display().to_string())
    }

    /// Fail unless the samples fit a model of context `context`
    /// (`max_position_embeddings`): inputs are `block_size − 1` tokens.
    pub fn check_context(&self, context: usize) -> Result<()> {
        if self.block_size < 2 || self.block_size - 1 > context {
            return Err(Error::Data(format!(
                "{} holds samples of {} tokens; the model's context is {context} (prepare with --max-length {context} or less)",
                self.label(),
                self.block_size,
            )));
        }
        Ok(())
    }

    /// Fail unless a micro-batch of `micro_batch` samples (`flag` sets it) fits this
    /// machine's memory, before any sample is read: the padded inputs, and on the CPU
    /// the logits and one hidden state of model `model` (a lower bound of what a step
    /// holds). Data prepared for an absurd context (`max_position_embeddings: 1e12`)
    /// is refused here rather than aborting on an allocation.
    pub fn check_sample_memory(
        &self,
        micro_batch: usize,
        model: &crate::config::Config,
        on_cpu: bool,
        flag: &str,
    ) -> Result<()> {
        let Some(ram) = memory_bytes() else {
            return Ok(());
        };
        let (mb, block) = (micro_batch as f64, self.block_size as f64);
        // Inputs, targets and mask, 4 bytes a token each.
        let mut need = mb * block * 12.0;
        if on_cpu {
            need += mb * (block - 1.0) * (model.vocab_size + model.hidden_size) as f64 * 4.0;
        }
        if need > ram as f64 {
            const GIB: f64 = (1u64 << 30) as f64;
            return Err(Error::Data(format!(
                "{} holds samples of {} tokens (prepare-data's default --max-length is the model's context, config.json's max_position_embeddings: {}); a micro-batch of {micro_batch} of them needs at least {:.3e} GiB, more than this machine's {:.1} GiB; prepare the data again with a smaller --max-length (or lower {flag})",
                self.label(),
                self.block_size,
                model.block_size,
                need / GIB,
                ram as f64 / GIB
            )));
        }
        Ok(())
    }

    /// Fail unless every token id of the data is a row of the model's embeddings
    /// (`model_vocab` rows, model folder `model_dir`). The data's ids are scanned (in
    /// parallel) unless it is prepared data whose tokenizer is known to be `tokenizer`
    /// and produces no id beyond the model's rows.
    pub fn check_vocab(
        &self,
        tokenizer: &crate::tokenizer::Tokenizer,
        model_vocab: usize,
        model_dir: &std::path::Path,
    ) -> Result<()> {
        let known = self.origin.is_some() && self.tokenizer_hash.is_some();
        if known && tokenizer.vocab_size() <= model_vocab {
            return Ok(());
        }
        self.check_ids_below(model_vocab, model_dir, true)
    }

    /// Fail if a sample holds a token id >= `model_vocab`: of every validation split,
    /// and of every training split when `train`.
    pub fn check_ids_below(
        &self,
        model_vocab: usize,
        model_dir: &std::path::Path,
        train: bool,
    ) -> Result<()> {
        use rayon::prelude::*;
        for d in &self.datasets {
            let splits = [("train", &d.train), ("validation", &d.validation)];
            for (split, set) in splits.into_iter().filter(|(n, _)| train || *n != "train") {
                let worst = (0..set.len())
                    .into_par_iter()
                    .map(|i| -> Result<Option<u32>> { Ok(set.sample(i)?.into_iter().max()) })
                    .try_reduce(|| None, |a: Option<u32>, b| Ok(a.max(b)))?;
                if let Some(id) = worst.filter(|&id| id as usize >= model_vocab) {
                    return Err(Error::Data(format!(
                        "{}: dataset {:?} ({split}) holds token id {id}, but the model in {} has {model_vocab} token embeddings (config.json's vocab_size); was the data tokenized with another tokenizer? Prepare it with the model's tokenizer, or train a model whose vocabulary covers it",
                        self.label(),
                        d.name,
                        model_dir.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Fail unless every dataset's sampling weight is a number >= 0 and an epoch draws
    /// a number of samples that fits in memory.
    pub fn check_weights(&self) -> Result<()> {
        let mut draws = 0f64;
        for d in &self.datasets {
            if !(d.weight.is_finite() && d.weight >= 0.0) {
                return Err(Error::Data(format!(
                    "{}: dataset {:?} has sampling weight {}; weights are numbers >= 0",
                    self.label(),
                    d.name,
                    d.weight
                )));
            }
            draws += d.weight * d.train.len() as f64;
        }
        if draws > MAX_EPOCH_DRAWS {
            return Err(Error::Data(format!(
                "{}: the sampling weights ask for {draws:.3e} samples per epoch (more than {MAX_EPOCH_DRAWS:e}); lower the weights of the groups file",
                self.label()
            )));
        }
        Ok(())
    }

    /// Fail unless the data was prepared with `tokenizer` (when its tokenizer is known).
    pub fn check_tokenizer(&self, tokenizer: &crate::tokenizer::Tokenizer) -> Result<()> {
        match &self.tokenizer_hash {
            None => Ok(()),
            Some(h) => crate::data::reader::check_tokenizer_hash(
                std::path::Path::new(&self.label()),
                h,
                tokenizer,
            ),
        }
    }

    /// `(dataset, sample)` pairs of epoch `epoch`, in order, for every rank.
    pub fn epoch_order(&self, seed: u64, epoch: usize) -> Vec<(u32, u32)> {
        let mut rng = ChaCha8Rng::seed_from_u64(
            seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(epoch as u64 + 1)),
        );
        let mut all: Vec<(u32, u32)> = Vec::new();
        for (d, ds) in self.datasets.iter().enumerate() {
            let len = ds.train.len();
            if len == 0 || ds.weight <= 0.0 {
                continue;
            }
            let want = (ds.weight * len as f64).round() as usize;
            let mut idx: Vec<u32> = (0..len as u32).collect();
            for _ in 0..want / len {
                all.extend(idx.iter().map(|&i| (d as u32, i)));
            }
            idx.shuffle(&mut rng);
            all.extend(idx[..want % len].iter().map(|&i| (d as u32, i)));
        }
        all.shuffle(&mut rng);
        all
    }

    /// Samples one epoch gives each rank.
    pub fn epoch_len(&self, rank_count: usize) -> usize {
        let total: usize = self
            .datasets
            .iter()
            .filter(|d| d.weight > 0.0)
            .map(|d| (d.weight * d.train.len() as f64).round() as usize)
            .sum();
        total / rank_count.max(1)
    }
}

/// This machine's memory in bytes (Linux: `MemTotal` plus `SwapTotal`; None elsewhere).
fn memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((kib("MemTotal:")? + kib("SwapTotal:").unwrap_or(0)) * 1024)
}

/// A micro-batch ready for the model.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `(B, T)` u32
    pub inputs: Tensor,
    /// `(B·T)` u32 (0 where masked)
    pub targets: Tensor,
    /// `(B·T)` f32, 1 where the target counts
    pub mask: Tensor,
    /// Number of targets that count.
    pub tokens: usize,
    /// Packed samples: for each input token, the index in its row of its document's
    /// first token ([`crate::model::fused::MaskSpec::docs`]); None when every row is
    /// one document.
    pub docs: Option<Arc<[u32]>>,
}

impl Batch {
    /// From samples of at most `block_size` tokens: inputs `s[..−1]`, targets `s[1..]`,
    /// both padded to `block_size − 1`; padded targets are masked.
    pub fn from_samples(samples: &[Vec<u32>], block_size: usize, device: &Device) -> Result<Self> {
        Self::from_packed(samples, &[], block_size, device)
    }

    /// From packed samples and their document starts (`starts[r]` for `samples[r]`, see
    /// [`SampleSet::doc_starts`]; missing or empty: one document), as
    /// [`Batch::from_samples`], and so that each document is scored as if alone:
    ///
    /// - `docs` restarts attention and positions at each document (the padding after a
    ///   short sample is a document of its own, whose targets are masked anyway);
    /// - the target that crosses a boundary (a document's last token "predicting" the
    ///   next one's first) is masked and not counted in `tokens`: run alone, that last
    ///   token has nothing to predict. Megatron-LM masks the same target with
    ///   `--reset-attention-mask --reset-position-ids --eod-mask-loss`.
    ///
    /// So a packed row's summed loss and its gradients equal those of its documents run
    /// separately, and the mean loss is over the same targets.
    pub fn from_packed(
        samples: &[Vec<u32>],
        starts: &[Vec<u32>],
        block_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let t = block_size - 1;
        let b = samples.len();
        let mut inputs = vec![0u32; b * t];
        let mut targets = vec![0u32; b * t];
        let mut mask = vec![0f32; b * t];
        let packed = starts.iter().any(|s| !s.is_empty());
        let mut docs = vec![0u32; if packed { b * t } else { 0 }];
        let mut tokens = 0;
        for (r, s) in samples.iter().enumerate() {
            if s.len() > block_size {
                return Err(Error::Data(format!(
                    "a sample has {} tokens, more than the block size {block_size}",
                    s.len()
                )));
            }
            let n = s.len().saturating_sub(1);
            inputs[r * t..r * t + n].copy_from_slice(&s[..n]);
            targets[r * t..r * t + n].copy_from_slice(&s[1..n + 1]);
            mask[r * t..r * t + n].iter_mut().for_each(|m| *m = 1.0);
            tokens += n;
            if !packed {
                continue;
            }
            let st = starts.get(r).map_or(&[][..], |v| v.as_slice());
            if st.windows(2).any(|w| w[0] >= w[1])
                || st.iter().any(|&x| x == 0 || x as usize >= s.len())
            {
                return Err(Error::Data(format!(
                    "document starts {st:?} of a sample of {} tokens: expected ascending offsets in 1..{}; the prepared data is damaged, re-run prepare-data with --overwrite",
                    s.len(),
                    s.len()
                )));
            }
            let row = &mut docs[r * t..(r + 1) * t];
            let mut cur = 0u32;
            let mut next = st.iter().peekable();
            for (i, d) in row.iter_mut().enumerate() {
                if i == n {
                    cur = n as u32; // padding: a document of its own
                } else if next.peek().is_some_and(|&&x| x as usize == i) {
                    cur = i as u32;
                    next.next();
                }
                *d = cur;
            }
            // Input i predicts token i + 1: not across a boundary.
            for &x in st {
                let i = r * t + x as usize - 1;
                if mask[i] > 0.0 {
                    mask[i] = 0.0;
                    targets[i] = 0;
                    tokens -= 1;
                }
            }
        }
        let mut batch = Self::from_parts(inputs, targets, mask, b, t, tokens, device)?;
        batch.docs = packed.then(|| docs.into());
        Ok(batch)
    }

    /// From full rows (`(B, T+1)` ids): targets equal to `ignore` are masked (the
    /// reference training batches mark padding with id 0).
    pub fn from_rows(rows: &[Vec<u32>], ignore: Option<u32>, device: &Device) -> Result<Self> {
        let b = rows.len();
        let t = rows[0].len() - 1;
        let mut inputs = Vec::with_capacity(b * t);
        let mut targets = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t);
        for r in rows {
            if r.len() != t + 1 {
                return Err(Error::Data("rows of a batch must have equal length".into()));
            }
            inputs.extend_from_slice(&r[..t]);
            for &y in &r[1..] {
                let keep = Some(y) != ignore;
                targets.push(y);
                mask.push(if keep { 1.0 } else { 0.0 });
            }
        }
        let tokens = mask.iter().filter(|m| **m > 0.0).count();
        Self::from_parts(inputs, targets, mask, b, t, tokens, device)
    }

    fn from_parts(
        inputs: Vec<u32>,
        targets: Vec<u32>,
        mask: Vec<f32>,
        b: usize,
        t: usize,
        tokens: usize,
        device: &Device,
    ) -> Result<Self> {
        Ok(Batch {
            inputs: Tensor::from_vec(inputs, (b, t), device)?,
            targets: Tensor::from_vec(targets, b * t, device)?,
            mask: Tensor::from_vec(mask, b * t, device)?.to_dtype(DType::F32)?,
            tokens,
            docs: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(lens: &[(usize, f64)]) -> TrainData {
        TrainData {
            block_size: 4,
            tokenizer_hash: None,
            origin: None,
            datasets: lens
                .iter()
                .enumerate()
                .map(|(i, &(n, w))| TrainDataset {
                    name: format!("d{i}"),
                    weight: w,
                    train: Arc::new(vec![vec![1u32, 2]; n]),
                    validation: Arc::new(Vec::<Vec<u32>>::new()),
                })
                .collect(),
        }
    }

    #[test]
    fn weights_scale_each_dataset_and_order_is_reproducible() {
        let d = data(&[(10, 1.0), (10, 2.0), (10, 0.5)]);
        let order = d.epoch_order(7, 0);
        assert_eq!(order.len(), 35);
        let count = |k: u32| order.iter().filter(|(d, _)| *d == k).count();
        assert_eq!((count(0), count(1), count(2)), (10, 20, 5));
        assert_eq!(order, d.epoch_order(7, 0));
        assert_ne!(order, d.epoch_order(7, 1));
    }

    #[test]
    fn ranks_split_each_global_batch_into_equal_disjoint_slices() {
        let at = DataPosition {
            epoch: 0,
            offset: 8,
        };
        let (a, b) = (at.share(3, 0), at.share(3, 1));
        assert_eq!((a, b), (8..11, 11..14));
        // One rank with the whole global batch takes the same samples.
        assert_eq!(at.share(6, 0), 8..14);
    }

    #[test]
    fn padding_is_masked() {
        let b = Batch::from_samples(&[vec![5, 6, 7, 8], vec![9, 10]], 4, &Device::Cpu).unwrap();
        assert_eq!(b.tokens, 4);
        assert_eq!(
            b.inputs.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7], vec![9, 0, 0]]
        );
        assert_eq!(b.targets.to_vec1::<u32>().unwrap(), vec![6, 7, 8, 10, 0, 0]);
        assert_eq!(
            b.mask.to_vec1::<f32>().unwrap(),
            vec![1., 1., 1., 1., 0., 0.]
        );
    }

    #[test]
    fn packed_rows_restart_documents_and_mask_the_crossing_target() {
        // Row 0: documents [5 6 7] [8 9] [10]; row 1: one short document.
        let samples = [vec![5, 6, 7, 8, 9, 10], vec![1, 2, 3]];
        let starts = [vec![3, 5], vec![]];
        let b = Batch::from_packed(&samples, &starts, 6, &Device::Cpu).unwrap();
        assert_eq!(
            b.docs.as_deref().unwrap(),
            &[0, 0, 0, 3, 3, 0, 0, 2, 2, 2][..]
        );
        // 7 → 8 and 9 → 10 cross a boundary; row 1 has two targets.
        assert_eq!(
            b.mask.to_vec1::<f32>().unwrap(),
            vec![1., 1., 0., 1., 0., 1., 1., 0., 0., 0.]
        );
        assert_eq!(b.tokens, 5);
        // Packing the same documents gives these samples and starts.
        let p = PackedSamples::pack(&[vec![5, 6, 7], vec![8, 9], vec![10, 11, 12]], 6);
        assert_eq!(p.samples, vec![vec![5, 6, 7, 8, 9, 10], vec![11, 12]]);
        assert_eq!(p.starts, vec![vec![3, 5], vec![]]);
        // Without starts, the old batch exactly.
        let plain = Batch::from_packed(&samples, &[vec![], vec![]], 6, &Device::Cpu).unwrap();
        assert!(plain.docs.is_none());
        assert_eq!(plain.tokens, 7);
        assert!(Batch::from_packed(&samples, &[vec![0], vec![]], 6, &Device::Cpu).is_err());
    }
}
