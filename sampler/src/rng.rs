//! Counter-based RNG: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
//! 3", SC'11; the Random123 constants), one stream per sequence. The CUDA sampling kernel
//! computes the same function, so CPU and GPU draws are identical bit for bit.
//!
//! # Exact recipe (what `sampling.cu` must reproduce)
//!
//! For a draw at `(seed: u64, sequence: u64, step: u64)`:
//!
//! ```text
//! key     = [lo32(seed), hi32(seed)]
//! counter = [lo32(step), hi32(step), lo32(sequence), hi32(sequence)]
//! out     = philox4x32_10(counter, key)            // 10 rounds, key bumped between rounds
//! u       = (out[0] >> 8) as f32 * 2^-24           // top 24 bits of the first word
//! ```
//!
//! `u` is exactly `k / 16777216` for an integer `k` in `0..2^24`, so it lies in
//! `[0, 1 - 2^-24]` and both the int-to-float conversion and the scaling are exact (no rounding
//! mode matters; in CUDA: `(float)(out.x >> 8) * 0x1p-24f`).
//!
//! One Philox round on `(c0, c1, c2, c3)` with key `(k0, k1)`:
//! `(hi0, lo0) = M0 * c0`, `(hi1, lo1) = M1 * c2` (32x32 -> 64-bit products), then
//! `(c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)`. Before rounds 2..=10 the key
//! is bumped: `k0 += W0`, `k1 += W1` (wrapping).
//!
//! The whole 128-bit counter holds (step, sequence), so distinct (sequence, step) pairs under one
//! seed give distinct Philox blocks (Philox is a bijection of the counter for a fixed key). The
//! other three words `out[1..4]` of a block are reserved as draw indices 1..=3 of the same step
//! (for a future sampler needing more than one draw per token); `uniform` uses draw 0 = `out[0]`.
//!
//! Draws depend only on `(seed, sequence, step)`: never on thread count, batch composition or
//! the order in which sequences are sampled.

/// Philox multiplier for counter word 0.
pub const PHILOX_M0: u32 = 0xD251_1F53;
/// Philox multiplier for counter word 2.
pub const PHILOX_M1: u32 = 0xCD9E_8D57;
/// Key bump for key word 0 (golden ratio).
pub const PHILOX_W0: u32 = 0x9E37_79B9;
/// Key bump for key word 1 (sqrt(3) - 1).
pub const PHILOX_W1: u32 = 0xBB67_AE85;

/// High and low 32 bits of the 64-bit product `a * b`.
#[inline]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let product = u64::from(a) * u64::from(b);
    ((product >> 32) as u32, product as u32)
}

#[inline]
fn philox_round(c: [u32; 4], k: [u32; 2]) -> [u32; 4] {
    let (hi0, lo0) = mulhilo(PHILOX_M0, c[0]);
    let (hi1, lo1) = mulhilo(PHILOX_M1, c[2]);
    [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
}

/// Philox4x32 with 10 rounds: the Random123 `philox4x32_R(10, ctr, key)`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W0);
            k[1] = k[1].wrapping_add(PHILOX_W1);
        }
        c = philox_round(c, k);
    }
    c
}

/// Maps a 32-bit word to `[0, 1)`: its top 24 bits times 2^-24 (exact).
#[inline]
pub fn uniform_from_bits(word: u32) -> f32 {
    const SCALE: f32 = 1.0 / 16_777_216.0; // 2^-24, exact
    (word >> 8) as f32 * SCALE
}

/// The random stream of one sequence: Philox keyed by the seed, counter = (step, sequence).
///
/// It also carries a cursor, the next step to draw, so a decode loop can call
/// [`SeqRng::next_uniform`]; the draw itself is a pure function of (seed, sequence, step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRng {
    seed: u64,
    sequence: u64,
    /// Next step that `next_uniform` draws (= number of tokens sampled so far by default).
    step: u64,
}

