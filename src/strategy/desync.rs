//! Desync detection: every rank keeps a running hash of the collectives it issued, and
//! the ranks compare them at barriers and at the end of every step.
//!
//! Every collective is collective: all ranks make the same calls, in the same order,
//! on tensors of the same size. A rank that issues one call more (an all-reduce under
//! `if rank == 1`), or one of another size or dtype, pairs its calls with the wrong
//! ones of the others: NCCL then mixes unrelated buffers or waits forever. So each
//! rank records what it issues, as a [`Call`] (kind, reduce op or root, element count,
//! dtype), in a [`Ledger`]:
//!
//! ```text
//! hash_0 = FNV offset
//! hash_n = FNV-1a(hash_{n-1} ‖ call_n)        one u64 per rank, whatever the run's length
//! recent = the last HISTORY (seq, step, call, hash_n)   to name the first difference
//! ```
//!
//! At a check every rank's [`Summary`] (count, hash, recent calls) is compared with
//! rank 0's ([`compare`]). Equal counts and hashes: in step. Otherwise the first rank
//! that differs is named with the first collective at which its record and rank 0's
//! part, e.g. `rank 1's collective #57 (after step 2) was all_reduce (sum) of 1 f64, where
//! rank 0's was all_reduce (sum) of 4096 f32`. Threads compare in the
//! [`ThreadGroup`](super::threads::ThreadGroup)'s shared table; processes through
//! rank 0 over the [`watchdog`](super::watchdog)'s connections, out of band, so the
//! check never pairs with a collective of another kind.

use std::collections::VecDeque;

use candle_core::DType;

use super::collective::ReduceOp;
use super::watchdog::Watchdog;
use crate::error::Result;

/// Calls each rank remembers, to name the first that differs.
pub const HISTORY: usize = 64;

/// What a collective is, as far as pairing goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    AllReduce(ReduceOp),
    ReduceScatter(ReduceOp),
    AllGather,
    Broadcast(usize),
    Barrier,
}

/// One collective call: its kind, its element count (of this rank's input) and dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    pub kind: CallKind,
    pub count: u64,
    /// Index in [`DTYPES`] (`u8::MAX`: another dtype).
    dtype: u8,
}

/// Dtypes by their code in a [`Call`].
const DTYPES: [DType; 10] = [
    DType::F32,
    DType::BF16,
    DType::F16,
    DType::F64,
    DType::U8,
    DType::U32,
    DType::I16,
    DType::I32,
    DType::I64,
    DType::F8E4M3,
];

impl Call {
    pub fn new(kind: CallKind, count: usize, dtype: DType) -> Self {
        Call {
            kind,
            count: count as u64,
            dtype: DTYPES
                .iter()
                .position(|d| *d == dtype)
                .map_or(u8::MAX, |i| i as u8),
        }
    }

    pub fn barrier() -> Self {
        Call::new(CallKind::Barrier, 0, DType::F32)
    }

    /// Fixed-size bytes: what is hashed and what travels.
    fn bytes(&self) -> [u8; 14] {
        let (kind, arg) = match self.kind {
            CallKind::AllReduce(op) => (1u8, op_code(op)),
            CallKind::ReduceScatter(op) => (2, op_code(op)),
            CallKind::AllGather => (3, 0),
            CallKind::Broadcast(root) => (4, root as u32),
            CallKind::Barrier => (5, 0),
        };
        let mut b = [0u8; 14];
        b[0] = kind;
        b[1..5].copy_from_slice(&arg.to_le_bytes());
        b[5..13].copy_from_slice(&self.count.to_le_bytes());
        b[13] = self.dtype;
        b
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        let arg = u32::from_le_bytes(b.get(1..5)?.try_into().ok()?);
        let op = |a: u32| match a {
            0 => Some(ReduceOp::Sum),
            1 => Some(ReduceOp::Mean),
            _ => None,
        };
        let kind = match b.first()? {
            1 => CallKind::AllReduce(op(arg)?),
            2 => CallKind::ReduceScatter(op(arg)?),
            3 => CallKind::AllGather,
            4 => CallKind::Broadcast(arg as usize),
            5 => CallKind::Barrier,
            _ => return None,
        };
        Some(Call {
            kind,
            count: u64::from_le_bytes(b.get(5..13)?.try_into().ok()?),
            dtype: *b.get(13)?,
        })
    }
}

