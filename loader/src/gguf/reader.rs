//! GGUF v2/v3 reader: header, metadata key/values, tensor infos, and validated byte
//! ranges of the tensor data, over a memory map of the file.
//!
//! Layout (little endian; ggml `docs/gguf.md`):
//!
//! ```text
//! magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
//! kv_count x { key: string, value_type: u32, value }
//! tensor_count x { name: string, n_dims: u32, ne: n_dims x u64, ggml_type: u32, offset: u64 }
//! padding to general.alignment (default 32)
//! tensor data; each tensor at data_start + offset (offset a multiple of the alignment)
//! string = len u64 + UTF-8 bytes; array = elem_type u32 + count u64 + count x value
//! ```
//!
//! The file is untrusted: every length, count and offset is checked against the bytes
//! that remain before anything is allocated from it, arithmetic is checked, and nested
//! arrays are limited in depth.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::GgufError;
use crate::LoaderError;

/// Default `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest nesting of arrays inside arrays that the reader accepts.
pub const MAX_ARRAY_DEPTH: usize = 8;
/// GGML_MAX_DIMS.
pub const MAX_DIMS: u32 = 4;

/// A ggml tensor element type (the `ggml_type` enum of ggml.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
    /// Any other id (i-quants, removed or future types).
    Other(u32),
}

impl GgmlType {
    pub fn from_id(id: u32) -> GgmlType {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            15 => GgmlType::Q8K,
            24 => GgmlType::I8,
            25 => GgmlType::I16,
            26 => GgmlType::I32,
            27 => GgmlType::I64,
            28 => GgmlType::F64,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Q8K => 15,
            GgmlType::I8 => 24,
            GgmlType::I16 => 25,
            GgmlType::I32 => 26,
            GgmlType::I64 => 27,
            GgmlType::F64 => 28,
            GgmlType::BF16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    /// (elements per block, bytes per block), `None` for types whose layout this
    /// reader does not know.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        Some(match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q8_1 => (32, 36),
            GgmlType::Q2K => (256, 84),
            GgmlType::Q3K => (256, 110),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
            GgmlType::Q8K => (256, 292),
            GgmlType::I8 => (1, 1),
            GgmlType::I16 => (1, 2),
            GgmlType::I32 => (1, 4),
            GgmlType::I64 => (1, 8),
            GgmlType::F64 => (1, 8),
            GgmlType::BF16 => (1, 2),
            GgmlType::Other(_) => return None,
        })
    }

    pub fn name(self) -> String {
        match self {
            GgmlType::Q2K => "Q2_K".into(),
            GgmlType::Q3K => "Q3_K".into(),
            GgmlType::Q4K => "Q4_K".into(),
            GgmlType::Q5K => "Q5_K".into(),
            GgmlType::Q6K => "Q6_K".into(),
            GgmlType::Q8K => "Q8_K".into(),
            GgmlType::Other(id) => format!("ggml_type {id}"),
            t => format!("{t:?}"),
        }
    }
}

/// GGUF metadata value types (`gguf_type`).
pub mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(GgufArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array, stored typed so that memory stays proportional to the file.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl GgufArray {
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The GGUF type id of the elements.
    pub fn elem_type(&self) -> u32 {
        match self {
            GgufArray::U8(_) => value_type::U8,
            GgufArray::I8(_) => value_type::I8,
            GgufArray::U16(_) => value_type::U16,
            GgufArray::I16(_) => value_type::I16,
            GgufArray::U32(_) => value_type::U32,
            GgufArray::I32(_) => value_type::I32,
            GgufArray::F32(_) => value_type::F32,
            GgufArray::Bool(_) => value_type::BOOL,
            GgufArray::String(_) => value_type::STRING,
            GgufArray::Array(_) => value_type::ARRAY,
            GgufArray::U64(_) => value_type::U64,
            GgufArray::I64(_) => value_type::I64,
            GgufArray::F64(_) => value_type::F64,
        }
    }

    /// Element `i` as an integer, for integer arrays.
    pub fn int_at(&self, i: usize) -> Option<i128> {
        Some(match self {
            GgufArray::U8(v) => i128::from(*v.get(i)?),
            GgufArray::I8(v) => i128::from(*v.get(i)?),
            GgufArray::U16(v) => i128::from(*v.get(i)?),
            GgufArray::I16(v) => i128::from(*v.get(i)?),
            GgufArray::U32(v) => i128::from(*v.get(i)?),
            GgufArray::I32(v) => i128::from(*v.get(i)?),
            GgufArray::U64(v) => i128::from(*v.get(i)?),
            GgufArray::I64(v) => i128::from(*v.get(i)?),
            _ => return None,
        })
    }
}

impl GgufValue {
    /// The GGUF type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }

    /// Any integer value, widened.
    pub fn as_int(&self) -> Option<i128> {
        Some(match self {
            GgufValue::U8(v) => i128::from(*v),
            GgufValue::I8(v) => i128::from(*v),
            GgufValue::U16(v) => i128::from(*v),
            GgufValue::I16(v) => i128::from(*v),
            GgufValue::U32(v) => i128::from(*v),
            GgufValue::I32(v) => i128::from(*v),
            GgufValue::U64(v) => i128::from(*v),
            GgufValue::I64(v) => i128::from(*v),
            _ => return None,
        })
    }

    /// Any float or integer value as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            GgufValue::F32(v) => Some(f64::from(*v)),
            GgufValue::F64(v) => Some(*v),
            other => other.as_int().map(|x| x as f64),
        }
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml `ne`: `dims[0]` varies fastest (the reverse of the PyTorch shape).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub n_elements: u64,
    /// Byte length, `None` when the type's block layout is unknown.
    pub n_bytes: Option<u64>,
}

