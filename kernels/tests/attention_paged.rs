//! Paged decode and cascade (shared-prefix) attention against the contiguous reference,
//! the log-sum-exp merge against hand-worked math and f64, and the argument checks.
//!
//! Shape letters: B sequences, NH, NKV, HS, BS block size, P prefix positions, S suffix
//! positions, K critiques.

use cloudrm_kernels::KernelError;
use cloudrm_kernels::reference::attention::{AttnShape, attention_forward};
use cloudrm_kernels::reference::attention_paged::{
    Level, PagedShape, attention_partial, cascade_decode_attention, cascade_scratch_len,
    merge_attention_states, paged_decode_attention,
};

const TOL: f64 = 1e-5;
const BS: usize = 16;

/// SplitMix64 (the same generator as tests/common).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// ||out - ref|| / ||ref|| in f64; NaN anywhere gives NaN.
fn rel_l2(out: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(out.len(), reference.len(), "length mismatch");
    let (mut num, mut den) = (0f64, 0f64);
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

fn check_close(name: &str, out: &[f32], reference: &[f32]) {
    let err = rel_l2(out, reference);
    let ok = err < TOL; // NaN never passes
    if !ok {
        for (i, (a, b)) in out.iter().zip(reference).take(5).enumerate() {
            eprintln!("  [{i}] {a} {b}");
        }
    }
    assert!(ok, "{name}: relative L2 error {err:e} is not below {TOL:e}");
}

/// An output buffer with NaN canaries before and after it.
struct Guarded {
    buf: Vec<f32>,
    len: usize,
}

const GUARD: usize = 29;
const CANARY: u32 = 0x7FC0_DEAD;

impl Guarded {
    fn new(len: usize) -> Self {
        let mut buf = vec![f32::from_bits(CANARY); len + 2 * GUARD];
        // Garbage inside too: the kernels must write every output element with `=`.
        buf[GUARD..GUARD + len].fill(123.0);
        Guarded { buf, len }
    }

    fn as_mut(&mut self) -> &mut [f32] {
        &mut self.buf[GUARD..GUARD + self.len]
    }

    fn as_ref(&self) -> &[f32] {
        &self.buf[GUARD..GUARD + self.len]
    }

    fn check_guards(&self, name: &str) {
        let outside = self.buf[..GUARD]
            .iter()
            .chain(&self.buf[GUARD + self.len..]);
        for (i, v) in outside.enumerate() {
            assert_eq!(v.to_bits(), CANARY, "{name}: guard overwritten at {i}");
        }
    }
}

/// GQA configurations (NH, NKV): ratios 1, 3 (the default model) and 8.
const HEADS: [(usize, usize); 3] = [(3, 3), (9, 3), (16, 2)];

fn shape(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> PagedShape {
    PagedShape {
        n_heads,
        n_kv_heads,
        head_dim,
        block_size: BS,
    }
}

/// A random K/V arena whose blocks are handed out in shuffled order, so block tables are
/// non-contiguous and unsorted. Unused tails of blocks hold random garbage.
struct Arena {
    shape: PagedShape,
    k: Vec<f32>,
    v: Vec<f32>,
    free: Vec<u32>,
}

impl Arena {
    fn new(shape: PagedShape, n_blocks: usize, rng: &mut Rng) -> Self {
        let n = n_blocks * shape.block_elems();
        let mut free: Vec<u32> = (0..n_blocks as u32).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, rng.below(i + 1));
        }
        Arena {
            shape,
            k: rng.vec(n, 1.0),
            v: rng.vec(n, 1.0),
            free,
        }
    }

    fn alloc(&mut self, len: usize) -> Vec<u32> {
        let n = len.div_ceil(self.shape.block_size);
        assert!(self.free.len() >= n, "test arena too small");
        self.free.split_off(self.free.len() - n)
    }

    fn row(&self, table: &[u32], pos: usize) -> usize {
        let s = self.shape;
        let block = table[pos / s.block_size] as usize;
        (block * s.block_size + pos % s.block_size) * s.n_kv_heads * s.head_dim
    }

    /// Contiguous (len, NKV, HS) copies of K and V.
    fn gather(&self, table: &[u32], len: usize) -> (Vec<f32>, Vec<f32>) {
        let w = self.shape.n_kv_heads * self.shape.head_dim;
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for p in 0..len {
            let o = self.row(table, p);
            k.extend_from_slice(&self.k[o..o + w]);
            v.extend_from_slice(&self.v[o..o + w]);
        }
        (k, v)
    }

    /// Write contiguous (len, NKV, HS) K and V into the blocks of `table`.
    fn scatter(&mut self, table: &[u32], k: &[f32], v: &[f32]) {
        let w = self.shape.n_kv_heads * self.shape.head_dim;
        for p in 0..k.len() / w {
            let o = self.row(table, p);
            self.k[o..o + w].copy_from_slice(&k[p * w..(p + 1) * w]);
            self.v[o..o + w].copy_from_slice(&v[p * w..(p + 1) * w]);
        }
    }
}

