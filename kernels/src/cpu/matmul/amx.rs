//! AMX-BF16 tile kernels for bf16 weights: the input rows rounded to bf16 once per call
//! (as the AVX512_BF16 path rounds them, [`super::dot::round_rows`]), then every 16 x 16
//! block of outputs is a chain of `tdpbf16ps` over the input channels, 32 per
//! instruction: 8,192 multiply-adds per instruction against 512 for a 16-lane
//! `vdpbf16ps`.
//!
//! A path that computes in bf16, so it is held to the bf16 tolerance (DESIGN.md), and it
//! is **opt-in**: detection takes it only when `CLOUDRM_ISA=amx` asks for it, the CPU
//! has AVX-512F, AVX512_BF16, AMX-TILE and AMX-BF16 (CPUID leaf 7, not
//! `is_x86_feature_detected!`, which does not know AMX on stable Rust), the OS enables
//! the tile state (XCR0) and grants it to the process (`arch_prctl`), and the kernels
//! pass [`self_check`]. The kernel logic (blocking, tails, padding, the transposed
//! write-back) is tested everywhere through [`emu`]: the same macro over eight tile
//! registers kept in memory, `tdpbf16ps` done as Intel's pseudo-code defines it (per
//! output, for each channel pair in order, the even channel's exact product added, then
//! the odd one's, each add rounded to nearest even).
//!
//! The hardware does not add the products one at a time, so the emulation gives its
//! logic, not its bits. On a Sapphire Rapids Xeon, against the emulation on random
//! inputs: 272 of 960 outputs bit-equal at 576 channels, 68 of 576 at 1536, relative
//! differences up to 1.3e-4. Even one 32-channel `tdpbf16ps` from zero is not the
//! correctly rounded sum of its 32 products (47 of 64 outputs are), nor is the chain the
//! correctly rounded sum of each step's products added to the accumulator (about 85 %
//! of the model's decode outputs are): the instruction sums a step's products in a way
//! Intel does not document. So no other kernel can reproduce this path's bits, and
//! every bf16 matmul on it, one row or many, takes the tiles. (The AVX512_BF16
//! emulation, [`super::dot`], does give its hardware's bits.)
//!
//! Layout. The weights are the A operand, read straight from the (memory-mapped) model:
//! a tile is 16 weight rows by 32 channels (64 bytes each, the row stride being the
//! weight row). The input is the B operand, repacked once per call and thread
//! ([`pack`]): for 16 input rows and 32 channels, 16 rows of channel pairs by 16 input
//! rows. So a C tile holds 16 output columns by 16 input rows, written back transposed.
//! Both the packing and the write-back are 16 x 16 dword transposes ([`transpose16`],
//! AVX2 8 x 8 blocks, which every AMX machine has).
//! A column block short of a whole tile reads 16 existing weight rows anyway (those past
//! the block are not written back), moved back at the end of the matrix; only weights
//! with channels past the last multiple of 32, or fewer than 16 rows, are copied into a
//! zero-padded buffer first (zero padding adds exact zeros). The calls cut their column
//! blocks at multiples of 48 on this path, so blocks are whole tiles but at the end.
//!
//! Every output is one `tdpbf16ps` chain over the same channel steps whatever the tile
//! shape, the column block or the number of input rows, so a row gives the same bits
//! alone (decode takes the tiles too) and batched: [`self_check`] verifies that on the
//! hardware before detection takes the path. Blocks of 32 columns by 32 input rows (four
//! C tiles, two A and two B); rows in panels of [`PANEL`] tiles so the packed input a
//! column block sweeps stays in L2.

use std::cell::RefCell;
use std::ops::Range;

use half::bf16;

/// Input rows per panel, in 16-row tiles (the packed panel: 128 rows x C x 2 bytes,
/// 384 KiB at C = 1536).
const PANEL: usize = 8;

/// The tile configuration `ldtilecfg` loads: palette 1, tiles 0-7 each 16 rows of 64
/// bytes (tiles 8-15 and the reserved bytes zero, or the instruction faults).
const fn config() -> [u8; 64] {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    c
}

