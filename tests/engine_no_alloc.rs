//! The engine's per-token path allocates nothing: a counting global allocator around
//! decode steps, single-stream and cascade, once warm-up steps have grown the per-thread
//! buffers. With room reserved in the sequences' block lists (`PagedEngine::reserve`, as
//! the critique scorer does), the steps that open a new block allocate nothing either;
//! without it, such a step may grow the list. What is asserted is the calling thread's count: the
//! tiny model's ops are below the pool's size thresholds and run there. Another thread
//! (the test harness's or an idle pool worker's; which was not pinned down) was seen to
//! allocate once during a step in a few runs, on its own schedule, so other threads'
//! allocations are printed, not asserted.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use cloudrm::backend::Cpu;
use cloudrm::engine::{KvCache, PagedEngine};
use cloudrm::kv::SeqId;
use cloudrm::model::Llama;
use common::tiny::{TinySpec, load_tiny_model};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's allocations (a const initialiser: counting never allocates).
    static MINE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts allocations.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        MINE.with(|m| m.set(m.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        MINE.with(|m| m.set(m.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The calling thread's allocations in one decode step, and whether it opened a block
/// for some sequence.
fn step(
    eng: &mut PagedEngine,
    m: &Llama,
    seqs: &[SeqId],
    tokens: &[u32],
    shared: Option<(SeqId, usize)>,
) -> (usize, bool) {
    let bs = eng.block_size();
    let opens = seqs
        .iter()
        .any(|&s| eng.seq_len(s).unwrap().is_multiple_of(bs));
    let (before, mine) = (ALLOCS.load(Ordering::Relaxed), MINE.with(|m| m.get()));
    eng.decode_step(m, &Cpu::default(), seqs, tokens, shared)
        .unwrap();
    let all = ALLOCS.load(Ordering::Relaxed) - before;
    let me = MINE.with(|m| m.get()) - mine;
    if all != me {
        println!("other threads allocated {} times during the step", all - me);
    }
    (me, opens)
}

#[test]
fn decode_steps_allocate_nothing_inside_their_blocks() {
    run(false);
}

#[test]
fn decode_steps_opening_blocks_allocate_nothing_with_room_reserved() {
    run(true);
}

/// Thirty steps of a single stream and of three cascade children after a 10-token prompt
/// (blocks of 4 positions: a block opens every fourth step; the context passes 16 and 32
/// positions, where growing buffers would double); with `reserve`, room for 48 positions
/// is reserved for each child and every step past the warm-up is checked, the
/// block-opening ones included.
fn run(reserve: bool) {
    let m = load_tiny_model("engine-no-alloc", &TinySpec::default());
    for cache in [KvCache::F32, KvCache::F16] {
        let mut eng = PagedEngine::with_cache(&m, 64, 4, 8, cache).unwrap();
        let prompt: Vec<u32> = (0..10u32).map(|i| (i * 37 + 3) % 97).collect();
        let (parent, _, _) = eng.prefill(&m, &Cpu::default(), &prompt).unwrap();
        let single = eng.fork(parent, 1).unwrap();
        let kids = eng.fork(parent, 3).unwrap();
        if reserve {
            for &s in single.iter().chain(&kids) {
                eng.reserve(s, 48).unwrap();
            }
        }
        let mut checked = [0usize; 2];
        let mut opening = 0;
        for i in 0..30u32 {
            let toks = [i % 97, (i * 7 + 1) % 97, (i * 13 + 2) % 97];
            let runs = [
                step(&mut eng, &m, &single, &toks[..1], None),
                step(&mut eng, &m, &kids, &toks, Some((parent, 10))),
            ];
            // Two warm-up steps: per-thread buffers grow, the forks' copy-on-write runs.
            if i < 2 {
                continue;
            }
            for (j, (allocs, opens)) in runs.into_iter().enumerate() {
                let what = ["single-stream", "cascade"][j];
                if !opens || reserve {
                    assert_eq!(
                        allocs, 0,
                        "{cache} cache, {what} step {i} (opens a block: {opens}): {allocs} allocations"
                    );
                    checked[j] += 1;
                    opening += usize::from(opens);
                }
            }
        }
        assert!(
            checked.iter().all(|&n| n >= 20),
            "{cache}: too few steps checked"
        );
        assert_eq!(opening > 0, reserve, "{cache}: block-opening steps checked");
    }
}