impl TensorInfo {
    /// The PyTorch / safetensors shape: `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file over a memory map.
pub struct GgufFile {
    path: PathBuf,
    file: String,
    data: Mmap,
    /// Format version (2 or 3).
    pub version: u32,
    metadata: Vec<(String, GgufValue)>,
    index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    /// Alignment of the data section and of each tensor's offset.
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// The parsed header without the file: what [`parse`] returns for a byte slice.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: Vec<(String, GgufValue)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    file: &'a str,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn truncated(&self, what: impl Into<String>) -> GgufError {
        GgufError::Truncated {
            file: self.file.into(),
            what: what.into(),
            offset: self.pos as u64,
        }
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.truncated(what()));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let start = self.pos;
        let len = self.u64(&|| format!("length of {}", what()))?;
        let len = match usize::try_from(len) {
            Ok(l) if l <= self.remaining() => l,
            _ => {
                return Err(GgufError::Truncated {
                    file: self.file.into(),
                    what: format!("{} (string of {len} bytes)", what()),
                    offset: start as u64,
                });
            }
        };
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::BadString {
            file: self.file.into(),
            what: what(),
            offset: start as u64,
        })
    }
}

/// Bytes the smallest encoded element of a value type takes (bounds array counts).
fn min_encoded_size(ty: u32) -> Option<usize> {
    use value_type as t;
    Some(match ty {
        t::U8 | t::I8 | t::BOOL => 1,
        t::U16 | t::I16 => 2,
        t::U32 | t::I32 | t::F32 => 4,
        t::U64 | t::I64 | t::F64 | t::STRING => 8,
        t::ARRAY => 12,
        _ => return None,
    })
}

fn read_value(
    c: &mut Cursor<'_>,
    key: &str,
    ty: u32,
    depth: usize,
) -> Result<GgufValue, GgufError> {
    use value_type as t;
    let what = || format!("value of `{key}`");
    Ok(match ty {
        t::U8 => GgufValue::U8(u8::from_le_bytes(c.array(&what)?)),
        t::I8 => GgufValue::I8(i8::from_le_bytes(c.array(&what)?)),
        t::U16 => GgufValue::U16(u16::from_le_bytes(c.array(&what)?)),
        t::I16 => GgufValue::I16(i16::from_le_bytes(c.array(&what)?)),
        t::U32 => GgufValue::U32(u32::from_le_bytes(c.array(&what)?)),
        t::I32 => GgufValue::I32(i32::from_le_bytes(c.array(&what)?)),
        t::F32 => GgufValue::F32(f32::from_le_bytes(c.array(&what)?)),
        t::BOOL => GgufValue::Bool(read_bool(c, key)?),
        t::STRING => GgufValue::String(c.string(&what)?),
        t::U64 => GgufValue::U64(u64::from_le_bytes(c.array(&what)?)),
        t::I64 => GgufValue::I64(i64::from_le_bytes(c.array(&what)?)),
        t::F64 => GgufValue::F64(f64::from_le_bytes(c.array(&what)?)),
        t::ARRAY => GgufValue::Array(read_array(c, key, depth)?),
        other => {
            return Err(GgufError::BadValueType {
                file: c.file.into(),
                key: key.into(),
                value_type: other,
            });
        }
    })
}

