//! Memory of `pretrain --eval-tasks` under `--strategy fsdp`, counted by the
//! allocator: 4 thread ranks of a model of 8 blocks (5.5 million parameters, 22 MB in
//! f32) score the task fixtures (choices, log-likelihoods, rolling windows, greedy
//! generation) in lockstep. Each rank gathers the embeddings and head once and one
//! block at a time for each forward, so what the scoring adds to the ranks' shards is
//! a few blocks and the activations, not a whole model per rank (4 × 22 MB).
//!
//! A test binary of its own: the counting allocator sees every allocation of the
//! process, so nothing else may run beside it.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lit_claire::strategy::threads::ThreadGroup;
use lit_claire::strategy::{Strategy, StrategyKind};
use lit_claire::train::{TrainConfig, Trainer};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
#[path = "support/fsdp_bench_model.rs"]
mod fsdp_bench_model;
use counting_alloc::{LIVE, PEAK};
use fsdp_bench_model::{MODEL_BYTES, eight_block_model, four_rank_config, random_data};

const MB: f64 = 1e6;

#[test]
fn fsdp_ranks_score_tasks_without_gathering_the_whole_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = eight_block_model(dir.path());
    let model_bytes = MODEL_BYTES;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        eval_tasks: Some(root.join("tests/fixtures/eval/tasks/mixed.jsonl")),
        ..four_rank_config(&model, run.path(), StrategyKind::Fsdp)
    };
    let data = random_data();
    let group = ThreadGroup::new(4, Duration::from_secs(120));
    let before = AtomicUsize::new(0);
    let values: Vec<Option<Vec<f64>>> = std::thread::scope(|s| {
        let (cfg, data, group, before) = (&cfg, &data, &group, &before);
        let hs: Vec<_> = group
            .handles()
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let st = Strategy::cpu().with_collective(c, cfg.strategy);
                    let mut t = Trainer::on_rank(cfg, data.clone(), st.clone()).unwrap();
                    // Loaded everywhere: the peak from here on is the scoring's.
                    st.barrier().unwrap();
                    if st.is_global_zero() {
                        let live = LIVE.load(Ordering::Relaxed);
                        before.store(live, Ordering::Relaxed);
                        PEAK.store(live, Ordering::Relaxed);
                    }
                    st.barrier().unwrap();
                    let v = t.score_tasks().unwrap();
                    st.barrier().unwrap();
                    v
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let added = PEAK.load(Ordering::Relaxed) - before.load(Ordering::Relaxed);
    eprintln!(
        "4 fsdp thread ranks scoring the task fixtures on a {:.1} MB model: peak {:.1} MB above the shards (a whole model per rank would be {:.1} MB)",
        model_bytes as f64 / MB,
        added as f64 / MB,
        4.0 * model_bytes as f64 / MB
    );
    // Rank 0 has the values, the others none.
    let columns = lit_claire::eval::TaskSet::load(
        std::slice::from_ref(cfg.eval_tasks.as_ref().unwrap()),
        &model,
    )
    .unwrap()
    .columns();
    let v = values[0].as_ref().expect("rank 0's values");
    assert_eq!(v.len(), columns.len(), "{v:?}");
    assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
    assert!(values[1..].iter().all(Option::is_none));
    // Every rank gathering the whole model would add at least 4 × 22 MB; one block at
    // a time adds 4 × (1 MB of embeddings and head + 2.6 MB of a block), the thread
    // collective's buffers and the activations (7 Dec 2026: 33.6 MB; with every block
    // gathered and held before scoring instead, 116.1 MB).
    assert!(
        added < 3 * model_bytes,
        "scoring added {added} bytes over 4 ranks, a {model_bytes}-byte model"
    );
}
