//! The shards as Megatron-LM reads them, and shard counts.
//!
//! `MegatronIndex` below is written from Megatron's published format
//! (`megatron/core/datasets/indexed_dataset.py`), independently of the library: magic
//! `MMIDIDX\0\0`, u64 version 1, u8 dtype code, u64 sequence count, u64 document count,
//! then i32 lengths, i64 byte pointers and i64 document indices, little-endian.

use std::path::Path;

use lit_claire::data::reader::{PreparedData, Split};

use crate::common::temp_dir;
use crate::data_common::*;

struct MegatronIndex {
    dtype_code: u8,
    lengths: Vec<i32>,
    pointers: Vec<i64>,
    document_indices: Vec<i64>,
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = bytes.split_at(n);
    *bytes = tail;
    head
}

fn u64_le(bytes: &mut &[u8]) -> u64 {
    u64::from_le_bytes(take(bytes, 8).try_into().unwrap())
}

fn read_index(path: &Path) -> MegatronIndex {
    let all = std::fs::read(path).unwrap();
    let mut b = all.as_slice();
    assert_eq!(take(&mut b, 9), b"MMIDIDX\x00\x00", "magic");
    assert_eq!(u64_le(&mut b), 1, "version");
    let dtype_code = take(&mut b, 1)[0];
    let sequences = u64_le(&mut b) as usize;
    let documents = u64_le(&mut b) as usize;
    let lengths = (0..sequences)
        .map(|_| i32::from_le_bytes(take(&mut b, 4).try_into().unwrap()))
        .collect();
    let pointers = (0..sequences)
        .map(|_| i64::from_le_bytes(take(&mut b, 8).try_into().unwrap()))
        .collect();
    let document_indices = (0..documents)
        .map(|_| i64::from_le_bytes(take(&mut b, 8).try_into().unwrap()))
        .collect();
    assert!(b.is_empty(), "trailing bytes in {}", path.display());
    MegatronIndex {
        dtype_code,
        lengths,
        pointers,
        document_indices,
    }
}

/// Megatron's dtype codes for the two token types.
fn item_size(code: u8) -> usize {
    match code {
        8 => 2, // uint16
        4 => 4, // int32
        c => panic!("unexpected dtype code {c}"),
    }
}

fn read_sequence(bin: &[u8], code: u8, pointer: i64, length: i32) -> Vec<u32> {
    let size = item_size(code);
    let bytes = &bin[pointer as usize..pointer as usize + length as usize * size];
    bytes
        .chunks_exact(size)
        .map(|c| match size {
            2 => u16::from_le_bytes([c[0], c[1]]) as u32,
            _ => i32::from_le_bytes(c.try_into().unwrap()) as u32,
        })
        .collect()
}

/// Check every shard of a split against the Megatron reading and the library reader;
/// returns each shard's Megatron documents (as token lists).
fn check_split(dir: &Path, split_name: &str, split: &Split) -> Vec<Vec<Vec<u32>>> {
    let mut shards = Vec::new();
    for s in 0..split.num_shards() {
        let prefix = dir.join(split_name).join(format!("shard-{s:05}"));
        let idx = read_index(&prefix.with_extension("idx"));
        let bin = std::fs::read(prefix.with_extension("bin")).unwrap();
        assert_eq!(
            idx.dtype_code, 8,
            "a 512-token vocabulary is stored as uint16"
        );
        let n = idx.lengths.len();
        assert_eq!(split.shard_sample_range(s).len(), n);
        // Megatron's own invariant: the last document index is the sequence count.
        assert_eq!(idx.document_indices[0], 0);
        assert_eq!(*idx.document_indices.last().unwrap() as usize, n);
        assert!(idx.document_indices.windows(2).all(|w| w[0] < w[1]));
        let mut ptr = 0;
        for j in 0..n {
            assert_eq!(idx.pointers[j], ptr);
            ptr += idx.lengths[j] as i64 * 2;
        }
        // numpy cannot map empty files: an empty shard holds one unused token.
        assert_eq!(bin.len() as i64, ptr.max(2));
        let seqs: Vec<Vec<u32>> = (0..n)
            .map(|j| read_sequence(&bin, idx.dtype_code, idx.pointers[j], idx.lengths[j]))
            .collect();
        let start = split.shard_sample_range(s).start;
        for (j, seq) in seqs.iter().enumerate() {
            assert_eq!(*seq, split.sample(start + j).unwrap());
        }
        let docs = idx
            .document_indices
            .windows(2)
            .map(|w| seqs[w[0] as usize..w[1] as usize].concat())
            .collect();
        shards.push(docs);
    }
    shards
}

