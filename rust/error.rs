//! The one error type of the Rust core. `lib.rs` maps it to Python: I/O -> `OSError`, malformed
//! files -> `KerasSaveError` (a `ValueError`; `BadKerasZipFile` for the zip itself), bad calls -> `ValueError`.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused a read or a write.
    #[error("{path}: {op} failed: {source}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The file's bytes are not what the container format requires: truncated, corrupted or hostile.
    #[error("{path}: {msg}")]
    Format { path: String, msg: String },
    /// The zip container itself is malformed (stock Keras raises `zipfile.BadZipFile` for these).
    #[error("{path}: {msg}")]
    Zip { path: String, msg: String },
    /// The caller asked for something that cannot be done (overlapping buffers, a member still open, ...).
    #[error("{0}")]
    Argument(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: &str, op: &'static str, source: io::Error) -> Self {
        Error::Io {
            path: path.to_owned(),
            op,
            source,
        }
    }

    pub fn format(path: &str, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.to_owned(),
            msg: msg.into(),
        }
    }

    pub fn zip(path: &str, msg: impl Into<String>) -> Self {
        Error::Zip {
            path: path.to_owned(),
            msg: msg.into(),
        }
    }
}
