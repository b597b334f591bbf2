//! Writing files so that nothing half-written is ever left behind.
//!
//! Everything is written to a temporary file in the destination folder and renamed
//! into place: a reader sees the old file or the new one, never a torn one.

use std::collections::HashMap;
use std::fs::{File, FileType, Metadata};
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use candle_core::Tensor;

use crate::error::{Error, IoContext, Result};

/// A temporary file next to `path`, to be renamed onto it.
pub fn temp_beside(path: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).at(dir)?;
    tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .at(dir)
}

/// Rename a finished temporary file onto `path`, readable by all like a file written
/// the usual way (tempfile creates files private to their owner).
pub fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644)).at(path)?;
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Replace `path` with `bytes` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = temp_beside(path)?;
    tmp.write_all(bytes).at(path)?;
    tmp.as_file().sync_all().at(path)?;
    persist(tmp, path)
}

/// Save named tensors as a safetensors file (metadata `format: pt`, plus `extra`),
/// atomically.
pub fn save_safetensors_atomic(
    path: &Path,
    tensors: &[(String, Tensor)],
    extra: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut meta = extra.unwrap_or_default();
    meta.insert("format".into(), "pt".into());
    let tmp = temp_beside(path)?;
    let data: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(n, t)| t.contiguous().map(|t| (n.as_str(), t)))
        .collect::<candle_core::Result<_>>()?;
    safetensors::serialize_to_file(data, Some(meta), tmp.path())
        .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))?;
    persist(tmp, path)
}

/// Write `text` as JSON-pretty `value` atomically.
pub fn write_json_atomic(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value).expect("JSON values serialise");
    s.push('\n');
    write_atomic(path, s.as_bytes())
}

// ------------------------------------------------------------------ regular files

/// A one-word name of a file type, for messages.
pub fn kind_name(t: FileType) -> &'static str {
    if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a folder"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

pub fn not_regular(path: &Path, t: FileType) -> Error {
    let via = match std::fs::read_link(path) {
        Ok(target) => format!(" (a link to {})", target.display()),
        Err(_) => String::new(),
    };
    Error::Data(format!(
        "{}: {}{via}, not a regular file: it could block or never end; corpus files must be regular files, so remove it or replace it with the file it stands for",
        path.display(),
        kind_name(t)
    ))
}

/// The metadata of `path`, following links; a dangling link is named as such.
pub fn metadata(path: &Path) -> Result<Metadata> {
    std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound
            && let Ok(target) = std::fs::read_link(path)
        {
            return Error::Data(format!(
                "{}: a symbolic link to {}, which does not exist; remove the link or restore its target",
                path.display(),
                target.display()
            ));
        }
        if e.kind() == std::io::ErrorKind::NotFound {
            return Error::missing(path, "no such file or folder");
        }
        if e.raw_os_error() == Some(40) {
            // ELOOP: links that point at each other.
            return Error::Data(format!(
                "{}: a loop of symbolic links; remove the link",
                path.display()
            ));
        }
        Error::io(path, e)
    })
}

/// The length of `path`, which must be a regular file (or a link to one).
pub fn regular_len(path: &Path) -> Result<u64> {
    let meta = metadata(path)?;
    if !meta.file_type().is_file() {
        return Err(not_regular(path, meta.file_type()));
    }
    Ok(meta.len())
}

/// Open `path` for reading if it is a regular file; refuses FIFOs (checked before
/// opening, which would block), devices and sockets.
pub fn open_regular(path: &Path) -> Result<File> {
    regular_len(path)?;
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::missing(path, "no such input file"),
        _ => Error::io(path, e),
    })?;
    // The path may have changed between the check and the open.
    let t = file.metadata().at(path)?.file_type();
    if !t.is_file() {
        return Err(not_regular(path, t));
    }
    Ok(file)
}

/// The bytes of the regular file `path`, refused when longer than `max` bytes
/// (`what` names the file's role in that message).
pub fn read_regular(path: &Path, max: u64, what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = open_regular(path)?;
    let mut bytes = Vec::new();
    // One byte more than allowed tells a file that is too long without reading it all.
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .at(path)?;
    if bytes.len() as u64 > max {
        return Err(Error::bad_file(
            path,
            format!(
                "larger than {}, too large for {what}; check that it is the right file",
                bytes_text(max)
            ),
        ));
    }
    Ok(bytes)
}

/// `n` bytes for a person: "64 MiB", "1.5 KiB", "100 bytes".
pub fn bytes_text(n: u64) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} bytes")
    }
}
