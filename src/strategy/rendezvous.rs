//! Rendezvous over TCP: every rank meets rank 0, and rank 0 hands each the same bytes
//! (NCCL's 128-byte unique id, which NCCL needs on every rank before it can connect them).
//!
//! ```text
//! rank 0                                   rank r ≠ 0
//! listen on MASTER_PORT (all interfaces)   connect to MASTER_ADDR:MASTER_PORT (retried:
//!                                          rank 0 may start later)
//!            ◀──── hello: "LCRV", version, r, world size, the job secret's digest
//! check: the job's secret (else refused,
//! logged, and still waiting), rank in
//! range, not seen before, same world size
//! once all world−1 ranks said hello:
//!            ────▶ ok: payload             (or error: why, to every rank waiting)
//! ```
//!
//! Every wait is bounded by the timeout: rank 0 names the ranks that did not arrive
//! (as ranges, `ranks 3, 5-7`, never a list as long as the world), the others say
//! rank 0 was not reachable. Rank 0 greets connections concurrently: each waits,
//! non-blocking, for its hello, and one that sends none within [`GREETING_TIMEOUT`] (a
//! port scanner, an idle client) is dropped without delaying the ranks behind it. No
//! shared files, no other service.
//!
//! A client that speaks the protocol is a rank only if its hello carries the job's
//! secret ([`JobSecret`]: from `LIT_CLAIRE_JOB_SECRET`, else the launcher's job id,
//! `SLURM_JOB_ID` or `TORCHELASTIC_RUN_ID`), compared in constant time. One that does
//! not (a process of another job that picked the same port, a stranger) is refused
//! with the reason, one line on rank 0's stderr says so, and the rendezvous goes on
//! waiting for the real rank.
//!
//! [`Rendezvous::share_and_keep`] leaves the connections open (rank 0's to every other
//! rank, theirs to rank 0): the [`watchdog`](super::watchdog) talks over them for the
//! rest of the run, so that a rank that dies later does not leave the others waiting.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::env::{JobSecret, ProcessGroup, SecretSource};
use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"LCRV";
/// 2: the connections stay open after the answer, for the watchdog. 3: the hello
/// carries the job secret's digest.
const VERSION: u8 = 3;
const OK: u8 = 0;
const REFUSED: u8 = 1;
/// The hello's job secret is not this job's: refused, and the rendezvous goes on.
const NOT_THIS_JOB: u8 = 6;
/// Refusals of strangers logged on rank 0's stderr, at most (then one line saying
/// that the rest are not).
const MAX_LOGGED_REFUSALS: usize = 8;
/// Largest payload or message accepted (an NCCL id is 128 bytes).
const MAX_FRAME: usize = 1 << 20;

/// An open connection to a peer after the rendezvous: the peer's rank and the socket.
pub type Link = (usize, TcpStream);

/// Where and how the ranks of one run meet.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    /// Host of rank 0 (`MASTER_ADDR`).
    pub addr: String,
    /// Port rank 0 listens on (`MASTER_PORT`, see [`super::env::rendezvous_port`]).
    pub port: u16,
    /// Where `port` came from, for messages (`MASTER_PORT`, `LIT_CLAIRE_PORT`...).
    pub port_source: String,
    pub rank: usize,
    pub world_size: usize,
    /// How long to wait for the others (rank 0) or for rank 0 (the others).
    pub timeout: Duration,
    /// What a hello must carry to be admitted.
    pub secret: JobSecret,
}

impl Rendezvous {
    /// The rendezvous of a launcher's process group.
    pub fn new(pg: &ProcessGroup, timeout: Duration) -> Self {
        Rendezvous {
            addr: pg.master_addr.clone(),
            port: pg.master_port,
            port_source: pg.port_source.clone(),
            rank: pg.rank,
            world_size: pg.world_size,
            timeout,
            secret: pg.secret.clone(),
        }
    }

