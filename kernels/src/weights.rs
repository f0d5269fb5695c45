//! Read-only weight slices in their on-disk dtype. Kernels convert elements to f32 in
//! registers; the model is never copied to an f32 buffer.
//!
//! [`Weights::Q8`] is the one format not read from disk: int8 weights in groups of
//! [`Q8_GROUP`] consecutive elements of a row, each group with its own bf16 scale
//! (`w ≈ scale · q`, symmetric), made at load time (`--quantize q8`) by [`quantize_q8`]
//! (`scale` = max|w| / 127 rounded to the nearest bf16) or [`quantize_q8_keep`] (kept
//! columns, and the scale as [`Q8Fit`] picks it): 1.125 bytes per weight.
//!
//! Groups of 16 with 2-byte scales cost the bytes of groups of 32 with f32 scales and
//! lose a third less: 2.2e-2 against 3.4e-2 relative L2 on the default model's logits
//! (docs/benchmarks.md); keeping a few input columns at 16 bits ([`Q8Keep`]) takes that
//! to 1.2e-2, and searching each group's scale weighted by its inputs' energies
//! ([`Q8Fit::Search`], what the model does) to 8.1e-3. With [`quantize_q8`]'s
//! max|w| / 127, every weight is quantised against the rounded scale, so it stays
//! within half a step of it, and a group's largest weight is 127 steps (max|w| / scale
//! is within 127 +- 0.25). Rounding the scale up instead (never over 127 steps by
//! construction) measured worse: 2.39e-2 (the embedding's error 19 % higher).

use half::{bf16, f16};

use crate::error::KernelError;

/// Elements per Q8 scale group (along a row; rows must be whole groups).
pub const Q8_GROUP: usize = 16;

/// Int8 weights with one bf16 scale per [`Q8_GROUP`] elements. The constructor checks
/// that the data is whole groups and that there is one scale per group.
#[derive(Debug, Clone, Copy)]
pub struct Q8Slice<'a> {
    q: &'a [i8],
    scales: &'a [bf16],
    keep: Option<Q8Keep<'a>>,
}

/// Most input columns a Q8 matrix keeps at 16 bits ([`Q8Keep`]).
pub const Q8_KEEP_MAX: usize = 64;

/// Input columns of a Q8 matrix kept at 16 bits: the channels whose inputs are largest
/// (outlier features), where int8 steps cost the output the most. Their int8 values are
/// zero (and their groups' scales ignore them); their values are here in bf16, in runs
/// of [`Q8_KEEP_RUN`] rows: run R holds, column after column, the kept columns' values
/// of rows 16R..16R+16 (the last run padded), so the kernels read them as one stream and
/// add `x[cols[j]] * (column j of the run)` over 16 outputs at once without horizontal
/// sums. The matrix's element (r, c) is `q * scale`, plus that value where
/// `cols[j] == c`.
#[derive(Debug, Clone, Copy)]
pub struct Q8Keep<'a> {
    cols: &'a [u32],
    /// The whole matrix's runs ([`q8_keep_len`] values).
    vals: &'a [bf16],
    row: usize,
    /// The first row of this slice of the matrix (runs count from the matrix's row 0).
    first: usize,
}

/// Rows per run of kept values ([`Q8Keep`]).
pub const Q8_KEEP_RUN: usize = 16;

/// Values a matrix of `rows` rows with `kept` kept columns stores ([`Q8Keep`]).
pub fn q8_keep_len(rows: usize, kept: usize) -> usize {
    rows.div_ceil(Q8_KEEP_RUN) * Q8_KEEP_RUN * kept
}

/// Where row `r` (of the whole matrix), kept column `j` of `kept` lies in the runs.
#[inline]
fn keep_index(r: usize, j: usize, kept: usize) -> usize {
    (r / Q8_KEEP_RUN * kept + j) * Q8_KEEP_RUN + r % Q8_KEEP_RUN
}

impl<'a> Q8Keep<'a> {
    /// The kept columns, ascending.
    pub fn cols(&self) -> &'a [u32] {
        self.cols
    }

    /// The first row of this slice, counted in the whole matrix.
    pub fn first(&self) -> usize {
        self.first
    }

    /// Run `run` of the whole matrix: `cols().len()` columns of [`Q8_KEEP_RUN`] values.
    #[inline]
    pub fn run(&self, run: usize) -> &'a [bf16] {
        let n = self.cols.len() * Q8_KEEP_RUN;
        &self.vals[run * n..][..n]
    }

    /// Row `r` of this slice, kept column `j`.
    #[inline]
    pub fn value(&self, r: usize, j: usize) -> bf16 {
        self.vals[keep_index(self.first + r, j, self.cols.len())]
    }
}