/// `attention_forward` (contiguous cache, T = 1, pos0 = len - 1) for every sequence.
fn contiguous_reference(arena: &Arena, q: &[f32], tables: &[Vec<u32>], lens: &[usize]) -> Vec<f32> {
    let s = arena.shape;
    let width = s.n_heads * s.head_dim;
    let mut out = vec![0.0; q.len()];
    for (b, (table, &len)) in tables.iter().zip(lens).enumerate() {
        assert!(len > 0, "attention_forward needs at least one position");
        let (k, v) = arena.gather(table, len);
        let mut scores = vec![0.0; len];
        attention_forward(
            &mut out[b * width..(b + 1) * width],
            &q[b * width..(b + 1) * width],
            &k,
            &v,
            &mut scores,
            AttnShape {
                n_tokens: 1,
                pos0: len - 1,
                n_heads: s.n_heads,
                n_kv_heads: s.n_kv_heads,
                head_dim: s.head_dim,
            },
        )
        .unwrap();
    }
    out
}

fn run_paged(arena: &Arena, q: &[f32], tables: &[Vec<u32>], lens: &[usize]) -> Vec<f32> {
    let refs: Vec<&[u32]> = tables.iter().map(|t| t.as_slice()).collect();
    let mut out = Guarded::new(q.len());
    let mut scores = vec![0.0; lens.iter().copied().max().unwrap_or(0)];
    paged_decode_attention(
        out.as_mut(),
        q,
        &arena.k,
        &arena.v,
        &refs,
        lens,
        arena.shape,
        &mut scores,
    )
    .unwrap();
    out.check_guards("paged_decode_attention");
    out.as_ref().to_vec()
}

#[test]
fn paged_decode_matches_contiguous_attention_forward() {
    let lens = [1, BS - 1, BS, BS + 1, 37, 100, 2 * BS];
    let mut rng = Rng::new(1);
    for head_dim in [64, 128] {
        for (nh, nkv) in HEADS {
            let s = shape(nh, nkv, head_dim);
            let n_blocks: usize = lens.iter().map(|l| l.div_ceil(BS)).sum::<usize>() + 3;
            let mut arena = Arena::new(s, n_blocks, &mut rng);
            let tables: Vec<Vec<u32>> = lens.iter().map(|&l| arena.alloc(l)).collect();
            let q = rng.vec(lens.len() * nh * head_dim, 1.0);
            let got = run_paged(&arena, &q, &tables, &lens);
            let want = contiguous_reference(&arena, &q, &tables, &lens);
            check_close(
                &format!("paged_decode(nh={nh},nkv={nkv},hs={head_dim})"),
                &got,
                &want,
            );
        }
    }
}