    /// Meet every other rank; rank 0 sends them `payload` (its own, `Some`; the others
    /// pass `None`). Every rank returns rank 0's payload.
    pub fn share(&self, payload: Option<&[u8]>) -> Result<Vec<u8>> {
        self.share_and_keep(payload).map(|(p, _)| p)
    }

    /// [`Rendezvous::share`], keeping the connections open: rank 0 gets one link to
    /// every other rank (in rank order), the others one link to rank 0.
    pub fn share_and_keep(&self, payload: Option<&[u8]>) -> Result<(Vec<u8>, Vec<Link>)> {
        if self.rank >= self.world_size {
            return Err(Error::Usage(format!(
                "rank {} of a world of {}: ranks run from 0 to world size - 1",
                self.rank, self.world_size
            )));
        }
        if self.rank == 0 {
            let payload = payload.ok_or_else(|| {
                Error::Msg("rendezvous: rank 0 has no payload to share (a bug)".into())
            })?;
            if payload.len() > MAX_FRAME {
                return Err(Error::Msg(format!(
                    "rendezvous: a payload of {} bytes is over the {MAX_FRAME}-byte limit",
                    payload.len()
                )));
            }
            let links = self.serve(payload)?;
            Ok((payload.to_vec(), links))
        } else {
            self.join().map(|(p, s)| (p, vec![(0, s)]))
        }
    }

    fn endpoint(&self) -> String {
        if self.addr.contains(':') {
            format!("[{}]:{}", self.addr, self.port)
        } else {
            format!("{}:{}", self.addr, self.port)
        }
    }