fn read_bool(c: &mut Cursor<'_>, key: &str) -> Result<bool, GgufError> {
    let at = c.pos;
    let [b] = c.array::<1>(&|| format!("value of `{key}`"))?;
    match b {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(GgufError::BadMetadata {
            file: c.file.into(),
            key: key.into(),
            reason: format!("bool byte {other} at offset {at} is neither 0 nor 1"),
        }),
    }
}

fn read_array(c: &mut Cursor<'_>, key: &str, depth: usize) -> Result<GgufArray, GgufError> {
    use value_type as t;
    if depth >= MAX_ARRAY_DEPTH {
        return Err(GgufError::BadMetadata {
            file: c.file.into(),
            key: key.into(),
            reason: format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"),
        });
    }
    let what = || format!("array header of `{key}`");
    let elem_type = c.u32(&what)?;
    let count_at = c.pos;
    let count = c.u64(&what)?;
    let min = min_encoded_size(elem_type).ok_or_else(|| GgufError::BadValueType {
        file: c.file.into(),
        key: key.into(),
        value_type: elem_type,
    })?;
    // The count is untrusted: it must fit in the bytes that remain before we allocate.
    let n = match usize::try_from(count).ok().and_then(|n| n.checked_mul(min)) {
        Some(bytes) if bytes <= c.remaining() => count as usize,
        _ => {
            return Err(GgufError::Truncated {
                file: c.file.into(),
                what: format!("array `{key}` of {count} elements"),
                offset: count_at as u64,
            });
        }
    };
    let elem_what = || format!("array `{key}`");
    macro_rules! fixed {
        ($variant:ident, $ty:ty) => {{
            let mut v: Vec<$ty> = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(<$ty>::from_le_bytes(c.array(&elem_what)?));
            }
            GgufArray::$variant(v)
        }};
    }
    Ok(match elem_type {
        t::U8 => GgufArray::U8(c.take(n, &elem_what)?.to_vec()),
        t::I8 => fixed!(I8, i8),
        t::U16 => fixed!(U16, u16),
        t::I16 => fixed!(I16, i16),
        t::U32 => fixed!(U32, u32),
        t::I32 => fixed!(I32, i32),
        t::F32 => fixed!(F32, f32),
        t::U64 => fixed!(U64, u64),
        t::I64 => fixed!(I64, i64),
        t::F64 => fixed!(F64, f64),
        t::BOOL => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read_bool(c, key)?);
            }
            GgufArray::Bool(v)
        }
        t::STRING => {
            // Strings and arrays grow in memory beyond their encoded size: cap the
            // up-front reservation and let the vector grow as elements parse.
            let mut v = Vec::with_capacity(n.min(1 << 16));
            for i in 0..n {
                v.push(c.string(&|| format!("element {i} of array `{key}`"))?);
            }
            GgufArray::String(v)
        }
        _ => {
            // t::ARRAY (min_encoded_size rejected everything else).
            let mut v = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                v.push(read_array(c, key, depth + 1)?);
            }
            GgufArray::Array(v)
        }
    })
}

