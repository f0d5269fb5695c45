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
    /// AMX-TILE and AMX-BF16 (with AVX512_BF16): bf16 weights multiply inputs rounded to
    /// bf16 in 16 x 16 tiles with `tdpbf16ps`, for every number of rows (a bf16-compute
    /// path, held to the bf16 tolerance); other weights as [`Isa::Avx512`]. Opt-in: only
    /// taken when `CLOUDRM_ISA=amx` asks for it (and the OS grants the tile state).
    Amx = 5,
}

impl Isa {
    /// The name `CLOUDRM_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
        }
    }
}

static FORCED: AtomicU8 = AtomicU8::new(0);
static EMULATED: AtomicU8 = AtomicU8::new(0);
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// The best path this CPU supports, capped by `$CLOUDRM_ISA` (`scalar`, `avx2`,
/// `avx512`, `avx512bf16` or `amx`; an unknown name is reported once on stderr and
/// ignored). Detected once. The bf16-compute paths [`Isa::Avx512Bf16`] and [`Isa::Amx`]
/// are never taken unless `$CLOUDRM_ISA` names them (their results differ from the f32
/// paths' at the bf16 level); a named path the machine cannot take is reported on stderr
/// with the path taken instead (the best one below it).
///
/// AVX-512 is taken only after its kernels agree with the reference on a small product
/// (`matmul::wide::self_check`), AVX512_BF16 and AMX likewise (`matmul::dot::self_check`,
/// `matmul::amx::self_check`): a machine on which they misbehave keeps the path below,
/// with a line on stderr.
pub fn detected() -> Isa {
    static DETECTED: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| {
        let cap = std::env::var("CLOUDRM_ISA").ok().and_then(|v| {
            let isa = ALL.into_iter().find(|i| i.name() == v.trim());
            if isa.is_none() {
                eprintln!(
                    "cloudrm: CLOUDRM_ISA={v:?} is not scalar, avx2, avx512, avx512bf16 or \
                     amx; ignored"
                );
            }
            isa
        });
        let opt_in = cap.filter(|&c| c >= Isa::Avx512Bf16);
        let best = cpu_best(opt_in);
        if let Some(want) = opt_in
            && best < want
        {
            eprintln!(
                "cloudrm: CLOUDRM_ISA={} but {}; using {}",
                want.name(),
                missing(want),
                best.name()
            );
        }
        // Without a cap, everything but the opt-in paths.
        cap.unwrap_or(Isa::Avx512).min(best)
    })
}

/// Whether the CPU has AVX2, FMA and F16C, asked of the hardware (std's cached feature
/// bits), not of [`detected`]: for exact helpers (bf16 rounding, transposes) that the
/// opt-in paths' self-checks run while [`detected`] is still being decided (asking it
/// there would wait on its own initialisation forever).
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Every path, slowest first.
const ALL: [Isa; 5] = [
    Isa::Scalar,
    Isa::Avx2,
    Isa::Avx512,
    Isa::Avx512Bf16,
    Isa::Amx,
];

/// What keeps an opt-in path `want` from this machine (for the notice).
fn missing(want: Isa) -> String {
    lacks(want).unwrap_or_else(|| "its kernels failed their self-check".into())
}

/// What this machine lacks for `isa`, if anything (its kernels' self-check aside): CPU
/// features, and for AMX the OS's tile state.
fn lacks(isa: Isa) -> Option<String> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let lacking = match isa {
            Isa::Scalar => None,
            Isa::Avx2 => (!has_avx2()).then_some("this CPU lacks AVX2, FMA or F16C"),
            Isa::Avx512 => (!has!("avx512f")).then_some("this CPU lacks AVX-512F"),
            Isa::Avx512Bf16 | Isa::Amx => (!(has!("avx512f") && has!("avx512bf16")))
                .then_some("this CPU lacks AVX-512F or AVX512_BF16"),
        };
        if let Some(why) = lacking {
            return Some(why.into());
        }
        if isa == Isa::Amx {
            return amx_granted().err();
        }
        None
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        None
    }
}

