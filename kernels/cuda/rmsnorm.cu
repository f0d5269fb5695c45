// rmsnorm.cu: RMSNorm, alone and fused with the residual add.
// Same math as kernels/src/reference/rmsnorm.rs (transformers' LlamaRMSNorm, variance in
// f32): out = weight * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps); and residual.rs
// (acc += x). The residual stream is kept in f32 (B*C floats, small at decode) so the GPU
// path tracks the f32 CPU reference; the normed output feeding the next GEMM is bf16.
//
// Both kernels: grid (N rows), block 256 threads (any multiple of 32 up to 1024), no
// dynamic smem (32 floats static). Row r is handled by block r; loads are coalesced
// (consecutive threads read consecutive channels), the sum of squares is a warp
// (__shfl_xor_sync) then block reduction.
//
// rmsnorm_bf16(out, inp, weight, C, eps)
//   out    bf16 (N, C)
//   inp    f32  (N, C)
//   weight bf16 (C)
//
// residual_rmsnorm_bf16(resid, delta, out, weight, C, eps)
//   resid  f32  (N, C)  in/out: resid += delta (the new residual stream)
//   delta  bf16 (N, C)  the sublayer output (attention o_proj or MLP down_proj GEMM)
//   out    bf16 (N, C)  weight * rmsnorm(resid), the next sublayer's input
//   weight bf16 (C)

__device__ __forceinline__ void rmsnorm_row_write(bf16_t* __restrict__ out,
                                                  const float* x,
                                                  const bf16_t* __restrict__ weight,
                                                  u32 C, float rstd) {
    for (u32 c = threadIdx.x; c < C; c += blockDim.x) {
        out[c] = f32_to_bf16(bf16_to_f32(weight[c]) * (x[c] * rstd));
    }
}

extern "C" __global__ void rmsnorm_bf16(bf16_t* __restrict__ out,
                                        const float* __restrict__ inp,
                                        const bf16_t* __restrict__ weight,
                                        u32 C, float eps) {
    __shared__ float scratch[32];
    const u64 row = (u64)blockIdx.x * C;
    const float* x = inp + row;
    float ss = 0.0f;
    for (u32 c = threadIdx.x; c < C; c += blockDim.x) {
        const float v = x[c];
        ss = fmaf(v, v, ss);
    }
    ss = block_sum(ss, scratch);
    const float rstd = 1.0f / sqrtf(ss / (float)C + eps);
    rmsnorm_row_write(out + row, x, weight, C, rstd);
}

extern "C" __global__ void residual_rmsnorm_bf16(float* __restrict__ resid,
                                                 const bf16_t* __restrict__ delta,
                                                 bf16_t* __restrict__ out,
                                                 const bf16_t* __restrict__ weight,
                                                 u32 C, float eps) {
    __shared__ float scratch[32];
    const u64 row = (u64)blockIdx.x * C;
    float* x = resid + row;
    const bf16_t* d = delta + row;
    float ss = 0.0f;
    // Pass 1: residual add (each thread later re-reads only what it wrote itself, so no
    // barrier is needed between the write and the normalising pass).
    for (u32 c = threadIdx.x; c < C; c += blockDim.x) {
        const float v = x[c] + bf16_to_f32(d[c]);
        x[c] = v;
        ss = fmaf(v, v, ss);
    }
    ss = block_sum(ss, scratch);
    const float rstd = 1.0f / sqrtf(ss / (float)C + eps);
    rmsnorm_row_write(out + row, x, weight, C, rstd);
}
