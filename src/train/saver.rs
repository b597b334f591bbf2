//! Checkpoints written by a thread while training goes on (`--background-save`, on by
//! default).
//!
//! ```text
//! step k   │ save: gather optimizer state ─ copy to host ─┐ step k+1 │ step k+2 │ ...
//! writer   │                                             └─ write .tmp-step-k, rename, rotate ─┘
//! ```
//!
//! Training waits only for the copy ([`Snapshot::take`] with `copy`): the optimizer
//! updates weights and moments in place, so the writer needs tensors of its own. The
//! next save, the end of the run (and a stop on a signal) wait for the write in
//! progress; only one is ever in flight, so at most one extra copy of the state lives
//! in host memory. A failed write (a full disk) surfaces at the next step boundary as
//! one line naming the checkpoint and the newest complete one, which is untouched.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;

use super::checkpoint::{self, Snapshot};
use crate::error::{Error, Result};

/// A checkpoint written, and what its rotation removed.
#[derive(Debug)]
pub struct Written {
    pub dir: PathBuf,
    pub removed: Vec<PathBuf>,
    /// Seconds the write and rename took.
    pub write_s: f64,
}

/// Rank 0's checkpoint writer: at most one write in flight.
pub struct Saver {
    run: PathBuf,
    keep: Option<usize>,
    background: bool,
    pending: Option<(String, JoinHandle<Result<Written>>)>,
}

impl Saver {
    /// Checkpoints of the run folder `run`, the newest `keep` step ones kept (and the
    /// best), written by a thread when `background`.
    pub fn new(run: &Path, keep: Option<usize>, background: bool) -> Self {
        Saver {
            run: run.to_path_buf(),
            keep,
            background,
            pending: None,
        }
    }

    /// Whether checkpoints are written by a thread (and so must be taken as copies).
    pub fn background(&self) -> bool {
        self.background
    }

    /// Write `snapshot` as checkpoint `name`: in a thread when writing in the
    /// background ([`Saver::poll`] or [`Saver::wait`] gives its result), else now. A
    /// write still in flight is waited for first. Returns the writes this call
    /// finished: that earlier one, and this one when written now.
    pub fn save(&mut self, snapshot: Snapshot, name: &str) -> Result<Vec<Written>> {
        let mut done: Vec<Written> = self.wait()?.into_iter().collect();
        let (run, keep, owned) = (self.run.clone(), self.keep, name.to_string());
        if !self.background {
            done.push(write(&run, keep, &snapshot, owned)?);
            return Ok(done);
        }
        let thread = std::thread::Builder::new()
            .name(format!("save {name}"))
            .spawn(move || write(&run, keep, &snapshot, owned))
            .map_err(|e| Error::Msg(format!("cannot start the checkpoint writer: {e}")))?;
        self.pending = Some((name.to_string(), thread));
        Ok(done)
    }

    /// The write in flight, once finished (without waiting).
    pub fn poll(&mut self) -> Result<Option<Written>> {
        match &self.pending {
            Some((_, t)) if t.is_finished() => self.wait(),
            _ => Ok(None),
        }
    }

    /// Wait for the write in flight, if any.
    pub fn wait(&mut self) -> Result<Option<Written>> {
        let Some((name, thread)) = self.pending.take() else {
            return Ok(None);
        };
        match thread.join() {
            Ok(r) => r.map(Some),
            Err(_) => Err(Error::Msg(format!(
                "the writer of checkpoint {} panicked; --resume auto continues from the newest complete checkpoint",
                self.run.join(name).display()
            ))),
        }
    }
}

/// Write `snapshot` as `run/name`, then rotate; a failure is one line naming the
/// checkpoint, the cause, and the newest complete checkpoint left.
fn write(run: &Path, keep: Option<usize>, snapshot: &Snapshot, name: String) -> Result<Written> {
    let start = Instant::now();
    let dir = snapshot
        .write(run, &name)
        .map_err(|e| not_written(run, &name, &e))?;
    let write_s = start.elapsed().as_secs_f64();
    let removed = match keep {
        Some(k) => checkpoint::rotate(run, k)?,
        None => Vec::new(),
    };
    Ok(Written {
        dir,
        removed,
        write_s,
    })
}

/// `checkpoint RUN/step-N was not written (cause); RUN/step-M, the newest complete
/// checkpoint, is intact: ...`.
fn not_written(run: &Path, name: &str, e: &Error) -> Error {
    let newest = checkpoint::list(run)
        .ok()
        .and_then(|l| l.into_iter().next_back())
        .map(|(p, s)| format!("{} (step {}), the newest complete checkpoint, is intact: free space, then --resume auto continues from it", p.display(), s.step))
        .unwrap_or_else(|| {
            "no earlier checkpoint of this run is complete: free space and start again".into()
        });
    Error::Msg(format!(
        "checkpoint {} was not written ({e}); {newest}",
        run.join(name).display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_names_the_checkpoint_and_the_newest_complete_one() {
        let run = tempfile::tempdir().unwrap();
        let e = not_written(
            run.path(),
            "step-00000006",
            &Error::Msg("No space left on device (os error 28)".into()),
        )
        .to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.starts_with(&format!(
                "checkpoint {} was not written (No space left",
                run.path().join("step-00000006").display()
            )),
            "{e}"
        );
        assert!(e.contains("no earlier checkpoint"), "{e}");
    }
}
