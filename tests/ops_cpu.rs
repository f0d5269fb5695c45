//! Layer 2: every fast CPU path against the scalar reference, on seeded random inputs of
//! awkward sizes, with guard bands on outputs, for every ISA path this machine has and
//! for 1 and 2 threads. Filter cases with CLOUDRM_OP_FILTER=<substring>.

mod common;

use cloudrm::kernels::cpu::dispatch::{self, Isa};
use cloudrm::kernels::reference::attention::AttnShape;
use cloudrm::kernels::reference::heads::RewardHeadWeights;
use cloudrm::kernels::weights::{
    Q8_FIT_SCALES, Q8_GROUP, Q8Fit, Q8Slice, q8_keep_len, quantize_q8, quantize_q8_keep,
};
use cloudrm::kernels::{OpKind, Weights, cpu, reference};
use common::{Guarded, OpCase, Rng, bf16_compute, check_close, check_close_floor, run_cases};
use half::{bf16, f16};

const F32_TOL: f64 = 1e-5;

/// A fast matmul's output against the reference: the f32 tolerance, or on the opt-in
/// bf16-compute paths (AVX512_BF16, AMX) with bf16 weights the bf16 one (relative to values of order one, so
/// a sum that cancels near zero is held to it in absolute terms).
fn check_matmul(name: &str, got: &[f32], want: &[f32], w: Weights<'_>) {
    if bf16_compute(matches!(w, Weights::BF16(_))) {
        check_close_floor(name, got, want, 1e-2, (got.len() as f64).sqrt());
    } else {
        check_close(name, got, want, F32_TOL);
    }
}

/// The tolerance of an op whose products go through the fast matmul with weights of
/// type `wd`: the bf16 one on an opt-in bf16-compute path with bf16 weights, else f32's.
fn matmul_tol(wd: Wd) -> f64 {
    if bf16_compute(matches!(wd, Wd::Bf16)) {
        1e-2
    } else {
        F32_TOL
    }
}

/// Held by the tests that force an ISA path (process-wide), so they do not overlap.
static ISA_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
const ROWS: [usize; 4] = [1, 7, 33, 130];
const DIMS: [usize; 7] = [1, 7, 33, 41, 64, 577, 1025];

#[derive(Clone, Copy, Debug)]
enum Wd {
    F32,
    Bf16,
    F16,
}

/// Owned weights in one dtype.
enum Owned {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Owned {
    fn new(data: &[f32], wd: Wd) -> Owned {
        match wd {
            Wd::F32 => Owned::F32(data.to_vec()),
            Wd::Bf16 => Owned::Bf16(data.iter().map(|&x| bf16::from_f32(x)).collect()),
            Wd::F16 => Owned::F16(data.iter().map(|&x| f16::from_f32(x)).collect()),
        }
    }

    fn view(&self) -> Weights<'_> {
        match self {
            Owned::F32(w) => Weights::F32(w),
            Owned::Bf16(w) => Weights::BF16(w),
            Owned::F16(w) => Weights::F16(w),
        }
    }
}

