//! Safe launch wrappers, one per kernel entry point, and the cuBLAS bf16 GEMM.
//!
//! Each wrapper takes device buffers (any cudarc `CudaSlice` / view), index buffers
//! ([`IndexBuf`], validated through their host copy) and shapes, turns them into
//! [`Buf`]s / [`Idx`]s and asks [`super::launch`] for the checked launch (same rules as
//! the CPU reference in `reference/`; the launch configuration of the kernel's `.cu`
//! header). A call with no work launches nothing. Errors are [`CudaError::BadArgument`] /
//! [`CudaError::Length`] / [`CudaError::TokenOutOfRange`] before any launch, or
//! [`CudaError::Driver`] from the launch itself (a fault inside a kernel surfaces at the
//! next synchronisation).

use cudarc::cublas::{result as blas_result, sys as blas_sys};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;

use super::device::{CudaDevice, IndexBuf, blas_call};
use super::error::{CudaError, check_len};
use super::launch::{self, Buf, Idx, LaunchSpec, PlanAddrs};
use super::plan::WorkPlan;
use crate::reference::attention_paged::PagedShape;

/// A [`WorkPlan`] uploaded to the device, checked on upload ([`launch::check_plan`]).
#[derive(Debug)]
pub struct DevicePlan {
    plan: WorkPlan,
    tables: IndexBuf,
    items: IndexBuf,
    merge_offsets: IndexBuf,
    merge_slots: IndexBuf,
    /// Largest block id any item reads (None without items).
    max_block: Option<u32>,
}

impl DevicePlan {
    pub fn plan(&self) -> &WorkPlan {
        &self.plan
    }
}

/// Output element types of [`CudaDevice::gemm_bf16`].
pub trait GemmOut: cudarc::driver::DeviceRepr {
    const DATA_TYPE: blas_sys::cudaDataType;
}

impl GemmOut for f32 {
    const DATA_TYPE: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_32F;
}

impl GemmOut for bf16 {
    const DATA_TYPE: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_16BF;
}

impl IndexBuf {
    fn idx(&self, dev: &CudaDevice) -> Idx<'_> {
        Idx {
            host: self.host(),
            addr: self.addr(&dev.stream),
        }
    }
}

impl DevicePlan {
    fn addrs(&self, dev: &CudaDevice) -> PlanAddrs {
        PlanAddrs {
            tables: self.tables.addr(&dev.stream),
            items: self.items.addr(&dev.stream),
            merge_offsets: self.merge_offsets.addr(&dev.stream),
            merge_slots: self.merge_slots.addr(&dev.stream),
        }
    }
}

/// A read-only device buffer's address and length (the guard must outlive the launch).
macro_rules! rd {
    ($dev:expr, $x:expr) => {{
        let len = $x.len();
        let (addr, guard) = $x.device_ptr(&$dev.stream);
        (Buf { addr, len }, guard)
    }};
}

/// A written device buffer's address and length.
macro_rules! wr {
    ($dev:expr, $x:expr) => {{
        let len = $x.len();
        let (addr, guard) = $x.device_ptr_mut(&$dev.stream);
        (Buf { addr, len }, guard)
    }};
}

impl CudaDevice {
    fn run(&self, spec: Option<LaunchSpec>) -> Result<(), CudaError> {
        match spec {
            Some(s) => self.launch(s.kernel, s.grid, s.block, &s.args),
            None => Ok(()),
        }
    }

    /// `embedding_bf16`: out[t, :] = f32(table[ids[t], :]). Every id is checked against
    /// V on the host first (as `reference::embedding::embedding_forward` does).
    ///
    /// - `out`: (T, C) f32; `table`: (V, C) bf16; `ids`: (T)
    pub fn embedding(
        &self,
        out: &mut impl DevicePtrMut<f32>,
        table: &impl DevicePtr<bf16>,
        ids: &IndexBuf,
        channels: usize,
    ) -> Result<(), CudaError> {
        let (o, _go) = wr!(self, out);
        let (t, _gt) = rd!(self, table);
        self.run(launch::embedding(o, t, ids.idx(self), channels, true, 0)?)
    }

