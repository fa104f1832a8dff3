//! [`Collective`] over MPI (rsmpi on the system's Open MPI or MPICH): the `mpi` cargo feature.
//!
//! MPI is initialized with `Funneled` threading: only the thread that initialized it calls MPI
//! (the training step's own thread; the kernels' helper thread never does).

use super::{merge_moments, Collective};
use ::mpi::collective::{CommunicatorCollectives, SystemOperation, UnsafeUserOperation};
use ::mpi::datatype::{MutView, UserDatatype, View};
use ::mpi::environment::Universe;
use ::mpi::topology::{Communicator, SimpleCommunicator};
use ::mpi::traits::Equivalence;
use ::mpi::Threading;
use std::os::raw::{c_int, c_void};
use std::sync::Mutex;

/// MPI's world communicator and the reusable buffers of its reductions. Dropping the last
/// handle's [`MpiWorld`] finalizes MPI.
pub struct MpiCollective {
    world: SimpleCommunicator,
    moments: UnsafeUserOperation,
    triple: UserDatatype,
    scratch64: Mutex<Vec<f64>>,
    scratch32: Mutex<Vec<f32>>,
}

// SAFETY: MPI is initialized with `Threading::Funneled` and every call goes through this
// struct from the thread that initialized it (the command's main thread); the handles are
// plain identifiers that may move between threads, and the scratch buffers are behind mutexes.
unsafe impl Send for MpiCollective {}
unsafe impl Sync for MpiCollective {}

/// The MPI library for the life of the command: MPI is finalized when it is dropped.
pub struct MpiWorld {
    universe: Universe,
}

impl MpiWorld {
    /// Initialize MPI; `None` if it was initialized before or could not be.
    pub fn init() -> Option<MpiWorld> {
        let (universe, _) = ::mpi::initialize_with_threading(Threading::Funneled)?;
        Some(MpiWorld { universe })
    }

    /// The world communicator as a [`Collective`].
    pub fn collective(&self) -> MpiCollective {
        // SAFETY: `merge_triples` reads and writes `len` triples of f64, the datatype below.
        let moments = unsafe { UnsafeUserOperation::commutative(merge_triples) };
        MpiCollective {
            world: self.universe.world(),
            moments,
            triple: UserDatatype::contiguous(3, &f64::equivalent_datatype()),
            scratch64: Mutex::new(Vec::new()),
            scratch32: Mutex::new(Vec::new()),
        }
    }

    /// End every rank's process now with `code` (MPI_Abort): for an error that only this rank
    /// met, where the others would wait for it in a collective.
    pub fn abort(&self, code: i32) -> ! {
        self.universe.world().abort(code)
    }
}

/// MPI's user function for [`merge_moments`]: `inout[i] = merge(in[i], inout[i])` for each of
/// the `len` triples.
unsafe extern "C" fn merge_triples(
    invec: *mut c_void,
    inoutvec: *mut c_void,
    len: *mut c_int,
    _: *mut ::mpi::ffi::MPI_Datatype,
) {
    let n = *len as usize;
    let a = std::slice::from_raw_parts(invec as *const [f64; 3], n);
    let b = std::slice::from_raw_parts_mut(inoutvec as *mut [f64; 3], n);
    for (x, y) in a.iter().zip(b.iter_mut()) {
        *y = merge_moments(*x, *y);
    }
}

/// `v` resized to `len` (allocating only when a longer buffer than ever is asked for).
fn sized<T: Copy + Default>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::default());
    }
    &mut v[..len]
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn sum_f64(&self, buf: &mut [f64]) {
        let mut s = self.scratch64.lock().unwrap_or_else(|e| e.into_inner());
        let send = sized(&mut s, buf.len());
        send.copy_from_slice(buf);
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
    }

    fn sum_f32(&self, buf: &mut [f32]) {
        let mut s = self.scratch32.lock().unwrap_or_else(|e| e.into_inner());
        let send = sized(&mut s, buf.len());
        send.copy_from_slice(buf);
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
    }

    fn merge_moments(&self, buf: &mut [f64]) {
        assert!(
            buf.len().is_multiple_of(3),
            "moments come in (count, mean, M2) triples"
        );
        let count = (buf.len() / 3) as c_int;
        let mut s = self.scratch64.lock().unwrap_or_else(|e| e.into_inner());
        let send = sized(&mut s, buf.len());
        send.copy_from_slice(buf);
        // SAFETY: `count` triples of f64 are exactly the buffers' contents.
        let (sv, mut rv) = unsafe {
            (
                View::with_count_and_datatype(&send[..], count, &self.triple),
                MutView::with_count_and_datatype(buf, count, &self.triple),
            )
        };
        self.world.all_reduce_into(&sv, &mut rv, &self.moments);
    }

    fn max_u64(&self, v: u64) -> u64 {
        let mut out = 0u64;
        self.world
            .all_reduce_into(&v, &mut out, SystemOperation::max());
        out
    }

    fn min_u64(&self, v: u64) -> u64 {
        let mut out = 0u64;
        self.world
            .all_reduce_into(&v, &mut out, SystemOperation::min());
        out
    }

    fn barrier(&self) {
        self.world.barrier();
    }
}
