//! The command line's shared pieces: the graceful stop on SIGINT / SIGTERM, and progress
//! (terminal bars, plain lines, JSON lines) with human units and ETAs.

pub mod progress;
pub mod ranks;

use bnlab::stop::Stop;
use bnlab::{Error, Result};
use clap::Args;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub use progress::{ProgressMode, Reporter, StudyMeter};
pub use ranks::Ranks;

/// Flags shared by every long-running command (`train`, `reproduce ...`), flattened into
/// their arguments.
#[derive(Args, Clone, Debug)]
pub struct RunControl {
    /// How progress is shown: auto or bar (a bar on stderr when it is a terminal, else plain),
    /// plain (one line per evaluation on stderr), or json (one JSON object per evaluation on
    /// stdout: run, step, steps, loss, accuracy, rate in steps/s, eta in seconds).
    #[arg(long, default_value = "auto", value_name = "auto|bar|plain|json")]
    pub progress: String,
}

impl RunControl {
    /// The progress mode asked for.
    pub fn mode(&self) -> Result<ProgressMode> {
        ProgressMode::parse(&self.progress)
    }
}

/// Install the stop handlers: the first SIGINT or SIGTERM asks runs to stop after their
/// current step (the returned [`Stop`] holds the signal number); a second one ends the
/// process at once with status 128 + signal.
pub fn install_stop() -> Result<Stop> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::flag;
    let stop = Stop::new();
    let armed = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        let fail = |e: std::io::Error| Error::config("signal handler", e.to_string());
        // Order matters: the shutdown checks `armed` before this signal sets it.
        flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&armed)).map_err(fail)?;
        flag::register(sig, Arc::clone(&armed)).map_err(fail)?;
        flag::register_usize(sig, stop.handle(), sig as usize).map_err(fail)?;
    }
    Ok(stop)
}

/// The exit status after a graceful stop: 128 + the signal (130 for SIGINT, 143 for SIGTERM).
pub fn stopped_status(stop: &Stop) -> u8 {
    match stop.reason() {
        0 => 1,
        r => (128 + r).min(255) as u8,
    }
}

/// A shell word for `s`: as is when it needs no quoting, else single-quoted.
pub fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
