//! Read-only weight slices in their on-disk dtype. Kernels convert elements to f32 in
//! registers; the model is never copied to an f32 buffer.

use half::{bf16, f16};

/// A borrowed weight tensor (row-major), in the dtype it has on disk.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

impl<'a> Weights<'a> {
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::BF16(w) => w.len(),
            Weights::F16(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as f32.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Weights::F32(w) => w[i],
            Weights::BF16(w) => w[i].to_f32(),
            Weights::F16(w) => w[i].to_f32(),
        }
    }

    /// Elements `start..start + len`.
    #[inline]
    pub fn slice(&self, start: usize, len: usize) -> Weights<'a> {
        match *self {
            Weights::F32(w) => Weights::F32(&w[start..start + len]),
            Weights::BF16(w) => Weights::BF16(&w[start..start + len]),
            Weights::F16(w) => Weights::F16(&w[start..start + len]),
        }
    }

    /// Bytes per element.
    pub fn elem_size(&self) -> usize {
        match self {
            Weights::F32(_) => 4,
            Weights::BF16(_) | Weights::F16(_) => 2,
        }
    }

    pub fn dtype_name(&self) -> &'static str {
        match self {
            Weights::F32(_) => "f32",
            Weights::BF16(_) => "bf16",
            Weights::F16(_) => "f16",
        }
    }

    /// Copy into `out` as f32 (tests, small tensors).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }
}