/// Parse a whole GGUF file held in memory; `file` names it in errors.
pub fn parse(buf: &[u8], file: &str) -> Result<GgufHeader, GgufError> {
    let mut c = Cursor { buf, pos: 0, file };
    let magic = c.array::<4>(&|| "magic".to_string())?;
    if &magic != b"GGUF" {
        return Err(GgufError::BadMagic { file: file.into() });
    }
    let version = c.u32(&|| "version".to_string())?;
    if version != 2 && version != 3 {
        return Err(GgufError::BadVersion {
            file: file.into(),
            version,
        });
    }
    let tensor_count = c.u64(&|| "tensor count".to_string())?;
    let kv_count = c.u64(&|| "metadata count".to_string())?;

    // Each key/value takes at least 8 (key length) + 4 (type) + 1 bytes.
    let kv_cap = usize::try_from(kv_count)
        .unwrap_or(usize::MAX)
        .min(c.remaining() / 13);
    let mut metadata = Vec::with_capacity(kv_cap);
    let mut index = HashMap::with_capacity(kv_cap);
    for i in 0..kv_count {
        let key = c.string(&|| format!("key of metadata entry {i}"))?;
        let ty = c.u32(&|| format!("value type of `{key}`"))?;
        let value = read_value(&mut c, &key, ty, 0)?;
        if index.insert(key.clone(), metadata.len()).is_some() {
            return Err(GgufError::DuplicateKey {
                file: file.into(),
                key,
            });
        }
        metadata.push((key, value));
    }

    let alignment = match index.get("general.alignment").map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(GgufValue::U32(a)) => u64::from(*a),
        Some(other) => {
            return Err(GgufError::WrongType {
                file: file.into(),
                key: "general.alignment".into(),
                expected: "u32",
                actual: other.type_name(),
            });
        }
    };
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(GgufError::BadAlignment {
            file: file.into(),
            alignment,
        });
    }

    // Each tensor info takes at least 8 (name length) + 4 + 8 (one dim) + 4 + 8 bytes.
    let t_cap = usize::try_from(tensor_count)
        .unwrap_or(usize::MAX)
        .min(c.remaining() / 32);
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(t_cap);
    let mut seen = HashMap::with_capacity(t_cap);
    for i in 0..tensor_count {
        let name = c.string(&|| format!("name of tensor {i}"))?;
        let n_dims = c.u32(&|| format!("n_dims of tensor `{name}`"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::BadDims {
                file: file.into(),
                tensor: name,
                n_dims,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&|| format!("dims of tensor `{name}`"))?);
        }
        let ty = c.u32(&|| format!("type of tensor `{name}`"))?;
        let offset = c.u64(&|| format!("offset of tensor `{name}`"))?;
        let bad_shape = |reason: String| GgufError::BadShape {
            file: file.into(),
            tensor: name.clone(),
            reason,
        };
        let mut n_elements: u64 = 1;
        for &d in &dims {
            if d > i64::MAX as u64 {
                return Err(bad_shape(format!("dimension {d} is out of range")));
            }
            n_elements = n_elements
                .checked_mul(d)
                .ok_or_else(|| bad_shape(format!("element count of dims {dims:?} overflows")))?;
        }
        let ggml_type = GgmlType::from_id(ty);
        let n_bytes =
            match ggml_type.block_layout() {
                None => None,
                Some((block, bytes)) => {
                    if !dims[0].is_multiple_of(block) {
                        return Err(bad_shape(format!(
                            "row length {} is not a multiple of the {} block size {block}",
                            dims[0],
                            ggml_type.name()
                        )));
                    }
                    Some((n_elements / block).checked_mul(bytes).ok_or_else(|| {
                        bad_shape(format!("byte size of dims {dims:?} overflows"))
                    })?)
                }
            };
        if !offset.is_multiple_of(alignment) {
            return Err(GgufError::BadTensorOffset {
                file: file.into(),
                tensor: name,
                offset,
                alignment,
            });
        }
        if seen.insert(name.clone(), i).is_some() {
            return Err(GgufError::DuplicateTensor {
                file: file.into(),
                tensor: name,
            });
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_elements,
            n_bytes,
        });
    }

    let end_of_infos = c.pos as u64;
    let data_offset = end_of_infos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| c.truncated("data section"))?;
    let file_len = buf.len() as u64;
    for t in &tensors {
        let Some(n_bytes) = t.n_bytes else { continue };
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(n_bytes));
        match end {
            Some(e) if e <= file_len => {}
            _ => {
                return Err(GgufError::Truncated {
                    file: file.into(),
                    what: format!(
                        "data of tensor `{}` ({n_bytes} bytes at data offset {})",
                        t.name, t.offset
                    ),
                    offset: start.unwrap_or(u64::MAX),
                });
            }
        }
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

impl GgufFile {
    /// Open and validate a GGUF file (memory-mapped).
    pub fn open(path: &Path) -> Result<GgufFile, LoaderError> {
        let file_name = path.display().to_string();
        let f = File::open(path).map_err(|e| LoaderError::io(path, e))?;
        let len = f.metadata().map_err(|e| LoaderError::io(path, e))?.len();
        if len < 4 {
            return Err(GgufError::Truncated {
                file: file_name,
                what: "magic".into(),
                offset: 0,
            }
            .into());
        }
        // SAFETY: the map is read-only and private to this process; the file is opened
        // read-only. If another process truncates or rewrites the file while it is
        // mapped, reads may fault or see changed bytes: like every mmap-based model
        // loader we document that model files must not be modified while in use. All
        // offsets into the map are validated against its length before use.
        let data = unsafe { Mmap::map(&f) }.map_err(|e| LoaderError::io(path, e))?;
        let h = parse(&data, &file_name)?;
        let index = h
            .metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let tensor_index = h
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            file: file_name,
            data,
            version: h.version,
            metadata: h.metadata,
            index,
            tensors: h.tensors,
            tensor_index,
            alignment: h.alignment,
            data_offset: h.data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file name as used in errors.
    pub fn file_name(&self) -> &str {
        &self.file
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn wrong_type(&self, key: &str, expected: &'static str, v: &GgufValue) -> GgufError {
        GgufError::WrongType {
            file: self.file.clone(),
            key: key.into(),
            expected,
            actual: v.type_name(),
        }
    }

    /// A string value; `Ok(None)` when absent, an error when of another type.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong_type(key, "string", v)),
        }
    }