    /// Rank 0: wait for every other rank's hello, check it, answer all at once.
    ///
    /// Connections are greeted concurrently: every accepted connection waits in a list,
    /// non-blocking, until its hello is whole, and one that sends none within
    /// [`GREETING_TIMEOUT`] (a port scanner, a health check, a stray client) is dropped
    /// without holding up anyone else.
    fn serve(&self, payload: &[u8]) -> Result<Vec<Link>> {
        let deadline = super::deadline_after(self.timeout);
        // All interfaces: MASTER_ADDR is how the others reach this node, which may not
        // be the address its own host name resolves to here (e.g. 127.0.1.1).
        let any = if self.addr.contains(':') {
            "[::]"
        } else {
            "0.0.0.0"
        };
        let listener = TcpListener::bind(format!("{any}:{}", self.port))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| {
                Error::Msg(format!(
                    "rank 0 cannot listen on port {} ({}): {e}; set {} to a free port (the same on every rank)",
                    self.port,
                    self.port_source,
                    super::env::PORT_VAR
                ))
            })?;
        let mut arrived: BTreeMap<usize, (TcpStream, SocketAddr)> = BTreeMap::new();
        let mut greeting: Vec<Greeting> = Vec::new();
        let mut refusals = 0usize;
        while arrived.len() + 1 < self.world_size {
            let mut progress = false;
            // Every connection waiting to be accepted.
            loop {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        progress = true;
                        // Non-blocking (as accepted from a non-blocking listener on
                        // some systems, not on others): set it either way.
                        if stream.set_nonblocking(true).is_ok() {
                            greeting.push(Greeting {
                                stream,
                                peer,
                                hello: Vec::with_capacity(HELLO_LEN),
                                until: (Instant::now() + GREETING_TIMEOUT).min(deadline),
                            });
                        }
                    }
                    Err(e)
                        if e.kind() == ErrorKind::WouldBlock
                            || e.kind() == ErrorKind::Interrupted =>
                    {
                        break;
                    }
                    Err(e) => {
                        return Err(refuse_all(
                            arrived,
                            format!("rendezvous at {}: accept failed: {e}", self.endpoint()),
                        ));
                    }
                }
            }
            // Whatever each waiting connection sent since; whole hellos are checked.
            let now = Instant::now();
            let mut complete = Vec::new();
            let mut i = 0;
            while i < greeting.len() {
                match greeting[i].poll() {
                    Poll::Pending if now < greeting[i].until => i += 1,
                    Poll::Hello => {
                        progress = true;
                        complete.push(greeting.swap_remove(i));
                    }
                    Poll::Pending | Poll::Gone => {
                        progress = true;
                        greeting.swap_remove(i);
                    }
                }
            }
            for Greeting {
                mut stream,
                peer,
                hello,
                ..
            } in complete
            {
                // A hello that is not ours is a stranger: dropped, like a silent one.
                let Ok(Hello {
                    rank,
                    world,
                    source,
                    digest,
                }) = parse_hello(&hello)
                else {
                    continue;
                };
                if stream.set_nonblocking(false).is_err() || stream.set_nodelay(true).is_err() {
                    continue;
                }
                // Before anything it says is believed: a stranger claiming a taken rank
                // or another world size must not stop the run.
                if !self.secret.matches(&digest) {
                    let theirs = SecretSource::from_code(source)
                        .map_or("an unknown variable", SecretSource::variable);
                    let ours = self.secret.source.variable();
                    let _ = send_frame(
                        &mut stream,
                        NOT_THIS_JOB,
                        format!(
                            "its job secret (from {theirs}) is not that of rank 0's job (from {ours}): start every rank of a job with the same {ours}, or give another job its own MASTER_PORT"
                        )
                        .as_bytes(),
                        Instant::now() + Duration::from_secs(2),
                    );
                    refusals += 1;
                    if refusals <= MAX_LOGGED_REFUSALS {
                        eprintln!(
                            "warning: rendezvous at {}: refused {peer}, which says it is rank {rank} of {world}: its job secret (from {theirs}) is not this job's (from {ours}); still waiting for the real rank{}",
                            self.endpoint(),
                            if refusals == MAX_LOGGED_REFUSALS {
                                " (further refusals are not logged)"
                            } else {
                                ""
                            }
                        );
                    }
                    continue;
                }
                let problem = if world != self.world_size {
                    Some(format!(
                        "rank {rank} (from {peer}) has world size {world}, rank 0 has {}: start every process with the same counts",
                        self.world_size
                    ))
                } else if rank == 0 || rank >= world {
                    Some(format!(
                        "a process from {peer} says it is rank {rank}, but rank 0 is {} and ranks run from 1 to {}",
                        self.endpoint(),
                        world - 1
                    ))
                } else if let Some((_, first)) = arrived.get(&rank) {
                    Some(format!(
                        "two processes say they are rank {rank} (from {first} and {peer}): each process needs its own rank"
                    ))
                } else {
                    None
                };
                if let Some(msg) = problem {
                    let _ = send_frame(&mut stream, REFUSED, msg.as_bytes(), deadline);
                    return Err(refuse_all(arrived, msg));
                }
                arrived.insert(rank, (stream, peer));
                if arrived.len() + 1 >= self.world_size {
                    break;
                }
            }
            if arrived.len() + 1 >= self.world_size {
                break;
            }
            if Instant::now() >= deadline {
                let missing = missing_ranks(arrived.keys().copied(), self.world_size);
                let msg = format!(
                    "rendezvous at {}: after {:.0} s, {} of {} did not arrive (were all {} processes started, e.g. one srun task per GPU?)",
                    self.endpoint(),
                    self.timeout.as_secs_f64(),
                    range_list(&missing),
                    self.world_size,
                    self.world_size
                );
                return Err(refuse_all(arrived, msg));
            }
            if !progress {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let mut failed = Vec::new();
        let mut links = Vec::new();
        for (rank, (mut stream, _)) in arrived {
            let end = Instant::now() + Duration::from_secs(10);
            match send_frame(&mut stream, OK, payload, end) {
                Ok(()) => links.push((rank, stream)),
                Err(e) => failed.push(format!("rank {rank}: {e}")),
            }
        }
        if failed.is_empty() {
            Ok(links)
        } else {
            Err(Error::Msg(format!(
                "rendezvous at {}: could not answer {}",
                self.endpoint(),
                failed.join(", ")
            )))
        }
    }

    /// Rank r ≠ 0: connect to rank 0 (retrying until the deadline), say hello, wait for
    /// the answer.
    fn join(&self) -> Result<(Vec<u8>, TcpStream)> {
        let deadline = super::deadline_after(self.timeout);
        let endpoint = self.endpoint();
        let mut stream = self.connect(deadline)?;
        let mut hello = Vec::with_capacity(HELLO_LEN);
        hello.extend_from_slice(MAGIC);
        hello.push(VERSION);
        hello.extend_from_slice(&(self.rank as u32).to_le_bytes());
        hello.extend_from_slice(&(self.world_size as u32).to_le_bytes());
        hello.push(self.secret.source.code());
        hello.extend_from_slice(self.secret.digest());
        let lost = |e: String| {
            Error::Msg(format!(
                "rank {}: lost rank 0 at {endpoint}: {e} (see rank 0's log)",
                self.rank
            ))
        };
        let write_by_time = deadline
            .checked_add(Duration::from_secs(10))
            .unwrap_or(deadline);
        write_by(&mut stream, &hello, write_by_time).map_err(lost)?;
        // Rank 0 answers once everyone has arrived, or when it gives up after its own
        // timeout, which may have started later than ours: wait for that too.
        let answer_by = super::deadline_after(self.timeout.saturating_add(Duration::from_secs(10)));
        let (status, body) = read_frame(&mut stream, answer_by).map_err(|e| {
            Error::Msg(format!(
                "rank {}: connected to rank 0 at {endpoint} but got no answer: {e} (see rank 0's log)",
                self.rank
            ))
        })?;
        match status {
            OK => Ok((body, stream)),
            NOT_THIS_JOB => Err(Error::Msg(format!(
                "rank {}: rank 0 at {endpoint} refused this process: {}",
                self.rank,
                String::from_utf8_lossy(&body)
            ))),
            _ => Err(Error::Msg(format!(
                "rank {}: rank 0 stopped the rendezvous: {}",
                self.rank,
                String::from_utf8_lossy(&body)
            ))),
        }
    }

    fn connect(&self, deadline: Instant) -> Result<TcpStream> {
        let endpoint = self.endpoint();
        let mut pause = Duration::from_millis(50);
        let mut last_error;
        loop {
            last_error = match endpoint.to_socket_addrs() {
                Ok(addrs) => {
                    let mut err = format!("{endpoint} resolves to no address");
                    for addr in addrs {
                        let wait = deadline
                            .saturating_duration_since(Instant::now())
                            .clamp(Duration::from_millis(10), Duration::from_secs(2));
                        match TcpStream::connect_timeout(&addr, wait) {
                            Ok(s) => {
                                s.set_nodelay(true).ok();
                                return Ok(s);
                            }
                            Err(e) => err = e.to_string(),
                        }
                    }
                    err
                }
                Err(e) => e.to_string(),
            };
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_secs(1));
        }
        Err(Error::Msg(format!(
            "rank {}: rank 0 was not reachable at {endpoint} within {:.0} s ({last_error}); is rank 0 running, and do MASTER_ADDR and the port ({}) name its host and a free port?",
            self.rank,
            self.timeout.as_secs_f64(),
            self.port_source
        )))
    }
}

