//! Every logger of a run (`--logger csv,tensorboard`): `metrics.csv`
//! ([`super::metrics`]) always, and TensorBoard event files ([`super::tensorboard`])
//! when asked; the trainer hands each row to [`Loggers::write`].

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::metrics::{MetricsRow, MetricsWriter};
use super::tensorboard::TensorBoardWriter;
use crate::error::Result;

/// Where metrics rows go (`--logger csv,tensorboard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Logger {
    /// `RUN/metrics.csv` (always on: `plot`, the tests and resume read it).
    Csv,
    /// TensorBoard event files `RUN/events.out.tfevents.*`.
    Tensorboard,
}

/// Every logger of a run; the trainer hands each row to [`Loggers::write`].
pub struct Loggers {
    csv: MetricsWriter,
    tensorboard: Option<TensorBoardWriter>,
}

impl Loggers {
    /// Open the loggers of `run`. When resuming at the checkpoint of step `step` after
    /// `tokens` tokens (`resume`), every logger's file drops what came after it, so the
    /// resumed run appends without duplicate steps. `tasks`: the `task/metric` names
    /// of the downstream tasks scored at each validation.
    pub fn open(
        run: &Path,
        datasets: &[String],
        tasks: &[String],
        loggers: &[Logger],
        resume: Option<(usize, u64)>,
    ) -> Result<Self> {
        let csv = MetricsWriter::open(run, datasets, tasks, resume.map(|(s, _)| s))?;
        let tensorboard = if loggers.contains(&Logger::Tensorboard) {
            Some(TensorBoardWriter::open(run, datasets, resume)?.with_tasks(tasks))
        } else {
            // Older event files (of a segment logged with tensorboard) still lose the
            // steps this run will compute again.
            TensorBoardWriter::cut_back(run, resume)?;
            None
        };
        Ok(Loggers { csv, tensorboard })
    }

    pub fn write(&mut self, row: &MetricsRow) -> Result<()> {
        self.csv.write(row)?;
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.write(row)?;
        }
        Ok(())
    }
}
