//! Layer 0: the reference kernels against hand-worked math, and their argument checks.

use cloudrm_kernels::reference::attention::{AttnShape, attention_forward};
use cloudrm_kernels::reference::embedding::embedding_forward;
use cloudrm_kernels::reference::matmul::matmul_forward;
use cloudrm_kernels::reference::residual::residual_forward;
use cloudrm_kernels::reference::rmsnorm::rmsnorm_forward;
use cloudrm_kernels::reference::rope::rope_forward;
use cloudrm_kernels::reference::swiglu::swiglu_forward;
use cloudrm_kernels::{KernelError, Weights};
use half::bf16;

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1.0)
}

#[test]
fn rmsnorm_hand_case() {
    // x = [3, 4]: mean(x^2) = 12.5, rstd = 1/sqrt(12.5 + 0) ; weight [1, 2]
    let mut out = [0.0; 2];
    rmsnorm_forward(&mut out, &[3.0, 4.0], Weights::F32(&[1.0, 2.0]), 0.0).unwrap();
    let r = 1.0 / 12.5f32.sqrt();
    assert!(
        close(out[0], 3.0 * r) && close(out[1], 2.0 * 4.0 * r),
        "{out:?}"
    );
    // eps matters for tiny inputs: x = [0, 0] gives 0, not NaN.
    rmsnorm_forward(&mut out, &[0.0, 0.0], Weights::F32(&[1.0, 1.0]), 1e-5).unwrap();
    assert_eq!(out, [0.0, 0.0]);
}

#[test]
fn matmul_hand_case() {
    // [1 2] @ [[1 0],[0 1],[1 1]]^T + [0, 0, 10] = [1, 2, 13]
    let mut out = [0.0; 3];
    let w = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
    matmul_forward(
        &mut out,
        &[1.0, 2.0],
        Weights::F32(&w),
        Some(&[0.0, 0.0, 10.0]),
        2,
        3,
    )
    .unwrap();
    assert_eq!(out, [1.0, 2.0, 13.0]);
    // bf16 weights are read exactly (1.5 and -0.25 are representable).
    let wb: Vec<bf16> = [1.5f32, -0.25].iter().map(|&x| bf16::from_f32(x)).collect();
    let mut out1 = [0.0; 1];
    matmul_forward(&mut out1, &[2.0, 4.0], Weights::BF16(&wb), None, 2, 1).unwrap();
    assert_eq!(out1, [2.0]); // 3 - 1
}

#[test]
fn matmul_rejects_bad_lengths() {
    let mut out = [0.0; 2];
    let err =
        matmul_forward(&mut out, &[1.0, 2.0], Weights::F32(&[1.0; 3]), None, 2, 2).unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::Length {
                arg: "weight",
                expected: 4,
                actual: 3,
                ..
            }
        ),
        "{err}"
    );
    let err = matmul_forward(
        &mut out,
        &[1.0, 2.0, 3.0],
        Weights::F32(&[1.0; 4]),
        None,
        2,
        2,
    )
    .unwrap_err();
    assert!(
        matches!(err, KernelError::Invalid { arg: "inp", .. }),
        "{err}"
    );
}

#[test]
fn rope_hand_case() {
    // HS=2, inv_freq=[1]: position p rotates (a, b) by angle p.
    let mut x = [1.0, 0.0, 0.0, 1.0];
    rope_forward(&mut x, &[0, 1], 1, 2, &[1.0]).unwrap();
    assert_eq!(&x[..2], &[1.0, 0.0]); // position 0 is the identity
    // (0, 1) rotated by 1 rad: (0*cos - 1*sin, 1*cos + 0*sin)
    assert!(
        close(x[2], -(1f32).sin()) && close(x[3], (1f32).cos()),
        "{x:?}"
    );
    let err = rope_forward(&mut x, &[0, 1], 1, 3, &[1.0]).unwrap_err();
    assert!(matches!(
        err,
        KernelError::Invalid {
            arg: "head_dim",
            ..
        }
    ));
}

#[test]
fn swiglu_hand_case() {
    // silu(0) = 0; silu(2) = 2 / (1 + e^-2); times up
    let mut out = [0.0; 2];
    swiglu_forward(&mut out, &[0.0, 2.0], &[5.0, 3.0]).unwrap();
    assert_eq!(out[0], 0.0);
    assert!(close(out[1], 3.0 * 2.0 / (1.0 + (-2f32).exp())));
    // large negative gate saturates to 0 without NaN
    swiglu_forward(&mut out, &[-1000.0, 1000.0], &[1.0, 1.0]).unwrap();
    assert_eq!(out, [-0.0, 1000.0]);
}

