//! Corpus deduplication: exact duplicates by hash, near duplicates by MinHash + LSH.
//!
//! ```text
//! RAW/<dataset>/<file>.jsonl.gz ─ pass 1 ─▶ per document: XXH3-128 of the text
//!                                          first of its text? MinHash signature (k u32)
//!        LSH, band by band: sort (band key, doc), buckets ─▶ verified pairs ─▶ union-find
//! RAW ─ pass 2 ─▶ CLEAN/<dataset>/<file>.jsonl.gz (kept records, byte for byte)
//!                 CLEAN/dedup_report.json, CLEAN/dedup_clusters.ndjson
//! ```
//!
//! - Order: files sorted by relative path, records in file order; document `d` is the
//!   `d`-th record in that order. Each cluster (connected component of exact copies and
//!   verified near pairs) keeps its first document and drops the rest.
//! - Exact copies: same XXH3-128 of the text (the jsonl field, not the whole line, so
//!   copies with other ids count). Only the first of each text is signed and banded.
//! - Near copies: see [`crate::data::minhash`] for shingles, signatures and banding, and
//!   [`LSH_FALSE_POSITIVE_WEIGHT`] for the choice of bands and rows.
//! - Output: each kept record exactly as read (`Record::raw`) followed by a newline, and
//!   by the separator line for `--doc-separator` text; blank lines and dropped bad
//!   jsonl lines are not copied. Gzip stays gzip. Files of other kinds are not copied.
//! - Memory: texts are streamed twice and never held. Per document 12 bytes stay
//!   (cluster index, line number); per distinct text its signature (`4 * num_perm`
//!   bytes), 8 bytes of index and, while reading, ~40 bytes of exact-hash table; while
//!   banding, 16 bytes of sort entry. Measured: ~320 bytes per document at 64
//!   permutations (500k documents: 188 MB peak), plus up to 4 batches of 8 MB of text.
//! - Deterministic: the result depends only on the inputs and the parameters, not on the
//!   thread count (parallel work is collected in document order, union-find keeps the
//!   smallest index as root).
//! - Atomic: everything is written into a temporary folder beside `CLEAN` and renamed.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::json;
use twox_hash::XxHash3_128;

use super::documents::{DocFormat, ReadOptions, Record};
use super::files;
use super::minhash::{Clusters, Lsh, MinHasher, estimated_jaccard, optimal_bands};
use crate::error::{Error, IoContext, Result};

/// File name of the report written into the output folder.
pub const REPORT_FILE: &str = "dedup_report.json";
/// File name of the cluster listing (one JSON object per line).
pub const CLUSTERS_FILE: &str = "dedup_clusters.ndjson";

/// Weight of the false-positive integral when choosing bands and rows (the
/// false-negative one gets the rest). Candidates are verified, so a false positive of
/// the banding costs one signature comparison while a false negative loses a duplicate
/// for good: the banding should be a high-recall filter and leave the decision to the
/// verification. With datasketch's equal weights, 64 permutations and threshold 0.85
/// give 4 bands of 15 rows, which pair up only 81% of documents at similarity 0.93;
/// with 0.1 / 0.9 it is 7 bands of 9 rows: 99.4% at 0.93, 25% of pairs at 0.70 compared.
pub const LSH_FALSE_POSITIVE_WEIGHT: f64 = 0.1;

/// What to deduplicate and how.
#[derive(Debug, Clone)]
pub struct DedupOptions {
    /// A folder of datasets (sub-folders or files) or one file.
    pub input: PathBuf,
    /// Folder to create with the kept documents under the same relative paths.
    pub output: PathBuf,
    /// MinHash permutations (signature length).
    pub num_perm: usize,
    /// Words per shingle.
    pub ngram: usize,
    /// Jaccard similarity from which two documents are duplicates.
    pub threshold: f64,
    /// Seed of the hash functions.
    pub seed: u64,
    /// How `.txt` and `.jsonl` files hold documents.
    pub read: ReadOptions,
    /// Replace `output` if it exists.
    pub overwrite: bool,
    /// Show progress bars on stderr.
    pub progress: bool,
}

