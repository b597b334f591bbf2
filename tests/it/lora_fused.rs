//! LoRA with part of a fused query/key/value layer targeted (Falcon, GPT-2, GPT-NeoX).
//!
//! `--lora-query --lora-value` (the default) on a fused layer trains one adapter of the
//! whole layer whose `B` rows of the keys are held at zero. Trained for a few steps on
//! every fused layout: the keys' rows of the effective weight `W + s·B·A` stay bit for
//! bit the base's, in memory, in the saved adapter and after `merge-lora`, while the
//! queries' and values' rows move; the adapter is a PEFT adapter of the fused module;
//! and it scores, with `perplexity --adapter` and merged, the loss PEFT computed for it
//! (`tests/fixtures/extra/lora_fused_peft.json`, by `utils/check_hf_load.py`).
//!
//! The runs stay in `$CARGO_TARGET_TMPDIR/lora_fused/<fixture>/` for that script.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lit_claire::hf::export::merge_lora;
use lit_claire::hf::load_model;
use lit_claire::model::BuildOptions;
use lit_claire::tokenizer::Tokenizer;
use lit_claire::train::batches::{TrainData, TrainDataset};
use lit_claire::train::{TrainConfig, Trainer};
use serde_json::Value;

use crate::common::*;

/// How a family's fused layer orders its output rows, written from transformers' code
/// (not from ours).
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// GPT-2 `c_attn`: `[q (C) | k (C) | v (C)]` (`split(self.split_size, dim=2)`).
    Blocked,
    /// Falcon and GPT-NeoX: `groups × [g q heads | k head | v head]`, each `hs` wide.
    /// Falcon-7B multi-query: one group; Falcon-40B: one per kv head
    /// (`view(b, t, num_kv_heads, num_heads // num_kv_heads + 2, head_dim)`); old Falcon
    /// without multi-query and GPT-NeoX: one per head (`view(b, t, nh, 3, hs)`).
    Grouped { groups: usize },
}

/// A fused fixture and the names of its fused weight.
struct Case {
    name: &'static str,
    dir: PathBuf,
    /// `{i}` → layer index.
    weight: &'static str,
    /// The module path below the layer, as `target_modules` names it.
    target: &'static str,
    /// Stored `(in, out)` (Conv1D).
    conv1d: bool,
    n_head: usize,
    head_dim: usize,
    layout: Layout,
}

fn cases() -> Vec<Case> {
    let cfg = |dir: &Path| read_json(&dir.join("config.json"));
    let int = |v: &Value, k: &str| v[k].as_u64().unwrap() as usize;
    let mut out = Vec::new();
    for (name, dir) in [
        ("falcon", reference_dir("falcon")),
        ("falcon_new_gqa", extra_dir("falcon_new_gqa")),
        ("falcon_sequential", extra_dir("falcon_sequential")),
    ] {
        let c = cfg(&dir);
        let nh = int(&c, "num_attention_heads");
        let groups = if c["new_decoder_architecture"].as_bool() == Some(true) {
            int(&c, "num_kv_heads")
        } else if c["multi_query"].as_bool() == Some(true) {
            1
        } else {
            nh
        };
        out.push(Case {
            name,
            weight: "transformer.h.{i}.self_attention.query_key_value.weight",
            target: "self_attention.query_key_value",
            conv1d: false,
            n_head: nh,
            head_dim: int(&c, "hidden_size") / nh,
            layout: Layout::Grouped { groups },
            dir,
        });
    }
    for (name, dir) in [
        ("gpt_neox", reference_dir("gpt_neox")),
        ("gpt_neox_sequential", extra_dir("gpt_neox_sequential")),
    ] {
        let c = cfg(&dir);
        let nh = int(&c, "num_attention_heads");
        out.push(Case {
            name,
            weight: "gpt_neox.layers.{i}.attention.query_key_value.weight",
            target: "attention.query_key_value",
            conv1d: false,
            n_head: nh,
            head_dim: int(&c, "hidden_size") / nh,
            layout: Layout::Grouped { groups: nh },
            dir,
        });
    }
    for (name, dir) in [
        ("gpt2", reference_dir("gpt2")),
        ("gpt2_inverse_layer", extra_dir("gpt2_inverse_layer")),
    ] {
        let c = cfg(&dir);
        let nh = int(&c, "n_head");
        out.push(Case {
            name,
            weight: "transformer.h.{i}.attn.c_attn.weight",
            target: "attn.c_attn",
            conv1d: true,
            n_head: nh,
            head_dim: int(&c, "n_embd") / nh,
            layout: Layout::Blocked,
            dir,
        });
    }
    out
}

