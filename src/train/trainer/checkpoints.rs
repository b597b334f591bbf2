//! The trainer's checkpoints: saving at a step (in the background or not), the
//! writes in flight, and the ranks' agreement to stop on a signal.

use std::path::PathBuf;
use std::time::Instant;

use super::Trainer;
use crate::error::{Error, Result};
use crate::train::checkpoint::Snapshot;
use crate::train::saver::{Saver, Written};

impl Trainer {
    /// Write checkpoint `name`: every rank calls it (a sharded optimizer state is
    /// gathered first) and rank 0 writes it, in the background unless
    /// `--background-save false`; no rank goes on until rank 0 has its copy of the
    /// state (or, inline, the checkpoint is in place). Returns its folder on rank 0.
    pub(super) fn save(&mut self, name: &str) -> Result<Option<PathBuf>> {
        let start = Instant::now();
        let optimizer = self.runner.opt.state_tensors(&self.runner.strategy)?;
        // Never a checkpoint of broken weights (the last update can overflow them).
        if let Some(var_name) = self.runner.trained_finite()? {
            return Err(Error::Msg(format!(
                "step {}: {var_name} holds NaN or infinite values after the update; {name} was not saved. Lower --learning-rate (or set --grad-clip), then --resume auto continues from the last checkpoint",
                self.state.step
            )));
        }
        // With fsdp every rank takes part in gathering it for rank 0, unit by unit.
        let model = self.runner.checkpoint_model(self.lora.is_some())?;
        let dir = match &model {
            Some(m) => Some(self.write_checkpoint(name, m, &optimizer, start)?),
            None => None,
        };
        drop(model);
        self.runner.strategy.barrier()?;
        Ok(dir)
    }

    /// Rank 0's part of [`Trainer::save`]; `start` is when the save began.
    pub(super) fn write_checkpoint(
        &mut self,
        name: &str,
        model: &crate::model::Gpt,
        optimizer: &[(String, candle_core::Tensor)],
        start: Instant,
    ) -> Result<PathBuf> {
        self.state.loss_scaler = self.runner.scaler;
        let Some(mut saver) = self.saver.take() else {
            return Err(Error::Msg("only rank 0 writes checkpoints".into()));
        };
        let r = self.write_with(&mut saver, name, model, optimizer, start);
        self.saver = Some(saver);
        r
    }

    pub(super) fn write_with(
        &mut self,
        saver: &mut Saver,
        name: &str,
        model: &crate::model::Gpt,
        optimizer: &[(String, candle_core::Tensor)],
        start: Instant,
    ) -> Result<PathBuf> {
        let background = saver.background();
        // The previous write first: at most one copy of the state in flight.
        let before = Instant::now();
        let earlier = saver.wait()?;
        let previous_s = before.elapsed().as_secs_f64();
        self.noted(earlier)?;
        let before = Instant::now();
        let snapshot = Snapshot::take(
            model,
            self.lora.as_ref(),
            optimizer,
            &self.state,
            background,
        )?;
        let (bytes, copy_s) = (snapshot.bytes(), before.elapsed().as_secs_f64());
        let written = saver.save(snapshot, name)?;
        let dir = self.cfg.out_dir.join(name);
        let waited = start.elapsed().as_secs_f64();
        if background {
            self.note(&format!(
                "step {}: writing {} in the background; training waited {waited:.3} s ({previous_s:.3} s for the previous write, {copy_s:.3} s to copy {:.1} MB)",
                self.state.step,
                dir.display(),
                bytes as f64 / 1e6
            ))?;
        }
        for w in written {
            self.noted(Some(w))?;
        }
        if !background {
            self.note(&format!(
                "step {}: training waited {waited:.3} s for the checkpoint ({:.1} MB, written in place)",
                self.state.step,
                bytes as f64 / 1e6
            ))?;
        }
        Ok(dir)
    }

    /// Log a finished write: the checkpoint, and what its rotation removed.
    pub(super) fn noted(&mut self, written: Option<Written>) -> Result<()> {
        let Some(w) = written else { return Ok(()) };
        for removed in &w.removed {
            self.note(&format!("removed old checkpoint {}", removed.display()))?;
        }
        self.note(&format!(
            "saved {} (written in {:.3} s)",
            w.dir.display(),
            w.write_s
        ))
    }

    /// Rank 0: wait for the checkpoint being written, if any, and log it.
    pub(super) fn finish_writes(&mut self) -> Result<()> {
        let done = match self.saver.as_mut() {
            Some(s) => s.wait()?,
            None => None,
        };
        self.noted(done)
    }

    /// The last checkpoint of a run, on every rank: rank 0 waits for its write, and no
    /// rank returns before it is in place (a launcher may kill the other ranks as the
    /// first exits).
    pub(super) fn finish_checkpoint(&mut self) -> Result<()> {
        self.finish_writes()?;
        self.runner.strategy.barrier()
    }

    /// At a step boundary, on every rank: a background write that finished is logged
    /// (one that failed stops the run), and the ranks agree whether to stop here,
    /// which they do if any of them was signalled.
    pub(super) fn stop_here(&mut self) -> Result<bool> {
        let done = match self.saver.as_mut() {
            Some(s) => s.poll()?,
            None => None,
        };
        self.noted(done)?;
        let mine = self.cfg.stop().requested();
        let any = self.runner.strategy.all_reduce_sum(&[mine as u8 as f64])?;
        Ok(any[0] > 0.0)
    }
}
