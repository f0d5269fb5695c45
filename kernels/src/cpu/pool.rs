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
    /// Whether the current job hands items out by lanes ([`Pool::run_ranges`]).
    ranged: AtomicBool,
    /// Participants that have joined the current job (the next one's home lane).
    arrivals: AtomicUsize,
    /// Per lane, its unclaimed items `front..back` packed as `front << 32 | back`.
    lanes: Vec<AtomicU64>,
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
    if s.ranged.load(Ordering::Acquire) {
        return drain_lanes(s, f);
    }
    let items = s.items.load(Ordering::Acquire);
    loop {
        let i = s.next.fetch_add(1, Ordering::AcqRel);
        if i >= items {
            return;
        }
        f(i);
    }
}

fn pack(front: usize, back: usize) -> u64 {
    ((front as u64) << 32) | back as u64
}

fn unpack(v: u64) -> (usize, usize) {
    ((v >> 32) as usize, (v & 0xffff_ffff) as usize)
}

/// Claim lane `l`'s front item (`front`) or its back one.
fn claim(lane: &AtomicU64, front: bool) -> Option<usize> {
    let mut v = lane.load(Ordering::Acquire);
    loop {
        let (lo, hi) = unpack(v);
        if lo >= hi {
            return None;
        }
        let (next, item) = if front {
            (pack(lo + 1, hi), lo)
        } else {
            (pack(lo, hi - 1), hi - 1)
        };
        match lane.compare_exchange_weak(v, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some(item),
            Err(now) => v = now,
        }
    }
}

/// Run the home lane's items front to back (the participant's arrival order picks the
/// lane), then take items off the back of the fullest other lane until none is left.
fn drain_lanes(s: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let n = s.participants.load(Ordering::Acquire).min(s.lanes.len());
    let home = s.arrivals.fetch_add(1, Ordering::AcqRel);
    if home < n {
        while let Some(i) = claim(&s.lanes[home], true) {
            f(i);
        }
    }
    let left = |l: usize| {
        let (lo, hi) = unpack(s.lanes[l].load(Ordering::Acquire));
        hi.saturating_sub(lo)
    };
    loop {
        // Lanes only shrink: when the fullest is empty, all are.
        let Some((l, _)) = (0..n)
            .map(|l| (l, left(l)))
            .max_by_key(|&(_, k)| k)
            .filter(|&(_, k)| k > 0)
        else {
            return;
        };
        // None: emptied since it was read; look again.
        if let Some(i) = claim(&s.lanes[l], false) {
            f(i);
        }
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
            ranged: AtomicBool::new(false),
            arrivals: AtomicUsize::new(0),
            lanes: (0..threads.max(1)).map(|_| AtomicU64::new(0)).collect(),
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
        self.run_job(threads, items, false, f)
    }

    /// [`Pool::run_items`] with items 0..items cut into one contiguous lane per thread:
    /// each thread runs its lane in order, then takes items off the back of the fullest
    /// lane left. Each thread's items are thus mostly consecutive (a kernel streaming
    /// consecutive weight rows keeps one stream for the hardware prefetcher), and a late
    /// or slow thread's share is still run by whoever is free.
    pub fn run_ranges(&self, threads: usize, items: usize, f: &(dyn Fn(usize) + Sync)) {
        self.run_job(threads, items, true, f)
    }

    fn run_job(&self, threads: usize, items: usize, ranged: bool, f: &(dyn Fn(usize) + Sync)) {
        assert!(items < 1 << 32, "too many items for one job: {items}");
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
        s.ranged.store(ranged, Ordering::Relaxed);
        s.arrivals.store(0, Ordering::Relaxed);
        if ranged {
            for (l, lane) in s.lanes.iter().enumerate() {
                let (lo, hi) = if l < n {
                    (l * items / n, (l + 1) * items / n)
                } else {
                    (0, 0)
                };
                lane.store(pack(lo, hi), Ordering::Relaxed);
            }
        }
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
    fn every_ranged_item_runs_once() {
        let pool = Pool::new(3);
        for threads in 1..=3 {
            for items in [0usize, 1, 2, 5, 97, 1000] {
                let hits: Vec<AtomicUsize> = (0..items).map(|_| AtomicUsize::new(0)).collect();
                pool.run_ranges(threads, items, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "threads {threads} items {items}"
                );
            }
        }
    }

    #[test]
    fn each_thread_runs_its_lane_forward_then_steals_from_the_back() {
        let pool = Pool::new(3);
        let items = 300;
        let lanes = pool.threads().min(3);
        let starts: Vec<usize> = (0..lanes).map(|l| l * items / lanes).collect();
        let lane_of = |i: usize| starts.iter().rposition(|&s| s <= i).unwrap_or(0);
        for round in 0..50 {
            let seen = Mutex::new(std::collections::HashMap::new());
            pool.run_ranges(3, items, &|i| {
                let me = std::thread::current().id();
                seen.lock()
                    .unwrap()
                    .entry(me)
                    .or_insert_with(Vec::new)
                    .push(i);
            });
            let mut all = Vec::new();
            for list in seen.into_inner().unwrap().into_values() {
                // A run up from a lane's first item (the home lane), if any...
                let run = if starts.contains(&list[0]) {
                    1 + list.windows(2).take_while(|w| w[1] == w[0] + 1).count()
                } else {
                    0
                };
                // ...then items taken off lanes' backs: descending within each lane.
                for l in 0..lanes {
                    let stolen: Vec<usize> = list[run..]
                        .iter()
                        .copied()
                        .filter(|&i| lane_of(i) == l)
                        .collect();
                    assert!(
                        stolen.windows(2).all(|w| w[1] < w[0]),
                        "round {round}: lane {l} not taken from the back: {list:?}"
                    );
                }
                all.extend(list);
            }
            all.sort_unstable();
            assert_eq!(all, (0..items).collect::<Vec<_>>(), "round {round}");
        }
    }

    #[test]
    fn a_blocked_lane_is_run_by_the_other_threads() {
        // Item 0 (the caller's lane) waits until every other item has run: only taking
        // items off the back of the caller's lane lets the job finish.
        let pool = Pool::new(2);
        let items = 40;
        let done = AtomicUsize::new(0);
        pool.run_ranges(2, items, &|i| {
            if i == 0 {
                let t0 = Instant::now();
                while done.load(Ordering::Acquire) < items - 1 {
                    assert!(
                        t0.elapsed() < Duration::from_secs(20),
                        "the other items were not run by the other thread"
                    );
                    std::thread::yield_now();
                }
            } else {
                done.fetch_add(1, Ordering::AcqRel);
            }
        });
        assert_eq!(done.load(Ordering::Relaxed), items - 1);
    }

    #[test]
    fn a_panic_in_a_ranged_item_is_reraised_and_the_pool_still_works() {
        let pool = Pool::new(2);
        for bad in [0usize, 39] {
            let r = catch_unwind(AssertUnwindSafe(|| {
                pool.run_ranges(2, 40, &|i| assert!(i != bad, "boom"))
            }));
            assert!(r.is_err(), "item {bad}");
            let hits: Vec<AtomicUsize> = (0..40).map(|_| AtomicUsize::new(0)).collect();
            pool.run_ranges(2, 40, &|i| {
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
