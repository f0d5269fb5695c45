//! safetensors: memory-mapped, header-validated, zero-copy typed views.
//!
//! File layout (<https://github.com/huggingface/safetensors>):
//!
//! ```text
//! [u64 LE: N] [N bytes: JSON header, padded with spaces] [data section]
//! ```
//!
//! The header maps each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}`
//! (offsets relative to the start of the data section) and may carry a `__metadata__`
//! object of string to string.
//!
//! [`SafeTensors::open`] maps the file and validates the whole header once, in
//! O(n log n) for n tensors: every entry has a known dtype, a shape whose byte size does
//! not overflow, offsets that match that byte size and lie inside the data section, and
//! no two tensors share a byte. After that, [`SafeTensors::tensor`] hands out
//! [`TensorView`]s that borrow the mapping (no weight is ever copied), and the typed
//! accessors ([`TensorView::as_f32`], [`TensorView::as_bf16`], [`TensorView::as_f16`])
//! reinterpret the bytes in place with `bytemuck`, returning
//! [`SafetensorsError::Misaligned`] rather than copying when the data is not aligned.
//!
//! Unlike the reference implementation, gaps between tensors are accepted (only
//! overlaps are rejected): a gap wastes bytes but cannot alias two tensors.
//! [`write_safetensors`] always writes the standard contiguous layout.
//!
//! [`SafeTensors::make_resident`] trades the zero-copy mapping for speed: it copies the
//! file once into anonymous memory advised for transparent huge pages (2 MiB pages
//! instead of 4 KiB ones: a decode step that streams every weight then takes ~500 TLB
//! misses instead of ~65,000), releasing the mapped pages as it goes.
//!
//! Byte order: safetensors is little-endian and the views reinterpret bytes in place,
//! so this module only builds for little-endian targets.

#[cfg(target_endian = "big")]
compile_error!("cloudrm-loader's zero-copy safetensors views need a little-endian target");

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::dtype::Dtype;
use crate::error::LoaderError;

/// Largest accepted JSON header, in bytes (the reference implementation's limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Key of the optional string-to-string metadata object in the header.
pub const METADATA_KEY: &str = "__metadata__";

