//! The destination folder of `prepare-data`: created and checked writable, cleared
//! of what interrupted runs left, read for the datasets it already holds (and whether
//! each is whole), and written one dataset at a time: each is built in a
//! `.tmp-prepare-*` folder and renamed into place when complete.

use std::path::{Path, PathBuf};

use indicatif::ProgressBar;

use super::metadata::{DATASET_FILE, DatasetRecord, Settings, SourceFile};
use super::pipeline::{Ctx, tokenize_dataset};
use super::sources::DatasetSource;
use crate::error::{Error, IoContext, Result};
use crate::io::write_json_atomic;

/// Prefix of the folders a dataset is built in.
const TEMP_PREFIX: &str = ".tmp-prepare-";

/// Removes a folder, and the parents created with it, on drop if they are empty,
/// unless disarmed.
pub(super) struct RemoveIfEmpty(Vec<PathBuf>);

impl RemoveIfEmpty {
    /// Armed for `dir` and its missing parents (innermost first), those that do not
    /// exist yet.
    pub(super) fn new(dir: &Path) -> Self {
        let mut missing = Vec::new();
        let mut d = Some(dir);
        while let Some(p) = d {
            if p.as_os_str().is_empty() || std::fs::symlink_metadata(p).is_ok() {
                break;
            }
            missing.push(p.to_path_buf());
            d = p.parent();
        }
        RemoveIfEmpty(missing)
    }

    /// Keep the folder whatever happens next (the run completed).
    pub(super) fn disarm(&mut self) {
        self.0.clear();
    }
}

impl Drop for RemoveIfEmpty {
    fn drop(&mut self) {
        for dir in &self.0 {
            // Fails, as it should, when the folder holds anything.
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
}

/// Why the complete-looking dataset `dir` (record `rec`) cannot be kept: a shard
/// missing, or of another size than the record says. None when it is whole.
pub(super) fn damage(dir: &Path, rec: &DatasetRecord) -> Option<String> {
    for split in [&rec.train, &rec.validation] {
        let block = rec.settings.block_size;
        if let Err(e) = super::reader::Split::open(dir, split, block, rec.settings.document_starts)
        {
            return Some(e.to_string());
        }
    }
    None
}

/// Create the destination, check it is writable and remove leftovers of interrupted runs.
pub(super) fn prepare_destination(dest: &Path) -> Result<()> {
    let unwritable = |e: std::io::Error| {
        Error::Usage(format!(
            "cannot write to --destination-path {}: {e}; choose a writable folder",
            dest.display()
        ))
    };
    std::fs::create_dir_all(dest).map_err(unwritable)?;
    tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempdir_in(dest)
        .map_err(unwritable)?;
    for entry in std::fs::read_dir(dest).at(dest)? {
        let p = entry.at(dest)?.path();
        let stale = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(TEMP_PREFIX));
        if stale && p.is_dir() {
            eprintln!("removing {} left by an interrupted run", p.display());
            std::fs::remove_dir_all(&p).at(&p)?;
        }
    }
    Ok(())
}

/// The record of a complete dataset already in `dest`.
pub(super) fn existing_record(dest: &Path, name: &str) -> Result<Option<DatasetRecord>> {
    let dir = dest.join(name);
    let path = dir.join(DATASET_FILE);
    if !path.exists() {
        if dir.exists() {
            return Err(Error::Usage(format!(
                "{} exists and is not a prepared dataset; move it away or choose another --destination-path",
                dir.display()
            )));
        }
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).at(&path)?;
    Ok(serde_json::from_str(&text).ok())
}

/// Build one dataset in a temporary folder and rename it into place.
pub(super) fn build_dataset(
    ctx: &Ctx,
    dest: &Path,
    settings: &Settings,
    src: &DatasetSource,
    sources: Vec<SourceFile>,
    pb: &ProgressBar,
) -> Result<DatasetRecord> {
    let tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempdir_in(dest)
        .at(dest)?;
    let (train, validation, bad_lines) = tokenize_dataset(ctx, src, tmp.path(), pb)?;
    let rec = DatasetRecord {
        name: src.name.clone(),
        settings: settings.clone(),
        sources,
        bad_lines,
        train,
        validation,
    };
    let value = serde_json::to_value(&rec).expect("record serialises");
    write_json_atomic(&tmp.path().join(DATASET_FILE), &value)?;
    let target = dest.join(&src.name);
    if target.exists() {
        std::fs::remove_dir_all(&target).at(&target)?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, &target).map_err(|e| {
        let _ = std::fs::remove_dir_all(&kept);
        Error::io(&target, e)
    })?;
    Ok(rec)
}
