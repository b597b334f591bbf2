//! The model and data of the fsdp memory tests: a LLaMA of 8 blocks (width 256,
//! vocabulary 512; 5.5 million parameters, 22 MB in f32), initialised with
//! `init_model`, and 16 random samples of 65 tokens.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lit_claire::strategy::StrategyKind;
use lit_claire::train::TrainConfig;
use lit_claire::train::batches::{TrainData, TrainDataset};
use lit_claire::vocab::{InitOptions, init_model};
use rand::{Rng, SeedableRng};

/// Bytes of the model's parameters in f32:
/// 8 × (4 · 256² + 3 · 256 · 512 + 2 · 256) + 2 · 512 · 256 + 256 parameters.
#[allow(dead_code)] // not every test binary that includes this file reads it
pub const MODEL_BYTES: usize =
    4 * (8 * (4 * 256 * 256 + 3 * 256 * 512 + 2 * 256) + 2 * 512 * 256 + 256);

/// The model, written to `dir/model`.
pub fn eight_block_model(dir: &Path) -> PathBuf {
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        r#"{"model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
            "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 8,
            "vocab_size": 512, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": false}"#,
    )
    .unwrap();
    let model = dir.join("model");
    let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference/llama");
    init_model(&InitOptions::new(&config, &tokenizer, &model)).unwrap();
    model
}

/// 2 steps of micro-batch 1 on 4 thread ranks of `strategy`, neither validating nor
/// saving on the way.
pub fn four_rank_config(model: &Path, run: &Path, strategy: StrategyKind) -> TrainConfig {
    TrainConfig {
        data_dir: "in-memory".into(),
        checkpoint_dir: model.to_path_buf(),
        out_dir: run.to_path_buf(),
        devices: 4,
        strategy,
        micro_batch_size: 1,
        batch_size: 1,
        max_steps: Some(2),
        eval_interval: 1000,
        save_interval: 1000,
        ..Default::default()
    }
}

/// 16 random samples of 65 tokens, the first 2 for validation too.
pub fn random_data() -> TrainData {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let samples: Vec<Vec<u32>> = (0..16)
        .map(|_| (0..65).map(|_| rng.random_range(0..512u32)).collect())
        .collect();
    TrainData {
        block_size: 65,
        tokenizer_hash: None,
        origin: None,
        datasets: vec![TrainDataset {
            name: "random".into(),
            weight: 1.0,
            train: Arc::new(samples.clone()),
            validation: Arc::new(samples[..2].to_vec()),
        }],
    }
}
