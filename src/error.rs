//! One error type for the library. Every operation on user data (files, flags, checkpoints) returns
//! `Result<T>`; only the CLI turns an `Error` into a message and an exit status.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A data file is malformed (IDX magic, dimensions, counts, labels, gzip stream).
    #[error("{}: {msg}", path.display())]
    Data { path: PathBuf, msg: String },
    /// A download failed or produced the wrong content.
    #[error("download of {url} failed: {msg}")]
    Download { url: String, msg: String },
    /// A checkpoint is not a safetensors file, belongs to another model, or holds bad values.
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },
    /// A flag or setting has a value that makes no sense.
    #[error("invalid {name}: {msg}")]
    Config { name: String, msg: String },
    /// A model file (or preset) that cannot be built: bad JSON, an unknown key or layer kind,
    /// shapes that do not fit; the message names the place in the file.
    #[error("model {model}: {msg}")]
    Model { model: String, msg: String },
    /// Tensors whose shapes do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// Batch normalization in training mode needs at least two values per statistic.
    #[error(
        "batch normalization in training mode needs at least 2 values per statistic (got m = {m}); \
         use a batch size of 2 or more"
    )]
    BatchTooSmall { m: usize },
    /// The loss or a weight became NaN or infinite.
    #[error("training diverged at step {step}: {msg}")]
    Diverged { step: usize, msg: String },
    /// Writing a report (CSV, JSON, figure) failed.
    #[error("report {}: {msg}", path.display())]
    Report { path: PathBuf, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn data(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn config(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config {
            name: name.into(),
            msg: msg.into(),
        }
    }
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