impl DedupOptions {
    /// Defaults of the `dedup` command: 64 permutations, 5-grams, threshold 0.85, seed 42.
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        DedupOptions {
            input: input.into(),
            output: output.into(),
            num_perm: 64,
            ngram: 5,
            threshold: 0.85,
            seed: 42,
            read: ReadOptions::default(),
            overwrite: false,
            progress: false,
        }
    }

    /// Every problem with the numeric options, in one message.
    pub fn check(&self) -> Result<()> {
        let mut bad = Vec::new();
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            bad.push(format!(
                "--threshold must be in (0, 1], got {}",
                self.threshold
            ));
        }
        if !(2..=1024).contains(&self.num_perm) {
            bad.push(format!(
                "--num-perm must be between 2 and 1024, got {}",
                self.num_perm
            ));
        }
        if !(1..=64).contains(&self.ngram) {
            bad.push(format!(
                "--ngram must be between 1 and 64, got {}",
                self.ngram
            ));
        }
        if let Some(p) = self.read.problem() {
            bad.push(p.into());
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(Error::Usage(format!("dedup: {}", bad.join("; "))))
        }
    }
}

/// One input file.
#[derive(Debug, Clone)]
pub struct InputFile {
    /// Where it is read from.
    pub path: PathBuf,
    /// Its path relative to the input root (its own name when the input is one file).
    pub rel: PathBuf,
    /// The dataset it belongs to: the first component of `rel`, without extensions
    /// when that is the file itself.
    pub dataset: String,
}

/// The document files under `root` (or `root` itself when it is a file), sorted by
/// relative path, and the other files found (not read). Hidden entries are skipped;
/// links are followed, and loops and non-regular document files refused (see
/// [`super::files`]).
pub fn list_inputs(root: &Path) -> Result<(Vec<InputFile>, Vec<PathBuf>)> {
    if std::fs::symlink_metadata(root).is_err() {
        return Err(Error::missing(
            root,
            "--input must be a folder of .txt/.jsonl(.gz) files or one such file",
        ));
    }
    let listing = files::list(root)?;
    let rel = |p: &Path| -> PathBuf {
        match p.strip_prefix(root) {
            Ok(r) if !r.as_os_str().is_empty() => r.to_path_buf(),
            _ => PathBuf::from(p.file_name().unwrap_or(p.as_os_str())),
        }
    };
    let mut files: Vec<InputFile> = listing
        .documents
        .into_iter()
        .map(|p: PathBuf| {
            let r = rel(&p);
            input_file(p, r)
        })
        .collect();
    let mut ignored: Vec<PathBuf> = listing.ignored.iter().map(|p| rel(p)).collect();
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    ignored.sort();
    Ok((files, ignored))
}

fn input_file(path: PathBuf, rel: PathBuf) -> InputFile {
    let first = rel
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    let dataset = if rel.components().count() == 1 {
        first.split('.').next().unwrap_or(&first).to_string()
    } else {
        first
    };
    InputFile { path, rel, dataset }
}

/// Counts for one file, one dataset or the whole corpus.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub documents: u64,
    pub kept: u64,
    pub removed: u64,
    /// Removed because the same text came earlier.
    pub exact_duplicates: u64,
    /// Removed as near duplicates of a kept document.
    pub near_duplicates: u64,
    /// jsonl lines dropped by `--skip-bad-lines`.
    pub skipped_lines: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.documents += o.documents;
        self.kept += o.kept;
        self.removed += o.removed;
        self.exact_duplicates += o.exact_duplicates;
        self.near_duplicates += o.near_duplicates;
        self.skipped_lines += o.skipped_lines;
    }
}

/// Counts of one file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileReport {
    pub path: String,
    pub dataset: String,
    #[serde(flatten)]
    pub counts: Counts,
}

/// Counts of one dataset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetReport {
    pub name: String,
    pub files: usize,
    #[serde(flatten)]
    pub counts: Counts,
}

