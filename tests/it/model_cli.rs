//! The model commands as a user runs them: perplexity, generate, chat, and their
//! one-line errors; and the KV cache against the full forward pass.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use candle_core::{Device, IndexOp, Tensor};
use lit_claire::hf::load_model;
use lit_claire::model::BuildOptions;
use lit_claire::model::engine::{self, KvCache};

use crate::common::*;

/// Run the binary; (exit success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A failure with exactly one line on stderr, starting `error:`, and no panic.
fn assert_one_line_error(args: &[&str], needle: &str) {
    let (ok, _, err) = run(args);
    assert!(!ok, "{args:?} succeeded");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: {err}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "{args:?}: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

fn eval_text(dir: &Path) -> std::path::PathBuf {
    let exp = expected("llama");
    let p = dir.join("eval.txt");
    std::fs::write(&p, exp["eval_text"].as_str().unwrap()).unwrap();
    p
}

#[test]
fn perplexity_json_matches_the_reference_loss() {
    let d = temp_dir();
    let exp = expected("llama");
    // The reference loss is over its first 24 tokens; write exactly those back as text.
    let tok = lit_claire::tokenizer::Tokenizer::from_dir(&reference_dir("llama")).unwrap();
    let text = tok.decode(&ids(&exp["input_ids"])).unwrap();
    assert_eq!(
        tok.encode(&text).unwrap(),
        ids(&exp["input_ids"]),
        "decode/encode round trip"
    );
    let input = d.path().join("t.txt");
    std::fs::write(&input, &text).unwrap();
    let dir = reference_dir("llama");
    let (ok, out, err) = run(&[
        "perplexity",
        "--checkpoint-dir",
        dir.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    assert!((loss - exp["loss"].as_f64().unwrap()).abs() < 1e-4, "{v}");
    assert!((v["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-6);
    assert_eq!(v["tokens"].as_u64().unwrap(), 24);
}

#[test]
fn long_texts_are_scored_in_windows() {
    let model = load_model(&reference_dir("llama"), &BuildOptions::cpu_f32(), None).unwrap();
    let tok = lit_claire::tokenizer::Tokenizer::from_dir(&reference_dir("llama")).unwrap();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/fortunes-br.txt"),
    )
    .unwrap();
    let ids = tok.encode(&text[..4000]).unwrap();
    assert!(ids.len() > 600);
    let whole = lit_claire::perplexity::perplexity(&model, &ids, 256, 4).unwrap();
    // Windows of 100: the same tokens are predicted once each, from shorter contexts.
    let small = lit_claire::perplexity::perplexity(&model, &ids, 100, 3).unwrap();
    assert_eq!(whole.tokens, small.tokens);
    assert!((whole.loss - small.loss).abs() < 0.5 && whole.loss != small.loss);
    // One window equals the plain mean over the first 256 tokens.
    let first = lit_claire::perplexity::perplexity(&model, &ids[..256], 256, 1).unwrap();
    let (logits, loss) = crate::checks::loss_of(&model, &ids[..256]);
    assert_eq!(logits.dim(0).unwrap(), 256);
    assert!((first.loss - loss).abs() < 1e-5);
    // Windows longer than the model's context are refused (issue 9), even for a text
    // that would fit in one.
    assert!(lit_claire::perplexity::perplexity(&model, &ids[..256], 1000, 1).is_err());
}

#[test]
fn generate_json_is_greedy_and_reproducible_when_sampling() {
    let dir = reference_dir("llama");
    let d = dir.to_str().unwrap();
    let args = [
        "generate",
        "--checkpoint-dir",
        d,
        "--prompt",
        "O Botafogo",
        "--max-new-tokens",
        "8",
        "--format",
        "json",
    ];
    let (ok, out, err) = run(&[&args[..], &["--temperature", "0"]].concat());
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["new_token_ids"].as_array().unwrap().len(), 8);
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
    let sample = |seed: &str| {
        let (ok, out, err) = run(&[
            &args[..],
            &[
                "--temperature",
                "0.9",
                "--top-k",
                "40",
                "--top-p",
                "0.9",
                "--seed",
                seed,
            ],
        ]
        .concat());
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["new_token_ids"].clone()
    };
    assert_eq!(sample("1"), sample("1"));
    assert_ne!(sample("1"), sample("2"));
}

#[test]
fn chat_streams_answers_and_keeps_history() {
    let dir = reference_dir("llama");
    let mut child = Command::new(bin())
        .args([
            "chat",
            "--checkpoint-dir",
            dir.to_str().unwrap(),
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all("Bonjour !\nComment ça va ?\n\n".as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("[Intervenant 2:]").count(), 2, "{stdout}");
}

#[test]
fn the_kv_cache_gives_the_full_forward_logits() {
    // Windowed (mistral: 8, gpt_neo: local 8), multi-query (falcon), learned positions (gpt2).
    for family in ["mistral", "gpt_neo", "falcon", "gpt2"] {
        let model = load_model(&reference_dir(family), &BuildOptions::cpu_f32(), None).unwrap();
        let ids: Vec<u32> = (0..30).map(|i| (i * 37 % 500) as u32 + 3).collect();
        let all = Tensor::from_vec(ids.clone(), (1, 30), &Device::Cpu).unwrap();
        let full = engine::logits(&model, &all, None, false)
            .unwrap()
            .i(0)
            .unwrap();
        let mut cache = KvCache::new(model.cfg.n_layer);
        // A prompt of 11, then chunks of 1 and 3 tokens.
        let mut pos = 0;
        for len in [11, 1, 3, 1, 1, 5, 8] {
            let chunk =
                Tensor::from_vec(ids[pos..pos + len].to_vec(), (1, len), &Device::Cpu).unwrap();
            let got = engine::logits(&model, &chunk, Some(&mut cache), false)
                .unwrap()
                .i(0)
                .unwrap();
            let want = full.narrow(0, pos, len).unwrap();
            let d = max_abs_diff(
                &got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                &want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(
                d < 1e-4,
                "{family}: positions {pos}..{} differ by {d}",
                pos + len
            );
            pos += len;
            // The memory plan's figure is what the cache holds (windowed layers keep
            // their last w − 1 keys).
            assert_eq!(
                cache.bytes() as u64,
                lit_claire::train::estimate::kv_cache_bytes(&model.cfg, 4, 1, pos),
                "{family}: KV cache after {pos} tokens"
            );
        }
    }
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let d = temp_dir();
    let text = eval_text(d.path());
    let t = text.to_str().unwrap();
    let llama = reference_dir("llama");
    let l = llama.to_str().unwrap();

    assert_one_line_error(
        &[
            "perplexity",
            "--checkpoint-dir",
            "/no/such/model",
            "--input",
            t,
        ],
        "config.json not found",
    );
    assert_one_line_error(
        &[
            "perplexity",
            "--checkpoint-dir",
            l,
            "--input",
            "/no/such.txt",
        ],
        "/no/such.txt not found",
    );

    // Unknown model_type, listing the supported ones.
    let bad = d.path().join("bert");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("config.json"), r#"{"model_type": "bert"}"#).unwrap();
    assert_one_line_error(
        &[
            "perplexity",
            "--checkpoint-dir",
            bad.to_str().unwrap(),
            "--input",
            t,
        ],
        "supported: llama",
    );

    // A config that does not match the weights: the tensor and both shapes are named.
    let wrong = d.path().join("wrong");
    std::fs::create_dir(&wrong).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(llama.join(f), wrong.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(llama.join("config.json")).unwrap()).unwrap();
    cfg["intermediate_size"] = 128.into();
    std::fs::write(wrong.join("config.json"), cfg.to_string()).unwrap();
    assert_one_line_error(
        &[
            "perplexity",
            "--checkpoint-dir",
            wrong.to_str().unwrap(),
            "--input",
            t,
        ],
        "mlp.gate_proj.weight",
    );

    // Weights missing.
    std::fs::remove_file(wrong.join("model.safetensors")).unwrap();
    assert_one_line_error(
        &[
            "perplexity",
            "--checkpoint-dir",
            wrong.to_str().unwrap(),
            "--input",
            t,
        ],
        "model.safetensors",
    );

    // A prompt longer than the context.
    let long = "abc ".repeat(400);
    assert_one_line_error(
        &["generate", "--checkpoint-dir", l, "--prompt", &long],
        "context of 256",
    );
    // Bad sampling flags, bad device, bad precision.
    assert_one_line_error(
        &[
            "generate",
            "--checkpoint-dir",
            l,
            "--prompt",
            "a",
            "--top-p",
            "1.5",
        ],
        "--top-p",
    );
    assert_one_line_error(
        &[
            "generate",
            "--checkpoint-dir",
            l,
            "--prompt",
            "a",
            "--device",
            "tpu",
        ],
        "--device tpu",
    );
    assert_one_line_error(
        &[
            "generate",
            "--checkpoint-dir",
            l,
            "--prompt",
            "a",
            "--precision",
            "8-bit",
        ],
        "--precision 8-bit",
    );
    // An adapter for another base model.
    let neox_adapter = reference_dir("gpt_neox").join("lora");
    assert_one_line_error(
        &[
            "perplexity",
            "--checkpoint-dir",
            l,
            "--input",
            t,
            "--adapter",
            neox_adapter.to_str().unwrap(),
        ],
        "another base model",
    );
}

#[test]
fn completions_keep_the_space_a_sentencepiece_token_starts_with() {
    // `▁bem` decoded alone is "bem"; after a prompt it is " bem". Generated text is
    // decoded with the prompt's end, streamed or not.
    let spm = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm_tokenizer");
    let tok = lit_claire::tokenizer::Tokenizer::from_dir(&spm).unwrap();
    for (prompt, text) in [
        ("Olá mundo, tudo", "Olá mundo, tudo bem? Sim, tudo ótimo."),
        ("Prompt", "Prompt\nnova linha"),
        ("日", "日本 語"),
    ] {
        let all = tok.encode(text).unwrap();
        let n = tok.encode(prompt).unwrap().len();
        let (p, new) = all.split_at(n);
        assert_eq!(tok.decode(p).unwrap(), prompt);
        let want = &text[prompt.len()..];
        assert_eq!(tok.decode_after(p, new).unwrap(), want);
        let mut stream = lit_claire::generate::TextStream::after(&tok, p).unwrap();
        let streamed: String = new.iter().map(|&id| stream.push(id).unwrap()).collect();
        assert_eq!(streamed, want);
    }
    // What decoding the new tokens alone would give: the space is lost.
    let all = tok.encode("tudo bem").unwrap();
    let k = (2..all.len())
        .find(|&k| {
            tok.inner()
                .id_to_token(all[k])
                .unwrap()
                .starts_with('\u{2581}')
        })
        .unwrap();
    assert!(!tok.decode(&all[k..]).unwrap().starts_with(' '));
    assert!(
        tok.decode_after(&all[..k], &all[k..])
            .unwrap()
            .starts_with(' ')
    );
}

#[test]
fn chat_answers_stream_as_they_are_kept() {
    // What is streamed is the answer kept in the history (the CLI prints the tag).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/models/tiny-llama-fortunes");
    let model = load_model(&dir, &BuildOptions::cpu_f32(), None).unwrap();
    let tok = lit_claire::tokenizer::Tokenizer::from_dir(&dir).unwrap();
    let sampling = lit_claire::generate::Sampling {
        temperature: 0.8,
        ..Default::default()
    };
    let mut chat = lit_claire::chat::ChatSession::new(&model, &tok, sampling, 30);
    for message in ["Bom dia!", "O que é o amor?"] {
        let mut streamed = String::new();
        let answer = chat
            .respond(message, |piece| {
                streamed.push_str(piece);
                Ok(())
            })
            .unwrap();
        assert!(!answer.is_empty());
        assert!(!streamed.starts_with(char::is_whitespace), "{streamed:?}");
        assert_eq!(streamed.trim_end(), answer);
    }
}

/// `reference-check` (what utils/device_check.sh runs on a GPU) agrees with PyTorch on
/// every family on the CPU, and names the families when the tolerance is not met.
#[test]
fn reference_check_scores_every_family() {
    let fixtures = reference_dir("llama").parent().unwrap().to_path_buf();
    let (ok, out, err) = run(&["reference-check", "--fixtures", fixtures.to_str().unwrap()]);
    assert!(ok, "{err}");
    let families: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["family"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(families.len(), FAMILIES.len(), "{out}");
    assert_one_line_error(
        &[
            "reference-check",
            "--fixtures",
            fixtures.to_str().unwrap(),
            "--tolerance",
            "0",
        ],
        "llama",
    );
    assert_one_line_error(
        &["reference-check", "--fixtures", "/nonexistent"],
        "/nonexistent",
    );
}
