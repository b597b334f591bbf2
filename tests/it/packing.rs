//! Packed samples without cross-document attention (issue 13): a sample holding several
//! documents scores each as if it ran alone — block-diagonal causal attention, positions
//! restarting at each document (rotary and learned), the target that crosses a
//! boundary masked — so its summed loss and its gradients equal those of the documents
//! run separately, in our code and against PyTorch (`tests/fixtures/packing/`, written by
//! `utils/make_packing_fixture.py`), for all six families. Plus the data side:
//! `prepare-data --padding false` records the starts, older folders still load, and
//! `--cross-document-attention` gives the old numbers back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lit_claire::data::reader::PreparedData;
use lit_claire::hf::state_dict;
use lit_claire::model::TrainableModel;
use lit_claire::model::engine::{Grads, PassInput, train_pass};
use lit_claire::model::fused::with_plain_kernels;
use lit_claire::model::names::WeightNames;
use lit_claire::train::batches::{Batch, PackedSamples, SampleSet};
use lit_claire::train::evaluate::evaluate;
use lit_claire::train::load_train_data;
use serde_json::Value;

use crate::checks::{TOL, canonical_param, load, values};
use crate::common::*;
use crate::data_common::{fortunes_source, options, prepare, tokenizer};

fn fixture(family: &str) -> Value {
    read_json(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/packing")
            .join(format!("{family}.json")),
    )
}

