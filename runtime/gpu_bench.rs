//! `cloudrm gpu-check` stage (c): the GPU benchmark on a model too large to carry, its
//! weights generated on the device (`CudaLlama::random`, default: Llama-3-8B's shape in
//! bf16). In one run, on one warm model:
//!
//! - `bandwidth`: a large device-to-device copy, counted as bytes read + bytes written;
//! - `prefill`: one forward of a `prefill`-token prompt (logits for the last row only,
//!   as `generate` and llama.cpp do), tokens/s;
//! - `decode`: single-stream greedy decode of `decode` tokens after a 1-token prompt,
//!   tokens/s and its fraction of the roofline (bandwidth / weight bytes per token);
//! - `k16`: K critiques of exactly `critique` tokens (EOS ignored, sampled on the GPU at
//!   T = 0.5, CLoud's self-consistency setting) after a
//!   `prefix`-token shared prompt: prefill once, then the cascade decode (the prefix's
//!   K/V read once per step for all K); wall time, aggregate tokens/s, and the decode
//!   steps' fraction of their roofline ((weight bytes + K/V bytes each step must read) /
//!   bandwidth).
//!
//! Each result is one JSON line (stage "c", metric "tokens/s"), which
//! scripts/reference/bench_gpu_pytorch.py reads to print the ratio to PyTorch.

use std::time::Instant;

use cloudrm_kernels::cuda::{CudaDevice, CudaError, SampleParams};
use cloudrm_loader::LlamaConfig;
use serde_json::{Value, json};

use crate::backend::cuda::{CudaLlama, CudaSession, SharedLayout, prefill_plan};

/// Llama-3-8B's config.json fields that shape the compute.
pub const LLAMA3_8B: &str = r#"{
  "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
  "head_dim": 128, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
  "max_position_embeddings": 8192, "tie_word_embeddings": false,
  "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"
}"#;

/// Split-K pieces (positions) of the decode steps' attention. On an H200 the K = 16 step
/// over a 2048-token prefix spent per layer in `attention_partial` 75 us with 256-position
/// pieces (256 CTAs, each walking 8 tiles in turn), 41 us with 64 (640 CTAs) and 53 us
/// with 128 (384 CTAs); the merge reads more states with 64 (~36 per row against ~20),
/// which its warps per row (launch::merge_threads) absorb.
pub const DECODE_SPLIT: Option<usize> = Some(64);

/// What stage (c) runs.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    /// Shown in the records, e.g. "llama-3-8b".
    pub name: String,
    pub config: LlamaConfig,
    pub prefill: usize,
    pub decode: usize,
    pub k: usize,
    pub critique: usize,
    pub prefix: usize,
    /// Bytes of each of the two buffers of the bandwidth copy.
    pub copy_bytes: usize,
    /// After the timed single-stream decode and after the K-critique job, this many
    /// more steps of each between cuProfilerStart and cuProfilerStop (0: none), and one
    /// more prefill after the timed ones, for `ncu --profile-from-start off`
    /// (scripts/gpu-check.sh --profile).
    pub profile_steps: usize,
}

impl BenchSpec {
    /// The issue's benchmark: Llama-3-8B shape, prefill 2048, decode 128, K = 16
    /// critiques of 256 tokens after a 2048-token prefix.
    pub fn llama3_8b() -> BenchSpec {
        BenchSpec {
            name: "llama-3-8b".into(),
            config: LlamaConfig::from_json_str(LLAMA3_8B, "llama-3-8b (built in)")
                .expect("the built-in config parses"),
            prefill: 2048,
            decode: 128,
            k: 16,
            critique: 256,
            prefix: 2048,
            copy_bytes: 1 << 30,
            profile_steps: 0,
        }
    }

    /// A config.json path or a built-in name (`llama-3-8b`).
    pub fn from_arg(arg: &str) -> crate::error::Result<BenchSpec> {
        let mut spec = BenchSpec::llama3_8b();
        if arg != "llama-3-8b" {
            spec.config = LlamaConfig::from_file(std::path::Path::new(arg))?;
            spec.name = arg.to_string();
        }
        Ok(spec)
    }

    /// Block geometry of one session that runs all three benchmarks in turn: the
    /// prefill's blocks, the single-stream decode's, the K-critique job's (prefix +
    /// K own ranges), whichever is largest; returns (n_blocks, own blocks per critique).
    pub fn blocks(&self, bs: usize) -> (usize, usize) {
        let own = (self.prefix % bs + self.critique).div_ceil(bs);
        let job = self.prefix.div_ceil(bs) + self.k * own;
        let single = 1 + (2 + self.decode).div_ceil(bs);
        (job.max(self.prefill.div_ceil(bs)).max(single), own)
    }

