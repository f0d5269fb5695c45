//! Which SIMD path the fast kernels take, detected once; tests may force a path.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// Instruction-set paths of the fast kernels, slowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust (what LLVM makes of it for baseline x86-64).
    Scalar = 1,
    /// AVX2 + FMA + F16C.
    Avx2 = 2,
    /// AVX-512F (with AVX2, FMA, F16C): 16-lane kernels for the float-weight matmul;
    /// every other op takes its AVX2 kernel.
    Avx512 = 3,
}

impl Isa {
    /// The name `CLOUDRM_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

static FORCED: AtomicU8 = AtomicU8::new(0);
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// The best path this CPU supports, capped by `$CLOUDRM_ISA` (`scalar`, `avx2` or
/// `avx512`; an unknown name is reported once on stderr and ignored). Detected once.
///
/// AVX-512 is taken only after its kernels agree with the reference on a small product
/// (`matmul::wide::self_check`): a machine on which they misbehave keeps AVX2, with a
/// line on stderr.
pub fn detected() -> Isa {
    static DETECTED: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| {
        let cap = std::env::var("CLOUDRM_ISA").ok().and_then(|v| {
            let isa = [Isa::Scalar, Isa::Avx2, Isa::Avx512]
                .into_iter()
                .find(|i| i.name() == v.trim());
            if isa.is_none() {
                eprintln!("cloudrm: CLOUDRM_ISA={v:?} is not scalar, avx2 or avx512; ignored");
            }
            isa
        });
        let best = cpu_best();
        cap.map_or(best, |c| c.min(best))
    })
}

fn cpu_best() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                if super::matmul::wide_self_check() {
                    return Isa::Avx512;
                }
                eprintln!(
                    "cloudrm: the AVX-512 matmul kernels disagree with the reference on this \
                     CPU; using AVX2"
                );
            }
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

/// Every path this CPU can run (tests iterate these).
pub fn available() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|&isa| isa <= detected())
        .collect()
}

/// The path in use: the forced one if set (and supported), else the detected one.
pub fn current() -> Isa {
    match FORCED.load(Ordering::Relaxed) {
        1 => Isa::Scalar,
        2 if detected() >= Isa::Avx2 => Isa::Avx2,
        3 if detected() >= Isa::Avx512 => Isa::Avx512,
        _ => detected(),
    }
}

/// Force a path (`None` returns to detection). A path the CPU lacks is ignored.
pub fn force(isa: Option<Isa>) {
    FORCED.store(isa.map_or(0, |i| i as u8), Ordering::Relaxed);
}

/// Threads the machine offers (the global pool's size): $CLOUDRM_THREADS if set, else
/// the available parallelism. Read once: `available_parallelism` reads cgroup files and
/// calls `sched_getaffinity`, far too slow for every kernel call.
pub fn max_threads() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("CLOUDRM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

/// Threads the fast kernels use per call (default: `max_threads()`).
pub fn num_threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => max_threads(),
        n => n,
    }
}

/// Set the worker thread count (0 = available parallelism).
pub fn set_num_threads(n: usize) {
    THREADS.store(n, Ordering::Relaxed);
}
