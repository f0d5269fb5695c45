//! NVRTC compilation of the embedded kernels, with a PTX cache on disk.
//!
//! NVRTC is loaded at run time through cudarc's dynamic loading, which `dlopen`s it by
//! name (`libnvrtc.so`, ..., `libnvrtc.so.13`) on the library search path. When
//! `CLOUDRM_NVRTC_LIB` names the library file (e.g. the `libnvrtc.so.13` of PyPI's
//! `nvidia-cuda-nvrtc` wheel), that file is loaded first and kept loaded, so cudarc's
//! lookup by soname finds it without `LD_LIBRARY_PATH`. cudarc panics when no library is
//! found; every entry point here checks presence first (and catches a panic anyway) and
//! returns a typed [`CudaError`] instead.
//!
//! Cache: `<dir>/<stem>-<sm>-<key>.ptx`, key = sha256 of the NVRTC version, the options
//! and the full source text, in [`ptx_cache_dir`] (`$CLOUDRM_HOME/cuda-ptx`, else
//! `$XDG_CACHE_HOME/cloudrm/cuda-ptx`, else `~/.cache/cloudrm/cuda-ptx`). Files are written
//! to a temporary name and renamed, so concurrent processes never read a partial file.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use std::sync::OnceLock;

use cudarc::nvrtc::{CompileError, CompileOptions};
use sha2::{Digest, Sha256};

pub use super::error::CudaError;
use super::error::panic_text;
use super::{Arch, KernelSource};

/// Environment variable naming the NVRTC shared library file to load.
pub const NVRTC_LIB_ENV: &str = "CLOUDRM_NVRTC_LIB";

/// The options every kernel file is compiled with (besides the architecture).
pub const NVRTC_OPTIONS: &[&str] = &["--std=c++17", "--fmad=true"];

/// Loads NVRTC once (from `CLOUDRM_NVRTC_LIB` if set, else from the library search path)
/// and returns its version (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    static LOADED: OnceLock<Result<(i32, i32), CudaError>> = OnceLock::new();
    LOADED.get_or_init(load_nvrtc).clone()
}

fn load_nvrtc() -> Result<(i32, i32), CudaError> {
    match std::env::var_os(NVRTC_LIB_ENV).filter(|v| !v.is_empty()) {
        Some(path) => {
            // SAFETY: loading NVRTC runs its initialisers, which have no preconditions.
            let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| {
                CudaError::NvrtcMissing(format!(
                    "{NVRTC_LIB_ENV}={}: {e}",
                    Path::new(&path).display()
                ))
            })?;
            // Keep it loaded for the life of the process: cudarc finds it by soname.
            std::mem::forget(lib);
            preload_builtins(Path::new(&path));
        }
        None => {
            // SAFETY: only tries to dlopen candidate names.
            if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                return Err(CudaError::NvrtcMissing(format!(
                    "no libnvrtc on the library search path and {NVRTC_LIB_ENV} is not set"
                )));
            }
        }
    }
    // A missing symbol panics inside cudarc; caught here.
    let (status, major, minor) = catch_unwind(|| {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        (status, major, minor)
    })
    .map_err(|p| CudaError::NvrtcMissing(panic_text(p)))?;
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::NvrtcMissing(format!(
            "nvrtcVersion returned {status:?}"
        )));
    }
    Ok((major, minor))
}

/// NVRTC `dlopen`s `libnvrtc-builtins.so.<major>.<minor>` by name at its first compile;
/// pip wheels put it next to `libnvrtc.so.<major>` without an rpath, so load it from that
/// folder now (then the by-name lookup finds it loaded). Best effort: a failure here shows
/// up as NVRTC's own clear error at compile time.
fn preload_builtins(nvrtc: &Path) {
    let Some(dir) = nvrtc.parent() else { return };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("libnvrtc-builtins.so") {
            // SAFETY: as for NVRTC itself.
            if let Ok(lib) = unsafe { libloading::Library::new(e.path()) } {
                std::mem::forget(lib);
            }
        }
    }
}

/// Compiles one kernel file to PTX for `arch` (no cache).
pub fn compile_ptx(src: &KernelSource, arch: Arch) -> Result<String, CudaError> {
    nvrtc_version()?;
    let opts = CompileOptions {
        arch: Some(arch.compute()),
        name: Some(src.name.to_string()),
        options: NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let text = src.full_source();
    let file = src.name;
    let result = catch_unwind(AssertUnwindSafe(|| {
        cudarc::nvrtc::compile_ptx_with_opts(text, opts).map(|ptx| ptx.to_src())
    }))
    .map_err(|p| CudaError::Nvrtc {
        file,
        reason: panic_text(p),
    })?;
    result.map_err(|e| match e {
        CompileError::CompileError { log, .. } => CudaError::Compile {
            file,
            arch: arch.sm(),
            log: log.to_string_lossy().into_owned(),
        },
        other => CudaError::Nvrtc {
            file,
            reason: format!("{other:?}"),
        },
    })
}

/// The cache key of a kernel file: sha256 over the NVRTC version, the architecture, the
/// options and the full source, in hex.
pub fn cache_key(src: &KernelSource, arch: Arch, nvrtc: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "nvrtc {}.{}\n{}\n",
        nvrtc.0,
        nvrtc.1,
        arch.compute()
    ));
    for o in NVRTC_OPTIONS {
        h.update(o.as_bytes());
        h.update(b"\n");
    }
    h.update(src.full_source().as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Where compiled PTX is cached: `$CLOUDRM_HOME/cuda-ptx`, else
/// `$XDG_CACHE_HOME/cloudrm/cuda-ptx` (absolute only), else `$HOME/.cache/cloudrm/cuda-ptx`.
pub fn ptx_cache_dir() -> Option<PathBuf> {
    let get = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let home = get("CLOUDRM_HOME").map(PathBuf::from).or_else(|| {
        get("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .map(|x| x.join("cloudrm"))
            .or_else(|| get("HOME").map(|h| PathBuf::from(h).join(".cache").join("cloudrm")))
    })?;
    Some(home.join("cuda-ptx"))
}

/// A PTX text and whether it came from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedPtx {
    pub ptx: String,
    pub path: PathBuf,
    pub from_cache: bool,
}

/// Compiles `src` for `arch`, or reads the PTX cached in `dir` by an earlier call with the
/// same NVRTC version, options and source.
pub fn compile_ptx_cached(
    src: &KernelSource,
    arch: Arch,
    dir: &Path,
) -> Result<CachedPtx, CudaError> {
    let version = nvrtc_version()?;
    let key = cache_key(src, arch, version);
    let path = dir.join(format!("{}-{}-{}.ptx", src.stem(), arch.sm(), &key[..32]));
    let cache_err = |path: &Path, e: std::io::Error| CudaError::Cache {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    match std::fs::read_to_string(&path) {
        Ok(ptx) => {
            return Ok(CachedPtx {
                ptx,
                path,
                from_cache: true,
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(cache_err(&path, e)),
    }
    let ptx = compile_ptx(src, arch)?;
    std::fs::create_dir_all(dir).map_err(|e| cache_err(dir, e))?;
    let tmp = dir.join(format!(".{}.{}.tmp", key, std::process::id()));
    std::fs::write(&tmp, &ptx).map_err(|e| cache_err(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| cache_err(&path, e))?;
    Ok(CachedPtx {
        ptx,
        path,
        from_cache: false,
    })
}