    /// Any integer value that fits in u64.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_int() {
                Some(x) => u64::try_from(x)
                    .map(Some)
                    .map_err(|_| GgufError::BadMetadata {
                        file: self.file.clone(),
                        key: key.into(),
                        reason: format!("{x} is negative"),
                    }),
                None => Err(self.wrong_type(key, "integer", v)),
            },
        }
    }

    /// Any integer value that fits in u32.
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>, GgufError> {
        match self.get_u64(key)? {
            None => Ok(None),
            Some(x) => u32::try_from(x)
                .map(Some)
                .map_err(|_| GgufError::BadMetadata {
                    file: self.file.clone(),
                    key: key.into(),
                    reason: format!("{x} does not fit in u32"),
                }),
        }
    }

    /// Any integer value that fits in usize.
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>, GgufError> {
        match self.get_u64(key)? {
            None => Ok(None),
            Some(x) => usize::try_from(x)
                .map(Some)
                .map_err(|_| GgufError::BadMetadata {
                    file: self.file.clone(),
                    key: key.into(),
                    reason: format!("{x} does not fit in usize"),
                }),
        }
    }

    /// A float (or integer) value as f64.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "number", v)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, "bool", v)),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&GgufArray>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong_type(key, "array", v)),
        }
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Option<&[String]>, GgufError> {
        match self.get_array(key)? {
            None => Ok(None),
            Some(GgufArray::String(v)) => Ok(Some(v)),
            Some(_) => Err(GgufError::WrongType {
                file: self.file.clone(),
                key: key.into(),
                expected: "array of strings",
                actual: "array",
            }),
        }
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    fn info(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensor(name).ok_or_else(|| GgufError::MissingTensor {
            file: self.file.clone(),
            tensor: name.into(),
        })
    }

    fn unsupported(&self, t: &TensorInfo) -> GgufError {
        GgufError::UnsupportedTensorType {
            file: self.file.clone(),
            tensor: t.name.clone(),
            ggml_type: t.ggml_type.id(),
        }
    }

    /// The raw bytes of a tensor (range validated at open).
    pub fn tensor_data(&self, name: &str) -> Result<&[u8], GgufError> {
        let t = self.info(name)?;
        let n_bytes = t.n_bytes.ok_or_else(|| self.unsupported(t))?;
        let start = self
            .data_offset
            .checked_add(t.offset)
            .and_then(|s| usize::try_from(s).ok());
        let end = start.and_then(|s| usize::try_from(n_bytes).ok().and_then(|n| s.checked_add(n)));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.data.len() => Ok(&self.data[s..e]),
            _ => Err(GgufError::Truncated {
                file: self.file.clone(),
                what: format!("data of tensor `{name}`"),
                offset: self.data_offset.saturating_add(t.offset),
            }),
        }
    }

    /// A tensor dequantised to f32, in ggml order (`dims[0]` fastest), which is the
    /// row-major order of the PyTorch shape `dims` reversed.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let t = self.info(name)?;
        if !super::dequant::is_supported(t.ggml_type) {
            return Err(self.unsupported(t));
        }
        let bytes = self.tensor_data(name)?;
        let n = usize::try_from(t.n_elements).map_err(|_| GgufError::BadShape {
            file: self.file.clone(),
            tensor: name.into(),
            reason: "too many elements".into(),
        })?;
        super::dequant::dequantize(t.ggml_type, bytes, n).map_err(|e| match e {
            super::dequant::DequantError::Unsupported(_) => self.unsupported(t),
            super::dequant::DequantError::Length { expected, actual } => GgufError::BadShape {
                file: self.file.clone(),
                tensor: name.into(),
                reason: format!("{actual} data bytes, expected {expected:?}"),
            },
        })
    }
}
