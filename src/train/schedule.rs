//! Learning-rate schedules: linear warmup, then cosine, cosine with hard restarts,
//! linear decay or constant.
//!
//! Optimizer step `s` (0-based) of `total` uses `lr(s)`:
//!
//! ```text
//! s <  warmup:  lr = max · (s + 1) / warmup
//! s >= warmup:  p = (s − warmup) / (total − warmup)          progress in [0, 1]
//!   cosine:           min + (max − min) · ½(1 + cos πp)
//!   cosine-restarts:  min + (max − min) · ½(1 + cos π·frac(p·restarts))   (p < 1)
//!   linear:           max + (min − max) · p
//!   constant:         max
//! ```
//! Past `total` the cosine and linear kinds stay at `min`.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Shape of the decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    Cosine,
    CosineRestarts,
    Linear,
    Constant,
}

/// A learning-rate schedule over a known number of steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub max_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    /// Cycles of `cosine-restarts`.
    pub restarts: usize,
}

impl Schedule {
    pub fn new(
        kind: ScheduleKind,
        max_lr: f64,
        min_lr: f64,
        warmup_steps: usize,
        total_steps: usize,
        restarts: usize,
    ) -> Result<Self> {
        let problems = Self::problems(kind, max_lr, min_lr, restarts);
        if !problems.is_empty() {
            return Err(Error::Usage(problems.join("; ")));
        }
        Ok(Schedule {
            kind,
            max_lr,
            min_lr,
            warmup_steps,
            total_steps,
            restarts,
        })
    }

    /// What is wrong with these values, flag by flag (empty when nothing): what
    /// [`TrainConfig::checked`](super::TrainConfig::checked) reports before any work.
    /// A constant schedule never reaches `min_lr`, so it is not compared then.
    pub fn problems(kind: ScheduleKind, max_lr: f64, min_lr: f64, restarts: usize) -> Vec<String> {
        let mut out = Vec::new();
        let max_ok = max_lr.is_finite() && max_lr > 0.0;
        if !max_ok {
            out.push(format!(
                "--learning-rate {max_lr} must be a positive number"
            ));
        }
        // Compared with a valid --learning-rate only (else that is the one problem).
        let min_ok = min_lr.is_finite() && min_lr >= 0.0 && (min_lr <= max_lr || !max_ok);
        if kind != ScheduleKind::Constant && !min_ok {
            out.push(format!(
                "--min-lr {min_lr} must be between 0 and --learning-rate {max_lr}"
            ));
        }
        if kind == ScheduleKind::CosineRestarts && restarts == 0 {
            out.push("--restarts must be at least 1 with cosine-restarts".into());
        }
        out
    }

    /// Learning rate of optimizer step `s` (0-based).
    pub fn lr(&self, s: usize) -> f64 {
        if s < self.warmup_steps {
            return self.max_lr * (s + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let p = (s - self.warmup_steps) as f64 / span as f64;
        let (max, min) = (self.max_lr, self.min_lr);
        let cosine = |x: f64| min + (max - min) * 0.5 * (1.0 + (std::f64::consts::PI * x).cos());
        match self.kind {
            ScheduleKind::Constant => max,
            _ if p >= 1.0 => min,
            ScheduleKind::Cosine => cosine(p),
            ScheduleKind::CosineRestarts => cosine((p * self.restarts as f64).fract()),
            ScheduleKind::Linear => max + (min - max) * p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn warmup_then_cosine_to_min() {
        let s = Schedule::new(ScheduleKind::Cosine, 1.0, 0.1, 10, 110, 1).unwrap();
        assert!(close(s.lr(0), 0.1));
        assert!(close(s.lr(9), 1.0));
        assert!(close(s.lr(10), 1.0));
        assert!(close(s.lr(60), 0.55));
        assert!(s.lr(109) > 0.1 && s.lr(109) < 0.101);
        assert!(close(s.lr(110), 0.1));
        assert!(close(s.lr(1000), 0.1));
    }

    #[test]
    fn restarts_jump_back_to_max() {
        let s = Schedule::new(ScheduleKind::CosineRestarts, 1.0, 0.0, 0, 100, 2).unwrap();
        assert!(close(s.lr(0), 1.0));
        assert!(close(s.lr(25), 0.5));
        assert!(s.lr(49) < 0.01);
        assert!(close(s.lr(50), 1.0));
        assert!(close(s.lr(75), 0.5));
    }

    #[test]
    fn linear_and_constant() {
        let l = Schedule::new(ScheduleKind::Linear, 1.0, 0.0, 0, 10, 1).unwrap();
        assert!(close(l.lr(5), 0.5));
        let c = Schedule::new(ScheduleKind::Constant, 0.5, 0.0, 2, 10, 1).unwrap();
        assert!(close(c.lr(0), 0.25));
        assert!(close(c.lr(7), 0.5));
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Schedule::new(ScheduleKind::Cosine, 0.0, 0.0, 0, 10, 1).is_err());
        assert!(Schedule::new(ScheduleKind::Cosine, 1e-3, 1e-2, 0, 10, 1).is_err());
        assert!(Schedule::new(ScheduleKind::CosineRestarts, 1e-3, 0.0, 0, 10, 0).is_err());
        assert!(Schedule::new(ScheduleKind::Cosine, f64::NAN, 0.0, 0, 10, 1).is_err());
    }

    /// `--lr-schedule constant --learning-rate 1e-5` is accepted although the default
    /// `--min-lr` (3e-5) is larger: a constant schedule never uses it.
    #[test]
    fn constant_schedule_ignores_min_lr() {
        let c = Schedule::new(ScheduleKind::Constant, 1e-5, 3e-5, 0, 10, 1).unwrap();
        assert!(close(c.lr(5), 1e-5));
        assert!(Schedule::new(ScheduleKind::Linear, 1e-5, 3e-5, 0, 10, 1).is_err());
    }
}