/// Why kept columns `cols` with `vals` values do not fit `n` weights in rows of `row`
/// (a multiple of [`Q8_GROUP`]), if they do not: at most [`Q8_KEEP_MAX`], ascending,
/// distinct and under `row`, with [`q8_keep_len`] values.
fn keep_misfit(n: usize, row: usize, cols: &[u32], vals: usize) -> Option<String> {
    if row == 0 || !row.is_multiple_of(Q8_GROUP) || !n.is_multiple_of(row) {
        return Some(format!(
            "{n} int8 values are not whole rows of {row} (a multiple of {Q8_GROUP})"
        ));
    }
    if cols.len() > Q8_KEEP_MAX
        || cols.windows(2).any(|w| w[0] >= w[1])
        || cols.last().is_some_and(|&c| c as usize >= row)
    {
        return Some(format!(
            "kept columns must be at most {Q8_KEEP_MAX}, ascending, distinct and under the \
             row length {row}: {cols:?}"
        ));
    }
    let rows = n / row;
    (vals != q8_keep_len(rows, cols.len())).then(|| {
        format!(
            "{vals} kept values for {rows} rows of {} kept columns",
            cols.len()
        )
    })
}

impl<'a> Q8Slice<'a> {
    /// `q` must hold whole groups, `scales` one value per group.
    pub fn new(q: &'a [i8], scales: &'a [bf16]) -> Result<Self, KernelError> {
        if !q.len().is_multiple_of(Q8_GROUP) || scales.len() * Q8_GROUP != q.len() {
            return Err(KernelError::Invalid {
                op: "q8 weights",
                arg: "q/scales",
                reason: format!(
                    "{} int8 values and {} scales: need whole groups of {Q8_GROUP} and one scale per group",
                    q.len(),
                    scales.len()
                ),
            });
        }
        Ok(Q8Slice {
            q,
            scales,
            keep: None,
        })
    }

    /// [`Q8Slice::new`] with input columns `cols` (ascending, distinct, < `row`) kept at
    /// 16 bits ([`Q8Keep`]): `vals` holds their values in runs ([`q8_keep_len`] values
    /// for the rows of `row` elements). The element there is `q * scale + val`
    /// ([`quantize_q8_keep`] leaves `q` zero).
    /// Checks cost O(kept columns): this is made per use.
    pub fn with_keep(
        q: &'a [i8],
        scales: &'a [bf16],
        row: usize,
        cols: &'a [u32],
        vals: &'a [bf16],
    ) -> Result<Self, KernelError> {
        let mut s = Self::new(q, scales)?;
        if let Some(reason) = keep_misfit(q.len(), row, cols, vals.len()) {
            return Err(KernelError::Invalid {
                op: "q8 weights",
                arg: "keep",
                reason,
            });
        }
        if !cols.is_empty() {
            s.keep = Some(Q8Keep {
                cols,
                vals,
                row,
                first: 0,
            });
        }
        Ok(s)
    }

    /// The columns kept at 16 bits, if any.
    pub fn keep(&self) -> Option<Q8Keep<'a>> {
        self.keep
    }

    pub fn q(&self) -> &'a [i8] {
        self.q
    }

    pub fn scales(&self) -> &'a [bf16] {
        self.scales
    }

    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        let v = self.q[i] as f32 * self.scales[i / Q8_GROUP].to_f32();
        match self.keep {
            Some(k) => match k.cols.binary_search(&((i % k.row) as u32)) {
                Ok(j) => v + k.value(i / k.row, j).to_f32(),
                Err(_) => v,
            },
            None => v,
        }
    }
}

/// A borrowed weight tensor (row-major), in the dtype it has on disk (or quantised).
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
    Q8(Q8Slice<'a>),
}