/// One cascade case: shared levels given as (P, members) and per-sequence suffix lengths.
/// Builds the level and suffix blocks, each sequence's full context in its own blocks,
/// and checks cascade == paged decode (full tables) == attention_forward (contiguous).
fn cascade_case(
    name: &str,
    s: PagedShape,
    level_specs: &[(usize, std::ops::Range<usize>)],
    suffix_lens: &[usize],
    rng: &mut Rng,
) {
    let n_seqs = suffix_lens.len();
    let full_lens: Vec<usize> = (0..n_seqs)
        .map(|b| {
            let shared: usize = level_specs
                .iter()
                .filter(|(_, m)| m.contains(&b))
                .map(|(p, _)| p)
                .sum();
            shared + suffix_lens[b]
        })
        .collect();
    let n_blocks = level_specs
        .iter()
        .map(|(p, _)| p.div_ceil(BS))
        .chain(suffix_lens.iter().map(|l| l.div_ceil(BS)))
        .chain(full_lens.iter().map(|l| l.div_ceil(BS)))
        .sum::<usize>()
        + 5;
    let mut arena = Arena::new(s, n_blocks, rng);
    let level_tables: Vec<Vec<u32>> = level_specs.iter().map(|(p, _)| arena.alloc(*p)).collect();
    let suffix_tables: Vec<Vec<u32>> = suffix_lens.iter().map(|&l| arena.alloc(l)).collect();
    let mut full_tables = Vec::new();
    for b in 0..n_seqs {
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for ((p, m), t) in level_specs.iter().zip(&level_tables) {
            if m.contains(&b) {
                let (lk, lv) = arena.gather(t, *p);
                k.extend(lk);
                v.extend(lv);
            }
        }
        let (sk, sv) = arena.gather(&suffix_tables[b], suffix_lens[b]);
        k.extend(sk);
        v.extend(sv);
        let table = arena.alloc(full_lens[b]);
        arena.scatter(&table, &k, &v);
        full_tables.push(table);
    }

    let q = rng.vec(n_seqs * s.n_heads * s.head_dim, 1.0);
    let paged = run_paged(&arena, &q, &full_tables, &full_lens);
    if full_lens.iter().all(|&l| l > 0) {
        let want = contiguous_reference(&arena, &q, &full_tables, &full_lens);
        check_close(&format!("{name}: paged vs contiguous"), &paged, &want);
    }

    let levels: Vec<Level<'_>> = level_specs
        .iter()
        .zip(&level_tables)
        .map(|((p, m), t)| Level {
            block_table: t,
            len: *p,
            members: m.clone(),
        })
        .collect();
    let suffix_refs: Vec<&[u32]> = suffix_tables.iter().map(|t| t.as_slice()).collect();
    let max_len = level_specs
        .iter()
        .map(|(p, _)| *p)
        .chain(suffix_lens.iter().copied())
        .max()
        .unwrap_or(0);
    let mut scratch = vec![f32::NAN; cascade_scratch_len(&s, n_seqs, max_len)];
    let mut out = Guarded::new(q.len());
    cascade_decode_attention(
        out.as_mut(),
        &q,
        &arena.k,
        &arena.v,
        &levels,
        &suffix_refs,
        suffix_lens,
        s,
        &mut scratch,
    )
    .unwrap();
    out.check_guards(name);
    check_close(&format!("{name}: cascade vs paged"), out.as_ref(), &paged);
}

/// Suffix lengths for K critiques, cycling through block-edge and odd sizes.
fn suffixes(k: usize, offset: usize) -> Vec<usize> {
    const CYCLE: [usize; 7] = [1, BS - 1, BS, BS + 1, 5, 37, 2];
    (0..k).map(|i| CYCLE[(i + offset) % CYCLE.len()]).collect()
}

fn configs() -> Vec<PagedShape> {
    let mut v = Vec::new();
    for head_dim in [64, 128] {
        for (nh, nkv) in HEADS {
            v.push(shape(nh, nkv, head_dim));
        }
    }
    v
}

#[test]
fn cascade_one_level_matches_paged_decode() {
    let mut rng = Rng::new(2);
    let configs = configs();
    let mut i = 0;
    for p in [0, 1, BS - 1, BS, BS + 1, 37, 100] {
        for k in [1, 3, 16] {
            let s = configs[i % configs.len()];
            cascade_case(
                &format!(
                    "cascade1(P={p},K={k},nh={},nkv={},hs={})",
                    s.n_heads, s.n_kv_heads, s.head_dim
                ),
                s,
                &[(p, 0..k)],
                &suffixes(k, i),
                &mut rng,
            );
            i += 1;
        }
    }
}

#[test]
fn cascade_two_levels_matches_paged_decode() {
    // prompt -> response, both shared by all K critiques, then each critique's suffix.
    let mut rng = Rng::new(3);
    let configs = configs();
    let mut i = 0;
    for (prompt, response) in [(37, 1), (BS, BS + 1), (BS - 1, 100), (0, 23), (5, 0)] {
        for k in [1, 3, 16] {
            let s = configs[i % configs.len()];
            cascade_case(
                &format!(
                    "cascade2(prompt={prompt},response={response},K={k},hs={})",
                    s.head_dim
                ),
                s,
                &[(prompt, 0..k), (response, 0..k)],
                &suffixes(k, i),
                &mut rng,
            );
            i += 1;
        }
    }
}

