//! The one error type of the Rust core. `lib.rs` maps it to Python: I/O -> `OSError`, malformed
//! files -> `KerasSaveError` (a `ValueError`; `BadKerasZipFile` for the zip itself), bad calls -> `ValueError`.
//!
//! Paths are kept as `PathBuf`, never as a lossy string: the `OSError` a user sees names the file
//! exactly (non-UTF-8 bytes included); only the message text shows it through `Path::display`.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused a read or a write.
    #[error("{}: {op} failed: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The file's bytes are not what the container format requires: truncated, corrupted or hostile.
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    /// The zip container itself is malformed (stock Keras raises `zipfile.BadZipFile` for these).
    #[error("{}: {msg}", path.display())]
    Zip { path: PathBuf, msg: String },
    /// The caller asked for something that cannot be done (overlapping buffers, a member still open, ...).
    #[error("{0}")]
    Argument(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, op: &'static str, source: io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_owned(),
            op,
            source,
        }
    }

    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_owned(),
            msg: msg.into(),
        }
    }

    pub fn zip(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Zip {
            path: path.as_ref().to_owned(),
            msg: msg.into(),
        }
    }
}
