//! Fork-join over N threads inside a training step.
//!
//! A step of the paper's MLP takes a few hundred microseconds and splits into about a dozen
//! parallel regions, each a few tens of microseconds long. A general pool that puts idle threads
//! to sleep after every region (rayon) spends about as long waking them as it saves. Here the
//! workers of one process-wide team spin briefly waiting for the next region, then park; handing
//! out a region costs well under a microsecond while they are awake. When the process asks for
//! more threads than the machine has cores (oversubscribed), workers do not spin at all: they
//! park at once, and the caller yields while it waits, so that spinning never steals the core a
//! worker needs.
//!
//! A region is `tasks` independent pieces of work, numbered `0..tasks`. The caller and up to
//! `threads - 1` workers claim pieces one at a time from a shared counter, so a worker whose
//! core is busy elsewhere (or whose virtual CPU is not running) simply claims nothing, and the
//! caller does the rest itself instead of waiting for it.
//!
//! Which thread runs a piece never matters: every kernel splits its work so that each output
//! is computed exactly as on one thread (rows of a product, examples of a batch, features of
//! BN's statistics), and reductions across pieces are added in a fixed order. Results do not
//! depend on the thread count.
//!
//! One region runs at a time: a region started while another is running (from inside a piece,
//! or from another thread, as when a study trains several runs at once) runs its pieces on the
//! calling thread, in order.

use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::thread::Thread;

/// The most threads a region runs on (the caller and `MAX_THREADS - 1` workers).
pub const MAX_THREADS: usize = 256;

/// Spin iterations a worker waits for the next region before it parks (when not oversubscribed).
const SPINS: u32 = if cfg!(miri) { 50 } else { 20_000 };

/// `state` packs the region's epoch (high 32 bits) and the next unclaimed piece (low 32 bits).
const NEXT_MASK: u64 = (1 << 32) - 1;
/// The `next` of a region being set up: no piece can be claimed.
const CLOSED: u64 = NEXT_MASK;

type Job = *const (dyn Fn(usize) + Sync);

struct Team {
    /// Held by the caller of the running region.
    busy: AtomicBool,
    state: AtomicU64,
    /// Pieces in the current region (written while the region is closed).
    tasks: AtomicUsize,
    /// Workers that may take part in the current region (a hint: any thread may run any
    /// piece).
    limit: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
    job: UnsafeCell<Option<Job>>,
    /// Workers are spawned on first use, by the caller holding `busy`.
    workers: Vec<OnceLock<Thread>>,
    /// True when more threads were asked for than the machine has: park, never spin.
    oversubscribed: AtomicBool,
    cores: usize,
    /// The CPUs this process may run on, when each thread of the team is to be held on its
    /// own (see `pinning`); empty otherwise.
    pin: Vec<usize>,
    /// The caller's CPU has been set (the first region with workers).
    caller_pinned: AtomicBool,
}

// SAFETY: `job` is written only by the caller holding `busy`, while the region is closed (no
// piece claimable), and read by a thread only after it has claimed a piece of the open region,
// which the caller cannot finish (and so cannot overwrite `job`) before that piece is done.
unsafe impl Sync for Team {}
unsafe impl Send for Team {}

fn team() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| Team {
        busy: AtomicBool::new(false),
        state: AtomicU64::new(CLOSED),
        tasks: AtomicUsize::new(0),
        limit: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
        job: UnsafeCell::new(None),
        workers: (0..MAX_THREADS - 1).map(|_| OnceLock::new()).collect(),
        oversubscribed: AtomicBool::new(false),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        pin: pinning(),
        caller_pinned: AtomicBool::new(false),
    })
}

/// Whether `$BNLAB_PIN` asks to hold each thread of the team on its own CPU (a diagnostic,
/// see BENCHMARKS.md): `1` yes; unset, empty or `0` no; anything else an error naming the
/// accepted values (the command line refuses to start with it).
pub fn pin_requested() -> Result<bool, String> {
    match std::env::var("BNLAB_PIN") {
        Err(std::env::VarError::NotPresent) => Ok(false),
        Ok(v) if v.trim().is_empty() || v.trim() == "0" => Ok(false),
        Ok(v) if v.trim() == "1" => Ok(true),
        Ok(v) => Err(format!("'{v}' (expected 1 to pin the threads, or 0)")),
        Err(_) => Err("not valid Unicode (expected 1 or 0)".to_string()),
    }
}