    /// `embedding_bf16` without the host id check: an id >= V writes a zero row and the
    /// kernel stores (first position seen + 1) into `error` (cleared here first); read it
    /// with [`CudaDevice::embedding_error`].
    pub fn embedding_flagged(
        &self,
        out: &mut impl DevicePtrMut<f32>,
        table: &impl DevicePtr<bf16>,
        ids: &IndexBuf,
        channels: usize,
        error: &mut CudaSlice<u32>,
    ) -> Result<(), CudaError> {
        check_len("embedding_flagged", "error", error.len(), 1)?;
        self.write(error, &[0])?;
        let (e, _ge) = wr!(self, error);
        let (o, _go) = wr!(self, out);
        let (t, _gt) = rd!(self, table);
        self.run(launch::embedding(
            o,
            t,
            ids.idx(self),
            channels,
            false,
            e.addr,
        )?)
    }

    /// The error flag of [`CudaDevice::embedding_flagged`], as a typed error.
    pub fn embedding_error(&self, error: &CudaSlice<u32>, vocab: usize) -> Result<(), CudaError> {
        let v = self.download(error)?;
        match v.first() {
            Some(&p) if p > 0 => Err(CudaError::TokenOutOfRange {
                position: p as usize - 1,
                vocab,
            }),
            _ => Ok(()),
        }
    }

    /// `rmsnorm_bf16`: out = weight * x / sqrt(mean(x^2) + eps) per row.
    ///
    /// - `out`: (N, C) bf16; `inp`: (N, C) f32; `weight`: (C) bf16
    pub fn rmsnorm(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        inp: &impl DevicePtr<f32>,
        weight: &impl DevicePtr<bf16>,
        eps: f32,
    ) -> Result<(), CudaError> {
        let (o, _go) = wr!(self, out);
        let (i, _gi) = rd!(self, inp);
        let (w, _gw) = rd!(self, weight);
        self.run(launch::rmsnorm(o, i, w, eps)?)
    }

    /// `residual_rmsnorm_bf16`: resid += delta, then out = rmsnorm(resid) * weight.
    ///
    /// - `resid`: (N, C) f32 in/out; `delta`, `out`: (N, C) bf16; `weight`: (C) bf16
    pub fn residual_rmsnorm(
        &self,
        resid: &mut impl DevicePtrMut<f32>,
        delta: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
        weight: &impl DevicePtr<bf16>,
        eps: f32,
    ) -> Result<(), CudaError> {
        let (r, _gr) = wr!(self, resid);
        let (d, _gd) = rd!(self, delta);
        let (o, _go) = wr!(self, out);
        let (w, _gw) = rd!(self, weight);
        self.run(launch::residual_rmsnorm(r, d, o, w, eps)?)
    }

    /// `rope_qkv_paged_bf16`: RoPE on the Q and K heads of each token's QKV row; rotated
    /// queries to `q_out`, rotated K and plain V into the token's cache slot.
    ///
    /// - `q_out`: (T, NH, HS) bf16
    /// - `k_arena`, `v_arena`: (NB, BS, NKV, HS) bf16
    /// - `qkv`: (T, ld_qkv) bf16, Q | K | V at columns 0, NH*HS, (NH+NKV)*HS
    /// - `positions`, `token_seq`: (T); `block_tables`: (n_seqs, ld_table)
    /// - `inv_freq`: (HS/2) f32
    #[allow(clippy::too_many_arguments)]
    pub fn rope_qkv_paged(
        &self,
        q_out: &mut impl DevicePtrMut<bf16>,
        k_arena: &mut impl DevicePtrMut<bf16>,
        v_arena: &mut impl DevicePtrMut<bf16>,
        qkv: &impl DevicePtr<bf16>,
        positions: &IndexBuf,
        token_seq: &IndexBuf,
        block_tables: &IndexBuf,
        ld_table: usize,
        inv_freq: &impl DevicePtr<f32>,
        ld_qkv: usize,
        shape: PagedShape,
    ) -> Result<(), CudaError> {
        let (q, _gq) = wr!(self, q_out);
        let (k, _gk) = wr!(self, k_arena);
        let (v, _gv) = wr!(self, v_arena);
        let (x, _gx) = rd!(self, qkv);
        let (f, _gf) = rd!(self, inv_freq);
        self.run(launch::rope_qkv_paged(
            q,
            k,
            v,
            x,
            positions.idx(self),
            token_seq.idx(self),
            block_tables.idx(self),
            ld_table,
            f,
            ld_qkv,
            shape,
        )?)
    }

