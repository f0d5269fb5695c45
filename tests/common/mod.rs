//! Shared test harness: seeded inputs, relative-L2 comparison with llm.c-style
//! reporting, guard-banded output buffers, and the op-case table used by ops_cpu (and
//! later ops_cuda).
#![allow(dead_code)]

pub mod golden;
pub mod model;
pub mod tiny;

use std::collections::HashSet;

use cloudrm::kernels::OpKind;

/// SplitMix64: a tiny seeded generator for test inputs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// ||out - ref|| / ||ref|| (0 when both are zero). NaN anywhere gives NaN.
pub fn rel_l2(out: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(out.len(), reference.len(), "length mismatch");
    let mut num = 0f64;
    let mut den = 0f64;
    for (&a, &b) in out.iter().zip(reference) {
        if a.is_nan() || b.is_nan() {
            return f64::NAN;
        }
        num += (a as f64 - b as f64).powi(2);
        den += (b as f64).powi(2);
    }
    if den == 0.0 {
        if num == 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        (num / den).sqrt()
    }
}

/// Whether the path in use computes matmuls with bf16 weights (`bf16_weights`) in bf16:
/// an opt-in path (`CLOUDRM_ISA=avx512bf16` or `amx` on a CPU that has it), whose
/// outputs are held to the bf16 tolerance instead of the f32 one.
pub fn bf16_compute(bf16_weights: bool) -> bool {
    use cloudrm::kernels::cpu::dispatch::{Isa, current};
    bf16_weights && current() >= Isa::Avx512Bf16
}

/// Compare like llm.c's `check_tensor`: print the first pairs and the max error, then
/// assert the relative L2 error is below `tol` (NaN never passes).
pub fn check_close(name: &str, out: &[f32], reference: &[f32], tol: f64) {
    let err = rel_l2(out, reference);
    let ok = err < tol;
    if !ok {
        let mut max_abs = 0f32;
        for (&a, &b) in out.iter().zip(reference) {
            max_abs = max_abs.max((a - b).abs());
        }
        eprintln!("{name}: rel L2 {err:e} (tol {tol:e}), max abs err {max_abs:e}");
        for (i, (&a, &b)) in out.iter().zip(reference).take(5).enumerate() {
            let tag = if (a - b).abs() <= 1e-5 * b.abs().max(1.0) {
                "OK"
            } else {
                "NOT OK"
            };
            eprintln!("  [{i}] {a} {b} {tag}");
        }
    }
    assert!(ok, "{name}: relative L2 error {err:e} is not below {tol:e}");
}

/// [`check_close`] for outputs that are sums with cancellation (a reward: a dot product
/// of C terms that can land near zero): the L2 error is taken relative to
/// max(||reference||, `floor`), so a result close to 0 is held to `tol * floor` absolute
/// instead of an ever tighter relative bound.
pub fn check_close_floor(name: &str, out: &[f32], reference: &[f32], tol: f64, floor: f64) {
    let norm = reference
        .iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt();
    let scale = norm.max(floor) / norm.max(f64::MIN_POSITIVE);
    let err = rel_l2(out, reference) / scale.max(1.0);
    assert!(
        err < tol,
        "{name}: L2 error relative to max(|ref|, {floor}) is {err:e}, not below {tol:e} (out {:?}, ref {:?})",
        &out[..out.len().min(4)],
        &reference[..reference.len().min(4)]
    );
}

/// An output buffer with canary regions before and after it (ggml sentinels).
pub struct Guarded {
    buf: Vec<f32>,
    len: usize,
}

const GUARD: usize = 67;
const CANARY: u32 = 0x7FC0_DEAD; // a NaN pattern nobody writes by accident

impl Guarded {
    pub fn new(len: usize) -> Self {
        let mut buf = vec![f32::from_bits(CANARY); len + 2 * GUARD];
        buf[GUARD..GUARD + len].fill(0.0);
        Guarded { buf, len }
    }

    pub fn from(data: &[f32]) -> Self {
        let mut g = Guarded::new(data.len());
        g.as_mut().copy_from_slice(data);
        g
    }

    pub fn as_mut(&mut self) -> &mut [f32] {
        &mut self.buf[GUARD..GUARD + self.len]
    }

    pub fn as_ref(&self) -> &[f32] {
        &self.buf[GUARD..GUARD + self.len]
    }

    /// Panics naming `name` if a canary changed.
    pub fn check_guards(&self, name: &str) {
        let before = &self.buf[..GUARD];
        let after = &self.buf[GUARD + self.len..];
        for (i, v) in before.iter().chain(after).enumerate() {
            assert_eq!(
                v.to_bits(),
                CANARY,
                "{name}: guard band overwritten at guard index {i}"
            );
        }
    }
}

/// One op case: a name carrying every parameter, the op family it covers, and a body
/// that runs the path under test against the reference and panics on mismatch.
pub struct OpCase {
    pub name: String,
    pub kind: OpKind,
    pub run: Box<dyn Fn()>,
}

/// Run every case whose name contains $CLOUDRM_OP_FILTER (all when unset); returns the
/// kinds that ran at least one case.
pub fn run_cases(cases: Vec<OpCase>) -> HashSet<OpKind> {
    let filter = std::env::var("CLOUDRM_OP_FILTER").ok();
    let mut covered = HashSet::new();
    let mut n = 0;
    for case in cases {
        if let Some(f) = &filter
            && !case.name.contains(f.as_str())
        {
            continue;
        }
        (case.run)();
        covered.insert(case.kind);
        n += 1;
    }
    eprintln!("ran {n} op cases");
    covered
}
