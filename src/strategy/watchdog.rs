//! The watchdog of a process group: after the rendezvous, no rank waits forever for
//! one that is gone.
//!
//! NCCL has no timeout of its own worth the name: a rank killed (out of memory, a node
//! lost) in the middle of a run leaves the others blocked in their next collective. So
//! the rendezvous connections stay open (rank 0 ↔ every other rank, a star), and a
//! watchdog thread in every process listens on them:
//!
//! ```text
//! rank r ≠ 0                                  rank 0 (the hub)
//!   ──▶ heartbeat: collectives entered so far,  every `heartbeat`, both ways
//!       with the hashes of the last 16 records
//!   ──▶ failed: "rank r failed: why"            r's own error (a NaN, an I/O error)
//!   ──▶ stuck: collective #n waited too long     r's collective exceeded the timeout
//!   ◀── failed: the verdict                     relayed to every rank
//!   ──▶ check: round k, its record of calls      at a barrier or a step's end
//!   ◀── checked: round k                         every record agreed with rank 0's
//!   ──▶ bye / ◀── bye                            done: closing is no longer a failure
//! ```
//!
//! A process notices (a) a peer's connection closing without a `bye` (the process
//! died) or staying silent longer than the silence timeout (hung, stopped, or its node
//! unreachable), (b) one of its own collectives in flight longer than the collective
//! timeout, and (c) a verdict from rank 0. Rank 0 turns everything it learns into one
//! verdict naming the rank and the cause (for a stuck collective: the ranks whose
//! heartbeats say they never entered it) and sends it to every rank; each then prints
//! that one line, aborts its communicator (the hooks of [`Watchdog::on_fatal`], e.g.
//! `ncclCommAbort`) and exits with status 1. A rank that fails on its own
//! ([`Watchdog::report_failure`]) tells rank 0 and returns its error as usual.
//!
//! [`Watchdog::check`] compares the ranks' records of the collectives they issued (see
//! [`desync`](super::desync)) out of band: every rank sends its record to rank 0,
//! which compares them all and either lets every rank go on or gives the verdict.
//! Collectives in flight are named with the step they were issued after
//! ([`Watchdog::set_step`]).
//!
//! Nothing here knows about NCCL: collectives are reported as they start
//! ([`Watchdog::enter`] for blocking ones, [`Watchdog::track`] with a completion probe
//! for asynchronous ones), so the tests drive it with real processes over localhost
//! (`lit-claire dist-check --simulate …`).

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::rendezvous::{self, Link};
use crate::error::{Error, Result};

const HEARTBEAT: u8 = 2;
const FAILED: u8 = 3;
const STUCK: u8 = 4;
const BYE: u8 = 5;
const CHECK: u8 = 6;
const CHECKED: u8 = 7;

/// No step has ended yet (in [`Inner::step`]).
const NO_STEP: u64 = u64::MAX;

/// Records of collectives (sequence number, running hash) a heartbeat carries.
const TRAIL_SENT: usize = 16;
/// Records each rank keeps (rank 0 compares the others' with its own).
const TRAIL_KEPT: usize = 4096;

/// One collective this rank entered: its number, the running hash of the caller's
/// record of collectives after it (see [`desync`](super::desync); 0 when the caller
/// keeps none), its name and the steps ended before it.
#[derive(Clone, Copy)]
struct Mark {
    seq: u64,
    hash: u64,
    name: &'static str,
    step: u64,
}

/// How long a watchdog waits, and how often it speaks.
#[derive(Debug, Clone, Copy)]
pub struct WatchdogConfig {
    /// A collective in flight longer than this stops the run.
    pub collective_timeout: Duration,
    /// A peer heard from neither heartbeat nor message for this long is lost.
    pub silence_timeout: Duration,
    /// Interval of heartbeats (and of the watchdog's checks).
    pub heartbeat: Duration,
}

