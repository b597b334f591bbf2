//! MinHash signatures of documents and the LSH banding that finds candidate pairs.
//!
//! A document is the set `S` of its word n-grams ("shingles") over normalised text:
//! lower-cased, every run of whitespace collapsed to one space. A document of fewer
//! than `n` words is one shingle, its whole normalised text.
//!
//! Each shingle is hashed with seeded XXH3-64 and reduced modulo the Mersenne prime
//! `p = 2^31 - 1` (`x`), then put through `k` random linear permutations of `Z_p`:
//!
//! ```text
//! h_i(x) = (a_i * x + b_i) mod p      a_i in [1, p), b_i in [0, p)
//! sig[i] = min_{x in S} h_i(x)        (31 bits, stored as u32)
//! ```
//!
//! `a_i * x + b_i < 2^62` fits a `u64`, and modulo a Mersenne prime it folds with a
//! shift and an add, so the `k` permutations of one shingle run as 32x32->64-bit vector
//! multiplies (SSE2 everywhere; AVX2 when the CPU has it, chosen at run time, with the
//! same integer results: ~10x faster than `2^61 - 1`, whose 122-bit products do not
//! vectorise). For two documents, `P(sig_A[i] == sig_B[i]) = J(A, B) =
//! |A ∩ B| / |A ∪ B|`, so the fraction of equal entries estimates the Jaccard
//! similarity with standard deviation `sqrt(J(1-J)/k)`. (Two distinct shingles meet
//! in `Z_p` with probability `2^-31`: no measurable effect on `J`.) The seed draws `a`,
//! `b` (splitmix64) and seeds the shingle hash: the signatures are the same on every
//! platform and for any thread count.
//!
//! LSH: the signature is cut into `b` bands of `r` rows (`b*r <= k`); two documents
//! become a candidate pair when all rows of some band agree, which happens with
//! probability `1 - (1 - J^r)^b`, an S-curve around the threshold. `b` and `r` minimise
//! a weighted sum of the false-positive area below the threshold and the
//! false-negative area above it, the criterion of datasketch's `MinHashLSH` (whose
//! default weights are 0.5 each; see [`optimal_bands`]).

use rayon::prelude::*;
use twox_hash::XxHash3_64;

/// The Mersenne prime `2^31 - 1`.
pub const MERSENNE_31: u32 = (1 << 31) - 1;

/// Computes MinHash signatures with fixed shingle size, permutation count and seed.
#[derive(Debug, Clone)]
pub struct MinHasher {
    ngram: usize,
    seed: u64,
    a: Vec<u32>,
    b: Vec<u32>,
}

impl MinHasher {
    /// `num_perm` permutations over word `ngram`s, all drawn from `seed`.
    pub fn new(num_perm: usize, ngram: usize, seed: u64) -> Self {
        let p = MERSENNE_31 as u64;
        let mut state = seed;
        let mut a = Vec::with_capacity(num_perm);
        let mut b = Vec::with_capacity(num_perm);
        for _ in 0..num_perm {
            // a in [1, p): never zero, else h_i would be constant.
            a.push((1 + splitmix64(&mut state) % (p - 1)) as u32);
            b.push((splitmix64(&mut state) % p) as u32);
        }
        MinHasher {
            ngram: ngram.max(1),
            seed,
            a,
            b,
        }
    }

    /// Number of permutations (signature length).
    pub fn num_perm(&self) -> usize {
        self.a.len()
    }

    /// Writes the signature of `text` into `out` (length [`num_perm`](Self::num_perm)).
    pub fn signature_into(&self, text: &str, out: &mut [u32]) {
        assert_eq!(out.len(), self.a.len(), "signature buffer length");
        let mut xs = Vec::new();
        for_each_shingle(text, self.ngram, |shingle| {
            let h = XxHash3_64::oneshot_with_seed(self.seed, shingle.as_bytes());
            xs.push((h % MERSENNE_31 as u64) as u32);
        });
        min_permuted(&self.a, &self.b, &xs, out);
    }

    /// The signature of `text`.
    pub fn signature(&self, text: &str) -> Vec<u32> {
        let mut out = vec![0; self.a.len()];
        self.signature_into(text, &mut out);
        out
    }
}

/// `out[i] = min over x in xs of permute(a[i], b[i], x)` (`u32::MAX` when `xs` is empty).
fn min_permuted(a: &[u32], b: &[u32], xs: &[u32], out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { min_permuted_avx2(a, b, xs, out) };
        return;
    }
    min_permuted_portable(a, b, xs, out);
}

/// The same code as [`min_permuted_portable`] compiled for AVX2: 4 multiplies per
/// instruction instead of 2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn min_permuted_avx2(a: &[u32], b: &[u32], xs: &[u32], out: &mut [u32]) {
    min_permuted_portable(a, b, xs, out)
}

