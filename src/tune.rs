//! The thread count of a training run, chosen while it runs.
//!
//! On a shared machine, running a step on two threads is sometimes slower than on one: for
//! seconds at a time the host runs this machine's virtual CPUs so that the threads of a
//! fork-join step keep waiting for each other (BENCHMARKS.md: in such periods mlp-fig1-bn ran
//! at 2400-2900 steps/s on two threads and 3470-3670 on one, against 5000 and 3700 outside
//! them). Results do not depend on the thread count (every kernel splits its work so that the
//! arithmetic is the same), so a run may change it between any two steps. When the user does
//! not fix the count (`--threads`, `$BNLAB_THREADS`), [`ThreadTuner`] times windows of steps
//! and now and then one window at another count (half the current one, or back up towards the
//! most), and moves to it when that window ran faster. Two windows much slower than the recent
//! ones start such a probe at once, so a collapse is left within a few windows.

/// Seconds a timed window should last at least: long enough to average a step's noise.
const WINDOW_SECS: f64 = 0.05;
/// The most steps in a window.
const MAX_WINDOW: usize = 4096;
/// Windows between probes, at first and after a probe that moved the count.
const MIN_INTERVAL: usize = 4;
/// The most windows between probes for more threads (after a probe that did not help, the
/// interval doubles): after a collapse, the way back is tried every few seconds.
const MAX_INTERVAL_UP: usize = 64;
/// Windows between probes for fewer threads, once the first one did not help (then doubling
/// up to `MAX_INTERVAL_DOWN`): a collapse is caught by the drop of the rate, so these are
/// rare. A probe window on half the threads costs at most about one window (a step on one of
/// two cores takes up to twice as long), so they cost at most about 1.5% at first, and less
/// and less.
const INTERVAL_DOWN: usize = 64;
/// The most windows between probes for fewer threads.
const MAX_INTERVAL_DOWN: usize = 512;
/// A probe moves the count when its window ran this much faster.
const MARGIN: f64 = 1.05;
/// Two windows in a row below this share of the recent best rate at the current count start a
/// probe.
const DROP: f64 = 0.8;

/// Chooses among `1..=max` threads by timing windows of training steps (see the module doc).
#[derive(Clone, Debug)]
pub struct ThreadTuner {
    max: usize,
    current: usize,
    /// The count the steps of the window being timed run on (`current`, or the one probed).
    count: usize,
    /// Steps per window: from one, doubled until a window lasts `WINDOW_SECS` (one step of a
    /// ResNet, hundreds of the MLP's), so that a probe costs little however long a step is.
    window: usize,
    steps: usize,
    secs: f64,
    /// The last whole window's rate (steps per second) at `current`.
    last_rate: f64,
    /// The best window rate at `current` since the count last changed, slowly forgotten.
    recent_best: f64,
    probing: bool,
    /// The last window fell below `DROP` of the recent best.
    low: bool,
    windows_since_probe: usize,
    interval: usize,
    /// Steps run on each count (`steps_at[n - 1]` on `n` threads).
    steps_at: Vec<u64>,
}