#[test]
fn cascade_three_nested_levels_matches_paged_decode() {
    // One prompt shared by two responses with K critiques each (B = 2K): prompt over all,
    // response a over 0..K, response b over K..2K, a shared critique opening over the
    // first ceil(K/2) critiques of response a, then each critique's own suffix.
    let mut rng = Rng::new(4);
    let configs = configs();
    let mut i = 0;
    for (prompt, resp_a, resp_b, opening) in
        [(BS + 1, 37, BS - 1, 3), (100, BS, 1, BS), (0, 17, 0, 0)]
    {
        for k in [1, 3, 16] {
            let s = configs[i % configs.len()];
            cascade_case(
                &format!(
                    "cascade3(prompt={prompt},a={resp_a},b={resp_b},open={opening},K={k},nh={},hs={})",
                    s.n_heads, s.head_dim
                ),
                s,
                &[
                    (prompt, 0..2 * k),
                    (resp_a, 0..k),
                    (resp_b, k..2 * k),
                    (opening, 0..k.div_ceil(2)),
                ],
                &suffixes(2 * k, i),
                &mut rng,
            );
            i += 1;
        }
    }
}

#[test]
fn cascade_empty_sides() {
    let mut rng = Rng::new(5);
    let s = shape(9, 3, 64);
    // Empty shared prefix: the shared side is -inf everywhere and must not leak NaN.
    cascade_case("prefix P=0", s, &[(0, 0..3)], &[1, BS, 37], &mut rng);
    // Empty suffixes: every sequence is exactly the prefix.
    cascade_case("suffix S=0", s, &[(BS + 1, 0..3)], &[0, 0, 0], &mut rng);
    // A mix, with no levels at all (cascade reduces to paged decode over the suffixes).
    cascade_case("no levels", s, &[], &[BS - 1, 1, BS + 1], &mut rng);
    // A sequence with no context at all gets a zero output, like paged decode of len 0.
    cascade_case("empty sequence", s, &[(7, 1..3)], &[0, 0, 4], &mut rng);
}

#[test]
fn empty_context_gives_zero_output() {
    let s = shape(3, 3, 64);
    let mut rng = Rng::new(6);
    let arena = Arena::new(s, 2, &mut rng);
    let q = rng.vec(2 * 3 * 64, 1.0);
    let empty: &[u32] = &[];
    let mut scratch = vec![f32::NAN; cascade_scratch_len(&s, 2, 0)];
    let mut out = vec![f32::NAN; q.len()];
    cascade_decode_attention(
        &mut out,
        &q,
        &arena.k,
        &arena.v,
        &[Level {
            block_table: empty,
            len: 0,
            members: 0..2,
        }],
        &[empty, empty],
        &[0, 0],
        s,
        &mut scratch,
    )
    .unwrap();
    assert!(
        out.iter().all(|&x| x == 0.0),
        "cascade over nothing must be 0"
    );
    let mut out = vec![f32::NAN; q.len()];
    paged_decode_attention(
        &mut out,
        &q,
        &arena.k,
        &arena.v,
        &[empty, empty],
        &[0, 0],
        s,
        &mut [],
    )
    .unwrap();
    assert!(
        out.iter().all(|&x| x == 0.0),
        "paged over nothing must be 0"
    );
    let mut o = vec![f32::NAN; 3 * 64];
    let mut lse = [0.0f32; 3];
    attention_partial(
        &mut o,
        &mut lse,
        &q[..3 * 64],
        &arena.k,
        &arena.v,
        empty,
        0..0,
        1,
        0.125,
        &mut [],
        s,
    )
    .unwrap();
    assert!(o.iter().all(|&x| x == 0.0));
    assert!(lse.iter().all(|&l| l == f32::NEG_INFINITY));
}