/// Tell every waiting rank why the rendezvous stopped; the error for rank 0 itself.
fn refuse_all(arrived: BTreeMap<usize, (TcpStream, SocketAddr)>, msg: String) -> Error {
    for (_, (mut stream, _)) in arrived {
        let _ = send_frame(
            &mut stream,
            REFUSED,
            msg.as_bytes(),
            Instant::now() + Duration::from_secs(2),
        );
    }
    Error::Msg(msg)
}

/// How long an accepted connection may take to send its hello. A rank sends it as
/// soon as it connects; whoever sends none in time is not one of ours, and is dropped
/// (while the others are greeted as they come).
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(3);

/// MAGIC, version, rank (u32 LE), world size (u32 LE), the secret's source, its
/// 32-byte digest.
const HELLO_LEN: usize = 46;

/// A hello, as read.
struct Hello {
    rank: usize,
    world: usize,
    source: u8,
    digest: [u8; 32],
}

/// An accepted connection whose hello is not whole yet.
struct Greeting {
    stream: TcpStream,
    peer: SocketAddr,
    hello: Vec<u8>,
    /// Dropped if the hello is not whole by then.
    until: Instant,
}

enum Poll {
    Pending,
    Hello,
    /// Closed, failed, or sent more than a hello before the answer.
    Gone,
}

