// init.cu: seeded pseudo-random fill, for benchmark models whose weights are generated
// on the device (`cloudrm gpu-check` stage c: a Llama-3-8B-shaped model that cannot be
// carried to the GPU machine) instead of read from a checkpoint.
// Same function as kernels/src/reference/init.rs `uniform_value`: element i is
//   z = splitmix64(seed + (i + 1) * 0x9e3779b97f4a7c15), u = (z >> 40) * 2^-24 in [0, 1),
//   value = offset + scale * (2u - 1), rounded to bf16 (nearest even).
// 2u - 1 is exact in f32; the product and the sum are rounded separately (__fmul_rn,
// __fadd_rn: never contracted into an FMA), so the CPU reproduces every bit.
//
// fill_uniform_bf16(out, n, seed_lo, seed_hi, scale, offset)
//   launch: grid-stride; block 256, any grid (e.g. 4 * SMs * 8 blocks); no smem.
//   out bf16 (n); seed = seed_hi << 32 | seed_lo.

__device__ __forceinline__ u64 splitmix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

extern "C" __global__ void fill_uniform_bf16(bf16_t* __restrict__ out, u32 n, u32 seed_lo,
                                             u32 seed_hi, float scale, float offset) {
    const u64 seed = ((u64)seed_hi << 32) | seed_lo;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        const u64 z = splitmix64(seed + (i + 1) * 0x9e3779b97f4a7c15ull);
        const float u = (float)(u32)(z >> 40) * 5.9604644775390625e-8f;  // 2^-24
        const float v = __fadd_rn(offset, __fmul_rn(scale, 2.0f * u - 1.0f));
        out[i] = f32_to_bf16(v);
    }
}