#[test]
fn merge_hand_cases() {
    // lse_a = lse_b = 0: m = 0, wa = wb = 1, o = (o_a + o_b) / 2, lse = 0 + ln 2.
    let mut o_a = [2.0, -4.0];
    let mut lse_a = [0.0];
    merge_attention_states(&mut o_a, &mut lse_a, &[4.0, 0.0], &[0.0], 2).unwrap();
    assert_eq!(o_a, [3.0, -2.0]);
    assert!((lse_a[0] - 2f32.ln()).abs() < 1e-7, "{}", lse_a[0]);

    // lse_a = ln 3, lse_b = ln 1 = 0: m = ln 3, wa = 1, wb = 1/3; weights 3/4 and 1/4:
    // o = 3/4 [4, 0] + 1/4 [0, 8] = [3, 2]; lse = ln 3 + ln(4/3) = ln 4.
    let mut o_a = [4.0, 0.0];
    let mut lse_a = [3f32.ln()];
    merge_attention_states(&mut o_a, &mut lse_a, &[0.0, 8.0], &[0.0], 2).unwrap();
    assert!(
        (o_a[0] - 3.0).abs() < 1e-6 && (o_a[1] - 2.0).abs() < 1e-6,
        "{o_a:?}"
    );
    assert!((lse_a[0] - 4f32.ln()).abs() < 1e-6, "{}", lse_a[0]);

    // Large equal lse (1000): max subtraction keeps it finite; o = mean, lse = 1000 + ln 2.
    let mut o_a = [1.0];
    let mut lse_a = [1000.0];
    merge_attention_states(&mut o_a, &mut lse_a, &[3.0], &[1000.0], 1).unwrap();
    assert_eq!(o_a, [2.0]);
    assert!(
        (lse_a[0] - (1000.0 + 2f32.ln())).abs() < 1e-3,
        "{}",
        lse_a[0]
    );

    // One side -inf (empty): the other side exactly, whichever it is.
    let ninf = f32::NEG_INFINITY;
    let mut o_a = [0.3, 0.7];
    let mut lse_a = [1.25];
    merge_attention_states(&mut o_a, &mut lse_a, &[9.0, 9.0], &[ninf], 2).unwrap();
    assert_eq!((o_a, lse_a), ([0.3, 0.7], [1.25]));
    let mut o_a = [0.0, 0.0];
    let mut lse_a = [ninf];
    merge_attention_states(&mut o_a, &mut lse_a, &[0.1, -0.2], &[-3.5], 2).unwrap();
    assert_eq!((o_a, lse_a), ([0.1, -0.2], [-3.5]));

    // Both -inf: o = 0, lse = -inf, no NaN (even from garbage outputs).
    let mut o_a = [5.0, f32::NAN];
    let mut lse_a = [ninf];
    merge_attention_states(&mut o_a, &mut lse_a, &[1.0, 2.0], &[ninf], 2).unwrap();
    assert_eq!(o_a, [0.0, 0.0]);
    assert_eq!(lse_a, [ninf]);
}

fn merged(a: (&[f32], &[f32]), b: (&[f32], &[f32]), hs: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut o, mut l) = (a.0.to_vec(), a.1.to_vec());
    merge_attention_states(&mut o, &mut l, b.0, b.1, hs).unwrap();
    (o, l)
}

#[test]
fn merge_is_associative_and_commutative() {
    let mut rng = Rng::new(7);
    let (n, hs) = (13, 64);
    for trial in 0..20 {
        let mut state = |empty_row: Option<usize>| {
            let o = rng.vec(n * hs, 1.0);
            let mut l = rng.vec(n, 6.0);
            if let Some(r) = empty_row {
                l[r] = f32::NEG_INFINITY;
            }
            (o, l)
        };
        let a = state(Some(trial % n));
        let b = state(None);
        let c = state(Some((trial * 5) % n));
        let ab_c = {
            let ab = merged((&a.0, &a.1), (&b.0, &b.1), hs);
            merged((&ab.0, &ab.1), (&c.0, &c.1), hs)
        };
        let a_bc = {
            let bc = merged((&b.0, &b.1), (&c.0, &c.1), hs);
            merged((&a.0, &a.1), (&bc.0, &bc.1), hs)
        };
        let ba = merged((&b.0, &b.1), (&a.0, &a.1), hs);
        let ab = merged((&a.0, &a.1), (&b.0, &b.1), hs);
        check_close("(a+b)+c vs a+(b+c): o", &ab_c.0, &a_bc.0);
        check_close("(a+b)+c vs a+(b+c): lse", &ab_c.1, &a_bc.1);
        check_close("a+b vs b+a: o", &ab.0, &ba.0);
        check_close("a+b vs b+a: lse", &ab.1, &ba.1);
        assert!(ab_c.0.iter().chain(&ab_c.1).all(|x| x.is_finite()));
    }
}