#[test]
fn attention_hand_case() {
    // One query head, HS=1, two keys with scores q*k/sqrt(1): q=1, k=[0, ln 3] so the
    // softmax weights are [1/4, 3/4]; v = [4, 8] -> 1 + 6 = 7 for the second row.
    // Row 0 (position 0) sees only key 0 -> v0 = 4.
    let q = [1.0, 1.0];
    let k = [0.0, 3f32.ln()];
    let v = [4.0, 8.0];
    let mut out = [0.0; 2];
    let mut scores = [0.0; 2];
    let shape = AttnShape {
        n_tokens: 2,
        pos0: 0,
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: 1,
    };
    attention_forward(&mut out, &q, &k, &v, &mut scores, shape).unwrap();
    assert!(close(out[0], 4.0) && close(out[1], 7.0), "{out:?}");
    // GQA: two query heads share one KV head and get the same output for equal queries.
    let q2 = [1.0, 1.0];
    let mut out2 = [0.0; 2];
    let shape = AttnShape {
        n_tokens: 1,
        pos0: 1,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 1,
    };
    attention_forward(&mut out2, &q2, &k, &v, &mut scores, shape).unwrap();
    assert!(close(out2[0], 7.0) && close(out2[1], 7.0), "{out2:?}");
    // Too-short cache is an error, not a panic.
    let shape = AttnShape {
        n_tokens: 1,
        pos0: 5,
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: 1,
    };
    assert!(attention_forward(&mut out[..1], &q[..1], &k, &v, &mut scores, shape).is_err());
}

#[test]
fn embedding_and_residual() {
    let table = [0.0, 1.0, 10.0, 11.0, 20.0, 21.0];
    let mut out = [0.0; 4];
    embedding_forward(&mut out, &[2, 0], Weights::F32(&table), 2).unwrap();
    assert_eq!(out, [20.0, 21.0, 0.0, 1.0]);
    let err = embedding_forward(&mut out, &[3, 0], Weights::F32(&table), 2).unwrap_err();
    assert!(matches!(
        err,
        KernelError::TokenOutOfRange {
            id: 3,
            position: 0,
            vocab: 3,
            ..
        }
    ));
    let mut acc = [1.0, 2.0];
    residual_forward(&mut acc, &[0.5, -2.0]).unwrap();
    assert_eq!(acc, [1.5, 0.0]);
}

#[test]
fn reward_heads_hand_case() {
    use cloudrm_kernels::reference::heads::{
        RewardHeadWeights, dual_head_forward, reward_head_forward,
    };
    let mut scratch = [0.0; 2];
    // Linear: r = [1, -2] . [3, 4] + 0.5 = 3 - 8 + 0.5 = -4.5
    let lin = RewardHeadWeights::Linear {
        w: Weights::F32(&[1.0, -2.0]),
        b: 0.5,
    };
    let mut r = [0.0];
    reward_head_forward(&mut r, &[3.0, 4.0], &lin, &mut scratch).unwrap();
    assert_eq!(r, [-4.5]);
    // Dense-tanh: W = I, b = [0, 1], h = [0, 0] -> tanh([0, 1]) = [0, tanh 1];
    // r = [2, 3] . [0, tanh 1] - 1 = 3 tanh(1) - 1
    let dt = RewardHeadWeights::DenseTanh {
        dense_w: Weights::F32(&[1.0, 0.0, 0.0, 1.0]),
        dense_b: &[0.0, 1.0],
        out_w: Weights::F32(&[2.0, 3.0]),
        out_b: -1.0,
    };
    reward_head_forward(&mut r, &[0.0, 0.0], &dt, &mut scratch).unwrap();
    assert!(close(r[0], 3.0 * 1f32.tanh() - 1.0), "{r:?}");
    // Dual head: rows 0 and 2 generate (logits over V=3), row 1 is scored.
    let hidden = [1.0, 0.0, 3.0, 4.0, 0.0, 1.0];
    let lm = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]; // (V=3, C=2)
    let mut logits = [0.0; 6];
    let mut rewards = [0.0; 1];
    dual_head_forward(
        &mut logits,
        &mut rewards,
        &hidden,
        2,
        &[0, 2],
        &[1],
        Weights::F32(&lm),
        &lin,
        &mut scratch,
    )
    .unwrap();
    assert_eq!(logits, [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]);
    assert_eq!(rewards, [-4.5]);
    // A row index past B is an error, not a panic.
    let err = dual_head_forward(
        &mut logits[..3],
        &mut [],
        &hidden,
        2,
        &[3],
        &[],
        Weights::F32(&lm),
        &lin,
        &mut scratch,
    )
    .unwrap_err();
    assert!(
        matches!(err, KernelError::Invalid { arg: "rows", .. }),
        "{err}"
    );
}
