//! A persistent worker pool for the fast kernels: workers are spawned once, spin briefly
//! on an epoch counter for the next job (so back-to-back kernel calls in a decode step do
//! not pay a sleep/wake), then park on a condvar. The calling thread takes part as
//! participant 0, so a pool of P-1 workers gives P-way parallelism.
//!
//! A call that finds the pool busy (another thread is running a job, e.g. parallel
//! tests) runs its job inline on the calling thread instead of waiting.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// A job: called as `f(participant, participants)`.
type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    /// Bumped once per published job.
    epoch: AtomicU64,
    /// The current job as a lifetime-erased fat pointer, valid while `remaining > 0`.
    job: Mutex<Option<JobPtr>>,
    wake: Condvar,
    /// Workers that have not finished the current job.
    remaining: AtomicUsize,
    /// Participants of the current job (including the caller).
    participants: AtomicUsize,
    panicked: AtomicBool,
}

#[derive(Clone, Copy)]
struct JobPtr(*const Job);
// SAFETY: the pointee is `Sync`, and `run` keeps it alive until every worker is done.
unsafe impl Send for JobPtr {}

pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    busy: Mutex<()>,
}

const SPIN: Duration = Duration::from_micros(200);

impl Pool {
    /// A pool with `threads` participants in all (`threads - 1` workers).
    pub fn new(threads: usize) -> Pool {
        let workers = threads.max(1) - 1;
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            wake: Condvar::new(),
            remaining: AtomicUsize::new(0),
            participants: AtomicUsize::new(1),
            panicked: AtomicBool::new(false),
        });
        let mut spawned = 0;
        for w in 0..workers {
            let s = Arc::clone(&shared);
            let ok = std::thread::Builder::new()
                .name(format!("cloudrm-worker-{}", w + 1))
                .spawn(move || worker(s, w + 1))
                .is_ok();
            if ok {
                spawned += 1;
            }
        }
        Pool {
            shared,
            workers: spawned,
            busy: Mutex::new(()),
        }
    }

    /// Participants a job gets at most (workers + the caller).
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Run `f(p, n)` for p in 0..n on n = min(threads, self.threads()) participants and
    /// return when all are done. Panics in `f` are re-raised here.
    pub fn run(&self, threads: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        let n = threads.clamp(1, self.threads());
        let guard = match self.busy.try_lock() {
            _ if n == 1 => None,
            Ok(g) => Some(g),
            // A panic re-raised by an earlier job poisons the lock; the pool is fine.
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        let Some(_guard) = guard else {
            f(0, 1);
            return;
        };
        let s = &self.shared;
        // SAFETY: erase the borrow's lifetime; we do not return before `remaining`
        // reaches zero, i.e. before every worker has stopped using the pointer.
        let ptr: *const Job =
            unsafe { std::mem::transmute::<&(dyn Fn(usize, usize) + Sync), &'static Job>(f) };
        s.panicked.store(false, Ordering::Relaxed);
        s.participants.store(n, Ordering::Relaxed);
        s.remaining.store(self.workers, Ordering::Relaxed);
        {
            let mut job = s.job.lock().unwrap_or_else(|e| e.into_inner());
            *job = Some(JobPtr(ptr));
            s.epoch.fetch_add(1, Ordering::Release);
        }
        s.wake.notify_all();
        let mine = catch_unwind(AssertUnwindSafe(|| f(0, n)));
        let start = Instant::now();
        while s.remaining.load(Ordering::Acquire) != 0 {
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Err(p) = mine {
            resume_unwind(p);
        }
        assert!(
            !s.panicked.load(Ordering::Relaxed),
            "a pool worker panicked"
        );
    }
}

fn worker(s: Arc<Shared>, index: usize) {
    let mut seen = 0u64;
    loop {
        // Spin for the next epoch, then sleep on the condvar.
        let start = Instant::now();
        while s.epoch.load(Ordering::Acquire) == seen && start.elapsed() < SPIN {
            std::hint::spin_loop();
        }
        let job = {
            let mut guard = s.job.lock().unwrap_or_else(|e| e.into_inner());
            while s.epoch.load(Ordering::Acquire) == seen {
                guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            seen = s.epoch.load(Ordering::Acquire);
            *guard
        };
        let n = s.participants.load(Ordering::Relaxed);
        if let Some(JobPtr(ptr)) = job
            && index < n
        {
            // SAFETY: `run` keeps the job alive until `remaining` reaches zero, which
            // happens only after this call returns.
            let f = unsafe { &*ptr };
            if catch_unwind(AssertUnwindSafe(|| f(index, n))).is_err() {
                s.panicked.store(true, Ordering::Relaxed);
            }
        }
        s.remaining.fetch_sub(1, Ordering::Release);
    }
}

/// The process-wide pool, sized by `dispatch::num_threads()` at first use.
pub fn global() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(super::dispatch::max_threads()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_participant_runs_once_per_job() {
        let pool = Pool::new(3);
        for round in 0..200 {
            let hits = [
                AtomicUsize::new(0),
                AtomicUsize::new(0),
                AtomicUsize::new(0),
            ];
            let n = round % 3 + 1;
            pool.run(n, &|p, total| {
                assert_eq!(total, n);
                hits[p].fetch_add(1, Ordering::Relaxed);
            });
            for (p, h) in hits.iter().enumerate() {
                assert_eq!(
                    h.load(Ordering::Relaxed),
                    usize::from(p < n),
                    "round {round} p {p}"
                );
            }
        }
    }

    #[test]
    fn caller_panic_is_reraised_after_workers_finish() {
        let pool = Pool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(2, &|p, _| assert!(p != 0, "boom"))
        }));
        assert!(r.is_err());
        // The pool still works afterwards.
        let sum = AtomicUsize::new(0);
        pool.run(2, &|p, _| {
            sum.fetch_add(p + 1, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 3);
    }
}