fn cases() -> Vec<OpCase> {
    let mut cases = Vec::new();
    let mut seed = 1u64;
    let mut next_seed = || {
        seed += 1;
        seed
    };
    for wd in [Wd::F32, Wd::Bf16, Wd::F16] {
        for &rows in &ROWS {
            for &dim in &DIMS {
                let s = next_seed();
                cases.push(OpCase {
                    name: format!("rmsnorm_fwd(rows={rows},dim={dim},eps=1e-5,w={wd:?})"),
                    kind: OpKind::RmsNorm,
                    run: Box::new(move || {
                        let mut rng = Rng::new(s);
                        let x = rng.vec(rows * dim, 3.0);
                        let w = Owned::new(&rng.vec(dim, 1.0), wd);
                        let mut want = vec![0.0; rows * dim];
                        reference::rmsnorm::rmsnorm_forward(&mut want, &x, w.view(), 1e-5).unwrap();
                        let mut got = Guarded::new(rows * dim);
                        cpu::rmsnorm_forward(got.as_mut(), &x, w.view(), 1e-5).unwrap();
                        got.check_guards("rmsnorm");
                        check_close("rmsnorm", got.as_ref(), &want, F32_TOL);
                    }),
                });
                let s = next_seed();
                cases.push(OpCase {
                    name: format!("embedding_fwd(rows={rows},dim={dim},vocab=13,w={wd:?})"),
                    kind: OpKind::Embedding,
                    run: Box::new(move || {
                        let mut rng = Rng::new(s);
                        let table = Owned::new(&rng.vec(13 * dim, 1.0), wd);
                        let ids: Vec<u32> = (0..rows).map(|_| rng.below(13) as u32).collect();
                        let mut want = vec![0.0; rows * dim];
                        reference::embedding::embedding_forward(&mut want, &ids, table.view(), dim)
                            .unwrap();
                        let mut got = Guarded::new(rows * dim);
                        cpu::embedding_forward(got.as_mut(), &ids, table.view(), dim).unwrap();
                        got.check_guards("embedding");
                        check_close("embedding", got.as_ref(), &want, F32_TOL);
                    }),
                });
            }
            // Matmul: (rows, C) x (OC, C)^T, with and without bias.
            for &(c, oc) in &[
                (1, 1),
                (7, 33),
                (64, 577),
                (577, 64),
                (1025, 7),
                (576, 1536),
                (1536, 576),
            ] {
                for bias in [false, true] {
                    let s = next_seed();
                    cases.push(OpCase {
                        name: format!("matmul_fwd(rows={rows},c={c},oc={oc},bias={bias},w={wd:?})"),
                        kind: OpKind::Matmul,
                        run: Box::new(move || {
                            let mut rng = Rng::new(s);
                            let x = rng.vec(rows * c, 1.0);
                            let w = Owned::new(&rng.vec(oc * c, 0.5), wd);
                            let b = bias.then(|| rng.vec(oc, 1.0));
                            let mut want = vec![0.0; rows * oc];
                            reference::matmul::matmul_forward(
                                &mut want,
                                &x,
                                w.view(),
                                b.as_deref(),
                                c,
                                oc,
                            )
                            .unwrap();
                            let mut got = Guarded::new(rows * oc);
                            cpu::matmul_forward(got.as_mut(), &x, w.view(), b.as_deref(), c, oc)
                                .unwrap();
                            got.check_guards("matmul");
                            check_matmul("matmul", got.as_ref(), &want, w.view());
                        }),
                    });
                }
            }
        }
    }
    // Fused Q/K/V-style matmuls (one pool job) against the reference per layer.
    for &rows in &ROWS {
        for wd in [Wd::F32, Wd::Bf16] {
            let s = next_seed();
            cases.push(OpCase {
                name: format!("matmul_many(rows={rows},w={wd:?})"),
                kind: OpKind::Matmul,
                run: Box::new(move || {
                    let mut rng = Rng::new(s);
                    let c = 67;
                    let ocs = [577usize, 7, 64];
                    let x = rng.vec(rows * c, 1.0);
                    let ws: Vec<Owned> = ocs
                        .iter()
                        .map(|&oc| Owned::new(&rng.vec(oc * c, 0.5), wd))
                        .collect();
                    let bias = rng.vec(7, 1.0);
                    let mut got: Vec<Guarded> =
                        ocs.iter().map(|&oc| Guarded::new(rows * oc)).collect();
                    {
                        let [g0, g1, g2] = &mut got[..] else {
                            unreachable!()
                        };
                        let mut layers = [
                            cpu::Linear {
                                out: g0.as_mut(),
                                weight: ws[0].view(),
                                bias: None,
                                out_features: ocs[0],
                            },
                            cpu::Linear {
                                out: g1.as_mut(),
                                weight: ws[1].view(),
                                bias: Some(&bias),
                                out_features: ocs[1],
                            },
                            cpu::Linear {
                                out: g2.as_mut(),
                                weight: ws[2].view(),
                                bias: None,
                                out_features: ocs[2],
                            },
                        ];
                        cpu::matmul_forward_many(&mut layers, &x, c).unwrap();
                    }
                    for (i, &oc) in ocs.iter().enumerate() {
                        let mut want = vec![0.0; rows * oc];
                        let b = (i == 1).then_some(&bias[..]);
                        reference::matmul::matmul_forward(&mut want, &x, ws[i].view(), b, c, oc)
                            .unwrap();
                        got[i].check_guards("matmul_many");
                        check_matmul("matmul_many", got[i].as_ref(), &want, ws[i].view());
                    }
                }),
            });
        }
    }
    // Gate/up matmuls + SwiGLU in one job: bit for bit the fast unfused sequence (odd
    // widths put the last partial vector group mid-row and the scalar tail in the last
    // row), within tolerance of the reference; Q8 weights included.
    for &rows in &ROWS {
        for (wd, c, oc) in [
            (Some(Wd::F32), 7, 13),
            (Some(Wd::Bf16), 67, 577),
            (Some(Wd::F16), 576, 1536),
            (Some(Wd::Bf16), 33, 1537),
            (None, 64, 83),
        ] {
            let s = next_seed();
            cases.push(OpCase {
                name: format!("matmul_swiglu(rows={rows},c={c},oc={oc},w={wd:?})"),
                kind: OpKind::SwiGlu,
                run: Box::new(move || {
                    let mut rng = Rng::new(s);
                    let x = rng.vec(rows * c, 1.0);
                    let (gw, uw) = (rng.vec(oc * c, 0.5), rng.vec(oc * c, 0.5));
                    let gb = rng.vec(oc, 2.0);
                    let owned = |w: &[f32]| match wd {
                        Some(wd) => (Some(Owned::new(w, wd)), None),
                        None => (None, Some(q8(w))),
                    };
                    let (go, gq) = owned(&gw);
                    let (uo, uq) = owned(&uw);
                    let (g, u) = (q8_or(&go, &gq), q8_or(&uo, &uq));
                    let mut fused = Guarded::new(rows * oc);
                    cpu::matmul_swiglu(fused.as_mut(), &x, g, Some(&gb), u, None, c, oc, None)
                        .unwrap();
                    fused.check_guards("matmul_swiglu");
                    let (mut gate, mut up) = (vec![0.0; rows * oc], vec![0.0; rows * oc]);
                    cpu::matmul_forward(&mut gate, &x, g, Some(&gb), c, oc).unwrap();
                    cpu::matmul_forward(&mut up, &x, u, None, c, oc).unwrap();
                    let mut unfused = vec![0.0; rows * oc];
                    cpu::swiglu_forward(&mut unfused, &gate, &up).unwrap();
                    assert_bits_eq("matmul_swiglu vs unfused", fused.as_ref(), &unfused);
                    reference::matmul::matmul_forward(&mut gate, &x, g, Some(&gb), c, oc).unwrap();
                    reference::matmul::matmul_forward(&mut up, &x, u, None, c, oc).unwrap();
                    let mut want = vec![0.0; rows * oc];
                    reference::swiglu::swiglu_forward(&mut want, &gate, &up).unwrap();
                    check_matmul("matmul_swiglu", fused.as_ref(), &want, g);
                    // Bad shapes are typed errors.
                    assert!(
                        cpu::matmul_swiglu(&mut unfused[1..], &x, g, None, u, None, c, oc, None)
                            .is_err()
                    );
                }),
            });
        }
    }
    // The attention block's fused input half: RMSNorm in the input pass, Q/K/V in one
    // job, RoPE on Q and K in the epilogue. Bit for bit the fast unfused ops, within
    // tolerance of the reference ones; a misfitting table or norm is a typed error.
    for &rows in &ROWS {
        for (wd, c, hd, nh, nkv) in [
            (Wd::F32, 67, 6, 7, 3),
            (Wd::Bf16, 577, 64, 9, 3),
            (Wd::F16, 33, 2, 5, 1),
        ] {
            let s = next_seed();
            cases.push(OpCase {
                name: format!("matmul_many_fused(rows={rows},c={c},hd={hd},w={wd:?})"),
                kind: OpKind::Matmul,
                run: Box::new(move || {
                    let mut rng = Rng::new(s);
                    let ocs = [nh * hd, nkv * hd, nkv * hd + 1];
                    let x = rng.vec(rows * c, 2.0);
                    let norm_w = Owned::new(&rng.vec(c, 1.0), wd);
                    let ws: Vec<Owned> = ocs
                        .iter()
                        .map(|&oc| Owned::new(&rng.vec(oc * c, 0.5), wd))
                        .collect();
                    let bias = rng.vec(ocs[1], 1.0);
                    let positions: Vec<u32> = (0..rows)
                        .map(|i| (1000 + 37 * i + rng.below(30)) as u32)
                        .collect();
                    let inv: Vec<f32> = (0..hd / 2)
                        .map(|i| 10000f32.powf(-2.0 * i as f32 / hd as f32))
                        .collect();
                    let mut table = cpu::RopeTable::default();
                    table.fill(&positions, &inv).unwrap();
                    let norm = cpu::NormIn {
                        weight: norm_w.view(),
                        eps: 1e-5,
                    };
                    let fusion = cpu::Fusion {
                        norm: Some(norm),
                        rope: Some(cpu::RopeOut {
                            table: &table,
                            layers: 2,
                        }),
                    };
                    let mut got: Vec<Guarded> =
                        ocs.iter().map(|&oc| Guarded::new(rows * oc)).collect();
                    let run = |got: &mut [Guarded], fusion: cpu::Fusion<'_>, x: &[f32]| {
                        let [g0, g1, g2] = got else { unreachable!() };
                        let mut layers = [
                            cpu::Linear {
                                out: g0.as_mut(),
                                weight: ws[0].view(),
                                bias: None,
                                out_features: ocs[0],
                            },
                            cpu::Linear {
                                out: g1.as_mut(),
                                weight: ws[1].view(),
                                bias: Some(&bias),
                                out_features: ocs[1],
                            },
                            cpu::Linear {
                                out: g2.as_mut(),
                                weight: ws[2].view(),
                                bias: None,
                                out_features: ocs[2],
                            },
                        ];
                        cpu::matmul_forward_many_fused(&mut layers, x, c, fusion)
                    };
                    run(&mut got, fusion, &x).unwrap();
                    // The fast unfused sequence.
                    let mut xn = vec![0.0; rows * c];
                    cpu::rmsnorm_forward(&mut xn, &x, norm_w.view(), 1e-5).unwrap();
                    let mut fast = Vec::new();
                    let mut want = Vec::new();
                    let mut xr = vec![0.0; rows * c];
                    reference::rmsnorm::rmsnorm_forward(&mut xr, &x, norm_w.view(), 1e-5).unwrap();
                    for (i, &oc) in ocs.iter().enumerate() {
                        let b = (i == 1).then_some(&bias[..]);
                        let mut f = vec![0.0; rows * oc];
                        cpu::matmul_forward(&mut f, &xn, ws[i].view(), b, c, oc).unwrap();
                        let mut r = vec![0.0; rows * oc];
                        reference::matmul::matmul_forward(&mut r, &xr, ws[i].view(), b, c, oc)
                            .unwrap();
                        if i < 2 {
                            cpu::rope_forward(&mut f, &positions, oc / hd, hd, &inv).unwrap();
                            reference::rope::rope_forward(&mut r, &positions, oc / hd, hd, &inv)
                                .unwrap();
                        }
                        fast.push(f);
                        want.push(r);
                    }
                    for i in 0..3 {
                        got[i].check_guards("matmul_many_fused");
                        assert_bits_eq("matmul_many_fused vs unfused", got[i].as_ref(), &fast[i]);
                        check_matmul("matmul_many_fused", got[i].as_ref(), &want[i], ws[i].view());
                    }
                    // Misfits are typed errors.
                    let mut short = cpu::RopeTable::default();
                    short.fill(&positions[1..], &inv).unwrap();
                    let cases: [(&str, cpu::Fusion<'_>); 3] = [
                        (
                            "table rows",
                            cpu::Fusion {
                                norm: None,
                                rope: Some(cpu::RopeOut {
                                    table: &short,
                                    layers: 2,
                                }),
                            },
                        ),
                        (
                            "rotated V (not whole heads)",
                            cpu::Fusion {
                                norm: None,
                                rope: Some(cpu::RopeOut {
                                    table: &table,
                                    layers: 3,
                                }),
                            },
                        ),
                        (
                            "norm weight length",
                            cpu::Fusion {
                                norm: Some(cpu::NormIn {
                                    weight: ws[1].view(),
                                    eps: 1e-5,
                                }),
                                rope: None,
                            },
                        ),
                    ];
                    for (what, f) in cases {
                        assert!(run(&mut got, f, &x).is_err(), "{what}: not an error");
                    }
                    let empty = cpu::RopeTable::default();
                    let f = cpu::Fusion {
                        norm: None,
                        rope: Some(cpu::RopeOut {
                            table: &empty,
                            layers: 1,
                        }),
                    };
                    assert!(
                        run(&mut got, f, &x).is_err(),
                        "an empty table: not an error"
                    );
                    assert!(cpu::RopeTable::default().fill(&positions, &[]).is_err());
                }),
            });
        }
    }
    // Gate/up + SwiGLU with the MLP norm in the input pass: bit for bit the fast norm then
    // the unnormed fused call.
    for &rows in &ROWS {
        for (wd, c, oc) in [(Wd::Bf16, 67, 577), (Wd::F32, 576, 1536), (Wd::F16, 7, 13)] {
            let s = next_seed();
            cases.push(OpCase {
                name: format!("matmul_swiglu_normed(rows={rows},c={c},oc={oc},w={wd:?})"),
                kind: OpKind::SwiGlu,
                run: Box::new(move || {
                    let mut rng = Rng::new(s);
                    let x = rng.vec(rows * c, 3.0);
                    let norm_w = Owned::new(&rng.vec(c, 1.0), wd);
                    let g = Owned::new(&rng.vec(oc * c, 0.5), wd);
                    let u = Owned::new(&rng.vec(oc * c, 0.5), wd);
                    let norm = cpu::NormIn {
                        weight: norm_w.view(),
                        eps: 1e-6,
                    };
                    let (g, u) = (g.view(), u.view());
                    let mut fused = Guarded::new(rows * oc);
                    cpu::matmul_swiglu(fused.as_mut(), &x, g, None, u, None, c, oc, Some(norm))
                        .unwrap();
                    fused.check_guards("matmul_swiglu_normed");
                    let mut xn = vec![0.0; rows * c];
                    cpu::rmsnorm_forward(&mut xn, &x, norm_w.view(), 1e-6).unwrap();
                    let mut unfused = vec![0.0; rows * oc];
                    cpu::matmul_swiglu(&mut unfused, &xn, g, None, u, None, c, oc, None).unwrap();
                    assert_bits_eq("matmul_swiglu_normed vs unfused", fused.as_ref(), &unfused);
                    let bad = cpu::NormIn {
                        weight: g.slice(0, c + 1),
                        eps: 1e-6,
                    };
                    assert!(
                        cpu::matmul_swiglu(&mut unfused, &x, g, None, u, None, c, oc, Some(bad))
                            .is_err()
                    );
                }),
            });
        }
    }
    for &rows in &ROWS {
        for &dim in &DIMS {
            let s = next_seed();
            cases.push(OpCase {
                name: format!("swiglu_fwd(rows={rows},dim={dim})"),
                kind: OpKind::SwiGlu,
                run: Box::new(move || {
                    let mut rng = Rng::new(s);
                    let g = rng.vec(rows * dim, 8.0);
                    let u = rng.vec(rows * dim, 2.0);
                    let mut want = vec![0.0; rows * dim];
                    reference::swiglu::swiglu_forward(&mut want, &g, &u).unwrap();
                    let mut got = Guarded::new(rows * dim);
                    cpu::swiglu_forward(got.as_mut(), &g, &u).unwrap();
                    got.check_guards("swiglu");
                    check_close("swiglu", got.as_ref(), &want, F32_TOL);
                }),
            });
            let s = next_seed();
            cases.push(OpCase {
                name: format!("residual_fwd(rows={rows},dim={dim})"),
                kind: OpKind::Residual,
                run: Box::new(move || {
                    let mut rng = Rng::new(s);
                    let a = rng.vec(rows * dim, 2.0);
                    let x = rng.vec(rows * dim, 2.0);
                    let mut want = a.clone();
                    reference::residual::residual_forward(&mut want, &x).unwrap();
                    let mut got = Guarded::from(&a);
                    cpu::residual_forward(got.as_mut(), &x).unwrap();
                    got.check_guards("residual");
                    check_close("residual", got.as_ref(), &want, F32_TOL);
                }),
            });
        }
    }
    // Fused LM head + top-k: exactly the fast matmul's logits, sorted (the fast kernel
    // computes each block with the matmul's code), and within the reference's tolerance.
    for wd in [Wd::F32, Wd::Bf16, Wd::F16] {
        for &(rows, c, v, k) in &[
            (1usize, 7usize, 5usize, 1usize),
            (3, 64, 385, 4),
            (2, 33, 1000, 1),
            (8, 576, 4099, 3),
        ] {
            let s = next_seed();
            cases.push(OpCase {
                name: format!("lm_head_topk(rows={rows},c={c},v={v},k={k},w={wd:?})"),
                kind: OpKind::LmHeadTopK,
                run: Box::new(move || {
                    use cloudrm::kernels::reference::heads::{TopLogit, top_order};
                    let mut rng = Rng::new(s);
                    let h = rng.vec(rows * c, 1.0);
                    let lm = Owned::new(&rng.vec(v * c, 0.5), wd);
                    let mut logits = vec![0.0; rows * v];
                    cpu::matmul_forward(&mut logits, &h, lm.view(), None, c, v).unwrap();
                    let mut got = vec![
                        TopLogit {
                            token: 0,
                            logit: 0.0
                        };
                        rows * k
                    ];
                    cpu::lm_head_topk(&mut got, &h, lm.view(), c, v, k).unwrap();
                    let mut want_ref = got.clone();
                    reference::heads::lm_head_topk(&mut want_ref, &h, lm.view(), c, v, k).unwrap();
                    for r in 0..rows {
                        let mut all: Vec<TopLogit> = logits[r * v..(r + 1) * v]
                            .iter()
                            .enumerate()
                            .map(|(t, &logit)| TopLogit {
                                token: t as u32,
                                logit,
                            })
                            .collect();
                        all.sort_by(|a, b| top_order(*a, *b));
                        assert_eq!(&got[r * k..(r + 1) * k], &all[..k], "row {r}");
                        let g: Vec<f32> = got[r * k..(r + 1) * k].iter().map(|t| t.logit).collect();
                        let w: Vec<f32> = want_ref[r * k..(r + 1) * k]
                            .iter()
                            .map(|t| t.logit)
                            .collect();
                        check_matmul("lm_head_topk", &g, &w, lm.view());
                    }
                }),
            });
        }
    }
    for wd in [Wd::F32, Wd::Bf16, Wd::F16] {
        for &(rows, c, v) in &[(1usize, 7usize, 5usize), (3, 64, 33), (7, 577, 13)] {
            for dense in [false, true] {
                let s = next_seed();
                cases.push(OpCase {
                    name: format!("reward_head_fwd(rows={rows},c={c},dense={dense},w={wd:?})"),
                    kind: OpKind::RewardHead,
                    run: Box::new(move || {
                        let mut rng = Rng::new(s);
                        let h = rng.vec(rows * c, 1.0);
                        let w_out = Owned::new(&rng.vec(c, 0.5), wd);
                        let w_dense = Owned::new(&rng.vec(c * c, 0.2), wd);
                        let b_dense = rng.vec(c, 0.1);
                        let head = if dense {
                            RewardHeadWeights::DenseTanh {
                                dense_w: w_dense.view(),
                                dense_b: &b_dense,
                                out_w: w_out.view(),
                                out_b: 0.25,
                            }
                        } else {
                            RewardHeadWeights::Linear {
                                w: w_out.view(),
                                b: -0.5,
                            }
                        };
                        let mut scratch = vec![0.0; c];
                        let mut want = vec![0.0; rows];
                        reference::heads::reward_head_forward(&mut want, &h, &head, &mut scratch)
                            .unwrap();
                        let mut got = Guarded::new(rows);
                        cpu::reward_head_forward(got.as_mut(), &h, &head, &mut scratch).unwrap();
                        got.check_guards("reward_head");
                        let tol = matmul_tol(wd);
                        check_close_floor("reward_head", got.as_ref(), &want, tol, 1.0);
                    }),
                });
                let s = next_seed();
                cases.push(OpCase {
                    name: format!("dual_head_fwd(rows={rows},c={c},v={v},dense={dense},w={wd:?})"),
                    kind: OpKind::DualHead,
                    run: Box::new(move || {
                        let mut rng = Rng::new(s);
                        let h = rng.vec(rows * c, 1.0);
                        let lm = Owned::new(&rng.vec(v * c, 0.5), wd);
                        let w_out = Owned::new(&rng.vec(c, 0.5), wd);
                        let w_dense = Owned::new(&rng.vec(c * c, 0.2), wd);
                        let b_dense = rng.vec(c, 0.1);
                        let head = if dense {
                            RewardHeadWeights::DenseTanh {
                                dense_w: w_dense.view(),
                                dense_b: &b_dense,
                                out_w: w_out.view(),
                                out_b: 0.25,
                            }
                        } else {
                            RewardHeadWeights::Linear {
                                w: w_out.view(),
                                b: -0.5,
                            }
                        };
                        // Even rows generate, odd rows are scored.
                        let lm_rows: Vec<usize> = (0..rows).step_by(2).collect();
                        let rw_rows: Vec<usize> = (1..rows).step_by(2).collect();
                        let mut scratch = vec![0.0; c];
                        let mut want_l = vec![0.0; lm_rows.len() * v];
                        let mut want_r = vec![0.0; rw_rows.len()];
                        reference::heads::dual_head_forward(
                            &mut want_l,
                            &mut want_r,
                            &h,
                            c,
                            &lm_rows,
                            &rw_rows,
                            lm.view(),
                            &head,
                            &mut scratch,
                        )
                        .unwrap();
                        let mut got_l = Guarded::new(want_l.len());
                        let mut got_r = Guarded::new(want_r.len());
                        cpu::dual_head_forward(
                            got_l.as_mut(),
                            got_r.as_mut(),
                            &h,
                            c,
                            &lm_rows,
                            &rw_rows,
                            lm.view(),
                            &head,
                            &mut scratch,
                        )
                        .unwrap();
                        got_l.check_guards("dual_head logits");
                        got_r.check_guards("dual_head rewards");
                        let tol = matmul_tol(wd);
                        check_close("dual_head logits", got_l.as_ref(), &want_l, tol);
                        check_close_floor("dual_head rewards", got_r.as_ref(), &want_r, tol, 1.0);
                    }),
                });
            }
        }
    }
    // 320: a half head dim above the fast path's stack table (the reference runs).
    for &hs in &[64usize, 128, 320] {
        for &(nh, nkv) in &[(3usize, 3usize), (9, 3), (8, 1)] {
            for &(t, pos0) in &[
                (1usize, 0usize),
                (1, 15),
                (1, 16),
                (1, 17),
                (7, 0),
                (5, 12),
                (33, 1),
            ] {
                let s = next_seed();
                cases.push(OpCase {
                    name: format!("rope_fwd(rows={t},pos0={pos0},heads={nh},hs={hs})"),
                    kind: OpKind::Rope,
                    run: Box::new(move || {
                        let mut rng = Rng::new(s);
                        let x = rng.vec(t * nh * hs, 1.0);
                        let inv: Vec<f32> = (0..hs / 2)
                            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hs as f32))
                            .collect();
                        let pos: Vec<u32> = (0..t).map(|i| (pos0 + i * 37) as u32).collect();
                        let mut want = x.clone();
                        reference::rope::rope_forward(&mut want, &pos, nh, hs, &inv).unwrap();
                        let mut got = Guarded::from(&x);
                        cpu::rope_forward(got.as_mut(), &pos, nh, hs, &inv).unwrap();
                        got.check_guards("rope");
                        // The fast RoPE computes each position's table once for all heads
                        // with the reference's arithmetic: the same bits.
                        assert!(
                            got.as_ref()
                                .iter()
                                .zip(&want)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "rope differs from the reference (heads {nh}, hs {hs})"
                        );
                    }),
                });
                let s = next_seed();
                cases.push(OpCase {
                    name: format!("attention_fwd(t={t},pos0={pos0},nh={nh},nkv={nkv},hs={hs})"),
                    kind: OpKind::Attention,
                    run: Box::new(move || {
                        let mut rng = Rng::new(s);
                        let s_len = pos0 + t;
                        let q = rng.vec(t * nh * hs, 2.0);
                        let k = rng.vec(s_len * nkv * hs, 2.0);
                        let v = rng.vec(s_len * nkv * hs, 1.0);
                        let shape = AttnShape {
                            n_tokens: t,
                            pos0,
                            n_heads: nh,
                            n_kv_heads: nkv,
                            head_dim: hs,
                        };
                        let mut scores = vec![0.0; s_len];
                        let mut want = vec![0.0; t * nh * hs];
                        reference::attention::attention_forward(
                            &mut want,
                            &q,
                            &k,
                            &v,
                            &mut scores,
                            shape,
                        )
                        .unwrap();
                        let mut got = Guarded::new(t * nh * hs);
                        cpu::attention_forward(got.as_mut(), &q, &k, &v, &mut scores, shape)
                            .unwrap();
                        got.check_guards("attention");
                        check_close("attention", got.as_ref(), &want, F32_TOL);
                    }),
                });
            }
        }
    }
    // Paged decode and cascade attention: K sequences over a shared prefix in shuffled
    // blocks of 16, block-boundary lengths.
    for &(nh, nkv, hs) in &[
        (3usize, 3usize, 64usize),
        (9, 3, 64),
        (16, 2, 128),
        (24, 3, 8),
        (6, 3, 24),
        (4, 2, 40),
        (6, 2, 7),
    ] {
        // Prefixes across the fast kernel's 64-position chunks and 256-position cascade
        // pieces too.
        for &(prefix, k) in &[
            (0usize, 1usize),
            (15, 3),
            (16, 3),
            (17, 16),
            (37, 3),
            (300, 5),
        ] {
            let s = next_seed();
            cases.push(OpCase {
                name: format!("paged_attention(nh={nh},nkv={nkv},hs={hs},prefix={prefix},k={k})"),
                kind: OpKind::PagedAttention,
                run: Box::new(move || paged_case(s, nh, nkv, hs, prefix, k, false)),
            });
            let s = next_seed();
            cases.push(OpCase {
                name: format!("cascade_attention(nh={nh},nkv={nkv},hs={hs},prefix={prefix},k={k})"),
                kind: OpKind::CascadeAttention,
                run: Box::new(move || paged_case(s, nh, nkv, hs, prefix, k, true)),
            });
        }
    }
    for &(nh, nkv, hs) in &[(9usize, 3usize, 64usize), (8, 1, 16), (6, 2, 7)] {
        for &(pos0, t) in &[
            (0usize, 1usize),
            (0, 33),
            (15, 2),
            (17, 70),
            (64, 5),
            (5, 130),
        ] {
            let s = next_seed();
            cases.push(OpCase {
                name: format!("paged_prefill(nh={nh},nkv={nkv},hs={hs},pos0={pos0},t={t})"),
                kind: OpKind::PagedPrefillAttention,
                run: Box::new(move || prefill_case(s, nh, nkv, hs, pos0, t)),
            });
        }
    }
    // Q8 (int8, one scale per 16): the fast kernels against the reference on the same
    // quantised weights, rows of whole groups (C a multiple of 16): one group, three
    // (a partial chunk of the eight whose scales are widened at once), nine and 17 (a
    // whole chunk and a tail), and the model's shapes.
    for &rows in &ROWS {
        for &(c, oc) in &[
            (16, 1),
            (48, 7),
            (144, 33),
            (272, 5),
            (96, 7),
            (64, 577),
            (576, 1536),
            (1536, 576),
        ] {
            for bias in [false, true] {
                let s = next_seed();
                cases.push(OpCase {
                    name: format!("matmul_fwd(rows={rows},c={c},oc={oc},bias={bias},w=Q8)"),
                    kind: OpKind::Matmul,
                    run: Box::new(move || {
                        let mut rng = Rng::new(s);
                        let x = rng.vec(rows * c, 1.0);
                        let (q, sc) = q8(&rng.vec(oc * c, 0.5));
                        let w = Weights::Q8(Q8Slice::new(&q, &sc).unwrap());
                        let b = bias.then(|| rng.vec(oc, 1.0));
                        let mut want = vec![0.0; rows * oc];
                        reference::matmul::matmul_forward(&mut want, &x, w, b.as_deref(), c, oc)
                            .unwrap();
                        let mut got = Guarded::new(rows * oc);
                        cpu::matmul_forward(got.as_mut(), &x, w, b.as_deref(), c, oc).unwrap();
                        got.check_guards("matmul_q8");
                        check_close("matmul_q8", got.as_ref(), &want, F32_TOL);
                    }),
                });
            }
        }
        let s = next_seed();
        cases.push(OpCase {
            name: format!("embedding_fwd(rows={rows},dim=576,vocab=13,w=Q8)"),
            kind: OpKind::Embedding,
            run: Box::new(move || {
                let mut rng = Rng::new(s);
                let (q, sc) = q8(&rng.vec(13 * 576, 1.0));
                let table = Weights::Q8(Q8Slice::new(&q, &sc).unwrap());
                let ids: Vec<u32> = (0..rows).map(|_| rng.below(13) as u32).collect();
                let mut want = vec![0.0; rows * 576];
                reference::embedding::embedding_forward(&mut want, &ids, table, 576).unwrap();
                let mut got = Guarded::new(rows * 576);
                cpu::embedding_forward(got.as_mut(), &ids, table, 576).unwrap();
                got.check_guards("embedding_q8");
                check_close("embedding_q8", got.as_ref(), &want, F32_TOL);
            }),
        });
    }
    cases
}