#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("{file}: tensor `{name}` not found")]
    MissingTensor { file: String, name: String },
    #[error("{file}: tensor `{name}` has dtype {actual}, expected {expected}")]
    WrongDtype {
        file: String,
        name: String,
        expected: Dtype,
        actual: Dtype,
    },
    #[error(
        "{file}: tensor `{name}` data is not aligned to {align} bytes for a typed view \
         (hint: write tensors in descending element size, as write_safetensors does, or copy with to_f32_vec)"
    )]
    Misaligned {
        file: String,
        name: String,
        align: usize,
    },
    #[error("{file}: tensor `{name}` has dtype {dtype}, which cannot be converted to f32")]
    NotFloat {
        file: String,
        name: String,
        dtype: Dtype,
    },
    #[error(
        "{file}: tensor `{name}` view holds {actual} bytes, its shape {shape:?} needs {expected}"
    )]
    ViewSizeMismatch {
        file: String,
        name: String,
        shape: Vec<usize>,
        expected: usize,
        actual: usize,
    },
    #[error(
        "{file}: {len} bytes is too short for a safetensors file (the header length alone takes 8)"
    )]
    Truncated { file: String, len: u64 },
    #[error("{file}: header length {header_len} exceeds the cap of {cap} bytes")]
    HeaderTooLarge {
        file: String,
        header_len: u64,
        cap: u64,
    },
    #[error("{file}: header of {header_len} bytes runs past the end of the {file_len}-byte file")]
    HeaderPastEof {
        file: String,
        header_len: u64,
        file_len: u64,
    },
    #[error("{file}: header is not valid UTF-8 (at byte {offset} of the header)")]
    HeaderNotUtf8 { file: String, offset: usize },
    #[error("{file}: header is not valid JSON: {reason}")]
    HeaderNotJson { file: String, reason: String },
    #[error("{file}: header is not a JSON object: {reason}")]
    HeaderNotObject { file: String, reason: String },
    #[error("{file}: `__metadata__` must be an object of strings; {reason}")]
    BadMetadata { file: String, reason: String },
    #[error("{file}: tensor `{name}` appears more than once")]
    DuplicateTensor { file: String, name: String },
    #[error("{file}: tensor `{name}` has no `{field}` field")]
    MissingField {
        file: String,
        name: String,
        field: &'static str,
    },
    #[error("{file}: tensor `{name}` field `{field}`: {reason}")]
    InvalidField {
        file: String,
        name: String,
        field: &'static str,
        reason: String,
    },
    #[error("{file}: tensor `{name}` has unknown dtype `{dtype}`")]
    UnknownDtype {
        file: String,
        name: String,
        dtype: String,
    },
    #[error("{file}: tensor `{name}` shape {shape:?} of {dtype} overflows the byte size")]
    ShapeOverflow {
        file: String,
        name: String,
        shape: Vec<usize>,
        dtype: Dtype,
    },
    #[error("{file}: tensor `{name}` data_offsets [{begin}, {end}] has begin after end")]
    BadOffsets {
        file: String,
        name: String,
        begin: usize,
        end: usize,
    },
    #[error(
        "{file}: tensor `{name}` data_offsets [{begin}, {end}] span {actual} bytes, \
         shape {shape:?} of {dtype} needs {expected}"
    )]
    ByteSizeMismatch {
        file: String,
        name: String,
        shape: Vec<usize>,
        dtype: Dtype,
        begin: usize,
        end: usize,
        expected: usize,
        actual: usize,
    },
    #[error(
        "{file}: tensor `{name}` data_offsets [{begin}, {end}] lie outside the {data_len}-byte data section"
    )]
    OutOfBounds {
        file: String,
        name: String,
        begin: usize,
        end: usize,
        data_len: usize,
    },
    #[error(
        "{file}: tensors `{first}` [{first_begin}, {first_end}] and `{second}` [{second_begin}, {second_end}] overlap"
    )]
    Overlap {
        file: String,
        first: String,
        first_begin: usize,
        first_end: usize,
        second: String,
        second_begin: usize,
        second_end: usize,
    },
    #[error("{file}: tensor name `{name}` is reserved")]
    ReservedName { file: String, name: String },
    #[error("{file}: cannot write a safetensors file at this path (no file name)")]
    BadOutputPath { file: String },
    // ---- sharded checkpoints (shards.rs) ----
    #[error(
        "{dir}: no checkpoint found (expected model.safetensors.index.json, model.safetensors \
         or exactly one *.safetensors)"
    )]
    NoCheckpoint { dir: String },
    #[error(
        "{dir}: several *.safetensors files and no model.safetensors.index.json: {files:?} \
         (hint: add the index or keep one file)"
    )]
    AmbiguousCheckpoint { dir: String, files: Vec<String> },
    #[error("{index}: invalid shard index: {reason}")]
    BadIndex { index: String, reason: String },
    #[error("{index}: shard `{shard}` listed in the index does not exist")]
    MissingShard { index: String, shard: String },
    #[error(
        "{index}: tensor `{name}` is listed in shard `{shard}` but that shard does not contain it"
    )]
    TensorNotInShard {
        index: String,
        name: String,
        shard: String,
    },
    #[error("tensor `{name}` appears in two shards: {first} and {second}")]
    DuplicateAcrossShards {
        name: String,
        first: String,
        second: String,
    },
}

impl SafetensorsError {
    /// Fill in the file of an error raised by a [`TensorView`] (views do not know which
    /// file they came from, so their errors carry an empty `file`). Other errors are
    /// returned unchanged.
    pub fn in_file(mut self, path: &Path) -> Self {
        match &mut self {
            SafetensorsError::WrongDtype { file, .. }
            | SafetensorsError::Misaligned { file, .. }
            | SafetensorsError::NotFloat { file, .. }
            | SafetensorsError::ViewSizeMismatch { file, .. }
                if file.is_empty() =>
            {
                *file = path.display().to_string();
            }
            _ => {}
        }
        self
    }
}

/// One tensor's entry in a validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    /// Dimensions, outermost first (row-major).
    pub shape: Vec<usize>,
    /// byte range relative to the start of the data section
    pub range: Range<usize>,
}

