//! A persistent worker pool for the fast kernels: workers are spawned once, spin briefly
//! on an epoch counter for the next job (so back-to-back kernel calls in a decode step do
//! not pay a sleep/wake), then park on a condvar. The calling thread takes part too.
//!
//! Work is handed out as items claimed from an atomic counter, never as a fixed share per
//! thread: on an oversubscribed machine (other processes, more pools than cores) a worker
//! the OS has not scheduled yet simply finds no item left, and the caller never waits for
//! a thread that has not started. A worker joins a job only by taking a *seat* while the
//! job is open; the caller closes the job once every item is claimed and waits only for
//! the seated workers, which are by then running their last item.
//!
//! A call that finds the pool busy (another thread is running a job, e.g. parallel
//! tests) runs its job inline on the calling thread instead of waiting.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// A raw pointer into one buffer whose work items each write their own disjoint part, so
/// the job's closure (run on several threads) can carry it.
pub(crate) struct SendPtr<T>(pub(crate) *mut T);

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SendPtr<T> {}

// SAFETY: hands disjoint parts of one buffer to pool participants.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above; participants never touch the same element.
unsafe impl<T> Sync for SendPtr<T> {}

/// A job: called once per item index.
type Job = dyn Fn(usize) + Sync;

/// High bit of `seats`: the job accepts workers.
const OPEN: usize = 1 << (usize::BITS - 1);

struct Shared {
    /// Bumped once per published job.
    epoch: AtomicU64,
    /// Sleep lock for idle workers.
    sleep: Mutex<()>,
    wake: Condvar,
    /// OPEN while the job accepts workers, plus the count of seated workers.
    seats: AtomicUsize,
    /// The current job as a lifetime-erased fat pointer, valid while a seat is held
    /// (published before OPEN is set).
    job: Mutex<Option<JobPtr>>,
    /// Items of the current job and the next unclaimed one.
    items: AtomicUsize,
    next: AtomicUsize,
    /// Workers with an index below this may join (the job's thread count).
    participants: AtomicUsize,
    panicked: AtomicBool,
}

#[derive(Clone, Copy)]
struct JobPtr(*const Job);
// SAFETY: the pointee is `Sync`, and `run_items` keeps it alive until no seat is held.
unsafe impl Send for JobPtr {}

pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    busy: Mutex<()>,
}

const SPIN: Duration = Duration::from_micros(200);

/// Claim and run items until none is left.
fn drain(s: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let items = s.items.load(Ordering::Acquire);
    loop {
        let i = s.next.fetch_add(1, Ordering::AcqRel);
        if i >= items {
            return;
        }
        f(i);
    }
}

impl Pool {
    /// A pool with `threads` participants in all (`threads - 1` workers).
    pub fn new(threads: usize) -> Pool {
        let workers = threads.max(1) - 1;
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            seats: AtomicUsize::new(0),
            job: Mutex::new(None),
            items: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
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

    /// Run `f(p, n)` once for every p in 0..n, n = min(threads, self.threads()), on up to
    /// n threads, and return when all are done. Which thread runs which p is not fixed (a
    /// late worker's share is run by whoever is free). Panics in `f` are re-raised here.
    pub fn run(&self, threads: usize, f: &(dyn Fn(usize, usize) + Sync)) {
        let n = threads.clamp(1, self.threads());
        self.run_items(n, n, &|p| f(p, n));
    }

    /// Run `f(i)` once for every item i in 0..items on up to `threads` threads (the
    /// caller included), items claimed dynamically; return when all are done. Panics in
    /// `f` are re-raised here.
    pub fn run_items(&self, threads: usize, items: usize, f: &(dyn Fn(usize) + Sync)) {
        let n = threads.clamp(1, self.threads()).min(items.max(1));
        let guard = match self.busy.try_lock() {
            _ if n == 1 => None,
            Ok(g) => Some(g),
            // A panic re-raised by an earlier job poisons the lock; the pool is fine.
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        let Some(_guard) = guard else {
            for i in 0..items {
                f(i);
            }
            return;
        };
        let s = &self.shared;
        // SAFETY: erase the borrow's lifetime; we do not return before the job is closed
        // and no seat is held, i.e. before every worker has stopped using the pointer.
        let ptr: *const Job =
            unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Job>(f) };
        s.panicked.store(false, Ordering::Relaxed);
        s.participants.store(n, Ordering::Relaxed);
        s.items.store(items, Ordering::Relaxed);
        s.next.store(0, Ordering::Relaxed);
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(JobPtr(ptr));
        s.seats.store(OPEN, Ordering::Release);
        {
            let _g = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            s.epoch.fetch_add(1, Ordering::Release);
        }
        s.wake.notify_all();
        let mine = catch_unwind(AssertUnwindSafe(|| drain(s, f)));
        // Every item is claimed: close the job and wait for the seated workers only.
        s.seats.fetch_and(!OPEN, Ordering::AcqRel);
        let start = Instant::now();
        while s.seats.load(Ordering::Acquire) != 0 {
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *s.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Err(p) = mine {
            resume_unwind(p);
        }
        assert!(
            !s.panicked.load(Ordering::Relaxed),
            "a pool worker panicked"
        );
    }
}

/// Take a seat in the open job, if any: true when seated.
fn take_seat(s: &Shared) -> bool {
    let mut cur = s.seats.load(Ordering::Acquire);
    loop {
        if cur & OPEN == 0 {
            return false;
        }
        match s
            .seats
            .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return true,
            Err(now) => cur = now,
        }
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
        {
            let mut guard = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            while s.epoch.load(Ordering::Acquire) == seen {
                guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            seen = s.epoch.load(Ordering::Acquire);
        }
        if index >= s.participants.load(Ordering::Relaxed) || !take_seat(&s) {
            continue;
        }
        // Seated: the job (whichever is open now) stays alive until we leave the seat.
        let job = *s.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(JobPtr(ptr)) = job {
            // SAFETY: `run_items` keeps the job alive until no seat is held.
            let f = unsafe { &*ptr };
            if catch_unwind(AssertUnwindSafe(|| drain(&s, f))).is_err() {
                s.panicked.store(true, Ordering::Relaxed);
            }
        }
        s.seats.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The process-wide pool, sized at first use by `dispatch::max_threads()` or the count
/// `dispatch::set_num_threads` asked for before, whichever is larger.
pub fn global() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let d = super::dispatch::max_threads();
        Pool::new(d.max(super::dispatch::requested_threads()))
    })
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
    fn every_item_runs_once() {
        let pool = Pool::new(3);
        for items in [0usize, 1, 2, 5, 97] {
            let hits: Vec<AtomicUsize> = (0..items).map(|_| AtomicUsize::new(0)).collect();
            pool.run_items(3, items, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
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