impl WatchdogConfig {
    /// Silence is judged within the collective timeout, but over no less than 10 s (a
    /// loaded machine may delay a heartbeat) and no more than two minutes (a live
    /// process sends heartbeats from its own thread whatever its main thread does);
    /// heartbeats go ten times per the shorter of the two timeouts, so that rank 0
    /// knows which collective each rank has reached when one is stuck.
    pub fn new(collective_timeout: Duration) -> Self {
        let silence_timeout =
            collective_timeout.clamp(Duration::from_secs(10), Duration::from_secs(120));
        WatchdogConfig {
            collective_timeout,
            silence_timeout,
            heartbeat: (collective_timeout.min(silence_timeout) / 10)
                .clamp(Duration::from_millis(20), Duration::from_secs(5)),
        }
    }
}

/// A collective in flight: the `seq`-th this rank entered.
struct Pending {
    seq: u64,
    name: &'static str,
    /// Steps ended when it was issued ([`NO_STEP`]: none yet).
    step: u64,
    since: Instant,
    done: Box<dyn FnMut() -> bool + Send>,
}

/// A connection to a peer (rank 0's to each rank; the others' to rank 0).
struct Peer {
    rank: usize,
    /// A clone of the socket for writing (the reader thread owns the other).
    writer: Mutex<TcpStream>,
    last_heard: Mutex<Instant>,
    /// Collectives the peer had entered at its last heartbeat.
    entered: AtomicU64,
    /// Its last records (sequence number, hash), from its last heartbeat.
    trail: Mutex<Vec<(u64, u64)>>,
    /// The peer said it is done: its connection closing is no failure.
    said_bye: AtomicBool,
}

type Hook = Box<dyn FnOnce() + Send>;

struct Inner {
    rank: usize,
    world_size: usize,
    cfg: WatchdogConfig,
    peers: Vec<Peer>,
    /// Collectives this rank has entered.
    entered: AtomicU64,
    /// The last [`TRAIL_KEPT`] of them.
    trail: Mutex<VecDeque<Mark>>,
    pending: Mutex<VecDeque<Pending>>,
    /// A verdict was reached (or this rank reported its own failure): nothing else
    /// is reported.
    fired: AtomicBool,
    /// This rank is done (or going away): its threads stop quietly.
    stopping: AtomicBool,
    /// Rank ≠ 0: when this rank told rank 0 its collective is stuck.
    stuck_reported: Mutex<Option<(Instant, String)>>,
    hooks: Mutex<Vec<Hook>>,
    /// Steps ended on this rank ([`NO_STEP`]: none yet).
    step: AtomicU64,
    /// Rounds of [`Watchdog::check`].
    checks: Mutex<Checks>,
    checks_changed: Condvar,
}

/// Where the rounds of [`Watchdog::check`] stand.
#[derive(Default)]
struct Checks {
    /// Rounds this rank started.
    round: u64,
    /// Rank 0: each peer's latest record, with its round.
    records: BTreeMap<usize, (u64, Vec<u8>)>,
    /// Other ranks: the last round rank 0 cleared.
    cleared: u64,
}

/// This process's watchdog; see the module doc. Call [`Watchdog::finish`] when the
/// rank is done: dropping it without that closes the connections at once, which the
/// other ranks take as this rank's end.
pub struct Watchdog {
    inner: Arc<Inner>,
}