/// The CPUs to hold the team's threads on, one each (the caller on the first, worker `id` on
/// the `id + 1`-th), when `$BNLAB_PIN` is `1`; empty (no pinning) otherwise.
fn pinning() -> Vec<usize> {
    if pin_requested() != Ok(true) {
        return Vec::new();
    }
    affinity::allowed()
}

#[cfg(all(target_os = "linux", not(miri)))]
mod affinity {
    /// The CPUs this thread may run on.
    pub fn allowed() -> Vec<usize> {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; the call writes at most its size.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return Vec::new();
            }
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect()
        }
    }

    /// Hold the calling thread on `cpu` (best effort: an error leaves it where it was).
    pub fn pin(cpu: usize) {
        // SAFETY: as above; the set names one CPU below CPU_SETSIZE.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

#[cfg(not(all(target_os = "linux", not(miri))))]
mod affinity {
    pub fn allowed() -> Vec<usize> {
        Vec::new()
    }
    pub fn pin(_cpu: usize) {}
}

impl Team {
    /// Claim one piece of the open region: its index, or `None` when none is left.
    fn claim(&self) -> Option<usize> {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let next = s & NEXT_MASK;
            if next == CLOSED || next as usize >= self.tasks.load(Ordering::Acquire) {
                return None;
            }
            // The exchange fails if the region changed since `s` was read: `tasks` might then
            // belong to another region.
            match self
                .state
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(next as usize),
                Err(now) => s = now,
            }
        }
    }

    /// Claim and run pieces until none is left.
    fn work(&self) {
        while let Some(i) = self.claim() {
            // SAFETY: see `unsafe impl Sync for Team`: the region holding piece `i` is open
            // and its job outlives it.
            let job = unsafe { (*self.job.get()).expect("an open region has a job") };
            let r = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(i) }));
            if r.is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }

    fn spawn(&'static self, id: usize) {
        self.workers[id].get_or_init(|| {
            std::thread::Builder::new()
                .name(format!("bnlab-worker-{id}"))
                .spawn(move || self.worker_loop(id))
                .expect("spawning a worker thread")
                .thread()
                .clone()
        });
    }

    fn worker_loop(&self, id: usize) {
        if !self.pin.is_empty() {
            affinity::pin(self.pin[(id + 1) % self.pin.len()]);
        }
        let mut seen = self.state.load(Ordering::Acquire) >> 32;
        loop {
            let mut waited = 0u32;
            let epoch = loop {
                let s = self.state.load(Ordering::Acquire);
                if s >> 32 != seen && s & NEXT_MASK != CLOSED {
                    break s >> 32;
                }
                if waited < SPINS && !self.oversubscribed.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                    waited += 1;
                } else {
                    std::thread::park();
                }
            };
            seen = epoch;
            if id < self.limit.load(Ordering::Relaxed) {
                self.work();
            }
        }
    }
}

/// Run `f(0)`, `f(1)`, ..., `f(tasks - 1)`, each exactly once, on up to `threads` threads (this
/// one and the team's workers), and return when all have finished. Piece 0 always runs on
/// this thread. With `threads <= 1`, one piece, or another region running, they all run here
/// in order.
///
/// Panics (after every piece has finished) if a piece panicked.
pub fn par_for<F: Fn(usize) + Sync>(threads: usize, tasks: usize, f: F) {
    if threads <= 1 || tasks <= 1 {
        run_here(tasks, &f);
        return;
    }
    let team = team();
    if team
        .busy
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        run_here(tasks, &f);
        return;
    }
    assert!((tasks as u64) < CLOSED, "par_for: too many pieces");
    let helpers = threads.min(tasks).min(MAX_THREADS) - 1;
    for id in 0..helpers {
        team.spawn(id);
    }
    if !team.pin.is_empty() && !team.caller_pinned.swap(true, Ordering::Relaxed) {
        affinity::pin(team.pin[0]);
    }
    team.oversubscribed
        .store(threads > team.cores, Ordering::Relaxed);
    let job_ref: &(dyn Fn(usize) + Sync) = &f;
    // SAFETY: the lifetime is erased only while the region is open; this function does not
    // return before every piece has finished (`done == tasks` below).
    let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(job_ref) };
    let epoch = (team.state.load(Ordering::Relaxed) >> 32).wrapping_add(1) & NEXT_MASK;
    // Close the region first: a worker still claiming from the previous one now fails.
    team.state.store(epoch << 32 | CLOSED, Ordering::Release);
    unsafe { *team.job.get() = Some(job) };
    team.tasks.store(tasks, Ordering::Release);
    team.done.store(0, Ordering::Relaxed);
    team.panicked.store(false, Ordering::Relaxed);
    team.limit.store(helpers, Ordering::Relaxed);
    // Piece 0 is the caller's: open the region at piece 1. The first piece of every region
    // then runs on the same thread, and with as many pieces as threads the others mostly do
    // too (an awake worker claims its piece while the caller runs piece 0), so data a piece
    // writes stays in the cache of the core that reads it in the next region split the same
    // way (the input layer's feature blocks, their weights' update).
    team.state.store(epoch << 32 | 1, Ordering::Release);
    for w in &team.workers[..helpers] {
        if let Some(t) = w.get() {
            t.unpark();
        }
    }
    if catch_unwind(AssertUnwindSafe(|| f(0))).is_err() {
        team.panicked.store(true, Ordering::Relaxed);
    }
    team.done.fetch_add(1, Ordering::Release);
    team.work();
    let mut waited = 0u32;
    while team.done.load(Ordering::Acquire) < tasks {
        if waited < SPINS && !team.oversubscribed.load(Ordering::Relaxed) {
            std::hint::spin_loop();
            waited += 1;
        } else {
            std::thread::yield_now();
        }
    }
    unsafe { *team.job.get() = None };
    let panicked = team.panicked.swap(false, Ordering::Relaxed);
    team.busy.store(false, Ordering::Release);
    assert!(!panicked, "a parallel piece of work panicked");
}

