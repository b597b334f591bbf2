//! Finding and opening corpus files: the one way `prepare-data`, `dedup` and
//! `train-tokenizer` walk their input folders and open what they read.
//!
//! - A walk lists a folder's visible entries (hidden `.name` entries are skipped) in
//!   path order and goes down into sub-folders, following symbolic links.
//! - A folder reached a second time is refused, by device and inode: a link loop
//!   (`ds/self -> .`) would otherwise be followed until paths grow too long, and two
//!   links to one folder would read its documents twice.
//! - A document file (`.txt`, `.jsonl`, optionally `.gz`) must be a regular file, or a
//!   link to one: a FIFO blocks its reader forever, `/dev/zero` never ends, a socket
//!   cannot be read. They are refused by name before anything is read, and the
//!   opened file is checked again ([`crate::io::open_regular`]). Other files are
//!   listed as ignored and never opened, whatever they are.
//! - Small side files (a groups file, metadata.json) are read whole with
//!   [`crate::io::read_regular`], which refuses non-regular files and bounds the size.

use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
pub use crate::io::{
    bytes_text, kind_name, metadata, not_regular, open_regular, read_regular, regular_len,
};

/// What an entry of a walked folder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A folder (or a link to one) to walk into.
    Folder,
    /// A regular `.txt` / `.jsonl` (`.gz`) file, or a link to one.
    Document,
    /// Anything else: never opened.
    Other,
}

/// The document files under a folder and the other files found there.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Document files, in path order.
    pub documents: Vec<PathBuf>,
    /// Other files (not read), in path order.
    pub ignored: Vec<PathBuf>,
}

/// Walks folders, refusing any folder reached twice (see the module docs).
#[derive(Debug, Default)]
pub struct Walker {
    /// (device, inode) of every folder entered, and the path it was entered by.
    seen: HashMap<(u64, u64), PathBuf>,
    /// The folders being walked, outermost first.
    stack: Vec<(u64, u64)>,
}

impl Walker {
    /// A walker that has seen nothing yet.
    pub fn new() -> Self {
        Walker::default()
    }

    /// Start walking `dir` (metadata `meta`): refused if it was walked before.
    fn enter(&mut self, dir: &Path, meta: &Metadata) -> Result<()> {
        let id = (meta.dev(), meta.ino());
        if let Some(first) = self.seen.get(&id) {
            let why = if self.stack.contains(&id) {
                format!(
                    "a symbolic link loop: it leads back to {}, and would be walked again and again",
                    first.display()
                )
            } else {
                format!(
                    "the same folder as {} (two links to one folder): its documents would be read twice",
                    first.display()
                )
            };
            return Err(Error::Data(format!(
                "{}: {why}; remove the link",
                dir.display()
            )));
        }
        self.seen.insert(id, dir.to_path_buf());
        self.stack.push(id);
        Ok(())
    }

    /// The visible entries of the folder `dir`, in path order, each with its kind.
    /// Document files that are not regular files are refused here.
    pub fn entries(&mut self, dir: &Path) -> Result<Vec<(PathBuf, EntryKind)>> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .at(dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .at(dir)?;
        paths.retain(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_none_or(|n| n.starts_with('.'))
        });
        paths.sort();
        paths
            .into_iter()
            .map(|p| {
                let kind = classify(&p)?;
                Ok((p, kind))
            })
            .collect()
    }

    /// Every document file under the folder `dir` (recursively, in path order) into
    /// `out.documents`, the other files into `out.ignored`.
    pub fn walk(&mut self, dir: &Path, out: &mut Listing) -> Result<()> {
        let meta = metadata(dir)?;
        self.enter(dir, &meta)?;
        for (p, kind) in self.entries(dir)? {
            match kind {
                EntryKind::Folder => self.walk(&p, out)?,
                EntryKind::Document => out.documents.push(p),
                EntryKind::Other => out.ignored.push(p),
            }
        }
        self.stack.pop();
        Ok(())
    }

    /// Mark the folder `dir` as walked without listing it (a root whose entries the
    /// caller goes through itself with [`Walker::entries`]).
    pub fn enter_root(&mut self, dir: &Path) -> Result<()> {
        let meta = metadata(dir)?;
        self.enter(dir, &meta)
    }
}

/// `path` with every link resolved, as far as it exists: the longest existing
/// ancestor canonicalised, the rest appended. Lexical comparisons of such paths see
/// through links (`--output link/clean` with `link -> corpus` is inside the corpus).
pub fn resolve(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut rest = Vec::new();
    let mut base = abs.as_path();
    loop {
        if let Ok(c) = base.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (base.parent(), base.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                base = parent;
            }
            _ => return abs,
        }
    }
}