/// Marks a blocking collective as in flight until dropped.
pub struct InFlight(Arc<AtomicBool>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The checks' state once `ready` holds of it, waiting for each change (and looking
/// at least every heartbeat); None once the run has ended.
fn wait_checks(inner: &Inner, ready: impl Fn(&Checks) -> bool) -> Option<MutexGuard<'_, Checks>> {
    let mut c = lock(&inner.checks);
    while !ready(&c) {
        if inner.ended() {
            return None;
        }
        c = inner
            .checks_changed
            .wait_timeout(c, inner.cfg.heartbeat)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    Some(c)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Watchdog {
    /// Watch the connections the rendezvous left open (`links`: rank 0's to every
    /// other rank, or another rank's to rank 0).
    pub fn start(
        rank: usize,
        world_size: usize,
        links: Vec<Link>,
        cfg: WatchdogConfig,
    ) -> Result<Self> {
        let now = Instant::now();
        let mut readers = Vec::new();
        let mut peers = Vec::new();
        for (peer, stream) in links {
            let io = |e: std::io::Error| {
                Error::Msg(format!(
                    "rank {rank}: watchdog on the link to rank {peer}: {e}"
                ))
            };
            stream.set_nodelay(true).map_err(io)?;
            stream.set_read_timeout(Some(cfg.heartbeat)).map_err(io)?;
            let writer = stream.try_clone().map_err(io)?;
            readers.push((peers.len(), stream));
            peers.push(Peer {
                rank: peer,
                writer: Mutex::new(writer),
                last_heard: Mutex::new(now),
                entered: AtomicU64::new(0),
                trail: Mutex::new(Vec::new()),
                said_bye: AtomicBool::new(false),
            });
        }
        let inner = Arc::new(Inner {
            rank,
            world_size,
            cfg,
            peers,
            entered: AtomicU64::new(0),
            trail: Mutex::new(VecDeque::new()),
            pending: Mutex::new(VecDeque::new()),
            fired: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            stuck_reported: Mutex::new(None),
            hooks: Mutex::new(Vec::new()),
            step: AtomicU64::new(NO_STEP),
            checks: Mutex::new(Checks::default()),
            checks_changed: Condvar::new(),
        });
        for (i, stream) in readers {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("watchdog-read-{}", inner.peers[i].rank))
                .spawn(move || inner.read_loop(i, stream))
                .map_err(|e| Error::Msg(format!("rank {rank}: cannot start the watchdog: {e}")))?;
        }
        let monitor = inner.clone();
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || monitor.monitor_loop())
            .map_err(|e| Error::Msg(format!("rank {rank}: cannot start the watchdog: {e}")))?;
        Ok(Watchdog { inner })
    }

    /// Run `hook` when a verdict stops this process (before it exits): abort the
    /// communicator there, so that nothing is left waiting on the device.
    pub fn on_fatal(&self, hook: impl FnOnce() + Send + 'static) {
        lock(&self.inner.hooks).push(Box::new(hook));
    }

    /// A blocking collective `name` starts; it is in flight until the guard drops.
    pub fn enter(&self, name: &'static str) -> InFlight {
        self.enter_hashed(name, None)
    }

    /// [`Watchdog::enter`], with the hash of the caller's record (see
    /// [`Watchdog::track_hashed`]).
    pub fn enter_hashed(&self, name: &'static str, hash: Option<u64>) -> InFlight {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        self.track_hashed(name, hash, move || flag.load(Ordering::Acquire));
        InFlight(done)
    }

    /// An asynchronous collective `name` was queued; it is in flight until `done`
    /// returns true (polled by the watchdog thread, in the order they were queued).
    pub fn track(&self, name: &'static str, done: impl FnMut() -> bool + Send + 'static) {
        self.track_hashed(name, None, done)
    }

    /// [`Watchdog::track`], with the running hash of the caller's record of the
    /// collectives it issued, this one included ([`desync`](super::desync)): when a
    /// collective is stuck, rank 0 compares the ranks' last hashes (carried by the
    /// heartbeats) and names ranks out of step rather than a hang. `None` keeps the
    /// last hash.
    pub fn track_hashed(
        &self,
        name: &'static str,
        hash: Option<u64>,
        done: impl FnMut() -> bool + Send + 'static,
    ) {
        let step = self.inner.step.load(Ordering::Acquire);
        let seq = {
            let mut trail = lock(&self.inner.trail);
            let seq = self.inner.entered.fetch_add(1, Ordering::AcqRel) + 1;
            let hash = hash.or(trail.back().map(|m| m.hash)).unwrap_or(0);
            if trail.len() == TRAIL_KEPT {
                trail.pop_front();
            }
            trail.push_back(Mark {
                seq,
                hash,
                name,
                step,
            });
            seq
        };
        lock(&self.inner.pending).push_back(Pending {
            seq,
            name,
            step,
            since: Instant::now(),
            done: Box::new(done),
        });
    }

    /// Step `step` ended on this rank: collectives issued from now on are named as
    /// issued after it.
    pub fn set_step(&self, step: u64) {
        self.inner.step.store(step, Ordering::Release);
    }

    /// Compare every rank's `record` (this rank's is `record`) through rank 0, which
    /// runs `compare` on all of them, in rank order: `None` lets every rank go on,
    /// `Some(verdict)` stops every process with it. Every rank must call it, as a
    /// collective named `name` (so a rank that never comes is named after the
    /// collective timeout, like one that never reaches a collective).
    pub fn check(
        &self,
        name: &'static str,
        record: Vec<u8>,
        compare: impl Fn(&[(usize, Vec<u8>)]) -> Option<String>,
    ) -> Result<()> {
        let inner = &self.inner;
        if inner.peers.is_empty() {
            return Ok(());
        }
        let _in_flight = self.enter(name);
        let round = {
            let mut c = lock(&inner.checks);
            c.round += 1;
            c.round
        };
        let gone = || {
            Error::Msg(format!(
                "rank {}: the run stopped during {name} (see the watchdog's verdict)",
                inner.rank
            ))
        };
        if inner.rank != 0 {
            let mut body = round.to_le_bytes().to_vec();
            body.extend_from_slice(&record);
            if !inner.send(&inner.peers[0], CHECK, &body) {
                return Err(Error::Msg(format!(
                    "rank {}: could not send its record of collectives to rank 0",
                    inner.rank
                )));
            }
            drop(wait_checks(inner, |c| c.cleared >= round).ok_or_else(gone)?);
            return Ok(());
        }
        let mut c = wait_checks(inner, |c| {
            inner
                .peers
                .iter()
                .all(|p| c.records.get(&p.rank).is_some_and(|(r, _)| *r == round))
        })
        .ok_or_else(gone)?;
        let mut all = vec![(0, record)];
        all.extend(
            std::mem::take(&mut c.records)
                .into_iter()
                .map(|(rank, (_, body))| (rank, body)),
        );
        drop(c);
        if let Some(verdict) = compare(&all) {
            // Ends the process, unless another verdict is already doing so.
            inner.fire(&verdict);
            inner.ended();
            return Err(Error::Msg(verdict));
        }
        inner.broadcast(CHECKED, &round.to_le_bytes(), None);
        Ok(())
    }

    /// This rank failed on its own (`reason`): tell the others through rank 0, without
    /// exiting (the caller returns its error). Later events are not reported.
    pub fn report_failure(&self, reason: &str) {
        let inner = &self.inner;
        if inner.fired.swap(true, Ordering::AcqRel) {
            return;
        }
        let verdict = format!("rank {} failed: {}", inner.rank, one_line(reason));
        inner.broadcast(FAILED, verdict.as_bytes(), None);
    }

    /// This rank is done: tell the others that its going away is no failure, and stop.
    pub fn finish(&self) {
        let inner = &self.inner;
        if inner.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        if !inner.fired.load(Ordering::Acquire) {
            inner.broadcast(BYE, &[], None);
        }
        inner.close_all();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Not finished: this rank ends abruptly, and the others must learn it now.
        if !self.inner.stopping.swap(true, Ordering::AcqRel) {
            self.inner.close_all();
        }
    }
}