/// A tensor borrowed from a mapping (or any byte buffer): `data` holds
/// `numel() * dtype.size()` little-endian bytes in row-major order of `shape`.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: &'a [usize],
    /// The tensor's bytes, (numel * dtype.size()).
    pub data: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// Number of elements, the product of `shape` (1 for a scalar of shape `[]`).
    /// Saturates at `usize::MAX` for a shape that overflows, which a validated view
    /// never has.
    pub fn numel(&self) -> usize {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .unwrap_or(usize::MAX)
    }

    fn wrong_dtype(&self, expected: Dtype) -> SafetensorsError {
        SafetensorsError::WrongDtype {
            file: String::new(),
            name: self.name.to_string(),
            expected,
            actual: self.dtype,
        }
    }

    /// Check that `data` holds exactly `numel * dtype.size()` bytes.
    fn check_len(&self) -> Result<(), SafetensorsError> {
        let expected = checked_byte_len(self.shape, self.dtype);
        if expected != Some(self.data.len()) {
            return Err(SafetensorsError::ViewSizeMismatch {
                file: String::new(),
                name: self.name.to_string(),
                shape: self.shape.to_vec(),
                expected: expected.unwrap_or(usize::MAX),
                actual: self.data.len(),
            });
        }
        Ok(())
    }

    fn cast<T: bytemuck::Pod>(&self, want: Dtype) -> Result<&'a [T], SafetensorsError> {
        if self.dtype != want {
            return Err(self.wrong_dtype(want));
        }
        self.check_len()?;
        let data: &'a [u8] = self.data;
        bytemuck::try_cast_slice::<u8, T>(data).map_err(|_| SafetensorsError::Misaligned {
            file: String::new(),
            name: self.name.to_string(),
            align: std::mem::align_of::<T>(),
        })
    }

    /// The data as `&[f32]` of length numel, in place. Errors: `WrongDtype` unless F32,
    /// `Misaligned` if the bytes are not 4-byte aligned.
    pub fn as_f32(&self) -> Result<&'a [f32], SafetensorsError> {
        self.cast::<f32>(Dtype::F32)
    }

    /// The data as `&[bf16]` of length numel, in place. Errors: `WrongDtype` unless BF16,
    /// `Misaligned` if the bytes are not 2-byte aligned.
    pub fn as_bf16(&self) -> Result<&'a [half::bf16], SafetensorsError> {
        self.cast::<half::bf16>(Dtype::BF16)
    }

    /// The data as `&[f16]` of length numel, in place. Errors: `WrongDtype` unless F16,
    /// `Misaligned` if the bytes are not 2-byte aligned.
    pub fn as_f16(&self) -> Result<&'a [half::f16], SafetensorsError> {
        self.cast::<half::f16>(Dtype::F16)
    }

    /// A copy of the data converted to f32 (numel values), from F32, F16 or BF16, at any
    /// alignment. For small tensors and tests; the model path uses the typed views.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, SafetensorsError> {
        self.check_len()?;
        let out = match self.dtype {
            Dtype::F32 => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => self
                .data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => self
                .data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(SafetensorsError::NotFloat {
                    file: String::new(),
                    name: self.name.to_string(),
                    dtype: other,
                });
            }
        };
        Ok(out)
    }
}

/// `prod(shape) * dtype.size()`, or `None` on overflow.
fn checked_byte_len(shape: &[usize], dtype: Dtype) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?
        .checked_mul(dtype.size())
}

/// A memory-mapped, validated safetensors file.
///
/// The mapping is read-only; the file must not be modified in place while it is open
/// (cloudrm's own writers replace files by atomic rename, which leaves an existing
/// mapping intact).
pub struct SafeTensors {
    path: PathBuf,
    /// The whole file, read-only.
    mmap: Mmap,
    /// Offset of the data section in the mapping, 8 + header length.
    data_start: usize,
    /// Validated entries, sorted by name.
    infos: Vec<TensorInfo>,
    metadata: BTreeMap<String, String>,
    /// Whether `mmap` is an anonymous copy ([`SafeTensors::make_resident`]).
    resident: bool,
}

/// How [`SafeTensors::use_huge_pages`] put a file on 2 MiB pages, cheapest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HugePageRoute {
    /// The page cache already held the file in 2 MiB folios: mapped as it was.
    PageCache,
    /// The file's cached pages were dropped and read back in 2 MiB folios.
    Reread,
    /// Copied into anonymous memory advised for huge pages ([`SafeTensors::make_resident`]).
    Copied,
}

impl HugePageRoute {
    pub fn name(self) -> &'static str {
        match self {
            HugePageRoute::PageCache => "page-cache",
            HugePageRoute::Reread => "reread",
            HugePageRoute::Copied => "copied",
        }
    }
}

/// Bytes copied per step of [`SafeTensors::make_resident`] before the step's mapped
/// source pages are released (bounds the extra resident memory during the copy).
const RESIDENT_STEP: usize = 32 << 20;

