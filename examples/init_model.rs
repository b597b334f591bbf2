//! Write a randomly initialised LLaMA-shaped Hugging Face folder: the starting point
//! of the repository's built-in tiny model (see utils/make_tiny_model.sh).
//!
//!     cargo run --release --example init_model -- OUT TOKENIZER_DIR [layers width heads]

use std::path::Path;

use lit_claire::bench::RandomSource;
use lit_claire::config::families::parse_config;
use lit_claire::hf::state_dict::state_dict;
use lit_claire::model::{BuildOptions, build_model};

fn main() -> lit_claire::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: init_model OUT TOKENIZER_DIR [layers width heads]");
        std::process::exit(2);
    }
    let out = Path::new(&args[1]);
    let tok_dir = Path::new(&args[2]);
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (layers, width, heads) = (num(3, 4), num(4, 128), num(5, 4));
    let tokenizer = lit_claire::tokenizer::Tokenizer::from_dir(tok_dir)?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tokenizer.vocab_size(),
        "hidden_size": width,
        "intermediate_size": width * 8 / 3 / 32 * 32,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_ids.first(),
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": "float32",
    });
    let cfg = parse_config(&config)?;
    let model = build_model(
        &cfg,
        &RandomSource { seed: 0, std: 0.02 },
        &BuildOptions::cpu_f32(),
    )?
    .model;
    std::fs::create_dir_all(out).map_err(|e| lit_claire::Error::io(out, e))?;
    lit_claire::io::save_safetensors_atomic(
        &out.join("model.safetensors"),
        &state_dict(&model)?,
        None,
    )?;
    lit_claire::io::write_json_atomic(&out.join("config.json"), &config)?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        if tok_dir.join(f).exists() {
            std::fs::copy(tok_dir.join(f), out.join(f))
                .map_err(|e| lit_claire::Error::io(out, e))?;
        }
    }
    println!("{} ({} parameters)", out.display(), cfg.num_params());
    Ok(())
}