impl<'a> Weights<'a> {
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::BF16(w) => w.len(),
            Weights::F16(w) => w.len(),
            Weights::Q8(w) => w.q.len(),
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
            Weights::Q8(w) => w.get(i),
        }
    }

    /// Elements `start..start + len`. For Q8 both must be multiples of [`Q8_GROUP`]
    /// (whole rows of a matrix whose row length is; kernels check that with
    /// [`Weights::check_rows`] before slicing).
    #[inline]
    pub fn slice(&self, start: usize, len: usize) -> Weights<'a> {
        match *self {
            Weights::F32(w) => Weights::F32(&w[start..start + len]),
            Weights::BF16(w) => Weights::BF16(&w[start..start + len]),
            Weights::F16(w) => Weights::F16(&w[start..start + len]),
            Weights::Q8(w) => {
                debug_assert!(start.is_multiple_of(Q8_GROUP) && len.is_multiple_of(Q8_GROUP));
                let (g0, g1) = (start / Q8_GROUP, (start + len) / Q8_GROUP);
                // Kept columns: whole rows only (every caller slices rows).
                let keep = w.keep.map(|k| {
                    debug_assert!(start.is_multiple_of(k.row) && len.is_multiple_of(k.row));
                    Q8Keep {
                        first: k.first + start / k.row,
                        ..k
                    }
                });
                Weights::Q8(Q8Slice {
                    q: &w.q[g0 * Q8_GROUP..g1 * Q8_GROUP],
                    scales: &w.scales[g0..g1],
                    keep,
                })
            }
        }
    }

    /// A typed error unless rows of `row_len` elements can be sliced out (Q8 needs
    /// whole groups per row; every other dtype always can).
    pub fn check_rows(&self, op: &'static str, row_len: usize) -> Result<(), KernelError> {
        if matches!(self, Weights::Q8(_)) && !row_len.is_multiple_of(Q8_GROUP) {
            return Err(KernelError::Invalid {
                op,
                arg: "weight",
                reason: format!(
                    "q8 weights need rows of a multiple of {Q8_GROUP} elements, got {row_len}"
                ),
            });
        }
        Ok(())
    }

    /// Bytes per element (Q8: the int8 value; see [`Weights::bytes`] for the scales).
    pub fn elem_size(&self) -> usize {
        match self {
            Weights::F32(_) => 4,
            Weights::BF16(_) | Weights::F16(_) => 2,
            Weights::Q8(_) => 1,
        }
    }

    /// Bytes a full read of the tensor touches (Q8: values and scales).
    pub fn bytes(&self) -> usize {
        match self {
            Weights::Q8(w) => {
                w.q.len()
                    + 2 * w.scales.len()
                    + w.keep
                        .map_or(0, |k| (2 * w.q.len() / k.row + 4) * k.cols.len())
            }
            _ => self.len() * self.elem_size(),
        }
    }

    pub fn dtype_name(&self) -> &'static str {
        match self {
            Weights::F32(_) => "f32",
            Weights::BF16(_) => "bf16",
            Weights::F16(_) => "f16",
            Weights::Q8(_) => "q8",
        }
    }

    /// Copy into `out` as f32 (tests, small tensors).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }
}

/// Quantise `src` (whole groups) into `q` and `scales` ([`Q8Slice`] layout): each group
/// of [`Q8_GROUP`] gets `scale` = max|w| / 127 rounded to the nearest bf16 (up where
/// that is a bf16 subnormal, whose coarse steps could leave max|w| over 127.5 steps) and
/// `q = round(w / scale)` (so |q| <= 127 and every weight is within half a step); an
/// all-zero group gets scale 0. Non-finite weights are a typed error (a NaN would poison
/// its group's scale).
pub fn quantize_q8(src: Weights<'_>, q: &mut [i8], scales: &mut [bf16]) -> Result<(), KernelError> {
    let n = src.len();
    if !n.is_multiple_of(Q8_GROUP) || q.len() != n || scales.len() * Q8_GROUP != n {
        return Err(KernelError::Invalid {
            op: "quantize_q8",
            arg: "src/q/scales",
            reason: format!(
                "{n} weights into {} int8 values and {} scales: need whole groups of {Q8_GROUP}",
                q.len(),
                scales.len()
            ),
        });
    }
    match src {
        Weights::F32(w) => quantize_groups(|i| w[i], q, scales),
        #[cfg(target_arch = "x86_64")]
        Weights::BF16(w) if crate::cpu::dispatch::has_avx2() => {
            // SAFETY: AVX2 and F16C detected (has_avx2 includes F16C); lengths checked.
            unsafe { avx2::quantize_16::<false>(bytemuck::cast_slice(w), q, scales) }
        }
        #[cfg(target_arch = "x86_64")]
        Weights::F16(w) if crate::cpu::dispatch::has_avx2() => {
            // SAFETY: AVX2 and F16C detected (has_avx2 includes F16C); lengths checked.
            unsafe { avx2::quantize_16::<true>(bytemuck::cast_slice(w), q, scales) }
        }
        Weights::BF16(w) => quantize_groups(|i| w[i].to_f32(), q, scales),
        Weights::F16(w) => quantize_groups(|i| w[i].to_f32(), q, scales),
        Weights::Q8(w) => quantize_groups(|i| w.get(i), q, scales),
    }
}

