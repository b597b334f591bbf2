//! prepare-data: round trip, padding and packing, turn-aware cutting, augmentation,
//! groups and determinism.

use std::collections::VecDeque;

use lit_claire::data::chunk::DEFAULT_TURN_PATTERN;
use lit_claire::data::documents::TextLayout;
use lit_claire::data::groups::Groups;
use lit_claire::data::reader::PreparedData;

use crate::common::temp_dir;
use crate::data_common::*;

/// Each document of `all` must be the next one of `train` or of `val`, in order.
fn assert_interleaves(all: &[Vec<u32>], train: Vec<Vec<u32>>, val: Vec<Vec<u32>>) {
    let (mut t, mut v) = (VecDeque::from(train), VecDeque::from(val));
    for (i, doc) in all.iter().enumerate() {
        if t.front() == Some(doc) {
            t.pop_front();
        } else if v.front() == Some(doc) {
            v.pop_front();
        } else {
            panic!("document {i} is neither the next training nor the next validation document");
        }
    }
    assert!(
        t.is_empty() && v.is_empty(),
        "extra documents in the output"
    );
}

#[test]
fn data_round_trip_with_padding() {
    let tmp = temp_dir();
    let src = fortunes_source(tmp.path());
    let dest = tmp.path().join("out");
    let report = prepare(&options(&src, &dest)).unwrap();
    assert_eq!(report.datasets.len(), 1);

    let tok = tokenizer();
    let eos = tok.eos_ids[0];
    let texts = fortunes();
    let docs: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tok.encode_document(t).unwrap())
        .collect();

    let data = PreparedData::open(&dest).unwrap();
    assert_eq!(data.block_size, 65);
    assert_eq!(data.tokenizer_hash, tok.hash);
    data.check_tokenizer(&tok).unwrap();
    // Another tokenizer.json (here the same one re-serialised) is refused.
    let other = tmp.path().join("other-model");
    std::fs::create_dir_all(&other).unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model_dir().join("tokenizer.json")).unwrap())
            .unwrap();
    std::fs::write(
        other.join("tokenizer.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    let other = lit_claire::tokenizer::Tokenizer::from_dir(&other).unwrap();
    let err = data.check_tokenizer(&other).unwrap_err().to_string();
    assert!(err.contains("another tokenizer"), "{err}");
    let ds = data.dataset("fortunes-br").unwrap();
    let (train, val) = (samples(&ds.train), samples(&ds.validation));
    assert!(!val.is_empty() && train.len() > 10 * val.len());
    let meta = &data.metadata.datasets[0];
    for (split, stats, ss) in [
        (&ds.train, &meta.train, &train),
        (&ds.validation, &meta.validation, &val),
    ] {
        // A sample is one chunk of one document: EOS only at its end.
        for s in ss {
            assert!(!s.is_empty() && s.len() <= 65);
            assert!(!s[..s.len() - 1].contains(&eos));
        }
        assert_eq!(
            split.tokens(),
            ss.iter().map(|s| s.len() as u64).sum::<u64>()
        );
        let padded: u64 = ss.iter().map(|s| 65 - s.len() as u64).sum();
        assert_eq!(stats.padded_tokens, padded);
    }
    assert!(train.iter().any(|s| s.len() == 65), "some document is cut");

    let train_docs = split_docs(&train.concat(), eos);
    let val_docs = split_docs(&val.concat(), eos);
    assert_eq!(train_docs.len() as u64, meta.train.documents);
    // Detokenized documents are the raw ones.
    for d in train_docs.iter().chain(&val_docs).take(300) {
        let text = tok.decode(d).unwrap();
        assert!(
            texts.contains(&text),
            "decoded document not in the corpus: {text:?}"
        );
    }
    assert_interleaves(&docs, train_docs, val_docs);
}

#[test]
fn data_packing_fills_blocks() {
    let tmp = temp_dir();
    let src = fortunes_source(tmp.path());
    let dest = tmp.path().join("out");
    let mut o = options(&src, &dest);
    o.padding = false;
    prepare(&o).unwrap();

    let tok = tokenizer();
    let eos = tok.eos_ids[0];
    let docs: Vec<Vec<u32>> = fortunes()
        .iter()
        .map(|t| tok.encode_document(t).unwrap())
        .collect();
    let data = PreparedData::open(&dest).unwrap();
    let ds = &data.datasets[0];
    let meta = &data.metadata.datasets[0];
    let (train, val) = (samples(&ds.train), samples(&ds.validation));
    for (ss, stats) in [(&train, &meta.train), (&val, &meta.validation)] {
        let (last, full) = ss.split_last().unwrap();
        assert!(
            full.iter().all(|s| s.len() == 65),
            "all but the last sample are full"
        );
        assert!(!last.is_empty() && last.len() <= 65);
        assert_eq!(stats.padded_tokens, 65 - last.len() as u64);
    }
    // Documents run across samples: some sample holds an EOS before its end.
    assert!(train.iter().any(|s| s[..s.len() - 1].contains(&eos)));
    assert_interleaves(
        &docs,
        split_docs(&train.concat(), eos),
        split_docs(&val.concat(), eos),
    );
}

/// Byte offset in `text` where each chunk after the first starts.
fn cut_points(text: &str, chunks: &[Vec<u32>]) -> Vec<usize> {
    let tok = tokenizer();
    let enc = tok.inner().encode(text, false).unwrap();
    let offsets = enc.get_offsets();
    let mut pos = 0;
    let mut out = Vec::new();
    let lead = tok.adds_bos as usize;
    for c in &chunks[..chunks.len() - 1] {
        pos += c.len();
        out.push(offsets.get(pos - lead).map_or(text.len(), |o| o.0));
    }
    out
}

/// Training samples of dataset `name` grouped by document (a document ends with the
/// sample ending in EOS).
fn chunks_of(data: &PreparedData, name: &str) -> Vec<Vec<Vec<u32>>> {
    let eos = tokenizer().eos_ids[0];
    let mut docs = Vec::new();
    let mut cur = Vec::new();
    for s in samples(&data.dataset(name).unwrap().train) {
        let end = *s.last().unwrap() == eos;
        cur.push(s);
        if end {
            docs.push(std::mem::take(&mut cur));
        }
    }
    docs
}

#[test]
fn data_turn_aware_cutting() {
    let tmp = temp_dir();
    let src = tmp.path().join("raw");
    std::fs::create_dir_all(src.join("dialogues")).unwrap();
    let dialogues: Vec<String> = (0..40).map(|i| dialogue(i, 12 + i % 9)).collect();
    std::fs::write(src.join("dialogues/train.txt"), dialogues.join("\n") + "\n").unwrap();
    std::fs::write(src.join("dialogues/test.txt"), dialogue(99, 5) + "\n").unwrap();
    let prose = fortunes()[..30].join(" ").replace('\n', " ");
    let word = "x".repeat(400);
    std::fs::create_dir_all(src.join("prose")).unwrap();
    std::fs::write(
        src.join("prose/a.txt"),
        format!("{prose}\n{word}\n{prose}\n"),
    )
    .unwrap();
    std::fs::write(src.join("prose/dev.txt"), "Fim.\n").unwrap();

    let run = |label: &str, pattern: &str| -> PreparedData {
        let dest = tmp.path().join(label);
        let mut o = options(&src, &dest);
        o.read.layout = TextLayout::LinePerDocument;
        o.turn_pattern = pattern.to_string();
        o.turn_window = 0.5;
        prepare(&o).unwrap();
        PreparedData::open(&dest).unwrap()
    };
    // (cuts at a turn, cuts) over the training dialogues, checking none is inside a word.
    let count = |data: &PreparedData| -> (usize, usize) {
        let meta = data
            .metadata
            .datasets
            .iter()
            .find(|d| d.name == "dialogues")
            .unwrap();
        assert_eq!(
            meta.validation.documents, 1,
            "test.txt is the validation split"
        );
        let (mut at_turn, mut cuts) = (0, 0);
        for (text, chunks) in dialogues.iter().zip(chunks_of(data, "dialogues")) {
            for b in cut_points(text, &chunks) {
                let (before, after) = (&text[..b], &text[b..]);
                assert!(
                    before.ends_with(' ') || after.starts_with(' '),
                    "cut inside a word: {before:?} | {after:?}"
                );
                cuts += 1;
                at_turn += after.trim_start().starts_with("[Intervenant") as usize;
            }
        }
        (at_turn, cuts)
    };
    // Turns are a few words long, so one always lies in the last half of a 65-token
    // window: every cut is at a turn.
    let with_turns = run("turns", DEFAULT_TURN_PATTERN);
    let (at_turn, cuts) = count(&with_turns);
    assert!(
        cuts > 40,
        "dialogues are long enough to be cut ({cuts} cuts)"
    );
    assert_eq!(at_turn, cuts);
    // Without the pattern, cuts fall at word boundaries, most of them not at a turn.
    let (at_turn, cuts) = count(&run("words", ""));
    assert!(at_turn < cuts / 2, "{at_turn} of {cuts} cuts at turns");

    // Prose is cut at spaces, the 400-letter word hard; nothing dropped or repeated.
    let tok = tokenizer();
    let docs = chunks_of(&with_turns, "prose");
    let texts = [prose.as_str(), &word, &prose];
    assert_eq!(docs.len(), 3);
    for (text, chunks) in texts.iter().zip(&docs) {
        assert_eq!(chunks.concat(), tok.encode_document(text).unwrap());
        assert!(chunks.len() > 2);
    }
    for b in cut_points(&prose, &docs[0]) {
        assert!(prose[..b].ends_with(' ') || prose[b..].starts_with(' '));
    }
    let hard = &docs[1];
    assert!(
        hard[..hard.len() - 1].iter().all(|c| c.len() == 65),
        "no boundary: hard cuts"
    );
}

#[test]
fn data_augment_training_dialogues_only() {
    let tmp = temp_dir();
    let src = tmp.path().join("raw");
    std::fs::create_dir_all(src.join("talk")).unwrap();
    let dialogues: Vec<String> = (0..20).map(|i| dialogue(i, 4)).collect();
    std::fs::write(src.join("talk/train.txt"), dialogues.join("\n") + "\n").unwrap();
    std::fs::write(src.join("talk/dev.txt"), dialogue(50, 4) + "\n").unwrap();
    let dest = tmp.path().join("out");
    let mut o = options(&src, &dest);
    o.read.layout = TextLayout::LinePerDocument;
    o.max_length = Some(512);
    o.augment = 2;
    let report = prepare(&o).unwrap();
    let d = &report.datasets[0];
    assert_eq!(d.train.documents, 60);
    assert_eq!(d.train.augmented_documents, 40);
    assert_eq!(d.validation.documents, 1);
    assert_eq!(d.validation.augmented_documents, 0);

    let tok = tokenizer();
    let data = PreparedData::open(&dest).unwrap();
    let ds = &data.datasets[0];
    let texts: Vec<String> = samples(&ds.train)
        .iter()
        .map(|s| tok.decode(s).unwrap())
        .collect();
    // Original, then its two variants: same words, other tags.
    let strip = |t: &str| {
        regex::Regex::new(r"\[[^\]]*:\]")
            .unwrap()
            .replace_all(t, "#")
            .into_owned()
    };
    for (i, orig) in dialogues.iter().enumerate() {
        assert_eq!(&texts[3 * i], orig);
        for v in &texts[3 * i + 1..3 * i + 3] {
            assert_ne!(v, orig);
            assert_eq!(strip(v), strip(orig));
        }
    }
    assert_eq!(
        tok.decode(&ds.validation.sample(0).unwrap()).unwrap(),
        dialogue(50, 4)
    );
}

#[test]
fn data_groups_and_weights() {
    let tmp = temp_dir();
    let src = tmp.path().join("raw");
    std::fs::create_dir_all(&src).unwrap();
    let docs = fortunes();
    std::fs::write(src.join("Theatre_Moliere.txt"), docs[..40].join("\n%\n")).unwrap();
    std::fs::write(src.join("news.txt"), docs[40..80].join("\n%\n")).unwrap();
    std::fs::write(src.join("misc.txt"), docs[80..120].join("\n%\n")).unwrap();
    let groups = tmp.path().join("groups.json");
    std::fs::write(
        &groups,
        r#"{"groups": [{"name": "theatre", "patterns": ["Theatre*"], "weight": 3.5},
                       {"name": "press", "patterns": ["new?"], "weight": 0.5}]}"#,
    )
    .unwrap();
    let dest = tmp.path().join("out");
    let mut o = options(&src, &dest);
    o.groups = Some(groups);
    prepare(&o).unwrap();
    let data = PreparedData::open(&dest).unwrap();
    let got: Vec<(&str, &str, f64)> = data
        .datasets
        .iter()
        .map(|d| (d.name.as_str(), d.group.as_str(), d.weight))
        .collect();
    assert_eq!(
        got,
        [
            ("Theatre_Moliere", "theatre", 3.5),
            ("misc", "misc", 1.0),
            ("news", "press", 0.5)
        ]
    );

    // The shipped example parses and places the sample corpus.
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/dataset_groups.json");
    let g = Groups::load(&shipped).unwrap();
    assert!(g.groups.len() >= 3);
    assert_ne!(g.assign("fortunes-br").0, "fortunes-br");
}