/// Causal prefill of `t` rows after `pos0` cached positions, in shuffled blocks of 16:
/// the fast kernel against the reference.
fn prefill_case(seed: u64, nh: usize, nkv: usize, hs: usize, pos0: usize, t: usize) {
    use cloudrm::kernels::reference::attention_paged::{PagedShape, prefill_scratch_len};
    let bs = 16;
    let shape = PagedShape {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hs,
        block_size: bs,
    };
    let mut rng = Rng::new(seed);
    let nblocks = (pos0 + t).div_ceil(bs) + 3;
    let mut table: Vec<u32> = (0..nblocks as u32).collect();
    for i in (1..table.len()).rev() {
        table.swap(i, rng.below(i + 1));
    }
    let block = bs * nkv * hs;
    let k_arena = rng.vec(nblocks * block, 1.0);
    let v_arena = rng.vec(nblocks * block, 1.0);
    let q = rng.vec(t * nh * hs, 1.0);
    let mut scratch = vec![0.0; prefill_scratch_len(&shape, pos0, t)];
    let mut want = vec![0.0; t * nh * hs];
    reference::attention_paged::paged_prefill_attention(
        &mut want,
        &q,
        &k_arena,
        &v_arena,
        &table,
        pos0,
        shape,
        &mut scratch,
    )
    .unwrap();
    let mut got = Guarded::new(t * nh * hs);
    cpu::paged_prefill_attention(
        got.as_mut(),
        &q,
        &k_arena,
        &v_arena,
        &table,
        pos0,
        shape,
        &mut scratch,
    )
    .unwrap();
    got.check_guards("paged prefill attention");
    check_close("paged prefill attention", got.as_ref(), &want, F32_TOL);
    same_bits_as_avx2("paged prefill attention", got.as_ref(), || {
        let mut scratch = vec![0.0; prefill_scratch_len(&shape, pos0, t)];
        prefill_with(
            true,
            &q,
            &k_arena,
            &v_arena,
            &table,
            pos0,
            shape,
            &mut scratch,
        )
    });
    // A row's bits do not depend on the call it is in: the rows split in two calls (the
    // second starting where a prefix cache would have stopped) give the whole call's bits.
    let width = nh * hs;
    for a in [1, t / 2, 16 - pos0 % 16, 17] {
        if a == 0 || a >= t {
            continue;
        }
        let mut split = vec![0.0f32; t * width];
        let (first, second) = split.split_at_mut(a * width);
        for (rows, start, dst) in [(0..a, pos0, first), (a..t, pos0 + a, second)] {
            cpu::paged_prefill_attention(
                dst,
                &q[rows.start * width..rows.end * width],
                &k_arena,
                &v_arena,
                &table,
                start,
                shape,
                &mut scratch,
            )
            .unwrap();
        }
        assert_bits_eq(
            &format!("paged prefill split at row {a} (pos0 {pos0}, t {t})"),
            &split,
            got.as_ref(),
        );
    }
    // f16 arenas: close to the reference over them, identical to the widened f32 arenas.
    let (k16, v16) = (to_f16(&k_arena), to_f16(&v_arena));
    let run = |fast, k: &[half::f16], v: &[half::f16], scratch: &mut [f32]| {
        prefill_with(fast, &q, k, v, &table, pos0, shape, scratch)
    };
    let want16 = run(false, &k16, &v16, &mut scratch);
    let got16 = run(true, &k16, &v16, &mut scratch);
    check_close("paged prefill (f16 cache)", &got16, &want16, F32_TOL);
    same_bits_as_avx2("paged prefill (f16 cache)", &got16, || {
        let mut scratch = vec![0.0; prefill_scratch_len(&shape, pos0, t)];
        run(true, &k16, &v16, &mut scratch)
    });
    let widened = prefill_with(
        true,
        &q,
        &widen(&k16),
        &widen(&v16),
        &table,
        pos0,
        shape,
        &mut scratch,
    );
    assert_bits_eq("paged prefill (f16 vs widened)", &got16, &widened);
    // A short scratch is a typed error, not a panic.
    let short = prefill_scratch_len(&shape, pos0, t) - 1;
    assert!(
        cpu::paged_prefill_attention(
            got.as_mut(),
            &q,
            &k_arena,
            &v_arena,
            &table,
            pos0,
            shape,
            &mut scratch[..short],
        )
        .is_err()
    );
}

