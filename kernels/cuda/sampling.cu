// sampling.cu: the next token of each row on the GPU, returning only ids (and a status),
// with the semantics of cloudrm-sampler's `Sampler::sample` (sampler/src/processors.rs,
// the Hugging Face order) and its Philox4x32-10 coin (sampler/src/rng.rs), so CPU and GPU
// draw the same numbers:
//   0. NaN -> -inf (all NaN: status 1);
//   1. repetition penalty once per distinct history id (x < 0 ? x * p : x / p); any +inf:
//      the +inf tokens become 0 and every other -inf; nothing above -inf: status 2;
//      temperature 0: argmax (ties to the lowest id), no coin;
//   2. x = (x - max) / T;
//   3. top-k: mask x < the k-th largest (ties kept);
//   4. top-p: in ascending order (value, then higher id first) mask every token whose
//      cumulative probability is <= thr = (f32)(1 - (f64)top_p), never the most likely;
//   5. min-p: mask p < min_p * p_max;
//   6. softmax, coin u = (philox(counter, key).x >> 8) * 2^-24, inverse CDF in index order.
// The CPU sums in index order one element at a time; here sums are block reductions
// (softmax sum, the top-p tail mass, the CDF as chunk sums + a scan), so a token can
// differ from the CPU's only where a coin or a threshold falls within rounding of a
// boundary (gpu-check stage (a) counts the agreement).
//
// sample_f32(ids, status, logits, V, ld, hist_offsets, hist_ids, seen, words, counters,
//            seed_lo, seed_hi, temperature, top_k, top_p_thr, min_p, penalty)
//   launch: grid (B), block 1024 (a multiple of 32 up to 1024), no dynamic smem.
//   ids      u32 (B): the token, or 0xffffffff with a nonzero status
//   status   u32 (B): 0 ok, 1 all logits NaN, 2 nothing left above -inf
//   logits   f32 (B, ld), V <= ld valid entries per row; overwritten (scratch)
//   hist_offsets u32 (B + 1) CSR into hist_ids (every id < V: checked on the host)
//   seen     u32 (B, words), words = ceil(V / 32): all zero on entry, all zero on exit
//   counters u32 (B, 4): the Philox counter of each row's draw, (step lo, step hi,
//            sequence lo, sequence hi); key = (seed_lo, seed_hi)
//   temperature >= 0 (0: greedy); top_k 0 = off; top_p_thr < 0 = off (top_p >= 1);
//   min_p <= 0 = off; penalty 1 = off

#define SAMPLE_NONE 0xffffffffu
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, u32 k0, u32 k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        const u32 lo0 = PHILOX_M0 * c.x;
        const u32 hi0 = __umulhi(PHILOX_M0, c.x);
        const u32 lo1 = PHILOX_M1 * c.z;
        const u32 hi1 = __umulhi(PHILOX_M1, c.z);
        c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
    }
    return c;
}

// Block reductions of a u32 / f32 (every thread gets the result; blockDim.x a multiple
// of 32; `scratch` 32 words of smem; synchronises, may be called again).
__device__ __forceinline__ u32 block_sum_u32(u32 v, u32* scratch) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0u;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : NEG_INF;
    return warp_max(v);
}

// The row's max and sum of exp(x - max), both block-reduced (every thread gets them).
__device__ __forceinline__ float2 block_max_sum_exp(const float* x, u32 V, float* scratch) {
    const u32 tid = threadIdx.x, nt = blockDim.x;
    float mx = NEG_INF;
    for (u32 v = tid; v < V; v += nt) mx = fmaxf(mx, x[v]);
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (u32 v = tid; v < V; v += nt) sum += expf(x[v] - mx);
    return make_float2(mx, block_sum(sum, scratch));
}

__device__ __forceinline__ u32 block_min_u32(u32 v, u32* scratch) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(FULL_MASK, v, o));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : SAMPLE_NONE;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Order-preserving u32 key of a float (larger float, larger key; -inf lowest of numbers).
__device__ __forceinline__ u32 float_key(float f) {
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_float(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The top-p order key: ascending value, ties with the higher id first.
__device__ __forceinline__ u64 order_key(float x, u32 id) {
    return ((u64)float_key(x) << 32) | (u64)(~id);
}

// Exclusive prefix sum over the block in thread order (f32); `scratch` 32 floats.
__device__ __forceinline__ float block_exclusive_scan(float v, float* scratch) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    float inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float t = __shfl_up_sync(FULL_MASK, inc, o);
        if (lane >= (u32)o) inc += t;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        float w = lane < n_warps ? scratch[lane] : 0.0f;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const float t = __shfl_up_sync(FULL_MASK, w, o);
            if (lane >= (u32)o) w += t;
        }
        if (lane < n_warps) scratch[lane] = w;  // inclusive warp totals
    }
    __syncthreads();
    const float before = warp > 0 ? scratch[warp - 1] : 0.0f;
    return before + inc - v;
}