    /// `paged_decode_attention_bf16_hs{64,128}`: each sequence's one query attends its
    /// positions 0..seq_lens[b] (as `reference::attention_paged::paged_decode_attention`).
    ///
    /// - `out`, `q`: (B, NH, HS) bf16; `k_arena`, `v_arena`: (NB, BS, NKV, HS) bf16
    /// - `block_tables`: (B, ld_table); `seq_lens`: (B)
    #[allow(clippy::too_many_arguments)]
    pub fn paged_decode_attention(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        q: &impl DevicePtr<bf16>,
        k_arena: &impl DevicePtr<bf16>,
        v_arena: &impl DevicePtr<bf16>,
        block_tables: &IndexBuf,
        ld_table: usize,
        seq_lens: &IndexBuf,
        shape: PagedShape,
    ) -> Result<(), CudaError> {
        let (o, _go) = wr!(self, out);
        let (qb, _gq) = rd!(self, q);
        let (k, _gk) = rd!(self, k_arena);
        let (v, _gv) = rd!(self, v_arena);
        self.run(launch::paged_decode_attention(
            o,
            qb,
            k,
            v,
            block_tables.idx(self),
            ld_table,
            seq_lens.idx(self),
            shape,
        )?)
    }

    /// `flash_prefill_bf16_hs*`: causal prefill attention of T tokens of one sequence
    /// (positions pos0 .. pos0 + T, their K/V already in the cache) on the tensor cores.
    ///
    /// - `out`, `q`: (T, NH, HS) bf16; `table`: the sequence's block ids
    #[allow(clippy::too_many_arguments)]
    pub fn flash_prefill(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        q: &impl DevicePtr<bf16>,
        k_arena: &impl DevicePtr<bf16>,
        v_arena: &impl DevicePtr<bf16>,
        table: &IndexBuf,
        pos0: usize,
        t: usize,
        shape: PagedShape,
    ) -> Result<(), CudaError> {
        let (o, _go) = wr!(self, out);
        let (qb, _gq) = rd!(self, q);
        let (k, _gk) = rd!(self, k_arena);
        let (v, _gv) = rd!(self, v_arena);
        self.run(launch::flash_prefill(
            o,
            qb,
            k,
            v,
            table.idx(self),
            pos0,
            t,
            shape,
        )?)
    }

    /// Uploads a work plan after checking its internal consistency.
    pub fn upload_plan(&self, plan: WorkPlan) -> Result<DevicePlan, CudaError> {
        let max_block = launch::check_plan(&plan)?;
        Ok(DevicePlan {
            tables: self.upload_index(&plan.tables)?,
            items: self.upload_index(&plan.item_rows())?,
            merge_offsets: self.upload_index(&plan.merge_offsets)?,
            merge_slots: self.upload_index(&plan.merge_slots)?,
            max_block,
            plan,
        })
    }