/// What `dedup` did; written as `dedup_report.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DedupReport {
    pub input: String,
    pub output: String,
    pub parameters: serde_json::Value,
    #[serde(flatten)]
    pub totals: Counts,
    /// Clusters of two or more documents (one kept each).
    pub clusters: u64,
    /// Documents in the largest cluster.
    pub largest_cluster: u64,
    /// Pairs whose signatures were compared.
    pub candidate_pairs: u64,
    /// Compared pairs found similar enough.
    pub verified_pairs: u64,
    /// Bytes of document text read.
    pub text_bytes: u64,
    pub datasets: Vec<DatasetReport>,
    pub files: Vec<FileReport>,
    /// Files under the input that are not .txt/.jsonl(.gz), not copied.
    pub ignored_files: Vec<String>,
}

/// Deduplicate `opts.input` into `opts.output`; see the module docs.
pub fn dedup(opts: &DedupOptions) -> Result<DedupReport> {
    opts.check()?;
    let (files, ignored) = list_inputs(&opts.input)?;
    if files.is_empty() {
        return Err(Error::Data(format!(
            "{}: no .txt or .jsonl files (optionally .gz) to deduplicate",
            opts.input.display()
        )));
    }
    check_output(opts)?;
    let (bands, rows) = optimal_bands(
        opts.threshold,
        opts.num_perm,
        LSH_FALSE_POSITIVE_WEIGHT,
        1.0 - LSH_FALSE_POSITIVE_WEIGHT,
    );
    let hasher = MinHasher::new(opts.num_perm, opts.ngram, opts.seed);

    let scan = scan(opts, &files, &hasher)?;
    if scan.group.is_empty() {
        let skipped: u64 = scan.files.iter().map(|f| f.skipped).sum();
        return Err(Error::Data(format!(
            "dedup: no documents in the {} file(s) under {}{}; check --doc-separator / --json-key",
            files.len(),
            opts.input.display(),
            if skipped > 0 {
                format!(" ({skipped} lines skipped by --skip-bad-lines)")
            } else {
                String::new()
            }
        )));
    }
    let lsh_bar = bar(opts.progress, bands as u64, "LSH bands");
    let lsh = Lsh {
        num_perm: opts.num_perm,
        bands,
        rows,
        threshold: opts.threshold,
    };
    let (mut clusters, links) = lsh.link(&scan.sigs, &|| lsh_bar.inc(1));
    lsh_bar.finish_and_clear();
    clusters.flatten();

    let tmp = temp_dir_beside(&opts.output)?;
    let tally = tally(
        &scan,
        &clusters,
        &files,
        opts.num_perm,
        &tmp.path().join(CLUSTERS_FILE),
    )?;
    let mut report = DedupReport {
        input: opts.input.display().to_string(),
        output: opts.output.display().to_string(),
        parameters: json!({
            "num_perm": opts.num_perm,
            "ngram": opts.ngram,
            "threshold": opts.threshold,
            "seed": opts.seed,
            "bands": bands,
            "rows": rows,
            "json_key": opts.read.json_key,
            "doc_separator": opts.read.layout.separator(),
            "skip_bad_lines": opts.read.skip_bad_lines,
        }),
        totals: Counts::default(),
        clusters: tally.clusters,
        largest_cluster: tally.largest,
        candidate_pairs: links.candidate_pairs,
        verified_pairs: links.verified_pairs,
        text_bytes: scan.text_bytes,
        datasets: Vec::new(),
        files: Vec::new(),
        ignored_files: ignored
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect(),
    };
    for (f, c) in files.iter().zip(tally.per_file) {
        report.totals.add(&c);
        match report.datasets.last_mut() {
            Some(ds) if ds.name == f.dataset => {
                ds.files += 1;
                ds.counts.add(&c);
            }
            _ => report.datasets.push(DatasetReport {
                name: f.dataset.clone(),
                files: 1,
                counts: c.clone(),
            }),
        }
        report.files.push(FileReport {
            path: f.rel.to_string_lossy().into_owned(),
            dataset: f.dataset.clone(),
            counts: c,
        });
    }

    // Pass 2: the kept records. Signatures are no longer needed.
    let Scan {
        files: scanned,
        group,
        uniques,
        sigs,
        lines,
        ..
    } = scan;
    drop((sigs, lines));
    let keep = |d: usize| uniques[clusters.rep(group[d]) as usize] as usize == d;
    let write_bar = bar(opts.progress, files.len() as u64, "writing");
    files
        .par_iter()
        .zip(scanned.par_iter())
        .try_for_each(|(f, sf)| {
            write_kept(opts, f, sf, tmp.path(), &keep)?;
            write_bar.inc(1);
            Ok::<_, Error>(())
        })?;
    write_bar.finish_and_clear();
    let mut text = serde_json::to_string_pretty(&report).expect("plain data serialises");
    text.push('\n');
    crate::io::write_atomic(&tmp.path().join(REPORT_FILE), text.as_bytes())?;
    move_into_place(tmp, &opts.output, opts.overwrite)?;
    Ok(report)
}