#[inline(always)]
fn min_permuted_portable(a: &[u32], b: &[u32], xs: &[u32], out: &mut [u32]) {
    out.fill(u32::MAX);
    for &x in xs {
        for ((m, &a), &b) in out.iter_mut().zip(a).zip(b) {
            *m = (*m).min(permute(a, b, x));
        }
    }
}

/// `(a * x + b) mod (2^31 - 1)` for `a, b, x < 2^31`.
#[inline(always)]
fn permute(a: u32, b: u32, x: u32) -> u32 {
    const P: u64 = MERSENNE_31 as u64;
    let t = a as u64 * x as u64 + b as u64; // < 2^62
    let t = ((t & P) + (t >> 31)) as u32; // < 2^32, same residue (2^31 = 1 mod p)
    let t = (t & MERSENNE_31) + (t >> 31); // <= p
    if t >= MERSENNE_31 { t - MERSENNE_31 } else { t }
}

/// Calls `f` on every shingle of `text`: each window of `n` consecutive words of the
/// normalised text, joined by single spaces, or the whole normalised text when it has
/// fewer than `n` words (nothing for a text without words). Duplicates are repeated.
pub fn for_each_shingle(text: &str, n: usize, mut f: impl FnMut(&str)) {
    let norm = normalise(text);
    if norm.is_empty() {
        return;
    }
    // Word i spans norm[starts[i]..ends[i]]; a window is one contiguous slice of norm.
    let mut starts = Vec::new();
    let mut ends = Vec::new();
    let mut at = 0;
    for w in norm.split(' ') {
        starts.push(at);
        ends.push(at + w.len());
        at += w.len() + 1;
    }
    let n = n.max(1);
    if starts.len() < n {
        f(&norm);
        return;
    }
    for i in 0..=starts.len() - n {
        f(&norm[starts[i]..ends[i + n - 1]]);
    }
}