impl Greeting {
    /// Read what arrived, without waiting.
    fn poll(&mut self) -> Poll {
        let mut buf = [0u8; HELLO_LEN];
        loop {
            let want = HELLO_LEN - self.hello.len();
            match self.stream.read(&mut buf[..want]) {
                Ok(0) => return Poll::Gone,
                Ok(n) => {
                    self.hello.extend_from_slice(&buf[..n]);
                    if self.hello.len() == HELLO_LEN {
                        return Poll::Hello;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Poll::Gone,
            }
        }
    }
}

/// The ranks of `1..world` not in `arrived` (ascending), as inclusive ranges: never a
/// list as long as the world, whatever its size.
pub(super) fn missing_ranks(
    arrived: impl Iterator<Item = usize>,
    world: usize,
) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    let mut next = 1;
    for r in arrived {
        if r > next {
            ranges.push((next, r - 1));
        }
        next = next.max(r + 1);
    }
    if next < world {
        ranges.push((next, world - 1));
    }
    ranges
}

/// Most ranges a message lists before it only counts the rest.
const MAX_LISTED_RANGES: usize = 8;

/// `ranks 3, 5-7` / `rank 2`, from inclusive ranges; past [`MAX_LISTED_RANGES`] the
/// rest are counted (`ranks 1, 3, …, and 4998 more ranks in 2498 ranges`).
pub(super) fn range_list(ranges: &[(usize, usize)]) -> String {
    let count: usize = ranges.iter().map(|(a, b)| b - a + 1).sum();
    let mut parts: Vec<String> = ranges
        .iter()
        .take(MAX_LISTED_RANGES)
        .map(|&(a, b)| {
            if b > a {
                format!("{a}-{b}")
            } else {
                a.to_string()
            }
        })
        .collect();
    if ranges.len() > MAX_LISTED_RANGES {
        let rest = &ranges[MAX_LISTED_RANGES..];
        let more: usize = rest.iter().map(|(a, b)| b - a + 1).sum();
        parts.push(format!(
            "and {more} more rank{} in {} range{}",
            if more == 1 { "" } else { "s" },
            rest.len(),
            if rest.len() == 1 { "" } else { "s" }
        ));
    }
    let word = if count == 1 { "rank" } else { "ranks" };
    format!("{word} {}", parts.join(", "))
}

/// `ranks 3, 5-7` / `rank 2`, from ranks in ascending order (see [`range_list`]).
pub(super) fn rank_list(ranks: &[usize]) -> String {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for &r in ranks {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == r => *end = r,
            _ => ranges.push((r, r)),
        }
    }
    range_list(&ranges)
}

fn parse_hello(buf: &[u8]) -> std::result::Result<Hello, String> {
    if buf.len() != HELLO_LEN || &buf[..4] != MAGIC || buf[4] != VERSION {
        return Err("not a lit-claire rendezvous hello".into());
    }
    Ok(Hello {
        rank: u32::from_le_bytes(buf[5..9].try_into().expect("4 bytes")) as usize,
        world: u32::from_le_bytes(buf[9..13].try_into().expect("4 bytes")) as usize,
        source: buf[13],
        digest: buf[14..46].try_into().expect("32 bytes"),
    })
}

/// MAGIC, status, length (u32 LE), body.
pub(super) fn send_frame(
    stream: &mut TcpStream,
    status: u8,
    body: &[u8],
    deadline: Instant,
) -> std::result::Result<(), String> {
    let mut frame = Vec::with_capacity(9 + body.len());
    frame.extend_from_slice(MAGIC);
    frame.push(status);
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(body);
    write_by(stream, &frame, deadline)
}

