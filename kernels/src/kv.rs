//! Element types of the paged KV arenas.
//!
//! The cache is f32 by default (the reference's own arithmetic, bit for bit). f16 halves
//! the bytes every decode step streams through attention and the memory a long context
//! holds; values are rounded to nearest f16 when written and widened exactly when read, so
//! a kernel over an f16 arena computes what it computes over the f32 arena holding the
//! same (rounded) values.

use half::f16;
use half::slice::HalfFloatSliceExt;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

/// f32 or f16: what a K/V arena holds.
pub trait KvElem:
    Copy + Default + Send + Sync + std::fmt::Debug + 'static + sealed::Sealed
{
    /// "f32" or "f16".
    const NAME: &'static str;
    fn to_f32(self) -> f32;
    /// Round to nearest (ties to even).
    fn from_f32(x: f32) -> Self;
    /// The arena as f32 if that is its type.
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
    /// The arena as f16 if that is its type.
    fn as_f16(s: &[Self]) -> Option<&[f16]>;
    /// `n` zeros from zeroed memory: pages the cache never writes stay unmapped, as for
    /// `vec![0.0f32; n]` (an element-by-element fill would make a whole arena resident).
    fn zeroed_vec(n: usize) -> Vec<Self>;
    /// Writes `src` into `dst` (same length) as arena elements, rounded for f16.
    fn store_row(dst: &mut [Self], src: &[f32]);
}

impl KvElem for f32 {
    const NAME: &'static str = "f32";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    fn as_f16(_: &[Self]) -> Option<&[f16]> {
        None
    }
    fn zeroed_vec(n: usize) -> Vec<Self> {
        vec![0.0; n]
    }
    fn store_row(dst: &mut [Self], src: &[f32]) {
        dst.copy_from_slice(src);
    }
}

impl KvElem for f16 {
    const NAME: &'static str = "f16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_f16(s: &[Self]) -> Option<&[f16]> {
        Some(s)
    }
    fn zeroed_vec(n: usize) -> Vec<Self> {
        let mut v = std::mem::ManuallyDrop::new(vec![0u16; n]);
        // SAFETY: f16 is a transparent u16 (same size and alignment, every bit pattern
        // valid), and the allocation moves over whole with its length and capacity.
        unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut f16, v.len(), v.capacity()) }
    }
    fn store_row(dst: &mut [Self], src: &[f32]) {
        dst.convert_from_f32_slice(src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trip_rounds_to_nearest_and_widens_exactly() {
        let src = [
            0.0f32,
            -1.5,
            1.0 / 3.0,
            65504.0,
            1e-8,
            f32::INFINITY,
            70000.0,
        ];
        let mut dst = [f16::ZERO; 7];
        f16::store_row(&mut dst, &src);
        for (d, s) in dst.iter().zip(src) {
            assert_eq!(d.to_f32().to_bits(), f16::from_f32(s).to_f32().to_bits());
        }
        assert_eq!(dst[5].to_f32(), f32::INFINITY);
        assert_eq!(
            dst[6].to_f32(),
            f32::INFINITY,
            "overflow rounds to infinity"
        );
        let z = f16::zeroed_vec(1000);
        assert_eq!(z.len(), 1000);
        assert!(z.iter().all(|&x| x.to_bits() == 0));
        let mut same = [0.0f32; 7];
        f32::store_row(&mut same, &src);
        assert_eq!(same, src);
    }
}