impl Inner {
    /// Whether a wait of [`Watchdog::check`] must give up: this rank is going away, or
    /// a verdict was reached. A verdict ends the process itself (one line, then exit):
    /// the wait lasts until then, so that no second line races it, and gives up only
    /// if the process is still there well after (a verdict's hooks take at most 10 s).
    fn ended(&self) -> bool {
        if self.stopping.load(Ordering::Acquire) {
            return true;
        }
        if !self.fired.load(Ordering::Acquire) {
            return false;
        }
        std::thread::sleep(Duration::from_secs(15));
        true
    }

    fn close_all(&self) {
        for p in &self.peers {
            let _ = lock(&p.writer).shutdown(Shutdown::Both);
        }
    }

    /// Send one frame to every peer but `except` (failures ignored: a dead peer is
    /// what the message is about).
    fn broadcast(&self, status: u8, body: &[u8], except: Option<usize>) {
        for p in self.peers.iter().filter(|p| Some(p.rank) != except) {
            self.send(p, status, body);
        }
    }

    /// Send one frame within 5 s (a peer that reads nothing for that long is lost
    /// anyway).
    fn send(&self, p: &Peer, status: u8, body: &[u8]) -> bool {
        let mut w = lock(&p.writer);
        rendezvous::send_frame(
            &mut w,
            status,
            body,
            Instant::now() + Duration::from_secs(5),
        )
        .is_ok()
    }