fn op_code(op: ReduceOp) -> u32 {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Mean => 1,
    }
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let op = |op: ReduceOp| match op {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
        };
        let dtype = DTYPES
            .get(self.dtype as usize)
            .map_or("another dtype", DType::as_str);
        match self.kind {
            CallKind::Barrier => return f.write_str("barrier"),
            CallKind::AllReduce(o) => write!(f, "all_reduce ({})", op(o))?,
            CallKind::ReduceScatter(o) => write!(f, "reduce_scatter ({})", op(o))?,
            CallKind::AllGather => f.write_str("all_gather")?,
            CallKind::Broadcast(root) => write!(f, "broadcast from rank {root}")?,
        }
        write!(f, " of {} {dtype}", self.count)
    }
}

/// One recorded call: the `seq`-th of its rank (from 1), issued after `step` steps
/// ended (`None`: before this process ended its first), and the running hash after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub step: Option<u64>,
    pub call: Call,
    pub hash: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// One rank's record of the collectives it issued.
#[derive(Debug, Clone)]
pub struct Ledger {
    seq: u64,
    hash: u64,
    step: Option<u64>,
    recent: VecDeque<Entry>,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            seq: 0,
            hash: FNV_OFFSET,
            step: None,
            recent: VecDeque::with_capacity(HISTORY),
        }
    }
}

impl Ledger {
    /// This rank issues `call`; returns its sequence number (from 1).
    pub fn record(&mut self, call: Call) -> u64 {
        self.seq += 1;
        self.hash = fnv(self.hash, &call.bytes());
        if self.recent.len() == HISTORY {
            self.recent.pop_front();
        }
        self.recent.push_back(Entry {
            seq: self.seq,
            step: self.step,
            call,
            hash: self.hash,
        });
        self.seq
    }

    /// Step `step` ended: later calls belong to step `step + 1`.
    pub fn set_step(&mut self, step: u64) {
        self.step = Some(step);
    }

    /// Steps ended so far, as last set.
    pub fn step(&self) -> Option<u64> {
        self.step
    }

    /// The running hash after the last call (what the watchdog's heartbeats carry).
    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// Calls recorded so far.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// What this rank (`rank`) shows the others at a check.
    pub fn summary(&self, rank: usize) -> Summary {
        Summary {
            rank,
            seq: self.seq,
            hash: self.hash,
            step: self.step,
            recent: self.recent.iter().copied().collect(),
        }
    }
}

/// A rank's record, as compared at a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub rank: usize,
    pub seq: u64,
    pub hash: u64,
    pub step: Option<u64>,
    pub recent: Vec<Entry>,
}

fn step_bytes(step: Option<u64>) -> [u8; 8] {
    step.map_or(u64::MAX, |s| s).to_le_bytes()
}

fn step_of(b: &[u8]) -> Option<Option<u64>> {
    let s = u64::from_le_bytes(b.try_into().ok()?);
    Some((s != u64::MAX).then_some(s))
}

const ENTRY_BYTES: usize = 8 + 8 + 14 + 8;