/// The kernels over `ops` (a module with `start`, `end`, `zero`, `load_a`, `load_b`,
/// `dp`, `store`: C tiles 0-3, A tiles 0-1, B tiles 0-1).
macro_rules! amx_kernels {
    () => {
        use std::ops::Range;

        use half::bf16;

        use super::PANEL;

        /// C tile `2a + b` += A tile a . B tile b.
        ///
        /// SAFETY: tiles configured.
        #[inline]
        unsafe fn dp(a: usize, b: usize) {
            // SAFETY: forwarded.
            unsafe {
                match (a, b) {
                    (0, 0) => ops::dp::<0, 0>(),
                    (0, _) => ops::dp::<0, 1>(),
                    (_, 0) => ops::dp::<1, 0>(),
                    _ => ops::dp::<1, 1>(),
                }
            }
        }

        /// out (rows, oc) columns `cols` = the input packed in `xp` ([`super::pack`] of
        /// `rows` rows) . w(cols)^T + bias; `tail` is this thread's padding buffer.
        ///
        /// SAFETY: for `real`, the CPU has AMX-TILE and AMX-BF16 and the process holds
        /// the tile permission. `xp` is the packing of rows x c, `out` holds rows * oc,
        /// `w` oc * c, `bias` (if any) oc; `cols` within 0..oc.
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn gemm(
            out: &mut [f32],
            xp: &[u32],
            rows: usize,
            w: &[bf16],
            bias: Option<&[f32]>,
            c: usize,
            oc: usize,
            cols: Range<usize>,
            tail: &mut Vec<u16>,
        ) {
            const T: usize = 16;
            const K: usize = 32;
            let (kbs, mbs) = (c.div_ceil(K), rows.div_ceil(T));
            debug_assert!(xp.len() >= mbs * kbs * 256);
            if rows == 0 || cols.is_empty() {
                return;
            }
            let mut cols = cols;
            let s = cols.len() / (2 * T);
            if rows < T && c.is_multiple_of(K) && s >= 2 {
                let spread = cols.start..cols.start + 2 * T * s;
                // SAFETY: forwarded; rows < 16, c a multiple of 32, `spread` 32 s columns
                // within `cols`.
                unsafe { gemm_spread(out, xp, rows, w, bias, c, oc, spread.clone()) };
                cols = spread.end..cols.end;
                if cols.is_empty() {
                    return;
                }
            }
            let w = w.as_ptr() as *const u16;
            // A C tile as stored (output columns by input rows), and transposed.
            let (mut cbuf, mut tbuf) = ([0f32; 256], [0f32; 256]);
            // SAFETY: every tile load reads 16 rows of 64 bytes inside the weights (16
            // existing rows, whole 32-channel steps only), the padded buffer (its rows
            // 0.. at the pointer moved back by n0 rows) or the packed input; every store
            // goes to `cbuf`; `out` is written only at rows < rows and columns in `cols`.
            // Prefetches never fault.
            unsafe {
                ops::start();
                let mut p0 = 0;
                while p0 < mbs {
                    let p1 = (p0 + PANEL).min(mbs);
                    let mut n0 = cols.start;
                    while n0 < cols.end {
                        let nv = (cols.end - n0).min(2 * T);
                        let na = nv.div_ceil(T);
                        // A tile a covers columns n0 + a * T ..; read in place it starts
                        // at weight row base(a), moved back at the end of the matrix so
                        // its 16 rows exist (the first rows then belong to the tile
                        // before, and are not written back).
                        let direct = c.is_multiple_of(K) && oc >= T;
                        let base = |a: usize| {
                            if direct {
                                (n0 + a * T).min(oc - T)
                            } else {
                                n0 + a * T
                            }
                        };
                        let (a_ptr, lda) = if direct {
                            (w, c)
                        } else {
                            let ld = kbs * K;
                            tail.clear();
                            tail.resize(na * T * ld, 0);
                            for j in 0..nv {
                                let src = std::slice::from_raw_parts(w.add((n0 + j) * c), c);
                                tail[j * ld..j * ld + c].copy_from_slice(src);
                            }
                            (tail.as_ptr().wrapping_sub(n0 * ld), ld)
                        };
                        // The next block's weight rows, fetched while this block's first
                        // row tiles run (the later ones find them in cache).
                        let next = (n0 + nv)..(n0 + nv + 2 * T).min(cols.end);
                        let mut mb = p0;
                        while mb < p1 {
                            let nb = (p1 - mb).min(2);
                            for t in 0..4 {
                                if t / 2 < na && t % 2 < nb {
                                    ops::zero(t);
                                }
                            }
                            for kb in 0..kbs {
                                if mb == p0 {
                                    for j in next.clone() {
                                        let p = w.wrapping_add(j * c + kb * K);
                                        ops::prefetch(p);
                                    }
                                }
                                // Each load just before the first product that needs it
                                // (A0, B0, C00, B1, C01, A1, C10, C11 for a 2 x 2 block).
                                for a in 0..na {
                                    debug_assert!(if direct {
                                        base(a) + T <= oc
                                    } else {
                                        (base(a) - n0 + T) * lda <= tail.len()
                                    });
                                    let p = a_ptr.wrapping_add(base(a) * lda + kb * K);
                                    ops::load_a(a, p, 2 * lda);
                                    for b in 0..nb {
                                        if a == 0 {
                                            let p = xp.as_ptr().add(((mb + b) * kbs + kb) * 256);
                                            ops::load_b(b, p);
                                        }
                                        dp(a, b);
                                    }
                                }
                            }
                            for a in 0..na {
                                // Columns first.. (cnt of them) are tile rows off.. .
                                let first = n0 + a * T;
                                let cnt = (nv - a * T).min(T);
                                let off = first - base(a);
                                let mut bz = [0f32; T];
                                if let Some(bias) = bias {
                                    bz[..cnt].copy_from_slice(&bias[first..first + cnt]);
                                }
                                for b in 0..nb {
                                    ops::store(2 * a + b, cbuf.as_mut_ptr());
                                    let (cb, tb) = (cbuf.as_ptr(), tbuf.as_mut_ptr());
                                    super::transpose16(cb as _, T, tb as _, T);
                                    let r0 = (mb + b) * T;
                                    for m in 0..(rows - r0).min(T) {
                                        let o = out.as_mut_ptr().add((r0 + m) * oc + first);
                                        let o = std::slice::from_raw_parts_mut(o, cnt);
                                        let t = &tbuf[m * T + off..][..cnt];
                                        for ((o, &t), &bj) in o.iter_mut().zip(t).zip(&bz) {
                                            *o = t + bj;
                                        }
                                    }
                                }
                            }
                            mb += nb;
                        }
                        n0 += nv;
                    }
                    p0 = p1;
                }
                ops::end();
            }
        }

        /// [`gemm`] for fewer than 16 rows (decode, a K-critique step) over 32 s columns:
        /// row i of the tile pair is column `cols.start + i * s + t` for t = 0..s, so
        /// each of the 32 tile rows streams its own run of s consecutive weight rows
        /// forward. Side by side, 32 adjacent weight rows read 64 bytes at a time are 32
        /// interleaved streams in a few pages, which the hardware prefetcher does not
        /// follow (software prefetches then fill every line buffer); 32 runs far apart
        /// are 32 ascending streams it does. Every output is the same tile products in
        /// the same order as [`gemm`]'s, so the same bits.
        ///
        /// SAFETY: as [`gemm`], with rows < 16, c a multiple of 32 and `cols.len()` a
        /// multiple of 32.
        #[allow(clippy::too_many_arguments)]
        #[inline(never)]
        unsafe fn gemm_spread(
            out: &mut [f32],
            xp: &[u32],
            rows: usize,
            w: &[bf16],
            bias: Option<&[f32]>,
            c: usize,
            oc: usize,
            cols: Range<usize>,
        ) {
            const T: usize = 16;
            const K: usize = 32;
            let kbs = c / K;
            let s = cols.len() / (2 * T);
            debug_assert!(rows < T && c % K == 0 && cols.len() == 2 * T * s && cols.end <= oc);
            let w = w.as_ptr() as *const u16;
            let len = cols.len();
            thread_local! {
                /// With two or more rows, the block's C tiles as stored, step by step
                /// (tile pair t at 512 t).
                static TILES: std::cell::RefCell<Vec<f32>> =
                    const { std::cell::RefCell::new(Vec::new()) };
            }
            TILES.with_borrow_mut(|tiles| {
                // One row writes its 32 columns per step in place. More rows keep the
                // block's tiles and write `out` a row at a time after: storing 32 columns
                // of every row per step pulls 32 lines of each row of `out` in at once
                // (the model's decode shapes at eight rows: 25.1-26.3 GB/s in place,
                // 28.0-28.2 this way, 30.4 with no write-back at all).
                let kept = rows > 1;
                if kept && tiles.len() < s * 512 {
                    tiles.resize(s * 512, 0.0);
                }
                let mut cbuf = [0f32; 256];
                // SAFETY: tile a's row m is weight row cols.start + (a * T + m) * s + t,
                // below cols.end as t < s, read 64 bytes at a time within its c channels; B
                // tiles read the packing of the rows (one 16-row block, kbs steps); stores
                // go to `cbuf` or `tiles` (s * 512 floats when kept); `out` is written at
                // row 0, columns in `cols`.
                unsafe {
                    ops::start();
                    for t in 0..s {
                        let first = cols.start + t;
                        ops::zero(0);
                        ops::zero(2);
                        for kb in 0..kbs {
                            for a in 0..2 {
                                let p = w.add((first + a * T * s) * c + kb * K);
                                ops::load_a(a, p, 2 * c * s);
                                if a == 0 {
                                    ops::load_b(0, xp.as_ptr().add(kb * 256));
                                }
                                dp(a, 0);
                            }
                        }
                        for a in 0..2 {
                            if kept {
                                ops::store(2 * a, tiles.as_mut_ptr().add((2 * t + a) * 256));
                                continue;
                            }
                            // Tile row i holds block column (a * T + i) * s + t.
                            ops::store(2 * a, cbuf.as_mut_ptr());
                            for i in 0..T {
                                let col = first + (a * T + i) * s;
                                let bj = bias.map_or(0.0, |b| b[col]);
                                *out.as_mut_ptr().add(col) = cbuf[i * T] + bj;
                            }
                        }
                    }
                    ops::end();
                }
                if !kept {
                    return;
                }
                // Row m, block column (a * T + i) * s + t: pair t's tile a, row i, column m.
                for m in 0..rows {
                    let o = &mut out[m * oc + cols.start..][..len];
                    for (ii, run) in o.chunks_exact_mut(s).enumerate() {
                        let (a, i) = (ii / T, ii % T);
                        for (t, v) in run.iter_mut().enumerate() {
                            *v = tiles[(2 * t + a) * 256 + i * T + m];
                        }
                    }
                    if let Some(b) = bias {
                        for (v, &bj) in o.iter_mut().zip(&b[cols.clone()]) {
                            *v += bj;
                        }
                    }
                }
            });
        }
    };
}

