//! `dedup`: near duplicates found against exact Jaccard similarity, exact copies
//! removed, records written back byte for byte (jsonl fields, gzip), the report, the
//! same result for any thread count, and one-line errors that leave nothing behind.

use std::collections::{BTreeSet, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use lit_claire::Error;
use lit_claire::data::dedup::{CLUSTERS_FILE, DedupOptions, DedupReport, REPORT_FILE, dedup};
use lit_claire::data::documents::{DocFormat, TextLayout, records};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use crate::common::*;

fn fortunes() -> Vec<String> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/fortunes-br.txt");
    let fmt = DocFormat::Text(TextLayout::Separator("%".into()));
    records(&p, fmt, false)
        .unwrap()
        .map(|r| r.unwrap().text)
        .collect()
}

fn write_gz(path: &Path, text: &str) {
    let f = std::fs::File::create(path).unwrap();
    let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    gz.write_all(text.as_bytes()).unwrap();
    gz.finish().unwrap();
}

fn read_gz(path: &Path) -> String {
    let mut s = String::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut s)
        .unwrap();
    s
}

/// The shingle set the way the module docs define it, written independently:
/// lower-cased words, windows of `n` joined by a space, or the whole text if shorter.
fn shingle_set(text: &str, n: usize) -> Vec<u64> {
    let lower: String = text.chars().flat_map(char::to_lowercase).collect();
    let words: Vec<&str> = lower.split_whitespace().collect();
    let grams: Vec<String> = if words.len() < n {
        vec![words.join(" ")]
    } else {
        words.windows(n).map(|w| w.join(" ")).collect()
    };
    // 64-bit hashes of the shingles; collisions among a few hundred thousand are ~1e-8.
    let mut set: Vec<u64> = grams
        .iter()
        .map(|g| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            g.hash(&mut h);
            h.finish()
        })
        .collect();
    set.sort_unstable();
    set.dedup();
    set
}

fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    let (mut i, mut j, mut both) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                both += 1;
                i += 1;
                j += 1;
            }
        }
    }
    both as f64 / (a.len() + b.len() - both) as f64
}

