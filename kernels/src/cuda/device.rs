//! The CUDA device: opened behind presence checks (cudarc's dynamic loaders panic when
//! libcuda or libcublas is missing, so each is probed first and every cudarc call that
//! could still panic runs under `catch_unwind`), one stream, the kernel modules (PTX from
//! [`compile_ptx_cached`] for the device's [`Arch`], loaded on first use) and their
//! functions, cached; host <-> device transfers; index buffers whose host copy is kept
//! for validation; the launch helper that checks each argument list against the kernel's
//! signature.
//!
//! All work goes to the context's default (legacy) stream, in order; nothing here creates
//! a second stream, so cudarc's per-buffer event tracking stays inactive.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{result as blas_result, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DeviceRepr, DriverError, LaunchConfig, PushKernelArg, ValidAsZeroBits, sys,
};
use cudarc::nvrtc::Ptx;

use super::error::{CudaError, panic_text};
use super::nvrtc::{compile_ptx, compile_ptx_cached, nvrtc_version, ptx_cache_dir};
use super::{Arch, source};

/// Set (to anything but empty or `0`) to make [`CudaDevice::open`] report the driver as
/// missing without touching it: lets tests exercise the no-GPU path on a GPU machine.
pub const DISABLE_ENV: &str = "CLOUDRM_NO_CUDA";

/// What the driver says about the opened device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor)
    pub compute_capability: (i32, i32),
    /// The architecture the kernels are compiled for on this device.
    pub arch: Arch,
    /// `cuDriverGetVersion`: 1000 * major + 10 * minor (13000 = 13.0).
    pub driver_version: i32,
    /// NVRTC (major, minor), or why it could not be loaded.
    pub nvrtc_version: Result<(i32, i32), String>,
    pub total_mem_bytes: usize,
    pub multiprocessors: i32,
}

impl DeviceInfo {
    /// `driver_version` as `major.minor`.
    pub fn driver_version_text(&self) -> String {
        format!(
            "{}.{}",
            self.driver_version / 1000,
            (self.driver_version % 1000) / 10
        )
    }

    /// NVRTC's version as `major.minor`, or the reason it is missing.
    pub fn nvrtc_version_text(&self) -> String {
        match &self.nvrtc_version {
            Ok((a, b)) => format!("{a}.{b}"),
            Err(e) => format!("unavailable ({e})"),
        }
    }
}

/// Kinds of kernel parameters, as the PTX declares them (`.u64` pointer, `.u32`, `.f32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    Ptr,
    U32,
    F32,
}

/// Every CUDA kernel entry point the launch wrappers call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    Embedding,
    RmsNorm,
    ResidualRmsNorm,
    RopeQkvPaged,
    PagedDecodeHs64,
    PagedDecodeHs128,
    PartialHs64,
    PartialHs128,
    MergeStates,
    SwiGlu,
    RewardLinear,
    RewardDenseTanh,
    RewardOut,
    Argmax,
    FillUniform,
    Sample,
    FlashPrefillHs64,
    FlashPrefillHs128,
}

impl Kernel {
    pub const ALL: [Kernel; 18] = [
        Kernel::Embedding,
        Kernel::RmsNorm,
        Kernel::ResidualRmsNorm,
        Kernel::RopeQkvPaged,
        Kernel::PagedDecodeHs64,
        Kernel::PagedDecodeHs128,
        Kernel::PartialHs64,
        Kernel::PartialHs128,
        Kernel::MergeStates,
        Kernel::SwiGlu,
        Kernel::RewardLinear,
        Kernel::RewardDenseTanh,
        Kernel::RewardOut,
        Kernel::Argmax,
        Kernel::FillUniform,
        Kernel::Sample,
        Kernel::FlashPrefillHs64,
        Kernel::FlashPrefillHs128,
    ];