/// The hardware instantiation: AMX-TILE and AMX-BF16 through inline assembly (tile
/// registers: C 0-3, A 4-5, B 6-7).
#[cfg(target_arch = "x86_64")]
pub(super) mod real {
    mod ops {
        use std::arch::asm;

        /// 64-byte aligned (a cache line; the instruction reads 64 bytes).
        #[repr(align(64))]
        struct Config([u8; 64]);

        static CONFIG: Config = Config(super::super::config());

        /// Load the tile configuration (zeroing every tile).
        ///
        /// SAFETY: AMX-TILE present and permitted.
        #[inline]
        pub unsafe fn start() {
            // SAFETY: see the function's contract; CONFIG is a valid palette-1 config.
            unsafe {
                asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly))
            }
        }

        /// Return the tiles to their initial state.
        ///
        /// SAFETY: AMX-TILE present and permitted.
        #[inline]
        pub unsafe fn end() {
            // SAFETY: see the function's contract.
            unsafe { asm!("tilerelease", options(nostack, nomem)) }
        }

        /// SAFETY: tiles configured.
        #[inline]
        pub unsafe fn zero(t: usize) {
            // SAFETY: see the function's contract.
            unsafe {
                match t {
                    0 => asm!("tilezero tmm0", options(nostack, nomem)),
                    1 => asm!("tilezero tmm1", options(nostack, nomem)),
                    2 => asm!("tilezero tmm2", options(nostack, nomem)),
                    _ => asm!("tilezero tmm3", options(nostack, nomem)),
                }
            }
        }

        /// A tile `a` = 16 rows of 32 bf16 at p, rows `stride` bytes apart.
        ///
        /// SAFETY: tiles configured; the 16 rows readable.
        #[inline]
        pub unsafe fn load_a(a: usize, p: *const u16, stride: usize) {
            // SAFETY: see the function's contract.
            unsafe {
                if a == 0 {
                    asm!("tileloadd tmm4, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride,
                        options(nostack, readonly));
                } else {
                    asm!("tileloadd tmm5, [{p} + {s}*1]", p = in(reg) p, s = in(reg) stride,
                        options(nostack, readonly));
                }
            }
        }

        /// B tile `b` = the 1 KiB at p.
        ///
        /// SAFETY: tiles configured; 1 KiB readable at p.
        #[inline]
        pub unsafe fn load_b(b: usize, p: *const u32) {
            // SAFETY: see the function's contract.
            unsafe {
                if b == 0 {
                    asm!("tileloadd tmm6, [{p} + {s}*1]", p = in(reg) p, s = in(reg) 64usize,
                        options(nostack, readonly));
                } else {
                    asm!("tileloadd tmm7, [{p} + {s}*1]", p = in(reg) p, s = in(reg) 64usize,
                        options(nostack, readonly));
                }
            }
        }

        /// C tile `2A + B` += A tile A . B tile B.
        ///
        /// SAFETY: tiles configured.
        #[inline]
        pub unsafe fn dp<const A: usize, const B: usize>() {
            // SAFETY: see the function's contract.
            unsafe {
                match (A, B) {
                    (0, 0) => asm!("tdpbf16ps tmm0, tmm4, tmm6", options(nostack, nomem)),
                    (0, _) => asm!("tdpbf16ps tmm1, tmm4, tmm7", options(nostack, nomem)),
                    (_, 0) => asm!("tdpbf16ps tmm2, tmm5, tmm6", options(nostack, nomem)),
                    _ => asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem)),
                }
            }
        }

        /// The 16 x 16 f32 of C tile `t` to p (rows 64 bytes apart).
        ///
        /// SAFETY: tiles configured; 1 KiB writable at p.
        #[inline]
        pub unsafe fn store(t: usize, p: *mut f32) {
            // SAFETY: see the function's contract.
            unsafe {
                match t {
                    0 => asm!("tilestored [{p} + {s}*1], tmm0", p = in(reg) p, s = in(reg) 64usize,
                        options(nostack)),
                    1 => asm!("tilestored [{p} + {s}*1], tmm1", p = in(reg) p, s = in(reg) 64usize,
                        options(nostack)),
                    2 => asm!("tilestored [{p} + {s}*1], tmm2", p = in(reg) p, s = in(reg) 64usize,
                        options(nostack)),
                    _ => asm!("tilestored [{p} + {s}*1], tmm3", p = in(reg) p, s = in(reg) 64usize,
                        options(nostack)),
                }
            }
        }

        #[inline]
        pub fn prefetch(p: *const u16) {
            // SAFETY: a prefetch never faults (SSE is baseline on x86-64).
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    p as *const i8,
                )
            }
        }
    }

    amx_kernels!();
}