/// The first whole frame at the start of `buf`: status, body and the bytes it took;
/// `None` while it is incomplete.
pub(super) fn parse_frame(buf: &[u8]) -> std::result::Result<Option<(u8, Vec<u8>, usize)>, String> {
    if buf.len() < 9 {
        return Ok(None);
    }
    if &buf[..4] != MAGIC {
        return Err("not a lit-claire frame".into());
    }
    let len = u32::from_le_bytes(buf[5..9].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(format!(
            "a frame of {len} bytes is over the {MAX_FRAME}-byte limit"
        ));
    }
    if buf.len() < 9 + len {
        return Ok(None);
    }
    Ok(Some((buf[4], buf[9..9 + len].to_vec(), 9 + len)))
}

fn read_frame(
    stream: &mut TcpStream,
    deadline: Instant,
) -> std::result::Result<(u8, Vec<u8>), String> {
    let mut head = [0u8; 9];
    read_by(stream, &mut head, deadline)?;
    if &head[..4] != MAGIC {
        return Err("the answer is not from a lit-claire rank 0".into());
    }
    let len = u32::from_le_bytes(head[5..9].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(format!(
            "an answer of {len} bytes is over the {MAX_FRAME}-byte limit"
        ));
    }
    let mut body = vec![0u8; len];
    read_by(stream, &mut body, deadline)?;
    Ok((head[4], body))
}

/// `read_exact` that gives up at `deadline`.
fn read_by(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> std::result::Result<(), String> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("timed out".into());
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err("connection closed".into()),
            Ok(n) => filled += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err("timed out".into());
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// `write_all` that gives up at `deadline`.
fn write_by(
    stream: &mut TcpStream,
    buf: &[u8],
    deadline: Instant,
) -> std::result::Result<(), String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err("timed out".into());
    }
    stream
        .set_write_timeout(Some(left))
        .map_err(|e| e.to_string())?;
    stream.write_all(buf).map_err(|e| e.to_string())?;
    stream.flush().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::{missing_ranks, parse_frame, range_list, rank_list};

    #[test]
    fn frames_are_parsed_only_when_whole() {
        let frame = [b'L', b'C', b'R', b'V', 3, 2, 0, 0, 0, b'h', b'i', 9];
        assert_eq!(parse_frame(&frame[..10]).unwrap(), None);
        assert_eq!(parse_frame(&frame).unwrap(), Some((3, b"hi".to_vec(), 11)));
        assert!(parse_frame(b"XXXX\0\0\0\0\0").is_err());
    }

    #[test]
    fn missing_ranks_are_listed_as_ranges() {
        assert_eq!(rank_list(&[2]), "rank 2");
        assert_eq!(rank_list(&[1, 3, 5, 6, 7]), "ranks 1, 3, 5-7");
        assert_eq!(
            missing_ranks([2, 3, 6].into_iter(), 8),
            [(1, 1), (4, 5), (7, 7)]
        );
        assert_eq!(missing_ranks(std::iter::empty(), 2), [(1, 1)]);
        assert_eq!(missing_ranks([1].into_iter(), 2), []);
    }

    /// Issue 23, case 5: a world of a billion ranks, none arrived, is one range, and a
    /// scattered list is cut after a few ranges, with the rest counted.
    #[test]
    fn missing_ranks_of_a_huge_world_stay_small() {
        let m = missing_ranks(std::iter::empty(), 1_000_000_000);
        assert_eq!(m, [(1, 999_999_999)]);
        assert_eq!(range_list(&m), "ranks 1-999999999");
        let arrived = (2..10_000).step_by(2);
        let m = missing_ranks(arrived, 10_000);
        assert_eq!(m.len(), 5_000);
        let text = range_list(&m);
        assert!(
            text.starts_with("ranks 1, 3, 5,")
                && text.ends_with("and 4992 more ranks in 4992 ranges"),
            "{text}"
        );
        let scattered: Vec<usize> = (0..1000).map(|r| 2 * r + 1).collect();
        assert!(
            rank_list(&scattered).len() < 120,
            "{}",
            rank_list(&scattered)
        );
    }
}
