//! Seeded pseudo-random fill (the reference of `kernels/cuda/init.cu`): benchmark models
//! whose weights are generated where they are used (on the GPU, or here) instead of read
//! from a checkpoint. Counter-based: element i depends only on (seed, i), so any slice of
//! a tensor can be generated alone, in any order, on any device, with the same bits.

use half::bf16;

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Element `i` of the stream `seed`, as f32 before the bf16 rounding:
/// offset + scale * (2u - 1) with u = (mix(seed + (i + 1) * golden) >> 40) * 2^-24 in
/// [0, 1). The product and the sum are rounded separately (no FMA), as the kernel does.
pub fn uniform_value(seed: u64, i: u64, scale: f32, offset: f32) -> f32 {
    let z = mix(seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let u = (z >> 40) as u32 as f32 * (1.0 / 16_777_216.0);
    offset + scale * (2.0 * u - 1.0)
}

/// out[i] = bf16(uniform_value(seed, first + i, scale, offset)).
pub fn fill_uniform_bf16(out: &mut [bf16], seed: u64, first: u64, scale: f32, offset: f32) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = bf16::from_f32(uniform_value(seed, first + i as u64, scale, offset));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_in_range_centred_and_independent_of_the_slice() {
        let mut all = vec![bf16::ZERO; 10_000];
        fill_uniform_bf16(&mut all, 7, 0, 0.5, 1.0);
        let vals: Vec<f32> = all.iter().map(|v| v.to_f32()).collect();
        assert!(vals.iter().all(|&v| (0.5..=1.5).contains(&v)));
        let mean = vals.iter().sum::<f32>() / vals.len() as f32;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
        // A slice generated alone has the same bits.
        let mut part = vec![bf16::ZERO; 33];
        fill_uniform_bf16(&mut part, 7, 5_000, 0.5, 1.0);
        assert_eq!(&part[..], &all[5_000..5_033]);
        // Another seed gives another stream.
        let mut other = vec![bf16::ZERO; 33];
        fill_uniform_bf16(&mut other, 8, 5_000, 0.5, 1.0);
        assert_ne!(other, part);
        // u = 0 maps to offset - scale exactly (2u - 1 is exact).
        assert_eq!(0.25 + 2.0 * (2.0 * 0.0 - 1.0), -1.75f32);
    }
}