/// What each output row of the fused layer is: 'q', 'k' or 'v'.
fn row_parts(c: &Case) -> Vec<char> {
    let hs = c.head_dim;
    match c.layout {
        Layout::Blocked => ['q', 'k', 'v']
            .iter()
            .flat_map(|&p| std::iter::repeat_n(p, c.n_head * hs))
            .collect(),
        Layout::Grouped { groups } => {
            let g = c.n_head / groups;
            let mut v = Vec::new();
            for _ in 0..groups {
                v.extend(std::iter::repeat_n('q', g * hs));
                v.extend(std::iter::repeat_n('k', hs));
                v.extend(std::iter::repeat_n('v', hs));
            }
            v
        }
    }
}

/// `t: (out, n)` as rows of f32.
fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
}

/// The fused weight as `(out, in)` rows.
fn out_rows(t: &Tensor, conv1d: bool) -> Vec<Vec<f32>> {
    if conv1d {
        rows(&t.t().unwrap())
    } else {
        rows(t)
    }
}

/// Row by row against `base`: keys' rows bit-identical, and some query and some value
/// row changed. `what` names the check in failures.
fn check_rows(what: &str, parts: &[char], base: &[Vec<f32>], now: &[Vec<f32>]) {
    assert_eq!(base.len(), parts.len(), "{what}: rows");
    assert_eq!(now.len(), parts.len(), "{what}: rows");
    let mut changed = BTreeMap::from([('q', 0), ('k', 0), ('v', 0)]);
    for (i, p) in parts.iter().enumerate() {
        let same = base[i]
            .iter()
            .zip(&now[i])
            .all(|(a, b)| a.to_bits() == b.to_bits());
        if !same {
            *changed.get_mut(p).unwrap() += 1;
        }
    }
    assert_eq!(changed[&'k'], 0, "{what}: key rows changed: {changed:?}");
    assert!(
        changed[&'q'] > 0 && changed[&'v'] > 0,
        "{what}: query and value rows should move: {changed:?}"
    );
}

/// Samples of `block` tokens of the sample corpus.
fn samples(tok: &Tokenizer, block: usize, n: usize, skip: usize) -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/fortunes-br.txt"),
    )
    .unwrap();
    let mut stream = Vec::new();
    for doc in text.split("\n%\n").skip(skip).take(4 * n) {
        stream.extend(tok.encode_document(doc).unwrap());
    }
    stream.chunks(block).take(n).map(|c| c.to_vec()).collect()
}

/// Train a query+value adapter on `c` for 6 steps into `out`; the trainer, done.
fn train(c: &Case, out: &Path) -> Trainer {
    let tok = Tokenizer::from_dir(&c.dir).unwrap();
    let data = TrainData {
        block_size: 33,
        tokenizer_hash: Some(tok.hash.clone()),
        origin: None,
        datasets: vec![TrainDataset {
            name: "fortunes".into(),
            weight: 1.0,
            train: Arc::new(samples(&tok, 33, 16, 0)),
            validation: Arc::new(samples(&tok, 33, 2, 400)),
        }],
    };
    let cfg = TrainConfig {
        data_dir: "in-memory".into(),
        checkpoint_dir: c.dir.clone(),
        out_dir: out.to_path_buf(),
        micro_batch_size: 4,
        batch_size: 4,
        max_steps: Some(6),
        learning_rate: 1e-2,
        min_lr: 1e-2,
        warmup_steps: 0,
        eval_interval: 100,
        save_interval: 100,
        lora_r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        ..Default::default()
    };
    // The default targets: exactly what the issue is about.
    assert!(cfg.lora_query && cfg.lora_value && !cfg.lora_key);
    let mut t = Trainer::new(&cfg, data).unwrap();
    t.run(None).unwrap();
    t
}