/// Originals of at least `min_words` words, each a run of consecutive fortunes.
fn originals(min_words: usize) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut cur: Vec<String> = Vec::new();
    for f in fortunes() {
        cur.extend(f.split_whitespace().map(String::from));
        if cur.len() >= min_words {
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

/// An edited copy of `words`: `subs` words replaced by words of the pool, then the last
/// `cut` words dropped; `respace` rewrites case and spacing only (same shingles).
fn edit(
    words: &[String],
    subs: usize,
    cut: usize,
    respace: bool,
    pool: &[String],
    rng: &mut ChaCha8Rng,
) -> String {
    let mut w = words.to_vec();
    for _ in 0..subs {
        let i = rng.random_range(0..w.len());
        w[i] = pool[rng.random_range(0..pool.len())].clone();
    }
    w.truncate(w.len() - cut);
    if respace {
        w.iter()
            .enumerate()
            .map(|(i, x)| {
                if i % 7 == 0 {
                    format!("{}\n  ", x.to_uppercase())
                } else {
                    format!("{x} ")
                }
            })
            .collect()
    } else {
        w.join(" ")
    }
}

/// Union-find keeping the smallest index as root.
fn root(parent: &mut [usize], mut x: usize) -> usize {
    while parent[x] != x {
        parent[x] = parent[parent[x]];
        x = parent[x];
    }
    x
}

/// Precision and recall of the removed set against the truth from exact Jaccard
/// similarity, on a corpus with planted copies on both sides of the threshold.
///
/// Copies are planted at exact similarities of at least ~0.92 (respaced copies, 1-3
/// substitutions, a 3% cut) and at most ~0.75 (15-60 substitutions, a 40% cut). Pairs
/// right at the threshold are a coin toss for any 64-permutation MinHash (the estimate's
/// standard deviation there is ~0.045), so they are left out of the planted set.
#[test]
fn near_duplicates_match_exact_jaccard_truth() {
    let (n, threshold) = (5, 0.85);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let originals = originals(400);
    let pool: Vec<String> = originals.iter().flatten().cloned().collect();
    let mut docs: Vec<String> = Vec::new();
    for (i, o) in originals.iter().enumerate() {
        docs.push(o.join(" "));
        let plans: &[(usize, usize, bool)] = match i % 4 {
            0 => &[(0, 0, true), (2, 0, false), (30, 0, false)],
            1 => &[(1, 0, false), (0, o.len() * 3 / 100, false), (15, 0, false)],
            2 => &[(3, 0, false), (0, o.len() * 4 / 10, false)],
            _ => &[(60, 0, false)],
        };
        for &(subs, cut, respace) in plans {
            docs.push(edit(o, subs, cut, respace, &pool, &mut rng));
        }
    }
    // Copies land anywhere, sometimes before their original.
    docs.shuffle(&mut rng);

    // Truth: all pairs at exact Jaccard >= threshold, clustered; all but the first go.
    let sets: Vec<Vec<u64>> = docs.iter().map(|d| shingle_set(d, n)).collect();
    let mut parent: Vec<usize> = (0..docs.len()).collect();
    let (mut above, mut below, mut grey) = (0, 0, 0);
    for i in 0..docs.len() {
        for j in i + 1..docs.len() {
            let s = jaccard(&sets[i], &sets[j]);
            if s >= threshold {
                above += 1;
                let (ri, rj) = (root(&mut parent, i), root(&mut parent, j));
                parent[ri.max(rj)] = ri.min(rj);
            } else if s >= 0.3 {
                below += 1;
            }
            if (0.78..0.92).contains(&s) {
                grey += 1;
            }
        }
    }
    let truth: HashSet<usize> = (0..docs.len())
        .filter(|&d| root(&mut parent, d) != d)
        .collect();
    assert!(
        above >= 80 && below >= 80,
        "planted {above} above, {below} below"
    );
    assert!(grey <= docs.len() / 50, "{grey} pairs near the threshold");

    // Two datasets, the second gzipped; documents keep an id to be told apart.
    let tmp = temp_dir();
    let raw = tmp.path().join("raw");
    std::fs::create_dir_all(raw.join("web")).unwrap();
    let half = docs.len() / 2;
    let lines = |r: std::ops::Range<usize>| -> String {
        r.map(|i| format!("{}\n", json!({"id": i, "text": docs[i]})))
            .collect()
    };
    std::fs::write(raw.join("a.jsonl"), lines(0..half)).unwrap();
    write_gz(&raw.join("web/b.jsonl.gz"), &lines(half..docs.len()));

    let out = tmp.path().join("clean");
    let report = dedup(&DedupOptions::new(&raw, &out)).unwrap();
    let kept_text = std::fs::read_to_string(out.join("a.jsonl")).unwrap()
        + &read_gz(&out.join("web/b.jsonl.gz"));
    let kept: HashSet<usize> = kept_text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_u64()
                .unwrap() as usize
        })
        .collect();
    let removed: HashSet<usize> = (0..docs.len()).filter(|d| !kept.contains(d)).collect();

    for &d in truth.difference(&removed) {
        let best = (0..docs.len())
            .filter(|&e| e != d)
            .map(|e| (jaccard(&sets[d], &sets[e]), e))
            .fold((0.0, 0), |a, b| if b.0 > a.0 { b } else { a });
        eprintln!(
            "missed {d}: best J {:.3} with {} ({} shingles)",
            best.0,
            best.1,
            sets[d].len()
        );
    }
    let hit = removed.intersection(&truth).count() as f64;
    let precision = hit / removed.len() as f64;
    let recall = hit / truth.len() as f64;
    eprintln!(
        "{} docs, {} truly removable, {} removed: precision {precision:.3} recall {recall:.3}",
        docs.len(),
        truth.len(),
        removed.len()
    );
    assert!(
        precision >= 0.95 && recall >= 0.95,
        "precision {precision}, recall {recall}"
    );
    assert_eq!(report.totals.removed as usize, removed.len());
    assert_eq!(report.totals.documents as usize, docs.len());
}