    /// The `extern "C"` name.
    pub const fn name(self) -> &'static str {
        match self {
            Kernel::Embedding => "embedding_bf16",
            Kernel::RmsNorm => "rmsnorm_bf16",
            Kernel::ResidualRmsNorm => "residual_rmsnorm_bf16",
            Kernel::RopeQkvPaged => "rope_qkv_paged_bf16",
            Kernel::PagedDecodeHs64 => "paged_decode_attention_bf16_hs64",
            Kernel::PagedDecodeHs128 => "paged_decode_attention_bf16_hs128",
            Kernel::PartialHs64 => "attention_partial_bf16_hs64",
            Kernel::PartialHs128 => "attention_partial_bf16_hs128",
            Kernel::MergeStates => "attention_merge_states_bf16",
            Kernel::SwiGlu => "swiglu_bf16",
            Kernel::RewardLinear => "reward_linear_bf16",
            Kernel::RewardDenseTanh => "reward_dense_tanh_bf16",
            Kernel::RewardOut => "reward_out_f32",
            Kernel::Argmax => "argmax_f32",
            Kernel::FillUniform => "fill_uniform_bf16",
            Kernel::Sample => "sample_f32",
            Kernel::FlashPrefillHs64 => "flash_prefill_bf16_hs64",
            Kernel::FlashPrefillHs128 => "flash_prefill_bf16_hs128",
        }
    }

    /// The `kernels/cuda` file that defines it.
    pub const fn file(self) -> &'static str {
        match self {
            Kernel::Embedding => "embedding.cu",
            Kernel::RmsNorm | Kernel::ResidualRmsNorm => "rmsnorm.cu",
            Kernel::RopeQkvPaged => "rope.cu",
            Kernel::PagedDecodeHs64
            | Kernel::PagedDecodeHs128
            | Kernel::PartialHs64
            | Kernel::PartialHs128
            | Kernel::MergeStates => "attention.cu",
            Kernel::SwiGlu => "swiglu.cu",
            Kernel::RewardLinear | Kernel::RewardDenseTanh | Kernel::RewardOut => "heads.cu",
            Kernel::Argmax => "argmax.cu",
            Kernel::FillUniform => "init.cu",
            Kernel::Sample => "sampling.cu",
            Kernel::FlashPrefillHs64 | Kernel::FlashPrefillHs128 => "flash.cu",
        }
    }

    /// The largest block (threads) the launch wrappers use for it: the register budget
    /// (64K per SM) must hold one such block (checked against ptxas in CI).
    pub const fn max_block(self) -> u32 {
        match self {
            Kernel::RopeQkvPaged => 128,
            // 32 * G with G <= 32; argmax is always 1024.
            Kernel::PagedDecodeHs64
            | Kernel::PagedDecodeHs128
            | Kernel::Argmax
            | Kernel::Sample => 1024,
            // launch::norm_threads: C / 4 threads, up to 1024.
            Kernel::RmsNorm | Kernel::ResidualRmsNorm => 1024,
            Kernel::MergeStates | Kernel::FlashPrefillHs64 | Kernel::FlashPrefillHs128 => 128,
            _ => 256,
        }
    }

    /// PTX parameter types of [`Kernel::params`] (`.u64` for pointers).
    pub fn ptx_params(self) -> Vec<&'static str> {
        self.params()
            .iter()
            .map(|p| match p {
                Param::Ptr => ".u64",
                Param::U32 => ".u32",
                Param::F32 => ".f32",
            })
            .collect()
    }

    /// The parameter list, in order (the argument layouts at the top of each .cu file).
    pub const fn params(self) -> &'static [Param] {
        use Param::{F32, Ptr, U32};
        match self {
            // out, table, ids, C, V, error
            Kernel::Embedding => &[Ptr, Ptr, Ptr, U32, U32, Ptr],
            // out, inp, weight, C, eps
            Kernel::RmsNorm => &[Ptr, Ptr, Ptr, U32, F32],
            // resid, delta, out, weight, C, eps
            Kernel::ResidualRmsNorm => &[Ptr, Ptr, Ptr, Ptr, U32, F32],
            // q_out, k_arena, v_arena, qkv, positions, token_seq, block_tables, inv_freq,
            // NH, NKV, HS, BS, ld_qkv, ld_table
            Kernel::RopeQkvPaged => &[
                Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, U32, U32, U32, U32, U32, U32,
            ],
            // out, q, k_arena, v_arena, block_tables, ld_table, seq_lens, NH, NKV, BS, scale
            Kernel::PagedDecodeHs64 | Kernel::PagedDecodeHs128 => {
                &[Ptr, Ptr, Ptr, Ptr, Ptr, U32, Ptr, U32, U32, U32, F32]
            }
            // states_o, states_lse, q, k_arena, v_arena, tables, items, NH, NKV, BS, scale
            Kernel::PartialHs64 | Kernel::PartialHs128 => {
                &[Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, Ptr, U32, U32, U32, F32]
            }
            // out, states_o, states_lse, merge_offsets, merge_slots, NH, HS
            Kernel::MergeStates => &[Ptr, Ptr, Ptr, Ptr, Ptr, U32, U32],
            // out, gate, up, n_rows, I, ld_in
            Kernel::SwiGlu => &[Ptr, Ptr, Ptr, U32, U32, U32],
            // rewards, hidden, ld_hidden, rows, w, b, C
            Kernel::RewardLinear => &[Ptr, Ptr, U32, Ptr, Ptr, F32, U32],
            // z, hidden, ld_hidden, rows, n_rows, dense_w, dense_b, C
            Kernel::RewardDenseTanh => &[Ptr, Ptr, U32, Ptr, U32, Ptr, Ptr, U32],
            // rewards, z, w_out, b_out, C
            Kernel::RewardOut => &[Ptr, Ptr, Ptr, F32, U32],
            // ids, logits, V, ld_logits
            Kernel::Argmax => &[Ptr, Ptr, U32, U32],
            // out, n, seed_lo, seed_hi, scale, offset
            Kernel::FillUniform => &[Ptr, U32, U32, U32, F32, F32],
            // ids, status, logits, V, ld, hist_offsets, hist_ids, seen, words, counters,
            // seed_lo, seed_hi, temperature, top_k, top_p_thr, min_p, penalty
            Kernel::Sample => &[
                Ptr, Ptr, Ptr, U32, U32, Ptr, Ptr, Ptr, U32, Ptr, U32, U32, F32, U32, F32, F32, F32,
            ],
            // out, q, k_arena, v_arena, table, pos0, T, NH, NKV, BS, scale
            Kernel::FlashPrefillHs64 | Kernel::FlashPrefillHs128 => {
                &[Ptr, Ptr, Ptr, Ptr, Ptr, U32, U32, U32, U32, U32, F32]
            }
        }
    }
}