    /// The end: one line naming the rank and the cause, the hooks (bounded: a hook
    /// that hangs does not keep the process alive), exit status 1. Rank 0 first tells
    /// every other rank; another rank that found the cause itself tells rank 0.
    fn fire(&self, verdict: &str) {
        if self.fired.swap(true, Ordering::AcqRel) || self.stopping.load(Ordering::Acquire) {
            return;
        }
        // Rank 0 relays the verdict; the others' only peer is rank 0.
        self.broadcast(FAILED, verdict.as_bytes(), None);
        eprintln!("error: {verdict}");
        let hooks: Vec<Hook> = std::mem::take(&mut *lock(&self.hooks));
        let (tx, rx) = std::sync::mpsc::channel();
        let _ = std::thread::Builder::new()
            .name("watchdog-abort".into())
            .spawn(move || {
                for h in hooks {
                    h();
                }
                let _ = tx.send(());
            });
        let _ = rx.recv_timeout(Duration::from_secs(10));
        self.close_all();
        std::process::exit(1);
    }

    fn read_loop(&self, i: usize, mut stream: TcpStream) {
        let peer = &self.peers[i];
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            match stream.read(&mut chunk) {
                Ok(0) => return self.lost(peer, "its connection closed"),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return self.lost(peer, &connection_end(&e)),
            }
            *lock(&peer.last_heard) = Instant::now();
            loop {
                match rendezvous::parse_frame(&buf) {
                    Ok(Some((status, body, used))) => {
                        buf.drain(..used);
                        self.handle(peer, status, &body);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        return self.lost(peer, &format!("it sent garbage ({e})"));
                    }
                }
            }
        }
    }

    /// A peer's connection ended without a goodbye.
    fn lost(&self, peer: &Peer, how: &str) {
        if peer.said_bye.load(Ordering::Acquire) || self.stopping.load(Ordering::Acquire) {
            return;
        }
        self.fire(&format!(
            "rank {} is gone: {how} without a goodbye (the process was killed, e.g. out of memory, or crashed; see its own log)",
            peer.rank
        ));
    }

    fn handle(&self, peer: &Peer, status: u8, body: &[u8]) {
        match status {
            HEARTBEAT if body.len() >= 8 => {
                let n = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
                peer.entered.store(n, Ordering::Release);
                let pairs = body[8..]
                    .chunks_exact(16)
                    .map(|c| {
                        let (a, b) = c.split_at(8);
                        (
                            u64::from_le_bytes(a.try_into().expect("8 bytes")),
                            u64::from_le_bytes(b.try_into().expect("8 bytes")),
                        )
                    })
                    .collect();
                *lock(&peer.trail) = pairs;
            }
            FAILED => self.fire(&String::from_utf8_lossy(body)),
            STUCK if body.len() >= 8 && self.rank == 0 => {
                let seq = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
                let what = String::from_utf8_lossy(&body[8..]).to_string();
                self.fire(&self.stuck_verdict(seq, &what, peer.rank));
            }
            BYE => peer.said_bye.store(true, Ordering::Release),
            CHECK if body.len() >= 8 && self.rank == 0 => {
                let round = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
                lock(&self.checks)
                    .records
                    .insert(peer.rank, (round, body[8..].to_vec()));
                self.checks_changed.notify_all();
            }
            CHECKED if body.len() >= 8 => {
                let round = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
                let mut c = lock(&self.checks);
                c.cleared = c.cleared.max(round);
                self.checks_changed.notify_all();
            }
            _ => {}
        }
    }

    /// Rank 0's verdict on collective `seq` (`what`) stuck on rank `on`: the ranks
    /// whose last heartbeat says they never entered it, or the collective itself.
    fn stuck_verdict(&self, seq: u64, what: &str, on: usize) -> String {
        if let Some(v) = self.out_of_step(what, on) {
            return v;
        }
        let mut behind: Vec<usize> = Vec::new();
        if self.entered.load(Ordering::Acquire) < seq {
            behind.push(0);
        }
        for p in &self.peers {
            if p.entered.load(Ordering::Acquire) < seq && !p.said_bye.load(Ordering::Acquire) {
                behind.push(p.rank);
            }
        }
        behind.sort_unstable();
        let secs = self.cfg.collective_timeout.as_secs_f64();
        if behind.is_empty() {
            format!(
                "{what} did not complete within {secs} s on rank {on}, though all {} ranks entered it (a hang inside the communication library; NCCL_DEBUG=INFO says more)",
                self.world_size
            )
        } else {
            format!(
                "{} did not reach {what} within {secs} s (alive, but stuck or slower before it; raise --collective-timeout if that work is legitimately long)",
                rendezvous::rank_list(&behind)
            )
        }
    }

    /// Rank 0, on a stuck collective: the first peer whose last records (from its
    /// heartbeat) hash differently from rank 0's at the same number, named with the
    /// first such number. Ranks that issued different collectives pair them wrongly,
    /// which NCCL may answer by waiting forever: that is the cause, not a hang.
    fn out_of_step(&self, what: &str, on: usize) -> Option<String> {
        let own: Vec<Mark> = lock(&self.trail).iter().copied().collect();
        let at = |seq: u64| own.iter().find(|m| m.seq == seq);
        for p in &self.peers {
            let theirs = lock(&p.trail).clone();
            let mut agreed_before = false;
            for &(seq, hash) in &theirs {
                let Some(mine) = at(seq) else {
                    agreed_before = false;
                    continue;
                };
                if mine.hash == hash {
                    agreed_before = true;
                    continue;
                }
                let step = match mine.step {
                    NO_STEP => String::new(),
                    s => format!(", after step {s}"),
                };
                let tail = format!(
                    "then {what} hung on rank {on} (every rank must issue the same collectives in the same order: a collective under a condition that differs between ranks?)"
                );
                return Some(if agreed_before {
                    format!(
                        "ranks out of step: rank {}'s collective #{seq} differs from rank 0's ({}{step}) in kind, size or dtype; {tail}",
                        p.rank, mine.name
                    )
                } else {
                    format!(
                        "ranks out of step: rank {} and rank 0 had issued different collectives by collective #{seq} (rank 0's: {}{step}; they may have parted earlier); {tail}",
                        p.rank, mine.name
                    )
                });
            }
        }
        None
    }

    fn monitor_loop(&self) {
        let mut next_beat = Instant::now();
        loop {
            if self.stopping.load(Ordering::Acquire) || self.fired.load(Ordering::Acquire) {
                return;
            }
            let now = Instant::now();
            if now >= next_beat {
                let beat = {
                    let trail = lock(&self.trail);
                    let mut b = self.entered.load(Ordering::Acquire).to_le_bytes().to_vec();
                    for m in trail.iter().skip(trail.len().saturating_sub(TRAIL_SENT)) {
                        b.extend_from_slice(&m.seq.to_le_bytes());
                        b.extend_from_slice(&m.hash.to_le_bytes());
                    }
                    b
                };
                self.broadcast(HEARTBEAT, &beat, None);
                next_beat = now + self.cfg.heartbeat;
            }
            for p in &self.peers {
                let quiet = now.saturating_duration_since(*lock(&p.last_heard));
                if quiet > self.cfg.silence_timeout && !p.said_bye.load(Ordering::Acquire) {
                    self.fire(&format!(
                        "rank {} sent nothing for {:.1} s (hung, stopped, or its node is unreachable)",
                        p.rank,
                        quiet.as_secs_f64()
                    ));
                }
            }
            self.check_collectives(now);
            std::thread::sleep(
                self.cfg
                    .heartbeat
                    .min(next_beat.saturating_duration_since(now)),
            );
        }
    }

    /// Drop the collectives that completed (in order); the oldest one still in flight
    /// past the timeout is a verdict on rank 0, a question to rank 0 elsewhere.
    fn check_collectives(&self, now: Instant) {
        let stuck = {
            let mut pending = lock(&self.pending);
            while pending.front_mut().is_some_and(|p| (p.done)()) {
                pending.pop_front();
            }
            pending
                .front()
                .filter(|p| now.duration_since(p.since) > self.cfg.collective_timeout)
                .map(|p| {
                    let step = match p.step {
                        NO_STEP => String::new(),
                        s => format!(", after step {s}"),
                    };
                    (p.seq, format!("collective #{} ({}{step})", p.seq, p.name))
                })
        };
        let Some((seq, what)) = stuck else {
            return;
        };
        if self.rank == 0 || self.peers.is_empty() {
            return self.fire(&self.stuck_verdict(seq, &what, self.rank));
        }
        let mut reported = lock(&self.stuck_reported);
        match reported.as_ref() {
            None => {
                let mut body = seq.to_le_bytes().to_vec();
                body.extend_from_slice(what.as_bytes());
                self.send(&self.peers[0], STUCK, &body);
                *reported = Some((now, what));
            }
            // Rank 0 did not answer with a verdict: say what this rank knows.
            Some((at, what)) if now.duration_since(*at) > self.cfg.silence_timeout => {
                let verdict = format!(
                    "{what} did not complete within {} s on rank {} (rank 0 gave no verdict)",
                    self.cfg.collective_timeout.as_secs_f64(),
                    self.rank
                );
                drop(reported);
                self.fire(&verdict);
            }
            Some(_) => {}
        }
    }
}