/// [`quantize_q8`] with input columns `cols` (ascending, distinct, under `row`, at most
/// [`Q8_KEEP_MAX`]) kept at 16 bits ([`Q8Keep`]): their int8 values are zero, their
/// groups' scales are taken over the other weights, and their values go to `vals` in
/// [`Q8Keep`]'s runs ([`q8_keep_len`] values, the last run's padding zero; rounded to
/// bf16: exact for bf16 weights). Each row is copied with its kept columns zeroed and
/// quantised with each group's scale as `fit` picks it ([`Q8Fit::Max`]: as
/// [`quantize_q8`] does). `cols` may be empty.
pub fn quantize_q8_keep(
    src: Weights<'_>,
    row: usize,
    cols: &[u32],
    fit: Q8Fit<'_>,
    q: &mut [i8],
    scales: &mut [bf16],
    vals: &mut [bf16],
) -> Result<(), KernelError> {
    let n = src.len();
    if let Some(reason) = keep_misfit(n, row, cols, vals.len()) {
        return Err(KernelError::Invalid {
            op: "quantize_q8",
            arg: "cols/vals",
            reason,
        });
    }
    if let Q8Fit::Search(Some(a)) = fit
        && (a.len() != row || a.iter().any(|v| !v.is_finite() || *v < 0.0))
    {
        return Err(KernelError::Invalid {
            op: "quantize_q8",
            arg: "importance",
            reason: format!(
                "need one finite, non-negative weight per column of the {row}-element rows; \
                 got {} values{}",
                a.len(),
                a.iter()
                    .position(|v| !v.is_finite() || *v < 0.0)
                    .map_or(String::new(), |j| format!(", {} at column {j}", a[j]))
            ),
        });
    }
    let rows = n / row;
    for r in 0..rows {
        for (j, &c) in cols.iter().enumerate() {
            let at = r * row + c as usize;
            let v = src.get(at);
            if !v.is_finite() {
                return Err(non_finite(v, at));
            }
            vals[keep_index(r, j, cols.len())] = bf16::from_f32(v);
        }
    }
    for r in rows..rows.next_multiple_of(Q8_KEEP_RUN) {
        for j in 0..cols.len() {
            vals[keep_index(r, j, cols.len())] = bf16::ZERO;
        }
    }
    // Row by row: the row in f32 (exact for 16-bit weights) with its kept columns
    // zeroed, in one reused buffer.
    let g = row / Q8_GROUP;
    let mut wrow = vec![0f32; row];
    for r in 0..rows {
        let at = r * row..(r + 1) * row;
        match src {
            Weights::F32(w) => wrow.copy_from_slice(&w[at.clone()]),
            Weights::BF16(w) => wrow
                .iter_mut()
                .zip(&w[at.clone()])
                .for_each(|(d, v)| *d = v.to_f32()),
            Weights::F16(w) => wrow
                .iter_mut()
                .zip(&w[at.clone()])
                .for_each(|(d, v)| *d = v.to_f32()),
            Weights::Q8(_) => wrow
                .iter_mut()
                .zip(at.clone())
                .for_each(|(d, i)| *d = src.get(i)),
        }
        for &c in cols {
            wrow[c as usize] = 0.0;
        }
        let (qr, sr) = (&mut q[at.clone()], &mut scales[r * g..][..g]);
        match fit {
            Q8Fit::Max => quantize_q8(Weights::F32(&wrow), qr, sr),
            Q8Fit::Search(a) => fit_row(&wrow, a, qr, sr),
        }
        .map_err(|e| {
            // Name the element in the whole tensor (the row's quantiser counts from 0).
            at.map(|i| (i, src.get(i)))
                .find(|(_, v)| !v.is_finite())
                .map_or(e, |(i, v)| non_finite(v, i))
        })?;
    }
    Ok(())
}

/// How [`quantize_q8_keep`] picks each group's scale.
#[derive(Debug, Clone, Copy)]
pub enum Q8Fit<'a> {
    /// max|w| / 127 rounded to the nearest bf16, each weight rounded to its nearest step
    /// ([`quantize_q8`]).
    Max,
    /// Searched per group: of the [`Q8_FIT_SCALES`] bf16 values nearest max|w| / m for
    /// m = 127, 126, ..., 96 (the first is [`Q8Fit::Max`]'s; the others put the largest
    /// weight at fewer, coarser steps, so no weight is clipped), the one under which the
    /// group's weights, each rounded to its nearest step (ties to even), have the least
    /// error
    /// `sum_j a_j (w_j - q_j s)^2` (the first such on ties). `a_j` is the importance of
    /// the weight's input column, `importance[j % row]` (its input's energy over some
    /// text: how much an error there moves the outputs), or 1 with `None`.
    ///
    /// On the default model this takes the logits' error from the bf16 model from
    /// 1.2e-2 to 0.8e-2 relative L2 (docs/benchmarks.md): the scale that lands the
    /// weights of the energetic columns nearest their steps beats the one that makes the
    /// steps smallest. The error sums run in f32 in a fixed order, so every build (the
    /// AVX-512, AVX2 and portable compilations of the same code) picks the same scale.
    Search(Option<&'a [f32]>),
}