/// One kernel argument: a device address or a scalar.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    Ptr(u64),
    U32(u32),
    F32(f32),
}

impl Arg {
    fn kind(self) -> Param {
        match self {
            Arg::Ptr(_) => Param::Ptr,
            Arg::U32(_) => Param::U32,
            Arg::F32(_) => Param::F32,
        }
    }
}

/// A u32 index buffer (token ids, positions, block tables, work items, ...) on the device
/// together with the host copy it was uploaded from. Only [`CudaDevice::refill_index`]
/// writes it, host copy and device ids together, so the launch wrappers validate every
/// index against the host copy before a launch (launches queued before a refill read the
/// old ids: the copy is ordered after them on the stream).
#[derive(Debug)]
pub struct IndexBuf {
    host: Vec<u32>,
    /// None when empty (no zero-byte allocation).
    dev: Option<CudaSlice<u32>>,
}

impl IndexBuf {
    pub fn host(&self) -> &[u32] {
        &self.host
    }

    pub fn len(&self) -> usize {
        self.host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }

    /// The device address (0 when empty: kernels never read an empty buffer).
    pub(crate) fn addr(&self, stream: &CudaStream) -> u64 {
        match &self.dev {
            // The read guard only records an event in multi-stream mode, which this
            // backend never enters; the buffer is immutable after upload.
            Some(d) => d.device_ptr(stream).0,
            None => 0,
        }
    }
}