/// Paged prefill attention over f32 or f16 arenas, by the fast kernel or the reference.
#[allow(clippy::too_many_arguments)]
fn prefill_with<T: cloudrm::kernels::KvElem>(
    fast: bool,
    q: &[f32],
    k: &[T],
    v: &[T],
    table: &[u32],
    pos0: usize,
    shape: cloudrm::kernels::reference::attention_paged::PagedShape,
    scratch: &mut [f32],
) -> Vec<f32> {
    let mut out = vec![0.0; q.len()];
    if fast {
        cpu::paged_prefill_attention(&mut out, q, k, v, table, pos0, shape, scratch).unwrap();
    } else {
        reference::attention_paged::paged_prefill_attention(
            &mut out, q, k, v, table, pos0, shape, scratch,
        )
        .unwrap();
    }
    out
}

/// K sequences sharing `prefix` positions, each with its own suffix, in a shuffled arena.
fn paged_case(seed: u64, nh: usize, nkv: usize, hs: usize, prefix: usize, k: usize, cascade: bool) {
    use cloudrm::kernels::reference::attention_paged::{Level, PagedShape, cascade_scratch_len};
    let bs = 16;
    let shape = PagedShape {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hs,
        block_size: bs,
    };
    let mut rng = Rng::new(seed);
    let suffix_lens: Vec<usize> = (0..k)
        .map(|i| [0, 1, 15, 16, 17, 70][(i + seed as usize) % 6])
        .collect();
    // The cascade also gets a second, nested level: 40 positions shared by sequences
    // 1..k only (a response shared by a subset), when there are at least three.
    let mid: usize = if cascade && k >= 3 { 40 } else { 0 };
    let in_mid = |i: usize| mid > 0 && i >= 1;
    let prefix_blocks = prefix.div_ceil(bs);
    let mid_blocks = mid.div_ceil(bs);
    let suffix_blocks: Vec<usize> = suffix_lens.iter().map(|l| l.div_ceil(bs)).collect();
    let total = prefix_blocks + mid_blocks + suffix_blocks.iter().sum::<usize>() + 2;
    let mut ids: Vec<u32> = (0..total as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    let block = bs * nkv * hs;
    let k_arena = rng.vec(total * block, 1.0);
    let v_arena = rng.vec(total * block, 1.0);
    let prefix_table: Vec<u32> = ids[..prefix_blocks].to_vec();
    let mid_table: Vec<u32> = ids[prefix_blocks..prefix_blocks + mid_blocks].to_vec();
    let mut next = prefix_blocks + mid_blocks;
    let suffix_tables: Vec<Vec<u32>> = suffix_blocks
        .iter()
        .map(|&n| {
            let t = ids[next..next + n].to_vec();
            next += n;
            t
        })
        .collect();
    let q = rng.vec(k * nh * hs, 1.0);
    // Reference: plain paged decode over each full table (prefix blocks are only full
    // when the prefix is a multiple of the block size; otherwise the suffix starts a new
    // block, which the cascade handles by levels and plain decode by a copied table).
    let mut full_arena_k = k_arena.clone();
    let mut full_arena_v = v_arena.clone();
    let mut full_tables: Vec<Vec<u32>> = Vec::new();
    let mut full_lens = Vec::new();
    let extra_base = total;
    // Blocks per sequence in the copied arena.
    let per_seq = (prefix + mid + suffix_lens.iter().copied().max().unwrap_or(0)).div_ceil(bs) + 1;
    for (i, (st, &sl)) in suffix_tables.iter().zip(&suffix_lens).enumerate() {
        let m = if in_mid(i) { mid } else { 0 };
        let len = prefix + m + sl;
        let nb = len.div_ceil(bs);
        let mut table = Vec::new();
        for b in 0..nb {
            let id = (extra_base + i * per_seq + b) as u32;
            table.push(id);
        }
        let need = (extra_base + (i + 1) * per_seq) * block;
        if full_arena_k.len() < need {
            full_arena_k.resize(need, 0.0);
            full_arena_v.resize(need, 0.0);
        }
        for p in 0..len {
            let (src_tbl, sp) = if p < prefix {
                (&prefix_table, p)
            } else if p < prefix + m {
                (&mid_table, p - prefix)
            } else {
                (st, p - prefix - m)
            };
            let src = (src_tbl[sp / bs] as usize * bs + sp % bs) * nkv * hs;
            let dst = (table[p / bs] as usize * bs + p % bs) * nkv * hs;
            let (sk, sv) = (
                k_arena[src..src + nkv * hs].to_vec(),
                v_arena[src..src + nkv * hs].to_vec(),
            );
            full_arena_k[dst..dst + nkv * hs].copy_from_slice(&sk);
            full_arena_v[dst..dst + nkv * hs].copy_from_slice(&sv);
        }
        full_tables.push(table);
        full_lens.push(len);
    }
    let tables: Vec<&[u32]> = full_tables.iter().map(|t| t.as_slice()).collect();
    let max_len = full_lens.iter().copied().max().unwrap_or(0).max(1);
    let mut scores = vec![0.0; max_len];
    let mut want = vec![0.0; k * nh * hs];
    reference::attention_paged::paged_decode_attention(
        &mut want,
        &q,
        &full_arena_k,
        &full_arena_v,
        &tables,
        &full_lens,
        shape,
        &mut scores,
    )
    .unwrap();
    // The fast kernel (cascade over the shared levels, or plain decode over the copied
    // tables) on the given arenas (f32 or f16).
    let st: Vec<&[u32]> = suffix_tables.iter().map(|t| t.as_slice()).collect();
    let mut levels = vec![Level {
        block_table: &prefix_table,
        len: prefix,
        members: 0..k,
    }];
    if mid > 0 {
        levels.push(Level {
            block_table: &mid_table,
            len: mid,
            members: 1..k,
        });
    }
    let mut scratch = vec![0.0; cascade_scratch_len(&shape, k, max_len)];
    macro_rules! fast {
        ($k:expr, $v:expr, $fk:expr, $fv:expr) => {{
            let mut got = Guarded::new(k * nh * hs);
            if cascade {
                cpu::cascade_decode_attention(
                    got.as_mut(),
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
            } else {
                cpu::paged_decode_attention(
                    got.as_mut(),
                    &q,
                    $fk,
                    $fv,
                    &tables,
                    &full_lens,
                    shape,
                    &mut scores,
                )
                .unwrap();
            }
            got.check_guards("paged attention");
            got.as_ref().to_vec()
        }};
    }
    let got = fast!(&k_arena, &v_arena, &full_arena_k, &full_arena_v);
    check_close("paged attention", &got, &want, F32_TOL);
    same_bits_as_avx2("paged attention", &got, || {
        fast!(&k_arena, &v_arena, &full_arena_k, &full_arena_v)
    });
    {
        // One thread takes the items of all KV heads (streaming each one's blocks in
        // first), many take one item per KV head: the same states, the same bits.
        let before = dispatch::num_threads();
        for threads in [1, 64] {
            dispatch::set_num_threads(threads);
            let again = fast!(&k_arena, &v_arena, &full_arena_k, &full_arena_v);
            assert_bits_eq(&format!("{threads} threads"), &again, &got);
        }
        dispatch::set_num_threads(before);
    }
    // f16 arenas: within the f32 tolerance of the reference over the same f16 arenas, and
    // bit for bit what the kernel gives over f32 arenas holding the rounded values.
    let (k16, v16) = (to_f16(&k_arena), to_f16(&v_arena));
    let (fk16, fv16) = (to_f16(&full_arena_k), to_f16(&full_arena_v));
    let mut want16 = vec![0.0; k * nh * hs];
    reference::attention_paged::paged_decode_attention(
        &mut want16,
        &q,
        &fk16,
        &fv16,
        &tables,
        &full_lens,
        shape,
        &mut scores,
    )
    .unwrap();
    let got16 = fast!(&k16, &v16, &fk16, &fv16);
    check_close("paged attention (f16 cache)", &got16, &want16, F32_TOL);
    same_bits_as_avx2("paged attention (f16 cache)", &got16, || {
        fast!(&k16, &v16, &fk16, &fv16)
    });
    let widened = fast!(&widen(&k16), &widen(&v16), &widen(&fk16), &widen(&fv16));
    assert_bits_eq("paged attention (f16 cache vs widened)", &got16, &widened);
}

/// The owned float weights if any, else the Q8 ones.
fn q8_or<'a>(o: &'a Option<Owned>, q: &'a Option<(Vec<i8>, Vec<bf16>)>) -> Weights<'a> {
    match (o, q) {
        (Some(o), _) => o.view(),
        (_, Some((q, sc))) => Weights::Q8(Q8Slice::new(q, sc).unwrap()),
        _ => panic!("no weights"),
    }
}

fn to_f16(a: &[f32]) -> Vec<half::f16> {
    a.iter().map(|&x| half::f16::from_f32(x)).collect()
}

fn widen(a: &[half::f16]) -> Vec<f32> {
    a.iter().map(|x| x.to_f32()).collect()
}

/// On an AVX-512 path the attention kernels' 16-lane forms give the AVX2 kernels' bits:
/// `run` again with the AVX2 path forced reproduces `got` (the caller's path is restored;
/// nothing to check below AVX-512).
fn same_bits_as_avx2(what: &str, got: &[f32], run: impl FnOnce() -> Vec<f32>) {
    let isa = dispatch::current();
    if isa < Isa::Avx512 {
        return;
    }
    dispatch::force(Some(Isa::Avx2));
    let avx2 = run();
    dispatch::force(Some(isa));
    assert_bits_eq(&format!("{what}: {isa:?} against AVX2"), got, &avx2);
}

fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {i}: {g} vs {w}");
    }
}