fn documents(fix: &Value) -> Vec<Vec<u32>> {
    fix["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect()
}

/// Summed loss of a batch and the gradient of every parameter (under our names), from
/// the training engine (every other block checkpointed, so both kinds are covered).
fn loss_and_grads(tm: &TrainableModel, batch: &Batch) -> (f64, HashMap<String, Tensor>) {
    let input = PassInput {
        ids: &batch.inputs,
        targets: &batch.targets,
        mask: &batch.mask,
        docs: batch.docs.as_ref(),
        dropout: None,
        grad_scale: 1.0,
        checkpoint_every: 2,
    };
    let mut grads = Grads::new(&tm.vars);
    let sum = train_pass(&tm.model, &input, &mut grads).unwrap();
    let g = grads.take(&tm.vars).unwrap();
    let named = state_dict::named_gradients(&tm.model, &tm.vars, &g).unwrap();
    // The scoring pass (validation) scores the packed batch the same.
    let eval_sum = lit_claire::train::evaluate::loss_sum(&tm.model, batch).unwrap();
    assert!(
        (eval_sum - sum).abs() < 1e-4 * sum.abs().max(1.0),
        "training loss {sum} vs evaluation {eval_sum}"
    );
    (sum, named.into_iter().collect())
}

/// One row holding `docs` back to back, with their starts.
fn packed_row(docs: &[Vec<u32>]) -> (Vec<u32>, Vec<u32>) {
    let mut starts = Vec::new();
    let mut len = 0;
    for d in docs {
        if len > 0 {
            starts.push(len as u32);
        }
        len += d.len();
    }
    (docs.concat(), starts)
}

fn norm(t: &Tensor) -> f64 {
    values(t)
        .iter()
        .map(|&x| (x as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The packed sample against PyTorch running its documents one by one.
fn check_against_pytorch(family: &str) {
    let fix = fixture(family);
    let docs = documents(&fix);
    let tm = load(&reference_dir(family), true);
    let (row, starts) = packed_row(&docs);
    let batch = Batch::from_packed(
        std::slice::from_ref(&row),
        &[starts],
        row.len(),
        &Device::Cpu,
    )
    .unwrap();
    let targets = fix["targets"].as_u64().unwrap() as usize;
    assert_eq!(batch.tokens, targets, "{family}: counted targets");
    let (loss, grads) = loss_and_grads(&tm, &batch);
    let want = fix["loss_sum"].as_f64().unwrap();
    let per_target = (loss - want).abs() / targets as f64;
    assert!(
        per_target < TOL as f64,
        "{family}: packed loss {loss} vs PyTorch's documents run separately {want}"
    );
    let names = WeightNames::for_config(&tm.model.cfg);
    let norms = fix["grad_norms"].as_object().unwrap();
    assert_eq!(norms.len(), grads.len(), "{family}: parameters");
    for (name, n) in norms {
        let ours = norm(&grads[&canonical_param(&names, name)]);
        let n = n.as_f64().unwrap();
        let rel = (ours - n).abs() / n.max(1e-12);
        assert!(
            rel < TOL as f64,
            "{family}: gradient norm of {name} {ours} vs {n} (rel {rel:.2e})"
        );
    }
    for (name, want) in fix["grads"].as_object().unwrap() {
        let want: Vec<f32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let ours = values(&grads[&canonical_param(&names, name)]);
        // Learned positions: the fixture holds the table's first rows.
        let ours = &ours[..want.len()];
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = max_abs_diff(ours, &want) / scale;
        assert!(d < TOL, "{family}: gradient of {name} off by {d} relative");
    }
}

/// In our own code: two packed rows (one padded) against each document run alone.
fn check_packed_equals_separate(family: &str) {
    let docs = documents(&fixture(family));
    let tm = load(&reference_dir(family), true);
    let (row0, st0) = packed_row(&docs);
    let second = [docs[1].clone(), docs[0][..5].to_vec()];
    let (row1, st1) = packed_row(&second);
    let block = row0.len();
    let batch = Batch::from_packed(&[row0, row1], &[st0, st1], block, &Device::Cpu).unwrap();
    let (packed_loss, packed) = loss_and_grads(&tm, &batch);

    let mut loss = 0.0;
    let mut tokens = 0;
    let mut sum: HashMap<String, Tensor> = HashMap::new();
    for d in docs.iter().chain(&second) {
        let alone = Batch::from_samples(std::slice::from_ref(d), d.len(), &Device::Cpu).unwrap();
        assert!(alone.docs.is_none());
        tokens += alone.tokens;
        let (l, g) = loss_and_grads(&tm, &alone);
        loss += l;
        for (k, v) in g {
            let acc = match sum.remove(&k) {
                Some(a) => (a + v).unwrap(),
                None => v,
            };
            sum.insert(k, acc);
        }
    }
    assert_eq!(batch.tokens, tokens, "{family}: counted targets");
    assert!(
        (packed_loss - loss).abs() / (tokens as f64) < 1e-5,
        "{family}: packed loss {packed_loss} vs separate {loss}"
    );
    for (name, g) in &sum {
        crate::checks::assert_rel_close(
            &format!("{family}: gradient of {name}"),
            &packed[name],
            g,
            TOL,
        );
    }
}

macro_rules! packing_tests {
    ($($fam:ident),*) => {$(
        mod $fam {
            #[test]
            fn packed_sample_matches_pytorch_on_separate_documents() {
                super::check_against_pytorch(stringify!($fam));
            }
            #[test]
            fn packed_rows_equal_documents_run_alone() {
                super::check_packed_equals_separate(stringify!($fam));
            }
        }
    )*};
}

packing_tests!(llama, mistral, falcon, gpt2, gpt_neox, gpt_neo);

/// The plain twins of the fused kernels (what other devices run) keep documents apart
/// too: rotary with per-token tables, learned positions, sliding windows.
#[test]
fn plain_kernels_keep_packed_documents_apart() {
    with_plain_kernels(|| {
        for family in ["llama", "gpt2", "mistral", "gpt_neo"] {
            check_against_pytorch(family);
        }
    });
}

/// A packed prepared folder of the sample corpus with the fixture model (64-token
/// context, so documents run across samples and samples hold several).
fn packed_folder(root: &Path) -> PathBuf {
    let src = fortunes_source(root);
    let dest = root.join("packed");
    let mut o = options(&src, &dest);
    o.padding = false;
    prepare(&o).unwrap();
    dest
}

/// Issue 13: packed shards record their document starts in a `.docs` file beside each
/// `.bin` / `.idx`, and metadata.json says so. A document starts right after each EOS
/// inside a sample, and nowhere else.
#[test]
fn issue13_packed_shards_record_document_starts() {
    let tmp = temp_dir();
    let dest = packed_folder(tmp.path());
    let data = PreparedData::open(&dest).unwrap();
    assert!(data.metadata.document_starts && !data.metadata.padding);
    let eos = tokenizer().eos_ids[0];
    let mut several = 0;
    for ds in &data.datasets {
        for (split, stats) in [
            (&ds.train, &data.metadata.datasets[0].train),
            (&ds.validation, &data.metadata.datasets[0].validation),
        ] {
            assert!(split.has_doc_starts());
            for info in &stats.shards {
                assert!(
                    dest.join(&ds.name)
                        .join(format!("{}.docs", info.prefix))
                        .is_file()
                );
            }
            for i in 0..split.len() {
                let s = split.sample(i).unwrap();
                let want: Vec<u32> = (1..s.len())
                    .filter(|&p| s[p - 1] == eos)
                    .map(|p| p as u32)
                    .collect();
                let got = split.doc_starts(i).unwrap();
                assert_eq!(got, want, "sample {i}: {s:?}");
                several += (got.len() > 1) as usize;
            }
        }
    }
    assert!(several > 0, "some sample holds three documents or more");
    // A padded folder has no sidecar and needs none.
    let padded = tmp.path().join("padded");
    prepare(&options(&tmp.path().join("raw"), &padded)).unwrap();
    let data = PreparedData::open(&padded).unwrap();
    assert!(!data.metadata.document_starts);
    assert!(!data.datasets[0].train.has_doc_starts());
}

/// Make `dest` look like a packed folder prepared before issue 13: no `.docs` files and
/// no `document_starts` in its metadata and records.
fn make_old(dest: &Path) {
    fn walk(dir: &Path) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p);
            } else if p.extension().is_some_and(|x| x == "docs") {
                std::fs::remove_file(&p).unwrap();
            } else if p.extension().is_some_and(|x| x == "json") {
                let mut v = read_json(&p);
                strip(&mut v);
                std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
            }
        }
    }
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("document_starts");
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    walk(dest);
}