/// Text lower-cased character by character (`char::to_lowercase`), every run of
/// whitespace replaced by one space, trimmed.
pub fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            space = !out.is_empty();
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else {
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// Fraction of equal entries of two signatures: the estimated Jaccard similarity.
pub fn estimated_jaccard(a: &[u32], b: &[u32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / a.len().max(1) as f64
}

/// The key of band `band` (rows `band*rows .. (band+1)*rows`) of a signature.
pub fn band_key(sig: &[u32], band: usize, rows: usize) -> u64 {
    let rows = &sig[band * rows..(band + 1) * rows];
    let mut bytes = [0u8; 4 * 64];
    if rows.len() <= 64 {
        for (chunk, v) in bytes.chunks_exact_mut(4).zip(rows) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        XxHash3_64::oneshot(&bytes[..4 * rows.len()])
    } else {
        let all: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
        XxHash3_64::oneshot(&all)
    }
}

/// Number of bands `b` and rows per band `r` (`b * r <= num_perm`) minimising
/// `fp_weight * ∫_0^t P(s) ds + fn_weight * ∫_t^1 (1 - P(s)) ds` with
/// `P(s) = 1 - (1 - s^r)^b`, the probability that two documents of similarity `s` share
/// a band. Same search and result as datasketch's `_optimal_param`.
pub fn optimal_bands(
    threshold: f64,
    num_perm: usize,
    fp_weight: f64,
    fn_weight: f64,
) -> (usize, usize) {
    let collide = |s: f64, b: usize, r: usize| 1.0 - (1.0 - s.powi(r as i32)).powi(b as i32);
    let mut best = (f64::INFINITY, 1, num_perm.max(1));
    for b in 1..=num_perm {
        for r in 1..=num_perm / b {
            let fp = integrate(|s| collide(s, b, r), 0.0, threshold);
            let fneg = integrate(|s| 1.0 - collide(s, b, r), threshold, 1.0);
            let err = fp_weight * fp + fn_weight * fneg;
            if err < best.0 {
                best = (err, b, r);
            }
        }
    }
    (best.1, best.2)
}

/// LSH banding plus verification: finds the clusters of near-duplicate signatures.
#[derive(Debug, Clone, Copy)]
pub struct Lsh {
    pub num_perm: usize,
    pub bands: usize,
    pub rows: usize,
    /// Estimated Jaccard similarity from which a candidate pair is linked.
    pub threshold: f64,
}

/// Work done by [`Lsh::link`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Pairs whose signatures were compared.
    pub candidate_pairs: u64,
    /// Compared pairs at or above the threshold.
    pub verified_pairs: u64,
}

impl Lsh {
    /// Clusters of the signatures `sigs` (`num_perm` values each, flattened). Band by
    /// band: sort (band key, index) pairs so equal keys form buckets; in a bucket compare
    /// each member with one representative of every cluster already met there (linear,
    /// not quadratic, in a bucket of copies) and link it to those at or above the
    /// threshold. Buckets are verified in parallel, links applied in order, so the
    /// result does not depend on the thread count. `on_band` is called after each band.
    pub fn link(&self, sigs: &[u32], on_band: &(dyn Fn() + Sync)) -> (Clusters, LinkStats) {
        let k = self.num_perm;
        let n = sigs.len() / k;
        let sig = |u: u32| &sigs[u as usize * k..(u as usize + 1) * k];
        let mut clusters = Clusters::new(n);
        let mut stats = LinkStats::default();
        let mut keys: Vec<(u64, u32)> = Vec::with_capacity(n);
        for band in 0..self.bands {
            keys.clear();
            keys.par_extend(
                (0..n as u32)
                    .into_par_iter()
                    .map(|u| (band_key(sig(u), band, self.rows), u)),
            );
            keys.par_sort_unstable();
            let buckets: Vec<&[(u64, u32)]> = keys
                .chunk_by(|a, b| a.0 == b.0)
                .filter(|g| g.len() > 1)
                .collect();
            let uf = &clusters;
            let found: Vec<(u64, Vec<(u32, u32)>)> = buckets
                .par_iter()
                .map(|bucket| {
                    let mut reps: Vec<u32> = Vec::new();
                    let mut links = Vec::new();
                    let mut compared = 0u64;
                    for &(_, x) in *bucket {
                        let rx = uf.root(x);
                        let mut joined = false;
                        for &r in &reps {
                            if uf.root(r) == rx {
                                joined = true;
                                continue;
                            }
                            compared += 1;
                            if estimated_jaccard(sig(r), sig(x)) >= self.threshold {
                                links.push((r, x));
                                joined = true;
                            }
                        }
                        if !joined {
                            reps.push(x);
                        }
                    }
                    (compared, links)
                })
                .collect();
            for (compared, links) in found {
                stats.candidate_pairs += compared;
                stats.verified_pairs += links.len() as u64;
                for (a, b) in links {
                    clusters.union(a, b);
                }
            }
            on_band();
        }
        (clusters, stats)
    }
}

/// Union-find over indices; a root is always the smallest index of its set, so the
/// root is the first document of its cluster.
#[derive(Debug, Clone)]
pub struct Clusters {
    parent: Vec<u32>,
}

impl Clusters {
    /// `n` singletons.
    pub fn new(n: usize) -> Self {
        Clusters {
            parent: (0..n as u32).collect(),
        }
    }

    /// Root of `x` without changing anything (safe for parallel readers).
    pub fn root(&self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            x = self.parent[x as usize];
        }
        x
    }

    /// Root of `x`, halving the path on the way.
    pub fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let up = self.parent[self.parent[x as usize] as usize];
            self.parent[x as usize] = up;
            x = up;
        }
        x
    }

    /// Merge the sets of `a` and `b` under the smaller root.
    pub fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.parent[ra.max(rb) as usize] = ra.min(rb);
        }
    }

    /// Point every element straight at its root, so [`rep`](Self::rep) is O(1).
    pub fn flatten(&mut self) {
        for x in 0..self.parent.len() as u32 {
            let r = self.find(x);
            self.parent[x as usize] = r;
        }
    }

    /// The root of `x` after [`flatten`](Self::flatten).
    pub fn rep(&self, x: u32) -> u32 {
        self.parent[x as usize]
    }
}