impl fmt::Debug for SafeTensors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafeTensors")
            .field("path", &self.path)
            .field("bytes", &self.mmap.len())
            .field("tensors", &self.infos.len())
            .finish()
    }
}

impl SafeTensors {
    /// Map `path` and validate its header (see the module docs for every check).
    pub fn open(path: &Path) -> Result<SafeTensors, LoaderError> {
        let file = File::open(path).map_err(|e| LoaderError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| LoaderError::io(path, e))?.len();
        let name = path.display().to_string();
        if file_len < 8 {
            return Err(SafetensorsError::Truncated {
                file: name,
                len: file_len,
            }
            .into());
        }
        // SAFETY: the mapping is read-only and lives inside `SafeTensors`, which hands out
        // only borrows tied to its own lifetime. Mapping a file is sound as long as no
        // one truncates or rewrites it in place while mapped; that is this type's
        // documented contract (cloudrm replaces files by atomic rename, which does not
        // touch an existing mapping). Every offset into it is validated below.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LoaderError::io(path, e))?;
        #[cfg(target_os = "linux")]
        {
            // Advice only (before the first fault): pages not cached yet are read in
            // 2 MiB folios where the kernel and file system can (see `crate::pages`).
            let _ = mmap.advise(memmap2::Advice::HugePage);
        }
        let (data_start, infos, metadata) = parse_header(&name, &mmap)?;
        Ok(SafeTensors {
            path: path.to_path_buf(),
            mmap,
            data_start,
            infos,
            metadata,
            resident: false,
        })
    }