/// Per-file counts and the size of the clusters.
struct Tally {
    per_file: Vec<Counts>,
    clusters: u64,
    largest: u64,
}

/// Count kept and removed documents per file and stream the cluster listing to `path`:
/// one line per cluster, its kept document and the removed ones with their estimated
/// similarity to it.
fn tally(
    scan: &Scan,
    clusters: &Clusters,
    files: &[InputFile],
    k: usize,
    path: &Path,
) -> Result<Tally> {
    let rep = |d: usize| scan.uniques[clusters.rep(scan.group[d]) as usize] as usize;
    let mut per_file: Vec<Counts> = scan
        .files
        .iter()
        .map(|f| Counts {
            documents: f.docs,
            skipped_lines: f.skipped,
            ..Counts::default()
        })
        .collect();
    let mut removed: Vec<(u32, u32)> = Vec::new(); // (kept doc, removed doc)
    let mut file_of = 0;
    for d in 0..scan.group.len() {
        while d as u64 >= scan.files[file_of].start + scan.files[file_of].docs {
            file_of += 1;
        }
        let c = &mut per_file[file_of];
        let r = rep(d);
        if r == d {
            c.kept += 1;
            continue;
        }
        c.removed += 1;
        if scan.uniques[scan.group[d] as usize] as usize != d {
            c.exact_duplicates += 1;
        } else {
            c.near_duplicates += 1;
        }
        removed.push((r as u32, d as u32));
    }
    removed.sort_unstable();

    let sig = |u: u32| &scan.sigs[u as usize * k..(u as usize + 1) * k];
    let locate = |d: usize| {
        let f = scan.files.partition_point(|f| f.start + f.docs <= d as u64);
        (files[f].rel.to_string_lossy().into_owned(), scan.lines[d])
    };
    let file = std::fs::File::create(path).at(path)?;
    let mut out = std::io::BufWriter::new(file);
    let (mut n_clusters, mut largest) = (0u64, 0u64);
    for group in removed.chunk_by(|a, b| a.0 == b.0) {
        let kept = group[0].0 as usize;
        let kept_sig = sig(clusters.rep(scan.group[kept]));
        let (kf, kl) = locate(kept);
        let members: Vec<serde_json::Value> = group
            .iter()
            .map(|&(_, d)| {
                let d = d as usize;
                let (f, l) = locate(d);
                let u = scan.group[d];
                let exact = scan.uniques[u as usize] as usize != d;
                let sim = estimated_jaccard(kept_sig, sig(u));
                json!({"file": f, "line": l, "exact": exact, "similarity": sim})
            })
            .collect();
        let line = json!({"kept": {"file": kf, "line": kl}, "removed": members});
        writeln!(out, "{line}").at(path)?;
        n_clusters += 1;
        largest = largest.max(group.len() as u64 + 1);
    }
    let file = out
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().at(path)?;
    Ok(Tally {
        per_file,
        clusters: n_clusters,
        largest,
    })
}

