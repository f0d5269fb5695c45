//! Per-kernel throughput of the fast CPU kernels on the default model's shapes
//! (SmolLM2-135M: C = 576, I = 1536, V = 49152), random weights, with the scalar
//! reference alongside where it is not too slow to time.
//!
//! - GEMV (one row, decode): reported as weight GB/s (bytes read per call / time).
//! - GEMM (8 rows = K critiques; 512 rows = prefill): reported as GFLOP/s
//!   ("elements" below are floating-point operations, 2 * rows * C * OC).
//!
//! `cargo bench --bench kernels` (`-- matmul` to filter).

use std::hint::black_box;

use cloudrm::kernels::Weights;
use cloudrm::kernels::{cpu, reference};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use half::bf16;

struct Rng(u64);

impl Rng {
    fn f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

fn matmul(c: &mut Criterion) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // (name, C, OC): attention q/o, MLP up/down, LM head.
    let shapes = [
        ("q_proj", 576, 576),
        ("gate_proj", 576, 1536),
        ("down_proj", 1536, 576),
        ("lm_head", 576, 49152),
    ];
    for &(name, ic, oc) in &shapes {
        let w: Vec<bf16> = rng.vec(ic * oc).into_iter().map(bf16::from_f32).collect();
        let w32: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        for rows in [1usize, 8, 512] {
            if name == "lm_head" && rows == 512 {
                continue;
            }
            let x = rng.vec(rows * ic);
            let mut out = vec![0.0f32; rows * oc];
            let mut g = c.benchmark_group(format!("matmul_{name}_rows{rows}"));
            g.sample_size(10);
            g.measurement_time(std::time::Duration::from_secs(2));
            g.warm_up_time(std::time::Duration::from_millis(500));
            if rows == 1 {
                g.throughput(Throughput::Bytes((ic * oc * 2) as u64));
            } else {
                g.throughput(Throughput::Elements((2 * rows * ic * oc) as u64));
            }
            g.bench_function("fast_bf16", |b| {
                b.iter(|| {
                    cpu::matmul_forward(&mut out, &x, Weights::BF16(&w), None, ic, oc).unwrap();
                    black_box(out[0])
                })
            });
            if rows > 1 {
                g.bench_function("fast_f32", |b| {
                    b.iter(|| {
                        cpu::matmul_forward(&mut out, &x, Weights::F32(&w32), None, ic, oc)
                            .unwrap();
                        black_box(out[0])
                    })
                });
            }
            if rows * oc <= 8 * 1536 {
                g.bench_function("reference_bf16", |b| {
                    b.iter(|| {
                        reference::matmul::matmul_forward(
                            &mut out,
                            &x,
                            Weights::BF16(&w),
                            None,
                            ic,
                            oc,
                        )
                        .unwrap();
                        black_box(out[0])
                    })
                });
            }
            g.finish();
        }
    }
}

criterion_group!(benches, matmul);
criterion_main!(benches);