/// The best path the CPU runs, the bf16-compute ones only up to `opt_in` (when asked
/// for) and only if their kernels pass their check.
fn cpu_best(opt_in: Option<Isa>) -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            if std::arch::is_x86_feature_detected!("avx512f") {
                let bf16 = std::arch::is_x86_feature_detected!("avx512bf16");
                if bf16 && opt_in == Some(Isa::Amx) && amx_granted().is_ok() {
                    if super::matmul::amx_self_check() {
                        return Isa::Amx;
                    }
                    eprintln!(
                        "cloudrm: the AMX matmul kernels disagree with the reference on this \
                         CPU; not using them"
                    );
                }
                if bf16 && opt_in.is_some() {
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
    let _ = opt_in;
    Isa::Scalar
}

/// Whether this process may run AMX-BF16 tile instructions: the CPU has AMX-TILE and
/// AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22; `is_x86_feature_detected!` does not know
/// them on stable Rust), the OS saves the tile state (XCR0 bits 17 and 18), and Linux
/// granted it to the process (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`,
/// without which the first tile instruction kills the process). Asked once; the error
/// says what is missing.
#[cfg(target_arch = "x86_64")]
fn amx_granted() -> Result<(), String> {
    static GRANTED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    GRANTED
        .get_or_init(|| {
            use std::arch::x86_64::__cpuid_count;
            // (Leaf 7 read only when the CPU has it.)
            let max = __cpuid_count(0, 0).eax;
            let l7 = if max >= 7 { __cpuid_count(7, 0).edx } else { 0 };
            let l1 = __cpuid_count(1, 0).ecx;
            if max < 7 || l7 & (1 << 24) == 0 || l7 & (1 << 22) == 0 {
                return Err("this CPU lacks AMX-TILE or AMX-BF16".into());
            }
            if l1 & (1 << 27) == 0 {
                return Err("the OS has not enabled XSAVE (no tile state)".into());
            }
            let xcr0: u64 = {
                let (lo, hi): (u32, u32);
                // SAFETY: XGETBV with ECX = 0 is valid once CPUID reports OSXSAVE.
                unsafe {
                    std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
                        options(nomem, nostack, preserves_flags));
                }
                (hi as u64) << 32 | lo as u64
            };
            if xcr0 & (3 << 17) != 3 << 17 {
                return Err("the OS does not save the AMX tile state (XCR0)".into());
            }
            request_tile_permission()
        })
        .clone()
}

/// Ask Linux for the AMX tile data state for this process.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> Result<(), String> {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes the process's permitted
    // extended states; it reads and writes no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(format!(
            "Linux refused the AMX tile state (arch_prctl: {})",
            std::io::Error::last_os_error()
        ))
    }
}

/// Other systems: not used (no way to ask for the tile state here).
#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_permission() -> Result<(), String> {
    Err("the AMX path is only enabled on Linux".into())
}

/// Every path this CPU can run (tests iterate these; the opt-in bf16-compute paths only
/// when detection took them).
pub fn available() -> Vec<Isa> {
    ALL.into_iter().filter(|&isa| isa <= detected()).collect()
}

/// Why `isa` is not among [`available`] (`None` when it is): what the machine lacks for
/// it, that it is opt-in and `CLOUDRM_ISA` does not name it, or that `CLOUDRM_ISA` caps
/// the paths below it. For tests and reports that say which paths they did not run.
pub fn why_unavailable(isa: Isa) -> Option<String> {
    if isa <= detected() {
        return None;
    }
    let asked = std::env::var("CLOUDRM_ISA")
        .ok()
        .and_then(|v| ALL.into_iter().find(|i| i.name() == v.trim()));
    // (An opt-in path is asked for by its name or a higher one's.)
    let opted = asked.is_some_and(|a| a >= isa);
    if isa >= Isa::Avx512Bf16 && !opted {
        return Some(format!(
            "a bf16-compute path, taken only when CLOUDRM_ISA={} asks for it",
            isa.name()
        ));
    }
    if let Some(why) = lacks(isa) {
        return Some(why);
    }
    match asked {
        Some(a) if a < isa => Some(format!("CLOUDRM_ISA={} caps the paths", a.name())),
        _ => Some("its kernels failed their self-check".into()),
    }
}

/// The path in use: the forced one if set (and supported), else the detected one.
pub fn current() -> Isa {
    match FORCED.load(Ordering::Relaxed) {
        1 => Isa::Scalar,
        2 if detected() >= Isa::Avx2 => Isa::Avx2,
        3 if detected() >= Isa::Avx512 => Isa::Avx512,
        4 if detected() >= Isa::Avx512Bf16 => Isa::Avx512Bf16,
        5 if detected() >= Isa::Amx => Isa::Amx,
        _ => detected(),
    }
}

/// Force a path (`None` returns to detection). A path the CPU lacks is ignored.
pub fn force(isa: Option<Isa>) {
    FORCED.store(isa.map_or(0, |i| i as u8), Ordering::Relaxed);
}

/// Run every matmul with bf16 weights through the emulated kernels of the opt-in path
/// `isa` ([`Isa::Avx512Bf16`]: pairs of AVX2 registers; [`Isa::Amx`]: tile registers in
/// memory), whatever the detected path, or stop (`None`). For tests of a whole model on
/// those kernels on machines without them (slow: the tile emulation is scalar);
/// process-wide. False (nothing changed) for another path, or the AVX512_BF16 emulation
/// on a CPU without AVX2.
#[doc(hidden)]
pub fn emulate(isa: Option<Isa>) -> bool {
    let ok = match isa {
        None | Some(Isa::Amx) => true,
        Some(Isa::Avx512Bf16) => detected() >= Isa::Avx2,
        Some(_) => false,
    };
    if ok {
        EMULATED.store(isa.map_or(0, |i| i as u8), Ordering::Relaxed);
    }
    ok
}