/// An owned cuBLAS handle bound to the device's stream. Dropping it never panics
/// (cudarc's own `CudaBlas` unwraps the destroy status).
pub(crate) struct BlasHandle(pub(crate) blas_sys::cublasHandle_t);

impl Drop for BlasHandle {
    fn drop(&mut self) {
        let h = self.0;
        // SAFETY: the handle came from cublasCreate and is destroyed once, here.
        let _ = catch_unwind(|| unsafe { blas_result::destroy_handle(h) });
    }
}

/// An opened CUDA device with its stream and kernel cache.
pub struct CudaDevice {
    info: DeviceInfo,
    ptx_dir: Option<PathBuf>,
    // Declared before the context so that they are released first.
    blas: OnceLock<BlasHandle>,
    functions: Mutex<HashMap<Kernel, CudaFunction>>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    pub(crate) stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Runs a cudarc call, turning its error and any panic into [`CudaError::Driver`].
pub(crate) fn driver_call<R>(
    op: &str,
    f: impl FnOnce() -> Result<R, DriverError>,
) -> Result<R, CudaError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(CudaError::driver(op, e)),
        Err(p) => Err(CudaError::driver(op, panic_text(p))),
    }
}

/// Whether the driver library can be loaded (never panics).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the candidate library names.
    catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
}

/// Whether cuBLAS can be loaded (never panics).
pub fn cublas_present() -> bool {
    // SAFETY: as above.
    catch_unwind(|| unsafe { blas_sys::is_culib_present() }).unwrap_or(false)
}

fn disabled_by_env() -> Option<String> {
    std::env::var(DISABLE_ENV)
        .ok()
        .filter(|v| !v.is_empty() && v != "0")
}

impl CudaDevice {
    /// Opens device `ordinal`. A machine without the driver, without a device or with a
    /// device older than sm_80 gives a typed error, never a panic.
    pub fn open(ordinal: usize) -> Result<CudaDevice, CudaError> {
        if let Some(v) = disabled_by_env() {
            return Err(CudaError::DriverMissing(format!(
                "disabled by {DISABLE_ENV}={v}"
            )));
        }
        if !driver_present() {
            return Err(CudaError::DriverMissing(
                "no libcuda.so / libcuda.so.1 on the library search path".to_string(),
            ));
        }
        match catch_unwind(AssertUnwindSafe(|| Self::open_inner(ordinal))) {
            Ok(r) => r,
            Err(p) => Err(CudaError::driver("opening the device", panic_text(p))),
        }
    }

