// argmax.cu: greedy decoding, ids[b] = argmax_v logits[b, v].
// Same rule as cloudrm-sampler's `argmax`: ties go to the lowest index, NaN never wins,
// -inf can win when nothing larger is present; an empty or all-NaN row gives 0xffffffff.
//
// argmax_f32(ids, logits, V, ld_logits)
//   launch: grid (B), block 1024 threads (any multiple of 32 up to 1024), no dynamic smem.
//   ids u32 (B); logits f32 (B, ld_logits), V <= ld_logits valid entries per row.
//   Each thread scans a strided slice (coalesced), then a warp reduction with
//   __shfl_xor_sync on (value, index) pairs and one across the warps in smem.

#define NO_INDEX 0xffffffffu

// (va, ia) <- the better of (va, ia) and (vb, ib). NO_INDEX marks "nothing yet".
__device__ __forceinline__ void argmax_combine(float& va, u32& ia, float vb, u32 ib) {
    if (ib == NO_INDEX) {
        return;
    }
    if (ia == NO_INDEX || vb > va || (vb == va && ib < ia)) {
        va = vb;
        ia = ib;
    }
}

__device__ __forceinline__ void warp_argmax(float& v, u32& i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, v, o);
        const u32 oi = __shfl_xor_sync(FULL_MASK, i, o);
        argmax_combine(v, i, ov, oi);
    }
}

extern "C" __global__ void argmax_f32(u32* __restrict__ ids, const float* __restrict__ logits,
                                      u32 V, u32 ld_logits) {
    __shared__ float s_val[32];
    __shared__ u32 s_idx[32];
    const float* row = logits + (u64)blockIdx.x * ld_logits;
    float best = NEG_INF;
    u32 best_i = NO_INDEX;
    for (u32 v = threadIdx.x; v < V; v += blockDim.x) {
        const float x = row[v];
        // Indices grow along the scan, so a strict > keeps the lowest index on ties.
        if (!isnan(x) && (best_i == NO_INDEX || x > best)) {
            best = x;
            best_i = v;
        }
    }
    warp_argmax(best, best_i);
    const u32 lane = threadIdx.x & 31;
    const u32 warp = threadIdx.x >> 5;
    if (lane == 0) {
        s_val[warp] = best;
        s_idx[warp] = best_i;
    }
    __syncthreads();
    if (warp == 0) {
        const u32 n_warps = blockDim.x >> 5;
        best = lane < n_warps ? s_val[lane] : NEG_INF;
        best_i = lane < n_warps ? s_idx[lane] : NO_INDEX;
        warp_argmax(best, best_i);
        if (lane == 0) {
            ids[blockIdx.x] = best_i;
        }
    }
}