/// The output must not exist (unless overwriting) and must not lie inside the input.
fn check_output(opts: &DedupOptions) -> Result<()> {
    if files::overlap(&opts.input, &opts.output) {
        return Err(Error::Usage(format!(
            "dedup: --output {} and --input {} overlap; write the clean corpus elsewhere",
            opts.output.display(),
            opts.input.display()
        )));
    }
    if opts.output.exists() && !opts.overwrite {
        return Err(Error::Usage(format!(
            "dedup: {} already exists; pass --overwrite to replace it or choose another --output",
            opts.output.display()
        )));
    }
    Ok(())
}

/// One file as seen by pass 1.
struct FileScan {
    /// Index of its first document.
    start: u64,
    docs: u64,
    skipped: u64,
}

/// What pass 1 keeps in memory: no text, only hashes and signatures.
struct Scan {
    files: Vec<FileScan>,
    /// Per document: position in `uniques` of the first document with the same text.
    group: Vec<u32>,
    /// Per document: its line in its file.
    lines: Vec<u64>,
    /// Per distinct text: the document that has it first.
    uniques: Vec<u32>,
    /// Per distinct text: its signature (`num_perm` values each), flattened.
    sigs: Vec<u32>,
    text_bytes: u64,
}

enum Msg {
    /// Records of the current file.
    Batch(Vec<Record>),
    /// The current file is finished; lines skipped in it.
    FileDone(u64),
}

