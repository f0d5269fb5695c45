//! The Llama forward on tiny random checkpoints: fast vs reference kernels, incremental
//! decode vs full recomputation, chunked prefill, every config variant, and the errors a
//! bad checkpoint or bad call gets.

mod common;

use cloudrm::Error;
use cloudrm::backend::Cpu;
use cloudrm::loader::Dtype;
use cloudrm::loader::safetensors::HugePageRoute;
use cloudrm::model::weights::HugePages;
use cloudrm::model::{Llama, LogitsMode, ModelError};
use common::check_close;
use common::tiny::{
    TinySpec, all_logits, temp_dir, tiny_config, tiny_model_dir, tiny_tensors, write_model,
};

const IDS: [u32; 11] = [1, 5, 9, 13, 96, 0, 42, 42, 7, 3, 60];

#[test]
fn fast_matches_reference_for_every_variant() {
    let variants = [
        TinySpec::default(),
        TinySpec {
            tied: false,
            ..Default::default()
        },
        TinySpec {
            kv_heads: 6,
            ..Default::default()
        },
        TinySpec {
            kv_heads: 1,
            ..Default::default()
        },
        TinySpec {
            model_type: "qwen2",
            ..Default::default()
        },
        TinySpec {
            dtype: Dtype::BF16,
            ..Default::default()
        },
        TinySpec {
            dtype: Dtype::F16,
            ..Default::default()
        },
    ];
    for (i, spec) in variants.iter().enumerate() {
        let dir = tiny_model_dir(&format!("variant{i}"), spec);
        let model = Llama::load_dir(&dir).unwrap();
        let want = all_logits(&model, &Cpu::reference(), &IDS);
        let got = all_logits(&model, &Cpu::fast(), &IDS);
        assert!(want.iter().all(|x| x.is_finite()));
        // bf16 weights on an opt-in bf16-compute path (CLOUDRM_ISA=avx512bf16 or amx):
        // the bf16 tolerance (DESIGN.md); every other case the f32 one.
        let tol = if common::bf16_compute(spec.dtype == Dtype::BF16) {
            2e-2
        } else {
            1e-5
        };
        check_close(&format!("variant {spec:?}"), &got, &want, tol);
        std::fs::remove_dir_all(dir).ok();
    }
}

#[test]
fn incremental_decode_equals_full_recompute() {
    let dir = tiny_model_dir("incremental", &TinySpec::default());
    let model = Llama::load_dir(&dir).unwrap();
    for cpu in [Cpu::reference(), Cpu::fast()] {
        let full = all_logits(&model, &cpu, &IDS);
        let v = model.config.vocab_size;
        // Prefill 4 tokens, then one at a time: each step's logits equal the full pass's row.
        let mut sess = model.new_session(64, 64);
        let first = model
            .forward(&cpu, &mut sess, &IDS[..4], LogitsMode::Last)
            .unwrap()
            .to_vec();
        check_close("prefill last", &first, &full[3 * v..4 * v], 1e-5);
        for t in 4..IDS.len() {
            let step = model
                .forward(&cpu, &mut sess, &IDS[t..t + 1], LogitsMode::Last)
                .unwrap();
            check_close(
                &format!("decode step {t}"),
                step,
                &full[t * v..(t + 1) * v],
                1e-5,
            );
        }
        // Chunked prefill (chunk 3) gives the same last logits as one pass.
        let mut small = model.new_session(64, 3);
        let chunked = model
            .forward(&cpu, &mut small, &IDS, LogitsMode::Last)
            .unwrap();
        check_close(
            "chunked prefill",
            chunked,
            &full[(IDS.len() - 1) * v..],
            1e-5,
        );
        // Truncate and re-run reproduces the same step.
        small.truncate(5);
        let again = model
            .forward(&cpu, &mut small, &IDS[5..6], LogitsMode::Last)
            .unwrap();
        check_close("after truncate", again, &full[5 * v..6 * v], 1e-5);
    }
    std::fs::remove_dir_all(dir).ok();
}