    fn open_inner(ordinal: usize) -> Result<CudaDevice, CudaError> {
        if let Err(e) = cudarc::driver::result::init() {
            return Err(if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE {
                CudaError::NoDevice(format!("cuInit: {e}"))
            } else {
                CudaError::driver("cuInit", e)
            });
        }
        let count = driver_call("cuDeviceGetCount", CudaContext::device_count)?;
        if count <= 0 {
            return Err(CudaError::NoDevice(
                "the driver reports 0 devices".to_string(),
            ));
        }
        if ordinal >= count as usize {
            return Err(CudaError::NoDevice(format!(
                "device {ordinal} asked for, {count} present"
            )));
        }
        let ctx = driver_call("cuDevicePrimaryCtxRetain", || CudaContext::new(ordinal))?;
        let (major, minor) = driver_call("cuDeviceGetAttribute(compute capability)", || {
            ctx.compute_capability()
        })?;
        let arch = Arch::for_device(major.max(0) as u32, minor.max(0) as u32)
            .ok_or(CudaError::UnsupportedArch { major, minor })?;
        let name = driver_call("cuDeviceGetName", || ctx.name())?;
        let total_mem_bytes = driver_call("cuDeviceTotalMem", || ctx.total_mem())?;
        let multiprocessors = driver_call("cuDeviceGetAttribute(multiprocessors)", || {
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        })?;
        let mut driver_version = 0;
        driver_call("cuDriverGetVersion", || {
            // SAFETY: a valid out-pointer.
            unsafe { sys::cuDriverGetVersion(&mut driver_version) }.result()
        })?;
        let nvrtc_version = nvrtc_version().map_err(|e| e.to_string());
        let stream = ctx.default_stream();
        Ok(CudaDevice {
            info: DeviceInfo {
                ordinal,
                name,
                compute_capability: (major, minor),
                arch,
                driver_version,
                nvrtc_version,
                total_mem_bytes,
                multiprocessors,
            },
            ptx_dir: ptx_cache_dir(),
            blas: OnceLock::new(),
            functions: Mutex::new(HashMap::new()),
            modules: Mutex::new(HashMap::new()),
            stream,
            ctx,
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Starts (`true`) or stops (`false`) the profiler's collection (cuProfilerStart /
    /// cuProfilerStop), after waiting for queued work: under `ncu --profile-from-start
    /// off` only the kernels launched in between are profiled. Harmless without a
    /// profiler attached.
    pub fn profiler(&self, on: bool) -> Result<(), CudaError> {
        self.synchronize()?;
        let op = if on {
            "cuProfilerStart"
        } else {
            "cuProfilerStop"
        };
        driver_call(op, || {
            self.ctx.bind_to_thread()?;
            if on {
                unsafe { sys::cuProfilerStart() }.result()
            } else {
                unsafe { sys::cuProfilerStop() }.result()
            }
        })
    }

    /// Waits for all queued work; a fault in an earlier kernel surfaces here.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        driver_call("cuStreamSynchronize", || self.stream.synchronize())
    }

    /// The module of one kernel file: compiled (or read from the PTX cache) and loaded
    /// on first use.
    pub fn module(&self, file: &'static str) -> Result<Arc<CudaModule>, CudaError> {
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = modules.get(file) {
            return Ok(m.clone());
        }
        let src = source(file)
            .ok_or_else(|| CudaError::bad("module", "file", format!("{file} is not embedded")))?;
        let arch = self.info.arch;
        let ptx = match &self.ptx_dir {
            Some(dir) => match compile_ptx_cached(&src, arch, dir) {
                Ok(c) => c.ptx,
                // An unwritable cache is no reason to fail: compile without it.
                Err(CudaError::Cache { .. }) => compile_ptx(&src, arch)?,
                Err(e) => return Err(e),
            },
            None => compile_ptx(&src, arch)?,
        };
        let module = driver_call(&format!("cuModuleLoadData({file})"), || {
            self.ctx.load_module(Ptx::from_src(ptx))
        })?;
        modules.insert(file, module.clone());
        Ok(module)
    }

    /// The loaded function of `k` (cached).
    pub fn function(&self, k: Kernel) -> Result<CudaFunction, CudaError> {
        if let Some(f) = self
            .functions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&k)
        {
            return Ok(f.clone());
        }
        let module = self.module(k.file())?;
        let f = driver_call(&format!("cuModuleGetFunction({})", k.name()), || {
            module.load_function(k.name())
        })?;
        self.functions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(k, f.clone());
        Ok(f)
    }

    /// Compiles and loads every kernel file and looks up every entry point.
    pub fn load_all(&self) -> Result<(), CudaError> {
        for k in Kernel::ALL {
            self.function(k)?;
        }
        Ok(())
    }

    /// Launches `k` with `grid` blocks of `block` threads and no dynamic shared memory.
    /// The argument kinds must match [`Kernel::params`] (checked; a mismatch is a bug in a
    /// wrapper and is reported, not launched).
    pub(crate) fn launch(
        &self,
        k: Kernel,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
    ) -> Result<(), CudaError> {
        let params = k.params();
        if params.len() != args.len() || params.iter().zip(args).any(|(p, a)| *p != a.kind()) {
            return Err(CudaError::bad(
                k.name(),
                "(launch)",
                format!("argument kinds {args:?} do not match the kernel's {params:?}"),
            ));
        }
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 || block == 0 || block > 1024 {
            return Err(CudaError::bad(
                k.name(),
                "(launch)",
                format!("grid {grid:?} x block {block} is not a valid launch"),
            ));
        }
        let f = self.function(k)?;
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        driver_call(&format!("launch {}", k.name()), || {
            let mut b = self.stream.launch_builder(&f);
            for a in args {
                match a {
                    Arg::Ptr(p) => b.arg(p),
                    Arg::U32(v) => b.arg(v),
                    Arg::F32(v) => b.arg(v),
                };
            }
            // SAFETY: the argument kinds match the kernel's parameter list (checked
            // above), and every wrapper in ops.rs checked the buffer lengths, strides,
            // alignments and indices the kernel reads or writes before calling this.
            unsafe { b.launch(cfg) }.map(|_| ())
        })
    }

    /// A zero-filled device buffer of `len > 0` elements.
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        if len == 0 {
            return Err(CudaError::bad("alloc_zeros", "len", "must be positive"));
        }
        driver_call("cuMemAlloc", || self.stream.alloc_zeros::<T>(len))
    }