/// Candidate scales per group under [`Q8Fit::Search`].
pub const Q8_FIT_SCALES: usize = 32;

/// `v` (finite, >= 0) rounded to the nearest bf16 (ties to even) in integer
/// operations, so loops of it vectorise: `bf16::from_f32(v).to_f32()` there.
#[inline(always)]
fn bf16_nearest(v: f32) -> f32 {
    let b = v.to_bits();
    f32::from_bits((b + 0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
}

/// [`Q8Fit::Search`]'s scale for one group: weights `w`, their importance `a`, max|w| =
/// `amax` (whose bf16 scale max|w| / 127 is normal).
#[inline(always)]
fn fit_group(w: &[f32; Q8_GROUP], a: &[f32; Q8_GROUP], amax: f32) -> f32 {
    const N: usize = Q8_FIT_SCALES;
    let mut s = [0f32; N];
    let mut inv = [0f32; N];
    for (k, (s, inv)) in s.iter_mut().zip(&mut inv).enumerate() {
        *s = bf16_nearest(amax / (127 - k) as f32);
        *inv = 1.0 / *s;
    }
    let mut err = [0f32; N];
    for (&wj, &aj) in w.iter().zip(a) {
        for k in 0..N {
            // |w / s| <= 127.25 (s >= max|w| / 127 within bf16 rounding), so the nearest
            // step is within +-127 without a clamp.
            let d = wj - (wj * inv[k]).round_ties_even() * s[k];
            err[k] += aj * (d * d);
        }
    }
    // The first candidate of the least error: the least value by a fixed tree of
    // minima (exact, so any order gives it), then its first position.
    let mut m = err;
    let mut half = N / 2;
    while half > 0 {
        for k in 0..half {
            m[k] = if m[k + half] < m[k] {
                m[k + half]
            } else {
                m[k]
            };
        }
        half /= 2;
    }
    let best = err.iter().position(|&e| e == m[0]).unwrap_or(0);
    s[best]
}

/// [`Q8Fit::Search`] over one row (whole groups; `a`, when given, one finite value >= 0
/// per element).
fn fit_row(
    w: &[f32],
    a: Option<&[f32]>,
    q: &mut [i8],
    scales: &mut [bf16],
) -> Result<(), KernelError> {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::cpu::dispatch::{Isa, current};
        let isa = current();
        // (The Avx512 path needs AVX-512F only; this build also takes VL, BW and DQ.)
        if isa >= Isa::Avx512
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
        {
            // SAFETY: the Avx512 path is only current when AVX-512F, AVX2 and FMA are
            // detected; VL, BW and DQ were just checked.
            return unsafe { fit_row_512(w, a, q, scales) };
        }
        if isa >= Isa::Avx2 {
            // SAFETY: the Avx2 path is only current when AVX2 and FMA are detected.
            return unsafe { fit_row_avx2(w, a, q, scales) };
        }
    }
    fit_row_any(w, a, q, scales)
}

target_builds!(
    fit_row_any(
        w: &[f32],
        a: Option<&[f32]>,
        q: &mut [i8],
        scales: &mut [bf16],
    ) -> Result<(), KernelError>;
    fit_row_512 = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma",
    fit_row_avx2 = "avx2,fma",
);

/// [`fit_row`]'s body, compiled into each build.
#[inline(always)]
fn fit_row_any(
    w: &[f32],
    a: Option<&[f32]>,
    q: &mut [i8],
    scales: &mut [bf16],
) -> Result<(), KernelError> {
    const ONES: [f32; Q8_GROUP] = [1.0; Q8_GROUP];
    for (g, (qg, s)) in q
        .chunks_exact_mut(Q8_GROUP)
        .zip(scales.iter_mut())
        .enumerate()
    {
        let wg: &[f32; Q8_GROUP] = w[g * Q8_GROUP..][..Q8_GROUP]
            .try_into()
            .expect("a whole group");
        let ag: &[f32; Q8_GROUP] = a.map_or(&ONES, |a| {
            a[g * Q8_GROUP..][..Q8_GROUP]
                .try_into()
                .expect("a whole group")
        });
        // Magnitudes' bits: all-ones exponents are the non-finite; the rest order as
        // the values do.
        let mag = wg.map(|v| v.to_bits() & 0x7fff_ffff);
        if mag.iter().any(|&b| b >= 0x7f80_0000) {
            let j = wg.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Err(non_finite(wg[j], g * Q8_GROUP + j));
        }
        let amax = f32::from_bits(mag.into_iter().max().unwrap_or(0));
        if q8_scale(amax / 127.0).to_f32() < f32::MIN_POSITIVE {
            // Subnormal (or zero) scales: as [`Q8Fit::Max`].
            quantize_groups(|i| wg[i], qg, std::slice::from_mut(s))?;
            continue;
        }
        let scale = fit_group(wg, ag, amax);
        *s = bf16::from_f32(scale);
        let inv = 1.0 / scale;
        for (d, &b) in qg.iter_mut().zip(wg) {
            let r = (b * inv).round_ties_even().clamp(-127.0, 127.0);
            // SAFETY: r is finite and within +-127 (w finite, inv finite).
            *d = unsafe { r.to_int_unchecked::<i32>() } as i8;
        }
    }
    Ok(())
}

/// Element `i` of the source is `get(i)`; `q` and `scales` were checked to match it.
fn quantize_groups(
    get: impl Fn(usize) -> f32,
    q: &mut [i8],
    scales: &mut [bf16],
) -> Result<(), KernelError> {
    let mut buf = [0f32; Q8_GROUP];
    for (g, (qg, s)) in q
        .chunks_exact_mut(Q8_GROUP)
        .zip(scales.iter_mut())
        .enumerate()
    {
        let mut amax = 0f32;
        let mut finite = true;
        for (j, b) in buf.iter_mut().enumerate() {
            *b = get(g * Q8_GROUP + j);
            finite &= b.is_finite();
            amax = amax.max(b.abs());
        }
        if !finite {
            let j = buf.iter().position(|b| !b.is_finite()).unwrap_or(0);
            return Err(non_finite(buf[j], g * Q8_GROUP + j));
        }
        *s = q8_scale(amax / 127.0);
        let scale = s.to_f32();
        if scale >= f32::MIN_POSITIVE {
            let inv = 1.0 / scale;
            for (d, &b) in qg.iter_mut().zip(&buf) {
                // Round half away from zero without a libm call (|b * inv| <= 127).
                let r = b * inv;
                *d = ((r + 0.5f32.copysign(r)) as i32).clamp(-127, 127) as i8;
            }
        } else {
            // A subnormal scale (or 0): its inverse in f64, where it is finite.
            let inv = if scale > 0.0 { 1.0 / scale as f64 } else { 0.0 };
            for (d, &b) in qg.iter_mut().zip(&buf) {
                let r = b as f64 * inv;
                *d = ((r + 0.5f64.copysign(r)) as i32).clamp(-127, 127) as i8;
            }
        }
    }
    Ok(())
}

/// The error for the non-finite weight `v` at element `at` of the tensor.
fn non_finite(v: f32, at: usize) -> KernelError {
    KernelError::Invalid {
        op: "quantize_q8",
        arg: "src",
        reason: format!("non-finite weight {v} at element {at}"),
    }
}

/// [`quantize_groups`] for bf16 and f16 weights with AVX2, the same values: each group's
/// 16 weights widened in two vectors, their magnitude's maximum and finiteness taken in
/// registers, the scale as the scalar code makes it, then `round(w / scale)` (half away
/// from zero) in registers and narrowed to int8. Groups with a subnormal scale go
/// through the scalar code.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    use super::{Q8_GROUP, non_finite, q8_scale, quantize_groups};
    use crate::error::KernelError;

    /// `w` holds bf16 bits, or f16 bits if `F16`.
    ///
    /// SAFETY: AVX2 and F16C; `q.len() == w.len() == scales.len() * Q8_GROUP`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn quantize_16<const F16: bool>(
        w: &[u16],
        q: &mut [i8],
        scales: &mut [bf16],
    ) -> Result<(), KernelError> {
        let get = |v: u16| {
            if F16 {
                f16::from_bits(v).to_f32()
            } else {
                bf16::from_bits(v).to_f32()
            }
        };
        const _: () = assert!(Q8_GROUP == 16);
        let sign = _mm256_set1_ps(-0.0);
        let exp = _mm256_set1_epi32(0x7f80_0000);
        for (g, (qg, s)) in q
            .chunks_exact_mut(Q8_GROUP)
            .zip(scales.iter_mut())
            .enumerate()
        {
            let wg = &w[g * Q8_GROUP..][..Q8_GROUP];
            // SAFETY: 16 bf16 (32 bytes) at wg; 16 bytes written to qg.
            unsafe {
                let raw = _mm256_loadu_si256(wg.as_ptr() as *const __m256i);
                let (r0, r1) = (
                    _mm256_castsi256_si128(raw),
                    _mm256_extracti128_si256::<1>(raw),
                );
                let (v0, v1) = if F16 {
                    (_mm256_cvtph_ps(r0), _mm256_cvtph_ps(r1))
                } else {
                    let lo = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(r0));
                    let hi = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(r1));
                    (_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi))
                };
                // Non-finite: an all-ones exponent in any lane.
                let e0 = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v0), exp), exp);
                let e1 = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v1), exp), exp);
                if _mm256_testz_si256(_mm256_or_si256(e0, e1), _mm256_or_si256(e0, e1)) == 0 {
                    let j = wg.iter().position(|&v| !get(v).is_finite()).unwrap_or(0);
                    return Err(non_finite(get(wg[j]), g * Q8_GROUP + j));
                }
                let m = _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1));
                let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                let m = _mm_max_ss(m, _mm_movehdup_ps(m));
                let amax = _mm_cvtss_f32(m);
                *s = q8_scale(amax / 127.0);
                let scale = s.to_f32();
                if scale < f32::MIN_POSITIVE {
                    quantize_groups(|i| get(wg[i]), qg, std::slice::from_mut(s))?;
                    continue;
                }
                let inv = _mm256_set1_ps(1.0 / scale);
                let half = _mm256_set1_ps(0.5);
                let round = |v: __m256| {
                    let r = _mm256_mul_ps(v, inv);
                    let h = _mm256_or_ps(half, _mm256_and_ps(sign, r));
                    _mm256_cvttps_epi32(_mm256_add_ps(r, h))
                };
                let (i0, i1) = (round(v0), round(v1));
                // |i| <= 127: the narrowing saturates nothing. packs interleave 128-bit
                // lanes: (i0.lo, i1.lo, i0.hi, i1.hi) as words, then bytes.
                let w16 = _mm256_packs_epi32(i0, i1);
                let w16 = _mm256_permute4x64_epi64::<0b11_01_10_00>(w16);
                let b8 = _mm_packs_epi16(
                    _mm256_castsi256_si128(w16),
                    _mm256_extracti128_si256::<1>(w16),
                );
                _mm_storeu_si128(qg.as_mut_ptr() as *mut __m128i, b8);
            }
        }
        Ok(())
    }
}

