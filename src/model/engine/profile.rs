//! Where a training step's time goes: wall time (and FLOPs, for matmuls) per kind of
//! work, collected when switched on (`lit-claire bench --profile`). Off, each probe
//! costs one relaxed atomic load. The parts of a micro-batch split over the cores
//! (`StepRunner::parts`) run at once, each adding its own thread's time.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<Vec<Row>> = Mutex::new(Vec::new());

/// One kind of work.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Row {
    pub kind: &'static str,
    pub seconds: f64,
    /// Floating-point operations (matmuls only; 0 elsewhere).
    pub flops: f64,
    pub calls: u64,
}

/// Start (or stop) collecting, from an empty table.
pub fn enable(on: bool) {
    TABLE.lock().unwrap_or_else(|e| e.into_inner()).clear();
    ON.store(on, Ordering::Relaxed);
}

/// What was collected, largest time first.
pub fn report() -> Vec<Row> {
    let mut rows = TABLE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    rows
}

/// Run `f`, counting its time (and `flops`) under `kind` when collecting.
pub fn timed<R>(kind: &'static str, flops: f64, f: impl FnOnce() -> R) -> R {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let t = Instant::now();
    let r = f();
    let dt = t.elapsed().as_secs_f64();
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    match table.iter_mut().find(|r| r.kind == kind) {
        Some(row) => {
            row.seconds += dt;
            row.flops += flops;
            row.calls += 1;
        }
        None => table.push(Row {
            kind,
            seconds: dt,
            flops,
            calls: 1,
        }),
    }
    r
}