    /// Copies a non-empty host slice to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, CudaError> {
        if host.is_empty() {
            return Err(CudaError::bad("upload", "host", "must not be empty"));
        }
        driver_call("cuMemcpyHtoD", || self.stream.clone_htod(host))
    }

    /// Copies host data into an existing device buffer of the same length.
    pub fn write<T: DeviceRepr>(
        &self,
        dst: &mut CudaSlice<T>,
        host: &[T],
    ) -> Result<(), CudaError> {
        if dst.len() != host.len() {
            return Err(CudaError::Length {
                op: "write",
                arg: "host",
                expected: dst.len(),
                actual: host.len(),
            });
        }
        driver_call("cuMemcpyHtoD", || self.stream.memcpy_htod(host, dst))
    }

    /// Copies a device buffer (or view) back to the host, after all queued work.
    pub fn download<T: DeviceRepr>(&self, src: &impl DevicePtr<T>) -> Result<Vec<T>, CudaError> {
        let v = driver_call("cuMemcpyDtoH", || self.stream.clone_dtoh(src))?;
        self.synchronize()?;
        Ok(v)
    }

    /// Device-to-device copy between buffers (or views) of the same length, queued on
    /// the stream.
    pub fn copy<T: DeviceRepr>(
        &self,
        src: &impl DevicePtr<T>,
        dst: &mut impl DevicePtrMut<T>,
    ) -> Result<(), CudaError> {
        if src.len() != dst.len() {
            return Err(CudaError::Length {
                op: "copy",
                arg: "dst",
                expected: src.len(),
                actual: dst.len(),
            });
        }
        if src.len() == 0 {
            return Ok(());
        }
        driver_call("cuMemcpyDtoD", || self.stream.memcpy_dtod(src, dst))
    }

    /// Rewrites an index buffer (device ids and host copy) with `host`, reusing its
    /// device allocation when it is large enough (grown to a power of two otherwise), so
    /// a decode loop allocates nothing per step once warm.
    pub fn refill_index(&self, buf: &mut IndexBuf, host: &[u32]) -> Result<(), CudaError> {
        buf.host.clear();
        buf.host.extend_from_slice(host);
        if host.is_empty() {
            return Ok(());
        }
        if buf.dev.as_ref().is_none_or(|d| d.len() < host.len()) {
            buf.dev = Some(self.alloc_zeros::<u32>(host.len().next_power_of_two())?);
        }
        let Some(d) = buf.dev.as_mut() else {
            unreachable!("allocated above")
        };
        let mut dst = d.slice_mut(0..host.len());
        driver_call("cuMemcpyHtoD", || self.stream.memcpy_htod(host, &mut dst))
    }

    /// Uploads an index buffer and keeps its host copy for validation.
    pub fn upload_index(&self, host: &[u32]) -> Result<IndexBuf, CudaError> {
        let dev = if host.is_empty() {
            None
        } else {
            Some(self.upload(host)?)
        };
        Ok(IndexBuf {
            host: host.to_vec(),
            dev,
        })
    }

    /// The cuBLAS handle, created on first use (bound to the device's stream).
    pub(crate) fn blas(&self) -> Result<&BlasHandle, CudaError> {
        if let Some(h) = self.blas.get() {
            return Ok(h);
        }
        if !cublas_present() {
            return Err(CudaError::CublasMissing(
                "no libcublas.so.13 (or another libcublas name cudarc looks for) on the library search path"
                    .to_string(),
            ));
        }
        driver_call("cuCtxSetCurrent", || self.ctx.bind_to_thread())?;
        let handle = blas_call("cublasCreate", blas_result::create_handle)?;
        let handle = BlasHandle(handle);
        let stream = self.stream.cu_stream();
        blas_call("cublasSetStream", || {
            // SAFETY: a live handle and the context's stream.
            unsafe { blas_result::set_stream(handle.0, stream as _) }
        })?;
        // A concurrent caller may have won the race; its handle is kept, ours dropped.
        let _ = self.blas.set(handle);
        self.blas
            .get()
            .ok_or_else(|| CudaError::CublasMissing("handle was not stored".to_string()))
    }

    /// cuBLAS's version (e.g. 130001), creating the handle if needed.
    pub fn cublas_version(&self) -> Result<i32, CudaError> {
        let h = self.blas()?.0;
        let mut v = 0;
        blas_call("cublasGetVersion", || {
            // SAFETY: a live handle and a valid out-pointer.
            unsafe { blas_sys::cublasGetVersion_v2(h, &mut v) }.result()
        })?;
        Ok(v)
    }

    pub(crate) fn bind(&self) -> Result<(), CudaError> {
        driver_call("cuCtxSetCurrent", || self.ctx.bind_to_thread())
    }
}