/// The same kernels over eight 1 KiB tile registers in memory (per thread), each
/// instruction done as Intel's pseudo-code defines it: for tests of the kernel logic
/// (within the bf16 tolerance of the hardware, not its bits; see the module's notes).
pub(super) mod emu {
    mod ops {
        use std::cell::RefCell;

        thread_local! {
            /// C 0-3, A 4-5, B 6-7: 16 rows of 16 dwords each.
            static TILES: RefCell<[[u32; 256]; 8]> = const { RefCell::new([[0; 256]; 8]) };
        }

        fn with<R>(f: impl FnOnce(&mut [[u32; 256]; 8]) -> R) -> R {
            TILES.with_borrow_mut(f)
        }

        /// `ldtilecfg` zeroes every tile.
        pub unsafe fn start() {
            with(|t| *t = [[0; 256]; 8]);
        }

        pub unsafe fn end() {
            with(|t| *t = [[0; 256]; 8]);
        }

        pub unsafe fn zero(t: usize) {
            with(|tiles| tiles[t] = [0; 256]);
        }

        /// SAFETY: 16 rows of 64 bytes readable at p + r * stride.
        unsafe fn load(t: usize, p: *const u8, stride: usize) {
            with(|tiles| {
                for r in 0..16 {
                    for d in 0..16 {
                        // SAFETY: see the function's contract.
                        tiles[t][r * 16 + d] =
                            unsafe { (p.add(r * stride + 4 * d) as *const u32).read_unaligned() };
                    }
                }
            });
        }

        /// SAFETY: as the hardware's.
        pub unsafe fn load_a(a: usize, p: *const u16, stride: usize) {
            // SAFETY: forwarded.
            unsafe { load(4 + a, p as *const u8, stride) }
        }

        /// SAFETY: as the hardware's.
        pub unsafe fn load_b(b: usize, p: *const u32) {
            // SAFETY: forwarded.
            unsafe { load(6 + b, p as *const u8, 64) }
        }

