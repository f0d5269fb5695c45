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
    /// AVX-512F with AVX512_BF16: bf16 weights multiply inputs rounded to bf16 with
    /// `vdpbf16ps` (a bf16-compute path, held to the bf16 tolerance); other weights as
    /// [`Isa::Avx512`]. Opt-in: only taken when `CLOUDRM_ISA=avx512bf16` asks for it.
    Avx512Bf16 = 4,
}

impl Isa {
    /// The name `CLOUDRM_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
        }
    }
}

static FORCED: AtomicU8 = AtomicU8::new(0);
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// The best path this CPU supports, capped by `$CLOUDRM_ISA` (`scalar`, `avx2`,
/// `avx512` or `avx512bf16`; an unknown name is reported once on stderr and ignored).
/// Detected once. The bf16-compute path [`Isa::Avx512Bf16`] is never taken unless
/// `$CLOUDRM_ISA` names it (its results differ from the f32 paths' at the bf16 level).
///
/// AVX-512 is taken only after its kernels agree with the reference on a small product
/// (`matmul::wide::self_check`), AVX512_BF16 likewise (`matmul::dot::self_check`): a
/// machine on which they misbehave keeps the path below, with a line on stderr.
pub fn detected() -> Isa {
    static DETECTED: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| {
        let cap = std::env::var("CLOUDRM_ISA").ok().and_then(|v| {
            let isa = ALL.into_iter().find(|i| i.name() == v.trim());
            if isa.is_none() {
                eprintln!(
                    "cloudrm: CLOUDRM_ISA={v:?} is not scalar, avx2, avx512 or avx512bf16; \
                     ignored"
                );
            }
            isa
        });
        let best = cpu_best(cap == Some(Isa::Avx512Bf16));
        if cap == Some(Isa::Avx512Bf16) && best < Isa::Avx512Bf16 {
            eprintln!(
                "cloudrm: CLOUDRM_ISA=avx512bf16 but this CPU lacks AVX-512F or AVX512_BF16; \
                 using {}",
                best.name()
            );
        }
        // Without a cap, everything but the opt-in path.
        cap.unwrap_or(Isa::Avx512).min(best)
    })
}

/// Every path, slowest first.
const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16];

/// The best path the CPU runs (the bf16-compute one only if `bf16` asks for it and its
/// kernels pass their check).
fn cpu_best(bf16: bool) -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                if bf16 && std::arch::is_x86_feature_detected!("avx512bf16") {
                    if super::matmul::bf16_self_check() {
                        return Isa::Avx512Bf16;
                    }
                    eprintln!(
                        "cloudrm: the AVX512_BF16 matmul kernels disagree with the reference \
                         on this CPU; not using them"
                    );
                }
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
    let _ = bf16;
    Isa::Scalar
}

/// Every path this CPU can run (tests iterate these; the opt-in bf16-compute path only
/// when detection took it).
pub fn available() -> Vec<Isa> {
    ALL.into_iter().filter(|&isa| isa <= detected()).collect()
}

/// The path in use: the forced one if set (and supported), else the detected one.
pub fn current() -> Isa {
    match FORCED.load(Ordering::Relaxed) {
        1 => Isa::Scalar,
        2 if detected() >= Isa::Avx2 => Isa::Avx2,
        3 if detected() >= Isa::Avx512 => Isa::Avx512,
        4 if detected() >= Isa::Avx512Bf16 => Isa::Avx512Bf16,
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