#[test]
fn partial_lse_and_output_match_f64() {
    let mut rng = Rng::new(8);
    for (head_dim, (nh, nkv), start, end) in [
        (64, (9, 3), 0, 37),
        (128, (16, 2), 5, BS + 1),
        (64, (3, 3), BS, 2 * BS),
        (128, (9, 3), 3, 4),
    ] {
        let s = shape(nh, nkv, head_dim);
        let group = nh / nkv;
        let mut arena = Arena::new(s, end.div_ceil(BS) + 2, &mut rng);
        let table = arena.alloc(end);
        // Wider inputs so the scores spread over several units.
        let q = rng.vec(group * head_dim, 3.0);
        let kv_head = nkv - 1;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut out = vec![f32::NAN; group * head_dim];
        let mut lse = vec![f32::NAN; group];
        let mut scores = vec![0.0; group * (end - start)];
        attention_partial(
            &mut out,
            &mut lse,
            &q,
            &arena.k,
            &arena.v,
            &table,
            start..end,
            kv_head,
            scale,
            &mut scores,
            s,
        )
        .unwrap();
        for n in 0..group {
            let qn = &q[n * head_dim..(n + 1) * head_dim];
            let mut logits = Vec::new();
            for p in start..end {
                let o = arena.row(&table, p) + kv_head * head_dim;
                let dot: f64 = (0..head_dim)
                    .map(|i| qn[i] as f64 * arena.k[o + i] as f64)
                    .sum();
                logits.push(dot * scale as f64);
            }
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = logits.iter().map(|x| (x - m).exp()).sum();
            let want_lse = m + sum.ln();
            assert!(
                (lse[n] as f64 - want_lse).abs() < 1e-5 * want_lse.abs().max(1.0),
                "lse {} vs f64 {want_lse}",
                lse[n]
            );
            let mut want_o = vec![0f64; head_dim];
            for (j, p) in (start..end).enumerate() {
                let o = arena.row(&table, p) + kv_head * head_dim;
                let w = (logits[j] - want_lse).exp();
                for (acc, &x) in want_o.iter_mut().zip(&arena.v[o..o + head_dim]) {
                    *acc += w * x as f64;
                }
            }
            let want_o: Vec<f32> = want_o.iter().map(|&x| x as f32).collect();
            check_close(
                "partial o vs f64",
                &out[n * head_dim..(n + 1) * head_dim],
                &want_o,
            );
        }
    }
}

#[test]
fn partial_split_and_merge_equals_whole_range() {
    // Attention over [0, L) equals the merge of [0, a) and [a, L) for any split a,
    // including splits inside a block and the empty ends.
    let mut rng = Rng::new(9);
    let s = shape(16, 2, 128);
    let (group, hs, len): (usize, usize, usize) = (8, 128, 53);
    let mut arena = Arena::new(s, len.div_ceil(BS) + 1, &mut rng);
    let table = arena.alloc(len);
    let q = rng.vec(group * hs, 1.0);
    let scale = 1.0 / (hs as f32).sqrt();
    let mut scores = vec![0.0; group * len];
    let run = |range: std::ops::Range<usize>, scores: &mut [f32]| {
        let mut o = vec![0.0; group * hs];
        let mut l = vec![0.0; group];
        attention_partial(
            &mut o, &mut l, &q, &arena.k, &arena.v, &table, range, 1, scale, scores, s,
        )
        .unwrap();
        (o, l)
    };
    let whole = run(0..len, &mut scores);
    for split in [0, 1, BS - 1, BS, BS + 1, 40, len] {
        let a = run(0..split, &mut scores);
        let b = run(split..len, &mut scores);
        let m = merged((&a.0, &a.1), (&b.0, &b.1), hs);
        check_close(&format!("split at {split}: o"), &m.0, &whole.0);
        check_close(&format!("split at {split}: lse"), &m.1, &whole.1);
    }
}

#[test]
fn block_order_does_not_matter() {
    // The same contiguous K/V in sorted block ids and in reversed, interleaved ids gives
    // bit-identical paged decode output.
    let mut rng = Rng::new(10);
    let s = shape(9, 3, 64);
    let len = 3 * BS + 5;
    let mut arena = Arena::new(s, 10, &mut rng);
    let sorted: Vec<u32> = vec![0, 1, 2, 3];
    let shuffled: Vec<u32> = vec![9, 5, 7, 4];
    let (k, v) = arena.gather(&sorted, len);
    arena.scatter(&shuffled, &k, &v);
    let q = rng.vec(9 * 64, 1.0);
    let a = run_paged(&arena, &q, &[sorted], &[len]);
    let b = run_paged(&arena, &q, &[shuffled], &[len]);
    assert_eq!(a, b);
}