extern "C" __global__ void sample_f32(u32* __restrict__ ids, u32* __restrict__ status,
                                      float* __restrict__ logits, u32 V, u32 ld,
                                      const u32* __restrict__ hist_offsets,
                                      const u32* __restrict__ hist_ids, u32* __restrict__ seen,
                                      u32 words, const u32* __restrict__ counters, u32 seed_lo,
                                      u32 seed_hi, float temperature, u32 top_k,
                                      float top_p_thr, float min_p, float penalty) {
    __shared__ u32 s_u[32];
    __shared__ float s_f[32];
    __shared__ u32 s_hist[256];
    const u32 row = blockIdx.x;
    const u32 tid = threadIdx.x;
    const u32 nt = blockDim.x;
    float* x = logits + (u64)row * ld;

    // 0. NaN -> -inf.
    u32 nan = 0;
    for (u32 v = tid; v < V; v += nt) {
        if (isnan(x[v])) {
            x[v] = NEG_INF;
            ++nan;
        }
    }
    nan = block_sum_u32(nan, s_u);
    if (nan == V) {
        if (tid == 0) {
            ids[row] = SAMPLE_NONE;
            status[row] = 1;
        }
        return;
    }

    // 1. Repetition penalty, once per distinct id: the first thread to set its bit
    //    applies it. Then the +inf rule.
    if (penalty != 1.0f) {
        const u32 h0 = hist_offsets[row], h1 = hist_offsets[row + 1];
        u32* bits = seen + (u64)row * words;
        for (u32 h = h0 + tid; h < h1; h += nt) {
            const u32 t = hist_ids[h];
            const u32 bit = 1u << (t & 31);
            if ((atomicOr(&bits[t >> 5], bit) & bit) == 0u) {
                const float v = x[t];
                x[t] = v < 0.0f ? v * penalty : v / penalty;
            }
        }
        __syncthreads();
        for (u32 h = h0 + tid; h < h1; h += nt) {
            bits[hist_ids[h] >> 5] = 0u;
        }
    }
    __syncthreads();
    u32 n_inf = 0;
    for (u32 v = tid; v < V; v += nt) n_inf += x[v] == __int_as_float(0x7f800000) ? 1u : 0u;
    n_inf = block_sum_u32(n_inf, s_u);
    if (n_inf > 0) {
        for (u32 v = tid; v < V; v += nt) {
            x[v] = x[v] == __int_as_float(0x7f800000) ? 0.0f : NEG_INF;
        }
    }
    __syncthreads();
    u32 n_sel = 0;
    float best = NEG_INF;
    u32 best_i = SAMPLE_NONE;
    for (u32 v = tid; v < V; v += nt) {
        const float xv = x[v];
        if (xv > NEG_INF) {
            ++n_sel;
            if (best_i == SAMPLE_NONE || xv > best) {
                best = xv;
                best_i = v;
            }
        }
    }
    n_sel = block_sum_u32(n_sel, s_u);
    if (n_sel == 0) {
        if (tid == 0) {
            ids[row] = SAMPLE_NONE;
            status[row] = 2;
        }
        return;
    }
    // The most likely token (ties: lowest id) = the greedy token.
    const float max0 = block_max(best, s_f);
    const u32 top = block_min_u32(best == max0 && best_i != SAMPLE_NONE ? best_i : SAMPLE_NONE, s_u);
    if (temperature <= 0.0f) {
        if (tid == 0) {
            ids[row] = top;
            status[row] = 0;
        }
        return;
    }

    // 2. Temperature.
    for (u32 v = tid; v < V; v += nt) x[v] = (x[v] - max0) / temperature;
    __syncthreads();

    // 3. Top-k: radix select of the k-th largest key among the selectable tokens.
    if (top_k > 0 && top_k < n_sel) {
        u32 prefix = 0, mask = 0, want = top_k;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (u32 i = tid; i < 256; i += nt) s_hist[i] = 0;
            __syncthreads();
            for (u32 v = tid; v < V; v += nt) {
                const float xv = x[v];
                const u32 k = float_key(xv);
                if (xv > NEG_INF && (k & mask) == prefix) atomicAdd(&s_hist[(k >> shift) & 255u], 1u);
            }
            __syncthreads();
            // Walk the bins from the top (one thread; 256 bins).
            if (tid == 0) {
                u32 acc = 0, d = 255;
                for (int b = 255; b >= 0; --b) {
                    if (acc + s_hist[b] >= want) {
                        d = (u32)b;
                        break;
                    }
                    acc += s_hist[b];
                }
                s_u[0] = d;
                s_u[1] = want - acc;
            }
            __syncthreads();
            prefix |= s_u[0] << shift;
            mask |= 255u << shift;
            want = s_u[1];
            __syncthreads();
        }
        const float kth = key_float(prefix);
        for (u32 v = tid; v < V; v += nt) {
            if (x[v] < kth) x[v] = NEG_INF;
        }
        __syncthreads();
    }

    // Max and sum of exp(x - max) over the current logits (block reductions).
    float2 ms = block_max_sum_exp(x, V, s_f);
    float mx = ms.x, sum = ms.y;

    // 4. Top-p: the largest order key K* whose tail mass (tokens with key <= K*) is
    //    <= thr; mask those keys, except the most likely token.
    if (top_p_thr >= 0.0f && n_sel > 1) {
        // The most likely token now (temperature can round neighbours into ties): the
        // largest value, ties to the lowest id.
        u32 cand = SAMPLE_NONE;
        for (u32 v = tid; v < V; v += nt) {
            if (x[v] == mx && cand == SAMPLE_NONE) cand = v;
        }
        const u32 top_now = block_min_u32(cand, s_u);
        // Binary search: `found` is the largest key seen so far with mass <= thr.
        u64 lo = 0, hi = ~0ull;
        bool any = false;
        u64 found = 0;
        for (int it = 0; it < 65 && lo <= hi; ++it) {
            const u64 mid = lo + (hi - lo) / 2;
            float mass = 0.0f;
            for (u32 v = tid; v < V; v += nt) {
                const float xv = x[v];
                if (xv > NEG_INF && order_key(xv, v) <= mid) mass += expf(xv - mx) / sum;
            }
            mass = block_sum(mass, s_f);
            if (mass <= top_p_thr) {
                any = true;
                found = mid;
                if (mid == ~0ull) break;
                lo = mid + 1;
            } else {
                if (mid == 0) break;
                hi = mid - 1;
            }
        }
        if (any) {
            for (u32 v = tid; v < V; v += nt) {
                const float xv = x[v];
                if (v != top_now && xv > NEG_INF && order_key(xv, v) <= found) x[v] = NEG_INF;
            }
        }
        __syncthreads();
    }

    // 5. Min-p (max and sum recomputed after the top-p masks, as the CPU does).
    if (min_p > 0.0f) {
        ms = block_max_sum_exp(x, V, s_f);
        const float m2 = ms.x, s2 = ms.y;
        const float thr = min_p * (1.0f / s2);
        for (u32 v = tid; v < V; v += nt) {
            if (expf(x[v] - m2) / s2 < thr) x[v] = NEG_INF;
        }
        __syncthreads();
    }

    // 6. Softmax and the inverse CDF in index order: each thread owns a contiguous chunk.
    ms = block_max_sum_exp(x, V, s_f);
    mx = ms.x;
    sum = ms.y;
    const u32 chunk = (V + nt - 1) / nt;
    const u32 c0 = min(V, tid * chunk), c1 = min(V, c0 + chunk);
    float local = 0.0f;
    u32 last_nz = SAMPLE_NONE;
    for (u32 v = c0; v < c1; ++v) {
        const float p = expf(x[v] - mx) / sum;
        if (p > 0.0f) {
            local += p;
            last_nz = v;
        }
    }
    const uint4 ctr = *reinterpret_cast<const uint4*>(counters + (u64)row * 4);
    const float coin = (float)(philox4x32_10(ctr, seed_lo, seed_hi).x >> 8) * 5.9604644775390625e-8f;
    float cdf = block_exclusive_scan(local, s_f);
    u32 pick = SAMPLE_NONE;
    for (u32 v = c0; v < c1; ++v) {
        const float p = expf(x[v] - mx) / sum;
        if (p > 0.0f) {
            cdf += p;
            if (coin < cdf) {
                pick = v;
                break;
            }
        }
    }
    pick = block_min_u32(pick, s_u);
    // Rounding left the coin above the total: the last index with a nonzero probability.
    const u32 last = block_min_u32(last_nz == SAMPLE_NONE ? SAMPLE_NONE : ~last_nz, s_u);
    if (tid == 0) {
        ids[row] = pick != SAMPLE_NONE ? pick : (last != SAMPLE_NONE ? ~last : top);
        status[row] = 0;
    }
}