/// Whether `a` and `b` are the same folder or one lies inside the other, links
/// resolved (see [`resolve`]).
pub fn overlap(a: &Path, b: &Path) -> bool {
    let (a, b) = (resolve(a), resolve(b));
    a.starts_with(&b) || b.starts_with(&a)
}

/// What `path` is: a folder, a document file (refused unless regular) or other.
pub fn classify(path: &Path) -> Result<EntryKind> {
    let meta = metadata(path)?;
    let t = meta.file_type();
    if t.is_dir() {
        Ok(EntryKind::Folder)
    } else if is_document_file(path) {
        if t.is_file() {
            Ok(EntryKind::Document)
        } else {
            Err(not_regular(path, t))
        }
    } else {
        Ok(EntryKind::Other)
    }
}

/// The document files under `root` (recursively) and the other files found, in path
/// order, or `root` itself when it is a file (a document, else ignored).
pub fn list(root: &Path) -> Result<Listing> {
    let mut out = Listing::default();
    match classify(root)? {
        EntryKind::Folder => Walker::new().walk(root, &mut out)?,
        EntryKind::Document => out.documents.push(root.to_path_buf()),
        EntryKind::Other => out.ignored.push(root.to_path_buf()),
    }
    Ok(out)
}

/// Whether a path names a file we read (`.txt`, `.jsonl`, and `.gz` of them).
pub fn is_document_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let name = name.strip_suffix(".gz").unwrap_or(name);
    name.ends_with(".txt") || name.ends_with(".jsonl")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn lists_in_path_order_and_skips_hidden() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("b/c")).unwrap();
        std::fs::create_dir_all(r.join("a.b")).unwrap();
        for f in [
            "b/c/x.txt",
            "b/y.jsonl",
            "a.b/z.txt",
            "b/README",
            ".hidden.txt",
        ] {
            std::fs::write(r.join(f), "x\n").unwrap();
        }
        let l = list(r).unwrap();
        let rel = |v: &[PathBuf]| -> Vec<String> {
            v.iter()
                .map(|p| p.strip_prefix(r).unwrap().display().to_string())
                .collect()
        };
        assert_eq!(rel(&l.documents), ["a.b/z.txt", "b/c/x.txt", "b/y.jsonl"]);
        assert_eq!(rel(&l.ignored), ["b/README"]);
    }

    #[test]
    fn loops_twins_fifos_devices_and_dangling_links_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("ds");
        std::fs::create_dir_all(r.join("sub")).unwrap();
        std::fs::write(r.join("sub/a.txt"), "x\n").unwrap();
        symlink(".", r.join("sub/self")).unwrap();
        let e = list(&r).unwrap_err().to_string();
        assert!(e.contains("sub/self") && e.contains("loop"), "{e}");
        std::fs::remove_file(r.join("sub/self")).unwrap();

        symlink(r.join("sub"), r.join("twin")).unwrap();
        let e = list(&r).unwrap_err().to_string();
        assert!(e.contains("twin") && e.contains("read twice"), "{e}");
        std::fs::remove_file(r.join("twin")).unwrap();

        symlink("/dev/zero", r.join("zero.txt")).unwrap();
        let e = list(&r).unwrap_err().to_string();
        assert!(
            e.contains("zero.txt") && e.contains("character device"),
            "{e}"
        );
        let e = open_regular(&r.join("zero.txt")).unwrap_err().to_string();
        assert!(e.contains("character device"), "{e}");
        std::fs::remove_file(r.join("zero.txt")).unwrap();

        symlink("missing.txt", r.join("gone.txt")).unwrap();
        let e = list(&r).unwrap_err().to_string();
        assert!(
            e.contains("gone.txt") && e.contains("does not exist"),
            "{e}"
        );
        std::fs::remove_file(r.join("gone.txt")).unwrap();

        // A FIFO that is not a document file is listed as ignored, never opened.
        let st = std::process::Command::new("mkfifo")
            .arg(r.join("pipe"))
            .status()
            .unwrap();
        assert!(st.success());
        let l = list(&r).unwrap();
        assert_eq!(l.documents.len(), 1);
        assert_eq!(l.ignored, [r.join("pipe")]);
        std::fs::rename(r.join("pipe"), r.join("pipe.txt")).unwrap();
        let e = list(&r).unwrap_err().to_string();
        assert!(e.contains("pipe.txt") && e.contains("FIFO"), "{e}");
        let e = read_regular(&r.join("pipe.txt"), 10, "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("FIFO"), "{e}");
    }

    #[test]
    fn read_regular_bounds_the_size() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.json");
        std::fs::write(&p, vec![b'x'; 100]).unwrap();
        assert_eq!(read_regular(&p, 100, "a test").unwrap().len(), 100);
        let e = read_regular(&p, 99, "a test").unwrap_err().to_string();
        assert!(
            e.contains("f.json") && e.contains("too large for a test"),
            "{e}"
        );
    }
}
