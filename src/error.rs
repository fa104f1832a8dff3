//! One error type for the library. Every operation on user data (files, flags, checkpoints) returns
//! `Result<T>`; only the CLI turns an `Error` into a message and an exit status.

use std::path::PathBuf;

/// Everything that can go wrong, as one type; its `Display` is a one-line message naming the
/// file, flag or layer concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file (or directory) concerned.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A data file is malformed (IDX magic, dimensions, counts, labels, gzip stream), or
    /// missing (the message says where the files are looked for).
    #[error("{}: {msg}", path.display())]
    Data {
        /// The file or directory concerned.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A download failed or produced the wrong content.
    #[error("download of {url} failed: {msg}")]
    Download {
        /// The URL (or file name) that failed.
        url: String,
        /// Why, and how to use a local copy instead.
        msg: String,
    },
    /// A checkpoint is not a safetensors file, belongs to another model, or holds bad values.
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it (the first difference from the model, for another model's).
        msg: String,
    },
    /// A flag or setting has a value that makes no sense.
    #[error("invalid {name}: {msg}")]
    Config {
        /// The flag or setting (`--batch-size`, `labels`).
        name: String,
        /// The value and what is expected instead.
        msg: String,
    },
    /// A model file (or preset) that cannot be built: bad JSON, an unknown key or layer kind,
    /// shapes that do not fit; the message names the place in the file.
    #[error("model {model}: {msg}")]
    Model {
        /// The model file's path or the preset's name.
        model: String,
        /// What is wrong, and where in the file.
        msg: String,
    },
    /// Tensors whose shapes do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// Batch normalization in training mode needs at least two values per statistic.
    #[error(
        "batch normalization in training mode needs at least 2 values per statistic (got m = {m}); \
         use a batch size of 2 or more"
    )]
    BatchTooSmall {
        /// The values per statistic: batch size times positions per channel.
        m: usize,
    },
    /// The loss or a weight became NaN or infinite.
    #[error("training diverged at step {step}: {msg}")]
    Diverged {
        /// The step (counted from 1) whose loss or update was not finite.
        step: usize,
        /// Which of the two.
        msg: String,
    },
    /// Training stopped because a stop was requested (SIGINT or SIGTERM through
    /// [`crate::stop::Stop`]) after the step `step`; the state to resume from is written.
    #[error("stopped on request after step {step}")]
    Stopped {
        /// Steps done when the run stopped.
        step: usize,
    },
    /// Writing a report (CSV, JSON, figure) failed.
    #[error("report {}: {msg}", path.display())]
    Report {
        /// The file or directory of the report.
        path: PathBuf,
        /// What failed.
        msg: String,
    },
}

/// `std::result::Result` with bnlab's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    /// [`Error::Data`] for `path`.
    pub fn data(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            msg: msg.into(),
        }
    }
    /// [`Error::Config`] for the flag or setting `name`.
    pub fn config(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config {
            name: name.into(),
            msg: msg.into(),
        }
    }
    /// [`Error::Checkpoint`] for `path`.
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