/// Pass 1: a reader thread streams records in batches; each batch is hashed in
/// parallel, exact copies found in order, and new texts signed in parallel.
fn scan(opts: &DedupOptions, files: &[InputFile], hasher: &MinHasher) -> Result<Scan> {
    const BATCH_DOCS: usize = 4096;
    const BATCH_BYTES: usize = 8 << 20;
    let bar = bar(opts.progress, files.len() as u64, "hashing");
    let k = hasher.num_perm();
    let mut s = Scan {
        files: Vec::with_capacity(files.len()),
        group: Vec::new(),
        lines: Vec::new(),
        uniques: Vec::new(),
        sigs: Vec::new(),
        text_bytes: 0,
    };
    let mut first_of: HashMap<u128, u32> = HashMap::new();

    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx): (SyncSender<Result<Msg>>, Receiver<Result<Msg>>) = sync_channel(2);
        scope.spawn(move || {
            for f in files {
                let mut recs = match opts.read.records(&f.path) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let (mut batch, mut bytes) = (Vec::new(), 0);
                for r in recs.by_ref() {
                    match r {
                        Ok(r) => {
                            bytes += r.text.len();
                            batch.push(r);
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                    if batch.len() >= BATCH_DOCS || bytes >= BATCH_BYTES {
                        if tx.send(Ok(Msg::Batch(std::mem::take(&mut batch)))).is_err() {
                            return;
                        }
                        bytes = 0;
                    }
                }
                if !batch.is_empty() && tx.send(Ok(Msg::Batch(batch))).is_err() {
                    return;
                }
                if tx.send(Ok(Msg::FileDone(recs.skipped as u64))).is_err() {
                    return;
                }
            }
        });
        let mut start = 0u64;
        for msg in rx {
            match msg? {
                Msg::Batch(batch) => {
                    let hashes: Vec<u128> = batch
                        .par_iter()
                        .map(|r| XxHash3_128::oneshot_with_seed(opts.seed, r.text.as_bytes()))
                        .collect();
                    let mut fresh = Vec::new();
                    for (r, h) in batch.iter().zip(hashes) {
                        let d = s.group.len();
                        let doc = u32::try_from(d).map_err(|_| too_many())?;
                        let next = s.uniques.len() as u32;
                        let u = *first_of.entry(h).or_insert(next);
                        if u == next {
                            s.uniques.push(doc);
                            fresh.push(r.text.as_str());
                        }
                        s.group.push(u);
                        s.lines.push(r.line as u64);
                        s.text_bytes += r.text.len() as u64;
                    }
                    let at = s.sigs.len();
                    s.sigs.resize(at + fresh.len() * k, 0);
                    s.sigs[at..]
                        .par_chunks_mut(k)
                        .zip(fresh.par_iter())
                        .for_each(|(out, text)| hasher.signature_into(text, out));
                    bar.set_message(format!(
                        "{} documents, {} MB",
                        s.group.len(),
                        s.text_bytes >> 20
                    ));
                }
                Msg::FileDone(skipped) => {
                    let docs = s.group.len() as u64 - start;
                    s.files.push(FileScan {
                        start,
                        docs,
                        skipped,
                    });
                    start += docs;
                    bar.inc(1);
                }
            }
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(s)
}

fn too_many() -> Error {
    Error::Data(
        "dedup: more than 4294967295 documents; split the corpus and run dedup on each part".into(),
    )
}

/// Pass 2 for one file: its kept records, unchanged, under the same relative path.
fn write_kept(
    opts: &DedupOptions,
    f: &InputFile,
    sf: &FileScan,
    out_root: &Path,
    keep: &(dyn Fn(usize) -> bool + Sync),
) -> Result<()> {
    let target = out_root.join(&f.rel);
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    let file = std::fs::File::create(&target).at(&target)?;
    let buf = std::io::BufWriter::with_capacity(1 << 20, file);
    let buf = if f.path.extension().is_some_and(|e| e == "gz") {
        let mut gz = flate2::write::GzEncoder::new(buf, flate2::Compression::default());
        copy_kept(opts, f, sf, &mut gz, &target, keep)?;
        gz.finish().at(&target)?
    } else {
        let mut buf = buf;
        copy_kept(opts, f, sf, &mut buf, &target, keep)?;
        buf
    };
    let file = buf
        .into_inner()
        .map_err(|e| Error::io(&target, e.into_error()))?;
    // On disk before the folder is renamed into place.
    file.sync_all().at(&target)
}

fn copy_kept(
    opts: &DedupOptions,
    f: &InputFile,
    sf: &FileScan,
    w: &mut impl Write,
    target: &Path,
    keep: &(dyn Fn(usize) -> bool + Sync),
) -> Result<()> {
    let fmt = opts.read.format_of(&f.path);
    // Text documents separated by a line: write that line after each one.
    let sep = match &fmt {
        DocFormat::Text(layout) => layout.separator().map(String::from),
        DocFormat::Jsonl { .. } => None,
    };
    let mut n = 0u64;
    for r in opts.read.records(&f.path)? {
        let r = r?;
        if n < sf.docs && keep((sf.start + n) as usize) {
            w.write_all(r.raw().as_bytes()).at(target)?;
            w.write_all(b"\n").at(target)?;
            if let Some(sep) = &sep {
                w.write_all(sep.as_bytes()).at(target)?;
                w.write_all(b"\n").at(target)?;
            }
        }
        n += 1;
    }
    if n != sf.docs {
        return Err(Error::Data(format!(
            "{}: changed while deduplicating ({} documents, then {n}); run dedup again",
            f.path.display(),
            sf.docs
        )));
    }
    Ok(())
}

/// A fresh hidden folder beside `target` (same file system, so it can be renamed).
fn temp_dir_beside(target: &Path) -> Result<tempfile::TempDir> {
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).at(parent)?;
    tempfile::Builder::new()
        .prefix(".tmp-dedup-")
        .tempdir_in(parent)
        .at(parent)
}

/// Rename the finished `tmp` folder to `target`, replacing an old `target` when allowed.
fn move_into_place(tmp: tempfile::TempDir, target: &Path, overwrite: bool) -> Result<()> {
    if target.exists() {
        if !overwrite {
            return Err(Error::Usage(format!(
                "dedup: {} appeared while deduplicating; pass --overwrite or choose another --output",
                target.display()
            )));
        }
        // Move the old one aside first: a crash leaves either it or the new one in place.
        let old = temp_dir_beside(target)?;
        let aside = old.path().join("old");
        std::fs::rename(target, &aside).at(target)?;
        std::fs::rename(tmp.path(), target).at(target)?;
        let _ = tmp.keep();
        drop(old);
        return Ok(());
    }
    std::fs::rename(tmp.path(), target).at(target)?;
    let _ = tmp.keep();
    Ok(())
}

/// A progress bar on stderr counting `len` steps (hidden unless `show`).
fn bar(show: bool, len: u64, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    bar.set_prefix(what.to_string());
    bar
}