/// Issue 13: older packed folders (no document starts) still load, as one document
/// per sample; `--cross-document-attention` scores new folders exactly as before the
/// issue (the old batch, attention across documents), and by default documents are
/// kept apart, which scores fewer targets and another loss.
#[test]
fn issue13_old_folders_load_and_cross_document_attention_gives_old_numbers() {
    let tmp = temp_dir();
    let dest = packed_folder(tmp.path());
    let model = load(&reference_dir("llama"), false).model;
    let dev = Device::Cpu;
    let score = |dir: &Path, cross: bool| {
        let data = load_train_data(dir).unwrap();
        evaluate(
            &model,
            data.datasets[0].validation.as_ref(),
            data.block_size,
            4,
            None,
            cross,
            &dev,
        )
        .unwrap()
        .unwrap()
    };
    let apart = score(&dest, false);
    let cross = score(&dest, true);

    // The numbers before issue 13: plain batches of the samples, attention across.
    let data = load_train_data(&dest).unwrap();
    let val = data.datasets[0].validation.as_ref();
    let samples: Vec<Vec<u32>> = (0..val.len()).map(|i| val.sample(i).unwrap()).collect();
    let (mut sum, mut tokens) = (0.0, 0);
    for c in samples.chunks(4) {
        let b = Batch::from_samples(c, data.block_size, &dev).unwrap();
        sum += lit_claire::train::evaluate::loss_sum(&model, &b).unwrap();
        tokens += b.tokens;
    }
    assert_eq!(cross.tokens, tokens);
    assert!(
        (cross.loss - sum / tokens as f64).abs() < 1e-9,
        "{cross:?} vs {}",
        sum / tokens as f64
    );

    let boundaries: usize = (0..val.len())
        .map(|i| val.doc_starts(i).unwrap().len())
        .sum();
    assert!(boundaries > 0);
    assert_eq!(
        apart.tokens,
        tokens - boundaries,
        "one target fewer per boundary"
    );
    assert!(
        (apart.loss - cross.loss).abs() > 1e-3,
        "{apart:?} vs {cross:?}"
    );

    // An old folder: loads, one document per sample, the old numbers either way.
    make_old(&dest);
    let old = PreparedData::open(&dest).unwrap();
    assert!(!old.metadata.document_starts);
    assert!(!old.datasets[0].validation.has_doc_starts());
    assert_eq!(score(&dest, false), cross);
    assert_eq!(score(&dest, true), cross);
}

