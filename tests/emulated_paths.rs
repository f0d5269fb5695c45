//! Whole (tiny, bf16) models on the emulated kernels of the opt-in bf16-compute paths
//! (AVX512_BF16 over pairs of AVX2 registers, AMX over tile registers in memory), so the
//! way the runtime calls them (fused Q/K/V with RoPE, gate/up with SwiGLU, the LM head
//! with its top-k, the column blocks and per-thread input caches of the pool) is checked
//! on machines without those instructions. Its own test binary: the emulation switch is
//! process-wide.

mod common;

use cloudrm::backend::Cpu;
use cloudrm::kernels::cpu::dispatch::{self, Isa};
use cloudrm::loader::Dtype;
use cloudrm::model::{Llama, LogitsMode};
use common::check_close;
use common::tiny::{TinySpec, all_logits, tiny_model_dir};

const IDS: [u32; 11] = [1, 5, 9, 13, 96, 0, 42, 42, 7, 3, 60];

/// The bf16 tolerance (DESIGN.md) for logits of a model whose every matmul input is
/// rounded to bf16.
const BF16_TOL: f64 = 2e-2;

/// Held by every test here: the emulation switch and the thread count are process-wide,
/// so tests that set them must not overlap.
static EMULATION: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn emulation_lock() -> std::sync::MutexGuard<'static, ()> {
    EMULATION.lock().unwrap_or_else(|e| e.into_inner())
}

/// That the emulated path `isa` gave `got`, not the detected path's `plain`: unless the
/// detected path is `isa` itself (`CLOUDRM_ISA` naming it on a CPU that has it), where
/// the AVX512_BF16 emulation must give the hardware's bits. (The AMX emulation is held
/// only to the tolerance: its tile sums need not round as the hardware's do.)
fn check_taken(isa: Isa, got: &[f32], plain: &[f32], what: &str) {
    if dispatch::detected() != isa {
        assert_ne!(got, plain, "{what}: the emulated path was not taken");
    } else if isa == Isa::Avx512Bf16 {
        assert_eq!(
            got, plain,
            "{what}: the emulation differs from the hardware"
        );
    }
}

/// On each emulated path: the full pass within the bf16 tolerance of the reference (and
/// not the f32 path's bits: the path is taken), prefill then one-token decode steps
/// within it of the full pass's rows, and greedy generation (the fused LM head + top-1)
/// picking the argmax of that path's own logits at every step. Two shapes: channels
/// a multiple of 32 (AMX tiles read in place) and not (the padded copy).
#[test]
fn tiny_bf16_models_run_on_the_emulated_bf16_compute_paths() {
    let _lock = emulation_lock();
    use cloudrm::generate::{GreedyOptions, greedy};
    let specs = [
        TinySpec {
            hidden: 64,
            intermediate: 96,
            heads: 4,
            kv_heads: 2,
            dtype: Dtype::BF16,
            ..Default::default()
        },
        TinySpec {
            dtype: Dtype::BF16,
            tied: false,
            ..Default::default()
        },
    ];
    let mut ran = 0;
    for (i, spec) in specs.iter().enumerate() {
        let dir = tiny_model_dir(&format!("emulated{i}"), spec);
        let model = Llama::load_dir(&dir).unwrap();
        let v = model.config.vocab_size;
        let cpu = Cpu::fast();
        let want = all_logits(&model, &Cpu::reference(), &IDS);
        let plain = all_logits(&model, &cpu, &IDS);
        for isa in [Isa::Avx512Bf16, Isa::Amx] {
            let what = format!("{isa:?}, {spec:?}");
            if !dispatch::emulate(Some(isa)) {
                eprintln!("skipped {isa:?}: this CPU lacks AVX2, which its emulation runs on");
                continue;
            }
            let full = all_logits(&model, &cpu, &IDS);
            check_taken(isa, &full, &plain, &what);
            check_close(&format!("{what}: full pass"), &full, &want, BF16_TOL);

            let mut sess = model.new_session(64, 64);
            let first = model
                .forward(&cpu, &mut sess, &IDS[..4], LogitsMode::Last)
                .unwrap()
                .to_vec();
            check_close(&what, &first, &full[3 * v..4 * v], BF16_TOL);
            for t in 4..IDS.len() {
                let step = model
                    .forward(&cpu, &mut sess, &IDS[t..t + 1], LogitsMode::Last)
                    .unwrap();
                let name = format!("{what}: decode step {t}");
                check_close(&name, step, &full[t * v..(t + 1) * v], BF16_TOL);
            }

            let n = 8;
            let mut sess = model.new_session(64, 64);
            let opts = GreedyOptions {
                max_tokens: n,
                stop_ids: vec![],
            };
            let (got, _) = greedy(&model, &cpu, &mut sess, &IDS[..4], &opts, |_| Ok(true)).unwrap();
            let mut sess = model.new_session(64, 64);
            let mut logits = model
                .forward(&cpu, &mut sess, &IDS[..4], LogitsMode::Last)
                .unwrap()
                .to_vec();
            let mut picks = Vec::new();
            for _ in 0..n {
                let next = cloudrm::sampler::argmax(&logits).unwrap() as u32;
                picks.push(next);
                logits = model
                    .forward(&cpu, &mut sess, &[next], LogitsMode::Last)
                    .unwrap()
                    .to_vec();
            }
            assert!(dispatch::emulate(None));
            assert_eq!(got, picks, "{what}: greedy picks");
            ran += 1;
        }
        std::fs::remove_dir_all(dir).ok();
    }
    assert!(ran >= 2, "the AMX emulation runs everywhere");
    // Only the opt-in paths have an emulation to switch to.
    assert!(!dispatch::emulate(Some(Isa::Avx2)));
}

