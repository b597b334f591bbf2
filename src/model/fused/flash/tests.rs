//! The flash kernel against the definition of masked attention.

use super::*;
use candle_core::{Device, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::super::softmax_plain;

const SMALL: Tiles = Tiles {
    q: 16,
    k: 32,
    kv: 16,
};

/// The definition, written out: key `k` is visible to query `q` of row `b` iff
/// `k ≤ q`, `q − k < w` and `k` is not before the query's document. K and V are
/// copied per head; scores are `(B, nh, T, S)`.
pub(super) fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, m: &MaskSpec) -> Tensor {
    let (b, nh, t, _) = q.dims4().unwrap();
    let (_, nkv, s, _) = k.dims4().unwrap();
    let dev = q.device();
    let idx: Vec<u32> = (0..nh).map(|h| (h / (nh / nkv)) as u32).collect();
    let idx = Tensor::new(idx, dev).unwrap();
    let k = k.index_select(&idx, 1).unwrap();
    let v = v.index_select(&idx, 1).unwrap();
    let mut bias = vec![0f32; b * t * s];
    for bb in 0..b {
        for i in 0..t {
            for j in 0..s {
                let (qp, kp) = (m.q_start + i, m.k_start + j);
                let window = match m.window {
                    AttentionWindow::Global => true,
                    AttentionWindow::Sliding(w) => kp + w > qp,
                };
                let doc = m.docs.as_ref().is_none_or(|d| kp >= d[bb * t + i] as usize);
                if !(kp <= qp && window && doc) {
                    bias[(bb * t + i) * s + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    let bias = Tensor::from_vec(bias, (b, 1, t, s), dev).unwrap();
    let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    let p = softmax_plain(&scores.broadcast_add(&bias).unwrap()).unwrap();
    p.matmul(&v).unwrap()
}

/// `max |a − b| ≤ tol · max |b|` (+ 1e-7, for gradients that are exactly 0).
pub(super) fn rel_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    // f32::max drops a NaN operand: a NaN (or an infinity the other side lacks) must fail
    // here, not vanish from the maximum.
    let bad = a
        .iter()
        .zip(&b)
        .position(|(x, y)| !(x.is_finite() && y.is_finite()) && x != y);
    assert!(
        bad.is_none(),
        "{what}: element {bad:?} is not finite on one side"
    );
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff <= tol * scale + 1e-7,
        "{what}: max difference {diff} over max {scale}"
    );
}

struct Case {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    s: usize,
    hs: usize,
    q_start: usize,
    window: AttentionWindow,
    docs: bool,
}

fn run_case(c: &Case, seed: u64) {
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut randn = |shape: (usize, usize, usize, usize)| {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &dev).unwrap()).unwrap()
    };
    let q = randn((c.b, c.nh, c.t, c.hs));
    let k = randn((c.b, c.nkv, c.s, c.hs));
    let v = randn((c.b, c.nkv, c.s, c.hs));
    let probe = randn((c.b, c.nh, c.t, c.hs)).as_tensor().clone();
    // As the KV cache uses them: the last query sits on the last key.
    let k_start = c.q_start + c.t - c.s;
    let docs = c.docs.then(|| {
        let mut d = Vec::new();
        for _ in 0..c.b {
            let mut start = 0;
            for i in 0..c.t {
                if rng.random_bool(0.05) {
                    start = c.q_start + i;
                }
                d.push(start as u32);
            }
        }
        std::sync::Arc::<[u32]>::from(d)
    });
    let mask = MaskSpec {
        q_start: c.q_start,
        k_start,
        window: c.window,
        docs,
    };
    let scale = 1.0 / (c.hs as f64).sqrt();
    let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
    let want = reference(qt, kt, vt, scale, &mask);
    let gw = (&want * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut twins = vec![];
    if mask.docs.is_none() {
        twins.push(("plain", attention_plain(qt, kt, vt, scale, &mask).unwrap()));
    }
    for (name, tiles) in [("small tiles", SMALL), ("default tiles", TILES)] {
        twins.push((
            name,
            flash_attention(qt, kt, vt, scale, &mask, tiles).unwrap(),
        ));
    }
    for (name, got) in twins {
        rel_close(name, &got, &want, 1e-5);
        let g = (&got * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (x, n) in [(&q, "dq"), (&k, "dk"), (&v, "dv")] {
            let what = format!("{name} {n}");
            rel_close(&what, g.get(x).unwrap(), gw.get(x).unwrap(), 1e-5);
        }
    }
}

#[test]
fn flash_matches_the_definition_values_and_gradients() {
    use AttentionWindow::{Global, Sliding};
    #[rustfmt::skip]
    let cases = [
        // T not a multiple of any tile; nh = nkv
        Case { b: 2, nh: 2, nkv: 2, t: 70, s: 70, hs: 8, q_start: 0, window: Global, docs: false },
        // a cache: S > T, q_start > k_start
        Case { b: 1, nh: 2, nkv: 1, t: 21, s: 90, hs: 16, q_start: 100, window: Global, docs: false },
        // one decode step
        Case { b: 2, nh: 4, nkv: 2, t: 1, s: 75, hs: 8, q_start: 74, window: Global, docs: false },
        // windows shorter and longer than a tile
        Case { b: 1, nh: 3, nkv: 3, t: 80, s: 80, hs: 8, q_start: 0, window: Sliding(5), docs: false },
        Case { b: 1, nh: 2, nkv: 2, t: 300, s: 300, hs: 4, q_start: 0, window: Sliding(45), docs: false },
        Case { b: 1, nh: 2, nkv: 1, t: 30, s: 100, hs: 8, q_start: 80, window: Sliding(40), docs: false },
        // one kv head (MQA), GQA
        Case { b: 1, nh: 4, nkv: 1, t: 50, s: 50, hs: 8, q_start: 0, window: Global, docs: false },
        Case { b: 2, nh: 6, nkv: 2, t: 33, s: 33, hs: 8, q_start: 0, window: Global, docs: false },
        // packed documents, with and without a window, past a tile
        Case { b: 3, nh: 4, nkv: 2, t: 90, s: 90, hs: 8, q_start: 0, window: Global, docs: true },
        Case { b: 2, nh: 2, nkv: 1, t: 300, s: 300, hs: 4, q_start: 0, window: Sliding(20), docs: true },
    ];
    for (n, c) in cases.iter().enumerate() {
        run_case(c, n as u64);
    }
}

#[test]
fn random_shapes_match_the_definition() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for n in 0..12 {
        let nkv = rng.random_range(1..=3);
        let t = rng.random_range(1..=120);
        let s = t + if rng.random_bool(0.4) {
            rng.random_range(0..60)
        } else {
            0
        };
        let window = match rng.random_range(0..3) {
            0 => AttentionWindow::Global,
            _ => AttentionWindow::Sliding(rng.random_range(1..=80)),
        };
        let c = Case {
            b: rng.random_range(1..=2),
            nh: nkv * rng.random_range(1..=3),
            nkv,
            t,
            s,
            hs: rng.random_range(1..=12),
            q_start: s - t + rng.random_range(0..10),
            window,
            docs: rng.random_bool(0.3),
        };
        run_case(&c, 100 + n);
    }
}

/// The project resumes bit for bit: output and gradients must not depend on the
/// number of threads.
#[test]
fn results_do_not_depend_on_the_number_of_threads() {
    let dev = Device::Cpu;
    let q = Var::randn(0f32, 1.0, (2, 4, 150, 16), &dev).unwrap();
    let k = Var::randn(0f32, 1.0, (2, 2, 150, 16), &dev).unwrap();
    let v = Var::randn(0f32, 1.0, (2, 2, 150, 16), &dev).unwrap();
    let mask = MaskSpec {
        q_start: 0,
        k_start: 0,
        window: AttentionWindow::Sliding(100),
        docs: None,
    };
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let y = flash_attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                0.25,
                &mask,
                SMALL,
            )
            .unwrap();
            let g = (y.sqr().unwrap()).sum_all().unwrap().backward().unwrap();
            [
                y,
                g.get(&q).unwrap().clone(),
                g.get(&k).unwrap().clone(),
                g.get(&v).unwrap().clone(),
            ]
            .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
    };
    assert!(run(1) == run(3), "1 and 3 threads differ");
}

