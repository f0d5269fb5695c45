//! Dequantisation of ggml tensor blocks to f32 (ggml-quants.c `dequantize_row_*`).
//!
//! Block layouts (little endian, `d`/`m` are f16 unless noted; QK = 32, QK_K = 256):
//!
//! - Q8_0: `d, qs[32] i8`; `y[j] = qs[j] * d`.
//! - Q8_1: `d, s, qs[32] i8` (`s` = d * sum(qs), unused here); `y[j] = qs[j] * d`.
//! - Q4_0: `d, qs[16]`; low nibbles are elements 0..16, high nibbles 16..32;
//!   `y = (q - 8) * d`.
//! - Q4_1: `d, m, qs[16]` (nibbles as Q4_0); `y = q * d + m`.
//! - Q5_0: `d, qh u32, qs[16]`; bit j of qh is bit 4 of element j; `y = (q - 16) * d`.
//! - Q5_1: `d, m, qh u32, qs[16]`; `y = q * d + m`.
//! - Q4_K: `d, dmin, scales[12], qs[128]`: 8 sub-blocks of 32 with 6-bit scale and min.
//! - Q6_K: `ql[128], qh[64], scales[16] i8, d`: 16 sub-blocks of 16, 6-bit q - 32.

use half::{bf16, f16};

use super::reader::GgmlType;

/// Why a block buffer could not be dequantised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DequantError {
    /// No dequantiser for this type.
    Unsupported(GgmlType),
    /// `bytes` does not hold exactly `n_elements` of the type (or `n_elements` is not a
    /// multiple of the block size).
    Length {
        expected: Option<usize>,
        actual: usize,
    },
}

/// Whether [`dequantize`] handles `ty`.
pub fn is_supported(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
            | GgmlType::F64
            | GgmlType::Q8_0
            | GgmlType::Q8_1
            | GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q4K
            | GgmlType::Q6K
    )
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Dequantise `n_elements` values of type `ty` from `bytes` (which must be exactly
/// their encoded size).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>, DequantError> {
    if !is_supported(ty) {
        return Err(DequantError::Unsupported(ty));
    }
    let Some((block, block_bytes)) = ty.block_layout() else {
        return Err(DequantError::Unsupported(ty));
    };
    let (block, block_bytes) = (block as usize, block_bytes as usize);
    let expected = if n_elements.is_multiple_of(block) {
        (n_elements / block).checked_mul(block_bytes)
    } else {
        None
    };
    if expected != Some(bytes.len()) {
        return Err(DequantError::Length {
            expected,
            actual: bytes.len(),
        });
    }
    let mut out = vec![0f32; n_elements];
    let blocks = bytes
        .chunks_exact(block_bytes)
        .zip(out.chunks_exact_mut(block));
    match ty {
        GgmlType::F32 => {
            blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
        GgmlType::BF16 => {
            blocks.for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32())
        }
        GgmlType::F64 => blocks.for_each(|(b, y)| {
            y[0] = f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
        }),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| q8(f16_at(b, 0), &b[2..34], y)),
        GgmlType::Q8_1 => blocks.for_each(|(b, y)| q8(f16_at(b, 0), &b[4..36], y)),
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 0);
            for (j, &q) in b[2..18].iter().enumerate() {
                y[j] = (f32::from(q & 0x0f) - 8.0) * d;
                y[j + 16] = (f32::from(q >> 4) - 8.0) * d;
            }
        }),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for (j, &q) in b[4..20].iter().enumerate() {
                y[j] = f32::from(q & 0x0f) * d + m;
                y[j + 16] = f32::from(q >> 4) * d + m;
            }
        }),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 0);
            let qh = u32_at(b, 2);
            for (j, &q) in b[6..22].iter().enumerate() {
                let h0 = (((qh >> j) & 1) << 4) as u8;
                let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
                y[j] = (f32::from((q & 0x0f) | h0) - 16.0) * d;
                y[j + 16] = (f32::from((q >> 4) | h1) - 16.0) * d;
            }
        }),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qh = u32_at(b, 4);
            for (j, &q) in b[8..24].iter().enumerate() {
                let h0 = (((qh >> j) & 1) << 4) as u8;
                let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
                y[j] = f32::from((q & 0x0f) | h0) * d + m;
                y[j + 16] = f32::from((q >> 4) | h1) * d + m;
            }
        }),
        GgmlType::Q4K => blocks.for_each(|(b, y)| q4_k(b, y)),
        GgmlType::Q6K => blocks.for_each(|(b, y)| q6_k(b, y)),
        _ => return Err(DequantError::Unsupported(ty)),
    }
    Ok(out)
}

fn q8(d: f32, qs: &[u8], y: &mut [f32]) {
    for (o, &q) in y.iter_mut().zip(qs) {
        *o = f32::from(q as i8) * d;
    }
}

