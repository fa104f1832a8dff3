//! The processes a command runs on: MPI's ranks when started by `mpirun -n P` (the `mpi`
//! feature), else this process alone. `train`, `bench` and every `reproduce` study run
//! data-parallel.

use bnlab::dist::{launcher_size, BnSync, Collective, Dist};
use bnlab::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// This command's ranks.
pub struct Ranks {
    /// The collective, when there is more than one rank. Declared first: dropped (its MPI
    /// operation freed) before MPI is finalized.
    comm: Option<Arc<dyn Collective>>,
    /// Keeps MPI initialized for the command's life (finalized on drop).
    #[cfg(feature = "mpi")]
    world: Option<bnlab::dist::mpi::MpiWorld>,
    /// A failure was agreed over the ranks and reported (`agree`).
    reported: AtomicBool,
}

impl Ranks {
    /// This process alone.
    pub fn single() -> Ranks {
        Ranks {
            #[cfg(feature = "mpi")]
            world: None,
            comm: None,
            reported: AtomicBool::new(false),
        }
    }

    /// The ranks the launcher started, MPI initialized when there is more than one (a
    /// command under `mpirun -n 1` is a plain single process). Without the `mpi` feature,
    /// being started as one of several processes is an error (each would train alone).
    pub fn start() -> Result<Ranks> {
        let launched = launcher_size().unwrap_or(1);
        if launched <= 1 {
            return Ok(Ranks::single());
        }
        #[cfg(feature = "mpi")]
        {
            let world = bnlab::dist::mpi::MpiWorld::init().ok_or_else(|| {
                Error::config("mpirun", "MPI could not be initialized in this process")
            })?;
            let comm: Arc<dyn Collective> = Arc::new(world.collective());
            let comm = (comm.size() > 1).then_some(comm);
            Ok(Ranks {
                world: Some(world),
                comm,
                reported: AtomicBool::new(false),
            })
        }
        #[cfg(not(feature = "mpi"))]
        Err(Error::config(
            "mpirun",
            format!(
                "started as one of {launched} processes, but this bnlab was built without MPI: \
                 build it with `cargo build --release --features mpi` (see README, \
                 \"Data-parallel training\")"
            ),
        ))
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.comm.as_ref().map_or(0, |c| c.rank())
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.comm.as_ref().map_or(1, |c| c.size())
    }

    /// True on rank 0, which prints and writes files.
    pub fn lead(&self) -> bool {
        self.rank() == 0
    }

    /// A network's place in the run, when there is more than one rank.
    pub fn dist(&self, bn_sync: BnSync) -> Option<Dist> {
        self.comm
            .as_ref()
            .map(|comm| Dist::new(Arc::clone(comm), bn_sync))
    }

    /// Wait for every rank (nothing with one).
    pub fn barrier(&self) {
        if let Some(c) = &self.comm {
            c.barrier();
        }
    }

    /// After a command failed with `e` on this rank: true when every rank met the same error
    /// at the same point (a divergence or a stop, decided on shared state), so each can end
    /// normally; otherwise the other ranks may wait for this one in a collective, and the job
    /// must be aborted (`abort`).
    pub fn agreed(e: &Error) -> bool {
        matches!(e, Error::Diverged { .. } | Error::Stopped { .. })
    }

    /// Agree over the ranks on `r`, the outcome of a step that every rank takes at the same
    /// point (a command's setup, before it trains): when any rank failed, every rank returns
    /// an error, reported once (rank 0's error if it has one, else each failing rank's), and
    /// [`Ranks::reported`] says so: the command then ends on every rank with a failure, without
    /// a rank left waiting and without MPI_Abort. One rank: `r` itself.
    pub fn agree<T>(&self, r: Result<T>) -> Result<T> {
        let Some(c) = &self.comm else {
            return r;
        };
        let mine = match (&r, self.lead()) {
            (Ok(_), _) => 0,
            (Err(_), false) => 1,
            (Err(_), true) => 2,
        };
        let worst = c.max_u64(mine);
        if worst == 0 {
            return r;
        }
        self.reported.store(true, Ordering::SeqCst);
        match r {
            Err(e) => {
                if self.lead() {
                    eprintln!("error: {e}");
                } else if worst == 1 {
                    eprintln!("error (rank {} of {}): {e}", self.rank(), self.size());
                }
                Err(e)
            }
            Ok(_) => Err(Error::config(
                "mpirun",
                "another process failed (its message above)",
            )),
        }
    }

    /// True once `agree` has reported a failure: the command's error is said already.
    pub fn reported(&self) -> bool {
        self.reported.load(Ordering::SeqCst)
    }

    /// `mpirun -n P ` when there is more than one rank (to prefix the command that resumes),
    /// else nothing.
    pub fn launcher(&self) -> String {
        if self.size() > 1 {
            format!("mpirun -n {} ", self.size())
        } else {
            String::new()
        }
    }

    /// End every rank of the job with `code` (MPI_Abort); returns with one rank.
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    pub fn abort(&self, code: i32) {
        #[cfg(feature = "mpi")]
        if let (Some(w), Some(_)) = (&self.world, &self.comm) {
            w.abort(code);
        }
    }
}
