// rmsnorm.cu: RMSNorm, alone and fused with the residual add.
// Same math as kernels/src/reference/rmsnorm.rs (transformers' LlamaRMSNorm, variance in
// f32): out = weight * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps); and residual.rs
// (acc += x). The residual stream is kept in f32 (B*C floats, small at decode) so the GPU
// path tracks the f32 CPU reference; the normed output feeding the next GEMM is bf16.
//
// Both kernels: grid (N rows), block any multiple of 32 up to 1024 threads (the launch
// spec gives ~C/4 threads, so a decode row of C = 4096 is one float4 per thread), no
// dynamic smem (32 floats static). Row r is handled by block r; the sum of squares is a
// warp (__shfl_xor_sync) then block reduction.
// Fast path (C % 4 == 0, C <= 4 * NORM_VEC * blockDim.x, 16-byte aligned f32 rows,
// 8-byte aligned bf16 rows): 16-byte f32 / 8-byte bf16 loads, the row held in registers
// between the two passes, all of a thread's loads issued before any use (a decode row
// is one block: its latency, not bandwidth, is the cost). Otherwise the scalar loop.
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

#define NORM_VEC 4

__device__ __forceinline__ bool aligned_to(const void* p, u64 n) {
    return ((u64)p & (n - 1)) == 0;
}

// The fast path's condition (uniform over the block).
__device__ __forceinline__ bool norm_vec_ok(u32 C, const float* x, const void* a,
                                            const void* b, const void* c) {
    return (C & 3u) == 0 && C / 4 <= NORM_VEC * blockDim.x && aligned_to(x, 16) &&
           aligned_to(a, 8) && aligned_to(b, 8) && aligned_to(c, 8);
}

// This thread's sum of squares of its float4 groups (the padding groups are zero).
__device__ __forceinline__ float sum_squares(const float4 (&v)[NORM_VEC]) {
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < NORM_VEC; ++j) {
        ss = fmaf(v[j].x, v[j].x, ss);
        ss = fmaf(v[j].y, v[j].y, ss);
        ss = fmaf(v[j].z, v[j].z, ss);
        ss = fmaf(v[j].w, v[j].w, ss);
    }
    return ss;
}

// Writes out[i] = weight[i] * (v[i] * rstd) for the thread's float4 groups (fast path).
__device__ __forceinline__ void rmsnorm_vec_write(bf16_t* __restrict__ out,
                                                  const bf16_t* __restrict__ weight,
                                                  const float4 (&v)[NORM_VEC], u32 n4,
                                                  float rstd) {
#pragma unroll
    for (int j = 0; j < NORM_VEC; ++j) {
        const u32 i = threadIdx.x + j * blockDim.x;
        if (i < n4) {
            const uint2 w = reinterpret_cast<const uint2*>(weight)[i];
            const float2 w0 = bf16x2_to_f32x2(w.x);
            const float2 w1 = bf16x2_to_f32x2(w.y);
            uint2 o;
            o.x = f32x2_to_bf16x2(w0.x * (v[j].x * rstd), w0.y * (v[j].y * rstd));
            o.y = f32x2_to_bf16x2(w1.x * (v[j].z * rstd), w1.y * (v[j].w * rstd));
            reinterpret_cast<uint2*>(out)[i] = o;
        }
    }
}

__device__ __forceinline__ void rmsnorm_row_write(bf16_t* __restrict__ out,
                                                  const float* x,
                                                  const bf16_t* __restrict__ weight,
                                                  u32 C, float rstd) {
    for (u32 c = threadIdx.x; c < C; c += blockDim.x) {
        out[c] = f32_to_bf16(bf16_to_f32(weight[c]) * (x[c] * rstd));
    }
}

extern "C" __global__ void __launch_bounds__(1024) rmsnorm_bf16(bf16_t* __restrict__ out,
                                        const float* __restrict__ inp,
                                        const bf16_t* __restrict__ weight,
                                        u32 C, float eps) {
    __shared__ float scratch[32];
    const u64 row = (u64)blockIdx.x * C;
    const float* x = inp + row;
    if (norm_vec_ok(C, x, out + row, weight, weight)) {
        const u32 n4 = C / 4;
        float4 v[NORM_VEC];
#pragma unroll
        for (int j = 0; j < NORM_VEC; ++j) {
            const u32 i = threadIdx.x + j * blockDim.x;
            v[j] = i < n4 ? reinterpret_cast<const float4*>(x)[i] : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        const float ss = block_sum(sum_squares(v), scratch);
        const float rstd = 1.0f / sqrtf(ss / (float)C + eps);
        rmsnorm_vec_write(out + row, weight, v, n4, rstd);
        return;
    }
    float ss = 0.0f;
    for (u32 c = threadIdx.x; c < C; c += blockDim.x) {
        const float v = x[c];
        ss = fmaf(v, v, ss);
    }
    ss = block_sum(ss, scratch);
    const float rstd = 1.0f / sqrtf(ss / (float)C + eps);
    rmsnorm_row_write(out + row, x, weight, C, rstd);
}

extern "C" __global__ void __launch_bounds__(1024) residual_rmsnorm_bf16(float* __restrict__ resid,
                                                 const bf16_t* __restrict__ delta,
                                                 bf16_t* __restrict__ out,
                                                 const bf16_t* __restrict__ weight,
                                                 u32 C, float eps) {
    __shared__ float scratch[32];
    const u64 row = (u64)blockIdx.x * C;
    float* x = resid + row;
    const bf16_t* d = delta + row;
    if (norm_vec_ok(C, x, d, out + row, weight)) {
        const u32 n4 = C / 4;
        float4 v[NORM_VEC];
        uint2 dv[NORM_VEC];
#pragma unroll
        for (int j = 0; j < NORM_VEC; ++j) {
            const u32 i = threadIdx.x + j * blockDim.x;
            if (i < n4) {
                v[j] = reinterpret_cast<const float4*>(x)[i];
                dv[j] = reinterpret_cast<const uint2*>(d)[i];
            } else {
                v[j] = make_float4(0.f, 0.f, 0.f, 0.f);
                dv[j] = make_uint2(0u, 0u);
            }
        }
#pragma unroll
        for (int j = 0; j < NORM_VEC; ++j) {
            const float2 d0 = bf16x2_to_f32x2(dv[j].x);
            const float2 d1 = bf16x2_to_f32x2(dv[j].y);
            v[j].x += d0.x;
            v[j].y += d0.y;
            v[j].z += d1.x;
            v[j].w += d1.y;
            const u32 i = threadIdx.x + j * blockDim.x;
            if (i < n4) {
                reinterpret_cast<float4*>(x)[i] = v[j];
            }
        }
        const float ss = block_sum(sum_squares(v), scratch);
        const float rstd = 1.0f / sqrtf(ss / (float)C + eps);
        rmsnorm_vec_write(out + row, weight, v, n4, rstd);
        return;
    }
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
