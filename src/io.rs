//! Writing files so that nothing half-written is ever left behind.
//!
//! Everything is written to a temporary file in the destination folder and renamed
//! into place: a reader sees the old file or the new one, never a torn one.

use std::collections::HashMap;
use std::io::Write;
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