impl ThreadTuner {
    /// A tuner over `1..=max` threads, starting on `max`.
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        ThreadTuner {
            max,
            current: max,
            count: max,
            window: 1,
            steps: 0,
            secs: 0.0,
            last_rate: 0.0,
            recent_best: 0.0,
            probing: false,
            low: false,
            windows_since_probe: 0,
            interval: MIN_INTERVAL,
            steps_at: vec![0; max],
        }
    }

    /// A tuner that moves to the next count (`max, max - 1, ..., 1, max, ...`) after every
    /// step, whatever the times: for tests that the count may change between any two steps.
    pub fn cycling(max: usize) -> Self {
        ThreadTuner {
            window: 0,
            ..ThreadTuner::new(max)
        }
    }

    /// The thread count for the next step.
    pub fn threads(&self) -> usize {
        self.count
    }

    /// The count the tuner has settled on (probes aside).
    pub fn settled(&self) -> usize {
        self.current
    }

    /// The most threads it may use.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Steps run on each count since the last `reset_counts`: `(threads, steps)`, most threads
    /// first, counts never used left out.
    pub fn steps_by_threads(&self) -> Vec<(usize, u64)> {
        (1..=self.max)
            .rev()
            .map(|n| (n, self.steps_at[n - 1]))
            .filter(|&(_, s)| s > 0)
            .collect()
    }

    /// Forget the steps counted so far (the tuner's choices stay).
    pub fn reset_counts(&mut self) {
        self.steps_at.fill(0);
    }

    /// The other count a probe tries: half the current one when on the most, else twice it
    /// (at most `max`).
    fn candidate(&self) -> usize {
        if self.current == self.max {
            (self.current / 2).max(1)
        } else {
            (self.current * 2).min(self.max)
        }
    }

    /// Record that the last step (on `threads()` threads) took `secs` seconds.
    pub fn record(&mut self, secs: f64) {
        self.steps_at[self.count - 1] += 1;
        if self.window == 0 {
            // `cycling`.
            self.count = if self.count == 1 {
                self.max
            } else {
                self.count - 1
            };
            self.current = self.count;
            return;
        }
        self.steps += 1;
        self.secs += secs;
        if self.steps < self.window {
            return;
        }
        let rate = if self.secs > 0.0 {
            self.steps as f64 / self.secs
        } else {
            f64::INFINITY
        };
        let short = self.secs < WINDOW_SECS;
        self.steps = 0;
        self.secs = 0.0;
        if short && self.window < MAX_WINDOW {
            // Too short to judge by: time a longer one first.
            self.window *= 2;
            return;
        }
        if self.probing {
            self.probing = false;
            if rate > self.last_rate * MARGIN {
                self.current = self.count;
                self.recent_best = rate;
                self.last_rate = rate;
                self.interval = MIN_INTERVAL;
            } else {
                let down = self.count < self.current;
                self.count = self.current;
                self.interval = if down {
                    (self.interval * 2).clamp(INTERVAL_DOWN, MAX_INTERVAL_DOWN)
                } else {
                    (self.interval * 2).min(MAX_INTERVAL_UP)
                };
            }
            self.windows_since_probe = 0;
            return;
        }
        self.last_rate = rate;
        // Forget old bests slowly, so that a lasting change of the host resets the reference.
        self.recent_best = (self.recent_best * 0.99).max(rate);
        self.windows_since_probe += 1;
        let below = rate < DROP * self.recent_best;
        let dropped = below && self.low;
        self.low = below && !dropped;
        let next = self.candidate();
        if next != self.current && (dropped || self.windows_since_probe >= self.interval) {
            if dropped {
                self.recent_best = rate;
            }
            self.probing = true;
            self.count = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `steps` steps whose duration on `n` threads is `cost(n)`; return the counts used.
    fn run(t: &mut ThreadTuner, steps: usize, cost: impl Fn(usize) -> f64) -> Vec<usize> {
        (0..steps)
            .map(|_| {
                let n = t.threads();
                t.record(cost(n));
                n
            })
            .collect()
    }

    #[test]
    fn stays_on_the_most_threads_while_they_are_faster_and_probes_less_and_less() {
        let mut t = ThreadTuner::new(2);
        // Two threads: 1 ms a step; one: 1.7 ms.
        let used = run(&mut t, 20_000, |n| if n == 2 { 1e-3 } else { 1.7e-3 });
        assert_eq!(t.settled(), 2);
        let on_one = used.iter().filter(|&&n| n == 1).count();
        // A window is 64 steps of 1 ms; 20 000 steps are about 312 windows. Probes after
        // windows 4, 69 and 198 (intervals 64, 128): three windows of 64 steps.
        assert_eq!(on_one, 3 * 64, "{on_one} of {} steps probing", used.len());
        assert_eq!(
            t.steps_by_threads(),
            vec![(2, (20_000 - on_one) as u64), (1, on_one as u64)]
        );
    }

    #[test]
    fn leaves_a_collapse_of_two_threads_within_a_few_windows_and_comes_back() {
        let mut t = ThreadTuner::new(2);
        run(&mut t, 5_000, |n| if n == 2 { 1e-3 } else { 1.7e-3 });
        assert_eq!(t.settled(), 2);
        // Two threads collapse to 2.5 ms a step: one is faster now.
        let used = run(&mut t, 600, |n| if n == 2 { 2.5e-3 } else { 1.7e-3 });
        assert_eq!(t.settled(), 1, "still on two threads");
        let first_one = used.iter().position(|&n| n == 1).unwrap();
        assert!(
            first_one <= 2 * 64,
            "took {first_one} steps to try one thread"
        );
        // The host recovers: a probe finds two threads faster again.
        run(&mut t, 3_000, |n| if n == 2 { 1e-3 } else { 1.7e-3 });
        assert_eq!(t.settled(), 2, "did not come back to two threads");
    }

    #[test]
    fn long_steps_probe_one_step_at_a_time() {
        let mut t = ThreadTuner::new(2);
        // A ResNet-20 step: 140 ms on two threads, 250 ms on one. Windows are single steps,
        // so 30 steps hold one probe of one step.
        let used = run(&mut t, 30, |n| if n == 2 { 0.14 } else { 0.25 });
        assert_eq!(used.iter().filter(|&&n| n == 1).count(), 1, "{used:?}");
        assert_eq!(t.settled(), 2);
    }

    #[test]
    fn many_cores_move_by_halves() {
        let mut t = ThreadTuner::new(16);
        // Beyond 8 threads the step gets slower (on this made-up machine).
        run(&mut t, 5_000, |n| if n > 8 { 2e-3 } else { 1e-3 });
        assert_eq!(t.settled(), 8);
        assert!(t.steps_by_threads().iter().all(|&(n, _)| n == 16 || n == 8));
    }

    #[test]
    fn one_thread_never_probes() {
        let mut t = ThreadTuner::new(1);
        let used = run(&mut t, 1_000, |_| 1e-3);
        assert!(used.iter().all(|&n| n == 1));
        assert_eq!(t.steps_by_threads(), vec![(1, 1000)]);
    }
}
