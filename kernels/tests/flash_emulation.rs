//! A lane-level emulation of `kernels/cuda/flash.cu` (the tensor-core prefill), run
//! against the reference prefill attention: the kernel's index arithmetic (its Q
//! fragment loads, the shared-memory addresses it hands `ldmatrix`, the score and PV
//! fragments, the quad reductions, the output stores) transliterated lane by lane, with
//! `ldmatrix` and `mma.m16n8k16` emulated from their PTX ISA fragment layouts. It checks
//! the data movement and the numerics (P rounded to bf16) without a GPU; the GPU itself
//! is checked by `cloudrm gpu-check` stage (a).

use cloudrm_kernels::reference::attention_paged::{self as refattn, PagedShape};
use half::bf16;

const TILE: usize = 32;
const WARPS: usize = 4;

type Pair = [bf16; 2];

/// `ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16`: lane l supplies the start (an
/// element offset into `buf`) of row l & 7 of matrix l >> 3; each lane gets, from each
/// of the 4 matrices, row l / 4, columns 2 (l % 4) and + 1 (transposed: rows 2 (l % 4)
/// and + 1 of column l / 4).
fn ldmatrix(buf: &[bf16], addrs: &[usize; 32], trans: bool) -> [[Pair; 4]; 32] {
    let mut out = [[[bf16::ZERO; 2]; 4]; 32];
    for m in 0..4 {
        let el = |r: usize, c: usize| buf[addrs[8 * m + r] + c];
        for (lane, o) in out.iter_mut().enumerate() {
            let (g, t) = (lane / 4, lane % 4);
            o[m] = if trans {
                [el(2 * t, g), el(2 * t + 1, g)]
            } else {
                [el(g, 2 * t), el(g, 2 * t + 1)]
            };
        }
    }
    out
}

/// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`, d += A B, from the fragments of
/// the 32 lanes (a: a0..a3, b: b0, b1; d: c0..c3).
fn mma(d: &mut [[f32; 4]; 32], a: &[[Pair; 4]; 32], b: &[[Pair; 2]; 32]) {
    let mut am = [[0f32; 16]; 16];
    let mut bm = [[0f32; 8]; 16];
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        for e in 0..2 {
            am[g][2 * t + e] = a[lane][0][e].to_f32();
            am[g + 8][2 * t + e] = a[lane][1][e].to_f32();
            am[g][2 * t + 8 + e] = a[lane][2][e].to_f32();
            am[g + 8][2 * t + 8 + e] = a[lane][3][e].to_f32();
            bm[2 * t + e][g] = b[lane][0][e].to_f32();
            bm[2 * t + 8 + e][g] = b[lane][1][e].to_f32();
        }
    }
    let dot = |row: usize, col: usize| (0..16).map(|k| am[row][k] * bm[k][col]).sum::<f32>();
    for (lane, dl) in d.iter_mut().enumerate() {
        let (g, t) = (lane / 4, lane % 4);
        for e in 0..2 {
            dl[e] += dot(g, 2 * t + e);
            dl[2 + e] += dot(g + 8, 2 * t + e);
        }
    }
}

fn pair(x: f32, y: f32) -> Pair {
    [bf16::from_f32(x), bf16::from_f32(y)]
}

/// Sum (or max) over the quad of lanes 4g .. 4g + 3, as two `__shfl_xor_sync` steps.
fn quad(v: &mut [f32; 32], f: impl Fn(f32, f32) -> f32) {
    for mask in [1usize, 2] {
        let old = *v;
        for lane in 0..32 {
            v[lane] = f(old[lane], old[lane ^ mask]);
        }
    }
}

/// Per-warp, per-lane state of the kernel.
struct Warp {
    qa: Vec<[Pair; 4]>,     // per lane: KSTEPS fragments, flattened as [lane][kk]
    o: Vec<[[f32; 4]; 32]>, // per 8-wide output tile
    m_a: [f32; 32],
    m_b: [f32; 32],
    l_a: [f32; 32],
    l_b: [f32; 32],
}