    /// K/V bytes per position (all layers, K and V, bf16).
    pub fn kv_bytes_per_position(&self) -> usize {
        let c = &self.config;
        c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 2
    }

    /// K/V bytes step s (0-based) of the K-critique decode must read: the prefix once,
    /// each sequence's own positions (the partial prefix block's tail and s + 1 new).
    pub fn k_step_kv_bytes(&self, s: usize, bs: usize) -> usize {
        let shared = self.prefix / bs * bs;
        let own = self.prefix - shared + s + 1;
        (shared + self.k * own) * self.kv_bytes_per_position()
    }
}

/// One benchmark result: op, shape, tokens/s and extra fields.
pub struct BenchRecord {
    pub op: &'static str,
    pub shape: String,
    pub value: f64,
    pub extra: Value,
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Runs `f` between cuProfilerStart and cuProfilerStop (`ncu --profile-from-start off`).
fn profiled(d: &CudaDevice, f: impl FnOnce() -> Result<(), CudaError>) -> Result<(), CudaError> {
    d.profiler(true)?;
    f()?;
    d.profiler(false)
}

/// The best of 3 synchronised runs of `f`, seconds; then, with `profile`, one more run
/// under the profiler.
fn best_of_3(
    d: &CudaDevice,
    profile: bool,
    mut f: impl FnMut() -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        f()?;
        d.synchronize()?;
        best = best.min(secs(t));
    }
    if profile {
        profiled(d, f)?;
    }
    Ok(best)
}

/// Device-to-device copy bandwidth, GB/s counting bytes read + written (best of 5).
pub fn copy_bandwidth(d: &CudaDevice, bytes: usize) -> Result<f64, CudaError> {
    let src = d.alloc_zeros::<u8>(bytes)?;
    let mut dst = d.alloc_zeros::<u8>(bytes)?;
    d.copy(&src, &mut dst)?;
    d.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        d.copy(&src, &mut dst)?;
        d.synchronize()?;
        best = best.min(secs(t));
    }
    Ok(2.0 * bytes as f64 / best / 1e9)
}