/// The default model (bf16 weights) on each emulated path against transformers: the
/// last-position logits of the first golden text, and the top-20 logits of every golden
/// text, within the bf16 tolerance that `golden_bf16_weights` holds the f32-compute path
/// to, so rounding every matmul input to bf16 as well keeps the model where PyTorch has
/// it.
#[test]
fn default_model_on_the_emulated_bf16_compute_paths_matches_transformers() {
    let _lock = emulation_lock();
    use cloudrm::loader::gguf::OutDtype;
    use cloudrm::loader::tokenizer::Tokenizer;
    let (cases, case0_logits) = common::golden::load_fixture();
    let dir = common::model::default_model(OutDtype::BF16);
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let model = Llama::load_dir(&dir).unwrap();
    let cpu = Cpu::fast();
    let last = |ids: &[u32]| {
        let mut sess = model.new_session(ids.len() + 1, 64);
        model
            .forward(&cpu, &mut sess, ids, LogitsMode::Last)
            .unwrap()
            .to_vec()
    };
    let ids: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| tokenizer.encode(&c.text, false).unwrap())
        .collect();
    let plain = last(&ids[0]);
    for isa in [Isa::Avx512Bf16, Isa::Amx] {
        if !dispatch::emulate(Some(isa)) {
            eprintln!("skipped {isa:?}: this CPU lacks AVX2, which its emulation runs on");
            continue;
        }
        let t = std::time::Instant::now();
        let logits: Vec<Vec<f32>> = ids.iter().map(|ids| last(ids)).collect();
        assert!(dispatch::emulate(None));
        let err = common::rel_l2(&logits[0], &case0_logits);
        eprintln!(
            "{isa:?} (emulated): case 0 logits rel L2 error {err:e} against transformers \
             (f32 compute: {:e}); {} texts in {:.1} s",
            common::rel_l2(&plain, &case0_logits),
            cases.len(),
            t.elapsed().as_secs_f64()
        );
        check_taken(isa, &logits[0], &plain, &format!("{isa:?}"));
        check_close(
            &format!("{isa:?} case 0 logits"),
            &logits[0],
            &case0_logits,
            BF16_TOL,
        );
        for (i, (case, l)) in cases.iter().zip(&logits).enumerate() {
            let ours: Vec<f32> = case.top20.iter().map(|&(id, _)| l[id as usize]).collect();
            let theirs: Vec<f32> = case.top20.iter().map(|&(_, v)| v).collect();
            check_close(
                &format!("{isa:?} case {i} top-20"),
                &ours,
                &theirs,
                BF16_TOL,
            );
        }
    }
}

/// The AMX emulation through `matmul_forward` on many rows (the input rounded and packed
/// once for all threads) gives the bits of the per-thread packing
/// (`matmul_forward_amx_emulated`) and of every row alone, on one and on two threads.
#[test]
fn amx_emulation_shares_one_packing_with_the_same_bits() {
    let _lock = emulation_lock();
    use cloudrm::kernels::{Weights, cpu};
    use half::bf16;
    let (rows, c, oc) = (70usize, 96usize, 100usize);
    let mut rng = common::Rng::new(5);
    let x = rng.vec(rows * c, 1.0);
    let w: Vec<bf16> = rng
        .vec(oc * c, 0.5)
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    let bias = rng.vec(oc, 1.0);
    let mut want = vec![0.0f32; rows * oc];
    cpu::matmul::matmul_forward_amx_emulated(&mut want, &x, &w, Some(&bias), c, oc, 0..oc).unwrap();
    assert!(dispatch::emulate(Some(Isa::Amx)));
    for threads in [1, 2] {
        dispatch::set_num_threads(threads);
        let mut got = vec![0.0f32; rows * oc];
        cpu::matmul_forward(&mut got, &x, Weights::BF16(&w), Some(&bias), c, oc).unwrap();
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{threads} threads: the shared packing changed the bits"
        );
        for r in [0, 31, 69] {
            let mut one = vec![0.0f32; oc];
            cpu::matmul_forward(
                &mut one,
                &x[r * c..(r + 1) * c],
                Weights::BF16(&w),
                Some(&bias),
                c,
                oc,
            )
            .unwrap();
            assert!(
                one.iter()
                    .zip(&want[r * oc..(r + 1) * oc])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "row {r} alone"
            );
        }
    }
    dispatch::set_num_threads(0);
    assert!(dispatch::emulate(None));
}