        /// For each C row m, channel pair k and column n: c += a.lo * b.lo, then
        /// c += a.hi * b.hi (bf16 products are exact in f32; each add rounded).
        pub unsafe fn dp<const A: usize, const B: usize>() {
            let lo = |v: u32| f32::from_bits(v << 16);
            let hi = |v: u32| f32::from_bits(v & 0xFFFF_0000);
            with(|t| {
                let (a, b) = (t[4 + A], t[6 + B]);
                let c = &mut t[2 * A + B];
                for m in 0..16 {
                    for k in 0..16 {
                        let av = a[m * 16 + k];
                        for n in 0..16 {
                            let bv = b[k * 16 + n];
                            let mut s = f32::from_bits(c[m * 16 + n]);
                            s += lo(av) * lo(bv);
                            s += hi(av) * hi(bv);
                            c[m * 16 + n] = s.to_bits();
                        }
                    }
                }
            });
        }

        /// SAFETY: 1 KiB writable at p.
        pub unsafe fn store(t: usize, p: *mut f32) {
            with(|tiles| {
                for (i, &v) in tiles[t].iter().enumerate() {
                    // SAFETY: see the function's contract.
                    unsafe { *p.add(i) = f32::from_bits(v) };
                }
            });
        }

        pub fn prefetch(_: *const u16) {}
    }

    amx_kernels!();
}

/// `dst` = the rows of `xb` (rows x c, bf16 bits) as B tiles: for 16-row block mb and
/// 32-channel step kb, 256 dwords at `(mb * kbs + kb) * 256`, dword `r * 16 + m` holding
/// channels `kb * 32 + 2r` (low half) and `+ 1` (high half) of row `mb * 16 + m`; zero
/// past the last row and channel. Whole blocks (16 rows, 32 channels, c even) are
/// 16 x 16 dword transposes ([`transpose16`]); the rest one pair at a time.
pub(super) fn pack(dst: &mut Vec<u32>, xb: &[u16], c: usize) {
    pack_with(dst, xb, c, true)
}

/// [`pack`], the transposes used only if `transposes` (and [`simd`]) say so: one pair at
/// a time otherwise, for the benchmark that compares the two.
pub(super) fn pack_with(dst: &mut Vec<u32>, xb: &[u16], c: usize, transposes: bool) {
    let rows = xb.len() / c;
    dst.resize(rows.div_ceil(16) * c.div_ceil(32) * 256, 0);
    pack_into(dst, xb, c, transposes);
}

/// [`pack_with`] into `dst` of exactly the packing's length (its old contents ignored).
fn pack_into(dst: &mut [u32], xb: &[u16], c: usize, transposes: bool) {
    let rows = xb.len() / c;
    let (kbs, mbs) = (c.div_ceil(32), rows.div_ceil(16));
    debug_assert_eq!(dst.len(), mbs * kbs * 256);
    let fast = transposes && c.is_multiple_of(2) && super::super::dispatch::has_avx2();
    let (full_m, full_k) = if fast { (rows / 16, c / 32) } else { (0, 0) };
    if (full_m, full_k) != (mbs, kbs) {
        // Padding (rows past the last, channels past c) must be zeros.
        dst.fill(0);
    }
    for mb in 0..full_m {
        for kb in 0..full_k {
            let src = xb[mb * 16 * c + kb * 32..].as_ptr() as *const u32;
            let d = dst[(mb * kbs + kb) * 256..].as_mut_ptr();
            // SAFETY: 16 rows of 16 dwords at src, c / 2 dwords apart, lie within xb
            // (whole rows mb * 16.. and channels kb * 32..); d has 256 dwords.
            unsafe { transpose16(src, c / 2, d, 16) };
        }
    }
    for (row, x) in xb.chunks_exact(c).enumerate() {
        let base = (row / 16) * kbs * 256 + row % 16;
        // Pairs already transposed (a whole row block's whole steps) are skipped.
        let done = if row / 16 < full_m { full_k * 16 } else { 0 };
        for (p, pair) in x.chunks(2).enumerate().skip(done) {
            let v = pair[0] as u32 | (pair.get(1).map_or(0, |&h| h as u32) << 16);
            dst[base + (p / 16) * 256 + (p % 16) * 16] = v;
        }
    }
}

/// dst[j * ds + i] = src[i * ss + j] for i, j < 16 (32-bit values): AVX2 8 x 8 blocks
/// where the CPU has AVX2 ([`super::super::dispatch::has_avx2`]), else one at a time.
///
/// SAFETY: the 16 rows of 16 values at src (ss apart) readable, at dst (ds apart)
/// writable, not overlapping.
unsafe fn transpose16(src: *const u32, ss: usize, dst: *mut u32, ds: usize) {
    #[cfg(target_arch = "x86_64")]
    if super::super::dispatch::has_avx2() {
        // SAFETY: AVX2 detected; forwarded bounds.
        unsafe {
            for bi in 0..2 {
                for bj in 0..2 {
                    transpose8(
                        src.add(bi * 8 * ss + bj * 8),
                        ss,
                        dst.add(bj * 8 * ds + bi * 8),
                        ds,
                    );
                }
            }
        }
        return;
    }
    // SAFETY: forwarded.
    unsafe { transpose16_scalar(src, ss, dst, ds) }
}