/// Issue 9 through the flash kernel: after a sink key (score 17), 8191 keys of
/// weight e^−17 each must still count in the row's normaliser.
#[test]
fn a_long_row_after_an_attention_sink_keeps_its_small_terms() {
    let s = 8192;
    let dev = Device::Cpu;
    let q = Tensor::from_vec(vec![17f32, 0.0], (1, 1, 1, 2), &dev).unwrap();
    let mut k = vec![0f32; s * 2];
    let mut v = vec![0f32; s * 2];
    k[0] = 1.0;
    v[0] = 1.0;
    (1..s).for_each(|j| v[2 * j + 1] = 1.0);
    let k = Tensor::from_vec(k, (1, 1, s, 2), &dev).unwrap();
    let v = Tensor::from_vec(v, (1, 1, s, 2), &dev).unwrap();
    let mask = MaskSpec {
        q_start: s - 1,
        k_start: 0,
        window: AttentionWindow::Global,
        docs: None,
    };
    let o = flash_attention(&q, &k, &v, 1.0, &mask, TILES).unwrap();
    let o = o.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let p0 = 1.0 / (1.0 + (s - 1) as f64 * (-17f64).exp());
    assert!(
        ((o[0] as f64 - p0) / p0).abs() < 1e-6,
        "sink {} vs {p0}",
        o[0]
    );
}