/// ggml `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// One Q4_K block (144 bytes -> 256 values).
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, mm1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, mm2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let q = &qs[32 * chunk..32 * chunk + 32];
        let out = &mut y[64 * chunk..64 * chunk + 64];
        for l in 0..32 {
            out[l] = d1 * f32::from(q[l] & 0x0f) - mm1;
            out[l + 32] = d2 * f32::from(q[l] >> 4) - mm2;
        }
    }
}

/// One Q6_K block (210 bytes -> 256 values).
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let out = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            let s = |k: usize| f32::from(sc[is + k] as i8);
            out[l] = d * s(0) * q1 as f32;
            out[l + 32] = d * s(2) * q2 as f32;
            out[l + 64] = d * s(4) * q3 as f32;
            out[l + 96] = d * s(6) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16b(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q8_0_block() {
        let mut b = Vec::new();
        b.extend_from_slice(&f16b(0.5));
        for j in 0..32i8 {
            b.push((j - 16) as u8);
        }
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        // y[j] = (j - 16) * 0.5
        assert_eq!(y[0], -8.0);
        assert_eq!(y[16], 0.0);
        assert_eq!(y[31], 7.5);
    }

    #[test]
    fn q4_0_block() {
        let mut b = Vec::new();
        b.extend_from_slice(&f16b(2.0));
        // byte j = low nibble j, high nibble 15 - j
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!(y[0], -16.0); // (0 - 8) * 2
        assert_eq!(y[15], 14.0); // (15 - 8) * 2
        assert_eq!(y[16], 14.0); // high nibble of byte 0 = 15: (15 - 8) * 2
        assert_eq!(y[31], -16.0); // high nibble of byte 15 = 0
    }

    #[test]
    fn q4_1_block() {
        let mut b = Vec::new();
        b.extend_from_slice(&f16b(0.25));
        b.extend_from_slice(&f16b(-1.0));
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!(y[3], 3.0 * 0.25 - 1.0); // q = 3
        assert_eq!(y[19], 12.0 * 0.25 - 1.0); // high nibble of byte 3 = 12
    }

    #[test]
    fn q5_0_block() {
        let mut b = Vec::new();
        b.extend_from_slice(&f16b(1.0));
        // qh bit 1 (element 1) and bit 17 (element 17) set
        b.extend_from_slice(&((1u32 << 1) | (1u32 << 17)).to_le_bytes());
        b.extend_from_slice(&[0x21; 16]); // low nibble 1, high nibble 2
        let y = dequantize(GgmlType::Q5_0, &b, 32).unwrap();
        assert_eq!(y[0], 1.0 - 16.0); // q = 1
        assert_eq!(y[1], 17.0 - 16.0); // q = 1 | 16
        assert_eq!(y[16], 2.0 - 16.0); // q = 2
        assert_eq!(y[17], 18.0 - 16.0); // q = 2 | 16
    }

    #[test]
    fn q5_1_block() {
        let mut b = Vec::new();
        b.extend_from_slice(&f16b(0.5));
        b.extend_from_slice(&f16b(3.0));
        // qh bit 0 (element 0) and bit 31 (element 31) set
        b.extend_from_slice(&(1u32 | (1u32 << 31)).to_le_bytes());
        b.extend_from_slice(&[0x43; 16]); // low nibble 3, high nibble 4
        let y = dequantize(GgmlType::Q5_1, &b, 32).unwrap();
        assert_eq!(y[0], 19.0 * 0.5 + 3.0); // q = 3 | 16
        assert_eq!(y[1], 3.0 * 0.5 + 3.0); // q = 3
        assert_eq!(y[16], 4.0 * 0.5 + 3.0); // q = 4
        assert_eq!(y[31], 20.0 * 0.5 + 3.0); // q = 4 | 16
    }

    #[test]
    fn q8_1_block() {
        let mut b = Vec::new();
        b.extend_from_slice(&f16b(0.25));
        b.extend_from_slice(&f16b(123.0)); // s, unused by dequantisation
        b.extend((0..32).map(|j: i32| (j * 4 - 64) as i8 as u8));
        let y = dequantize(GgmlType::Q8_1, &b, 32).unwrap();
        assert_eq!(y[0], -16.0); // -64 * 0.25
        assert_eq!(y[31], 15.0); // 60 * 0.25
    }

    #[test]
    fn unsupported_type() {
        assert_eq!(
            dequantize(GgmlType::Q2K, &[0u8; 84], 256),
            Err(DequantError::Unsupported(GgmlType::Q2K))
        );
    }

    #[test]
    fn length_mismatch_is_an_error() {
        assert!(matches!(
            dequantize(GgmlType::Q8_0, &[0u8; 33], 32),
            Err(DequantError::Length { .. })
        ));
        assert!(matches!(
            dequantize(GgmlType::Q8_0, &[0u8; 34], 31),
            Err(DequantError::Length { expected: None, .. })
        ));
    }
}