    /// Replaces an uploaded plan's contents with `plan` (checked as by `upload_plan`),
    /// reusing its device buffers when large enough.
    pub fn refill_plan(&self, dp: &mut DevicePlan, plan: WorkPlan) -> Result<(), CudaError> {
        let max_block = launch::check_plan(&plan)?;
        self.refill_index(&mut dp.tables, &plan.tables)?;
        self.refill_index(&mut dp.items, &plan.item_rows())?;
        self.refill_index(&mut dp.merge_offsets, &plan.merge_offsets)?;
        self.refill_index(&mut dp.merge_slots, &plan.merge_slots)?;
        dp.max_block = max_block;
        dp.plan = plan;
        Ok(())
    }

    /// `attention_partial_bf16_hs{64,128}`: every work item of `plan`, writing attention
    /// states (normalised o and natural-log lse) into its slots.
    ///
    /// - `states_o`: (n_slots, NH, HS) f32 (or longer); `states_lse`: (n_slots, NH) f32
    /// - `q`: (B, NH, HS) bf16; `k_arena`, `v_arena`: (NB, BS, NKV, HS) bf16
    #[allow(clippy::too_many_arguments)]
    pub fn attention_partial(
        &self,
        states_o: &mut impl DevicePtrMut<f32>,
        states_lse: &mut impl DevicePtrMut<f32>,
        q: &impl DevicePtr<bf16>,
        k_arena: &impl DevicePtr<bf16>,
        v_arena: &impl DevicePtr<bf16>,
        plan: &DevicePlan,
        shape: PagedShape,
    ) -> Result<(), CudaError> {
        let (so, _gso) = wr!(self, states_o);
        let (sl, _gsl) = wr!(self, states_lse);
        let (qb, _gq) = rd!(self, q);
        let (k, _gk) = rd!(self, k_arena);
        let (v, _gv) = rd!(self, v_arena);
        self.run(launch::attention_partial(
            so,
            sl,
            qb,
            k,
            v,
            &plan.plan,
            plan.max_block,
            plan.addrs(self),
            shape,
        )?)
    }

    /// `attention_merge_states_bf16`: out[b, h] = log-sum-exp merge of sequence b's
    /// states (no states, or all empty, gives a zero row).
    ///
    /// - `out`: (B, NH, HS) bf16; `states_o`: (n_slots, NH, HS); `states_lse`: (n_slots, NH)
    pub fn attention_merge_states(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        states_o: &impl DevicePtr<f32>,
        states_lse: &impl DevicePtr<f32>,
        plan: &DevicePlan,
        shape: PagedShape,
    ) -> Result<(), CudaError> {
        let (o, _go) = wr!(self, out);
        let (so, _gso) = rd!(self, states_o);
        let (sl, _gsl) = rd!(self, states_lse);
        self.run(launch::attention_merge_states(
            o,
            so,
            sl,
            &plan.plan,
            plan.addrs(self),
            shape,
        )?)
    }

    /// Partial + merge: cascade decode, split-K decode or causal prefill, as planned.
    /// `states_o` / `states_lse` are the scratch of the partial pass.
    #[allow(clippy::too_many_arguments)]
    pub fn planned_attention(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        q: &impl DevicePtr<bf16>,
        k_arena: &impl DevicePtr<bf16>,
        v_arena: &impl DevicePtr<bf16>,
        plan: &DevicePlan,
        states_o: &mut CudaSlice<f32>,
        states_lse: &mut CudaSlice<f32>,
        shape: PagedShape,
    ) -> Result<(), CudaError> {
        self.attention_partial(states_o, states_lse, q, k_arena, v_arena, plan, shape)?;
        self.attention_merge_states(out, states_o, states_lse, plan, shape)
    }

    /// `swiglu_bf16`: out = silu(gate) * up, rows of I; gate and up are rows of stride
    /// `ld_in` (a fused gate|up GEMM output: gate = base, up = base + I, ld_in = 2I).
    ///
    /// - `out`: (N, I) bf16; `gate`, `up`: at least (N - 1) * ld_in + I bf16
    pub fn swiglu(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        gate: &impl DevicePtr<bf16>,
        up: &impl DevicePtr<bf16>,
        n_rows: usize,
        inter: usize,
        ld_in: usize,
    ) -> Result<(), CudaError> {
        let (o, _go) = wr!(self, out);
        let (g, _gg) = rd!(self, gate);
        let (u, _gu) = rd!(self, up);
        self.run(launch::swiglu(o, g, u, n_rows, inter, ld_in)?)
    }

