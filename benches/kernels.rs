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

/// The attention block's input half of one layer (C = 576, Q 576, K and V 192, head dim
/// 64, bf16): RMSNorm, the Q/K/V projections and RoPE on Q and K as separate ops against
/// the one fused job (the norm in the matmul input pass, RoPE in its epilogue, the angles
/// from a table filled once per pass, as the engine runs it). Same bits; GFLOP/s of the
/// projections.
fn qkv_fused(c: &mut Criterion) {
    let mut rng = Rng(0x51_7cc1_b727_220a);
    let (ic, qd, kvd, hd) = (576usize, 576usize, 192usize, 64usize);
    let mk = |rng: &mut Rng, n: usize| -> Vec<bf16> {
        rng.vec(n).into_iter().map(bf16::from_f32).collect()
    };
    let (wq, wk, wv) = (
        mk(&mut rng, qd * ic),
        mk(&mut rng, kvd * ic),
        mk(&mut rng, kvd * ic),
    );
    let norm_w = mk(&mut rng, ic);
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 100000f32.powf(-2.0 * i as f32 / hd as f32))
        .collect();
    for rows in [1usize, 8, 512] {
        let x = rng.vec(rows * ic);
        let positions: Vec<u32> = (0..rows as u32).map(|p| p + 100).collect();
        let (mut xn, mut q) = (vec![0.0f32; rows * ic], vec![0.0f32; rows * qd]);
        let (mut k, mut v) = (vec![0.0f32; rows * kvd], vec![0.0f32; rows * kvd]);
        let mut table = cpu::RopeTable::default();
        let mut g = c.benchmark_group(format!("qkv_rows{rows}"));
        g.sample_size(10);
        g.measurement_time(std::time::Duration::from_secs(2));
        g.warm_up_time(std::time::Duration::from_millis(500));
        g.throughput(Throughput::Elements(
            (2 * rows * ic * (qd + 2 * kvd)) as u64,
        ));
        let (ws, ocs) = ([&wq[..], &wk[..], &wv[..]], [qd, kvd, kvd]);
        g.bench_function("unfused", |b| {
            b.iter(|| {
                cpu::rmsnorm_forward(&mut xn, &x, Weights::BF16(&norm_w), 1e-5).unwrap();
                cpu::matmul_forward_many(
                    &mut qkv_layers([&mut q, &mut k, &mut v], ws, ocs),
                    &xn,
                    ic,
                )
                .unwrap();
                cpu::rope_forward(&mut q, &positions, qd / hd, hd, &inv).unwrap();
                cpu::rope_forward(&mut k, &positions, kvd / hd, hd, &inv).unwrap();
                black_box(q[0])
            })
        });
        table.fill(&positions, &inv).unwrap();
        g.bench_function("fused", |b| {
            b.iter(|| {
                let fusion = cpu::Fusion {
                    norm: Some(cpu::NormIn {
                        weight: Weights::BF16(&norm_w),
                        eps: 1e-5,
                    }),
                    rope: Some(cpu::RopeOut {
                        table: &table,
                        layers: 2,
                    }),
                };
                cpu::matmul_forward_many_fused(
                    &mut qkv_layers([&mut q, &mut k, &mut v], ws, ocs),
                    &x,
                    ic,
                    fusion,
                )
                .unwrap();
                black_box(q[0])
            })
        });
        g.finish();
    }
}

