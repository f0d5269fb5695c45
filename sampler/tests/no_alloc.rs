//! The per-token path allocates nothing: a counting global allocator (per thread) around
//! `Sampler::sample` calls after construction.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use cloudrm_sampler::{Sampler, SamplingParams, SeqRng};

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts allocations.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|a| a.set(a.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|a| a.set(a.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn sample_does_not_allocate() {
    let vocab = 49_152;
    let base: Vec<f32> = (0..vocab)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
        .collect();
    let history: Vec<u32> = (0..300).map(|i| (i * 131) % vocab as u32).collect();
    // The counter works: an allocation on this thread is seen.
    let probe_before = ALLOCS.with(Cell::get);
    let mut logits = base.clone();
    assert!(ALLOCS.with(Cell::get) > probe_before);
    for params in [
        SamplingParams::default(),
        SamplingParams::cloud_critique(),
        SamplingParams {
            temperature: 0.7,
            top_k: 50,
            top_p: 0.9,
            min_p: 0.05,
            repetition_penalty: 1.1,
            ..SamplingParams::default()
        },
        SamplingParams {
            top_p: 0.95,
            ..SamplingParams::default()
        },
    ] {
        let mut sampler = Sampler::new(params, vocab).expect("sampler");
        let mut rng = SeqRng::new(1, 2);
        let before = ALLOCS.with(Cell::get);
        for _ in 0..5 {
            logits.copy_from_slice(&base);
            sampler
                .sample(&mut logits, &history, &mut rng)
                .expect("sample");
        }
        let after = ALLOCS.with(Cell::get);
        assert_eq!(after - before, 0, "{:?}", sampler.params());
    }
}
