//! Fork-join for two threads inside a training step.
//!
//! A step of the paper's MLP takes a few hundred microseconds and splits into about a dozen
//! parallel pieces, each a few tens of microseconds long. A general pool that puts idle threads
//! to sleep (rayon) spends about as long waking them as it saves. Here one helper thread spins
//! briefly waiting for the next piece, then yields, then parks; handing it a piece costs well
//! under a microsecond while it is awake.
//!
//! Every split made with `join` computes each output exactly as the one-thread path does, so
//! results never depend on the thread count.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::thread::Thread;

const IDLE: u8 = 0;
const POSTED: u8 = 1;
const RUNNING: u8 = 2;
const DONE: u8 = 3;

/// Spin iterations, then yields, before the helper parks.
const SPINS: u32 = 20_000;
const YIELDS: u32 = 2_000;

type Job = *mut (dyn FnMut() + Send);

struct Team {
    state: AtomicU8,
    busy: AtomicBool,
    panicked: AtomicBool,
    job: UnsafeCell<Option<Job>>,
    helper: Thread,
}

// SAFETY: `job` is written by the one poster holding `busy` before it publishes POSTED
// (Release) and read by the helper only after it sees POSTED (Acquire); the poster does not
// touch it again until it sees DONE.
unsafe impl Sync for Team {}
unsafe impl Send for Team {}

fn team() -> Option<&'static Team> {
    static TEAM: OnceLock<Option<&'static Team>> = OnceLock::new();
    *TEAM.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<&'static Team>();
        let handle = std::thread::Builder::new()
            .name("bnlab-helper".into())
            .spawn(move || {
                let Ok(team) = rx.recv() else { return };
                helper_loop(team);
            })
            .ok()?;
        let team: &'static Team = Box::leak(Box::new(Team {
            state: AtomicU8::new(IDLE),
            busy: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            helper: handle.thread().clone(),
        }));
        tx.send(team).ok()?;
        Some(team)
    })
}

fn helper_loop(team: &'static Team) {
    loop {
        let mut waited = 0u32;
        loop {
            if team.state.load(Ordering::Acquire) == POSTED
                && team
                    .state
                    .compare_exchange(POSTED, RUNNING, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                break;
            }
            if waited < SPINS {
                std::hint::spin_loop();
            } else if waited < SPINS + YIELDS {
                std::thread::yield_now();
            } else {
                std::thread::park();
            }
            waited = waited.saturating_add(1);
        }
        // SAFETY: see `unsafe impl Sync for Team`; the pointee outlives the job because the
        // poster waits for DONE before returning.
        let job = unsafe { (*team.job.get()).take() };
        if let Some(job) = job {
            let r = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)() }));
            team.panicked.store(r.is_err(), Ordering::Relaxed);
        }
        team.state.store(DONE, Ordering::Release);
    }
}

/// Run `a` here and `b` on the helper thread when `threads > 1` and the helper is free (else
/// both here, `a` first), and return both results.
pub fn join<A, B, RA, RB>(threads: usize, a: A, b: B) -> (RA, RB)
where
    A: FnOnce() -> RA + Send,
    B: FnOnce() -> RB + Send,
    RA: Send,
    RB: Send,
{
    let team = match team() {
        Some(t)
            if threads > 1
                && t.busy
                    .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok() =>
        {
            t
        }
        _ => return (a(), b()),
    };
    let mut b = Some(b);
    let mut rb: Option<RB> = None;
    let mut job = || {
        if let Some(f) = b.take() {
            rb = Some(f());
        }
    };
    let job_ref: &mut (dyn FnMut() + Send) = &mut job;
    // SAFETY: the lifetime is erased only while the helper runs the job; we wait for DONE
    // below (also when `a` panics) before `job` goes out of scope.
    let job_ptr: Job = unsafe { std::mem::transmute::<&mut (dyn FnMut() + Send), Job>(job_ref) };
    unsafe { *team.job.get() = Some(job_ptr) };
    team.state.store(POSTED, Ordering::Release);
    team.helper.unpark();
    let ra = catch_unwind(AssertUnwindSafe(a));
    // If the helper has not started `b` yet (its core may be busy with something else, or
    // its virtual CPU not running at all), take it back and run it here rather than wait.
    let helper_panicked = if team
        .state
        .compare_exchange(POSTED, IDLE, Ordering::Acquire, Ordering::Relaxed)
        .is_ok()
    {
        // SAFETY: the helper only reads the slot after winning POSTED -> RUNNING, which can
        // no longer happen.
        unsafe { *team.job.get() = None };
        catch_unwind(AssertUnwindSafe(&mut job)).is_err()
    } else {
        while team.state.load(Ordering::Acquire) != DONE {
            std::hint::spin_loop();
        }
        team.state.store(IDLE, Ordering::Relaxed);
        team.panicked.swap(false, Ordering::Relaxed)
    };
    team.busy.store(false, Ordering::Release);
    let ra = ra.unwrap_or_else(|p| resume_unwind(p));
    let _ = &mut job;
    assert!(!helper_panicked, "a parallel piece of work panicked");
    (ra, rb.expect("the helper ran the job"))
}

#[cfg(test)]
mod tests {
    use super::join;

    #[test]
    fn both_sides_run_and_borrow() {
        let mut left = vec![0u64; 1000];
        let mut right = vec![0u64; 1000];
        for round in 0..2000u64 {
            let (a, b) = join(
                2,
                || {
                    left.iter_mut().for_each(|v| *v += round);
                    left[0]
                },
                || {
                    right.iter_mut().for_each(|v| *v += 2 * round);
                    right[999]
                },
            );
            assert_eq!(a * 2, b);
        }
        assert_eq!(left[5], (0..2000).sum::<u64>());
    }

    #[test]
    fn one_thread_runs_in_order() {
        let mut order = Vec::new();
        let cell = std::sync::Mutex::new(&mut order);
        join(
            1,
            || cell.lock().unwrap().push(1),
            || cell.lock().unwrap().push(2),
        );
        assert_eq!(order, vec![1, 2]);
    }
}