/// In-memory packing cuts like prepare-data and records the same starts.
#[test]
fn packed_samples_in_memory_match_prepare_data() {
    let tmp = temp_dir();
    let dest = packed_folder(tmp.path());
    let data = PreparedData::open(&dest).unwrap();
    let val = &data.datasets[0].validation;
    let eos = tokenizer().eos_ids[0];
    let stream: Vec<u32> = (0..val.len())
        .flat_map(|i| val.sample(i).unwrap())
        .collect();
    let docs = crate::data_common::split_docs(&stream, eos);
    let mem = PackedSamples::pack(&docs, data.block_size);
    assert_eq!(mem.len(), val.len());
    for i in 0..val.len() {
        assert_eq!(mem.samples[i], val.sample(i).unwrap());
        assert_eq!(mem.doc_starts(i).unwrap(), val.doc_starts(i).unwrap());
    }
}

/// Training data of packed samples of the sample corpus (in memory).
fn packed_train_data(block: usize) -> lit_claire::train::batches::TrainData {
    use lit_claire::train::batches::{TrainData, TrainDataset};
    use std::sync::Arc;
    let tok = tokenizer();
    let text = std::fs::read_to_string(crate::data_common::fortunes_path()).unwrap();
    let docs: Vec<Vec<u32>> = text
        .split("\n%\n")
        .take(80)
        .map(|d| tok.encode_document(d).unwrap())
        .collect();
    TrainData {
        block_size: block,
        tokenizer_hash: Some(tok.hash.clone()),
        origin: None,
        datasets: vec![TrainDataset {
            name: "fortunes".into(),
            weight: 1.0,
            train: Arc::new(PackedSamples::pack(&docs[8..], block)),
            validation: Arc::new(PackedSamples::pack(&docs[..8], block)),
        }],
    }
}

/// Issue 13: the setting is recorded in the run (hyperparameters.toml and every
/// checkpoint); a resume keeps it and refuses a flag that contradicts it; and it
/// changes what training computes on packed data.
#[test]
fn issue13_cross_document_attention_is_recorded_and_resume_cannot_switch() {
    use lit_claire::train::{Trainer, pretrain_with_data};
    let apart = temp_dir();
    let mut cfg = crate::trainer::config(apart.path());
    cfg.max_steps = Some(4);
    cfg.eval_interval = 2;
    cfg.save_interval = 2;
    Trainer::new(&cfg, packed_train_data(33))
        .unwrap()
        .run(Some(3))
        .unwrap();
    let hp = std::fs::read_to_string(apart.path().join("hyperparameters.toml")).unwrap();
    assert!(hp.contains("cross_document_attention = false"), "{hp}");

    let mut again = cfg.clone();
    again.resume = Some("auto".into());
    again.cross_document_attention = Some(true);
    let e = Trainer::new(&again, packed_train_data(33))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--cross-document-attention false"), "{e}");
    again.cross_document_attention = None;
    let s = pretrain_with_data(&again, packed_train_data(33)).unwrap();
    assert_eq!(s.steps, 4);
    let state = read_json(&apart.path().join("final/training_state.json"));
    assert_eq!(
        state["hyperparameters"]["cross_document_attention"],
        Value::Bool(false)
    );

    // Attention across documents trains another model.
    let cross = temp_dir();
    let mut c = crate::trainer::config(cross.path());
    c.max_steps = Some(4);
    c.eval_interval = 2;
    c.save_interval = 2;
    c.cross_document_attention = Some(true);
    let s2 = pretrain_with_data(&c, packed_train_data(33)).unwrap();
    assert_ne!(s.final_loss, s2.final_loss);
}
