//! Ranks as threads of one process: the [`Collective`] backend for machines without
//! GPUs, so that every line of the data-parallel logic runs on CPU (and in CI).
//!
//! The ranks of a [`ThreadGroup`] share one slot table. Each operation goes through
//! the same three phases, one operation at a time:
//!
//! ```text
//! collecting   each rank deposits its contribution; the last to arrive reduces them
//!              (in rank order, so the result never depends on who came first)
//! ready        each rank reads the result
//! (drained)    once every rank has read, the table is cleared for the next operation
//! ```
//!
//! Every wait has a deadline: a rank that does not arrive within the group's timeout
//! is named in the error of those waiting for it. [`Collective::abort`] marks the group
//! failed: every pending and later call, on every rank, fails with
//! `rank R failed: reason`. A result that was complete before the abort is still
//! delivered, so ranks that already agreed on something (a loss that is NaN) stop at
//! the same point with the same message.
//!
//! Each rank records the collectives it issues in its [`Ledger`](super::desync): when
//! the ranks call different operations, or reach a barrier (every step ends with one)
//! having issued different sequences, the group fails with one line naming the first
//! rank and collective that differ (see [`desync`]).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use super::collective::{Collective, ReduceOp};
use super::desync::{self, Call, CallKind, Ledger};
use crate::error::{Error, Result};

/// Values in flight, in the precision they are reduced in: f64 stays f64, every other
/// dtype travels as f32.
#[derive(Debug, Clone)]
enum Values {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Values {
    fn of(x: &Tensor) -> Result<Self> {
        let flat = x.flatten_all()?;
        Ok(match x.dtype() {
            DType::F64 => Values::F64(flat.to_vec1()?),
            _ => Values::F32(flat.to_dtype(DType::F32)?.to_vec1()?),
        })
    }

    fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F64(v) => v.len(),
        }
    }

    fn is_f64(&self) -> bool {
        matches!(self, Values::F64(_))
    }

    /// Elements `start..start + len` as a tensor of `like`'s dtype and device, shaped `shape`.
    fn to_tensor(
        &self,
        start: usize,
        len: usize,
        shape: &[usize],
        like: &Tensor,
    ) -> Result<Tensor> {
        let dev = like.device();
        let t = match self {
            Values::F32(v) => Tensor::from_slice(&v[start..start + len], shape, dev)?,
            Values::F64(v) => Tensor::from_slice(&v[start..start + len], shape, dev)?,
        };
        Ok(t.to_dtype(like.dtype())?)
    }
}

/// Which operation the ranks are in; every rank must name the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllReduce(ReduceOp, usize),
    ReduceScatter(ReduceOp, usize),
    AllGather(usize),
    Broadcast(usize, usize),
    Barrier,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduce(..) => "all_reduce",
            Op::ReduceScatter(..) => "reduce_scatter",
            Op::AllGather(_) => "all_gather",
            Op::Broadcast(..) => "broadcast",
            Op::Barrier => "barrier",
        }
    }
}

#[derive(Debug, Default)]
struct Table {
    /// Operations completed so far (names an operation in messages).
    generation: u64,
    /// The operation in progress, and whether it carries f64 values.
    op: Option<(Op, bool)>,
    /// Contributions of the current operation, by rank.
    slots: Vec<Option<Values>>,
    /// The result, once every rank has contributed.
    result: Option<Arc<Values>>,
    /// Ranks that have not read the result yet.
    unread: Vec<bool>,
    /// The first rank that failed, and why.
    failed: Option<(usize, String)>,
    /// `failed` is the group's verdict (ranks out of step), said as it is rather than
    /// as that rank's failure.
    verdict: bool,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    timeout: Duration,
    table: Mutex<Table>,
    changed: Condvar,
    /// What each rank issued (each rank writes its own, outside the table's lock).
    ledgers: Vec<Mutex<Ledger>>,
}

impl Shared {
    /// The table, even if a rank panicked while holding it (a panicking rank is turned
    /// into an abort by the launcher; the others must still get out).
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failure(t: &Table) -> Option<Error> {
        t.failed.as_ref().map(|(r, why)| {
            Error::Msg(if t.verdict {
                why.clone()
            } else {
                format!("rank {r} failed: {why}")
            })
        })
    }