    /// `reward_linear_bf16`: rewards[i] = w . hidden[row_i] + b.
    ///
    /// - `rewards`: (R) f32; `hidden`: bf16 rows of stride `ld_hidden`; `rows`: (R) hidden
    ///   rows to score, or None for rows 0..R; `w`: (C) bf16
    pub fn reward_linear(
        &self,
        rewards: &mut impl DevicePtrMut<f32>,
        hidden: &impl DevicePtr<bf16>,
        ld_hidden: usize,
        rows: Option<&IndexBuf>,
        w: &impl DevicePtr<bf16>,
        b: f32,
    ) -> Result<(), CudaError> {
        let (r, _gr) = wr!(self, rewards);
        let (h, _gh) = rd!(self, hidden);
        let (wb, _gw) = rd!(self, w);
        self.run(launch::reward_linear(
            r,
            h,
            ld_hidden,
            rows.map(|x| x.idx(self)),
            wb,
            b,
        )?)
    }

    /// `reward_dense_tanh_bf16`: z[i, o] = tanh(W_dense[o, :] . hidden[row_i] + b_dense[o]).
    ///
    /// - `z`: (R, C) f32; `hidden`: bf16 rows of stride `ld_hidden` (C and ld_hidden
    ///   multiples of 8); `rows`: (R) or None for rows 0..R
    /// - `dense_w`: (C, C) bf16; `dense_b`: (C) f32
    pub fn reward_dense_tanh(
        &self,
        z: &mut impl DevicePtrMut<f32>,
        hidden: &impl DevicePtr<bf16>,
        ld_hidden: usize,
        rows: Option<&IndexBuf>,
        dense_w: &impl DevicePtr<bf16>,
        dense_b: &impl DevicePtr<f32>,
    ) -> Result<(), CudaError> {
        let (zb, _gz) = wr!(self, z);
        let (h, _gh) = rd!(self, hidden);
        let (w, _gw) = rd!(self, dense_w);
        let (b, _gb) = rd!(self, dense_b);
        self.run(launch::reward_dense_tanh(
            zb,
            h,
            ld_hidden,
            rows.map(|x| x.idx(self)),
            w,
            b,
        )?)
    }

    /// `reward_out_f32`: rewards[i] = w_out . z[i, :] + b_out.
    ///
    /// - `rewards`: (R) f32; `z`: (R, C) f32; `w_out`: (C) bf16
    pub fn reward_out(
        &self,
        rewards: &mut impl DevicePtrMut<f32>,
        z: &impl DevicePtr<f32>,
        w_out: &impl DevicePtr<bf16>,
        b_out: f32,
    ) -> Result<(), CudaError> {
        let (r, _gr) = wr!(self, rewards);
        let (zb, _gz) = rd!(self, z);
        let (w, _gw) = rd!(self, w_out);
        self.run(launch::reward_out(r, zb, w, b_out)?)
    }

    /// `argmax_f32`: ids[b] = argmax of logits[b, 0..V] (ties to the lowest index, NaN
    /// never wins, an empty or all-NaN row gives u32::MAX), rows of stride `ld`.
    ///
    /// - `ids`: (B) u32; `logits`: (B, ld) f32
    pub fn argmax(
        &self,
        ids: &mut impl DevicePtrMut<u32>,
        logits: &impl DevicePtr<f32>,
        vocab: usize,
        ld: usize,
    ) -> Result<(), CudaError> {
        let (i, _gi) = wr!(self, ids);
        let (l, _gl) = rd!(self, logits);
        self.run(launch::argmax(i, l, vocab, ld)?)
    }

