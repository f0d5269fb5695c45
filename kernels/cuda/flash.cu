// flash.cu: causal prefill attention of one sequence over the paged KV cache on the
// tensor cores (mma.sync m16n8k16, bf16 inputs, f32 accumulators), FlashAttention-2
// style. Same math as the prefill of kernels/src/reference/attention_paged.rs: query
// token t (position pos0 + t) of head h attends positions 0..=pos0 + t of KV head h / G,
// o = sum_s softmax_s(scale * q.k_s) v_s, scale = 1/sqrt(HS); scores, the online softmax
// (log2 domain, running max m and sum l per row) and the output accumulate in f32; P is
// rounded to bf16 for the PV product (as FlashAttention does); o is normalised once and
// rounded to bf16.
//
// flash_prefill_bf16_hs{64,128}(out, q, k_arena, v_arena, table, pos0, T, NH, NKV, BS,
//                               scale)
//   launch: grid (ceil(T / (4 * 16 / G)), NKV), block 128 threads (4 warps), no dynamic
//           smem (K and V tiles of 32 positions, 2 * 32 * (HS + 8) bf16 static: 17 KB at
//           HS 128). G = NH / NKV must divide 16.
//   out    bf16 (T, NH, HS)
//   q      bf16 (T, NH, HS)   RoPE already applied
//   k/v_arena bf16 (NB, BS, NKV, HS); table u32: the sequence's block ids, covering
//          positions 0 .. pos0 + T
//   A CTA owns one KV head and 4 * 16 / G consecutive tokens; warp w owns 16 rows, row r
//   = (token w * 16 / G + r / G, query head kvh * G + r % G), so each K/V tile loaded into
//   shared memory serves every query head that reads it. CTAs take the query tiles from
//   the last (the longest causal range) down. Tiles past a warp's last position are
//   skipped by that warp; the diagonal tile is masked per row.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16): lane = 4 g + t. A (16 x 16,
// row): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..].
// B (16 x 8, col): b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]. C (16 x 8): c0, c1 =
// C[g][2t], C[g][2t+1]; c2, c3 = C[g+8][2t..]. The low half of each 32-bit register is
// the lower index. The C fragments of two adjacent 8-column score tiles are, converted
// to bf16, the A fragment of the PV product over those 16 positions.