/// A small corpus where every kind of record is checked byte for byte.
fn mixed_corpus(raw: &Path) -> (Vec<String>, Vec<String>) {
    let f = fortunes();
    std::fs::create_dir_all(raw.join("news")).unwrap();
    // Odd formatting and extra fields must survive untouched.
    let a = vec![
        format!(
            r#"{{"text": {}, "id": 1, "meta": {{"src": "x"}}}}"#,
            json!(f[10])
        ),
        format!(r#"{{ "id":2,"text":{} }}"#, json!(f[11])),
        format!(
            r#"{{"id": 3, "text": {}, "note": "caf\u00e9"}}"#,
            json!(f[10])
        ), // exact copy
        format!(r#"{{"text": {}, "id": 4}}"#, json!(f[12])),
    ];
    let b = vec![
        format!(r#"{{"text": {}, "id": 5}}"#, json!(f[11])), // exact copy of id 2
        format!(r#"{{"text": {}, "id": 6}}"#, json!(f[13])),
        format!(r#"{{"text": {}, "id": 7}}"#, json!(f[12].to_uppercase())), // near: case only
    ];
    std::fs::write(raw.join("news/a.jsonl"), a.join("\n") + "\n\n").unwrap();
    write_gz(&raw.join("news/b.jsonl.gz"), &(b.join("\n") + "\n"));
    let fort = [&f[20], &f[21], &f[20], &f[22]];
    let fort: String = fort.iter().map(|d| format!("{d}\n%\n")).collect();
    std::fs::write(raw.join("fortunes.txt"), fort).unwrap();
    std::fs::write(raw.join("README.md"), "not a corpus").unwrap();
    (a, b)
}

fn mixed_opts(raw: &Path, out: &Path) -> DedupOptions {
    let mut o = DedupOptions::new(raw, out);
    o.read.layout = TextLayout::Separator("%".into());
    o
}

#[test]
fn exact_copies_go_records_stay_byte_identical_and_the_report_adds_up() {
    let tmp = temp_dir();
    let (raw, out) = (tmp.path().join("raw"), tmp.path().join("out"));
    let (a, b) = mixed_corpus(&raw);
    let r = dedup(&mixed_opts(&raw, &out)).unwrap();

    let got_a = std::fs::read_to_string(out.join("news/a.jsonl")).unwrap();
    assert_eq!(got_a, format!("{}\n{}\n{}\n", a[0], a[1], a[3]));
    assert_eq!(read_gz(&out.join("news/b.jsonl.gz")), format!("{}\n", b[1]));
    let f = fortunes();
    let got_f = std::fs::read_to_string(out.join("fortunes.txt")).unwrap();
    assert_eq!(got_f, format!("{}\n%\n{}\n%\n{}\n%\n", f[20], f[21], f[22]));
    assert!(!out.join("README.md").exists());

    // Files in path order: fortunes.txt, news/a.jsonl, news/b.jsonl.gz.
    let counts: Vec<(&str, &str, u64, u64, u64, u64)> = r
        .files
        .iter()
        .map(|f| {
            let c = &f.counts;
            (
                f.path.as_str(),
                f.dataset.as_str(),
                c.documents,
                c.kept,
                c.exact_duplicates,
                c.near_duplicates,
            )
        })
        .collect();
    assert_eq!(
        counts,
        [
            ("fortunes.txt", "fortunes", 4, 3, 1, 0),
            ("news/a.jsonl", "news", 4, 3, 1, 0),
            ("news/b.jsonl.gz", "news", 3, 1, 1, 1),
        ]
    );
    assert_eq!(
        (r.totals.documents, r.totals.kept, r.totals.removed),
        (11, 7, 4)
    );
    assert_eq!(r.clusters, 4);
    assert_eq!(r.largest_cluster, 2);
    assert_eq!(r.datasets.len(), 2);
    assert_eq!(
        (
            r.datasets[1].name.as_str(),
            r.datasets[1].files,
            r.datasets[1].counts.removed
        ),
        ("news", 2, 3)
    );
    assert_eq!(r.ignored_files, ["README.md"]);
    assert_eq!(r.parameters["num_perm"], 64);
    assert!(r.parameters["bands"].as_u64().unwrap() * r.parameters["rows"].as_u64().unwrap() <= 64);

    // The written report is the returned one; the cluster listing names lines.
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(REPORT_FILE)).unwrap()).unwrap();
    assert_eq!(written, serde_json::to_value(&r).unwrap());
    let clusters: Vec<Value> = std::fs::read_to_string(out.join(CLUSTERS_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(clusters.len(), 4);
    let near = clusters
        .iter()
        .find(|c| c["removed"][0]["exact"] == false)
        .unwrap();
    assert_eq!(near["kept"], json!({"file": "news/a.jsonl", "line": 4}));
    assert_eq!(near["removed"][0]["file"], "news/b.jsonl.gz");
    assert_eq!(near["removed"][0]["line"], 3);
    assert_eq!(near["removed"][0]["similarity"], 1.0);
}

#[test]
fn output_does_not_depend_on_thread_count_and_overwrite_replaces() {
    let tmp = temp_dir();
    let raw = tmp.path().join("raw");
    mixed_corpus(&raw);
    // More documents, with near copies, so several batches and buckets are in play.
    let f = fortunes();
    let big: String = f
        .iter()
        .cloned()
        .chain(f.iter().step_by(3).map(|s| s.to_uppercase()))
        .enumerate()
        .map(|(i, d)| format!("{}\n", json!({"i": i, "text": d})))
        .collect();
    std::fs::write(raw.join("news/c.jsonl"), big).unwrap();

    let run = |threads: usize, out: &Path| -> DedupReport {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| dedup(&mixed_opts(&raw, out)).unwrap())
    };
    let (o1, o4) = (tmp.path().join("o1"), tmp.path().join("o4"));
    let mut r1 = run(1, &o1);
    let r4 = run(4, &o4);
    assert!(r1.totals.near_duplicates > 100, "{:?}", r1.totals);
    r1.output = r4.output.clone();
    assert_eq!(r1, r4);
    for rel in [
        "fortunes.txt",
        "news/a.jsonl",
        "news/b.jsonl.gz",
        "news/c.jsonl",
        CLUSTERS_FILE,
    ] {
        assert_eq!(
            std::fs::read(o1.join(rel)).unwrap(),
            std::fs::read(o4.join(rel)).unwrap(),
            "{rel}"
        );
    }

    // --overwrite replaces an existing output completely.
    std::fs::write(o1.join("stale.txt"), "old").unwrap();
    let mut o = mixed_opts(&raw, &o1);
    o.overwrite = true;
    dedup(&o).unwrap();
    assert!(!o1.join("stale.txt").exists());
    assert!(o1.join(REPORT_FILE).exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        3,
        "raw, o1, o4 only"
    );
}

fn entries(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

#[test]
fn bad_input_gives_one_line_errors_and_leaves_nothing() {
    let tmp = temp_dir();
    let raw = tmp.path().join("raw");
    mixed_corpus(&raw);
    let out = tmp.path().join("out");
    let before = entries(tmp.path());

    let err = dedup(&DedupOptions::new(tmp.path().join("missing"), &out)).unwrap_err();
    assert!(matches!(err, Error::MissingFile { .. }), "{err}");

    let mut o = DedupOptions::new(&raw, &out);
    o.threshold = 1.5;
    o.num_perm = 0;
    let err = dedup(&o).unwrap_err().to_string();
    assert!(
        err.contains("--threshold must be in (0, 1], got 1.5"),
        "{err}"
    );
    assert!(
        err.contains("--num-perm must be between 2 and 1024, got 0"),
        "{err}"
    );

    let err = dedup(&DedupOptions::new(&raw, raw.join("inside"))).unwrap_err();
    assert!(err.to_string().contains("overlap"), "{err}");

    // A line that is not JSON, in the last file read: pass 1 fails after reading the
    // others; nothing is left behind.
    std::fs::write(raw.join("zz.jsonl"), "{\"text\": \"fine\"}\nnot json\n").unwrap();
    let err = dedup(&mixed_opts(&raw, &out)).unwrap_err().to_string();
    assert!(
        err.contains("zz.jsonl:2: not JSON") && err.contains("--skip-bad-lines"),
        "{err}"
    );
    assert_eq!(
        entries(tmp.path()),
        before,
        "no output, no temporary folder"
    );

    let mut o = mixed_opts(&raw, &out);
    o.read.skip_bad_lines = true;
    let r = dedup(&o).unwrap();
    assert_eq!(r.totals.skipped_lines, 1);
    assert_eq!(
        std::fs::read_to_string(out.join("zz.jsonl")).unwrap(),
        "{\"text\": \"fine\"}\n"
    );

    let err = dedup(&o).unwrap_err().to_string();
    assert!(
        err.contains("already exists") && err.contains("--overwrite"),
        "{err}"
    );

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = dedup(&DedupOptions::new(&empty, tmp.path().join("o2"))).unwrap_err();
    assert!(err.to_string().contains("no .txt or .jsonl files"), "{err}");

    // Through the binary: one line, non-zero exit.
    for args in [vec!["--threshold", "0"], vec!["--num-perm", "5000"], vec![]] {
        let run = Command::new(bin())
            .arg("dedup")
            .arg("--input")
            .arg(&raw)
            .arg("--output")
            .arg(&out)
            .args(&args)
            .output()
            .unwrap();
        assert!(!run.status.success());
        let stderr = String::from_utf8(run.stderr).unwrap();
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
    }
}

/// How often a copy at exact similarity `s` to its (earlier) original is removed, by
/// buckets of `s`, for 64 and 128 permutations (printed with `--nocapture`), and the LSH
/// S-curve around the default threshold (0.85) asserted: copies at ≥ 0.95 are removed,
/// copies at < 0.75 kept, each at 90% or better.
#[test]
fn dedup_quality_by_similarity() {
    let originals = originals(400);
    let pool: Vec<String> = originals.iter().flatten().cloned().collect();
    for num_perm in [64, 128] {
        let mut buckets = [(0u32, 0u32); 20]; // per 0.05 of similarity: (copies, removed)
        for seed in 0..10u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut lines = String::new();
            let mut sims = Vec::new();
            for (i, o) in originals.iter().enumerate() {
                let subs = rng.random_range(0..25);
                let copy = edit(o, subs, 0, false, &pool, &mut rng);
                let orig = o.join(" ");
                sims.push(jaccard(&shingle_set(&orig, 5), &shingle_set(&copy, 5)));
                lines += &format!("{}\n", json!({"id": format!("o{i}"), "text": orig}));
                lines += &format!("{}\n", json!({"id": format!("c{i}"), "text": copy}));
            }
            let tmp = temp_dir();
            std::fs::write(tmp.path().join("a.jsonl"), lines).unwrap();
            let out = tmp.path().join("out");
            let mut o = DedupOptions::new(tmp.path().join("a.jsonl"), &out);
            o.num_perm = num_perm;
            o.seed = seed;
            dedup(&o).unwrap();
            let kept = std::fs::read_to_string(out.join("a.jsonl")).unwrap();
            for (i, s) in sims.iter().enumerate() {
                let b = &mut buckets[((s * 20.0) as usize).min(19)];
                b.0 += 1;
                b.1 += u32::from(!kept.contains(&format!("\"c{i}\"")));
            }
        }
        eprintln!("num_perm {num_perm}: similarity bucket -> copies removed / copies");
        for (i, (n, r)) in buckets.iter().enumerate().filter(|(_, b)| b.0 > 0) {
            eprintln!(
                "  [{:.2}, {:.2}): {r}/{n} = {:.3}",
                i as f64 / 20.0,
                (i + 1) as f64 / 20.0,
                *r as f64 / *n as f64
            );
        }
        let rate = |range: std::ops::Range<usize>| {
            let (n, r) = buckets[range]
                .iter()
                .fold((0, 0), |(n, r), b| (n + b.0, r + b.1));
            assert!(
                n >= 50,
                "num_perm {num_perm}: only {n} copies in the bucket"
            );
            r as f64 / n as f64
        };
        let (close, distant) = (rate(19..20), rate(0..15));
        assert!(
            close >= 0.9,
            "num_perm {num_perm}: only {close:.3} of copies at similarity >= 0.95 removed"
        );
        assert!(
            distant <= 0.1,
            "num_perm {num_perm}: {distant:.3} of copies at similarity < 0.75 removed"
        );
    }
}