    /// Replace the file mapping by a private copy in anonymous memory advised for
    /// transparent huge pages (`MADV_HUGEPAGE`; Linux only, elsewhere a plain copy),
    /// copied from the validated mapping in steps whose mapped pages are released as
    /// soon as they are copied, so the resident total grows by at most one step. Views
    /// and offsets are unchanged (the same bytes at the same offsets). Idempotent.
    ///
    /// Costs a copy of the file at load (tens of ms per 100 MB) and the sharing of the
    /// page cache between processes; gains fewer TLB misses when every weight is
    /// streamed per token. Fails (leaving the mapping in place) when the memory cannot
    /// be had. Returns the bytes copied (0 when already resident).
    pub fn make_resident(&mut self) -> Result<usize, LoaderError> {
        let len = self.mmap.len();
        if self.resident {
            return Ok(0);
        }
        let mut copy = memmap2::MmapOptions::new()
            .len(len.max(1))
            .map_anon()
            .map_err(|e| LoaderError::io(&self.path, e))?;
        #[cfg(target_os = "linux")]
        {
            // Advice only: without THP support the copy still works with small pages.
            let _ = copy.advise(memmap2::Advice::HugePage);
        }
        // Most of the time is the kernel clearing fresh pages: copy on a few threads,
        // each its own run of steps.
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8)
            .min(len.div_ceil(RESIDENT_STEP).max(1));
        let per = len.div_ceil(threads).next_multiple_of(RESIDENT_STEP);
        let this = &*self;
        std::thread::scope(|scope| {
            for (part, dst) in copy[..len].chunks_mut(per).enumerate() {
                scope.spawn(move || {
                    let base = part * per;
                    for (i, d) in dst.chunks_mut(RESIDENT_STEP).enumerate() {
                        let at = base + i * RESIDENT_STEP;
                        d.copy_from_slice(&this.mmap[at..at + d.len()]);
                        let _ = this.release_range(at, d.len());
                    }
                });
            }
        });
        self.mmap = copy
            .make_read_only()
            .map_err(|e| LoaderError::io(&self.path, e))?;
        self.resident = true;
        Ok(len)
    }

    /// Put the file's bytes on 2 MiB pages, without a copy where the kernel allows it
    /// (see [`crate::pages`]):
    /// 1. fault the whole mapping in (`MADV_POPULATE_READ`) and keep it if the kernel
    ///    maps it with 2 MiB pages ([`HugePageRoute::PageCache`]);
    /// 2. else release this mapping's pages, drop the file's cached pages and fault it
    ///    in again, now in 2 MiB folios ([`HugePageRoute::Reread`]; reads the file from
    ///    disk once);
    /// 3. else (another process maps the small pages, a file system or kernel without
    ///    large folios, no /proc to check) [`Self::make_resident`]'s copy
    ///    ([`HugePageRoute::Copied`]).
    ///
    /// Views and offsets are unchanged. Idempotent.
    pub fn use_huge_pages(&mut self) -> Result<HugePageRoute, LoaderError> {
        if self.resident {
            return Ok(HugePageRoute::Copied);
        }
        let len = self.mmap.len();
        // Whether the faulted-in mapping is on 2 MiB pages; None where unknown.
        let huge_now = |st: &SafeTensors| {
            st.populate();
            st.huge_page_bytes().map(|h| crate::pages::covers(h, len))
        };
        match huge_now(self) {
            Some(true) => return Ok(HugePageRoute::PageCache),
            Some(false)
                if self.release_range(0, len).is_ok()
                    && crate::pages::drop_file_cache(&self.path).is_ok()
                    && huge_now(self) == Some(true) =>
            {
                return Ok(HugePageRoute::Reread);
            }
            _ => {}
        }
        self.make_resident()?;
        Ok(HugePageRoute::Copied)
    }

    /// Fault every page of the mapping in (`MADV_POPULATE_READ` on Linux; elsewhere a
    /// read of one byte per 4 KiB).
    fn populate(&self) {
        #[cfg(target_os = "linux")]
        if self.mmap.advise(memmap2::Advice::PopulateRead).is_ok() {
            return;
        }
        let mut acc = 0u8;
        for b in self.mmap.iter().step_by(4096) {
            acc ^= *b;
        }
        std::hint::black_box(acc);
    }

    /// Bytes of the mapping the kernel maps with 2 MiB pages now (None where unknown);
    /// see [`crate::pages::huge_mapped_bytes`].
    pub fn huge_page_bytes(&self) -> Option<usize> {
        crate::pages::huge_mapped_bytes(self.mmap.as_ptr(), self.mmap.len())
    }

    /// Whether [`Self::make_resident`] replaced the mapping by a copy.
    pub fn is_resident(&self) -> bool {
        self.resident
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A zero-copy view of tensor `name`; `MissingTensor` if absent.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>, SafetensorsError> {
        let info = self
            .info(name)
            .ok_or_else(|| SafetensorsError::MissingTensor {
                file: self.path.display().to_string(),
                name: name.to_string(),
            })?;
        Ok(self.view(info))
    }

    /// The view of a validated entry of this file.
    pub(crate) fn view<'s>(&'s self, info: &'s TensorInfo) -> TensorView<'s> {
        let begin = self.data_start + info.range.start;
        let end = self.data_start + info.range.end;
        // The header validation guarantees data_start + end <= mmap.len(); `get` keeps
        // that an error-free invariant rather than a panic if it were ever broken.
        let data = self.mmap.get(begin..end).unwrap_or(&[]);
        TensorView {
            name: &info.name,
            dtype: info.dtype,
            shape: &info.shape,
            data,
        }
    }

    /// The header entry of tensor `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.infos
            .binary_search_by(|i| i.name.as_str().cmp(name))
            .ok()
            .map(|k| &self.infos[k])
    }

    /// All entries, sorted by name.
    pub fn infos(&self) -> &[TensorInfo] {
        &self.infos
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.infos.iter().map(|i| i.name.as_str())
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.infos.len()
    }

    /// True if the file holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }

    /// The header's `__metadata__` (empty if absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The whole mapping, header included.
    pub fn mapped_bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// Drop the resident pages of bytes `offset..offset + len` of the mapping
    /// (`MADV_DONTNEED`; whole pages, widened to page boundaries): for weights that were
    /// copied elsewhere (quantised), so they stop counting in the process's RSS. The
    /// mapping stays valid; pages touched later are read back from the file. A no-op
    /// on a resident copy (its pages are the only copy).
    pub fn release_range(&self, offset: usize, len: usize) -> std::io::Result<()> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.mmap.len())
        {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        if self.resident {
            return Ok(());
        }
        #[cfg(unix)]
        {
            // SAFETY: the mapping is read-only and file-backed, so DONTNEED only drops
            // clean pages that the kernel re-reads from the file on the next access.
            unsafe {
                self.mmap
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
            }
        }
        #[cfg(not(unix))]
        Ok(())
    }

    /// Offset of the data section in [`Self::mapped_bytes`] (8 + header length).
    pub fn data_start(&self) -> usize {
        self.data_start
    }
}

