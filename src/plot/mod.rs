//! Convergence plots of one or several runs, and the best checkpoint of a run.
//!
//! `lit-claire plot RUN... --output curves.png` reads each run directory's `metrics.csv`
//! (training loss every logged step, validation loss on evaluation rows),
//! `validation_results.csv` (offline validation of every checkpoint on every dataset,
//! written by `lit-claire validate`) and its checkpoints' `training_state.json`, and draws
//! them on one chart: one colour per run, one line/marker style per kind of series,
//! against optimizer step, training tokens or wall-clock hours. The loss axis is
//! logarithmic when the shown range spans more than 3× (loss falling from 10 to 2 early
//! in training would otherwise flatten everything after it). Downstream task metrics
//! (`eval_results.csv` of `lit-claire evaluate`, and `pretrain --eval-tasks` columns of
//! `metrics.csv`) get a second panel under the losses, on the same x axis.
//!
//! With [`YAxis::Bpb`] (`plot --y bpb`) the y axis is validation bits per byte
//! (`val_bpb` of `metrics.csv`, `bits_per_byte` of `validation_results.csv`) instead of
//! the loss per token: runs whose tokenizers differ share that axis.
//!
//! Everything is read and checked before anything is written, and the image is written
//! to a temporary file renamed into place: a failed plot leaves no file behind.
//!
//! ```no_run
//! # use std::path::PathBuf;
//! use lit_claire::plot::{PlotOptions, XAxis, plot_runs};
//! let opts = PlotOptions { x: XAxis::Tokens, ..PlotOptions::new("curves.png") };
//! let summary = plot_runs(&[PathBuf::from("out/run-a"), PathBuf::from("out/run-b")], &opts)?;
//! eprintln!("wrote {}", summary.output.display());
//! # Ok::<(), lit_claire::Error>(())
//! ```

mod axis;
mod draw;
mod legend;
mod marker;
mod runs;
mod scene;
mod series;
mod tasks;

use std::io::Write;
use std::path::{Path, PathBuf};

use plotters::prelude::{BitMapBackend, IntoDrawingArea, SVGBackend};

pub use axis::{XAxis, YScale};
pub use runs::{
    BestCheckpoint, CheckpointInfo, LossSource, METRICS_FILE, MetricsRow, STATE_FILE,
    VALIDATION_FILE, ValidationRow, best_checkpoint, list_checkpoints, offline_means, read_metrics,
    read_validation_results,
};
pub use series::RunSeries;
pub use tasks::{EVAL_FILE, EvalRow, read_eval_results};

use crate::error::{Error, IoContext, Result};

/// Image format, from the output's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Svg,
}

impl ImageFormat {
    /// The format `path`'s extension names (`.png`, `.svg`, any case).
    pub fn from_path(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("png") => Ok(ImageFormat::Png),
            Some("svg") => Ok(ImageFormat::Svg),
            _ => Err(Error::Usage(format!(
                "--output {}: unknown image type{}; use a .png or .svg file name",
                path.display(),
                ext.map(|e| format!(" `.{e}`")).unwrap_or_default()
            ))),
        }
    }

    fn extension(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Svg => "svg",
        }
    }
}

/// What the y axis shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum YAxis {
    /// Training and validation loss, nats per token.
    #[default]
    Loss,
    /// Validation bits per byte (training has none).
    Bpb,
}

impl YAxis {
    /// Axis title, with its unit, on a linear and on a log scale.
    fn labels(self) -> (&'static str, &'static str) {
        match self {
            YAxis::Loss => ("loss (nats/token)", "loss (nats/token, log scale)"),
            YAxis::Bpb => (
                "validation bits per byte",
                "validation bits per byte (log scale)",
            ),
        }
    }

    fn title(self) -> &'static str {
        match self {
            YAxis::Loss => "Training and validation loss",
            YAxis::Bpb => "Validation bits per byte",
        }
    }
}

/// What to plot and how.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotOptions {
    /// Image to write; `.png` or `.svg`.
    pub output: PathBuf,
    pub x: XAxis,
    /// Loss per token, or bits per byte.
    pub y: YAxis,
    /// Lower end of the loss axis (default: from the data).
    pub min_loss: Option<f64>,
    /// Upper end of the loss axis (default: from the data).
    pub max_loss: Option<f64>,
    /// Image size in pixels.
    pub size: (u32, u32),
    /// Chart title (default: "Training and validation loss", or "Validation bits per
    /// byte").
    pub title: Option<String>,
}

impl PlotOptions {
    /// Defaults: loss against optimizer step, 1200×700, bounds from the data.
    pub fn new(output: impl Into<PathBuf>) -> Self {
        PlotOptions {
            output: output.into(),
            x: XAxis::Step,
            y: YAxis::Loss,
            min_loss: None,
            max_loss: None,
            size: (1200, 700),
            title: None,
        }
    }

