//! One run at a time in a run folder: rank 0 holds `RUN/.lock` (created atomically,
//! holding its pid and host) from before it reads the folder until the run ends.
//! A second run is refused at once, naming the first; a lock left by a process that
//! is gone (killed, machine rebooted) is taken over. Runs of one process (tests,
//! a library caller's successive trainers) share the process's lock.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, IoContext, Result};

pub const LOCK_FILE: &str = ".lock";

/// The lock on a run folder; released (and the folder removed, when this lock created
/// it and nothing else was written there) when dropped.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    /// The run folder, when taking the lock created it.
    created: Option<PathBuf>,
}

/// Lock files this process holds, with the number of [`RunLock`]s sharing each.
static HELD: Mutex<Option<HashMap<PathBuf, usize>>> = Mutex::new(None);

/// Taking and releasing locks, one at a time in this process.
static TURN: Mutex<()> = Mutex::new(());

thread_local! {
    /// This thread holds [`TURN`] (a lock dropped while acquiring one must not wait
    /// for it).
    static IN_TURN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// [`TURN`], held until dropped.
struct Turn(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

impl Drop for Turn {
    fn drop(&mut self) {
        IN_TURN.with(|t| t.set(false));
    }
}

/// Take [`TURN`], unless this thread holds it already.
fn take_turn() -> Option<Turn> {
    if IN_TURN.with(|t| t.get()) {
        return None;
    }
    let guard = TURN.lock().unwrap_or_else(|e| e.into_inner());
    IN_TURN.with(|t| t.set(true));
    Some(Turn(guard))
}

/// Count one more holder of `path` in this process if it already holds it.
fn share(path: &Path) -> bool {
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    match held.get_or_insert_with(HashMap::new).get_mut(path) {
        Some(n) => {
            *n += 1;
            true
        }
        None => false,
    }
}

/// Count `path` held by this process; returns whether it should now be removed
/// (`delta` < 0 and no holder left).
fn count(path: &Path, delta: isize) -> bool {
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    let map = held.get_or_insert_with(HashMap::new);
    let n = map.entry(path.to_path_buf()).or_insert(0);
    *n = n.saturating_add_signed(delta);
    if *n == 0 {
        map.remove(path);
        return true;
    }
    false
}

/// This machine's name, to tell whose pid a lock holds.
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Whether process `pid` of this machine is alive.
fn alive(pid: u32) -> bool {
    if Path::new("/proc/self").exists() {
        return Path::new(&format!("/proc/{pid}")).exists();
    }
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(true)
}

impl RunLock {
    /// Lock the run folder `run` (created if missing) for this process.
    pub fn acquire(run: &Path) -> Result<RunLock> {
        let _turn = take_turn();
        let created = if run.is_dir() {
            None
        } else {
            std::fs::create_dir_all(run).at(run)?;
            Some(run.to_path_buf())
        };
        let path = super::setup::absolute(run).join(LOCK_FILE);
        if share(&path) {
            return Ok(RunLock { path, created });
        }
        let mut lock = RunLock { path, created };
        // Twice at most: once more after taking over a dead process's lock.
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&lock.path)
            {
                Ok(mut f) => {
                    count(&lock.path, 1);
                    writeln!(f, "{} {}", std::process::id(), host()).at(&lock.path)?;
                    return Ok(lock);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    lock.take_over_or_refuse(run)?;
                }
                Err(e) => {
                    let path = std::mem::take(&mut lock.path);
                    return Err(Error::io(&path, e));
                }
            }
        }
        let path = std::mem::take(&mut lock.path);
        Err(Error::Usage(format!(
            "{} is being locked by another run at the same time; choose another --out-dir or try again",
            path.display()
        )))
    }

    /// Remove the existing lock if its process is gone; refuse if it runs.
    fn take_over_or_refuse(&mut self, run: &Path) -> Result<()> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let mut words = text.split_whitespace();
        let pid = words.next().and_then(|p| p.parse::<u32>().ok());
        let their_host = words.next().unwrap_or("").to_string();
        let here = host();
        let gone = match pid {
            // Half-written by a process killed between creating and writing it (not
            // one writing it now).
            None => {
                let age = std::fs::metadata(&self.path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok());
                text.trim().is_empty() && age.is_some_and(|a| a.as_secs() >= 10)
            }
            // Our own pid, not held by this process: a dead process's, reused.
            Some(p) => {
                (their_host.is_empty() || their_host == here)
                    && (p == std::process::id() || !alive(p))
            }
        };
        if gone {
            match std::fs::remove_file(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => {
                    let path = std::mem::take(&mut self.path);
                    return Err(Error::io(&path, e));
                }
            }
        }
        let holder = match (pid, their_host.as_str()) {
            (Some(p), h) if h.is_empty() || h == here => format!("pid {p}"),
            (Some(p), h) => format!("pid {p} on {h}"),
            (None, _) => format!("{:?}", text.trim()),
        };
        // Not ours: dropping must not remove it.
        let path = std::mem::take(&mut self.path);
        Err(Error::Usage(format!(
            "{} is in use by another run ({holder}, see {}); wait for it to end or choose another --out-dir (delete {} only if that run is gone)",
            run.display(),
            path.display(),
            path.display()
        )))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _turn = take_turn();
        if !self.path.as_os_str().is_empty() && count(&self.path, -1) {
            let _ = std::fs::remove_file(&self.path);
        }
        if let Some(dir) = &self.created {
            // Only if empty: a refused run leaves nothing behind, a run that wrote
            // something keeps it.
            let _ = std::fs::remove_dir(dir);
        }
    }
}