#define FLASH_TILE 32
#define FLASH_WARPS 4

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 r;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }"
                 : "=r"(r)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ void ldmatrix_x4(u32& r0, u32& r1, u32& r2, u32& r3, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32& r0, u32& r1, u32& r2, u32& r3,
                                                  u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// d += A * B, m16n8k16, bf16 inputs, f32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3,
                                         u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int HS>
__device__ __forceinline__ void flash_prefill(bf16_t* __restrict__ out,
                                              const bf16_t* __restrict__ q,
                                              const bf16_t* __restrict__ k_arena,
                                              const bf16_t* __restrict__ v_arena,
                                              const u32* __restrict__ table, u32 pos0,
                                              u32 T, u32 NH, u32 NKV, u32 BS, float scale) {
    constexpr int PITCH = HS + 8;      // bf16 per smem row: 16-byte aligned, ldmatrix
                                       // rows of one 8x8 matrix on distinct banks
    constexpr int KSTEPS = HS / 16;    // k-steps of the QK^T product
    constexpr int DTILES = HS / 8;     // 8-wide output tiles
    constexpr int CHUNKS = HS / 8;     // 16-byte chunks per K/V row
    __shared__ __align__(16) bf16_t k_s[FLASH_TILE * PITCH];
    __shared__ __align__(16) bf16_t v_s[FLASH_TILE * PITCH];

    const u32 lane = threadIdx.x & 31;
    const u32 warp = threadIdx.x >> 5;
    const u32 g = lane >> 2;
    const u32 t = lane & 3;
    const u32 G = NH / NKV;
    const u32 tpw = 16 / G;                 // tokens per warp
    const u32 tpc = FLASH_WARPS * tpw;      // tokens per CTA
    const u32 kvh = blockIdx.y;
    const u32 tile = gridDim.x - 1 - blockIdx.x;  // longest ranges first
    const u32 tok0 = tile * tpc;
    const u32 wtok0 = tok0 + warp * tpw;
    const u32 kv_total = pos0 + T;
    const u32 kv_end = pos0 + min(T, tok0 + tpc);  // positions this CTA needs
    // The warp's last position (its rows past T attend nothing new).
    const u32 warp_last = pos0 + min(T, wtok0 + tpw) - 1;
    const bool warp_live = wtok0 < T;

    // The two rows of this lane: r = g and r = g + 8.
    const u32 tok_a = wtok0 + g / G;
    const u32 tok_b = wtok0 + (g + 8) / G;
    const u32 head_a = kvh * G + g % G;
    const u32 head_b = kvh * G + (g + 8) % G;
    const u32 lim_a = pos0 + tok_a;  // last position row a sees
    const u32 lim_b = pos0 + tok_b;

    // Q fragments (A operand), straight from global memory; rows past T are zero.
    u32 qa[KSTEPS][4];
    {
        const bf16_t* qra = q + ((u64)tok_a * NH + head_a) * HS;
        const bf16_t* qrb = q + ((u64)tok_b * NH + head_b) * HS;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            const u32 c = kk * 16 + 2 * t;
            qa[kk][0] = tok_a < T ? *reinterpret_cast<const u32*>(qra + c) : 0u;
            qa[kk][1] = tok_b < T ? *reinterpret_cast<const u32*>(qrb + c) : 0u;
            qa[kk][2] = tok_a < T ? *reinterpret_cast<const u32*>(qra + c + 8) : 0u;
            qa[kk][3] = tok_b < T ? *reinterpret_cast<const u32*>(qrb + c + 8) : 0u;
        }
    }

    float o[DTILES][4];
#pragma unroll
    for (int d = 0; d < DTILES; ++d) {
        o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    }
    float m_a = NEG_INF, m_b = NEG_INF;  // running max (log2 domain), rows a and b
    float l_a = 0.0f, l_b = 0.0f;        // this lane's share of the running sums
    const float scale_log2 = scale * LOG2E;

    // ldmatrix row addresses (shared space, bytes): lane l gives row (l & 7) of matrix
    // l >> 3. K: matrices (tile j, k lo), (j, k hi), (j + 1, lo), (j + 1, hi); V
    // (transposed): (positions lo, dims d), (hi, d), (lo, d + 1), (hi, d + 1).
    const u32 mat = lane >> 3;
    const u32 mrow = lane & 7;
    const u32 k_lane = smem_addr(k_s) +
                       2u * (((mat >> 1) * 8 + mrow) * PITCH + (mat & 1) * 8);
    const u32 v_lane = smem_addr(v_s) +
                       2u * (((mat & 1) * 8 + mrow) * PITCH + (mat >> 1) * 8);

    for (u32 t0 = 0; t0 < kv_end; t0 += FLASH_TILE) {
        __syncthreads();  // every warp is done with the previous tile
        for (u32 c = threadIdx.x; c < FLASH_TILE * CHUNKS; c += blockDim.x) {
            const u32 r = c / CHUNKS;
            const u32 ch = c - r * CHUNKS;
            const u32 p = t0 + r;
            uint4 kv = make_uint4(0u, 0u, 0u, 0u);
            uint4 vv = make_uint4(0u, 0u, 0u, 0u);
            if (p < kv_total) {
                const u64 off =
                    (((u64)table[p / BS] * BS + p % BS) * NKV + kvh) * HS + ch * 8;
                kv = *reinterpret_cast<const uint4*>(k_arena + off);
                vv = *reinterpret_cast<const uint4*>(v_arena + off);
            }
            *reinterpret_cast<uint4*>(k_s + r * PITCH + ch * 8) = kv;
            *reinterpret_cast<uint4*>(v_s + r * PITCH + ch * 8) = vv;
        }
        __syncthreads();
        if (!warp_live || t0 > warp_last) {
            continue;  // warp-uniform: nothing of this tile is visible to the warp
        }

        // S = Q K^T over the tile's 32 positions: 4 score tiles of 8 positions.
        float s[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
        }
#pragma unroll
        for (int jj = 0; jj < 4; jj += 2) {
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk) {
                u32 b0, b1, b2, b3;
                ldmatrix_x4(b0, b1, b2, b3, k_lane + 2u * (jj * 8 * PITCH + kk * 16));
                mma_bf16(s[jj], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b0, b1);
                mma_bf16(s[jj + 1], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b2, b3);
            }
        }

        // Mask (causal, and past the sequence), scale, online softmax.
        float mx_a = NEG_INF, mx_b = NEG_INF;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const u32 p = t0 + j * 8 + 2 * t + e;
                const bool ok_a = p <= lim_a && p < kv_total;
                const bool ok_b = p <= lim_b && p < kv_total;
                s[j][e] = ok_a ? s[j][e] * scale_log2 : NEG_INF;
                s[j][2 + e] = ok_b ? s[j][2 + e] * scale_log2 : NEG_INF;
                mx_a = fmaxf(mx_a, s[j][e]);
                mx_b = fmaxf(mx_b, s[j][2 + e]);
            }
        }
        // The quad (lanes 4g .. 4g + 3) holds one row's 32 scores.
        mx_a = fmaxf(mx_a, __shfl_xor_sync(FULL_MASK, mx_a, 1));
        mx_a = fmaxf(mx_a, __shfl_xor_sync(FULL_MASK, mx_a, 2));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(FULL_MASK, mx_b, 1));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(FULL_MASK, mx_b, 2));
        const float mn_a = fmaxf(m_a, mx_a);
        const float mn_b = fmaxf(m_b, mx_b);
        // A row that has seen nothing yet (m = -inf) has o = 0 and l = 0: any finite
        // alpha works; a row that sees nothing in this tile either keeps mn = -inf and
        // its p are 0 (guarded below).
        const float al_a = mn_a == NEG_INF ? 1.0f : exp2f(m_a - mn_a);
        const float al_b = mn_b == NEG_INF ? 1.0f : exp2f(m_b - mn_b);
        m_a = mn_a;
        m_b = mn_b;
        float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float pa = mn_a == NEG_INF ? 0.0f : exp2f(s[j][e] - mn_a);
                const float pb = mn_b == NEG_INF ? 0.0f : exp2f(s[j][2 + e] - mn_b);
                s[j][e] = pa;
                s[j][2 + e] = pb;
                sum_a += pa;
                sum_b += pb;
            }
        }
        l_a = l_a * al_a + sum_a;
        l_b = l_b * al_b + sum_b;