    /// Every problem with the options, in one message.
    fn check(&self) -> Result<ImageFormat> {
        let mut problems = Vec::new();
        let format = ImageFormat::from_path(&self.output);
        if let Err(e) = &format {
            problems.push(e.to_string());
        }
        for (flag, v) in [("--min-loss", self.min_loss), ("--max-loss", self.max_loss)] {
            if v.is_some_and(|v| !v.is_finite()) {
                problems.push(format!("{flag} must be a finite number"));
            }
        }
        if let (Some(lo), Some(hi)) = (self.min_loss, self.max_loss)
            && lo >= hi
        {
            problems.push(format!("--min-loss {lo} must be below --max-loss {hi}"));
        }
        let (w, h) = self.size;
        if !(200..=10_000).contains(&w) || !(150..=10_000).contains(&h) {
            problems.push(format!(
                "image size {w}x{h} is out of range (200x150 to 10000x10000)"
            ));
        }
        if self.output.is_dir() {
            problems.push(format!("--output {} is a directory", self.output.display()));
        }
        if problems.is_empty() {
            format
        } else {
            Err(Error::Usage(problems.join("; ")))
        }
    }
}

/// What was drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotSummary {
    pub output: PathBuf,
    pub format: ImageFormat,
    pub x: XAxis,
    /// Shown x range.
    pub x_range: (f64, f64),
    /// Shown loss axis.
    pub y: YScale,
    pub runs: Vec<RunSummary>,
    /// Things a person should know (a run with nothing to draw yet, ...).
    pub warnings: Vec<String>,
}

/// What was drawn of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// Legend name (the run directory's name).
    pub name: String,
    pub dir: PathBuf,
    pub train_points: usize,
    pub online_val_points: usize,
    pub offline_points: usize,
    /// Offline validation datasets, by name.
    pub datasets: Vec<String>,
    /// Downstream tasks in the second panel, as `task metric`.
    pub tasks: Vec<String>,
}

/// Draw the loss curves of `runs` into `opts.output` (PNG or SVG by its extension).
///
/// Fails, writing nothing, on bad options, a missing run directory or `metrics.csv`, an
/// unreadable file, an x axis a run has no values for, or no loss at all to draw.
pub fn plot_runs(runs: &[PathBuf], opts: &PlotOptions) -> Result<PlotSummary> {
    let format = opts.check()?;
    if runs.is_empty() {
        return Err(Error::Usage(
            "give at least one run directory to plot".into(),
        ));
    }
    let names = legend_names(runs);
    let mut series = Vec::with_capacity(runs.len());
    let mut summaries = Vec::with_capacity(runs.len());
    let mut warnings = Vec::new();
    for (dir, name) in runs.iter().zip(names) {
        let s = load_run(dir, name, opts.x, opts.y)?;
        if s.train_raw.is_empty() && s.online_val.is_empty() && s.offline.is_empty() {
            warnings.push(format!("{}: no losses logged yet", dir.display()));
        }
        summaries.push(RunSummary {
            name: s.name.clone(),
            dir: dir.clone(),
            train_points: s.train_raw.len(),
            online_val_points: s.online_val.len(),
            offline_points: s.offline_points(),
            datasets: s.offline.keys().cloned().collect(),
            tasks: s.tasks.keys().map(|(t, m)| format!("{t} {m}")).collect(),
        });
        series.push(s);
    }

    let points = || series.iter().flat_map(RunSeries::points);
    let positive = opts.min_loss.is_none_or(|m| m > 0.0);
    let (mut xlo, mut xhi, mut ylo, mut yhi) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in points() {
        xlo = xlo.min(x);
        xhi = xhi.max(x);
        // Losses are positive; a zero or negative one (a broken log) is left off a log axis.
        if y > 0.0 || !positive {
            ylo = ylo.min(y);
            yhi = yhi.max(y);
        }
    }
    if xlo > xhi || ylo > yhi {
        let what = match opts.y {
            YAxis::Loss => "no loss values yet (metrics.csv rows without `loss` or `val_loss`)",
            YAxis::Bpb => {
                "no bits per byte yet (no `val_bpb` in metrics.csv, no `bits_per_byte` in validation_results.csv: runs of older versions have none; `lit-claire validate` scores their checkpoints again with --csv NEW.csv)"
            }
        };
        return Err(Error::Data(format!(
            "nothing to plot: {} {what}",
            if runs.len() == 1 {
                "the run has"
            } else {
                "the runs have"
            }
        )));
    }
    let y = YScale::new(ylo, yhi, opts.min_loss, opts.max_loss);
    let x_range = axis::x_range(xlo, xhi);
    let scene = scene::Scene {
        title: opts.title.clone().unwrap_or_else(|| opts.y.title().into()),
        y_labels: opts.y.labels(),
        runs: &series,
        x_axis: opts.x,
        x_range,
        x_ticks: axis::x_ticks(opts.x, x_range.0, x_range.1),
        y: y.clone(),
    };
    write_image(&opts.output, format, opts.size, &scene)?;
    Ok(PlotSummary {
        output: opts.output.clone(),
        format,
        x: opts.x,
        x_range,
        y,
        runs: summaries,
        warnings,
    })
}