/// `v` (finite, >= 0) rounded to the nearest bf16 (relative error <= 2^-9, so a
/// group's largest weight is 127 steps), or up where that is subnormal (fixed steps of
/// 2^-133: the least bf16 >= v, so it is at most 127 steps).
fn q8_scale(v: f32) -> bf16 {
    let b = bf16::from_f32(v);
    if b.to_f32() >= v || b.to_f32() >= f32::MIN_POSITIVE {
        b
    } else {
        bf16::from_bits(b.to_bits() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_roundtrip_error_is_bounded_by_half_a_step() {
        let w: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let mut q = vec![0i8; 96];
        let mut s = vec![bf16::ZERO; 6];
        quantize_q8(Weights::F32(&w), &mut q, &mut s).unwrap();
        let qs = Q8Slice::new(&q, &s).unwrap();
        for (i, &v) in w.iter().enumerate() {
            let step = s[i / Q8_GROUP].to_f32();
            assert!((qs.get(i) - v).abs() <= 0.5 * step * (1.0 + 1e-6), "{i}");
        }
        // Each scale is max|w| / 127 rounded to the nearest bf16, so the largest magnitude
        // of a group is 127 steps.
        for (g, sc) in s.iter().enumerate() {
            let amax = w[g * Q8_GROUP..][..Q8_GROUP]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(*sc, bf16::from_f32(amax / 127.0), "{g}");
            let qmax = q[g * Q8_GROUP..][..Q8_GROUP].iter().map(|v| v.abs()).max();
            assert_eq!(qmax, Some(127), "{g}");
        }
        let sliced = Weights::Q8(qs).slice(32, 64);
        assert_eq!(sliced.len(), 64);
        assert_eq!(sliced.get(0), qs.get(32));
        assert_eq!(Weights::Q8(qs).bytes(), 96 + 12);
    }

    /// A group whose scale is a bf16 subnormal (max|w| / 127 under 1.2e-38) keeps its
    /// shape: the scale's inverse, over f32's range there, is taken in f64.
    #[test]
    fn q8_tiny_groups_quantise_in_proportion() {
        let w: Vec<f32> = (0..16).map(|i| (i as f32 - 8.0) * 1.25e-38).collect();
        let mut q = [0i8; 16];
        let mut s = [bf16::ZERO; 1];
        quantize_q8(Weights::F32(&w), &mut q, &mut s).unwrap();
        assert!(s[0].to_f32() > 0.0 && s[0].to_f32() < f32::MIN_POSITIVE);
        assert!(1.0 / s[0].to_f32() == f32::INFINITY);
        assert!(q[0] <= -100, "{q:?}");
        assert_eq!(q[8], 0);
        assert!((q[12] as i32 * 2 + q[0] as i32).abs() <= 2, "{q:?}");
        assert!(q.windows(2).all(|p| p[0] < p[1]), "{q:?}");
        // A subnormal max|w| / 127 of 8.4 bf16 units rounds up to 9 units, not to the
        // nearest 8 (which would put max|w| 133 steps out and clip it): every weight
        // stays within half a step.
        let unit = f32::from_bits(1 << 16) as f64; // 2^-133, the least bf16 subnormal
        let amax = 127.0 * 8.4 * unit;
        let w: Vec<f32> = (0..16)
            .map(|i| ((i as f64 - 8.0) / 8.0 * amax) as f32)
            .collect();
        quantize_q8(Weights::F32(&w), &mut q, &mut s).unwrap();
        assert_eq!(s[0].to_bits(), 9);
        let step = s[0].to_f32() as f64;
        for (&v, &qi) in w.iter().zip(&q) {
            assert!(
                (v as f64 - qi as f64 * step).abs() <= 0.5 * step * (1.0 + 1e-6),
                "{v} {qi}"
            );
        }
    }

    /// The AVX2 quantiser gives the scalar code's values and scales bit for bit, over
    /// magnitudes from bf16 subnormals to 1e3, all-zero groups, ties and signed zeros,
    /// and its error for a non-finite weight names the same element. (Skipped, with a
    /// note, where the CPU lacks AVX2.)
    #[test]
    fn q8_avx2_quantiser_matches_the_scalar_one() {
        if !crate::cpu::dispatch::has_avx2() {
            eprintln!("skipped: this CPU lacks AVX2");
            return;
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let groups = 4000;
        let mut w = Vec::with_capacity(groups * Q8_GROUP);
        for g in 0..groups {
            let mag = 10f64.powf(-40.0 + 43.0 * rnd());
            for j in 0..Q8_GROUP {
                let v = match g % 7 {
                    0 => 0.0,
                    1 if j % 2 == 0 => -0.0,
                    // Ties: multiples of half a step of a power-of-two scale.
                    2 => (j as f64 - 8.0) * 0.5,
                    _ => (2.0 * rnd() - 1.0) * mag,
                };
                w.push(bf16::from_f64(v));
            }
        }
        let n = w.len();
        // The same values as f16 (its own subnormals and overflow to infinity aside:
        // magnitudes over 65504 become infinities, which are errors, so they are capped).
        let wh: Vec<f16> = w
            .iter()
            .map(|v| f16::from_f32(v.to_f32().clamp(-6e4, 6e4)))
            .collect();
        let (mut q1, mut s1) = (vec![0i8; n], vec![bf16::ZERO; groups]);
        let (mut q2, mut s2) = (vec![0i8; n], vec![bf16::ZERO; groups]);
        quantize_q8(Weights::BF16(&w), &mut q1, &mut s1).unwrap();
        quantize_groups(|i| w[i].to_f32(), &mut q2, &mut s2).unwrap();
        assert!(s1.iter().zip(&s2).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(q1, q2);
        quantize_q8(Weights::F16(&wh), &mut q1, &mut s1).unwrap();
        quantize_groups(|i| wh[i].to_f32(), &mut q2, &mut s2).unwrap();
        assert!(s1.iter().zip(&s2).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(q1, q2);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut wb = w.clone();
            wb[1234] = bf16::from_f32(bad);
            let e1 = quantize_q8(Weights::BF16(&wb), &mut q1, &mut s1).unwrap_err();
            let e2 = quantize_groups(|i| wb[i].to_f32(), &mut q2, &mut s2).unwrap_err();
            assert_eq!(e1.to_string(), e2.to_string());
            assert!(e1.to_string().contains("element 1234"), "{e1}");
            let mut whb = wh.clone();
            whb[777] = f16::from_f32(bad);
            let e1 = quantize_q8(Weights::F16(&whb), &mut q1, &mut s1).unwrap_err();
            assert!(e1.to_string().contains("element 777"), "{e1}");
        }
    }

    #[test]
    fn q8_bad_shapes_and_values_are_typed_errors() {
        let w = [1.0f32; 40];
        let mut q = [0i8; 40];
        let mut s = [bf16::ZERO; 3];
        assert!(quantize_q8(Weights::F32(&w), &mut q, &mut s).is_err());
        assert!(Q8Slice::new(&q[..32], &s).is_err());
        assert!(Q8Slice::new(&q[..17], &s[..1]).is_err());
        let mut w2 = [0.5f32; 16];
        w2[3] = f32::NAN;
        let err = quantize_q8(Weights::F32(&w2), &mut q[..16], &mut s[..1]).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
        // An all-zero group.
        quantize_q8(Weights::F32(&[0.0; 16]), &mut q[..16], &mut s[..1]).unwrap();
        assert_eq!(s[0].to_f32(), 0.0);
        assert!(q[..16].iter().all(|&v| v == 0));
        assert!(
            Weights::Q8(Q8Slice::new(&q[..16], &s[..1]).unwrap())
                .check_rows("t", 17)
                .is_err()
        );
    }
}