#pragma unroll
        for (int d = 0; d < DTILES; ++d) {
            o[d][0] *= al_a;
            o[d][1] *= al_a;
            o[d][2] *= al_b;
            o[d][3] *= al_b;
        }

        // O += P V: P (16 x 32) as two k-steps of 16 positions.
#pragma unroll
        for (int kp = 0; kp < 2; ++kp) {
            const u32 a0 = f32x2_to_bf16x2(s[2 * kp][0], s[2 * kp][1]);
            const u32 a1 = f32x2_to_bf16x2(s[2 * kp][2], s[2 * kp][3]);
            const u32 a2 = f32x2_to_bf16x2(s[2 * kp + 1][0], s[2 * kp + 1][1]);
            const u32 a3 = f32x2_to_bf16x2(s[2 * kp + 1][2], s[2 * kp + 1][3]);
#pragma unroll
            for (int d = 0; d < DTILES; d += 2) {
                u32 b0, b1, b2, b3;
                ldmatrix_x4_trans(b0, b1, b2, b3, v_lane + 2u * (kp * 16 * PITCH + d * 8));
                mma_bf16(o[d], a0, a1, a2, a3, b0, b1);
                mma_bf16(o[d + 1], a0, a1, a2, a3, b2, b3);
            }
        }
    }

    // Full row sums (the quad's shares), normalise, write bf16.
    l_a += __shfl_xor_sync(FULL_MASK, l_a, 1);
    l_a += __shfl_xor_sync(FULL_MASK, l_a, 2);
    l_b += __shfl_xor_sync(FULL_MASK, l_b, 1);
    l_b += __shfl_xor_sync(FULL_MASK, l_b, 2);
    const float inv_a = l_a > 0.0f ? 1.0f / l_a : 0.0f;
    const float inv_b = l_b > 0.0f ? 1.0f / l_b : 0.0f;
    if (tok_a < T) {
        u32* dst = reinterpret_cast<u32*>(out + ((u64)tok_a * NH + head_a) * HS);
#pragma unroll
        for (int d = 0; d < DTILES; ++d) {
            dst[(d * 8 + 2 * t) / 2] = f32x2_to_bf16x2(o[d][0] * inv_a, o[d][1] * inv_a);
        }
    }
    if (tok_b < T) {
        u32* dst = reinterpret_cast<u32*>(out + ((u64)tok_b * NH + head_b) * HS);
#pragma unroll
        for (int d = 0; d < DTILES; ++d) {
            dst[(d * 8 + 2 * t) / 2] = f32x2_to_bf16x2(o[d][2] * inv_b, o[d][3] * inv_b);
        }
    }
}

#define FLASH_ENTRY_POINT(HS)                                                              \
    extern "C" __global__ void __launch_bounds__(128) flash_prefill_bf16_hs##HS(           \
        bf16_t* out, const bf16_t* q, const bf16_t* k_arena, const bf16_t* v_arena,       \
        const u32* table, u32 pos0, u32 T, u32 NH, u32 NKV, u32 BS, float scale) {         \
        flash_prefill<HS>(out, q, k_arena, v_arena, table, pos0, T, NH, NKV, BS, scale);   \
    }

FLASH_ENTRY_POINT(64)
FLASH_ENTRY_POINT(128)
