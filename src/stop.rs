//! A request to stop, shared between whoever asks (the command line's SIGINT / SIGTERM handler)
//! and the training loops that honour it: a run finishes its current step, writes its state
//! and returns [`crate::Error::Stopped`].
//!
//! The library installs no signal handler; `bnlab`'s `main.rs` does (with signal-hook), and a
//! program using the library can call [`Stop::request`] from wherever it likes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A cloneable stop request. The value is the reason: 0 while no stop is asked for, else a
/// caller-chosen non-zero code (the command line stores the signal number).
#[derive(Clone, Debug, Default)]
pub struct Stop(Arc<AtomicUsize>);

impl Stop {
    /// A stop that nobody has asked for yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The shared counter itself, for a signal handler that stores the signal number
    /// (`signal_hook::flag::register_usize`).
    pub fn handle(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.0)
    }

    /// Ask every run holding this stop to stop after its current step, for `reason` (non-zero;
    /// 0 is taken as 1).
    pub fn request(&self, reason: usize) {
        self.0.store(reason.max(1), Ordering::SeqCst);
    }

    /// True once a stop has been asked for.
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::Relaxed) != 0
    }

    /// The reason given to [`Stop::request`] (0: none).
    pub fn reason(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}