/// The header's top-level entries in file order, duplicates kept (serde_json's `Value`
/// would silently keep the last of two equal keys).
struct HeaderEntries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for HeaderEntries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = HeaderEntries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<HeaderEntries, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(HeaderEntries(out))
            }
        }
        d.deserialize_map(V)
    }
}

type ParsedHeader = (usize, Vec<TensorInfo>, BTreeMap<String, String>);

/// Validate the header of the file whose bytes are `bytes`; `file` names it in errors.
/// Returns (data_start, entries sorted by name, metadata).
fn parse_header(file: &str, bytes: &[u8]) -> Result<ParsedHeader, SafetensorsError> {
    let file_len = bytes.len() as u64;
    let mut len_bytes = [0u8; 8];
    match bytes.get(..8) {
        Some(b) => len_bytes.copy_from_slice(b),
        None => {
            return Err(SafetensorsError::Truncated {
                file: file.into(),
                len: file_len,
            });
        }
    }
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_LEN {
        return Err(SafetensorsError::HeaderTooLarge {
            file: file.into(),
            header_len,
            cap: MAX_HEADER_LEN,
        });
    }
    if header_len > file_len - 8 {
        return Err(SafetensorsError::HeaderPastEof {
            file: file.into(),
            header_len,
            file_len,
        });
    }
    // header_len <= file_len - 8 <= usize::MAX here.
    let data_start = 8 + header_len as usize;
    let data_len = bytes.len() - data_start;
    let header = std::str::from_utf8(&bytes[8..data_start]).map_err(|e| {
        SafetensorsError::HeaderNotUtf8 {
            file: file.into(),
            offset: e.valid_up_to(),
        }
    })?;
    let entries: HeaderEntries = serde_json::from_str(header).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => SafetensorsError::HeaderNotObject {
            file: file.into(),
            reason: e.to_string(),
        },
        _ => SafetensorsError::HeaderNotJson {
            file: file.into(),
            reason: e.to_string(),
        },
    })?;

    let mut metadata = BTreeMap::new();
    let mut seen_metadata = false;
    let mut infos = Vec::with_capacity(entries.0.len());
    for (name, value) in entries.0 {
        if name == METADATA_KEY {
            if seen_metadata {
                return Err(SafetensorsError::DuplicateTensor {
                    file: file.into(),
                    name,
                });
            }
            seen_metadata = true;
            metadata = parse_metadata(file, value)?;
            continue;
        }
        infos.push(parse_entry(file, name, value, data_len)?);
    }

    infos.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    for w in infos.windows(2) {
        if w[0].name == w[1].name {
            return Err(SafetensorsError::DuplicateTensor {
                file: file.into(),
                name: w[0].name.clone(),
            });
        }
    }

    // Overlap check: sort the non-empty ranges by start; each must begin at or after the
    // end of the one before. Zero-size tensors cover no byte and are skipped.
    let mut order: Vec<usize> = (0..infos.len())
        .filter(|&k| !infos[k].range.is_empty())
        .collect();
    order.sort_unstable_by_key(|&k| (infos[k].range.start, infos[k].range.end));
    for w in order.windows(2) {
        let (a, b) = (&infos[w[0]], &infos[w[1]]);
        if b.range.start < a.range.end {
            return Err(SafetensorsError::Overlap {
                file: file.into(),
                first: a.name.clone(),
                first_begin: a.range.start,
                first_end: a.range.end,
                second: b.name.clone(),
                second_begin: b.range.start,
                second_end: b.range.end,
            });
        }
    }
    Ok((data_start, infos, metadata))
}