    /// `sample_f32`: the next token of each row (cloudrm-sampler's `Sampler::sample`
    /// semantics and Philox coin), only ids and a status per row come back (0 ok, 1 all
    /// NaN, 2 nothing above -inf). `logits` (B, ld) is overwritten; `seen` (B,
    /// ceil(V / 32)) must be all zero and is left all zero; `counters` (B, 4) are the
    /// Philox counters (step lo/hi, sequence lo/hi); `history` is a CSR list of each
    /// row's token ids (checked < V on the host).
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        ids: &mut impl DevicePtrMut<u32>,
        status: &mut impl DevicePtrMut<u32>,
        logits: &mut impl DevicePtrMut<f32>,
        vocab: usize,
        ld: usize,
        hist_offsets: &IndexBuf,
        hist_ids: &IndexBuf,
        seen: &mut impl DevicePtrMut<u32>,
        counters: &IndexBuf,
        params: launch::SampleParams,
    ) -> Result<(), CudaError> {
        let (i, _gi) = wr!(self, ids);
        let (st, _gs) = wr!(self, status);
        let (l, _gl) = wr!(self, logits);
        let (sn, _gn) = wr!(self, seen);
        self.run(launch::sample(
            i,
            st,
            l,
            vocab,
            ld,
            hist_offsets.idx(self),
            hist_ids.idx(self),
            sn,
            counters.idx(self),
            params,
        )?)
    }

    /// `fill_uniform_bf16`: out[i] = bf16(offset + scale * (2u_i - 1)), u_i in [0, 1) a
    /// counter-based hash of (seed, i) (as `reference::init::fill_uniform_bf16` with
    /// first = 0, bit for bit).
    pub fn fill_uniform(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        seed: u64,
        scale: f32,
        offset: f32,
    ) -> Result<(), CudaError> {
        let (o, _go) = wr!(self, out);
        self.run(launch::fill_uniform(o, seed, scale, offset)?)
    }

    /// cuBLAS GEMM, row-major: y[M, N] = x[M, K] . W[N, K]^T (a `torch.nn.Linear` with
    /// weight W), bf16 inputs, f32 accumulation (`CUBLAS_COMPUTE_32F`), y in f32 or bf16.
    ///
    /// cuBLAS is column-major: the row-major y is the column-major y^T (N x M, ld N), so
    /// this computes y^T = W . x^T: A = W read transposed (op T; stored column-major
    /// K x N, ld K), B = x (op N; stored column-major K x M, ld K), m = N, n = M, k = K.
    pub fn gemm_bf16<Y: GemmOut>(
        &self,
        y: &mut impl DevicePtrMut<Y>,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        let (yb, _gy) = wr!(self, y);
        let (xb, _gx) = rd!(self, x);
        let (wb, _gw) = rd!(self, w);
        let Some((cm, cn, ck)) = launch::gemm(yb, xb, wb, m, n, k)? else {
            return Ok(());
        };
        let handle = self.blas()?.0;
        self.bind()?;
        let alpha = 1.0f32;
        let beta = 0.0f32;
        blas_call("cublasGemmEx", || {
            // SAFETY: the handle is live and bound to this stream; the three buffers hold
            // exactly M*K, N*K and M*N elements (checked), which is what the column-major
            // shapes (K x N ld K, K x M ld K, N x M ld N) address; alpha and beta are f32
            // host scalars, as CUBLAS_COMPUTE_32F requires.
            unsafe {
                blas_result::gemm_ex(
                    handle,
                    blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    cm,
                    cn,
                    ck,
                    (&alpha) as *const f32 as *const _,
                    wb.addr as *const _,
                    blas_sys::cudaDataType::CUDA_R_16BF,
                    ck,
                    xb.addr as *const _,
                    blas_sys::cudaDataType::CUDA_R_16BF,
                    ck,
                    (&beta) as *const f32 as *const _,
                    yb.addr as *mut _,
                    Y::DATA_TYPE,
                    cm,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
        })
    }
}