#[test]
fn data_idx_parsed_as_megatron_does() {
    let tmp = temp_dir();
    let src = fortunes_source(tmp.path());
    let eos = tokenizer().eos_ids[0];
    for padding in [true, false] {
        let dest = tmp.path().join(format!("out-{padding}"));
        let mut o = options(&src, &dest);
        o.padding = padding;
        prepare(&o).unwrap();
        let data = PreparedData::open(&dest).unwrap();
        let ds = &data.datasets[0];
        let dir = dest.join(&ds.name);
        for (name, split) in [("train", &ds.train), ("validation", &ds.validation)] {
            let shards = check_split(&dir, name, split);
            if padding {
                // A Megatron document is a source document: it ends with EOS, except the
                // last of a shard when the document runs on into the next shard.
                for docs in &shards {
                    for d in &docs[..docs.len().saturating_sub(1)] {
                        assert_eq!(d.last(), Some(&eos));
                        assert!(!d[..d.len() - 1].contains(&eos));
                    }
                }
            } else {
                // Packed: each sequence is its own document.
                for (s, docs) in shards.iter().enumerate() {
                    assert_eq!(docs.len(), split.shard_sample_range(s).len());
                }
            }
        }
    }
}

#[test]
fn data_shard_counts_and_empty_shards() {
    let tmp = temp_dir();
    let src = fortunes_source(tmp.path());
    let count = |label: &str, shard_tokens: u64, multiple_of: usize| {
        let dest = tmp.path().join(label);
        let mut o = options(&src, &dest);
        o.shard_tokens = shard_tokens;
        o.multiple_of = multiple_of;
        prepare(&o).unwrap();
        let data = PreparedData::open(&dest).unwrap();
        let train = &data.datasets[0].train;
        // Shards are consecutive and as even as can be.
        let sizes: Vec<usize> = (0..train.num_shards())
            .map(|s| train.shard_sample_range(s).len())
            .collect();
        assert_eq!(train.shard_sample_range(0).start, 0);
        for s in 1..train.num_shards() {
            assert_eq!(
                train.shard_sample_range(s).start,
                train.shard_sample_range(s - 1).end
            );
        }
        assert_eq!(sizes.iter().sum::<usize>(), train.len());
        assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        (
            train.num_shards(),
            data.datasets[0].validation.num_shards(),
            train.tokens(),
        )
    };
    let (train, val, tokens) = count("default", 100_000_000, 8);
    assert_eq!((train, val), (8, 8));
    assert!(tokens > 100_000 && tokens < 200_000, "{tokens}");
    // 10k tokens a shard: 13-20 shards needed, rounded up to 16 or 24, or to 15 / 18 / 21 by 3.
    let (train, _, _) = count("by8", 10_000, 8);
    assert_eq!(train, (tokens.div_ceil(10_000) as usize).div_ceil(8) * 8);
    assert!(train >= 16);
    let (train, _, _) = count("by3", 10_000, 3);
    assert_eq!(train % 3, 0);
    assert_eq!(train, (tokens.div_ceil(10_000) as usize).div_ceil(3) * 3);

    // A tiny dataset: one validation sample over 8 shards, 7 of them empty.
    let tiny = tmp.path().join("tiny");
    std::fs::create_dir_all(&tiny).unwrap();
    std::fs::write(tiny.join("t.txt"), fortunes()[..3].join("\n%\n")).unwrap();
    let dest = tmp.path().join("tiny-out");
    prepare(&options(&tiny, &dest)).unwrap();
    let data = PreparedData::open(&dest).unwrap();
    let ds = &data.datasets[0];
    let val = &ds.validation;
    assert_eq!((val.num_shards(), val.len()), (8, 1));
    let empty = (0..8)
        .filter(|&s| val.shard_sample_range(s).is_empty())
        .count();
    assert_eq!(empty, 7);
    assert!(!val.sample(0).unwrap().is_empty());
    assert!(val.sample(1).is_err());
    check_split(&dest.join(&ds.name), "validation", val);
    check_split(&dest.join(&ds.name), "train", &ds.train);
}
