//! The library's error type.
//!
//! Every error is meant to be read by a person on one line: it names the file, tensor,
//! flag or dataset at fault and, where there is one, the fix. The binary prints it and
//! exits non-zero; library callers can match on the variant.

use std::path::{Path, PathBuf};

/// Errors of lit-claire.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file that must exist does not.
    #[error("{} not found: {hint}", path.display())]
    MissingFile { path: PathBuf, hint: String },
    /// A file exists but its content is not what we expect (bad JSON, bad header, ...).
    #[error("{}: {msg}", path.display())]
    BadFile { path: PathBuf, msg: String },
    /// A model configuration we cannot map onto our decoder.
    #[error("{0}")]
    Config(String),
    /// A weight tensor missing or of the wrong shape.
    #[error("{0}")]
    Weights(String),
    /// Invalid user input: a flag, a prompt, a combination of options.
    #[error("{0}")]
    Usage(String),
    /// A problem with a dataset.
    #[error("{0}")]
    Data(String),
    /// An error from the tensor library.
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
    /// Anything else, already phrased for a person.
    #[error("{0}")]
    Msg(String),
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A file whose content is wrong.
    pub fn bad_file(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> Self {
        Error::BadFile {
            path: path.as_ref().to_path_buf(),
            msg: msg.to_string(),
        }
    }

    /// A missing file, with what to do about it.
    pub fn missing(path: impl AsRef<Path>, hint: impl Into<String>) -> Self {
        Error::MissingFile {
            path: path.as_ref().to_path_buf(),
            hint: hint.into(),
        }
    }
}

impl From<tokenizers::Error> for Error {
    fn from(e: tokenizers::Error) -> Self {
        Error::Msg(format!("tokenizer: {e}"))
    }
}

/// Attach a path to `std::io` results.
pub trait IoContext<T> {
    /// Turn an `io::Error` into [`Error::Io`] naming `path`.
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, std::io::Error> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
