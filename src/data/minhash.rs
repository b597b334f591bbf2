//! MinHash signatures of documents and the LSH banding that finds candidate pairs.
//!
//! A document is the set `S` of its word n-grams ("shingles") over normalised text:
//! lower-cased, every run of whitespace collapsed to one space. A document of fewer
//! than `n` words is one shingle, its whole normalised text.
//!
//! Each shingle is hashed with seeded XXH3-64 and reduced modulo the Mersenne prime
//! `p = 2^61 - 1` (`x`), then put through `k` random linear permutations of `Z_p`:
//!
//! ```text
//! h_i(x) = (a_i * x + b_i) mod p      a_i in [1, p), b_i in [0, p)
//! sig[i] = min_{x in S} h_i(x) >> 29  (the top 32 of 61 bits; the min commutes with the shift)
//! ```
//!
//! The product takes 122 bits (`u128`); modulo a Mersenne prime it folds with a shift
//! and an add. (With `a_i`, `x` kept below `2^32` to stay in `u64`, `a_i * x` would
//! wrap around `p` only a few times, the minimum would fall on the same small `x` in
//! every permutation and the estimate would be biased upwards.) For two documents,
//! `P(sig_A[i] == sig_B[i]) = J(A, B) = |A ∩ B| / |A ∪ B|`, so the fraction of equal
//! entries estimates the Jaccard similarity with standard deviation `sqrt(J(1-J)/k)`.
//! The seed draws `a`, `b` (splitmix64) and seeds the shingle hash: the signatures are
//! the same on every platform and for any thread count.
//!
//! LSH: the signature is cut into `b` bands of `r` rows (`b*r <= k`); two documents
//! become a candidate pair when all rows of some band agree, which happens with
//! probability `1 - (1 - J^r)^b`, an S-curve around the threshold. `b` and `r` minimise
//! a weighted sum of the false-positive area below the threshold and the
//! false-negative area above it, the criterion of datasketch's `MinHashLSH` (whose
//! default weights are 0.5 each; see [`optimal_bands`]).

use twox_hash::XxHash3_64;

/// The Mersenne prime `2^61 - 1`.
pub const MERSENNE_61: u64 = (1 << 61) - 1;

/// Computes MinHash signatures with fixed shingle size, permutation count and seed.
#[derive(Debug, Clone)]
pub struct MinHasher {
    ngram: usize,
    seed: u64,
    a: Vec<u64>,
    b: Vec<u64>,
}

impl MinHasher {
    /// `num_perm` permutations over word `ngram`s, all drawn from `seed`.
    pub fn new(num_perm: usize, ngram: usize, seed: u64) -> Self {
        let mut state = seed;
        let mut a = Vec::with_capacity(num_perm);
        let mut b = Vec::with_capacity(num_perm);
        for _ in 0..num_perm {
            // a in [1, p): never zero, else h_i would be constant.
            a.push(mod_p(splitmix64(&mut state)).max(1));
            b.push(mod_p(splitmix64(&mut state)));
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
        let mut mins = vec![u64::MAX; self.a.len()];
        for_each_shingle(text, self.ngram, |shingle| {
            let x = mod_p(XxHash3_64::oneshot_with_seed(self.seed, shingle.as_bytes()));
            for ((m, &a), &b) in mins.iter_mut().zip(&self.a).zip(&self.b) {
                let t = a as u128 * x as u128 + b as u128; // < 2^122
                let v = mod_p(((t as u64) & MERSENNE_61) + (t >> 61) as u64);
                *m = (*m).min(v);
            }
        });
        for (o, m) in out.iter_mut().zip(mins) {
            *o = (m >> 29) as u32;
        }
    }

    /// The signature of `text`.
    pub fn signature(&self, text: &str) -> Vec<u32> {
        let mut out = vec![0; self.a.len()];
        self.signature_into(text, &mut out);
        out
    }
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

/// Lower-cased text with every run of whitespace replaced by one space, trimmed.
pub fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for w in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        for c in w.chars() {
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

/// `v mod p` for any `u64` (`2^61 ≡ 1 mod p`, so the high bits fold onto the low ones).
fn mod_p(v: u64) -> u64 {
    let v = (v & MERSENNE_61) + (v >> 61);
    if v >= MERSENNE_61 { v - MERSENNE_61 } else { v }
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
        assert_eq!(shingles(" Olá  Mundo ", 5), vec!["olá mundo".to_string()]);
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
    const PINNED: [u32; 3] = [869898855, 145668973, 45031844];

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
    fn mod_p_reduces() {
        for v in [
            0,
            1,
            MERSENNE_61 - 1,
            MERSENNE_61,
            MERSENNE_61 + 5,
            u64::MAX,
        ] {
            assert_eq!(mod_p(v), v % MERSENNE_61);
        }
    }

    #[test]
    fn simpson_integrates_polynomials() {
        assert!((integrate(|x| x * x, 0.0, 1.0) - 1.0 / 3.0).abs() < 1e-12);
    }
}