/// Runs a cuBLAS call, turning its status and any panic into [`CudaError::Cublas`].
pub(crate) fn blas_call<R>(
    op: &str,
    f: impl FnOnce() -> Result<R, blas_result::CublasError>,
) -> Result<R, CudaError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(CudaError::Cublas {
            op: op.to_string(),
            reason: format!("{e:?}"),
        }),
        Err(p) => Err(CudaError::Cublas {
            op: op.to_string(),
            reason: panic_text(p),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_without_a_gpu_is_a_typed_error() {
        // On a machine without CUDA this must be DriverMissing / NoDevice, never a
        // panic; on a GPU machine opening succeeds (or fails with a typed error).
        match CudaDevice::open(0) {
            Ok(dev) => assert!(!dev.info().name.is_empty()),
            Err(e) => {
                assert!(
                    matches!(
                        e,
                        CudaError::DriverMissing(_)
                            | CudaError::NoDevice(_)
                            | CudaError::UnsupportedArch { .. }
                            | CudaError::Driver { .. }
                    ),
                    "{e:?}"
                );
                assert!(!e.to_string().is_empty());
            }
        }
        // An absurd ordinal is never a panic either.
        assert!(CudaDevice::open(1 << 20).is_err());
    }

    #[test]
    fn every_kernel_is_in_the_spill_free_manifest_and_back() {
        let manifest: Vec<&str> = super::super::spill_free_kernels().collect();
        for k in Kernel::ALL {
            assert!(manifest.contains(&k.name()), "{}", k.name());
            let src = source(k.file()).unwrap();
            // Names built by a macro (attention) appear as their stem.
            let stem = k
                .name()
                .trim_end_matches("_hs64")
                .trim_end_matches("_hs128");
            assert!(src.text.contains(stem), "{} not in {}", k.name(), k.file());
        }
        for name in manifest {
            assert!(
                Kernel::ALL.iter().any(|k| k.name() == name),
                "{name} has no wrapper"
            );
        }
    }
}