/// [`transpose16`] one value at a time.
///
/// SAFETY: as [`transpose16`].
unsafe fn transpose16_scalar(src: *const u32, ss: usize, dst: *mut u32, ds: usize) {
    for i in 0..16 {
        for j in 0..16 {
            // SAFETY: see the function's contract.
            unsafe { *dst.add(j * ds + i) = *src.add(i * ss + j) };
        }
    }
}

/// The 8 x 8 block of [`transpose16`].
///
/// SAFETY: AVX2; 8 rows of 8 values at src (ss apart) readable, at dst (ds apart)
/// writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose8(src: *const u32, ss: usize, dst: *mut u32, ds: usize) {
    use std::arch::x86_64::*;
    // SAFETY: see the function's contract.
    unsafe {
        let r: [__m256; 8] =
            std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * ss) as *const f32));
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let o = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (j, v) in o.iter().enumerate() {
            _mm256_storeu_ps(dst.add(j * ds) as *mut f32, *v);
        }
    }
}

thread_local! {
    /// (call tag, this thread's packed input of that call), and its padded-weights buffer.
    static PACKED: RefCell<(u64, Vec<u32>, Vec<u16>)> =
        const { RefCell::new((0, Vec::new(), Vec::new())) };
    /// One block of 16 input rows rounded to bf16, for [`share_packed`].
    static ROUNDED16: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// (call tag, that call's input rounded and packed once for every thread), from
/// [`share_packed`]; tag 0 while it is being filled.
static SHARED: std::sync::RwLock<(u64, Vec<u32>)> = std::sync::RwLock::new((0, Vec::new()));

/// Input rows from which a call shares one packing ([`share_packed`]) instead of each
/// thread rounding and packing the whole input for itself.
pub(super) const SHARE_ROWS: usize = 32;

/// Round `inp` (rows x c) to bf16 and pack it ([`pack`], the same values) for `call`,
/// once for all threads: `threads` threads of the pool take blocks of 16 rows, and the
/// call's work items then read the one packing ([`with_packed`]). With every thread
/// packing every row, the rounding and packing were a tenth of an AMX prefill.
pub(super) fn share_packed(inp: &[f32], c: usize, call: u64, threads: usize) {
    let rows = inp.len() / c;
    let (kbs, mbs) = (c.div_ceil(32), rows.div_ceil(16));
    let mut shared = SHARED.write().unwrap_or_else(|e| e.into_inner());
    shared.0 = 0;
    shared.1.resize(mbs * kbs * 256, 0);
    let (dst, block) = (
        super::super::pool::SendPtr(shared.1.as_mut_ptr()),
        kbs * 256,
    );
    // (No work item of this job takes the lock; a busy pool runs the job inline.)
    super::super::pool::global().run_items(threads, mbs, &|mb| {
        let r = mb * 16..((mb + 1) * 16).min(rows);
        ROUNDED16.with_borrow_mut(|xb| {
            xb.resize(r.len() * c, 0);
            super::dot::round_rows(xb, &inp[r.start * c..r.end * c]);
            // SAFETY: item mb alone writes block mb of the buffer, which outlives the job.
            let d = unsafe { std::slice::from_raw_parts_mut(dst.get().add(mb * block), block) };
            pack_into(d, xb, c, true);
        });
    });
    shared.0 = call;
}

/// `f(packed input, padding buffer)`: the call's shared packing ([`share_packed`]) if
/// there is one, else the input rounded ([`super::dot::with_rounded`]) and packed once
/// per `call` tag and thread.
fn with_packed<R>(
    inp: &[f32],
    c: usize,
    call: u64,
    f: impl FnOnce(&[u32], &mut Vec<u16>) -> R,
) -> R {
    PACKED.with_borrow_mut(|(tag, xp, tail)| {
        if inp.len() / c >= SHARE_ROWS {
            let shared = SHARED.read().unwrap_or_else(|e| e.into_inner());
            if shared.0 == call {
                return f(&shared.1, tail);
            }
        }
        if *tag != call {
            super::dot::with_rounded(inp, call, |xb| pack(xp, xb, c));
            *tag = call;
        }
        f(xp, tail)
    })
}

/// A gemm over all columns: (out, packed input, rows, weights, bias, c, oc, padding).
type PackedGemm<'a> =
    dyn Fn(&mut [f32], &[u32], usize, &[bf16], Option<&[f32]>, usize, usize, &mut Vec<u16>) + 'a;

/// A kernel's contract over all columns on rounded inputs, through [`pack`].
#[allow(clippy::type_complexity)]
fn packed_kernel<'a>(
    kernel: &'a PackedGemm<'a>,
) -> impl Fn(&mut [f32], &[u16], &[bf16], Option<&[f32]>, usize, usize) {
    move |out, xb, w, bias, c, oc| {
        let (mut xp, mut tail) = (Vec::new(), Vec::new());
        pack(&mut xp, xb, c);
        kernel(out, &xp, xb.len() / c, w, bias, c, oc, &mut tail);
    }
}