    /// Rank `rank` issues `call`.
    fn record(&self, rank: usize, call: Call) {
        self.ledgers[rank]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(call);
    }

    /// The first difference between the records of `ranks` (which must have issued
    /// the same number of calls by now), as the group's verdict.
    fn desync(&self, ranks: impl Iterator<Item = usize>) -> Option<(usize, String)> {
        let all: Vec<desync::Summary> = ranks
            .map(|r| {
                self.ledgers[r]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .summary(r)
            })
            .collect();
        desync::compare(&all)
    }

    /// Wait on the table until `done` holds, the group fails, or the deadline passes
    /// (then the error names the ranks `laggards` lists).
    fn wait<'a>(
        &self,
        mut t: MutexGuard<'a, Table>,
        what: &str,
        deadline: Instant,
        done: impl Fn(&Table) -> bool,
        laggards: impl Fn(&Table) -> Vec<usize>,
    ) -> Result<MutexGuard<'a, Table>> {
        loop {
            if done(&t) {
                return Ok(t);
            }
            if let Some(e) = Self::failure(&t) {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                let late: Vec<String> = laggards(&t).iter().map(|r| r.to_string()).collect();
                return Err(Error::Msg(format!(
                    "{what} timed out after {} s waiting for rank {} (it stopped, hangs, or is that far behind; raise --collective-timeout if a step legitimately takes longer)",
                    self.timeout.as_secs_f64(),
                    late.join(", ")
                )));
            }
            t = self
                .changed
                .wait_timeout(t, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Contribute `values` to operation `op` and return the combined result.
    fn exchange(&self, rank: usize, op: Op, values: Values) -> Result<Arc<Values>> {
        let deadline = super::deadline_after(self.timeout);
        let t = self.lock();
        // After a failure no operation starts (one already complete is still read).
        if let Some(e) = Self::failure(&t) {
            return Err(e);
        }
        // The previous operation must be read by everyone before this one starts.
        let what = format!(
            "{} (waiting for the previous operation to drain)",
            op.name()
        );
        let mut t = self.wait(
            t,
            &what,
            deadline,
            |t| t.result.is_none(),
            |t| (0..self.world).filter(|&r| t.unread[r]).collect(),
        )?;
        // A broadcast's non-root ranks send nothing: only the root says the dtype.
        let wide = values.is_f64() || matches!(op, Op::Broadcast(..));
        match t.op {
            None => t.op = Some((op, wide)),
            Some(other)
                if other.0 != op || (other.1 != wide && !matches!(op, Op::Broadcast(..))) =>
            {
                // The ranks in this operation so far, and this one, issued as many
                // calls: their records say where they parted.
                let here = (0..self.world).filter(|&r| r == rank || t.slots[r].is_some());
                let (who, why) = self.desync(here).unwrap_or_else(|| {
                    (rank, format!(
                        "ranks out of step at operation {}: rank {rank} called {op:?} (f64: {wide}), another rank {:?} (f64: {})",
                        t.generation, other.0, other.1
                    ))
                });
                if t.failed.is_none() {
                    t.failed = Some((who, why.clone()));
                    t.verdict = true;
                }
                self.changed.notify_all();
                return Err(Self::failure(&t).unwrap_or(Error::Msg(why)));
            }
            Some(_) => {}
        }
        let generation = t.generation;
        t.slots[rank] = Some(values);
        if t.slots.iter().all(Option::is_some) {
            // Every rank is in this barrier: their whole records must agree.
            if op == Op::Barrier {
                if let Some(verdict) = self.desync(0..self.world) {
                    if t.failed.is_none() {
                        t.failed = Some(verdict);
                        t.verdict = true;
                    }
                    self.changed.notify_all();
                    return Err(Self::failure(&t).expect("just failed"));
                }
            }
            let parts: Vec<Values> = t
                .slots
                .iter_mut()
                .map(|s| s.take().expect("all in"))
                .collect();
            t.result = Some(Arc::new(combine(op, parts, self.world)));
            t.unread = vec![true; self.world];
            self.changed.notify_all();
        }
        let step = self.ledgers[rank]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .step();
        let what = match step {
            Some(_) => format!("{} #{generation} ({})", op.name(), desync::step_label(step)),
            None => format!("{} #{generation}", op.name()),
        };
        let mut t = self.wait(
            t,
            &what,
            deadline,
            |t| t.generation == generation && t.result.is_some(),
            |t| (0..self.world).filter(|&r| t.slots[r].is_none()).collect(),
        )?;
        let result = t.result.clone().expect("ready");
        t.unread[rank] = false;
        if !t.unread.iter().any(|&u| u) {
            t.result = None;
            t.op = None;
            t.generation += 1;
            self.changed.notify_all();
        }
        Ok(result)
    }
}

/// Combine the ranks' contributions, in rank order.
fn combine(op: Op, parts: Vec<Values>, world: usize) -> Values {
    match op {
        Op::AllReduce(r, _) | Op::ReduceScatter(r, _) => reduce(parts, r, world),
        Op::AllGather(_) => {
            let mut it = parts.into_iter();
            let mut acc = it.next().expect("world >= 1");
            for p in it {
                match (&mut acc, p) {
                    (Values::F32(a), Values::F32(b)) => a.extend(b),
                    (Values::F64(a), Values::F64(b)) => a.extend(b),
                    // Ruled out by the dtype check of `exchange`.
                    _ => {}
                }
            }
            acc
        }
        Op::Broadcast(root, _) => parts.into_iter().nth(root).expect("root < world"),
        Op::Barrier => Values::F32(Vec::new()),
    }
}

fn reduce(parts: Vec<Values>, op: ReduceOp, world: usize) -> Values {
    let mut it = parts.into_iter();
    let mut acc = it.next().expect("world >= 1");
    for p in it {
        match (&mut acc, p) {
            (Values::F32(a), Values::F32(b)) => a.iter_mut().zip(b).for_each(|(x, y)| *x += y),
            (Values::F64(a), Values::F64(b)) => a.iter_mut().zip(b).for_each(|(x, y)| *x += y),
            // Ruled out by the dtype check of `exchange`.
            _ => {}
        }
    }
    if op == ReduceOp::Mean {
        match &mut acc {
            Values::F32(a) => a.iter_mut().for_each(|x| *x /= world as f32),
            Values::F64(a) => a.iter_mut().for_each(|x| *x /= world as f64),
        }
    }
    acc
}

/// `world` ranks as threads of this process.
#[derive(Debug, Clone)]
pub struct ThreadGroup {
    shared: Arc<Shared>,
}

impl ThreadGroup {
    /// A group of `world` ranks whose collective calls fail after waiting `timeout` for
    /// the others.
    pub fn new(world: usize, timeout: Duration) -> Self {
        let world = world.max(1);
        ThreadGroup {
            shared: Arc::new(Shared {
                world,
                timeout,
                table: Mutex::new(Table {
                    slots: vec![None; world],
                    unread: vec![false; world],
                    ..Default::default()
                }),
                changed: Condvar::new(),
                ledgers: (0..world).map(|_| Mutex::new(Ledger::default())).collect(),
            }),
        }
    }

    /// One handle per rank, in rank order; each goes to its own thread.
    pub fn handles(&self) -> Vec<Arc<dyn Collective>> {
        (0..self.shared.world)
            .map(|rank| {
                Arc::new(ThreadRank {
                    rank,
                    shared: self.shared.clone(),
                }) as Arc<dyn Collective>
            })
            .collect()
    }

    /// The first rank that failed, and why (None while all is well).
    pub fn failure(&self) -> Option<(usize, String)> {
        self.shared.lock().failed.clone()
    }
}

/// One rank of a [`ThreadGroup`].
#[derive(Debug)]
struct ThreadRank {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadRank {
    /// This rank issues `kind` on `x`.
    fn record(&self, kind: CallKind, x: &Tensor) {
        self.shared
            .record(self.rank, Call::new(kind, x.elem_count(), x.dtype()));
    }

    fn check_len(&self, what: &str, n: usize) -> Result<()> {
        let w = self.shared.world;
        if n % w != 0 {
            return Err(Error::Msg(format!(
                "{what}: {n} values are not a multiple of the world size {w}"
            )));
        }
        Ok(())
    }
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let v = Values::of(x)?;
        let n = v.len();
        self.record(CallKind::AllReduce(op), x);
        let r = self.shared.exchange(self.rank, Op::AllReduce(op, n), v)?;
        r.to_tensor(0, n, x.dims(), x)
    }

    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let v = Values::of(x)?;
        let n = v.len();
        self.check_len("reduce_scatter", n)?;
        self.record(CallKind::ReduceScatter(op), x);
        let r = self
            .shared
            .exchange(self.rank, Op::ReduceScatter(op, n), v)?;
        let chunk = n / self.shared.world;
        r.to_tensor(self.rank * chunk, chunk, &[chunk], x)
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        let v = Values::of(x)?;
        let n = v.len();
        self.record(CallKind::AllGather, x);
        let r = self.shared.exchange(self.rank, Op::AllGather(n), v)?;
        let total = n * self.shared.world;
        r.to_tensor(0, total, &[total], x)
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.shared.world {
            return Err(Error::Msg(format!(
                "broadcast from rank {root} in a world of {}",
                self.shared.world
            )));
        }
        let n = x.elem_count();
        // Only the root's values travel.
        let v = if self.rank == root {
            Values::of(x)?
        } else {
            Values::F32(Vec::new())
        };
        self.record(CallKind::Broadcast(root), x);
        let r = self.shared.exchange(self.rank, Op::Broadcast(root, n), v)?;
        r.to_tensor(0, n, x.dims(), x)
    }

    fn barrier(&self) -> Result<()> {
        self.shared.record(self.rank, Call::barrier());
        self.shared
            .exchange(self.rank, Op::Barrier, Values::F32(Vec::new()))
            .map(|_| ())
    }

    fn end_step(&self, step: u64) -> Result<()> {
        self.shared.ledgers[self.rank]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_step(step);
        self.barrier()
    }

    fn abort(&self, reason: &str) {
        let mut t = self.shared.lock();
        if t.failed.is_none() {
            t.failed = Some((self.rank, reason.to_string()));
        }
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Run `f(rank, handle)` on every rank of a fresh group, each in its own thread.
    fn on_ranks<T: Send>(
        world: usize,
        timeout_ms: u64,
        f: impl Fn(usize, Arc<dyn Collective>) -> T + Sync,
    ) -> (Vec<T>, ThreadGroup) {
        let g = ThreadGroup::new(world, Duration::from_millis(timeout_ms));
        let out = std::thread::scope(|s| {
            let f = &f;
            let hs: Vec<_> = g
                .handles()
                .into_iter()
                .enumerate()
                .map(|(r, h)| s.spawn(move || f(r, h)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        (out, g)
    }

    fn vec_of(x: &Tensor) -> Vec<f32> {
        x.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn all_reduce_sums_and_averages_in_every_rank() {
        let (out, _) = on_ranks(3, 5000, |r, c| {
            let x = Tensor::new(&[[r as f32, 1.0], [2.0, 10.0 * r as f32]], &Device::Cpu).unwrap();
            let s = c.all_reduce(&x, ReduceOp::Sum).unwrap();
            let m = c.all_reduce(&x, ReduceOp::Mean).unwrap();
            assert_eq!(s.dims(), &[2, 2]);
            (vec_of(&s), vec_of(&m))
        });
        for (s, m) in out {
            assert_eq!(s, vec![3.0, 3.0, 6.0, 30.0]);
            assert_eq!(m, vec![1.0, 1.0, 2.0, 10.0]);
        }
    }

    #[test]
    fn f64_and_bf16_keep_their_dtype() {
        let (out, _) = on_ranks(2, 5000, |r, c| {
            let x = Tensor::new(&[1e-12f64 + r as f64], &Device::Cpu).unwrap();
            let s = c.all_reduce(&x, ReduceOp::Sum).unwrap();
            let b = Tensor::new(&[1.5f32], &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let sb = c.all_reduce(&b, ReduceOp::Sum).unwrap();
            (
                s.dtype(),
                s.to_vec1::<f64>().unwrap()[0],
                sb.dtype(),
                sb.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[0],
            )
        });
        for (d, v, db, vb) in out {
            assert_eq!((d, db), (DType::F64, DType::BF16));
            assert_eq!(v, 1e-12 + (1e-12 + 1.0));
            assert_eq!(vb, 3.0);
        }
    }

    #[test]
    fn reduce_scatter_gives_each_rank_its_chunk_of_the_sum() {
        let (out, _) = on_ranks(2, 5000, |r, c| {
            let x = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu).unwrap();
            let x = (x * (r as f64 + 1.0)).unwrap();
            vec_of(&c.reduce_scatter(&x, ReduceOp::Sum).unwrap())
        });
        assert_eq!(out, vec![vec![3.0, 6.0], vec![9.0, 12.0]]);
        let (out, _) = on_ranks(2, 5000, |_, c| {
            let x = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
            c.reduce_scatter(&x, ReduceOp::Sum).unwrap_err().to_string()
        });
        assert!(
            out[0].contains("not a multiple of the world size 2"),
            "{}",
            out[0]
        );
    }

    #[test]
    fn all_gather_concatenates_in_rank_order_and_broadcast_copies_the_root() {
        let (out, _) = on_ranks(3, 5000, |r, c| {
            let x = Tensor::new(&[r as f32, r as f32 + 0.5], &Device::Cpu).unwrap();
            let g = vec_of(&c.all_gather(&x).unwrap());
            let b = vec_of(&c.broadcast(&x, 2).unwrap());
            c.barrier().unwrap();
            (g, b)
        });
        for (g, b) in out {
            assert_eq!(g, vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
            assert_eq!(b, vec![2.0, 2.5]);
        }
    }

    #[test]
    fn many_operations_in_a_row_stay_in_step() {
        let (out, _) = on_ranks(4, 5000, |r, c| {
            let mut acc = 0f32;
            for i in 0..200 {
                let x = Tensor::new(&[(r * i) as f32], &Device::Cpu).unwrap();
                acc += vec_of(&c.all_reduce(&x, ReduceOp::Sum).unwrap())[0];
            }
            acc
        });
        let want: f32 = (0..200).map(|i| (6 * i) as f32).sum();
        assert!(out.iter().all(|&a| a == want), "{out:?}");
    }

    #[test]
    fn a_rank_that_never_comes_is_named_after_the_timeout() {
        let t0 = Instant::now();
        let (out, _) = on_ranks(3, 300, |r, c| {
            if r == 1 {
                return String::new();
            }
            c.barrier().unwrap_err().to_string()
        });
        assert!(t0.elapsed() < Duration::from_secs(3));
        for e in [&out[0], &out[2]] {
            assert!(
                e.contains("barrier")
                    && e.contains("timed out")
                    && e.contains("waiting for rank 1"),
                "{e}"
            );
        }
    }

    /// Issue 26: a timed-out collective names the step it was issued after, as the
    /// process watchdog does.
    #[test]
    fn a_timed_out_collective_names_its_step() {
        let (out, _) = on_ranks(2, 300, |r, c| {
            c.end_step(4).unwrap();
            if r == 1 {
                return String::new();
            }
            let x = Tensor::new(&[1f32], &Device::Cpu).unwrap();
            c.all_reduce(&x, ReduceOp::Sum).unwrap_err().to_string()
        });
        assert!(
            out[0].starts_with(
                "all_reduce #1 (after step 4) timed out after 0.3 s waiting for rank 1"
            ),
            "{}",
            out[0]
        );
    }

    #[test]
    fn abort_fails_pending_and_later_calls_on_every_rank() {
        let (out, g) = on_ranks(3, 10_000, |r, c| {
            if r == 2 {
                std::thread::sleep(Duration::from_millis(50));
                c.abort("out of memory");
            }
            let first = c.barrier().unwrap_err().to_string();
            let later = c
                .all_reduce(&Tensor::new(&[1f32], &Device::Cpu).unwrap(), ReduceOp::Sum)
                .unwrap_err()
                .to_string();
            (first, later)
        });
        for (a, b) in out {
            assert_eq!(a, "rank 2 failed: out of memory");
            assert_eq!(b, a);
        }
        assert_eq!(g.failure(), Some((2, "out of memory".into())));
    }

    #[test]
    fn a_result_complete_before_an_abort_is_still_delivered() {
        let (out, _) = on_ranks(2, 10_000, |r, c| {
            let x = Tensor::new(&[1f32], &Device::Cpu).unwrap();
            let s = vec_of(&c.all_reduce(&x, ReduceOp::Sum).unwrap())[0];
            if r == 0 {
                c.abort("stopping");
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
            s
        });
        assert_eq!(out, vec![2.0, 2.0]);
    }

    /// Issue 26: a planted extra all-reduce on one rank, of the same shape as the
    /// others' next one (so the operations pair up), is caught at the step's end and
    /// named with the step; one of another shape is caught at once.
    #[test]
    fn a_planted_extra_all_reduce_is_named_with_its_rank_and_step() {
        let step = |c: &Arc<dyn Collective>, s: u64, extra: bool| -> Result<()> {
            let g = Tensor::new(&[1f32, 2.], &Device::Cpu)?;
            c.all_reduce(&g, ReduceOp::Sum)?;
            if extra {
                c.all_reduce(&g, ReduceOp::Sum)?;
            }
            c.all_reduce(&g, ReduceOp::Sum)?;
            c.end_step(s)
        };
        let (out, g) = on_ranks(3, 5000, |r, c| {
            (1..=4)
                .try_for_each(|s| step(&c, s, r == 2 && s == 3))
                .unwrap_err()
                .to_string()
        });
        // Compared with the lowest rank already in that operation: rank 0, or rank 1
        // when rank 0 has not arrived yet.
        let want = |r: usize| {
            format!(
                "ranks out of step: rank 2 and rank {r} issued different collectives: rank 2's collective #9 (after step 2) was all_reduce (sum) of 2 f32, where rank {r}'s was barrier"
            )
        };
        for e in &out {
            assert!(e.starts_with(&want(0)) || e.starts_with(&want(1)), "{e}");
        }
        assert!(out.iter().all(|e| *e == out[0]), "{out:?}");
        assert_eq!(g.failure().map(|f| f.0), Some(2));
        // Another dtype of the same size pairs up (both travel as f32): the barrier
        // that ends the step names it.
        let (out, _) = on_ranks(2, 5000, |r, c| {
            let dtype = if r == 1 { DType::BF16 } else { DType::F32 };
            let x = Tensor::zeros(4, dtype, &Device::Cpu).unwrap();
            c.all_reduce(&x, ReduceOp::Mean).unwrap();
            c.end_step(1).unwrap_err().to_string()
        });
        for e in &out {
            assert!(
                e.contains("rank 1's collective #1 (before this process's first step ended) was all_reduce (mean) of 4 bf16, where rank 0's was all_reduce (mean) of 4 f32"),
                "{e}"
            );
        }
        // Another size: the first rank to see it names it, at the call itself.
        let (out, _) = on_ranks(2, 5000, |r, c| {
            let x = Tensor::zeros(if r == 1 { 3 } else { 2 }, DType::BF16, &Device::Cpu).unwrap();
            c.all_reduce(&x, ReduceOp::Sum).unwrap_err().to_string()
        });
        for e in &out {
            assert!(
                e.contains("collective #1 (before this process's first step ended) was all_reduce (sum) of ")
                    && e.contains("3 bf16")
                    && e.contains("2 bf16"),
                "{e}"
            );
        }
    }

    #[test]
    fn ranks_calling_different_operations_fail_instead_of_mixing_data() {
        let (out, _) = on_ranks(2, 5000, |r, c| {
            let x = Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap();
            let e = if r == 0 {
                c.all_reduce(&x, ReduceOp::Sum).unwrap_err()
            } else {
                std::thread::sleep(Duration::from_millis(50));
                c.all_gather(&x).unwrap_err()
            };
            e.to_string()
        });
        assert!(out.iter().all(|e| e.contains("out of step")), "{out:?}");
    }
}