/// `generate::greedy` picks each token with the fused LM head + top-1 (no logits): the
/// same tokens as the argmax of the full logits at every step, on both CPU paths.
#[test]
fn greedy_generation_equals_argmax_of_full_logits() {
    use cloudrm::generate::{GreedyOptions, StopReason, greedy};
    let dir = tiny_model_dir("greedy", &TinySpec::default());
    let model = Llama::load_dir(&dir).unwrap();
    for cpu in [Cpu::reference(), Cpu::fast()] {
        let n = 12;
        let mut sess = model.new_session(64, 64);
        let (got, why) = greedy(
            &model,
            &cpu,
            &mut sess,
            &IDS[..4],
            &GreedyOptions {
                max_tokens: n,
                stop_ids: vec![],
            },
            |_| Ok(true),
        )
        .unwrap();
        assert_eq!(why, StopReason::MaxTokens);
        let mut sess = model.new_session(64, 64);
        let mut logits = model
            .forward(&cpu, &mut sess, &IDS[..4], LogitsMode::Last)
            .unwrap()
            .to_vec();
        let mut want = Vec::new();
        for _ in 0..n {
            let next = cloudrm::sampler::argmax(&logits).unwrap() as u32;
            want.push(next);
            logits = model
                .forward(&cpu, &mut sess, &[next], LogitsMode::Last)
                .unwrap()
                .to_vec();
        }
        assert_eq!(got, want);
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn bad_calls_are_typed_errors() {
    let dir = tiny_model_dir("badcalls", &TinySpec::default());
    let model = Llama::load_dir(&dir).unwrap();
    let cpu = Cpu::fast();
    let mut sess = model.new_session(4, 4);
    let err = model
        .forward(&cpu, &mut sess, &[1, 2, 3, 4, 5], LogitsMode::Last)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Model(ModelError::ContextFull {
                needed: 5,
                capacity: 4
            })
        ),
        "{err}"
    );
    let err = model
        .forward(&cpu, &mut sess, &[1, 97], LogitsMode::Last)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Model(ModelError::TokenOutOfRange {
                id: 97,
                position: 1,
                vocab: 97
            })
        ),
        "{err}"
    );
    let err = model
        .forward(&cpu, &mut sess, &[], LogitsMode::Last)
        .unwrap_err();
    assert!(matches!(err, Error::Model(ModelError::EmptyInput)), "{err}");
    assert_eq!(sess.len(), 0, "failed calls leave the session untouched");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn bad_checkpoints_are_typed_errors() {
    let spec = TinySpec::default();
    // Shape mismatch vs config: the config says 3 KV heads, the tensors have 2.
    let dir = temp_dir("shape-mismatch");
    let mut cfg = tiny_config(&spec);
    cfg["num_key_value_heads"] = 3.into();
    write_model(&dir, &tiny_tensors(&spec), &cfg, Dtype::F32);
    let err = Llama::load_dir(&dir).unwrap_err();
    assert!(
        matches!(&err, Error::Model(ModelError::ShapeMismatch { tensor, .. }) if tensor.ends_with("k_proj.weight")),
        "{err}"
    );
    // Missing tensor: untied config but no lm_head.weight.
    let mut cfg = tiny_config(&spec);
    cfg["tie_word_embeddings"] = false.into();
    write_model(&dir, &tiny_tensors(&spec), &cfg, Dtype::F32);
    let err = Llama::load_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("lm_head.weight"), "{err}");
    // Unsupported weight dtype.
    write_model(&dir, &tiny_tensors(&spec), &tiny_config(&spec), Dtype::I32);
    let err = Llama::load_dir(&dir).unwrap_err();
    assert!(
        matches!(err, Error::Model(ModelError::UnsupportedDtype { .. })),
        "{err}"
    );
    // No config.json.
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = Llama::load_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

