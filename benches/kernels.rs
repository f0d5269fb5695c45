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
use cloudrm::kernels::weights::{Q8_GROUP, Q8Slice, quantize_q8};
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

/// Decode is a stream over weights far larger than the caches: a GEMV over a 256 MiB
/// matrix of C = 576 columns (bf16, and the same weights quantised to Q8), next to a
/// plain multi-threaded read of the same bytes (the roofline). GB/s of weight bytes read;
/// the GEMV's fraction of the read is the decode efficiency ceiling.
fn stream(c: &mut Criterion) {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let ic = 576;
    let oc = (256 << 20) / (ic * 2);
    let w: Vec<bf16> = (0..ic * oc).map(|_| bf16::from_f32(rng.f32())).collect();
    let mut q = vec![0i8; ic * oc];
    let mut sc = vec![0f32; ic * oc / Q8_GROUP];
    quantize_q8(Weights::BF16(&w), &mut q, &mut sc).unwrap();
    let q8 = Weights::Q8(Q8Slice::new(&q, &sc).unwrap());
    let x = rng.vec(ic);
    let mut out = vec![0.0f32; oc];
    let threads = cpu::dispatch::num_threads();
    let mut g = c.benchmark_group("stream_256MiB");
    g.sample_size(10);
    g.measurement_time(std::time::Duration::from_secs(3));
    g.warm_up_time(std::time::Duration::from_millis(500));
    g.throughput(Throughput::Bytes((ic * oc * 2) as u64));
    g.bench_function("read_sum_bf16", |b| {
        b.iter(|| {
            let sums: Vec<std::sync::Mutex<u64>> =
                (0..threads).map(|_| std::sync::Mutex::new(0)).collect();
            let words: &[u16] = bytemuck::cast_slice(&w);
            cpu::pool::global().run(threads, &|p, parts| {
                let chunk = words.len().div_ceil(parts);
                let part = &words[(p * chunk).min(words.len())..((p + 1) * chunk).min(words.len())];
                let mut acc = [0u32; 32];
                for ch in part.chunks_exact(32) {
                    for i in 0..32 {
                        acc[i] = acc[i].wrapping_add(ch[i] as u32);
                    }
                }
                *sums[p].lock().unwrap() = acc.iter().map(|&v| v as u64).sum();
            });
            black_box(sums.iter().map(|m| *m.lock().unwrap()).sum::<u64>())
        })
    });
    g.bench_function("gemv_bf16", |b| {
        b.iter(|| {
            cpu::matmul_forward(&mut out, &x, Weights::BF16(&w), None, ic, oc).unwrap();
            black_box(out[0])
        })
    });
    g.throughput(Throughput::Bytes(q8.bytes() as u64));
    g.bench_function("gemv_q8", |b| {
        b.iter(|| {
            cpu::matmul_forward(&mut out, &x, q8, None, ic, oc).unwrap();
            black_box(out[0])
        })
    });
    g.finish();
}

criterion_group!(benches, matmul, stream);
criterion_main!(benches);