/// Composite Simpson's rule over 128 intervals (the integrands are smooth polynomials).
fn integrate(f: impl Fn(f64) -> f64, lo: f64, hi: f64) -> f64 {
    const N: usize = 128;
    if hi <= lo {
        return 0.0;
    }
    let h = (hi - lo) / N as f64;
    let mut sum = f(lo) + f(hi);
    for i in 1..N {
        sum += f(lo + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    sum * h / 3.0
}

/// The splitmix64 generator: a fixed, portable stream of 64-bit values from a seed.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn shingles(text: &str, n: usize) -> Vec<String> {
        let mut v = Vec::new();
        for_each_shingle(text, n, |s| v.push(s.to_string()));
        v
    }

    #[test]
    fn shingles_are_normalised_word_windows() {
        assert_eq!(
            shingles("A  b\tC\n d", 3),
            vec!["a b c".to_string(), "b c d".to_string()]
        );
        assert_eq!(
            shingles(" OLÁ  Mundo\u{a0}ÇÃO ", 5),
            vec!["olá mundo ção".to_string()]
        );
        assert!(shingles(" \n ", 5).is_empty());
    }

    #[test]
    fn signatures_are_seeded_and_fixed() {
        let m = MinHasher::new(16, 2, 42);
        let s = m.signature("o rato roeu a roupa do rei de roma");
        assert_eq!(
            s,
            MinHasher::new(16, 2, 42).signature("O rato roeu a roupa do rei de Roma")
        );
        assert_ne!(
            s,
            MinHasher::new(16, 2, 43).signature("o rato roeu a roupa do rei de roma")
        );
        // Pinned values: a change here changes every dedup result.
        assert_eq!(&s[..3], &PINNED[..]);
    }
    // Also what an independent Python version (python-xxhash's xxh3_64, splitmix64,
    // `(a*x+b) % (2**31-1)`) gives.
    const PINNED: [u32; 3] = [19968616, 251746636, 616900912];

    #[test]
    fn estimate_tracks_exact_jaccard() {
        // Two sets of 2-grams over distinct tokens with a known overlap.
        let words: Vec<String> = (0..400).map(|i| format!("w{i}")).collect();
        let a = words[..300].join(" ");
        let b = words[100..].join(" ");
        let sa: HashSet<_> = shingles(&a, 2).into_iter().collect();
        let sb: HashSet<_> = shingles(&b, 2).into_iter().collect();
        let exact = sa.intersection(&sb).count() as f64 / sa.union(&sb).count() as f64;
        let m = MinHasher::new(512, 2, 7);
        let est = estimated_jaccard(&m.signature(&a), &m.signature(&b));
        // sd = sqrt(0.25 * 0.75 / 512) ~ 0.019
        assert!((est - exact).abs() < 0.08, "estimate {est}, exact {exact}");
    }

    #[test]
    fn bands_match_datasketch() {
        // datasketch 2.0 `lsh._optimal_param(t, k, fp_weight, fn_weight)`.
        let cases = [
            ((0.85, 64, 0.5, 0.5), (4, 15)),
            ((0.85, 64, 0.1, 0.9), (7, 9)),
            ((0.5, 128, 0.5, 0.5), (25, 5)),
            ((0.5, 128, 0.1, 0.9), (32, 4)),
            ((0.9, 256, 0.5, 0.5), (9, 28)),
            ((0.7, 64, 0.1, 0.9), (12, 5)),
        ];
        for ((t, k, wp, wn), want) in cases {
            assert_eq!(
                optimal_bands(t, k, wp, wn),
                want,
                "t {t} k {k} weights {wp}/{wn}"
            );
        }
    }

    #[test]
    fn link_clusters_copies_and_keeps_the_first_as_root() {
        let m = MinHasher::new(64, 3, 1);
        let base: Vec<String> = (0..300).map(|i| format!("w{i}")).collect();
        let other: Vec<String> = (0..300).map(|i| format!("v{i}")).collect();
        let mut near = base.clone();
        near[150] = "changed".into();
        let docs = [
            other.join(" "),
            base.join(" "),
            near.join(" "),
            other.join("  "),
        ];
        let sigs: Vec<u32> = docs.iter().flat_map(|d| m.signature(d)).collect();
        let (b, r) = optimal_bands(0.85, 64, 0.1, 0.9);
        let lsh = Lsh {
            num_perm: 64,
            bands: b,
            rows: r,
            threshold: 0.85,
        };
        let (mut c, stats) = lsh.link(&sigs, &|| {});
        c.flatten();
        assert_eq!((0..4).map(|u| c.rep(u)).collect::<Vec<_>>(), [0, 1, 1, 0]);
        assert_eq!(stats.verified_pairs, 2);
    }

    #[test]
    fn permute_is_mod_p() {
        let p = MERSENNE_31 as u64;
        for (a, b, x) in [
            (1, 0, 0),
            (p - 1, p - 1, p - 1),
            (123_456_789, 987_654, 2_000_000_000),
        ] {
            let want = (a * x + b) % p;
            assert_eq!(permute(a as u32, b as u32, x as u32) as u64, want);
        }
    }

    #[test]
    fn vector_paths_agree() {
        let m = MinHasher::new(100, 1, 5);
        let xs: Vec<u32> = (0..999u32)
            .map(|i| i.wrapping_mul(2_654_435_761) >> 1)
            .collect();
        let mut portable = vec![0; 100];
        min_permuted_portable(&m.a, &m.b, &xs, &mut portable);
        let mut dispatched = vec![0; 100];
        min_permuted(&m.a, &m.b, &xs, &mut dispatched);
        assert_eq!(dispatched, portable);
    }

    #[test]
    fn simpson_integrates_polynomials() {
        assert!((integrate(|x| x * x, 0.0, 1.0) - 1.0 / 3.0).abs() < 1e-12);
    }
}