#[test]
fn data_identical_whatever_the_thread_count() {
    let tmp = temp_dir();
    let src = fortunes_source(tmp.path());
    std::fs::create_dir_all(src.join("talk")).unwrap();
    let dialogues: Vec<String> = (0..30).map(|i| dialogue(i, 10)).collect();
    std::fs::write(src.join("talk/a.txt"), dialogues.join("\n%\n")).unwrap();
    let run = |threads: usize| {
        let dest = tmp.path().join(format!("out{threads}"));
        let mut o = options(&src, &dest);
        o.augment = 2;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| prepare(&o)).unwrap();
        tree(&dest)
    };
    let (one, two) = (run(1), run(2));
    assert!(
        one.len() > 30,
        "shards, metadata and records: {} files",
        one.len()
    );
    assert_eq!(one, two);
}

#[test]
fn data_round_trip_with_a_sentencepiece_tokenizer() {
    // Llama-2 and Mistral tokenize with SentencePiece (`▁` words, byte fallback, BOS
    // added): the same guarantees hold, word-boundary cuts included.
    let tmp = temp_dir();
    let src = fortunes_source(tmp.path());
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(model_dir().join("config.json"), model.join("config.json")).unwrap();
    let spm = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spm_tokenizer");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(spm.join(f), model.join(f)).unwrap();
    }
    let dest = tmp.path().join("out");
    let mut o = options(&src, &dest);
    o.checkpoint_dir = model.clone();
    prepare(&o).unwrap();
    let tok = lit_claire::tokenizer::Tokenizer::from_dir(&model).unwrap();
    assert_eq!((tok.bos_id, tok.adds_bos), (Some(1), true));
    let eos = tok.eos_ids[0];
    let texts = fortunes();
    let docs: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tok.encode_document(t).unwrap())
        .collect();
    assert!(docs.iter().all(|d| d[0] == 1 && d.last() == Some(&eos)));
    let data = PreparedData::open(&dest).unwrap();
    data.check_tokenizer(&tok).unwrap();
    let ds = &data.datasets[0];
    let (train, val) = (samples(&ds.train), samples(&ds.validation));
    assert!(train.iter().any(|s| s.len() == 65), "some document is cut");
    // A cut never splits a word: whitespace (`▁` included) just before or after it.
    let piece = |id: u32| tok.inner().id_to_token(id).unwrap();
    let mut cuts = 0;
    for (prev, s) in train.iter().zip(&train[1..]) {
        if s[0] != 1 {
            let (last, first) = (piece(*prev.last().unwrap()), piece(s[0]));
            let space = ["\u{2581}", "\t", "\n", "<0x0A>", "<0x09>"];
            let after_space = space.iter().any(|w| last.ends_with(w));
            let before_space = space.iter().any(|w| first.starts_with(w));
            assert!(
                before_space || after_space,
                "a chunk starts inside a word: {last:?} | {first:?}"
            );
            cuts += 1;
        }
    }
    assert!(cuts > 10, "{cuts} cut chunks");
    let (train_docs, val_docs) = (
        split_docs(&train.concat(), eos),
        split_docs(&val.concat(), eos),
    );
    for d in train_docs.iter().chain(&val_docs).take(300) {
        let text = tok.decode(d).unwrap();
        assert!(
            texts.contains(&text),
            "decoded document not in the corpus: {text:?}"
        );
    }
    assert_interleaves(&docs, train_docs, val_docs);
}