/// Weights put on 2 MiB pages (`use_huge_pages`, copied or through the page cache by
/// whichever route) give bit-identical logits to the mapped ones; a second call finds
/// them there (or keeps the copy); it is refused once the weights are quantised (typed
/// usage error).
#[test]
fn resident_weights_give_identical_logits() {
    let spec = TinySpec {
        dtype: Dtype::BF16,
        // Multiples of 16 (q8's group) for the refusal check.
        hidden: 96,
        intermediate: 128,
        ..TinySpec::default()
    };
    let dir = tiny_model_dir("resident", &spec);
    let mapped = Llama::load_dir(&dir).unwrap();
    let cpu = Cpu::fast();
    let a = all_logits(&mapped, &cpu, &IDS);
    // A copy of the tiny checkpoint fits wherever /proc says how much memory is free.
    assert_eq!(
        mapped.weights.copy_fits(),
        std::fs::read_to_string("/proc/meminfo").is_ok_and(|m| m.contains("MemAvailable:"))
    );
    for how in [HugePages::PageCache, HugePages::Copy] {
        let mut resident = Llama::load_dir(&dir).unwrap();
        let first = resident.weights.use_huge_pages(how).unwrap();
        if how == HugePages::Copy {
            // Copied already: nothing left to copy.
            assert!(!resident.weights.copy_fits());
        }
        let second = resident.weights.use_huge_pages(how).unwrap();
        if how == HugePages::Copy {
            assert_eq!(
                (first, second),
                (HugePageRoute::Copied, HugePageRoute::Copied)
            );
        }
        assert!(
            second <= first && second != HugePageRoute::Reread,
            "{how:?}: {first:?} {second:?}"
        );
        let b = all_logits(&resident, &cpu, &IDS);
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{how:?}: weights on huge pages changed the logits"
        );
    }
    let mut q = Llama::load_dir(&dir).unwrap();
    q.weights.quantize_q8().unwrap();
    assert!(
        !q.weights.copy_fits(),
        "quantised weights are copies already"
    );
    let err = q.weights.use_huge_pages(HugePages::Copy).unwrap_err();
    assert!(
        matches!(err, Error::Usage(_)) && err.to_string().contains("q8"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// `--quantize q8` needs every matrix's rows to be whole groups of 16: a model whose
/// hidden or intermediate size is not gets a typed error naming the row length and the
/// sizes to check, before anything is half-quantised, and still runs on its 16-bit
/// weights with the same logits.
#[test]
fn q8_refuses_rows_that_are_not_whole_groups() {
    for (tag, hidden, heads, intermediate) in [("q8rows-mlp", 48, 6, 72), ("q8rows-c", 40, 4, 64)] {
        let spec = TinySpec {
            dtype: Dtype::BF16,
            hidden,
            heads,
            intermediate,
            ..TinySpec::default()
        };
        let dir = tiny_model_dir(tag, &spec);
        let mut model = Llama::load_dir(&dir).unwrap();
        let cpu = Cpu::fast();
        let before = all_logits(&model, &cpu, &IDS);
        let err = model.weights.quantize_q8().unwrap_err();
        let msg = err.to_string();
        let bad = if hidden % 16 != 0 {
            hidden
        } else {
            intermediate
        };
        assert!(
            msg.contains(&format!("rows of {bad} elements")) && msg.contains("multiples of 16"),
            "{tag}: {msg}"
        );
        assert!(!model.weights.is_quantized(), "{tag}");
        let after = all_logits(&model, &cpu, &IDS);
        assert!(
            before
                .iter()
                .zip(&after)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{tag}: a refused quantisation changed the logits"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}

/// Calibrated `--quantize q8`: the input energies are each matrix input's per-channel
/// sums of squares over the text (layer 0's attention input checked against RMSNorm of
/// the embedding rows by the reference ops, the head's against the final norm's output),
/// every layer matrix keeps exactly its most energetic input columns at 16 bits (the top
/// `row / 32` here), and the scales are the search weighted by those energies.
#[test]
fn q8_calibrated_keeps_the_most_energetic_input_columns() {
    use cloudrm::kernels::weights::{Q8Fit, q8_keep_len, quantize_q8_keep};
    use cloudrm::kernels::{Weights, reference};
    let spec = TinySpec {
        dtype: Dtype::BF16,
        hidden: 64,
        heads: 4,
        kv_heads: 2,
        intermediate: 128,
        ..TinySpec::default()
    };
    let dir = tiny_model_dir("q8calib", &spec);
    let mut model = Llama::load_dir(&dir).unwrap();
    let cpu = Cpu::fast();
    // Bad calibration input: typed errors, and the model stays unquantised.
    assert!(matches!(
        model.input_energies(&cpu, &[]),
        Err(Error::Model(ModelError::EmptyInput))
    ));
    let err = model
        .quantize_q8_calibrated(&cpu, &[1, 500, 2])
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Model(ModelError::TokenOutOfRange { id: 500, .. })
        ),
        "{err}"
    );
    assert!(!model.weights.is_quantized());
    let e = model.input_energies(&cpu, &IDS).unwrap();
    assert_eq!(e.layers.len(), spec.layers);
    assert_eq!(e.head.len(), 64);
    assert!(e.head.iter().all(|v| v.is_finite() && *v >= 0.0));
    for l in &e.layers {
        let lens: Vec<usize> = l.iter().map(|v| v.len()).collect();
        assert_eq!(lens, [64, 64, 64, 128]);
        assert!(l.iter().flatten().all(|v| v.is_finite() && *v >= 0.0));
    }
    // Layer 0's Q/K/V input: rmsnorm(embedding rows) with the attention norm.
    let w = &model.weights;
    let embed = w.get(&w.embed);
    let rows: Vec<f32> = IDS
        .iter()
        .flat_map(|&id| (0..64).map(move |j| embed.get(id as usize * 64 + j)))
        .collect();
    let mut xn = vec![0f32; rows.len()];
    let eps = model.config.rms_norm_eps;
    reference::rmsnorm::rmsnorm_forward(&mut xn, &rows, w.get(&w.layers[0].attn_norm), eps)
        .unwrap();
    let want: Vec<f32> = (0..64)
        .map(|j| xn.chunks(64).map(|r| (r[j] as f64).powi(2)).sum::<f64>() as f32)
        .collect();
    let got: Vec<f32> = e.layers[0][0].iter().map(|&v| v as f32).collect();
    check_close("layer 0 attention input energy", &got, &want, 1e-5);
    // The head's input energy over IDS less that over all but the last token: the
    // squared norm of the last position's final-normed hidden state.
    let n = IDS.len();
    let shorter = model.input_energies(&cpu, &IDS[..n - 1]).unwrap();
    let last: f64 = e.head.iter().sum::<f64>() - shorter.head.iter().sum::<f64>();
    let mut sess = model.new_session(n, n);
    let mut trace = cloudrm::model::Trace::default();
    model
        .forward_traced(&cpu, &mut sess, &IDS, LogitsMode::Last, Some(&mut trace))
        .unwrap();
    let want = (trace.final_norm_norm as f64).powi(2);
    assert!(
        (last - want).abs() <= 1e-4 * want,
        "head input energy of the last position {last}, its final norm squared {want}"
    );
    // Every matrix's scales are the search's (`Q8Fit::Search`) weighted by its inputs'
    // energies over their mean: layer 0's Q with its kept columns, and the tied
    // embedding/head (no kept columns) by the head's.
    let (wq, embed_bf16) = (
        model.weights.get(&model.weights.layers[0].q_proj),
        model.weights.get(&model.weights.embed),
    );
    let (wq, embed_bf16) = (wq.to_f32_vec(), embed_bf16.to_f32_vec());
    // Energies that do not fit the model: typed errors, nothing quantised.
    let mut fewer = e.clone();
    fewer.layers.pop();
    let mut narrow = e.clone();
    narrow.layers[1][3].pop();
    let mut nan = e.clone();
    nan.head[3] = f64::NAN;
    let mut negative = e.clone();
    negative.layers[0][1][2] = -1.0;
    for (bad, what) in [
        (fewer, "for 1 layers; the model has 2"),
        (
            narrow,
            "layer 1's down input: 127 channels, its matrix's rows 128",
        ),
        (nan, "head's input: NaN at channel 3"),
        (negative, "layer 0's O input: -1 at channel 2"),
    ] {
        let err = model.weights.quantize_q8_with(Some(&bad)).unwrap_err();
        assert!(
            matches!(err, Error::Model(ModelError::Quantize(_))) && err.to_string().contains(what),
            "{err}"
        );
        assert!(!model.weights.is_quantized());
    }
    // An empty vector is "not measured": that input takes the weight-only estimate (the
    // attention norm's weights squared for Q), the others stay measured.
    let mut partial = e.clone();
    partial.layers[0][0].clear();
    partial.head.clear();
    let mut other = Llama::load_dir(&dir).unwrap();
    let g: Vec<f64> = {
        let n = other.weights.get(&other.weights.layers[0].attn_norm);
        (0..64).map(|j| (n.get(j) as f64).powi(2)).collect()
    };
    other.weights.quantize_q8_with(Some(&partial)).unwrap();
    let kept_of = |m: &Llama, h| match m.weights.get(h) {
        Weights::Q8(q) => q.keep().expect("kept columns").cols().to_vec(),
        _ => panic!("not quantised"),
    };
    // The k most energetic columns, ascending (ties to the lower).
    let top = |v: &[f64], k: usize| {
        let mut i: Vec<u32> = (0..v.len() as u32).collect();
        i.sort_by(|&a, &b| v[b as usize].total_cmp(&v[a as usize]).then(a.cmp(&b)));
        i.truncate(k);
        i.sort_unstable();
        i
    };
    assert_eq!(kept_of(&other, &other.weights.layers[0].q_proj), top(&g, 2));
    assert_eq!(
        kept_of(&other, &other.weights.layers[0].down_proj),
        top(&e.layers[0][3], 4)
    );
    model.quantize_q8_calibrated(&cpu, &IDS).unwrap();
    let weighted = |v: &[f64]| -> Vec<f32> {
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        v.iter().map(|&x| (x / mean) as f32).collect()
    };
    for (name, src, row, handle, energy) in [
        (
            "layer 0 Q",
            &wq,
            64usize,
            model.weights.layers[0].q_proj,
            &e.layers[0][0],
        ),
        ("embedding", &embed_bf16, 64, model.weights.embed, &e.head),
    ] {
        let Weights::Q8(got) = model.weights.get(&handle) else {
            panic!("{name}: not quantised")
        };
        let cols = got.keep().map_or(Vec::new(), |k| k.cols().to_vec());
        let imp = weighted(energy);
        let mut q = vec![0i8; src.len()];
        let mut sc = vec![half::bf16::ZERO; src.len() / 16];
        let mut vals = vec![half::bf16::ZERO; q8_keep_len(src.len() / row, cols.len())];
        quantize_q8_keep(
            Weights::F32(src),
            row,
            &cols,
            Q8Fit::Search(Some(&imp)),
            &mut q,
            &mut sc,
            &mut vals,
        )
        .unwrap();
        assert!(
            got.scales() == &sc[..],
            "{name}: scales not the weighted search's"
        );
        assert!(
            got.q() == &q[..],
            "{name}: int8 values not the weighted search's"
        );
    }
    let w = &model.weights;
    for (l, lw) in w.layers.iter().enumerate() {
        for (m, kind, k) in [
            (&lw.q_proj, 0, 2),
            (&lw.k_proj, 0, 2),
            (&lw.v_proj, 0, 2),
            (&lw.o_proj, 1, 2),
            (&lw.gate_proj, 2, 2),
            (&lw.up_proj, 2, 2),
            (&lw.down_proj, 3, 4),
        ] {
            let Weights::Q8(q) = w.get(m) else {
                panic!("layer {l}: not quantised")
            };
            let kept = q.keep().expect("kept columns").cols().to_vec();
            assert_eq!(
                kept,
                top(&e.layers[l][kind], k),
                "layer {l}, input kind {kind}"
            );
        }
    }
    // The calibrated model still runs, close to the 16-bit one.
    let bf16 = Llama::load_dir(&dir).unwrap();
    let (a, b) = (
        all_logits(&bf16, &cpu, &IDS),
        all_logits(&model, &cpu, &IDS),
    );
    let rel = (a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>())
    .sqrt();
    assert!(rel < 5e-2, "calibrated q8 logits rel L2 {rel}");
    std::fs::remove_dir_all(dir).ok();
}