fn parse_metadata(file: &str, value: Value) -> Result<BTreeMap<String, String>, SafetensorsError> {
    let obj = match value {
        Value::Object(m) => m,
        Value::Null => return Ok(BTreeMap::new()),
        other => {
            return Err(SafetensorsError::BadMetadata {
                file: file.into(),
                reason: format!("got {}", json_kind(&other)),
            });
        }
    };
    let mut out = BTreeMap::new();
    for (k, v) in obj {
        match v {
            Value::String(s) => {
                out.insert(k, s);
            }
            other => {
                return Err(SafetensorsError::BadMetadata {
                    file: file.into(),
                    reason: format!("key `{k}` holds {}", json_kind(&other)),
                });
            }
        }
    }
    Ok(out)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_entry(
    file: &str,
    name: String,
    value: Value,
    data_len: usize,
) -> Result<TensorInfo, SafetensorsError> {
    let invalid =
        |name: &str, field: &'static str, reason: String| SafetensorsError::InvalidField {
            file: file.into(),
            name: name.into(),
            field,
            reason,
        };
    let obj = match value {
        Value::Object(m) => m,
        other => {
            return Err(SafetensorsError::InvalidField {
                file: file.into(),
                name,
                field: "(entry)",
                reason: format!("expected an object, got {}", json_kind(&other)),
            });
        }
    };
    let field = |f: &'static str| {
        obj.get(f).ok_or_else(|| SafetensorsError::MissingField {
            file: file.into(),
            name: name.clone(),
            field: f,
        })
    };

    let dtype_str = match field("dtype")? {
        Value::String(s) => s.as_str(),
        other => {
            return Err(invalid(
                &name,
                "dtype",
                format!("expected a string, got {}", json_kind(other)),
            ));
        }
    };
    let dtype = Dtype::parse(dtype_str).ok_or_else(|| SafetensorsError::UnknownDtype {
        file: file.into(),
        name: name.clone(),
        dtype: dtype_str.to_string(),
    })?;

    let shape = match field("shape")? {
        Value::Array(dims) => dims
            .iter()
            .map(|d| {
                d.as_u64()
                    .and_then(|d| usize::try_from(d).ok())
                    .ok_or_else(|| {
                        invalid(
                            &name,
                            "shape",
                            format!("dimension {d} is not a non-negative integer"),
                        )
                    })
            })
            .collect::<Result<Vec<usize>, _>>()?,
        other => {
            return Err(invalid(
                &name,
                "shape",
                format!("expected an array, got {}", json_kind(other)),
            ));
        }
    };

    let (begin, end) = match field("data_offsets")? {
        Value::Array(o) if o.len() == 2 => {
            let get = |v: &Value| {
                v.as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .ok_or_else(|| {
                        invalid(
                            &name,
                            "data_offsets",
                            format!("{v} is not a non-negative integer"),
                        )
                    })
            };
            (get(&o[0])?, get(&o[1])?)
        }
        other => {
            return Err(invalid(
                &name,
                "data_offsets",
                format!("expected [begin, end], got {other}"),
            ));
        }
    };

    let expected =
        checked_byte_len(&shape, dtype).ok_or_else(|| SafetensorsError::ShapeOverflow {
            file: file.into(),
            name: name.clone(),
            shape: shape.clone(),
            dtype,
        })?;
    if begin > end {
        return Err(SafetensorsError::BadOffsets {
            file: file.into(),
            name,
            begin,
            end,
        });
    }
    if end - begin != expected {
        return Err(SafetensorsError::ByteSizeMismatch {
            file: file.into(),
            name,
            shape,
            dtype,
            begin,
            end,
            expected,
            actual: end - begin,
        });
    }
    if end > data_len {
        return Err(SafetensorsError::OutOfBounds {
            file: file.into(),
            name,
            begin,
            end,
            data_len,
        });
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        range: begin..end,
    })
}

/// One tensor to write: `data` holds `prod(shape) * dtype.size()` little-endian bytes.
#[derive(Debug, Clone, Copy)]
pub struct WriteTensor<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: &'a [usize],
    /// (numel * dtype.size()) bytes.
    pub data: &'a [u8],
}