/// Whether `kernel` (over rounded inputs) matches the reference
/// ([`super::dot::agrees_with_reference`]) on 11 x 77 inputs against 7 outputs (padded
/// tiles and channels) and on 37 x 64 against 100 (whole weight tiles read in place, a
/// partial block, three row tiles), and gives each row of the 37 the same bits alone
/// (one row: 96 columns spread over the tile rows, then a partial block).
fn agrees(kernel: impl Fn(&mut [f32], &[u16], &[bf16], Option<&[f32]>, usize, usize)) -> bool {
    use super::dot::{agrees_with_reference, test_inputs};
    if !agrees_with_reference(11, 77, 7, &kernel) || !agrees_with_reference(37, 64, 100, &kernel) {
        return false;
    }
    let (rows, c, oc) = (37, 64, 100);
    let (xb, w, bias) = test_inputs(rows, c, oc);
    let mut all = vec![0.0f32; rows * oc];
    kernel(&mut all, &xb, &w, Some(&bias), c, oc);
    (0..rows).all(|r| {
        let mut one = vec![f32::NAN; oc];
        kernel(&mut one, &xb[r * c..(r + 1) * c], &w, Some(&bias), c, oc);
        one.iter()
            .zip(&all[r * oc..(r + 1) * oc])
            .all(|(a, b)| a.to_bits() == b.to_bits())
    })
}

/// Whether the AMX kernels agree with the reference and give a row the same bits alone
/// and batched ([`agrees`]): detection runs this once before taking the path.
#[cfg(target_arch = "x86_64")]
pub(crate) fn self_check() -> bool {
    agrees(packed_kernel(&|out, xp, rows, w, bias, c, oc, tail| {
        // SAFETY: called only once AMX-TILE and AMX-BF16 are detected and the tile
        // permission granted; the packing and shapes are consistent.
        unsafe { real::gemm(out, xp, rows, w, bias, c, oc, 0..oc, tail) }
    }))
}