/// Every ISA path and thread count; the coverage check requires a case for every op.
#[test]
fn fast_cpu_ops_match_reference() {
    let _isa_lock = ISA_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for isa in dispatch::available() {
        for threads in [1, 2] {
            eprintln!("isa {isa:?}, {threads} threads");
            dispatch::force(Some(isa));
            dispatch::set_num_threads(threads);
            let covered = run_cases(cases());
            if std::env::var("CLOUDRM_OP_FILTER").is_err() {
                for kind in OpKind::ALL {
                    assert!(
                        covered.contains(&kind),
                        "no CPU case covers op `{}`",
                        kind.name()
                    );
                }
            }
        }
    }
    dispatch::force(None);
    dispatch::set_num_threads(0);
    assert!(dispatch::available().contains(&Isa::Scalar));
    for isa in [
        Isa::Scalar,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Bf16,
        Isa::Amx,
    ] {
        let why = dispatch::why_unavailable(isa);
        assert_eq!(
            why.is_none(),
            dispatch::available().contains(&isa),
            "{isa:?}"
        );
        if let Some(why) = why {
            eprintln!("path {} not run: {why}", isa.name());
        }
    }
}

/// Quantise to Q8 (int8 values, one bf16 scale per group).
fn q8(w: &[f32]) -> (Vec<i8>, Vec<half::bf16>) {
    let mut q = vec![0i8; w.len()];
    let mut s = vec![half::bf16::ZERO; w.len() / Q8_GROUP];
    quantize_q8(Weights::F32(w), &mut q, &mut s).unwrap();
    (q, s)
}

#[test]
fn q8_rows_that_are_not_whole_groups_are_typed_errors() {
    let (q, s) = q8(&[0.5; 64]);
    let w = Weights::Q8(Q8Slice::new(&q, &s).unwrap());
    let x = [1.0f32; 8];
    let mut out = [0.0f32; 8];
    for fast in [false, true] {
        let err = if fast {
            cpu::matmul_forward(&mut out, &x, w, None, 8, 8)
        } else {
            reference::matmul::matmul_forward(&mut out, &x, w, None, 8, 8)
        }
        .unwrap_err();
        assert!(err.to_string().contains("multiple of 16"), "{err}");
    }
    let mut row = [0.0f32; 8];
    let err = cpu::embedding_forward(&mut row, &[0], w, 8).unwrap_err();
    assert!(err.to_string().contains("multiple of 16"), "{err}");
}

/// The fast matmul sums every output in the same order whatever the number of rows (16-bit
/// weights widened once per panel for prefill chunks included), so a row gives the same
/// bits alone, in a decode batch or in a prefill chunk: a prompt
/// partly served from the prefix cache then scores exactly as when computed whole.
#[test]
fn matmul_rows_are_bit_identical_alone_and_batched() {
    let (c, oc) = (576, 1536);
    let mut rng = Rng::new(77);
    let x = rng.vec(130 * c, 1.0);
    let w: Vec<bf16> = rng
        .vec(oc * c, 0.5)
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    let wh: Vec<half::f16> = w.iter().map(|v| half::f16::from_f32(v.to_f32())).collect();
    let (q, sc) = q8(&rng.vec(oc * c, 0.5));
    let _isa_lock = ISA_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for (isa, weights) in dispatch::available().into_iter().flat_map(|isa| {
        [
            (isa, Weights::BF16(&w)),
            (isa, Weights::F16(&wh)),
            (isa, Weights::Q8(Q8Slice::new(&q, &sc).unwrap())),
        ]
    }) {
        dispatch::force(Some(isa));
        let mut all = vec![0.0f32; 130 * oc];
        cpu::matmul_forward(&mut all, &x, weights, None, c, oc).unwrap();
        for (start, rows) in [
            (0usize, 1usize),
            (5, 1),
            (129, 1),
            (3, 7),
            (40, 33),
            (60, 70),
        ] {
            let mut part = vec![0.0f32; rows * oc];
            cpu::matmul_forward(
                &mut part,
                &x[start * c..(start + rows) * c],
                weights,
                None,
                c,
                oc,
            )
            .unwrap();
            let want = &all[start * oc..(start + rows) * oc];
            assert!(
                part.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "rows {start}..{} differ from the 130-row batch ({}, {isa:?})",
                start + rows,
                weights.dtype_name()
            );
        }
    }
    dispatch::force(None);
}

