//! Row-wise ops (RMSNorm, SwiGLU, RoPE, residual add) split across the worker pool when
//! the call is big enough (prefill, batched decode): each chunk of rows runs the scalar
//! reference on its own rows, so the results are bit-identical to the reference; small
//! calls (one decode row) run inline, where a fork/join would cost more than the op.
//! Shapes are checked for the whole call before any chunk runs.

use super::dispatch::num_threads;
use super::pool;
use crate::error::KernelError;
use crate::error::check_len;
use crate::reference;
use crate::weights::Weights;

/// Elements below which a call runs inline on the calling thread.
const MIN_PARALLEL: usize = 1 << 15;

/// Run `f(first_unit, units)` over `n` units of `unit` elements each, in chunks claimed
/// by the pool's threads; the first error wins.
fn split(
    n: usize,
    unit: usize,
    f: &(dyn Fn(usize, usize) -> Result<(), KernelError> + Sync),
) -> Result<(), KernelError> {
    let threads = num_threads();
    if n * unit < MIN_PARALLEL || threads < 2 || n < 2 {
        return f(0, n);
    }
    let per = n.div_ceil(threads * 4).max(1);
    let items = n.div_ceil(per);
    let err = std::sync::Mutex::new(None);
    pool::global().run_items(threads, items, &|i| {
        let start = i * per;
        let len = per.min(n - start);
        if let Err(e) = f(start, len) {
            let mut slot = err.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(e);
        }
    });
    match err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A `*mut f32` handed to pool participants that write disjoint ranges.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: only used to give each chunk its own disjoint sub-slice of one buffer.
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

impl Out {
    /// Elements `start..start + len` of the buffer.
    ///
    /// SAFETY: the range lies inside the buffer, which outlives the use, and no other
    /// chunk touches it.
    unsafe fn range<'a>(self, start: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: forwarded.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

/// Same contract as [`reference::rmsnorm::rmsnorm_forward`].
pub fn rmsnorm_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: Weights<'_>,
    eps: f32,
) -> Result<(), KernelError> {
    let c = weight.len();
    if c == 0 || !inp.len().is_multiple_of(c) || out.len() != inp.len() {
        // The reference names the problem.
        return reference::rmsnorm::rmsnorm_forward(out, inp, weight, eps);
    }
    let o = Out(out.as_mut_ptr());
    split(inp.len() / c, c, &|r, n| {
        // SAFETY: rows r..r+n of `out`, disjoint per chunk, inside out (checked above).
        let out = unsafe { o.range(r * c, n * c) };
        reference::rmsnorm::rmsnorm_forward(out, &inp[r * c..(r + n) * c], weight, eps)
    })
}

/// Same contract as [`reference::swiglu::swiglu_forward`].
pub fn swiglu_forward(out: &mut [f32], gate: &[f32], up: &[f32]) -> Result<(), KernelError> {
    const OP: &str = "swiglu_forward";
    check_len(OP, "gate", gate.len(), out.len())?;
    check_len(OP, "up", up.len(), out.len())?;
    const UNIT: usize = 256;
    let n = out.len();
    let o = Out(out.as_mut_ptr());
    split(n.div_ceil(UNIT), UNIT, &|u, k| {
        let (s, e) = (u * UNIT, ((u + k) * UNIT).min(n));
        // SAFETY: elements s..e of `out`, disjoint per chunk, e <= out.len().
        let out = unsafe { o.range(s, e - s) };
        reference::swiglu::swiglu_forward(out, &gate[s..e], &up[s..e])
    })
}

/// Same contract as [`reference::residual::residual_forward`].
pub fn residual_forward(acc: &mut [f32], x: &[f32]) -> Result<(), KernelError> {
    check_len("residual_forward", "x", x.len(), acc.len())?;
    const UNIT: usize = 256;
    let n = acc.len();
    let o = Out(acc.as_mut_ptr());
    split(n.div_ceil(UNIT), UNIT, &|u, k| {
        let (s, e) = (u * UNIT, ((u + k) * UNIT).min(n));
        // SAFETY: elements s..e of `acc`, disjoint per chunk, e <= acc.len().
        let acc = unsafe { o.range(s, e - s) };
        reference::residual::residual_forward(acc, &x[s..e])
    })
}

/// Same contract as [`reference::rope::rope_forward`].
pub fn rope_forward(
    x: &mut [f32],
    positions: &[u32],
    n_heads: usize,
    head_dim: usize,
    inv_freq: &[f32],
) -> Result<(), KernelError> {
    let row = n_heads * head_dim;
    if head_dim == 0
        || !head_dim.is_multiple_of(2)
        || inv_freq.len() != head_dim / 2
        || x.len() != positions.len() * row
        || row == 0
    {
        // The reference names the problem (or has nothing to do).
        return reference::rope::rope_forward(x, positions, n_heads, head_dim, inv_freq);
    }
    let o = Out(x.as_mut_ptr());
    split(positions.len(), row, &|t, n| {
        // SAFETY: rows t..t+n of `x`, disjoint per chunk, inside x (checked above).
        let x = unsafe { o.range(t * row, n * row) };
        reference::rope::rope_forward(x, &positions[t..t + n], n_heads, head_dim, inv_freq)
    })
}
