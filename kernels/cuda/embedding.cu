// embedding.cu: token embedding gather, out[t, :] = f32(table[ids[t], :]).
// Same math as kernels/src/reference/embedding.rs (a copy with bf16 -> f32 conversion).
//
// embedding_bf16
//   launch: grid (T), block 256 threads (any multiple of 32 up to 1024), no dynamic smem.
//   out    f32  (T, C)  the residual stream rows
//   table  bf16 (V, C)  16-byte aligned (a cudaMalloc'd weight), vector path when C % 8 == 0
//   ids    u32  (T)
//   error  u32* (1) or null: an id >= V writes a zero row and stores t + 1 into *error
//          if it is still 0 (so the host learns one offending position; clear it first).

extern "C" __global__ void embedding_bf16(float* __restrict__ out,
                                          const bf16_t* __restrict__ table,
                                          const u32* __restrict__ ids,
                                          u32 C, u32 V, u32* error) {
    const u32 t = blockIdx.x;
    const u32 id = ids[t];
    float* dst = out + (u64)t * C;
    if (id >= V) {
        for (u32 c = threadIdx.x; c < C; c += blockDim.x) {
            dst[c] = 0.0f;
        }
        if (threadIdx.x == 0 && error != nullptr) {
            atomicCAS(error, 0u, t + 1);
        }
        return;
    }
    const bf16_t* src = table + (u64)id * C;
    if ((C & 7u) == 0) {
        // 8 bf16 (16 bytes) per load, two float4 stores.
        const uint4* src8 = reinterpret_cast<const uint4*>(src);
        float4* dst4 = reinterpret_cast<float4*>(dst);
        for (u32 c = threadIdx.x; c < C / 8; c += blockDim.x) {
            const uint4 w = src8[c];
            const float2 a = bf16x2_to_f32x2(w.x);
            const float2 b = bf16x2_to_f32x2(w.y);
            const float2 d = bf16x2_to_f32x2(w.z);
            const float2 e = bf16x2_to_f32x2(w.w);
            dst4[2 * c] = make_float4(a.x, a.y, b.x, b.y);
            dst4[2 * c + 1] = make_float4(d.x, d.y, e.x, e.y);
        }
    } else {
        for (u32 c = threadIdx.x; c < C; c += blockDim.x) {
            dst[c] = bf16_to_f32(src[c]);
        }
    }
}