/// Fused LM head + top-k: ties go to the lower token id, NaN logits rank after every
/// number, +-inf rank as numbers, both ISAs and the reference agree exactly on f32
/// weights with exact sums, Q8 weights give the fast matmul's logits, and bad shapes are
/// typed errors.
#[test]
fn lm_head_topk_orders_ties_nan_and_inf() {
    use cloudrm::kernels::reference::heads::TopLogit;
    let _isa_lock = ISA_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // C = 2, hidden row (1, 0): logit t = weight[t][0] (exact in f32).
    let c = 2;
    let col0 = [
        1.0,
        3.0,
        f32::NAN,
        3.0,
        f32::NEG_INFINITY,
        -2.0,
        f32::INFINITY,
        3.0,
        f32::NAN,
    ];
    let w: Vec<f32> = col0.iter().flat_map(|&x| [x, 0.5]).collect();
    let h = [1.0f32, 0.0];
    let v = col0.len();
    let want: Vec<(u32, f32)> = vec![
        (6, f32::INFINITY),
        (1, 3.0),
        (3, 3.0),
        (7, 3.0),
        (0, 1.0),
        (5, -2.0),
        (4, f32::NEG_INFINITY),
        (2, f32::NAN),
        (8, f32::NAN),
    ];
    let same = |got: &[TopLogit], want: &[(u32, f32)]| {
        got.len() == want.len()
            && got.iter().zip(want).all(|(g, &(t, l))| {
                g.token == t && (g.logit == l || (g.logit.is_nan() && l.is_nan()))
            })
    };
    for isa in dispatch::available() {
        dispatch::force(Some(isa));
        for k in [1, 3, v] {
            let mut got = vec![
                TopLogit {
                    token: 0,
                    logit: 0.0
                };
                k
            ];
            cpu::lm_head_topk(&mut got, &h, Weights::F32(&w), c, v, k).unwrap();
            assert!(same(&got, &want[..k]), "{isa:?} k={k}: {got:?}");
            reference::heads::lm_head_topk(&mut got, &h, Weights::F32(&w), c, v, k).unwrap();
            assert!(same(&got, &want[..k]), "reference k={k}: {got:?}");
        }
    }
    dispatch::force(None);

    // Q8: the fast matmul's logits, sorted.
    let (c, v, rows, k) = (64usize, 777usize, 3usize, 5usize);
    let mut rng = Rng::new(91);
    let wf = rng.vec(v * c, 0.5);
    let (q, s) = q8(&wf);
    let wq = Weights::Q8(Q8Slice::new(&q, &s).unwrap());
    let h = rng.vec(rows * c, 1.0);
    let mut logits = vec![0.0; rows * v];
    cpu::matmul_forward(&mut logits, &h, wq, None, c, v).unwrap();
    let mut got = vec![
        TopLogit {
            token: 0,
            logit: 0.0
        };
        rows * k
    ];
    cpu::lm_head_topk(&mut got, &h, wq, c, v, k).unwrap();
    for r in 0..rows {
        let row = &logits[r * v..(r + 1) * v];
        let mut ids: Vec<usize> = (0..v).collect();
        ids.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for (i, g) in got[r * k..(r + 1) * k].iter().enumerate() {
            assert_eq!(g.token as usize, ids[i], "q8 row {r} rank {i}");
            assert_eq!(g.logit, row[ids[i]]);
        }
    }

    // Typed errors: k = 0, k > V, hidden not whole rows, wrong weight or out length.
    let w = vec![0.0f32; 5 * 4];
    let mut out1 = vec![
        TopLogit {
            token: 0,
            logit: 0.0
        };
        1
    ];
    let bad = |r: Result<(), cloudrm::kernels::KernelError>, what: &str| {
        let e = r.expect_err(what).to_string();
        assert!(e.contains("lm_head_topk"), "{what}: {e}");
    };
    bad(
        cpu::lm_head_topk(&mut out1[..0], &[0.0; 4], Weights::F32(&w), 4, 5, 0),
        "k = 0",
    );
    bad(
        cpu::lm_head_topk(&mut [out1[0]; 6], &[0.0; 4], Weights::F32(&w), 4, 5, 6),
        "k > V",
    );
    bad(
        cpu::lm_head_topk(&mut out1, &[0.0; 5], Weights::F32(&w), 4, 5, 1),
        "ragged hidden",
    );
    bad(
        cpu::lm_head_topk(&mut out1, &[0.0; 4], Weights::F32(&w[..19]), 4, 5, 1),
        "short weights",
    );
    bad(
        cpu::lm_head_topk(&mut [out1[0]; 2], &[0.0; 4], Weights::F32(&w), 4, 5, 1),
        "out length",
    );
}

/// Plain decode attention cuts long sequences into fixed pieces and merges them in a
/// fixed order, so a sequence gives the same bits alone or in a batch and on 1 or 2
/// threads, at lengths on both sides of the piece size and with GQA groups below and at
/// the eight rows where the transposed score loop takes over.
#[test]
fn decode_attention_is_bit_identical_alone_batched_and_threaded() {
    use cloudrm::kernels::reference::attention_paged::PagedShape;
    let _isa_lock = ISA_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for &(nh, nkv, hs) in &[(9usize, 3usize, 64usize), (16, 2, 32)] {
        let shape = PagedShape {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hs,
            block_size: 16,
        };
        let lens = [1usize, 255, 256, 257, 700, 37];
        let mut rng = Rng::new(91 + nh as u64);
        let mut next = 0u32;
        let tables: Vec<Vec<u32>> = lens
            .iter()
            .map(|&l| {
                let n = l.div_ceil(16) as u32;
                next += n;
                (next - n..next).rev().collect()
            })
            .collect();
        let arena = next as usize * 16 * nkv * hs;
        let (k, v) = (rng.vec(arena, 1.0), rng.vec(arena, 1.0));
        let q = rng.vec(lens.len() * nh * hs, 1.0);
        let refs: Vec<&[u32]> = tables.iter().map(|t| t.as_slice()).collect();
        let mut scores = vec![0.0f32; 1024];
        for isa in dispatch::available() {
            dispatch::force(Some(isa));
            let mut want = vec![0.0f32; q.len()];
            dispatch::set_num_threads(2);
            cpu::paged_decode_attention(&mut want, &q, &k, &v, &refs, &lens, shape, &mut scores)
                .unwrap();
            let mut one = vec![0.0f32; q.len()];
            dispatch::set_num_threads(1);
            cpu::paged_decode_attention(&mut one, &q, &k, &v, &refs, &lens, shape, &mut scores)
                .unwrap();
            assert!(
                one.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "1 and 2 threads differ ({isa:?}, nh={nh})"
            );
            dispatch::set_num_threads(2);
            let w = nh * hs;
            for (s, &len) in lens.iter().enumerate() {
                let mut alone = vec![0.0f32; w];
                cpu::paged_decode_attention(
                    &mut alone,
                    &q[s * w..(s + 1) * w],
                    &k,
                    &v,
                    &refs[s..s + 1],
                    &lens[s..s + 1],
                    shape,
                    &mut scores,
                )
                .unwrap();
                assert!(
                    alone
                        .iter()
                        .zip(&want[s * w..(s + 1) * w])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "sequence of {len} positions differs alone and batched ({isa:?}, nh={nh})"
                );
            }
        }
    }
    dispatch::force(None);
    dispatch::set_num_threads(0);
}

/// SwiGLU's vector exp over the whole range of gates an activation can hold: every
/// element within 2e-6 relative (or 1e-30 absolute near zero) of the reference, +inf
/// gates give +inf, NaN stays NaN, on every ISA path.
#[test]
fn swiglu_matches_reference_elementwise_at_extreme_gates() {
    let _isa_lock = ISA_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut gate: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.06).collect();
    gate.extend([
        87.0, 88.0, 88.5, 100.0, -87.0, -88.0, -100.0, 1e-30, -1e-30, 0.0,
    ]);
    gate.extend([f32::INFINITY, f32::NAN, 3.0]);
    let up: Vec<f32> = (0..gate.len())
        .map(|i| 0.5 + (i % 7) as f32 * 0.25)
        .collect();
    let mut want = vec![0.0f32; gate.len()];
    reference::swiglu::swiglu_forward(&mut want, &gate, &up).unwrap();
    for isa in dispatch::available() {
        dispatch::force(Some(isa));
        let mut got = vec![0.0f32; gate.len()];
        cpu::swiglu_forward(&mut got, &gate, &up).unwrap();
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            let ok = if w.is_nan() {
                g.is_nan()
            } else if w.is_infinite() {
                g == w
            } else {
                (g - w).abs() <= 2e-6 * w.abs() || (g - w).abs() <= 1e-30
            };
            assert!(ok, "gate {} ({isa:?}): {g} against {w}", gate[i]);
        }
    }
    dispatch::force(None);
}

/// For an emulated matmul `run(out, x, cols)` whose whole call over `x` (rows x c)
/// gave `got` (rows x oc): rows alone (the GEMV) give the batch's bits, and two column
/// blocks give the whole call's bits and touch only their columns.
fn check_rows_alone_and_split(
    what: &str,
    x: &[f32],
    c: usize,
    oc: usize,
    got: &[f32],
    run: impl Fn(&mut [f32], &[f32], std::ops::Range<usize>),
) {
    let rows = x.len() / c;
    for r in [0, rows / 2, rows - 1] {
        let mut one = vec![0.0f32; oc];
        run(&mut one, &x[r * c..(r + 1) * c], 0..oc);
        assert_bits_eq(
            &format!("{what}: row {r} alone"),
            &one,
            &got[r * oc..(r + 1) * oc],
        );
    }
    let split = oc / 2;
    let mut parts = vec![f32::NAN; rows * oc];
    run(&mut parts, x, 0..split);
    for r in 0..rows {
        assert!(
            parts[r * oc + split..(r + 1) * oc]
                .iter()
                .all(|v| v.is_nan()),
            "{what}: columns past {split} written"
        );
    }
    run(&mut parts, x, split..oc);
    assert_bits_eq(&format!("{what}: split at {split}"), &parts, got);
}

/// The 16-lane (AVX-512) matmul kernels, run over pairs of AVX2 registers so their
/// logic is checked on any AVX2 machine: odd sizes (channel tails, partial 8 x 3 tiles,
/// panels crossed, the widened-weights prefill path) against the reference, each row
/// bit-identical alone (the GEMV) and in the batch, any column split giving the same
/// bits, columns outside `cols` untouched. On an AVX-512 machine the real kernels are
/// covered by every test that iterates `dispatch::available()`.
#[test]
fn wide_matmul_kernels_match_reference_emulated() {
    let mut rng = Rng::new(512);
    let mut ran = 0;
    for (rows, c, oc) in [
        (1usize, 1usize, 1usize),
        (2, 7, 3),
        (3, 16, 4),
        (5, 17, 7),
        (7, 33, 13),
        (8, 48, 2),
        (9, 577, 5),
        (16, 31, 6),
        (17, 64, 11),
        (33, 577, 13),
        (100, 577, 7),
        (8, 576, 64),
    ] {
        let x = rng.vec(rows * c, 1.0);
        let wf = rng.vec(oc * c, 0.5);
        let b = rng.vec(oc, 0.5);
        let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let wh = to_f16(&wf);
        for weights in [Weights::F32(&wf), Weights::BF16(&wb), Weights::F16(&wh)] {
            for bias in [None, Some(&b[..])] {
                let what = format!(
                    "rows {rows}, c {c}, oc {oc}, {}, bias {}",
                    weights.dtype_name(),
                    bias.is_some()
                );
                let mut want = vec![0.0f32; rows * oc];
                reference::matmul::matmul_forward(&mut want, &x, weights, bias, c, oc).unwrap();
                let mut got = vec![f32::NAN; rows * oc];
                if !cpu::matmul::matmul_forward_wide_emulated(
                    &mut got,
                    &x,
                    weights,
                    bias,
                    c,
                    oc,
                    0..oc,
                )
                .unwrap()
                {
                    eprintln!("skipped: this CPU lacks AVX2, which the emulation runs on");
                    return;
                }
                check_close(&what, &got, &want, F32_TOL);
                check_rows_alone_and_split(&what, &x, c, oc, &got, |out, x, cols| {
                    cpu::matmul::matmul_forward_wide_emulated(out, x, weights, bias, c, oc, cols)
                        .unwrap();
                });
                ran += 1;
            }
        }
    }
    assert_eq!(ran, 12 * 3 * 2);
    // Int8 weights are not the 16-lane kernels' (false, nothing written); bad columns are
    // typed errors.
    let (q, s) = q8(&rng.vec(64, 0.5));
    let mut out = [f32::NAN; 2];
    let x = rng.vec(32, 1.0);
    let w = Weights::Q8(Q8Slice::new(&q, &s).unwrap());
    assert!(
        !cpu::matmul::matmul_forward_wide_emulated(&mut out, &x, w, None, 32, 2, 0..2).unwrap()
    );
    assert!(out.iter().all(|v| v.is_nan()));
    let wf = rng.vec(64, 0.5);
    let err = cpu::matmul::matmul_forward_wide_emulated(
        &mut out,
        &x,
        Weights::F32(&wf),
        None,
        32,
        2,
        1..3,
    )
    .unwrap_err();
    assert!(err.to_string().contains("cols"), "{err}");
}