/// Write `tensors` (and optional `__metadata__`) as a standard safetensors file at `path`.
///
/// Atomic: writes `<path>.tmp-<pid>` in the same directory, fsyncs it, renames it over
/// `path` (then fsyncs the directory, best effort); on any error the temp file is
/// removed and `path` is untouched. Every tensor is validated before any file is
/// created: `data.len()` must equal numel * dtype size, names must be unique and not
/// `__metadata__`.
///
/// Layout: the JSON header is padded with spaces to a multiple of 8 bytes; the data is
/// contiguous (as the reference reader requires) with tensors in the given order,
/// stable-sorted by descending element size, as the reference writer does. Since every
/// tensor's byte size is a multiple of its element size, that makes every tensor start
/// aligned to its element size, so typed views of the written file never hit
/// `Misaligned`.
pub fn write_safetensors(
    path: &Path,
    tensors: &[WriteTensor<'_>],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<(), LoaderError> {
    let file = path.display().to_string();
    let mut names = HashSet::with_capacity(tensors.len());
    for t in tensors {
        if t.name == METADATA_KEY {
            return Err(SafetensorsError::ReservedName {
                file,
                name: t.name.into(),
            }
            .into());
        }
        if !names.insert(t.name) {
            return Err(SafetensorsError::DuplicateTensor {
                file,
                name: t.name.into(),
            }
            .into());
        }
        let expected =
            checked_byte_len(t.shape, t.dtype).ok_or_else(|| SafetensorsError::ShapeOverflow {
                file: file.clone(),
                name: t.name.into(),
                shape: t.shape.to_vec(),
                dtype: t.dtype,
            })?;
        if t.data.len() != expected {
            return Err(SafetensorsError::ViewSizeMismatch {
                file,
                name: t.name.into(),
                shape: t.shape.to_vec(),
                expected,
                actual: t.data.len(),
            }
            .into());
        }
    }

    let mut order: Vec<&WriteTensor<'_>> = tensors.iter().collect();
    order.sort_by_key(|t| std::cmp::Reverse(t.dtype.size()));

    let mut header = serde_json::Map::with_capacity(order.len() + 1);
    if let Some(m) = metadata {
        let obj = m
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect::<serde_json::Map<_, _>>();
        header.insert(METADATA_KEY.into(), Value::Object(obj));
    }
    let mut offset = 0usize;
    for t in &order {
        let end = offset + t.data.len();
        header.insert(
            t.name.into(),
            serde_json::json!({
                "dtype": t.dtype.as_str(),
                "shape": t.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut header = serde_json::to_string(&Value::Object(header)).map_err(|e| {
        SafetensorsError::HeaderNotJson {
            file: file.clone(),
            reason: e.to_string(),
        }
    })?;
    let padded = header.len().div_ceil(8) * 8;
    header.extend(std::iter::repeat_n(' ', padded - header.len()));

    let file_name = path
        .file_name()
        .ok_or_else(|| SafetensorsError::BadOutputPath { file: file.clone() })?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);

    let result = (|| -> Result<(), LoaderError> {
        let f = File::create(&tmp).map_err(|e| LoaderError::io(&tmp, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let io = |e| LoaderError::io(&tmp, e);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(header.as_bytes()).map_err(io)?;
        for t in &order {
            w.write_all(t.data).map_err(io)?;
        }
        let f = w
            .into_inner()
            .map_err(|e| LoaderError::io(&tmp, e.into_error()))?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| LoaderError::io(path, e))
    })();
    if let Err(e) = result {
        // Best effort: the file may not exist if its creation is what failed.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent_dir(path);
    Ok(())
}

/// fsync the directory holding `path` so that a rename into it is durable (best effort:
/// not every filesystem allows opening a directory for sync).
fn sync_parent_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn parses_minimal_header() {
        let bytes = header_file(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"k":"v"}}"#,
            &[0u8; 8],
        );
        let (start, infos, meta) = parse_header("t", &bytes).unwrap();
        assert_eq!(start, bytes.len() - 8);
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].range, 0..8);
        assert_eq!(meta.get("k").map(String::as_str), Some("v"));
    }

    #[test]
    fn duplicate_key_is_rejected() {
        let e = r#"{"dtype":"U8","shape":[1],"data_offsets":[0,1]}"#;
        let bytes = header_file(&format!(r#"{{"a":{e},"a":{e}}}"#), &[0u8; 1]);
        assert!(matches!(
            parse_header("t", &bytes),
            Err(SafetensorsError::DuplicateTensor { name, .. }) if name == "a"
        ));
    }

    #[test]
    fn zero_size_tensor_inside_another_is_not_overlap() {
        let bytes = header_file(
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"z":{"dtype":"F32","shape":[0,3],"data_offsets":[2,2]}}"#,
            &[0u8; 4],
        );
        assert!(parse_header("t", &bytes).is_ok());
    }

    #[test]
    fn numel_of_scalar_and_view_errors_in_file() {
        let data = [0u8; 4];
        let v = TensorView {
            name: "s",
            dtype: Dtype::F32,
            shape: &[],
            data: &data,
        };
        assert_eq!(v.numel(), 1);
        let e = v.as_bf16().unwrap_err().in_file(Path::new("x.safetensors"));
        assert!(
            matches!(e, SafetensorsError::WrongDtype { ref file, .. } if file == "x.safetensors")
        );
        let short = TensorView {
            data: &data[..3],
            ..v
        };
        assert!(matches!(
            short.as_f32(),
            Err(SafetensorsError::ViewSizeMismatch { .. })
        ));
    }
}
