//! Finding the datasets of a raw-data folder.
//!
//! Every entry of the source folder is one dataset: a sub-folder (all `.txt` / `.jsonl`
//! files under it, `.gz` or not, in path order) or a single such file, named after the
//! folder or the file without its extensions. Hidden entries and other files (licences,
//! READMEs) are ignored. Inside a folder, files named `test`, `dev`, `valid` or
//! `validation` (optionally followed by `-`, `_` or `.` and more) form the validation
//! split. The source may also be a single document file: one dataset. Folders are
//! walked as [`super::files`] says: links followed, loops and non-regular document
//! files refused.

use std::path::{Path, PathBuf};

use super::files::{self, EntryKind, Listing, Walker};
use crate::error::{Error, Result};

/// One dataset's raw files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSource {
    pub name: String,
    /// The folder or file the dataset comes from.
    pub path: PathBuf,
    /// Training files, in order.
    pub train_files: Vec<PathBuf>,
    /// Validation files, in order (empty: split off `--val-fraction`).
    pub val_files: Vec<PathBuf>,
}

impl DatasetSource {
    /// Every file, training files first.
    pub fn files(&self) -> impl Iterator<Item = (&PathBuf, bool)> {
        let train = self.train_files.iter().map(|p| (p, false));
        train.chain(self.val_files.iter().map(|p| (p, true)))
    }
}

/// `name.txt.gz` -> `name`.
pub fn strip_extensions(file_name: &str) -> &str {
    let n = file_name.strip_suffix(".gz").unwrap_or(file_name);
    n.strip_suffix(".txt")
        .or_else(|| n.strip_suffix(".jsonl"))
        .unwrap_or(n)
}

/// Whether a file of a dataset folder holds validation documents.
pub fn is_validation_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let stem = strip_extensions(name).to_lowercase();
    ["validation", "valid", "test", "dev"].iter().any(|k| {
        stem == *k
            || stem
                .strip_prefix(k)
                .is_some_and(|rest| rest.starts_with(['-', '_', '.']))
    })
}

/// The datasets under `source`, sorted by name.
pub fn discover(source: &Path) -> Result<Vec<DatasetSource>> {
    if std::fs::symlink_metadata(source).is_err() {
        return Err(Error::missing(
            source,
            "--source-path must be a folder of datasets or a .txt/.jsonl(.gz) file",
        ));
    }
    let file_name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let single = |p: &Path| DatasetSource {
        name: strip_extensions(&file_name(p)).to_string(),
        path: p.to_path_buf(),
        train_files: vec![p.to_path_buf()],
        val_files: vec![],
    };
    let mut walker = Walker::new();
    let root_kind = files::classify(source)?;
    if root_kind != EntryKind::Folder {
        if root_kind != EntryKind::Document {
            return Err(Error::Usage(format!(
                "--source-path {}: not a .txt or .jsonl file (optionally .gz)",
                source.display()
            )));
        }
        return Ok(vec![single(source)]);
    }
    let mut out: Vec<DatasetSource> = Vec::new();
    walker.enter_root(source)?;
    for (p, kind) in walker.entries(source)? {
        let ds = if kind == EntryKind::Folder {
            let mut listing = Listing::default();
            walker.walk(&p, &mut listing)?;
            let files = listing.documents;
            if files.is_empty() {
                return Err(Error::Data(format!(
                    "dataset {}: no .txt or .jsonl files (optionally .gz) in it; add some or move the folder out of --source-path",
                    p.display()
                )));
            }
            let (val_files, train_files): (Vec<_>, Vec<_>) =
                files.into_iter().partition(|f| is_validation_file(f));
            if train_files.is_empty() {
                return Err(Error::Data(format!(
                    "dataset {}: only validation files (test/dev/validation); add training files",
                    p.display()
                )));
            }
            DatasetSource {
                name: file_name(&p),
                path: p,
                train_files,
                val_files,
            }
        } else if kind == EntryKind::Document {
            single(&p)
        } else {
            continue;
        };
        if let Some(prev) = out.iter().find(|d| d.name == ds.name) {
            return Err(Error::Data(format!(
                "two datasets named {:?}: {} and {}; rename one",
                ds.name,
                prev.path.display(),
                ds.path.display()
            )));
        }
        out.push(ds);
    }
    if out.is_empty() {
        return Err(Error::Data(format!(
            "{}: no datasets (sub-folders or .txt/.jsonl files, optionally .gz)",
            source.display()
        )));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_files_and_names() {
        assert!(is_validation_file(Path::new("a/test.txt")));
        assert!(is_validation_file(Path::new("a/validation.jsonl.gz")));
        assert!(is_validation_file(Path::new("a/dev-00.txt")));
        assert!(!is_validation_file(Path::new("a/devices.txt")));
        assert!(!is_validation_file(Path::new("a/train.txt")));
        assert_eq!(strip_extensions("x.jsonl.gz"), "x");
    }
}