/// Run every piece on this thread, in order; as on the team, a piece that panics does not stop
/// the others, and the first panic is raised again once all have run.
fn run_here<F: Fn(usize)>(tasks: usize, f: &F) {
    let mut first = None;
    for i in 0..tasks {
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(i))) {
            first.get_or_insert(p);
        }
    }
    if let Some(p) = first {
        std::panic::resume_unwind(p);
    }
}

/// A slot written by exactly one piece of a region.
struct Slot<T>(UnsafeCell<Option<T>>);
// SAFETY: each slot is taken or written by one piece only (its own index).
unsafe impl<T: Send> Sync for Slot<T> {}

impl<T> Slot<T> {
    /// # Safety
    /// Only the one piece that owns the slot may call this.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self) -> &mut Option<T> {
        unsafe { &mut *self.0.get() }
    }
}

/// Run `a` and `b` as a region of two pieces on up to `threads` threads (with one thread,
/// `a` first), and return both results.
pub fn join<A, B, RA, RB>(threads: usize, a: A, b: B) -> (RA, RB)
where
    A: FnOnce() -> RA + Send,
    B: FnOnce() -> RB + Send,
    RA: Send,
    RB: Send,
{
    if threads <= 1 {
        return (a(), b());
    }
    let (fa, fb) = (
        Slot(UnsafeCell::new(Some(a))),
        Slot(UnsafeCell::new(Some(b))),
    );
    let (ra, rb) = (Slot(UnsafeCell::new(None)), Slot(UnsafeCell::new(None)));
    par_for(threads, 2, |i| {
        // SAFETY: piece i alone touches slot i.
        unsafe {
            if i == 0 {
                let f = fa.get().take().expect("piece 0 runs once");
                *ra.get() = Some(f());
            } else {
                let f = fb.get().take().expect("piece 1 runs once");
                *rb.get() = Some(f());
            }
        }
    });
    (
        ra.0.into_inner().expect("piece 0 ran"),
        rb.0.into_inner().expect("piece 1 ran"),
    )
}

/// The `i`-th of `parts` contiguous, nearly equal ranges covering `0..n` (the first `n %
/// parts` ranges one longer).
pub fn part(n: usize, parts: usize, i: usize) -> Range<usize> {
    let (q, r) = (n / parts, n % parts);
    let start = i * q + i.min(r);
    start..start + q + usize::from(i < r)
}

/// How many pieces to cut `n` items into for `threads` threads: one per thread, but none
/// smaller than `min_len` items (and at least one piece).
pub fn pieces(threads: usize, n: usize, min_len: usize) -> usize {
    if threads <= 1 {
        return 1;
    }
    (threads * PIECES_PER_THREAD).min(n / min_len.max(1)).max(1)
}

/// Pieces per thread in a region: more than one, so that when a worker is slow to start (its
/// core busy elsewhere, its virtual CPU not running), the others take over its share instead of
/// waiting for it.
pub const PIECES_PER_THREAD: usize = 4;