/// How a peer's connection ended, from the error its read gave. A killed process's
/// kernel resets the connection instead of closing it when bytes were still unread on
/// its side (heartbeats, usually): the same event as a close.
fn connection_end(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => {
            "its connection closed (reset)".into()
        }
        _ => format!("its connection failed ({e})"),
    }
}

/// A message on one line (a verdict is printed as one).
fn one_line(s: &str) -> String {
    s.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_are_frequent_enough_and_bounded() {
        let c = WatchdogConfig::new(Duration::from_secs(1800));
        assert_eq!(c.silence_timeout, Duration::from_secs(120));
        assert_eq!(c.heartbeat, Duration::from_secs(5));
        let c = WatchdogConfig::new(Duration::from_secs(2));
        assert_eq!(c.silence_timeout, Duration::from_secs(10));
        assert_eq!(c.heartbeat, Duration::from_millis(200));
        let c = WatchdogConfig::new(Duration::from_millis(50));
        assert_eq!(c.heartbeat, Duration::from_millis(20));
    }

    /// Regression (CI of stop 9): a rank killed with heartbeats unread in its socket
    /// reset the connection, and the others said "its connection failed (Connection
    /// reset by peer)" where a kill reads "its connection closed".
    #[test]
    fn a_peer_killed_with_unread_bytes_reads_as_a_closed_connection() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut ours, _) = listener.accept().unwrap();
        ours.write_all(b"heartbeat").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(peer); // never read what we sent: the kernel answers with a reset
        ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let e = ours.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        assert_eq!(connection_end(&e), "its connection closed (reset)");
        let other = std::io::Error::new(ErrorKind::PermissionDenied, "no");
        assert_eq!(connection_end(&other), "its connection failed (no)");
    }

    #[test]
    fn reasons_become_one_line() {
        assert_eq!(one_line("a\n  b\n"), "a b");
    }
}
