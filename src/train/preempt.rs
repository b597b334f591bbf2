//! Stopping a run cleanly when the cluster takes the machine back.
//!
//! SLURM warns a job before its time limit (`#SBATCH --signal=USR1@300`) and sends
//! SIGTERM when it preempts or cancels it; torchrun passes SIGTERM on to its workers.
//! Once [`install_signal_handlers`] has run (the `pretrain` command does it first), a
//! run that receives SIGUSR1 or SIGTERM finishes the optimizer step it is in, writes a
//! `step-NNNNNNNN` checkpoint like the timed ones, and returns a
//! [`TrainSummary`](super::TrainSummary) whose `preempted` names it; the command then
//! exits with [`EXIT_PREEMPTED`], which the `slurm/` scripts read as "requeue me", and
//! `--resume auto` continues the run exactly.
//!
//! ```text
//! SIGUSR1/SIGTERM ─► handler: one atomic store (async-signal-safe), nothing else
//! each step boundary, every rank: any_rank_stops = all_reduce_sum(my flag) > 0
//!   └─ so every rank stops after the same step, whichever of them got the signal
//! ```
//!
//! Rank 0 then records the stop in the run folder ([`STOP_RECORD`], written once the
//! checkpoint is in place, removed when the next run there starts): a launcher that
//! reports its own status instead of the workers' (torchrun exits 1 after forwarding
//! a signal) still lets `slurm/requeue.sh` tell a stop with a checkpoint from a
//! failure.
//!
//! Further signals during the save only set the flag again: the checkpoint is written
//! in a `.tmp-` folder and renamed into place, so even a SIGKILL then leaves the
//! previous checkpoints, and never a half-written one.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

use crate::error::{Error, Result};

/// Exit status of `pretrain` when a signal stopped it after a checkpoint: 75
/// (`EX_TEMPFAIL` of sysexits.h, "try again later"). The SLURM scripts requeue the
/// job on it; 0 means the run finished, anything else a failure.
pub const EXIT_PREEMPTED: u8 = 75;

/// File in the run folder saying the last run there stopped on request after writing
/// a checkpoint (JSON: step, checkpoint, reason, exit code).
pub const STOP_RECORD: &str = "stopped.json";

/// Record in `out_dir` that the run stopped after `step` for `reason`, its checkpoint
/// being `checkpoint` (written atomically, after the checkpoint).
pub fn write_stop_record(
    out_dir: &std::path::Path,
    step: usize,
    checkpoint: &std::path::Path,
    reason: &str,
) -> Result<()> {
    let value = serde_json::json!({
        "step": step,
        "checkpoint": checkpoint.file_name().map(|n| n.to_string_lossy().into_owned()),
        "reason": reason,
        "exit_code": EXIT_PREEMPTED,
        "resume": "--resume auto",
    });
    crate::io::write_json_atomic(&out_dir.join(STOP_RECORD), &value)
}

/// Remove the record of an earlier stop from `out_dir` (a run starts there: a failure
/// of this one must not read as a stop with a checkpoint).
pub fn clear_stop_record(out_dir: &std::path::Path) -> Result<()> {
    let path = out_dir.join(STOP_RECORD);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Msg(format!(
            "cannot remove {} (the record of the last stop): {e}; remove it by hand",
            path.display()
        ))),
    }
}

/// Set by the signal handlers; read at each step boundary.
static SIGNALLED: AtomicBool = AtomicBool::new(false);
/// The last signal received, and how many arrived.
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);
static SIGNAL_COUNT: AtomicUsize = AtomicUsize::new(0);

/// A request to stop a run at its next step boundary, with a checkpoint. Every
/// [`CheckedConfig`](super::CheckedConfig) carries one: by default the flag the
/// signal handlers set, which stays down unless they are installed; tests and
/// programs that embed the trainer give a run a flag of its own ([`StopFlag::new`])
/// and raise it with [`StopFlag::request`].
#[derive(Clone, Copy)]
pub struct StopFlag(&'static AtomicBool);

impl StopFlag {
    /// The flag SIGUSR1 and SIGTERM raise once [`install_signal_handlers`] has run.
    pub fn signals() -> Self {
        StopFlag(&SIGNALLED)
    }

    /// A flag of its own, down. It lives as long as the process (one byte), so that
    /// copies of it can go to every rank's thread.
    pub fn new() -> Self {
        StopFlag(Box::leak(Box::new(AtomicBool::new(false))))
    }

    /// Ask the run to stop after the step it is in.
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// What asked for the stop, for the log: `SIGUSR1`, `SIGTERM`, or `a stop request`.
    pub fn reason(&self) -> String {
        if std::ptr::eq(self.0, &SIGNALLED) {
            if let Some(name) = signal_name(LAST_SIGNAL.load(Ordering::SeqCst)) {
                return name.to_string();
            }
        }
        "a stop request".into()
    }
}

impl Default for StopFlag {
    fn default() -> Self {
        StopFlag::signals()
    }
}

impl PartialEq for StopFlag {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl std::fmt::Debug for StopFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StopFlag({})", self.requested())
    }
}

/// Signals received so far (by the handlers of [`install_signal_handlers`]).
pub fn signals_received() -> usize {
    SIGNAL_COUNT.load(Ordering::SeqCst)
}

fn signal_name(sig: i32) -> Option<&'static str> {
    match sig {
        libc::SIGUSR1 => Some("SIGUSR1"),
        libc::SIGTERM => Some("SIGTERM"),
        _ => None,
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    // Atomic stores only: nothing here may allocate, lock or print.
    LAST_SIGNAL.store(sig, Ordering::SeqCst);
    SIGNAL_COUNT.fetch_add(1, Ordering::SeqCst);
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// Make SIGUSR1 and SIGTERM raise [`StopFlag::signals`] instead of ending the
/// process. Interrupted system calls restart (`SA_RESTART`), so reads, writes and
/// waits of the run carry on.
pub fn install_signal_handlers() -> Result<()> {
    for sig in [libc::SIGUSR1, libc::SIGTERM] {
        // SAFETY: `action` is fully initialised (zeroed, then handler, flags and an
        // empty mask set) before sigaction reads it; the handler only touches atomics,
        // which is async-signal-safe.
        let ok = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut()) == 0
        };
        if !ok {
            return Err(Error::Msg(format!(
                "cannot install the handler of {}: {}",
                signal_name(sig).unwrap_or("a signal"),
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_flags_are_independent_of_each_other_and_of_the_signals() {
        let (a, b) = (StopFlag::new(), StopFlag::new());
        assert!(!a.requested() && !b.requested());
        a.request();
        assert!(a.requested() && !b.requested());
        assert_eq!(a.reason(), "a stop request");
        let copy = a;
        assert!(a != b && a == copy);
        assert!(StopFlag::default() == StopFlag::signals());
    }
}