/// The opt-in path whose emulated kernels take the bf16 matmuls ([`emulate`]), if any.
pub(super) fn emulated() -> Option<Isa> {
    match EMULATED.load(Ordering::Relaxed) {
        4 => Some(Isa::Avx512Bf16),
        5 => Some(Isa::Amx),
        _ => None,
    }
}

/// Threads the kernels use by default: $CLOUDRM_THREADS if set, else one per physical
/// core this process may run on (SMT siblings share one core's FMA units and its path to
/// memory, so a second thread there only competes; [`physical_cores`]), at most the
/// available parallelism (which also counts a cgroup's CPU quota). Read once: these
/// read sysfs and cgroup files, far too slow for every kernel call.
pub fn max_threads() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("CLOUDRM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| {
                let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
                physical_cores().map_or(logical, |p| p.clamp(1, logical))
            })
    })
}

/// Physical cores among the CPUs this process may run on (its affinity mask): CPUs that
/// share a `thread_siblings_list` in sysfs are one core. `None` where that is unknown.
#[cfg(target_os = "linux")]
pub fn physical_cores() -> Option<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes at most
    // its size into it.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        set
    };
    // SAFETY: CPU_ISSET reads the set within its size (cpu < CPU_SETSIZE).
    let allowed = (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) });
    count_cores(allowed, |cpu| {
        std::fs::read_to_string(format!(
            "/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
        ))
        .ok()
    })
}

/// Not known on this OS.
#[cfg(not(target_os = "linux"))]
pub fn physical_cores() -> Option<usize> {
    None
}

/// Distinct cores among `cpus`, each CPU's core named by its SMT sibling list
/// (`siblings`); `None` if any CPU's list is unknown, or no CPU is given.
fn count_cores(
    cpus: impl Iterator<Item = usize>,
    siblings: impl Fn(usize) -> Option<String>,
) -> Option<usize> {
    let mut cores = std::collections::HashSet::new();
    for cpu in cpus {
        cores.insert(siblings(cpu)?.trim().to_string());
    }
    (!cores.is_empty()).then_some(cores.len())
}

/// Threads the fast kernels use per call: the count set by [`set_num_threads`], else
/// [`max_threads`]; at most the global pool's size (the larger of the two when the pool
/// was made, at first use).
pub fn num_threads() -> usize {
    let want = match THREADS.load(Ordering::Relaxed) {
        0 => max_threads(),
        n => n,
    };
    want.min(super::pool::global().threads())
}

/// The count [`set_num_threads`] asked for, if any (the pool's size at first use).
pub(super) fn requested_threads() -> usize {
    THREADS.load(Ordering::Relaxed)
}

/// Set the worker thread count (0 = the default, [`max_threads`]). More than the pool
/// holds counts only if set before the first kernel call, which sizes the pool.
pub fn set_num_threads(n: usize) {
    THREADS.store(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SMT siblings are one core; CPUs outside the affinity mask do not count; an
    /// unknown topology gives no count.
    #[test]
    fn physical_cores_are_counted_by_sibling_list() {
        // 8 CPUs: cores {0,4}, {1,5}, {2,6}, {3,7}.
        let smt = |cpu: usize| Some(format!("{},{}\n", cpu % 4, cpu % 4 + 4));
        assert_eq!(count_cores(0..8, smt), Some(4));
        assert_eq!(count_cores([0, 4].into_iter(), smt), Some(1));
        assert_eq!(count_cores([0, 5, 6].into_iter(), smt), Some(3));
        assert_eq!(count_cores(0..3, |cpu| Some(cpu.to_string())), Some(3));
        assert_eq!(
            count_cores(0..8, |cpu| (cpu != 5).then(|| smt(cpu)).flatten()),
            None
        );
        assert_eq!(count_cores(std::iter::empty(), smt), None);
    }

    /// The default count lies between 1 and the available parallelism, and equals this
    /// machine's physical cores where sysfs names them (unless $CLOUDRM_THREADS is set).
    #[test]
    fn default_threads_are_the_physical_cores() {
        if std::env::var("CLOUDRM_THREADS").is_ok() {
            eprintln!("skipped: CLOUDRM_THREADS sets the count");
            return;
        }
        let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = max_threads();
        assert!((1..=logical).contains(&n), "{n} threads of {logical}");
        match physical_cores() {
            Some(p) => assert_eq!(n, p.min(logical)),
            None => assert_eq!(n, logical),
        }
    }
}