#[test]
fn lora_on_part_of_a_fused_qkv_leaves_the_keys_alone_and_loads_in_peft() {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lora_fused");
    for c in cases() {
        let out = root.join(c.name);
        if out.exists() {
            std::fs::remove_dir_all(&out).unwrap();
        }
        let t = train(&c, &out.join("run"));
        let parts = row_parts(&c);
        let base =
            candle_core::safetensors::load(c.dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let n_layer = t.model().blocks.len();
        let weight = |i: usize| c.weight.replace("{i}", &i.to_string());

        // In memory, after training: W + s·B·A of every fused layer.
        for (i, lin) in t
            .model()
            .linears()
            .into_iter()
            .filter(|l| l.name.ends_with(c.target))
            .enumerate()
        {
            let lora = lin.lora.as_ref().expect("the fused layer has an adapter");
            let eff =
                (lin.weight.to_dtype(DType::F32).unwrap() + lora.delta_weight().unwrap()).unwrap();
            let what = format!("{}: trained layer {i}", c.name);
            check_rows(
                &what,
                &parts,
                &out_rows(&base[&weight(i)], c.conv1d),
                &rows(&eff),
            );
        }

        // The saved adapter: PEFT's names and shapes for the fused module, keys' rows of
        // B zero (so PEFT, which adapts the whole module, changes nothing there).
        let fin = out.join("run/final");
        let cfg = read_json(&fin.join("adapter_config.json"));
        assert_eq!(
            cfg["target_modules"],
            serde_json::json!([c.target]),
            "{}",
            c.name
        );
        assert_eq!(
            cfg["fan_in_fan_out"].as_bool(),
            Some(c.conv1d),
            "{}",
            c.name
        );
        let adapter =
            candle_core::safetensors::load(fin.join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap();
        assert_eq!(
            adapter.len(),
            2 * n_layer,
            "{}: {:?}",
            c.name,
            adapter.keys()
        );
        for i in 0..n_layer {
            let module = format!("base_model.model.{}", weight(i).trim_end_matches(".weight"));
            let a = &adapter[&format!("{module}.lora_A.weight")];
            let b = &adapter[&format!("{module}.lora_B.weight")];
            let w = out_rows(&base[&weight(i)], c.conv1d);
            assert_eq!(a.dims(), &[4, w[0].len()], "{}: {module} lora_A", c.name);
            assert_eq!(b.dims(), &[parts.len(), 4], "{}: {module} lora_B", c.name);
            for (r, (row, p)) in rows(b).iter().zip(&parts).enumerate() {
                assert!(
                    *p != 'k' || row.iter().all(|x| x.to_bits() == 0),
                    "{}: {module} lora_B key row {r} is {row:?}",
                    c.name
                );
            }
        }

        // merge-lora: keys' rows of the merged checkpoint bit-identical to the base.
        let merged = out.join("merged");
        merge_lora(&c.dir, &fin, &merged, false).unwrap();
        let m =
            candle_core::safetensors::load(merged.join("model.safetensors"), &Device::Cpu).unwrap();
        for i in 0..n_layer {
            let what = format!("{}: merged {}", c.name, weight(i));
            let (b0, b1) = (
                out_rows(&base[&weight(i)], c.conv1d),
                out_rows(&m[&weight(i)], c.conv1d),
            );
            check_rows(&what, &parts, &b0, &b1);
        }
    }

    // PEFT's loss of each adapter (computed from a run of this test).
    let peft = read_json(&extra_dir("lora_fused_peft.json"));
    let text = peft["text"].as_str().unwrap();
    for c in cases() {
        let fin = root.join(c.name).join("run/final");
        let ids = Tokenizer::from_dir(&c.dir).unwrap().encode(text).unwrap();
        let loss = |dir: &Path, adapter: Option<&Path>| {
            let model = load_model(dir, &BuildOptions::cpu_f32(), adapter).unwrap();
            lit_claire::perplexity::perplexity(&model, &ids, model.cfg.block_size, 4)
                .unwrap()
                .loss
        };
        let ours = loss(&c.dir, Some(&fin));
        let merged = loss(&root.join(c.name).join("merged"), None);
        let e = &peft["adapters"][c.name];
        assert_eq!(e["tokens"].as_u64(), Some(ids.len() as u64), "{}", c.name);
        let (theirs, base_loss) = (
            e["peft_loss"].as_f64().unwrap(),
            e["base_loss"].as_f64().unwrap(),
        );
        assert!(
            (ours - theirs).abs() < 1e-4,
            "{}: loss with the adapter {ours} vs PEFT's {theirs}",
            c.name
        );
        assert!(
            (merged - theirs).abs() < 1e-4,
            "{}: loss of the merged model {merged} vs PEFT's {theirs}",
            c.name
        );
        // The adapter does something: the loss moved from the base's.
        assert!(
            (theirs - base_loss).abs() > 1e-3,
            "{}: {theirs} vs base {base_loss}",
            c.name
        );
    }
}
