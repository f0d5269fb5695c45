//! 2 MiB pages for mapped weights, without a copy where the kernel allows it.
//!
//! A decode step streams every weight once. Mapped with 4 KiB pages, a 270 MB model
//! costs ~65,000 TLB misses per token; with 2 MiB pages, ~130. Recent Linux kernels keep
//! a file's page cache in large folios on file systems that support them (ext4, XFS,
//! btrfs...) and map a naturally aligned 2 MiB folio with one page-table entry. Whether
//! a folio is 2 MiB is decided when the page is read into the cache: a mapping advised
//! `MADV_HUGEPAGE` before its first fault reads in 2 MiB folios, but pages already
//! cached (by the write that created the file, or an earlier reader) keep their size.
//! So the loader advises every mapping at open, the model importer drops the pages it
//! wrote once they are on disk ([`drop_file_cache`]), and
//! [`crate::safetensors::SafeTensors::use_huge_pages`] checks what the kernel did
//! ([`huge_mapped_bytes`], from `/proc/self/smaps`) before falling back to a copy.

use std::path::Path;

/// Bytes of 2 MiB mappings (`FilePmdMapped` + `AnonHugePages`) in the mappings of a
/// `/proc/<pid>/smaps` text that lie inside `start..end` (a mapping that straddles
/// either end counts too: a VMA is the kernel's unit of these counters).
pub fn parse_huge_kb(smaps: &str, start: usize, end: usize) -> usize {
    let mut inside = false;
    let mut kb = 0usize;
    for line in smaps.lines() {
        if let Some(range) = vma_range(line) {
            inside = range.0 < end && range.1 > start;
            continue;
        }
        if !inside {
            continue;
        }
        for key in ["FilePmdMapped:", "AnonHugePages:"] {
            if let Some(rest) = line.strip_prefix(key) {
                let v = rest.trim().trim_end_matches("kB").trim();
                kb += v.parse::<usize>().unwrap_or(0);
            }
        }
    }
    kb * 1024
}

/// Bytes of the `key` line (`"MemAvailable:"`, `"VmHWM:"`) of a /proc text of
/// `Key:   N kB` lines (`/proc/meminfo`, `/proc/self/status`); None without that line
/// or with another unit.
pub fn kb_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let mut it = line[key.len()..].split_whitespace();
    let kb: u64 = it.next()?.parse().ok()?;
    (it.next() == Some("kB")).then(|| kb.saturating_mul(1024))
}

/// `lo-hi` of a smaps mapping header line (`7f..-7f.. r--s 00000000 fe:00 123 /path`).
fn vma_range(line: &str) -> Option<(usize, usize)> {
    let first = line.split_whitespace().next()?;
    let (lo, hi) = first.split_once('-')?;
    // Field lines ("Rss:   12 kB") have no dash in their first word; a header's
    // addresses are hex.
    let lo = usize::from_str_radix(lo, 16).ok()?;
    let hi = usize::from_str_radix(hi, 16).ok()?;
    (lo < hi).then_some((lo, hi))
}

/// Bytes of `ptr..ptr + len` (this process's memory) the kernel maps with 2 MiB pages,
/// or None where that cannot be read (not Linux, no /proc).
pub fn huge_mapped_bytes(ptr: *const u8, len: usize) -> Option<usize> {
    if cfg!(target_os = "linux") {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let start = ptr as usize;
        Some(parse_huge_kb(&smaps, start, start.saturating_add(len)).min(len))
    } else {
        None
    }
}

/// Ask the kernel to drop the cached pages of `path` that no process maps
/// (`posix_fadvise(POSIX_FADV_DONTNEED)`; clean pages only, so call it after the file
/// is synced), so that the next reader through a `MADV_HUGEPAGE` mapping reads it back
/// in 2 MiB folios. Advice: a no-op outside Linux.
pub fn drop_file_cache(path: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path)?;
        // SAFETY: a valid open descriptor; the call only advises the page cache.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = path;
    Ok(())
}

/// Whether `huge` bytes of 2 MiB pages cover a mapping of `len` bytes as well as its
/// alignment allows: every whole 2 MiB page inside it but one at each end (a file's
/// first and last partial 2 MiB stay small pages), at least 90% of that.
pub fn covers(huge: usize, len: usize) -> bool {
    const HUGE: usize = 2 << 20;
    let inner = len.saturating_sub(2 * HUGE) / HUGE * HUGE;
    huge >= inner / 10 * 9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kb_field_reads_a_kb_line_in_bytes() {
        let status = "Name:\tcloudrm\nVmHWM:\t  380000 kB\nVmRSS:\t  1 kB\n";
        assert_eq!(kb_field(status, "VmHWM:"), Some(380_000 * 1024));
        assert_eq!(kb_field(status, "VmPeak:"), None);
        assert_eq!(kb_field("VmHWM: 5\n", "VmHWM:"), None);
    }

    const SMAPS: &str = "\
7f0000000000-7f0000400000 r--s 00000000 fe:00 10117133                   /m/model.safetensors
Size:               4096 kB
Rss:                4096 kB
AnonHugePages:         0 kB
FilePmdMapped:      2048 kB
7f0000400000-7f0000600000 rw-p 00000000 00:00 0
Size:               2048 kB
AnonHugePages:      2048 kB
FilePmdMapped:         0 kB
7f1000000000-7f1000200000 r--s 00000000 fe:00 99                         /other
FilePmdMapped:      2048 kB
";

    #[test]
    fn smaps_counts_only_mappings_in_range() {
        let base = 0x7f00_0000_0000usize;
        assert_eq!(parse_huge_kb(SMAPS, base, base + (4 << 20)), 2 << 20);
        assert_eq!(parse_huge_kb(SMAPS, base, base + (6 << 20)), 4 << 20);
        // A range inside the first mapping counts that mapping.
        assert_eq!(parse_huge_kb(SMAPS, base + 4096, base + 8192), 2 << 20);
        assert_eq!(parse_huge_kb(SMAPS, 0x7f20_0000_0000, 0x7f20_0000_1000), 0);
        assert_eq!(parse_huge_kb("", base, base + 1), 0);
        assert_eq!(
            parse_huge_kb("garbage\nFilePmdMapped: 2048 kB\n", 0, usize::MAX),
            0
        );
    }

    #[test]
    fn coverage_leaves_room_for_the_ends() {
        let mib = 1 << 20;
        assert!(covers(0, 3 * mib));
        assert!(covers(256 * mib, 257 * mib));
        assert!(!covers(100 * mib, 257 * mib));
        assert!(covers(230 * mib, 257 * mib));
    }

    #[test]
    fn own_memory_is_readable_and_dropping_a_missing_file_errors() {
        let v = vec![1u8; 1 << 16];
        if cfg!(target_os = "linux") {
            let h = huge_mapped_bytes(v.as_ptr(), v.len()).expect("smaps readable");
            assert!(h <= v.len());
            assert!(drop_file_cache(Path::new("/nonexistent/cloudrm-file")).is_err());
        }
    }
}