impl Summary {
    /// Bytes for the wire (rank, count, hash, step, entries).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(30 + self.recent.len() * ENTRY_BYTES);
        b.extend_from_slice(&(self.rank as u32).to_le_bytes());
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.hash.to_le_bytes());
        b.extend_from_slice(&step_bytes(self.step));
        b.extend_from_slice(&(self.recent.len() as u16).to_le_bytes());
        for e in &self.recent {
            b.extend_from_slice(&e.seq.to_le_bytes());
            b.extend_from_slice(&step_bytes(e.step));
            b.extend_from_slice(&e.call.bytes());
            b.extend_from_slice(&e.hash.to_le_bytes());
        }
        b
    }

    /// [`Summary::encode`]'s bytes back; `None` if they are not whole.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let u64_at = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
        };
        let rank = u32::from_le_bytes(b.get(0..4)?.try_into().ok()?) as usize;
        let n = u16::from_le_bytes(b.get(28..30)?.try_into().ok()?) as usize;
        if b.len() != 30 + n * ENTRY_BYTES {
            return None;
        }
        let recent = (0..n)
            .map(|i| {
                let at = 30 + i * ENTRY_BYTES;
                Some(Entry {
                    seq: u64_at(at)?,
                    step: step_of(b.get(at + 8..at + 16)?)?,
                    call: Call::from_bytes(b.get(at + 16..at + 30)?)?,
                    hash: u64_at(at + 30)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Summary {
            rank,
            seq: u64_at(4)?,
            hash: u64_at(12)?,
            step: step_of(b.get(20..28)?)?,
            recent,
        })
    }
}

/// When a call was issued: after `step` steps ended.
pub fn step_label(step: Option<u64>) -> String {
    match step {
        Some(s) => format!("after step {s}"),
        None => "before this process's first step ended".into(),
    }
}

/// The first rank whose record differs from rank 0's, and one line naming it and the
/// first collective at which they part; `None` when every rank issued the same calls.
/// `all` holds one summary per rank, any order.
pub fn compare(all: &[Summary]) -> Option<(usize, String)> {
    let mut sorted: Vec<&Summary> = all.iter().collect();
    sorted.sort_by_key(|s| s.rank);
    let (zero, others) = sorted.split_first()?;
    let odd = others
        .iter()
        .find(|s| s.seq != zero.seq || s.hash != zero.hash)?;
    Some((odd.rank, describe(zero, odd)))
}

/// Why `b`'s record is not `a`'s (`a` is rank 0's).
fn describe(a: &Summary, b: &Summary) -> String {
    let head = format!(
        "ranks out of step: rank {} and rank {} issued different collectives",
        b.rank, a.rank
    );
    let tail = "(every rank must issue the same collectives in the same order: a collective under a condition that differs between ranks?)";
    let at = |s: &Summary, seq: u64| s.recent.iter().find(|e| e.seq == seq).copied();
    // The first sequence number both still remember.
    let first_common = a
        .recent
        .first()
        .map_or(1, |e| e.seq)
        .max(b.recent.first().map_or(1, |e| e.seq));
    let last_common = a.seq.min(b.seq);
    for seq in first_common..=last_common {
        let (Some(ea), Some(eb)) = (at(a, seq), at(b, seq)) else {
            continue;
        };
        if ea.hash == eb.hash {
            continue;
        }
        // At the first call both remember, the difference may be older.
        let maybe_earlier = seq == first_common && seq > 1;
        let earlier = if maybe_earlier {
            format!(", or they parted before the last {HISTORY} calls kept")
        } else {
            String::new()
        };
        if ea.call == eb.call {
            // Same call, different history: they parted before what is kept.
            return format!(
                "{head} before collective #{seq}, further back than the last {HISTORY} kept {tail}"
            );
        }
        return format!(
            "{head}: rank {}'s collective #{seq} ({}) was {}, where rank {}'s was {}{earlier} {tail}",
            b.rank,
            step_label(eb.step),
            eb.call,
            a.rank,
            ea.call
        );
    }
    // Same calls as far as both went: one issued more.
    let (more, fewer) = if b.seq > a.seq { (b, a) } else { (a, b) };
    match at(more, fewer.seq + 1) {
        Some(e) => format!(
            "{head}: rank {} issued collective #{} ({}), {}, which rank {} did not (it issued {} in all) {tail}",
            more.rank,
            e.seq,
            step_label(e.step),
            e.call,
            fewer.rank,
            fewer.seq
        ),
        None => format!(
            "{head}: rank {} issued {} collectives, rank {} {}, and they differ further back than the last {HISTORY} kept {tail}",
            b.rank, b.seq, a.rank, a.seq
        ),
    }
}

/// Between processes: compare this rank's `ledger` with every other rank's through
/// rank 0, over the watchdog's connections (out of band: never paired with a
/// collective of the device). A difference stops every process with [`compare`]'s line.
pub fn check_through(watchdog: &Watchdog, rank: usize, ledger: &Ledger) -> Result<()> {
    watchdog.check(
        "desync check",
        ledger.summary(rank).encode(),
        compare_encoded,
    )
}

/// [`compare`] on records as they travel (rank, [`Summary::encode`]'s bytes).
pub fn compare_encoded(records: &[(usize, Vec<u8>)]) -> Option<String> {
    let mut all = Vec::with_capacity(records.len());
    for (rank, bytes) in records {
        match Summary::decode(bytes) {
            Some(s) if s.rank == *rank => all.push(s),
            _ => {
                return Some(format!(
                    "rank {rank} sent a record of its collectives that rank 0 cannot read (is every rank running the same lit-claire?)"
                ));
            }
        }
    }
    compare(&all).map(|(_, line)| line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grads(n: usize) -> Call {
        Call::new(CallKind::AllReduce(ReduceOp::Sum), n, DType::F32)
    }

    /// `steps` steps of two gradient buckets and a loss gather; `extra` plants one
    /// more call after the first bucket of that step.
    fn run(steps: u64, extra: Option<(u64, Call)>) -> Ledger {
        let mut l = Ledger::default();
        for s in 0..steps {
            l.record(grads(4096));
            if let Some((at, call)) = extra {
                if at == s + 1 {
                    l.record(call);
                }
            }
            l.record(grads(100));
            l.record(Call::new(CallKind::AllGather, 1, DType::F64));
            l.set_step(s + 1);
            l.record(Call::barrier());
        }
        l
    }

    #[test]
    fn equal_records_compare_equal() {
        let all: Vec<Summary> = (0..3).map(|r| run(5, None).summary(r)).collect();
        assert_eq!(compare(&all), None);
        assert_eq!(run(5, None).seq(), 20);
    }

    #[test]
    fn an_extra_all_reduce_names_the_rank_the_call_and_the_step() {
        let one = Call::new(CallKind::AllReduce(ReduceOp::Sum), 1, DType::F64);
        let all = vec![
            run(5, None).summary(0),
            run(5, None).summary(1),
            run(5, Some((3, one))).summary(2),
        ];
        let (rank, msg) = compare(&all).unwrap();
        assert_eq!(rank, 2);
        assert!(
            msg.contains("rank 2's collective #10 (after step 2) was all_reduce (sum) of 1 f64, where rank 0's was all_reduce (sum) of 100 f32"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn a_different_dtype_or_a_trailing_extra_call_is_named() {
        let mut a = run(2, None);
        let mut b = run(2, None);
        a.record(grads(8));
        b.record(Call::new(
            CallKind::AllReduce(ReduceOp::Sum),
            8,
            DType::BF16,
        ));
        let (_, msg) = compare(&[a.summary(0), b.summary(1)]).unwrap();
        assert!(
            msg.contains(
                "was all_reduce (sum) of 8 bf16, where rank 0's was all_reduce (sum) of 8 f32"
            ),
            "{msg}"
        );
        let a = run(2, None);
        let mut b = run(2, None);
        b.record(Call::new(CallKind::Broadcast(0), 3, DType::F32));
        let (_, msg) = compare(&[b.summary(1), a.summary(0)]).unwrap();
        assert!(
            msg.contains("rank 1 issued collective #9 (after step 2), broadcast from rank 0 of 3 f32, which rank 0 did not (it issued 8 in all)"),
            "{msg}"
        );
    }

    #[test]
    fn a_difference_older_than_the_history_is_still_found() {
        let one = Call::new(CallKind::AllReduce(ReduceOp::Mean), 1, DType::F32);
        let all = [
            run(100, None).summary(0),
            run(100, Some((2, one))).summary(1),
        ];
        let (rank, msg) = compare(&all).unwrap();
        assert_eq!(rank, 1);
        assert!(
            msg.contains("rank 1's collective #338 (after step 84) was all_reduce (sum) of 4096 f32, where rank 0's was all_reduce (sum) of 100 f32, or they parted before the last 64 calls kept"),
            "{msg}"
        );
    }

    #[test]
    fn encoded_records_compare_like_summaries() {
        let one = Call::new(CallKind::AllReduce(ReduceOp::Sum), 1, DType::F32);
        let records: Vec<(usize, Vec<u8>)> = [run(4, None), run(4, Some((2, one)))]
            .iter()
            .enumerate()
            .map(|(r, l)| (r, l.summary(r).encode()))
            .collect();
        let line = compare_encoded(&records).unwrap();
        assert!(
            line.contains("rank 1's collective #6 (after step 1) was all_reduce (sum) of 1 f32"),
            "{line}"
        );
        assert_eq!(compare_encoded(&records[..1]), None);
        let bad = vec![(0, records[0].1.clone()), (1, vec![1, 2, 3])];
        assert!(
            compare_encoded(&bad)
                .unwrap()
                .contains("rank 1 sent a record")
        );
    }

    #[test]
    fn summaries_survive_the_wire() {
        let s = run(
            30,
            Some((
                4,
                Call::new(CallKind::ReduceScatter(ReduceOp::Mean), 6, DType::F16),
            )),
        )
        .summary(7);
        assert_eq!(s.recent.len(), HISTORY);
        assert_eq!(Summary::decode(&s.encode()), Some(s.clone()));
        let b = s.encode();
        assert_eq!(Summary::decode(&b[..b.len() - 1]), None);
        assert_eq!(
            Ledger::default().summary(0),
            Summary::decode(&Ledger::default().summary(0).encode()).unwrap()
        );
    }
}