#[test]
fn argument_errors_are_reported() {
    let s = shape(9, 3, 64);
    let mut rng = Rng::new(11);
    let arena = Arena::new(s, 3, &mut rng);
    let q = rng.vec(9 * 64, 1.0);
    let mut out = vec![0.0; 9 * 64];
    let mut scores = vec![0.0; 64];
    let two: &[u32] = &[0, 1];

    // Table too short for the length: 33 positions need 3 blocks.
    let err = paged_decode_attention(
        &mut out,
        &q,
        &arena.k,
        &arena.v,
        &[two],
        &[33],
        s,
        &mut scores,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::Length {
                arg: "block_tables",
                expected: 3,
                actual: 2,
                ..
            }
        ),
        "{err}"
    );
    // Block id outside the arena.
    let bad: &[u32] = &[0, 3];
    let err = paged_decode_attention(
        &mut out,
        &q,
        &arena.k,
        &arena.v,
        &[bad],
        &[20],
        s,
        &mut scores,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::Invalid {
                arg: "block_tables",
                ..
            }
        ),
        "{err}"
    );
    // Wrong q / out lengths, tables count, scratch.
    let err = paged_decode_attention(
        &mut out,
        &q[1..],
        &arena.k,
        &arena.v,
        &[two],
        &[20],
        s,
        &mut scores,
    )
    .unwrap_err();
    assert!(matches!(err, KernelError::Length { arg: "q", .. }), "{err}");
    let err = paged_decode_attention(
        &mut out[1..],
        &q,
        &arena.k,
        &arena.v,
        &[two],
        &[20],
        s,
        &mut scores,
    )
    .unwrap_err();
    assert!(
        matches!(err, KernelError::Length { arg: "out", .. }),
        "{err}"
    );
    let err = paged_decode_attention(
        &mut out,
        &q,
        &arena.k,
        &arena.v,
        &[two, two],
        &[20],
        s,
        &mut scores,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::Length {
                arg: "block_tables",
                ..
            }
        ),
        "{err}"
    );
    let err = paged_decode_attention(
        &mut out,
        &q,
        &arena.k,
        &arena.v,
        &[two],
        &[20],
        s,
        &mut scores[..19],
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::Length {
                arg: "scores",
                expected: 20,
                ..
            }
        ),
        "{err}"
    );
    // Arena not a whole number of blocks; K and V arenas of different sizes.
    let err = paged_decode_attention(
        &mut out,
        &q,
        &arena.k[1..],
        &arena.v[1..],
        &[two],
        &[20],
        s,
        &mut scores,
    )
    .unwrap_err();
    assert!(
        matches!(err, KernelError::Invalid { arg: "k_arena", .. }),
        "{err}"
    );
    let err = paged_decode_attention(
        &mut out,
        &q,
        &arena.k,
        &arena.v[..s.block_elems()],
        &[two],
        &[20],
        s,
        &mut scores,
    )
    .unwrap_err();
    assert!(
        matches!(err, KernelError::Length { arg: "v_arena", .. }),
        "{err}"
    );
    // Bad shapes.
    for bad_shape in [
        shape(8, 3, 64),
        shape(9, 0, 64),
        shape(9, 3, 0),
        PagedShape { block_size: 0, ..s },
    ] {
        let err = paged_decode_attention(
            &mut out,
            &q,
            &arena.k,
            &arena.v,
            &[two],
            &[20],
            bad_shape,
            &mut scores,
        )
        .unwrap_err();
        assert!(
            matches!(err, KernelError::Invalid { arg: "shape", .. }),
            "{err}"
        );
    }

    // Cascade: members outside the group, level table too short, scratch too small.
    let level = |len, members| Level {
        block_table: two,
        len,
        members,
    };
    let need = cascade_scratch_len(&s, 1, 20);
    let mut scratch = vec![0.0; need];
    let err = cascade_decode_attention(
        &mut out,
        &q,
        &arena.k,
        &arena.v,
        &[level(20, 0..2)],
        &[two],
        &[1],
        s,
        &mut scratch,
    )
    .unwrap_err();
    assert!(
        matches!(err, KernelError::Invalid { arg: "levels", .. }),
        "{err}"
    );
    let err = cascade_decode_attention(
        &mut out,
        &q,
        &arena.k,
        &arena.v,
        &[level(33, 0..1)],
        &[two],
        &[1],
        s,
        &mut scratch,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::Length {
                arg: "levels",
                expected: 3,
                actual: 2,
                ..
            }
        ),
        "{err}"
    );
    let err = cascade_decode_attention(
        &mut out,
        &q,
        &arena.k,
        &arena.v,
        &[level(20, 0..1)],
        &[two],
        &[40],
        s,
        &mut scratch,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::Length {
                arg: "suffix_tables",
                ..
            }
        ),
        "{err}"
    );
    let err = cascade_decode_attention(
        &mut out,
        &q,
        &arena.k,
        &arena.v,
        &[level(20, 0..1)],
        &[two],
        &[1],
        s,
        &mut scratch[..need - 1],
    )
    .unwrap_err();
    assert!(
        matches!(err, KernelError::Length { arg: "scratch", .. }),
        "{err}"
    );
    let err = cascade_decode_attention(
        &mut out,
        &q,
        &arena.k,
        &arena.v,
        &[level(20, 0..1)],
        &[two, two],
        &[1],
        s,
        &mut scratch,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::Length {
                arg: "suffix_tables",
                ..
            }
        ),
        "{err}"
    );
    cascade_decode_attention(
        &mut out,
        &q,
        &arena.k,
        &arena.v,
        &[level(20, 0..1)],
        &[two],
        &[1],
        s,
        &mut scratch,
    )
    .unwrap();

    // attention_partial: kv head, reversed range, lengths.
    let mut o = vec![0.0; 3 * 64];
    let mut l = vec![0.0; 3];
    let err = attention_partial(
        &mut o,
        &mut l,
        &q[..3 * 64],
        &arena.k,
        &arena.v,
        two,
        0..20,
        3,
        0.1,
        &mut scores,
        s,
    )
    .unwrap_err();
    assert!(
        matches!(err, KernelError::Invalid { arg: "kv_head", .. }),
        "{err}"
    );
    #[allow(clippy::reversed_empty_ranges)]
    let err = attention_partial(
        &mut o,
        &mut l,
        &q[..3 * 64],
        &arena.k,
        &arena.v,
        two,
        5..2,
        0,
        0.1,
        &mut scores,
        s,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::Invalid {
                arg: "positions",
                ..
            }
        ),
        "{err}"
    );
    let err = attention_partial(
        &mut o,
        &mut l,
        &q[..2 * 64],
        &arena.k,
        &arena.v,
        two,
        0..20,
        0,
        0.1,
        &mut scores,
        s,
    )
    .unwrap_err();
    assert!(matches!(err, KernelError::Length { arg: "q", .. }), "{err}");
    let err = attention_partial(
        &mut o,
        &mut l,
        &q[..3 * 64],
        &arena.k,
        &arena.v,
        two,
        0..20,
        0,
        0.1,
        &mut scores[..59],
        s,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::Length {
                arg: "scores",
                expected: 60,
                ..
            }
        ),
        "{err}"
    );
    let err = attention_partial(
        &mut o,
        &mut l,
        &q[..3 * 64],
        &arena.k,
        &arena.v,
        two,
        10..40,
        0,
        0.1,
        &mut scores,
        s,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::Length {
                arg: "block_table",
                ..
            }
        ),
        "{err}"
    );

    // merge_attention_states: lengths and head_dim.
    let mut oa = vec![0.0; 4];
    let mut la = vec![0.0; 2];
    let err = merge_attention_states(&mut oa, &mut la, &[0.0; 4], &[0.0; 1], 2).unwrap_err();
    assert!(
        matches!(err, KernelError::Length { arg: "lse_b", .. }),
        "{err}"
    );
    let err = merge_attention_states(&mut oa, &mut la, &[0.0; 3], &[0.0; 2], 2).unwrap_err();
    assert!(
        matches!(err, KernelError::Length { arg: "o_b", .. }),
        "{err}"
    );
    let err = merge_attention_states(&mut oa, &mut la, &[0.0; 4], &[0.0; 2], 3).unwrap_err();
    assert!(
        matches!(err, KernelError::Length { arg: "o_a", .. }),
        "{err}"
    );
    let err = merge_attention_states(&mut oa, &mut la, &[0.0; 4], &[0.0; 2], 0).unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::Invalid {
                arg: "head_dim",
                ..
            }
        ),
        "{err}"
    );
}