#[allow(clippy::too_many_arguments)]
fn flash_emulate(
    q: &[bf16],
    k_arena: &[bf16],
    v_arena: &[bf16],
    table: &[u32],
    pos0: usize,
    t_len: usize,
    sh: PagedShape,
) -> Vec<f32> {
    let (nh, nkv, hs, bs) = (sh.n_heads, sh.n_kv_heads, sh.head_dim, sh.block_size);
    let g_ = nh / nkv;
    let (tpw, pitch, ksteps, dtiles) = (16 / g_, hs + 8, hs / 16, hs / 8);
    let tpc = WARPS * tpw;
    let scale_log2 = (1.0 / (hs as f32).sqrt()) * std::f32::consts::LOG2_E;
    let mut out = vec![f32::NAN; t_len * nh * hs];
    let grid_x = t_len.div_ceil(tpc);
    let mut k_s = vec![bf16::ZERO; TILE * pitch];
    let mut v_s = vec![bf16::ZERO; TILE * pitch];
    // A lane's two rows g and g + 8: (token offset in the warp, head in the group) each.
    let lane_rows = |lane: usize| {
        let g = lane / 4;
        (g / g_, g % g_, (g + 8) / g_, (g + 8) % g_)
    };
    for bx in 0..grid_x {
        for kvh in 0..nkv {
            let tile = grid_x - 1 - bx;
            let tok0 = tile * tpc;
            let kv_total = pos0 + t_len;
            let kv_end = pos0 + t_len.min(tok0 + tpc);
            let mut warps: Vec<Warp> = (0..WARPS)
                .map(|w| {
                    let wtok0 = tok0 + w * tpw;
                    let mut qa = vec![[[bf16::ZERO; 2]; 4]; 32 * ksteps];
                    for lane in 0..32 {
                        let t = lane % 4;
                        let (da, ha, db, hb) = lane_rows(lane);
                        let (tok_a, tok_b) = (wtok0 + da, wtok0 + db);
                        let (head_a, head_b) = (kvh * g_ + ha, kvh * g_ + hb);
                        let ld = |tok: usize, head: usize, c: usize| -> Pair {
                            if tok < t_len {
                                let base = (tok * nh + head) * hs + c;
                                [q[base], q[base + 1]]
                            } else {
                                [bf16::ZERO; 2]
                            }
                        };
                        for kk in 0..ksteps {
                            let c = kk * 16 + 2 * t;
                            qa[lane * ksteps + kk] = [
                                ld(tok_a, head_a, c),
                                ld(tok_b, head_b, c),
                                ld(tok_a, head_a, c + 8),
                                ld(tok_b, head_b, c + 8),
                            ];
                        }
                    }
                    Warp {
                        qa,
                        o: vec![[[0.0; 4]; 32]; dtiles],
                        m_a: [f32::NEG_INFINITY; 32],
                        m_b: [f32::NEG_INFINITY; 32],
                        l_a: [0.0; 32],
                        l_b: [0.0; 32],
                    }
                })
                .collect();
            let mut k_lane = [0usize; 32];
            let mut v_lane = [0usize; 32];
            for lane in 0..32 {
                let (mat, mrow) = (lane >> 3, lane & 7);
                k_lane[lane] = ((mat >> 1) * 8 + mrow) * pitch + (mat & 1) * 8;
                v_lane[lane] = ((mat & 1) * 8 + mrow) * pitch + (mat >> 1) * 8;
            }
            let mut t0 = 0;
            while t0 < kv_end {
                for r in 0..TILE {
                    let p = t0 + r;
                    for c in 0..hs {
                        let (kx, vx) = if p < kv_total {
                            let off = ((table[p / bs] as usize * bs + p % bs) * nkv + kvh) * hs + c;
                            (k_arena[off], v_arena[off])
                        } else {
                            (bf16::ZERO, bf16::ZERO)
                        };
                        k_s[r * pitch + c] = kx;
                        v_s[r * pitch + c] = vx;
                    }
                }
                for (w, wp) in warps.iter_mut().enumerate() {
                    let wtok0 = tok0 + w * tpw;
                    let warp_live = wtok0 < t_len;
                    if !warp_live {
                        continue;
                    }
                    let warp_last = pos0 + t_len.min(wtok0 + tpw) - 1;
                    if t0 > warp_last {
                        continue;
                    }
                    let mut s = [[[0f32; 4]; 32]; 4];
                    for jj in [0usize, 2] {
                        for kk in 0..ksteps {
                            let addrs: [usize; 32] =
                                std::array::from_fn(|l| k_lane[l] + jj * 8 * pitch + kk * 16);
                            let r = ldmatrix(&k_s, &addrs, false);
                            let a: [[Pair; 4]; 32] =
                                std::array::from_fn(|l| wp.qa[l * ksteps + kk]);
                            let b01: [[Pair; 2]; 32] = std::array::from_fn(|l| [r[l][0], r[l][1]]);
                            let b23: [[Pair; 2]; 32] = std::array::from_fn(|l| [r[l][2], r[l][3]]);
                            mma(&mut s[jj], &a, &b01);
                            mma(&mut s[jj + 1], &a, &b23);
                        }
                    }
                    let mut mx_a = [f32::NEG_INFINITY; 32];
                    let mut mx_b = [f32::NEG_INFINITY; 32];
                    for lane in 0..32 {
                        let t = lane % 4;
                        let (da, _, db, _) = lane_rows(lane);
                        let lim_a = pos0 + wtok0 + da;
                        let lim_b = pos0 + wtok0 + db;
                        for (j, sj) in s.iter_mut().enumerate() {
                            for e in 0..2 {
                                let p = t0 + j * 8 + 2 * t + e;
                                let ok_a = p <= lim_a && p < kv_total;
                                let ok_b = p <= lim_b && p < kv_total;
                                let sa = &mut sj[lane][e];
                                *sa = if ok_a {
                                    *sa * scale_log2
                                } else {
                                    f32::NEG_INFINITY
                                };
                                mx_a[lane] = mx_a[lane].max(*sa);
                                let sb = &mut sj[lane][2 + e];
                                *sb = if ok_b {
                                    *sb * scale_log2
                                } else {
                                    f32::NEG_INFINITY
                                };
                                mx_b[lane] = mx_b[lane].max(*sb);
                            }
                        }
                    }
                    quad(&mut mx_a, f32::max);
                    quad(&mut mx_b, f32::max);
                    for lane in 0..32 {
                        let mn_a = wp.m_a[lane].max(mx_a[lane]);
                        let mn_b = wp.m_b[lane].max(mx_b[lane]);
                        let al_a = if mn_a == f32::NEG_INFINITY {
                            1.0
                        } else {
                            (wp.m_a[lane] - mn_a).exp2()
                        };
                        let al_b = if mn_b == f32::NEG_INFINITY {
                            1.0
                        } else {
                            (wp.m_b[lane] - mn_b).exp2()
                        };
                        wp.m_a[lane] = mn_a;
                        wp.m_b[lane] = mn_b;
                        let (mut sum_a, mut sum_b) = (0f32, 0f32);
                        for sj in s.iter_mut() {
                            for e in 0..2 {
                                let pa = if mn_a == f32::NEG_INFINITY {
                                    0.0
                                } else {
                                    (sj[lane][e] - mn_a).exp2()
                                };
                                let pb = if mn_b == f32::NEG_INFINITY {
                                    0.0
                                } else {
                                    (sj[lane][2 + e] - mn_b).exp2()
                                };
                                sj[lane][e] = pa;
                                sj[lane][2 + e] = pb;
                                sum_a += pa;
                                sum_b += pb;
                            }
                        }
                        wp.l_a[lane] = wp.l_a[lane] * al_a + sum_a;
                        wp.l_b[lane] = wp.l_b[lane] * al_b + sum_b;
                        for od in wp.o.iter_mut() {
                            od[lane][0] *= al_a;
                            od[lane][1] *= al_a;
                            od[lane][2] *= al_b;
                            od[lane][3] *= al_b;
                        }
                    }
                    for kp in 0..2 {
                        let a: [[Pair; 4]; 32] = std::array::from_fn(|l| {
                            let (x, y) = (&s[2 * kp][l], &s[2 * kp + 1][l]);
                            [
                                pair(x[0], x[1]),
                                pair(x[2], x[3]),
                                pair(y[0], y[1]),
                                pair(y[2], y[3]),
                            ]
                        });
                        for d in (0..dtiles).step_by(2) {
                            let addrs: [usize; 32] =
                                std::array::from_fn(|l| v_lane[l] + kp * 16 * pitch + d * 8);
                            let r = ldmatrix(&v_s, &addrs, true);
                            let b01: [[Pair; 2]; 32] = std::array::from_fn(|l| [r[l][0], r[l][1]]);
                            let b23: [[Pair; 2]; 32] = std::array::from_fn(|l| [r[l][2], r[l][3]]);
                            mma(&mut wp.o[d], &a, &b01);
                            mma(&mut wp.o[d + 1], &a, &b23);
                        }
                    }
                }
                t0 += TILE;
            }
            for (w, wp) in warps.iter_mut().enumerate() {
                let wtok0 = tok0 + w * tpw;
                quad(&mut wp.l_a, |x, y| x + y);
                quad(&mut wp.l_b, |x, y| x + y);
                for lane in 0..32 {
                    let t = lane % 4;
                    let (da, ha, db, hb) = lane_rows(lane);
                    let inv_a = if wp.l_a[lane] > 0.0 {
                        1.0 / wp.l_a[lane]
                    } else {
                        0.0
                    };
                    let inv_b = if wp.l_b[lane] > 0.0 {
                        1.0 / wp.l_b[lane]
                    } else {
                        0.0
                    };
                    for (tok, head, inv, half) in [
                        (wtok0 + da, kvh * g_ + ha, inv_a, 0usize),
                        (wtok0 + db, kvh * g_ + hb, inv_b, 2),
                    ] {
                        if tok >= t_len {
                            continue;
                        }
                        for (d, od) in wp.o.iter().enumerate() {
                            let base = (tok * nh + head) * hs + d * 8 + 2 * t;
                            for e in 0..2 {
                                out[base + e] = bf16::from_f32(od[lane][half + e] * inv).to_f32();
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// SplitMix64, uniform in [-1, 1).
struct Rng(u64);
impl Rng {
    fn unit(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn bf16s(&mut self, n: usize, scale: f32) -> Vec<bf16> {
        (0..n)
            .map(|_| bf16::from_f32(self.unit() * scale))
            .collect()
    }
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    if got.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| ((g - w) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn case(nh: usize, nkv: usize, hs: usize, pos0: usize, t: usize, seed: u64) -> f64 {
    let sh = PagedShape {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hs,
        block_size: 16,
    };
    let mut rng = Rng(seed);
    let nb = (pos0 + t).div_ceil(16) + 1;
    // A scattered table: block i of the sequence is arena block (5 i + 3) % nb.
    let table: Vec<u32> = (0..nb).map(|i| ((5 * i + 3) % nb) as u32).collect();
    assert_eq!(
        table
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        nb
    );
    let arena = nb * sh.block_elems();
    let (k, v) = (rng.bf16s(arena, 1.0), rng.bf16s(arena, 1.0));
    let q = rng.bf16s(t * nh * hs, 4.0);
    let f = |x: &[bf16]| x.iter().map(|b| b.to_f32()).collect::<Vec<f32>>();
    let mut want = vec![0.0; t * nh * hs];
    let mut scratch = vec![0.0; refattn::prefill_scratch_len(&sh, pos0, t)];
    refattn::paged_prefill_attention(
        &mut want,
        &f(&q),
        &f(&k),
        &f(&v),
        &table,
        pos0,
        sh,
        &mut scratch,
    )
    .unwrap();
    let got = flash_emulate(&q, &k, &v, &table, pos0, t, sh);
    rel_l2(&got, &want)
}

#[test]
fn emulated_flash_prefill_matches_the_reference() {
    for (nh, nkv, hs, pos0, t) in [
        (32, 8, 128, 20, 17),
        (32, 8, 128, 0, 70),
        (4, 4, 64, 5, 70),
        (16, 2, 64, 33, 41),
        (16, 1, 64, 0, 9),
    ] {
        let e = case(nh, nkv, hs, pos0, t, (nh * 1000 + t) as u64);
        println!("NH={nh} NKV={nkv} HS={hs} pos0={pos0} T={t}: rel L2 {e:.3e}");
        assert!(e < 1e-2, "NH={nh} NKV={nkv} HS={hs} pos0={pos0} T={t}: {e}");
    }
}