/// `f(range)` for each of `pieces(threads, n, min_len)` contiguous ranges of `0..n`, in
/// parallel: for work whose outputs depend only on their own items (examples of a batch,
/// features of BN's statistics, elements of an activation), so that any split gives the same
/// results.
pub fn par_ranges<F: Fn(Range<usize>) + Sync>(threads: usize, n: usize, min_len: usize, f: F) {
    let p = pieces(threads, n, min_len);
    if p == 1 {
        f(0..n);
        return;
    }
    par_for(threads, p, |i| f(part(n, p, i)));
}

/// A mutable slice that the pieces of a region write in disjoint parts.
pub struct Disjoint<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: pieces only ever get disjoint ranges (the caller of `range` promises it).
unsafe impl<T: Send> Sync for Disjoint<'_, T> {}
unsafe impl<T: Send> Send for Disjoint<'_, T> {}

impl<'a, T> Disjoint<'a, T> {
    /// Share `s` among the pieces of a region.
    pub fn new(s: &'a mut [T]) -> Self {
        Disjoint {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _borrow: PhantomData,
        }
    }

    /// The elements `r` of the slice.
    ///
    /// # Safety
    /// No two live results may overlap: each piece of a region asks for its own range.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range(&self, r: Range<usize>) -> &'a mut [T] {
        assert!(
            r.start <= r.end && r.end <= self.len,
            "Disjoint: range out of bounds"
        );
        // SAFETY: in bounds (checked); exclusive by the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r.start), r.end - r.start) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_run_and_borrow() {
        let mut left = vec![0u64; 1000];
        let mut right = vec![0u64; 1000];
        let rounds = if cfg!(miri) { 20 } else { 2000u64 };
        for round in 0..rounds {
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
        assert_eq!(left[5], (0..rounds).sum::<u64>());
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

    #[test]
    fn every_piece_runs_once_on_any_thread_count() {
        // Under Miri (CI checks the team for data races and undefined behaviour) fewer rounds.
        let (counts, rounds): (&[usize], usize) = if cfg!(miri) {
            (&[0, 1, 3, 9], 3)
        } else {
            (&[0, 1, 2, 7, 64, 1000], 20)
        };
        for threads in [1, 2, 3, 5, 8, 17] {
            for &tasks in counts {
                let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                for _ in 0..rounds {
                    par_for(threads, tasks, |i| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    });
                }
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == rounds),
                    "{threads} threads, {tasks} tasks"
                );
            }
        }
    }

    #[test]
    fn nested_and_concurrent_regions_run_serially_and_correctly() {
        let total = AtomicUsize::new(0);
        let rounds = if cfg!(miri) { 5 } else { 200 };
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..rounds {
                        par_for(4, 6, |_| {
                            par_for(4, 5, |j| {
                                total.fetch_add(j + 1, Ordering::Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 3 * rounds * 6 * 15);
    }

    #[test]
    fn ranges_cover_everything_once() {
        for n in [0, 1, 5, 64, 1001] {
            for parts in 1..9 {
                let mut next = 0;
                for i in 0..parts {
                    let r = part(n, parts, i);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
        let mut v = vec![0u32; 1003];
        let d = Disjoint::new(&mut v);
        par_ranges(8, 1003, 10, |r| {
            let start = r.start;
            // SAFETY: par_ranges hands out disjoint ranges.
            for (k, x) in unsafe { d.range(r) }.iter_mut().enumerate() {
                *x += (start + k) as u32;
            }
        });
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u32));
    }

    #[test]
    fn a_panicking_piece_is_reported_after_the_others_finish() {
        let ran = AtomicUsize::new(0);
        let r = catch_unwind(AssertUnwindSafe(|| {
            par_for(3, 10, |i| {
                ran.fetch_add(1, Ordering::Relaxed);
                assert!(i != 4, "piece 4 fails");
            })
        }));
        assert!(r.is_err());
        assert_eq!(ran.load(Ordering::Relaxed), 10);
        // The team is usable afterwards.
        let n = AtomicUsize::new(0);
        par_for(3, 10, |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 10);
        // On one thread (as when another region is running) the pieces run here, and the
        // others still run.
        let ran = AtomicUsize::new(0);
        let r = catch_unwind(AssertUnwindSafe(|| {
            par_for(1, 10, |i| {
                ran.fetch_add(1, Ordering::Relaxed);
                assert!(i != 4, "piece 4 fails");
            })
        }));
        assert!(r.is_err());
        assert_eq!(ran.load(Ordering::Relaxed), 10);
    }
}