/// An emulated bf16-compute matmul `run(out, x, w, bias, c, oc, cols)` (`Ok(false)`:
/// its emulation cannot run on this CPU, and the check is skipped) on `shapes` (rows, c,
/// oc): against the reference on the same bf16-rounded inputs (only the summation order
/// differs: f32 tolerance) and, for sums of 32 products and more, within the bf16
/// tolerance of the reference on the inputs as given; each row bit-identical alone and
/// in the batch, any column split giving the same bits, columns outside `cols`
/// untouched; bad shapes and columns typed errors, with nothing written.
fn check_bf16_compute_emulation(
    seed: u64,
    shapes: &[(usize, usize, usize)],
    run: impl Fn(
        &mut [f32],
        &[f32],
        &[bf16],
        Option<&[f32]>,
        usize,
        usize,
        std::ops::Range<usize>,
    ) -> Result<bool, cloudrm::kernels::KernelError>,
) {
    let mut rng = Rng::new(seed);
    for &(rows, c, oc) in shapes {
        let x = rng.vec(rows * c, 1.0);
        let xr: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        let wf = rng.vec(oc * c, 0.5);
        let b = rng.vec(oc, 0.5);
        let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
        let weights = Weights::BF16(&wb);
        for bias in [None, Some(&b[..])] {
            let what = format!("rows {rows}, c {c}, oc {oc}, bias {}", bias.is_some());
            let mut got = vec![f32::NAN; rows * oc];
            if !run(&mut got, &x, &wb, bias, c, oc, 0..oc).unwrap() {
                eprintln!("skipped: this CPU lacks AVX2, which the emulation runs on");
                return;
            }
            let mut want = vec![0.0f32; rows * oc];
            reference::matmul::matmul_forward(&mut want, &xr, weights, bias, c, oc).unwrap();
            check_close(&format!("{what}, rounded inputs"), &got, &want, F32_TOL);
            // (A handful of products can cancel to anything in relative terms.)
            if c >= 32 && rows * oc >= 8 {
                reference::matmul::matmul_forward(&mut want, &x, weights, bias, c, oc).unwrap();
                check_close(&format!("{what}, inputs as given"), &got, &want, 1e-2);
            }
            check_rows_alone_and_split(&what, &x, c, oc, &got, |out, x, cols| {
                run(out, x, &wb, bias, c, oc, cols).unwrap();
            });
        }
    }
    let (x, wb) = (rng.vec(32, 1.0), vec![bf16::ONE; 64]);
    let mut out = [f32::NAN; 2];
    let err = run(&mut out, &x, &wb, None, 32, 2, 1..3).unwrap_err();
    assert!(err.to_string().contains("cols"), "{err}");
    let err = run(&mut out, &x, &wb[..63], None, 32, 2, 0..2).unwrap_err();
    assert!(err.to_string().contains("weight"), "{err}");
    assert!(out.iter().all(|v| v.is_nan()));
}

/// The bf16-compute (AVX512_BF16) matmul kernels, run over pairs of AVX2 registers so
/// their logic is checked on any AVX2 machine ([`check_bf16_compute_emulation`]): odd
/// sizes (channel tails past the last 32, partial 8 x 3 tiles, the prefill row panels).
/// Where detection took the path (`CLOUDRM_ISA=avx512bf16` on a CPU with AVX512_BF16),
/// the real kernels are covered by every test that iterates `dispatch::available()`.
#[test]
fn bf16_compute_matmul_kernels_match_reference_emulated() {
    let shapes = [
        (1usize, 1usize, 1usize),
        (2, 7, 3),
        (3, 32, 4),
        (5, 33, 7),
        (7, 63, 13),
        (8, 64, 2),
        (9, 577, 5),
        (16, 31, 6),
        (17, 96, 11),
        (33, 577, 13),
        (100, 577, 7),
        (8, 576, 64),
    ];
    check_bf16_compute_emulation(1616, &shapes, |out, x, w, bias, c, oc, cols| {
        cpu::matmul::matmul_forward_bf16_emulated(out, x, w, bias, c, oc, cols)
    });
}

/// The AMX tile kernels, run with the tile registers emulated in memory so their logic is
/// checked on any machine ([`check_bf16_compute_emulation`]): odd sizes (channels past
/// the last 32 or fewer than 16 weight rows: the padded copy; tiles read in place, moved
/// back at the end of the weights; partial row tiles; row panels crossed; column splits
/// off the 32-column blocks). Decode takes the tiles too, so rows alone give the batch's
/// bits here as well. Where detection took the path (`CLOUDRM_ISA=amx` on a CPU with
/// AMX), the real kernels are covered by every test that iterates `dispatch::available()`.
#[test]
fn amx_matmul_kernels_match_reference_emulated() {
    let shapes = [
        (1usize, 1usize, 1usize),
        (2, 7, 3),
        (4, 64, 7),
        (3, 32, 16),
        (5, 33, 17),
        (16, 64, 32),
        (17, 63, 33),
        (1, 576, 80),
        (9, 577, 5),
        (33, 96, 80),
        (40, 577, 13),
        (130, 64, 40),
        (8, 576, 64),
    ];
    check_bf16_compute_emulation(1717, &shapes, |out, x, w, bias, c, oc, cols| {
        cpu::matmul::matmul_forward_amx_emulated(out, x, w, bias, c, oc, cols).map(|()| true)
    });
}

/// The opt-in bf16-compute paths are never detected without `CLOUDRM_ISA` naming them.
#[test]
fn bf16_compute_paths_are_opt_in() {
    if std::env::var("CLOUDRM_ISA").is_ok_and(|v| ["avx512bf16", "amx"].contains(&v.trim())) {
        eprintln!("skipped: CLOUDRM_ISA asks for an opt-in path");
        return;
    }
    assert!(dispatch::detected() <= Isa::Avx512);
    for isa in [Isa::Avx512Bf16, Isa::Amx] {
        assert!(!dispatch::available().contains(&isa), "{isa:?}");
    }
    assert_eq!(Isa::Avx512Bf16.name(), "avx512bf16");
    assert_eq!(Isa::Amx.name(), "amx");
}

/// Q8 with input columns kept at 16 bits (`Q8Keep`): on every path and thread count the
/// fast matmul (int8 kernels, then the kept columns column by column) matches the
/// reference's element-by-element dot product, for one kept column up to sixteen (the
/// first and last columns included), odd output counts and rows; the kept values are
/// the weights themselves (bf16 here, so exact) and dominate their groups, whose scales
/// ignore them; and a row gives the same bits alone and batched.
#[test]
fn q8_kept_columns_match_the_reference_on_every_path() {
    let mut rng = Rng::new(4242);
    let _isa_lock = ISA_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for (c, oc, rows, cols) in [
        (16usize, 1usize, 1usize, vec![0u32]),
        (16, 7, 3, vec![15]),
        (48, 33, 1, vec![0, 17, 47]),
        (96, 37, 33, vec![3, 4, 5, 50, 95]),
        (
            576,
            577,
            7,
            (0..16).map(|i| i * 36 + 1).collect::<Vec<u32>>(),
        ),
    ] {
        // Weights of bf16 values; the kept columns 40x larger (outlier features).
        let w: Vec<f32> = (0..oc * c)
            .map(|i| {
                let v = bf16::from_f32(rng.vec(1, 0.5)[0]).to_f32();
                if cols.contains(&((i % c) as u32)) {
                    40.0 * v
                } else {
                    v
                }
            })
            .collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut q = vec![0i8; oc * c];
        let mut s = vec![bf16::ZERO; oc * c / Q8_GROUP];
        let mut vals = vec![bf16::ZERO; q8_keep_len(oc, cols.len())];
        quantize_q8_keep(
            Weights::BF16(&wb),
            c,
            &cols,
            Q8Fit::Max,
            &mut q,
            &mut s,
            &mut vals,
        )
        .unwrap();
        for r in 0..oc {
            for (j, &k) in cols.iter().enumerate() {
                assert_eq!(q[r * c + k as usize], 0, "int8 value at kept column {k}");
                let run = (r / 16 * cols.len() + j) * 16 + r % 16;
                assert_eq!(vals[run], wb[r * c + k as usize], "kept value");
            }
            // Every other weight within half a step of its group's scale, which the
            // kept (40x) columns did not inflate.
            for i in 0..c {
                if cols.contains(&(i as u32)) {
                    continue;
                }
                let sc = s[(r * c + i) / Q8_GROUP].to_f32();
                let err = (q[r * c + i] as f32 * sc - w[r * c + i]).abs();
                assert!(
                    err <= 0.5 * sc * (1.0 + 1e-6),
                    "weight {r},{i}: error {err}, step {sc}"
                );
                assert!(
                    sc <= 0.5 * 1.01 / 127.0 * 4.0,
                    "scale {sc} inflated by a kept column"
                );
            }
        }
        let kw = Weights::Q8(Q8Slice::with_keep(&q, &s, c, &cols, &vals).unwrap());
        let x: Vec<f32> = (0..rows * c)
            .map(|i| {
                let v = rng.vec(1, 1.0)[0];
                if cols.contains(&((i % c) as u32)) {
                    8.0 * v
                } else {
                    v
                }
            })
            .collect();
        let mut want = vec![0.0f32; rows * oc];
        reference::matmul::matmul_forward(&mut want, &x, kw, None, c, oc).unwrap();
        for isa in dispatch::available() {
            for threads in [1, 2] {
                dispatch::force(Some(isa));
                dispatch::set_num_threads(threads);
                let mut got = vec![0.0f32; rows * oc];
                cpu::matmul_forward(&mut got, &x, kw, None, c, oc).unwrap();
                check_close(
                    &format!("q8 kept {c}x{oc} rows {rows} ({isa:?}, {threads} threads)"),
                    &got,
                    &want,
                    F32_TOL,
                );
                // A slice of whole weight rows starting off a run boundary (as the
                // fused gate/up blocks take them): the same outputs.
                if oc >= 30 {
                    let part = kw.slice(5 * c, 23 * c);
                    let mut got_part = vec![0.0f32; rows * 23];
                    cpu::matmul_forward(&mut got_part, &x, part, None, c, 23).unwrap();
                    for r in 0..rows {
                        check_close(
                            &format!("q8 kept, rows 5..28 of {oc} ({isa:?})"),
                            &got_part[r * 23..(r + 1) * 23],
                            &want[r * oc + 5..r * oc + 28],
                            F32_TOL,
                        );
                    }
                }
                let mut alone = vec![0.0f32; oc];
                let last = rows - 1;
                cpu::matmul_forward(&mut alone, &x[last * c..], kw, None, c, oc).unwrap();
                assert_bits_eq(
                    &format!("q8 kept, row alone vs batched ({isa:?})"),
                    &alone,
                    &got[last * oc..],
                );
            }
        }
        dispatch::force(None);
        dispatch::set_num_threads(0);
        // Without the kept part the result is far off: the test sees the kept columns.
        let plain = Weights::Q8(Q8Slice::new(&q, &s).unwrap());
        let mut without = vec![0.0f32; rows * oc];
        reference::matmul::matmul_forward(&mut without, &x, plain, None, c, oc).unwrap();
        let diff: f64 = without
            .iter()
            .zip(&want)
            .map(|(a, b)| ((a - b) as f64).abs())
            .sum();
        assert!(diff > 1.0, "kept columns contribute nothing ({diff})");
    }
}