/// Runs stage (c) on the device; `each` gets every record as soon as it is measured.
pub fn run(
    d: &CudaDevice,
    spec: &BenchSpec,
    seed: u64,
    mut each: impl FnMut(Result<BenchRecord, CudaError>),
) {
    let bw = copy_bandwidth(d, spec.copy_bytes);
    let gbs = bw.as_ref().ok().copied();
    each(bw.map(|v| BenchRecord {
        op: "bandwidth",
        shape: format!("device-to-device copy of {} MiB", spec.copy_bytes >> 20),
        value: v,
        extra: json!({"metric": "GB/s", "counted": "bytes read + bytes written"}),
    }));
    let t = Instant::now();
    let model = match CudaLlama::random(d, &spec.config, seed).and_then(|m| {
        d.synchronize()?;
        Ok(m)
    }) {
        Ok(m) => m,
        Err(e) => return each(Err(e)),
    };
    let build_s = secs(t);
    let bs = model.shape().block_size;
    let (n_blocks, own) = spec.blocks(bs);
    let max_rows = spec.prefill.max(spec.prefix).max(spec.k);
    let mut sess = match CudaSession::new(&model, max_rows, spec.k.max(1), n_blocks) {
        Ok(s) => s,
        Err(e) => return each(Err(e)),
    };
    let wbytes = model.decode_weight_bytes();
    let v = model.vocab() as u32;
    let prompt = |n: usize, salt: u64| -> Vec<u32> {
        (0..n as u64)
            .map(|i| {
                (cloudrm_kernels::reference::init::uniform_value(seed ^ salt, i, 0.5, 0.5)
                    * (v - 1) as f32) as u32
                    + 1
            })
            .collect()
    };
    let base = format!("{}, random bf16 weights", spec.name);

    // Prefill: one warm-up (module loads, cuBLAS heuristics), then the best of 3.
    let ids = prompt(spec.prefill, 1);
    let table: Vec<u32> = (0..spec.prefill.div_ceil(bs) as u32).collect();
    let profile = spec.profile_steps > 0;
    let prefill = (|| {
        sess.prefill(&table, 0, &ids, false)?;
        d.synchronize()?;
        best_of_3(d, profile, || sess.prefill(&table, 0, &ids, false))
    })();
    each(prefill.map(|s| BenchRecord {
        op: "prefill",
        shape: format!("{base}, T={}", spec.prefill),
        value: spec.prefill as f64 / s,
        extra: json!({"seconds": s, "build_s": build_s, "weight_bytes": wbytes}),
    }));

    // Single-stream decode after a 1-token prompt (as llama-bench tg).
    let decode = (|| {
        let one = prompt(1, 2);
        sess.prefill(&[0], 0, &one, false)?;
        let first = sess.argmax(1)?;
        let free: Vec<u32> = (1..n_blocks as u32).collect();
        // Warm-up of the decode shapes.
        sess.decode_shared(&[0], 1, &first, 4, &free, DECODE_SPLIT, |_, s| s.argmax(1))?;
        let t = Instant::now();
        sess.decode_shared(&[0], 1, &first, spec.decode, &free, DECODE_SPLIT, |_, s| {
            s.argmax(1)
        })?;
        let took = secs(t);
        if profile {
            profiled(d, || {
                sess.decode_shared(
                    &[0],
                    1,
                    &first,
                    spec.profile_steps,
                    &free,
                    DECODE_SPLIT,
                    |_, s| s.argmax(1),
                )
                .map(drop)
            })?;
        }
        Ok(took)
    })();
    each(decode.map(|s| {
        let tps = spec.decode as f64 / s;
        let roof = gbs.map(|g| g * 1e9 / wbytes as f64);
        BenchRecord {
            op: "decode",
            shape: format!("{base}, {} tokens, batch 1", spec.decode),
            value: tps,
            extra: json!({
                "seconds": s, "weight_bytes_per_token": wbytes,
                "roofline_tokens_per_s": roof, "roofline_fraction": roof.map(|r| tps / r),
            }),
        }
    }));

    // The K-critique job: prefill the shared prefix, then K critiques of `critique`
    // tokens (the first from the prefill's logits, then critique - 1 decode steps).
    let job = (|| {
        let ids = prompt(spec.prefix, 3);
        let ptable: Vec<u32> = (0..spec.prefix.div_ceil(bs) as u32).collect();
        let free: Vec<u32> = (ptable.len() as u32..n_blocks as u32).collect();
        debug_assert!(free.len() >= spec.k * own);
        let t = Instant::now();
        sess.prefill(&ptable, 0, &ids, false)?;
        let first = sess.argmax(1)?;
        let prefill_s = secs(t);
        let firsts = vec![first[0]; spec.k];
        let steps = spec.critique.saturating_sub(1);
        let k = spec.k;
        // Sampled on the GPU, as CLoud's self-consistency critiques (T = 0.5): each
        // sequence its own Philox stream, only ids read back.
        let params = SampleParams {
            temperature: 0.5,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed,
        };
        let no_history: Vec<&[u32]> = vec![&[]; k];
        let sample = |s: usize, se: &mut CudaSession| {
            let draws: Vec<(u64, u64)> = (0..k as u64).map(|j| (j, s as u64 + 1)).collect();
            se.sample(params, &no_history, &draws)
        };
        let t = Instant::now();
        sess.decode_shared(
            &ptable,
            spec.prefix,
            &firsts,
            steps,
            &free,
            DECODE_SPLIT,
            sample,
        )?;
        let took = secs(t);
        if profile {
            profiled(d, || {
                sess.decode_shared(
                    &ptable,
                    spec.prefix,
                    &firsts,
                    spec.profile_steps,
                    &free,
                    DECODE_SPLIT,
                    sample,
                )
                .map(drop)
            })?;
        }
        Ok((prefill_s, took))
    })();
    each(job.map(|(p, dec)| {
        let wall = p + dec;
        let steps = spec.critique.saturating_sub(1);
        let bytes: f64 = (0..steps)
            .map(|s| (wbytes + spec.k_step_kv_bytes(s, bs)) as f64)
            .sum();
        let roof_s = gbs.map(|g| bytes / (g * 1e9));
        BenchRecord {
            op: "k16",
            shape: format!(
                "{base}, K={} x {} tokens after a {}-token shared prefix",
                spec.k, spec.critique, spec.prefix
            ),
            value: (spec.k * spec.critique) as f64 / wall,
            extra: json!({
                "wall_s": wall, "prefill_s": p, "decode_s": dec,
                "decode_tokens_per_s": (spec.k * steps) as f64 / dec,
                "step_roofline_fraction": roof_s.map(|r| r / dec),
                "k": spec.k, "critique_tokens": spec.critique, "prefix": spec.prefix,
            }),
        }
    }));

    // Last (a new kernel: a fault in it must not cost the benches above): the prefill
    // with the tensor-core attention (`flash_prefill`), where the shape allows it, on the
    // prefill's prompt. Its last-row logits must match the partial kernels' (rel. L2 <
    // 2e-2), then the best of 3. The session goes back to the partial kernels afterwards.
    if cloudrm_kernels::cuda::launch::flash_prefill_supported(&model.shape()) {
        let flash = (|| {
            sess.prefill(&table, 0, &ids, false)?;
            let want = sess.logits(1)?;
            sess.set_flash_prefill(true);
            sess.prefill(&table, 0, &ids, false)?;
            let got = sess.logits(1)?;
            let err = crate::gpu_check::rel_l2(&got, &want);
            if err.is_nan() || err >= 2e-2 {
                return Err(CudaError::bad(
                    "prefill_flash",
                    "logits",
                    format!("rel. L2 {err:.3e} against the partial-kernel prefill (< 2e-2)"),
                ));
            }
            let best = best_of_3(d, profile, || sess.prefill(&table, 0, &ids, false))?;
            Ok((best, err))
        })();
        sess.set_flash_prefill(false);
        each(flash.map(|(s, err)| BenchRecord {
            op: "prefill_flash",
            shape: format!("{base}, T={}, tensor-core attention", spec.prefill),
            value: spec.prefill as f64 / s,
            extra: json!({"seconds": s, "logits_rel_l2_vs_partial": err}),
        }));
    }
}

