// heads.cu: the reward heads on final-normed hidden rows.
// Same math as kernels/src/reference/heads.rs:
//   linear     r = w . h + b                                  (HF `score`, w (C))
//   dense-tanh r = w_out . tanh(W_dense h + b_dense) + b_out  (CLoud `RewardHead`)
// f32 accumulation. Rows may be picked out of a batch with `rows` (the dual-head step
// scores only the rows that just fed their end-of-turn token); rows = null means
// row i of the output reads hidden row i.
//
// reward_linear_bf16(rewards, hidden, ld_hidden, rows, w, b, C)
//   launch: grid (R), block 256 threads (any multiple of 32 up to 1024), no dynamic smem.
//   rewards f32 (R); hidden bf16 rows of stride ld_hidden; rows u32 (R) or null; w bf16 (C)
//
// reward_dense_tanh_bf16(z, hidden, ld_hidden, rows, n_rows, dense_w, dense_b, C)
//   z[r, o] = tanh(W_dense[o, :] . h_r + b_dense[o]), the (R, C) f32 intermediate.
//   launch: grid (ceil(C / 8)), block 256 threads = 8 warps, one output channel per warp
//           (a warp streams its W_dense row with 16-byte coalesced loads and dots it with
//           up to 4 hidden rows at a time; more rows re-read the W row from L2), no smem.
//   dense_w bf16 (C, C) (out, in) row-major; dense_b f32 (C); C % 8 == 0, ld_hidden % 8
//   == 0 and 16-byte aligned rows.
//
// reward_out_f32(rewards, z, w_out, b_out, C)
//   r[i] = w_out . z[i, :] + b_out.
//   launch: grid (R), block 256 threads (any multiple of 32 up to 1024), no dynamic smem.
//   z f32 (R, C); w_out bf16 (C)

#define DOT_ROWS 4

extern "C" __global__ void reward_linear_bf16(float* __restrict__ rewards,
                                              const bf16_t* __restrict__ hidden,
                                              u32 ld_hidden, const u32* __restrict__ rows,
                                              const bf16_t* __restrict__ w, float b, u32 C) {
    __shared__ float scratch[32];
    const u32 i = blockIdx.x;
    const bf16_t* h = hidden + (u64)(rows != nullptr ? rows[i] : i) * ld_hidden;
    float acc = 0.0f;
    for (u32 c = threadIdx.x; c < C; c += blockDim.x) {
        acc = fmaf(bf16_to_f32(h[c]), bf16_to_f32(w[c]), acc);
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        rewards[i] = acc + b;
    }
}

__device__ __forceinline__ float dot8(uint4 a, uint4 b, float acc) {
    float2 x = bf16x2_to_f32x2(a.x), y = bf16x2_to_f32x2(b.x);
    acc = fmaf(x.x, y.x, acc);
    acc = fmaf(x.y, y.y, acc);
    x = bf16x2_to_f32x2(a.y); y = bf16x2_to_f32x2(b.y);
    acc = fmaf(x.x, y.x, acc);
    acc = fmaf(x.y, y.y, acc);
    x = bf16x2_to_f32x2(a.z); y = bf16x2_to_f32x2(b.z);
    acc = fmaf(x.x, y.x, acc);
    acc = fmaf(x.y, y.y, acc);
    x = bf16x2_to_f32x2(a.w); y = bf16x2_to_f32x2(b.w);
    acc = fmaf(x.x, y.x, acc);
    acc = fmaf(x.y, y.y, acc);
    return acc;
}

extern "C" __global__ void reward_dense_tanh_bf16(float* __restrict__ z,
                                                  const bf16_t* __restrict__ hidden,
                                                  u32 ld_hidden, const u32* __restrict__ rows,
                                                  u32 n_rows,
                                                  const bf16_t* __restrict__ dense_w,
                                                  const float* __restrict__ dense_b, u32 C) {
    const u32 lane = threadIdx.x & 31;
    const u32 o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (o >= C) {
        return;  // whole warp
    }
    const u32 n8 = C / 8;
    const uint4* w8 = reinterpret_cast<const uint4*>(dense_w + (u64)o * C);
    for (u32 r0 = 0; r0 < n_rows; r0 += DOT_ROWS) {
        const uint4* h8[DOT_ROWS];
#pragma unroll
        for (int k = 0; k < DOT_ROWS; ++k) {
            const u32 r = min(r0 + k, n_rows - 1);  // clamped rows are computed, not stored
            h8[k] = reinterpret_cast<const uint4*>(
                hidden + (u64)(rows != nullptr ? rows[r] : r) * ld_hidden);
        }
        float acc[DOT_ROWS];
#pragma unroll
        for (int k = 0; k < DOT_ROWS; ++k) {
            acc[k] = 0.0f;
        }
        for (u32 c = lane; c < n8; c += 32) {
            const uint4 wv = w8[c];
#pragma unroll
            for (int k = 0; k < DOT_ROWS; ++k) {
                acc[k] = dot8(wv, h8[k][c], acc[k]);
            }
        }
#pragma unroll
        for (int k = 0; k < DOT_ROWS; ++k) {
            const float s = warp_sum(acc[k]);
            if (lane == 0 && r0 + k < n_rows) {
                z[(u64)(r0 + k) * C + o] = tanhf(s + dense_b[o]);
            }
        }
    }
}

extern "C" __global__ void reward_out_f32(float* __restrict__ rewards,
                                          const float* __restrict__ z,
                                          const bf16_t* __restrict__ w_out, float b_out,
                                          u32 C) {
    __shared__ float scratch[32];
    const u32 i = blockIdx.x;
    const float* zr = z + (u64)i * C;
    float acc = 0.0f;
    for (u32 c = threadIdx.x; c < C; c += blockDim.x) {
        acc = fmaf(zr[c], bf16_to_f32(w_out[c]), acc);
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        rewards[i] = acc + b_out;
    }
}