#[test]
fn exp_approx_is_close_to_exp() {
    let mut worst = 0f64;
    for i in 0..=200_000 {
        let x = -87.0 + 87.0 * i as f32 / 200_000.0;
        let want = f64::from(x).exp();
        worst = worst.max((f64::from(exp_approx(x)) - want).abs() / want);
    }
    assert!(worst < 5e-7, "relative error {worst}");
    assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_approx(-100.0), 0.0);
}

/// The backward's parts cover every key block once, in order, and split a causal
/// row's work about evenly.
#[test]
fn backward_parts_cover_the_keys_and_balance_the_work() {
    let dims = Dims {
        b: 1,
        nh: 1,
        nkv: 1,
        t: 2048,
        s: 2048,
        hs: 8,
    };
    let mask = MaskSpec {
        q_start: 0,
        k_start: 0,
        window: AttentionWindow::Global,
        docs: None,
    };
    let flash = Flash {
        dims,
        scale: 1.0,
        mask: mask.clone(),
        tiles: TILES,
        stats: std::sync::Mutex::new(None),
        #[cfg(feature = "cuda")]
        lse: std::sync::Mutex::new(None),
    };
    let ranges = visible_ranges(&dims, &mask);
    let cuts = flash.key_parts(&ranges);
    let nkb = 2048 / TILES.kv;
    assert_eq!((cuts[0], cuts[BWD_PARTS]), (0, nkb));
    assert!(cuts.windows(2).all(|w| w[0] < w[1]), "{cuts:?}");
    // Key block kb is seen by the query blocks from its own on: work ∝ nqb − kb.
    let work = |kb: usize| 2048 / TILES.q - kb * TILES.kv / TILES.q;
    let parts: Vec<usize> = cuts
        .windows(2)
        .map(|w| (w[0]..w[1]).map(work).sum())
        .collect();
    let (lo, hi) = (parts.iter().min().unwrap(), parts.iter().max().unwrap());
    assert!(*hi <= lo + lo / 4, "unbalanced parts {parts:?}");
    // A short row with fewer blocks than parts: empty parts at the end, nothing lost.
    let short = Dims {
        t: 70,
        s: 70,
        ..dims
    };
    let flash = Flash {
        dims: short,
        ..flash
    };
    let cuts = flash.key_parts(&visible_ranges(&short, &mask));
    assert_eq!((cuts[0], cuts[BWD_PARTS]), (0, 2));
    assert!(cuts.windows(2).all(|w| w[0] <= w[1]), "{cuts:?}");
}