/// The host side of stage (c) without a device: the plans of the prefill, of the first
/// and last K-critique steps and of the single-stream decode build and pass the launch
/// checks for this geometry. Returns how many plans were checked.
pub fn dry_plans(spec: &BenchSpec) -> Result<usize, CudaError> {
    use cloudrm_kernels::cuda::launch::check_plan;
    use cloudrm_kernels::reference::attention_paged::PagedShape;
    let c = &spec.config;
    let bs = 16;
    let shape = PagedShape {
        n_heads: c.num_attention_heads,
        n_kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        block_size: bs,
    };
    let (n_blocks, _) = spec.blocks(bs);
    let table: Vec<u32> = (0..spec.prefill.div_ceil(bs) as u32).collect();
    check_plan(&prefill_plan(&table, 0, spec.prefill, &shape, n_blocks)?)?;
    let ptable: Vec<u32> = (0..spec.prefix.div_ceil(bs) as u32).collect();
    let free: Vec<u32> = (ptable.len() as u32..n_blocks as u32).collect();
    let steps = spec.critique.saturating_sub(1);
    let job = SharedLayout::new(shape, n_blocks, &ptable, spec.prefix, spec.k, steps, &free)?;
    let mut n = 1;
    for s in [0, steps.saturating_sub(1)] {
        check_plan(&job.plan(s, DECODE_SPLIT)?)?;
        n += 1;
    }
    let free1: Vec<u32> = (1..n_blocks as u32).collect();
    let single = SharedLayout::new(shape, n_blocks, &[0], 1, 1, spec.decode, &free1)?;
    check_plan(&single.plan(spec.decode.saturating_sub(1), DECODE_SPLIT)?)?;
    Ok(n + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_benchmark_plans_build_and_pass_the_launch_checks() {
        let spec = BenchSpec::llama3_8b();
        assert_eq!(spec.config.hidden_size, 4096);
        assert_eq!(dry_plans(&spec).unwrap(), 4);
        // 128 prefix blocks + 16 critiques of 16 blocks (256 tokens, no partial block).
        assert_eq!(spec.blocks(16), (128 + 16 * 16, 16));
        // A prefix that is not a whole number of blocks: one more own block each.
        let odd = BenchSpec {
            prefix: 2041,
            ..BenchSpec::llama3_8b()
        };
        assert_eq!(odd.blocks(16).1, (9 + 256usize).div_ceil(16));
        assert_eq!(dry_plans(&odd).unwrap(), 4);
        // Step 0 of K = 16 reads the prefix once and one own position each.
        assert_eq!(
            spec.k_step_kv_bytes(0, 16),
            (2048 + 16) * 32 * 2 * 8 * 128 * 2
        );
    }

    #[test]
    fn a_config_path_that_does_not_exist_is_a_typed_error() {
        let err = BenchSpec::from_arg("/nonexistent/config.json").unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
    }
}