/// Read one run directory into the series to draw.
fn load_run(dir: &Path, name: String, x: XAxis, y: YAxis) -> Result<RunSeries> {
    if !dir.is_dir() {
        return Err(Error::missing(
            dir,
            "give a run directory (the --out-dir of `lit-claire pretrain`)",
        ));
    }
    let metrics_path = dir.join(METRICS_FILE);
    if !metrics_path.is_file() {
        return Err(Error::missing(
            &metrics_path,
            "is this a run directory written by `lit-claire pretrain`? It logs there from its first step",
        ));
    }
    let metrics = read_metrics(&metrics_path)?;
    if x != XAxis::Step && !metrics.is_empty() {
        let has = |r: &MetricsRow| match x {
            XAxis::Tokens => r.tokens.is_some(),
            _ => r.elapsed_s.is_some_and(f64::is_finite),
        };
        if !metrics.iter().any(has) {
            return Err(Error::bad_file(
                &metrics_path,
                format!(
                    "no `{}` values to put on the x axis; plot with --x step",
                    x.column()
                ),
            ));
        }
    }
    let validation_path = dir.join(VALIDATION_FILE);
    let offline = if validation_path.is_file() {
        read_validation_results(&validation_path)?
    } else {
        Vec::new()
    };
    let checkpoints = list_checkpoints(dir)?;
    let eval_path = dir.join(EVAL_FILE);
    let evals = if eval_path.is_file() {
        read_eval_results(&eval_path)?
    } else {
        Vec::new()
    };
    let task_values = tasks::task_values(&metrics, &evals);
    let (metrics, offline) = match y {
        YAxis::Loss => (metrics, offline),
        YAxis::Bpb => bits_per_byte_only(metrics, offline),
    };
    let mut s = series::build(name, &metrics, &offline, &checkpoints, x);
    s.tasks = series::task_points(task_values, &metrics, &checkpoints, x);
    Ok(s)
}

/// The rows with bits per byte in place of the losses: validation rows keep theirs,
/// the rest (training, older rows) are left without.
fn bits_per_byte_only(
    metrics: Vec<MetricsRow>,
    offline: Vec<ValidationRow>,
) -> (Vec<MetricsRow>, Vec<ValidationRow>) {
    let metrics = metrics
        .into_iter()
        .map(|r| MetricsRow {
            loss: None,
            val_loss: r.val_bpb,
            ..r
        })
        .collect();
    let offline = offline
        .into_iter()
        .filter_map(|r| {
            Some(ValidationRow {
                loss: r.bits_per_byte?,
                ..r
            })
        })
        .collect();
    (metrics, offline)
}

/// Legend name of each run: its directory's name, or the path as given where two runs
/// share a name.
fn legend_names(runs: &[PathBuf]) -> Vec<String> {
    let base = |p: &PathBuf| {
        let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string())
    };
    let bases: Vec<String> = runs.iter().map(base).collect();
    bases
        .iter()
        .zip(runs)
        .map(|(b, p)| {
            if bases.iter().filter(|o| *o == b).count() > 1 {
                p.display().to_string()
            } else {
                b.clone()
            }
        })
        .collect()
}

/// Render into a temporary file beside `path` and rename it into place.
fn write_image(
    path: &Path,
    format: ImageFormat,
    size: (u32, u32),
    scene: &scene::Scene,
) -> Result<()> {
    let failed = |e: String| Error::Msg(format!("drawing {}: {e}", path.display()));
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).at(dir)?;
    // The bitmap backend encodes by the file's extension, so the temporary file keeps it.
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .suffix(&format!(".{}", format.extension()))
        .tempfile_in(dir)
        .at(dir)?;
    match format {
        ImageFormat::Svg => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
                draw::render(&root, scene).map_err(|e| failed(e.to_string()))?;
                root.present().map_err(|e| failed(e.to_string()))?;
            }
            tmp.write_all(svg.as_bytes()).at(path)?;
        }
        ImageFormat::Png => {
            let root = BitMapBackend::new(tmp.path(), size).into_drawing_area();
            draw::render(&root, scene).map_err(|e| failed(e.to_string()))?;
            root.present().map_err(|e| failed(e.to_string()))?;
        }
    }
    tmp.as_file().sync_all().at(path)?;
    // Temporary files are private (0600); an image is for everyone to look at.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644)).at(path)?;
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}