#[test]
fn q8_kept_columns_that_do_not_fit_are_typed_errors() {
    let (q, s) = (vec![0i8; 64], vec![bf16::ZERO; 4]);
    let vals = [bf16::ONE; 4];
    for (row, cols, nvals, what) in [
        (32usize, vec![1u32, 1], 4usize, "ascending"),
        (32, vec![3, 1], 4, "ascending"),
        (32, vec![1, 32], 4, "under the row length"),
        (32, vec![1], 4, "kept values"),
        (24, vec![1], 2, "whole rows"),
        (0, vec![1], 2, "whole rows"),
    ] {
        let err = Q8Slice::with_keep(&q, &s, row, &cols, &vals[..nvals])
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(what), "{row} {cols:?}: {err}");
        let (mut q2, mut s2, mut v2) = (q.clone(), s.clone(), vec![bf16::ZERO; nvals]);
        let w = vec![0.5f32; 64];
        assert!(
            quantize_q8_keep(
                Weights::F32(&w),
                row,
                &cols,
                Q8Fit::Max,
                &mut q2,
                &mut s2,
                &mut v2
            )
            .is_err(),
            "quantize_q8_keep took {row} {cols:?}"
        );
    }
    // A non-finite weight, kept or not, is named by its element in the whole tensor.
    for bad in [2 * 32 + 5, 3 * 32 + 7] {
        let mut w = vec![0.5f32; 128];
        w[bad] = f32::NAN;
        let (mut q, mut s, mut v) = (vec![0i8; 128], vec![bf16::ZERO; 8], vec![bf16::ZERO; 16]);
        for fit in [Q8Fit::Max, Q8Fit::Search(None)] {
            let err = quantize_q8_keep(Weights::F32(&w), 32, &[5], fit, &mut q, &mut s, &mut v)
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("at element {bad}")), "{fit:?}: {err}");
        }
    }
    let many: Vec<u32> = (0..65).collect();
    let (q, s) = (vec![0i8; 128], vec![bf16::ZERO; 8]);
    let vals = vec![bf16::ONE; 65];
    assert!(Q8Slice::with_keep(&q, &s, 128, &many, &vals).is_err());
}

/// The searched Q8 scales (`Q8Fit::Search`) against a plain reference of the rule (each
/// group's candidates bf16(max|w| / m), m = 127 down to 96, errors summed in f32 in
/// order, the first least one) on every dispatch path: the same int8 values and scales
/// bit for bit, at odd sizes, with kept columns, zero and tiny groups, outliers, and
/// importance weights (none, random with zeros, one dominant column).
#[test]
fn q8_searched_scales_match_the_reference_on_every_path() {
    fn reference_fit(w: &[f32], a: Option<&[f32]>, row: usize) -> (Vec<i8>, Vec<bf16>) {
        let mut q = vec![0i8; w.len()];
        let mut scales = vec![bf16::ZERO; w.len() / Q8_GROUP];
        for (g, sc) in scales.iter_mut().enumerate() {
            let wg = &w[g * Q8_GROUP..][..Q8_GROUP];
            let amax = wg.iter().fold(0f32, |m, v| m.max(v.abs()));
            if bf16::from_f32(amax / 127.0).to_f32() < f32::MIN_POSITIVE {
                // As quantize_q8 (the test's tiny groups have a zero scale).
                let mut one = [bf16::ZERO];
                quantize_q8(
                    Weights::F32(wg),
                    &mut q[g * Q8_GROUP..][..Q8_GROUP],
                    &mut one,
                )
                .unwrap();
                *sc = one[0];
                continue;
            }
            let mut best = (f32::INFINITY, 0f32);
            for m in (127 - Q8_FIT_SCALES as i32 + 1..=127).rev() {
                let s = bf16::from_f32(amax / m as f32).to_f32();
                let inv = 1.0 / s;
                let mut err = 0f32;
                for (j, &v) in wg.iter().enumerate() {
                    let aj = a.map_or(1.0, |a| a[(g * Q8_GROUP + j) % row]);
                    let d = v - (v * inv).round_ties_even() * s;
                    err += aj * (d * d);
                }
                if err < best.0 {
                    best = (err, s);
                }
            }
            *sc = bf16::from_f32(best.1);
            for (j, &v) in wg.iter().enumerate() {
                q[g * Q8_GROUP + j] =
                    (v * (1.0 / best.1)).round_ties_even().clamp(-127.0, 127.0) as i8;
            }
        }
        (q, scales)
    }
    let mut rng = Rng::new(977);
    let _isa_lock = ISA_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for (row, rows, cols) in [
        (16usize, 1usize, vec![]),
        (48, 7, vec![0u32, 47]),
        (592, 33, vec![1, 100, 591]),
    ] {
        let n = row * rows;
        let mut w: Vec<f32> = (0..n)
            .map(|i| {
                let v = rng.vec(1, 1.0)[0];
                // Outliers, and bf16 values (as checkpoints hold).
                let v = if i % 37 == 5 { 20.0 * v } else { v };
                bf16::from_f32(v).to_f32()
            })
            .collect();
        // A zero group and a tiny (subnormal-scale) group.
        w[..Q8_GROUP].fill(0.0);
        if n >= 3 * Q8_GROUP {
            for (j, v) in w[2 * Q8_GROUP..3 * Q8_GROUP].iter_mut().enumerate() {
                *v = (j as f32 - 8.0) * 1e-40;
            }
        }
        let random: Vec<f32> = (0..row)
            .map(|j| {
                if j % 5 == 0 {
                    0.0
                } else {
                    3.0 * rng.vec(1, 1.0)[0].abs()
                }
            })
            .collect();
        let mut dominant = vec![0.01f32; row];
        dominant[row / 2] = 1e4;
        for imp in [None, Some(&random[..]), Some(&dominant[..])] {
            let mut zeroed = w.clone();
            for r in 0..rows {
                for &c in &cols {
                    zeroed[r * row + c as usize] = 0.0;
                }
            }
            let (want_q, want_s) = reference_fit(&zeroed, imp, row);
            for isa in dispatch::available() {
                dispatch::force(Some(isa));
                let mut q = vec![0i8; n];
                let mut s = vec![bf16::ZERO; n / Q8_GROUP];
                let mut vals = vec![bf16::ZERO; q8_keep_len(rows, cols.len())];
                quantize_q8_keep(
                    Weights::F32(&w),
                    row,
                    &cols,
                    Q8Fit::Search(imp),
                    &mut q,
                    &mut s,
                    &mut vals,
                )
                .unwrap();
                let what = format!(
                    "row {row} x {rows}, importance {:?}, {isa:?}",
                    imp.map(|a| a[0])
                );
                assert!(s == want_s, "{what}: scales differ from the reference");
                assert!(q == want_q, "{what}: int8 values differ from the reference");
            }
            dispatch::force(None);
            // The search never does worse than max|w| / 127 on its own measure, and
            // does better overall.
            let mut q_max = vec![0i8; n];
            let mut s_max = vec![bf16::ZERO; n / Q8_GROUP];
            quantize_q8(Weights::F32(&zeroed), &mut q_max, &mut s_max).unwrap();
            let err = |q: &[i8], s: &[bf16], g: usize| -> f64 {
                (0..Q8_GROUP)
                    .map(|j| {
                        let i = g * Q8_GROUP + j;
                        let a = imp.map_or(1.0, |a| a[i % row]) as f64;
                        a * (zeroed[i] as f64 - q[i] as f64 * s[g].to_f32() as f64).powi(2)
                    })
                    .sum()
            };
            let (mut total_fit, mut total_max) = (0.0, 0.0);
            for g in 0..n / Q8_GROUP {
                let (e_fit, e_max) = (err(&want_q, &want_s, g), err(&q_max, &s_max, g));
                assert!(
                    e_fit <= e_max * (1.0 + 1e-5) + 1e-30,
                    "group {g}: {e_fit} > {e_max}"
                );
                total_fit += e_fit;
                total_max += e_max;
            }
            if n >= 64 {
                assert!(total_fit < total_max, "{total_fit} vs {total_max}");
            }
        }
    }
    // A group on a grid of 100 steps of 2^-7 (a bf16 scale): the search finds it (m =
    // 100) and rounds it exactly, where max|w| / 127 cannot.
    let w: Vec<f32> = (0..16)
        .map(|j| [100.0f32, -100.0, 37.0, -3.0, 55.0, 1.0, -71.0, 12.0][j % 8] / 128.0)
        .collect();
    let (mut q, mut s, mut v) = (vec![0i8; 16], vec![bf16::ZERO; 1], vec![]);
    quantize_q8_keep(
        Weights::F32(&w),
        16,
        &[],
        Q8Fit::Search(None),
        &mut q,
        &mut s,
        &mut v,
    )
    .unwrap();
    assert_eq!(s[0].to_f32(), 1.0 / 128.0);
    for (j, &x) in w.iter().enumerate() {
        assert_eq!(q[j] as f32 * s[0].to_f32(), x, "weight {j}");
    }
    quantize_q8(Weights::F32(&w), &mut q, &mut s).unwrap();
    assert!(
        w.iter()
            .enumerate()
            .any(|(j, &x)| q[j] as f32 * s[0].to_f32() != x)
    );
}

/// Importance weights that do not fit the rows are typed errors naming them.
#[test]
fn q8_search_importance_that_does_not_fit_is_a_typed_error() {
    let w = vec![0.5f32; 64];
    let short = [1.0f32; 31];
    let mut nan = [1.0f32; 32];
    nan[7] = f32::NAN;
    let mut negative = [1.0f32; 32];
    negative[9] = -1.0;
    for (imp, what) in [
        (&short[..], "got 31 values"),
        (&nan[..], "NaN at column 7"),
        (&negative[..], "-1 at column 9"),
    ] {
        let (mut q, mut s, mut v) = (vec![0i8; 64], vec![bf16::ZERO; 4], vec![]);
        let err = quantize_q8_keep(
            Weights::F32(&w),
            32,
            &[],
            Q8Fit::Search(Some(imp)),
            &mut q,
            &mut s,
            &mut v,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("importance") && err.contains(what), "{err}");
    }
}