impl SeqRng {
    /// The stream of `sequence` under `seed`, cursor at step 0.
    pub fn new(seed: u64, sequence: u64) -> Self {
        Self {
            seed,
            sequence,
            step: 0,
        }
    }

    /// The seed (Philox key).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The sequence id (high half of the Philox counter).
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The cursor: the step the next `next_uniform` draws.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Moves the cursor, e.g. to resume a sequence at a known token index.
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// The full Philox block of `step`: word 0 is draw 0 (used by `uniform`), words 1..=3 are
    /// reserved draws of the same step.
    pub fn block(&self, step: u64) -> [u32; 4] {
        let key = [self.seed as u32, (self.seed >> 32) as u32];
        let counter = [
            step as u32,
            (step >> 32) as u32,
            self.sequence as u32,
            (self.sequence >> 32) as u32,
        ];
        philox4x32_10(counter, key)
    }

    /// Draw 0 of `step` in `[0, 1)`, without touching the cursor.
    pub fn uniform_at(&self, step: u64) -> f32 {
        uniform_from_bits(self.block(step)[0])
    }

    /// Draw 0 of `step` in `[0, 1)`; the cursor moves to `step + 1` (wrapping).
    pub fn uniform(&mut self, step: u64) -> f32 {
        self.step = step.wrapping_add(1);
        self.uniform_at(step)
    }

    /// Draw at the cursor, then advance it.
    pub fn next_uniform(&mut self) -> f32 {
        self.uniform(self.step)
    }

    /// Advances the cursor by one step without computing a draw (a greedy token).
    pub fn skip(&mut self) {
        self.step = self.step.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123 kat_vectors, philox4x32 with 10 rounds: (counter, key, expected).
    #[test]
    fn philox_known_answers() {
        let cases: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            (
                [0, 0, 0, 0],
                [0, 0],
                [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
            ),
            (
                [0xffffffff; 4],
                [0xffffffff; 2],
                [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
            ),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (ctr, key, want) in cases {
            assert_eq!(
                philox4x32_10(ctr, key),
                want,
                "ctr {ctr:08x?} key {key:08x?}"
            );
        }
    }

    #[test]
    fn uniform_bit_recipe() {
        assert_eq!(uniform_from_bits(0), 0.0);
        assert_eq!(uniform_from_bits(0xff), 0.0);
        assert_eq!(uniform_from_bits(0x100), 1.0 / 16_777_216.0);
        assert_eq!(uniform_from_bits(0x8000_0000), 0.5);
        let top = uniform_from_bits(u32::MAX);
        assert!(top < 1.0);
        assert_eq!(top, 1.0 - 1.0 / 16_777_216.0);
    }

    /// Layout check against an independent Python model of the recipe in the module docs:
    /// seed 0xDEADBEEFCAFEF00D, sequence 7, step 2^33 + 5 (every counter and key word nonzero).
    #[test]
    fn counter_layout_uses_all_words() {
        let rng = SeqRng::new(0xDEAD_BEEF_CAFE_F00D, 7);
        let step = (1u64 << 33) + 5;
        assert_eq!(
            rng.block(step),
            [0x2cd37cec, 0xf94bfa38, 0x4ce99948, 0x2f5a23a3]
        );
        assert_eq!(rng.uniform_at(step), 0.175_102);
    }

    #[test]
    fn cursor_moves() {
        let mut a = SeqRng::new(1, 2);
        assert_eq!(a.step(), 0);
        let u0 = a.next_uniform();
        assert_eq!(a.step(), 1);
        a.skip();
        assert_eq!(a.step(), 2);
        let u2 = a.next_uniform();
        let b = SeqRng::new(1, 2);
        assert_eq!(u0, b.uniform_at(0));
        assert_eq!(u2, b.uniform_at(2));
        a.set_step(u64::MAX);
        let _ = a.next_uniform();
        assert_eq!(a.step(), 0);
        assert_eq!((a.seed(), a.sequence()), (1, 2));
    }
}