/// Q, K and V as the fused calls take them.
fn qkv_layers<'a>(
    outs: [&'a mut [f32]; 3],
    ws: [&'a [bf16]; 3],
    ocs: [usize; 3],
) -> [cpu::Linear<'a>; 3] {
    let [q, k, v] = outs;
    [(q, ws[0], ocs[0]), (k, ws[1], ocs[1]), (v, ws[2], ocs[2])].map(|(out, w, oc)| cpu::Linear {
        out,
        weight: Weights::BF16(w),
        bias: None,
        out_features: oc,
    })
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
    let mut sc = vec![bf16::ZERO; ic * oc / Q8_GROUP];
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
    // K = 8 critiques step together: eight rows, the weights still read once.
    let x8 = rng.vec(8 * ic);
    let mut out8 = vec![0.0f32; 8 * oc];
    g.bench_function("rows8_bf16", |b| {
        b.iter(|| {
            cpu::matmul_forward(&mut out8, &x8, Weights::BF16(&w), None, ic, oc).unwrap();
            black_box(out8[0])
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

/// SmolLM2's attention heads (9 query, 3 KV, HS 64) over 16-token blocks.
const SMOL_ATTN: reference::attention_paged::PagedShape = reference::attention_paged::PagedShape {
    n_heads: 9,
    n_kv_heads: 3,
    head_dim: 64,
    block_size: 16,
};

/// Values starting on a 64-byte boundary, as the engine's KV arenas do (a plain `Vec`
/// this large starts 16 bytes past one, so half its 32-byte row loads would straddle
/// two cache lines, which the engine's never do).
struct Aligned<T> {
    buf: Vec<T>,
    off: usize,
    len: usize,
}

impl<T: Copy + Default> Aligned<T> {
    fn new(values: impl ExactSizeIterator<Item = T>) -> Self {
        let (len, size) = (values.len(), std::mem::size_of::<T>());
        let mut buf = vec![T::default(); len + 64 / size];
        let off = (buf.as_ptr() as usize).wrapping_neg() % 64 / size;
        for (d, v) in buf[off..off + len].iter_mut().zip(values) {
            *d = v;
        }
        Self { buf, off, len }
    }
}

impl<T> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.off..self.off + self.len]
    }
}

/// Random K and V arenas of `blocks` blocks in [`SMOL_ATTN`]'s shape (64-byte aligned,
/// as the engine's) and the block ids in shuffled order (a paged cache's blocks are not
/// laid out in sequence order).
fn shuffled_cache(rng: &mut Rng, blocks: usize) -> (Aligned<f32>, Aligned<f32>, Vec<u32>) {
    let block = SMOL_ATTN.block_size * SMOL_ATTN.n_kv_heads * SMOL_ATTN.head_dim;
    let k_arena = Aligned::new(rng.vec(blocks * block).into_iter());
    let v_arena = Aligned::new(rng.vec(blocks * block).into_iter());
    let mut ids: Vec<u32> = (0..blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        let j = ((rng.f32() + 0.5) * (i + 1) as f32) as usize;
        ids.swap(i, j.min(i));
    }
    (k_arena, v_arena, ids)
}

/// The arena rounded to f16 (the `--kv-cache f16` layout).
fn to_f16(a: &[f32]) -> Aligned<half::f16> {
    Aligned::new(a.iter().map(|&x| half::f16::from_f32(x)))
}

/// A group timing one decode step's attention (30 layers): ten samples of about three
/// seconds, GB/s of `bytes` K/V bytes (f32 bytes: an f16 cache's figure is the f32
/// equivalent, so the two read as a speed ratio).
fn step_group<'c>(
    c: &'c mut Criterion,
    name: &str,
    bytes: usize,
) -> criterion::BenchmarkGroup<'c, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    g.measurement_time(std::time::Duration::from_secs(3));
    g.warm_up_time(std::time::Duration::from_millis(500));
    g.throughput(Throughput::Bytes(bytes as u64));
    g
}

/// The K-critique decode step's attention: K = 8 sequences over a shared 512-token prefix
/// plus 64 tokens of their own, SmolLM2's heads (9 query, 3 KV, HS 64), 16-token blocks
/// in shuffled order; one iteration is one call per layer for 30 layers over separate
/// cache regions (23.6 MiB of K and V in all, far beyond L2), so it sees the memory
/// traffic of a real step. Reported as GB/s of K/V bytes (each shared position counted
/// once: the cascade reads the prefix once per step).
fn cascade(c: &mut Criterion) {
    use reference::attention_paged::{Level, cascade_scratch_len};
    let mut rng = Rng(0x51_7cc1_b727_220a);
    let (k, prefix, suffix, layers) = (8usize, 512usize, 64usize, 30usize);
    let bs = SMOL_ATTN.block_size;
    let per_layer = prefix / bs + k * suffix / bs;
    let (k_arena, v_arena, ids) = shuffled_cache(&mut rng, per_layer * layers);
    let shape = SMOL_ATTN;
    let tables: Vec<(Vec<u32>, Vec<Vec<u32>>)> = (0..layers)
        .map(|l| {
            let t = &ids[l * per_layer..(l + 1) * per_layer];
            let (pre, rest) = t.split_at(prefix / bs);
            (
                pre.to_vec(),
                rest.chunks(suffix / bs).map(|c| c.to_vec()).collect(),
            )
        })
        .collect();
    let q = rng.vec(k * shape.n_heads * shape.head_dim);
    let mut out = vec![0.0f32; q.len()];
    let mut scratch = vec![0.0f32; cascade_scratch_len(&shape, k, prefix.max(suffix))];
    let suffix_lens = vec![suffix; k];
    let bytes = layers * (prefix + k * suffix) * 2 * shape.n_kv_heads * shape.head_dim * 4;
    let (k16, v16) = (to_f16(&k_arena), to_f16(&v_arena));
    let mut g = step_group(c, "cascade_k8_prefix512_suffix64_30layers", bytes);
    macro_rules! run {
        ($name:expr, $k:expr, $v:expr) => {
            g.bench_function($name, |b| {
                b.iter(|| {
                    for (pre, suf) in &tables {
                        let levels = [Level {
                            block_table: pre,
                            len: prefix,
                            members: 0..k,
                        }];
                        let st: Vec<&[u32]> = suf.iter().map(|t| t.as_slice()).collect();
                        cpu::cascade_decode_attention(
                            &mut out,
                            &q,
                            $k,
                            $v,
                            &levels,
                            &st,
                            &suffix_lens,
                            shape,
                            &mut scratch,
                        )
                        .unwrap();
                    }
                    black_box(out[0])
                })
            });
        };
    }
    run!("fast", &k_arena, &v_arena);
    run!("fast_f16_cache", &k16, &v16);
    g.finish();
}

/// Single-stream decode attention deep in a context: one sequence of 576 cached positions
/// (a critique 64 tokens into its answer after a 512-token prompt) and of 1024, SmolLM2's
/// heads, 16-token blocks in shuffled order, one call per layer for 30 layers over
/// separate cache regions (25 and 45 MiB of K and V). GB/s of K/V bytes.
fn decode_depth(c: &mut Criterion) {
    for len in [576usize, 1024] {
        decode_depth_at(c, len);
    }
}

fn decode_depth_at(c: &mut Criterion, len: usize) {
    let mut rng = Rng(0x2f1e_9d3c_4b5a_6978);
    let layers = 30usize;
    let shape = SMOL_ATTN;
    let per_layer = len / shape.block_size;
    let (k_arena, v_arena, ids) = shuffled_cache(&mut rng, per_layer * layers);
    let q = rng.vec(shape.n_heads * shape.head_dim);
    let mut out = vec![0.0f32; q.len()];
    let mut scores = vec![0.0f32; len];
    let bytes = layers * len * 2 * shape.n_kv_heads * shape.head_dim * 4;
    let (k16, v16) = (to_f16(&k_arena), to_f16(&v_arena));
    let mut g = step_group(
        c,
        &format!("decode_attention_1seq_{len}pos_30layers"),
        bytes,
    );
    macro_rules! run {
        ($name:expr, $k:expr, $v:expr) => {
            g.bench_function($name, |b| {
                b.iter(|| {
                    for l in 0..layers {
                        let table = &ids[l * per_layer..(l + 1) * per_layer];
                        cpu::paged_decode_attention(
                            &mut out,
                            &q,
                            $k,
                            $v,
                            &[table],
                            &[len],
                            shape,
                            &mut scores,
                        )
                        .unwrap();
                    }
                    black_box(out[0])
                })
            });
        };
    }
    run!("fast", &k_arena, &v_arena);
    run!("fast_f16_cache", &k16, &v16);
    g.finish();
}

/// Causal prefill attention of a 512-token prompt (one layer, SmolLM2's heads, 16-token
/// blocks in shuffled order): the fast kernel next to the scalar reference. GFLOP/s
/// ("elements": 4 * heads * HS per (query, visible position) pair).
fn prefill_attention(c: &mut Criterion) {
    use reference::attention_paged::prefill_scratch_len;
    let mut rng = Rng(0x6a09_e667_f3bc_c908);
    let t = 512usize;
    let shape = SMOL_ATTN;
    let (k_arena, v_arena, table) = shuffled_cache(&mut rng, t / shape.block_size);
    let q = rng.vec(t * shape.n_heads * shape.head_dim);
    let mut out = vec![0.0f32; q.len()];
    let mut scratch = vec![0.0f32; prefill_scratch_len(&shape, 0, t)];
    let flops = 4 * shape.n_heads * shape.head_dim * t * (t + 1) / 2;
    let mut g = c.benchmark_group("prefill_attention_512pos");
    g.sample_size(10);
    g.measurement_time(std::time::Duration::from_secs(2));
    g.warm_up_time(std::time::Duration::from_millis(500));
    g.throughput(Throughput::Elements(flops as u64));
    macro_rules! run {
        ($name:expr, $kernel:path) => {
            g.bench_function($name, |b| {
                b.iter(|| {
                    $kernel(
                        &mut out,
                        &q,
                        &k_arena,
                        &v_arena,
                        &table,
                        0,
                        shape,
                        &mut scratch,
                    )
                    .unwrap();
                    black_box(out[0])
                })
            });
        };
    }
    run!("fast", cpu::paged_prefill_attention);
    run!(
        "reference",
        reference::attention_paged::paged_prefill_attention
    );
    g.finish();
}

/// The LM head of one decode step (V = 49152, C = 576, bf16) choosing the next token of
/// 1 and 8 rows: full logits then an argmax pass, next to the fused LM head + top-1 that
/// never writes the logits. GB/s of LM-head weight bytes.
fn lm_head_top1(c: &mut Criterion) {
    use reference::heads::TopLogit;
    let mut rng = Rng(0x3c6e_f372_fe94_f82b);
    let (ic, v) = (576usize, 49152usize);
    let w: Vec<bf16> = rng.vec(ic * v).into_iter().map(bf16::from_f32).collect();
    for rows in [1usize, 8] {
        let x = rng.vec(rows * ic);
        let mut logits = vec![0.0f32; rows * v];
        let mut best = vec![
            TopLogit {
                token: 0,
                logit: 0.0
            };
            rows
        ];
        let mut g = c.benchmark_group(format!("lm_head_top1_rows{rows}"));
        g.sample_size(10);
        g.measurement_time(std::time::Duration::from_secs(2));
        g.warm_up_time(std::time::Duration::from_millis(500));
        g.throughput(Throughput::Bytes((ic * v * 2) as u64));
        g.bench_function("matmul_then_argmax", |b| {
            b.iter(|| {
                cpu::matmul_forward(&mut logits, &x, Weights::BF16(&w), None, ic, v).unwrap();
                let picks: Vec<u32> = logits
                    .chunks_exact(v)
                    .map(|row| cloudrm::sampler::argmax(row).unwrap_or(0) as u32)
                    .collect();
                black_box(picks)
            })
        });
        g.bench_function("fused_topk", |b| {
            b.iter(|| {
                cpu::lm_head_topk(&mut best, &x, Weights::BF16(&w), ic, v, 1).unwrap();
                black_box(best[0].token)
            })
        });
        g.finish();
    }
}

/// The AMX path's input packing (bf16 rows into B tiles, run on every CPU: it is plain
/// AVX2), by 16 x 16 transposes and one channel pair at a time. GB/s of input bytes.
fn amx_pack(c: &mut Criterion) {
    for (rows, ch) in [(512usize, 1536usize), (512, 576), (1, 1536), (8, 576)] {
        let xb: Vec<u16> = (0..rows * ch).map(|i| (i * 7) as u16).collect();
        let mut dst = Vec::new();
        let mut g = c.benchmark_group(format!("amx_pack_{rows}x{ch}"));
        g.sample_size(20);
        g.measurement_time(std::time::Duration::from_secs(1));
        g.warm_up_time(std::time::Duration::from_millis(300));
        g.throughput(Throughput::Bytes((rows * ch * 2) as u64));
        for (name, transposes) in [("pairs", false), ("transposes", true)] {
            g.bench_function(name, |b| {
                b.iter(|| {
                    cpu::matmul::amx_pack_input(&mut dst, black_box(&xb), ch, transposes);
                    black_box(dst[0])
                })
            });
        }
        g.finish();
    }
}

/// One decode step's weight stream at SmolLM2-135M's shapes: per layer the fused QKV
/// (960 x 576), O (576 x 576), gate and up (3072 x 576) and down (576 x 1536) matrices,
/// 30 layers, then the LM head (49152 x 576), 269 MB of bf16 weights in anonymous memory
/// advised for 2 MiB pages (as `--hugepages` puts the model), laid out one after the
/// other; one and eight input rows (decode, a K = 8 critique step). GB/s of weight
/// bytes: what the matmuls alone make of the read bandwidth, calls, splits and
/// stream restarts included, without the model's other work.
fn model_stream(c: &mut Criterion) {
    let mut shapes: Vec<(usize, usize)> = Vec::new();
    for _ in 0..30 {
        shapes.extend([(960, 576), (576, 576), (3072, 576), (576, 1536)]);
    }
    shapes.push((49152, 576));
    let total: usize = shapes.iter().map(|&(oc, ic)| oc * ic).sum();
    let Ok(mut map) = memmap2::MmapOptions::new().len(total * 2).map_anon() else {
        eprintln!(
            "model_stream: skipped (no anonymous mapping of {} bytes)",
            total * 2
        );
        return;
    };
    #[cfg(target_os = "linux")]
    let _ = map.advise(memmap2::Advice::HugePage);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let w: &mut [bf16] = bytemuck::cast_slice_mut(&mut map[..]);
    for v in w.iter_mut() {
        *v = bf16::from_f32(rng.f32());
    }
    let w: &[bf16] = w;
    let mut g = c.benchmark_group("model_stream_269MB");
    g.sample_size(10);
    g.measurement_time(std::time::Duration::from_secs(3));
    g.warm_up_time(std::time::Duration::from_millis(500));
    g.throughput(Throughput::Bytes((total * 2) as u64));
    for rows in [1usize, 8] {
        let x = rng.vec(rows * 1536);
        let mut out = vec![0.0f32; rows * 49152];
        g.bench_function(format!("rows{rows}"), |b| {
            b.iter(|| {
                let mut at = 0;
                for &(oc, ic) in &shapes {
                    let wi = Weights::BF16(&w[at..at + oc * ic]);
                    let (o, i) = (&mut out[..rows * oc], &x[..rows * ic]);
                    cpu::matmul_forward(o, i, wi, None, ic, oc).unwrap();
                    at += oc * ic;
                }
                black_box(out[0])
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    matmul,
    qkv_fused,
    stream,
    model_stream,
    cascade,
    decode_depth,
    prefill_attention,
    lm_head_top1,
    amx_pack
);
criterion_main!(benches);