/// out (rows, oc) columns `cols` = round(inp) . weight(cols)^T + bias through the AMX
/// kernels (`hw`) or their emulation ([`emu`], on any CPU), the packed input shared by
/// every item of `call` on this thread.
///
/// SAFETY: with `hw`, AMX-TILE and AMX-BF16 present and permitted. The shapes checked
/// (as the gemm's), `cols` within 0..oc.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm(
    hw: bool,
    out: &mut [f32],
    inp: &[f32],
    w: &[bf16],
    bias: Option<&[f32]>,
    c: usize,
    oc: usize,
    cols: Range<usize>,
    call: u64,
) {
    let rows = inp.len() / c;
    with_packed(inp, c, call, |xp, tail| {
        #[cfg(target_arch = "x86_64")]
        if hw {
            // SAFETY: forwarded caller guarantees.
            unsafe { real::gemm(out, xp, rows, w, bias, c, oc, cols, tail) };
            return;
        }
        // SAFETY: the emulation needs no CPU feature; shapes as the caller's.
        unsafe { emu::gemm(out, xp, rows, w, bias, c, oc, cols, tail) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration is palette 1 with eight 16 x 64-byte tiles and nothing else
    /// (reserved bytes and tiles 8-15 zero: anything else faults).
    #[test]
    fn tile_configuration_is_palette_one_with_eight_full_tiles() {
        let c = config();
        assert_eq!(c[0], 1);
        assert!(c[1..16].iter().all(|&b| b == 0));
        for t in 0..16 {
            let colsb = u16::from_le_bytes([c[16 + 2 * t], c[17 + 2 * t]]);
            let rows = c[48 + t];
            assert_eq!(
                (colsb, rows),
                if t < 8 { (64, 16) } else { (0, 0) },
                "tile {t}"
            );
        }
    }

    /// Packing puts channel pair p of row r where the B operand wants it, zero-padded:
    /// whole blocks transposed, partial ones (rows, channels, an odd channel count) one
    /// pair at a time.
    #[test]
    fn packing_lays_out_channel_pairs_by_row() {
        for (rows, c) in [
            (19usize, 67usize),
            (37, 96),
            (16, 64),
            (33, 70),
            (1, 32),
            (5, 2),
        ] {
            let xb: Vec<u16> = (0..rows * c).map(|i| (i * 7 + 1) as u16).collect();
            let mut xp = Vec::new();
            pack(&mut xp, &xb, c);
            let (kbs, mbs) = (c.div_ceil(32), rows.div_ceil(16));
            assert_eq!(xp.len(), mbs * kbs * 256);
            for row in 0..mbs * 16 {
                for k in (0..kbs * 32).step_by(2) {
                    let v = xp[((row / 16) * kbs + k / 32) * 256 + (k % 32 / 2) * 16 + row % 16];
                    let at = |kk: usize| {
                        if row < rows && kk < c {
                            xb[row * c + kk] as u32
                        } else {
                            0
                        }
                    };
                    assert_eq!(
                        v,
                        at(k) | at(k + 1) << 16,
                        "{rows} x {c}: row {row}, channel {k}"
                    );
                }
            }
        }
    }

    /// The packing shared by a call's threads is the per-thread one: the input rounded
    /// and packed in blocks of 16 rows by one or two threads, padding zeroed over what an
    /// earlier, larger call left in the buffer.
    #[test]
    fn shared_packing_is_the_per_thread_packing() {
        let big: Vec<f32> = (0..130 * 96)
            .map(|i| (i % 251) as f32 * 0.37 - 40.0)
            .collect();
        share_packed(&big, 96, super::super::next_call(), 2);
        for (rows, c, threads) in [
            (32usize, 64usize, 2usize),
            (33, 77, 2),
            (47, 96, 1),
            (130, 70, 2),
        ] {
            let x: Vec<f32> = (0..rows * c)
                .map(|i| ((i * 7919) % 1009) as f32 / 97.0 - 5.0 + 1e-3)
                .collect();
            let mut xb = vec![0u16; x.len()];
            super::super::dot::round_rows(&mut xb, &x);
            let mut want = Vec::new();
            pack(&mut want, &xb, c);
            let call = super::super::next_call();
            share_packed(&x, c, call, threads);
            let shared = SHARED.read().unwrap();
            assert_eq!(shared.0, call);
            assert_eq!(shared.1, want, "{rows} x {c}, {threads} threads");
        }
    }

    /// The 16 x 16 transpose (AVX2 where the CPU has it) against one value at a time, with
    /// strides wider than the block.
    #[test]
    fn transposes_agree() {
        let src: Vec<u32> = (0..16 * 21)
            .map(|i: u32| i.wrapping_mul(2_654_435_761))
            .collect();
        let (mut got, mut want) = (vec![0u32; 16 * 19], vec![0u32; 16 * 19]);
        // SAFETY: 16 rows of 21 and of 19 values.
        unsafe {
            transpose16(src.as_ptr(), 21, got.as_mut_ptr(), 19);
            transpose16_scalar(src.as_ptr(), 21, want.as_mut_ptr(), 19);
        }
        assert_eq!(got, want);
        assert_eq!(want[3 * 19 + 5], src[5 * 21 + 3]);
        assert!(want.chunks(19).all(|r| r[16..].iter().all(|&v| v == 0)));
    }

    /// The emulated `tdpbf16ps` adds each pair's even channel first, then the odd one,
    /// each add rounded: after 2^24 from the first pair, + 1 rounds away (a tie, to
    /// even) and - 2^24 leaves 0, where odd-first would leave 1.
    #[test]
    fn emulated_tile_product_adds_even_then_odd_channel() {
        let mut x = vec![0.0f32; 32];
        (x[0], x[2], x[3]) = (16777216.0, 1.0, -16777216.0);
        let w = vec![bf16::ONE; 32];
        let mut out = [f32::NAN; 1];
        let run = |out: &mut [f32], x: &[f32]| {
            let call = super::super::next_call();
            // SAFETY: the emulation needs no CPU feature; consistent shapes.
            unsafe { gemm(false, out, x, &w, None, 32, 1, 0..1, call) }
        };
        run(&mut out, &x);
        assert_eq!(out[0], 0.0);
        (x[2], x[3]) = (x[3], x[2]);
        run(&mut out, &x);
        assert_eq!(out[0], 1.0);
    }

    /// Fewer than 16 rows over spread columns (`gemm_spread`, either write-back) give
    /// each row the bits it has in a 17-row batch, and nothing outside `cols` is written.
    #[test]
    fn spread_columns_give_the_batched_bits() {
        use super::super::dot::test_inputs;
        // (rows alone, c, oc, columns): spread runs of 2, 3 and 4 rows per tile row, a
        // remainder after them, offsets into the matrix, one to fifteen rows.
        for (rows, c, oc, cols) in [
            (1usize, 64usize, 100usize, 0..100),
            (3, 96, 161, 7..140),
            (15, 32, 64, 0..64),
            (2, 64, 200, 33..161),
            (1, 128, 97, 1..97),
        ] {
            let batch = 17;
            let (xb, w, bias) = test_inputs(batch, c, oc);
            let run = |xb: &[u16]| {
                let n = xb.len() / c;
                let (mut xp, mut tail) = (Vec::new(), Vec::new());
                pack(&mut xp, xb, c);
                let mut out = vec![f32::NAN; n * oc];
                // SAFETY: the emulation needs no CPU feature; consistent shapes.
                unsafe {
                    emu::gemm(
                        &mut out,
                        &xp,
                        n,
                        &w,
                        Some(&bias),
                        c,
                        oc,
                        cols.clone(),
                        &mut tail,
                    )
                };
                out
            };
            let all = run(&xb);
            let some = run(&xb[..rows * c]);
            for r in 0..rows {
                for j in cols.clone() {
                    assert_eq!(
                        some[r * oc + j].to_bits(),
                        all[r * oc + j].to_bits(),
                        "{rows} x {c} -> {oc}, columns {cols:?}: row {r}, column {j}"
                    );
                }
                let outside = (0..oc).filter(|j| !cols.contains(j));
                assert!(
                    outside.clone().all(|j| some[r * oc + j].is_nan()),
                    "written outside"
                );
            }
        }
    }

    /// The detection guard accepts the kernels' logic (the emulated copy) and rejects a
    /// kernel off in one output, one that writes nothing and one whose rows differ alone.
    #[test]
    fn self_check_accepts_the_kernels_and_rejects_broken_ones() {
        let emu = packed_kernel(&|out, xp, rows, w, bias, c, oc, tail| {
            // SAFETY: the emulation needs no CPU feature; consistent shapes.
            unsafe { emu::gemm(out, xp, rows, w, bias, c, oc, 0..oc, tail) }
        });
        assert!(agrees(&emu));
        assert!(!agrees(
            |out: &mut [f32], xb: &[u16], w: &[bf16], b: Option<&[f32]>, c, oc| {
                emu(out, xb, w, b, c, oc);
                out[out.len() / 2] += 1e-2;
            }
        ));
        assert!(!agrees(
            |_: &mut [f32], _: &[u16], _: &[bf16], _: Option<&[f32]>, _, _| {}
        ));
        assert!(!agrees(
            |out: &mut [f32], xb: &[u16], w: &[bf16], b: Option<&[f32]>, c, oc| {
                emu(out, xb, w, b, c, oc);
                if xb.len() == c {
                    out[0] = f32::from_bits(out[0].to_bits() ^ 1);
                }
            }
        ));
    }
}
