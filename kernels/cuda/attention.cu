// attention.cu: decode attention over the paged KV cache: plain, and shared-prefix
// (cascade) with log-sum-exp merging. Same math as kernels/src/reference/attention_paged.rs:
// o = sum_s softmax_s(scale * q.k_s) v_s, scale = 1/sqrt(HS), query head h reads KV head
// h / G (G = NH / NKV); a part over a subset of positions returns its normalised output
// o_i and lse_i = ln sum_s exp(scale * q.k_s); parts merge exactly as
// o = sum_i exp(lse_i - lse) o_i, lse = ln sum_i exp(lse_i); an empty part is
// (o = 0, lse = -inf), the identity of the merge.
//
// Cache: K and V arenas (NB, BS, NKV, HS) bf16; a block table is u32 block ids, position
// p in block table[p / BS] at offset p % BS (see rope.cu).
//
// Common scheme of both attention kernels (one CTA = one KV head and a set of query rows
// that all read it): positions are walked in tiles of TILE = 32; each tile's K and V rows
// for this KV head are loaded ONCE into shared memory (16-byte coalesced global loads,
// rows padded to HS/2 + 1 words so lane j reading row j is bank-conflict free) and used
// by every query row of the CTA. A warp owns up to RPW query rows; in the score pass lane
// j scores position j of the tile against the row's query (query rows sit in smem as
// f32), then the row's online softmax (running max m and sum l in the log2 domain,
// warp_max / warp_sum with __shfl_xor_sync) rescales its accumulator; in the PV pass each
// lane owns HS/32 output dims and the probabilities are broadcast with __shfl_sync.
// Entry points exist for HS = 64 (SmolLM2) and HS = 128 (Llama 3 8B/70B, Mistral);
// suffix _hs64 / _hs128.
//
// ---------------------------------------------------------------------------------------
// paged_decode_attention_bf16_hs{64,128}(out, q, k_arena, v_arena, block_tables,
//                                         ld_table, seq_lens, NH, NKV, BS, scale)
//   Plain paged decode: each sequence's one new query attends its positions 0..len.
//   launch: grid (NKV, B), block 32 * G threads (one warp per query head of the KV head's
//           group; G <= 32), no dynamic smem. Parallelism is B * NKV CTAs: use the
//           partial + merge kernels below with position splits when that is below ~2x
//           the SM count (short batches, long contexts).
//   out          bf16 (B, NH, HS)
//   q            bf16 (B, NH, HS)  RoPE already applied (rope.cu)
//   block_tables u32 (B, ld_table)
//   seq_lens     u32 (B); a length of 0 gives a zero output row
//   scale        1/sqrt(HS)
//
// ---------------------------------------------------------------------------------------
// attention_partial_bf16_hs{64,128}(states_o, states_lse, q, k_arena, v_arena, tables,
//                                    items, NH, NKV, BS, scale)
//   The cascade building block: one work item = one range of positions of one block
//   table, attended by the queries of a contiguous range of sequences, written as
//   merge-ready attention states. A shared prefix level with M member sequences is one
//   item (or a few) whose K/V tiles are read once for all M * G query rows; each
//   sequence's own suffix is an item with one member.
//   launch: grid (n_items, NKV), block 32 * W threads with W in 1..=8 warps, no dynamic
//           smem. An item's rows M * G must be <= RPW * W (RPW = 4): at most 32 rows.
//   items  u32 (n_items, 7), row = { table_off, pos_start, pos_end, seq_start,
//          seq_count, slot, causal }: the item attends positions pos_start..pos_end of
//          the table at tables + table_off, for the query heads of sequences
//          seq_start..seq_start + seq_count; member m writes state slot `slot + m`.
//          causal > 0 (causal prefill, rows grouped as a query tile): member m sees only
//          positions below causal + m (a member that sees none writes (0, -inf)).
//   tables u32: all block tables of the step, concatenated
//   q      bf16 (B, NH, HS)
//   states_o   f32 (n_slots, NH, HS)  normalised partial outputs
//   states_lse f32 (n_slots, NH)      their lse (natural log); an empty range writes
//              (0, -inf). Only the heads of the CTA's KV head are written.
//   Host recipe for cascade decode (reference cascade_decode_attention): for each level
//   (members a..b, P positions) and each sequence's suffix (members b..b+1, S_b
//   positions), emit items that split the members into chunks of <= 32 / G sequences
//   and, for long ranges, the positions into splits (split-K: more CTAs); give each item
//   fresh slots, and list for every sequence the slots of all items it is a member of.
//
// attention_merge_states_bf16(out, states_o, states_lse, merge_offsets, merge_slots, NH, HS)
//   out[b, h] = merge of the states (slot, h) for slot in
//   merge_slots[merge_offsets[b] .. merge_offsets[b + 1]] (CSR); no slots, or all lse =
//   -inf, gives a zero row (never NaN).
//   launch: grid (NH, B), block 32 * W threads, W in 1..=4 (MERGE_WARPS; the warps split
//           the slots and meet in static smem), no dynamic smem; HS <= 256.
//   out bf16 (B, NH, HS); merge_offsets u32 (B + 1); merge_slots u32 (total).
// ---------------------------------------------------------------------------------------

#define TILE 32
#define RPW 4
#define MAX_ROWS 32
#define ITEM_WORDS 7

template <int HS>
struct Shape {
    static constexpr int WORDS = HS / 2;   // u32 words (bf16 pairs) per K/V row
    static constexpr int PITCH = WORDS + 1; // smem row pitch in words: conflict-free rows
    static constexpr int WPL = WORDS / 32;  // words per lane in the PV pass
    static constexpr int CHUNKS = HS / 8;   // 16-byte chunks per row
};

// Load positions tile_start .. tile_start + TILE (clipped to pos_end, the rest zero) of
// KV head kvh into the smem tiles. All threads of the CTA take part. Each thread issues
// the global loads of LOAD_BATCH chunks (block ids, then K and V) before it stores any
// of them: a CTA of a few warps then waits for one round of load latency per batch, not
// one per chunk. (A batch of 4 took attention_partial to 72 registers, 3 CTAs of 256
// threads per SM instead of 4, and the K = 16 step's attention from 41 to 51 us on an
// H200; 2 keeps 64.)
#define LOAD_BATCH 2
template <int HS>
__device__ __forceinline__ void load_kv_tile(u32* k_tile, u32* v_tile,
                                             const bf16_t* __restrict__ k_arena,
                                             const bf16_t* __restrict__ v_arena,
                                             const u32* __restrict__ table,
                                             u32 tile_start, u32 pos_end, u32 kvh,
                                             u32 NKV, u32 BS) {
    typedef Shape<HS> S;
    const u32 n = TILE * S::CHUNKS;
    for (u32 c0 = threadIdx.x; c0 < n; c0 += LOAD_BATCH * blockDim.x) {
        uint4 kv[LOAD_BATCH];
        uint4 vv[LOAD_BATCH];
#pragma unroll
        for (int b = 0; b < LOAD_BATCH; ++b) {
            const u32 c = c0 + b * blockDim.x;
            const u32 r = c / S::CHUNKS;
            const u32 p = tile_start + r;
            kv[b] = make_uint4(0u, 0u, 0u, 0u);
            vv[b] = make_uint4(0u, 0u, 0u, 0u);
            if (c < n && p < pos_end) {
                const u32 ch = c - r * S::CHUNKS;
                const u32 block = table[p / BS];
                const u64 off = (((u64)block * BS + p % BS) * NKV + kvh) * HS + ch * 8;
                kv[b] = *reinterpret_cast<const uint4*>(k_arena + off);
                vv[b] = *reinterpret_cast<const uint4*>(v_arena + off);
            }
        }
#pragma unroll
        for (int b = 0; b < LOAD_BATCH; ++b) {
            const u32 c = c0 + b * blockDim.x;
            if (c < n) {
                const u32 r = c / S::CHUNKS;
                const u32 ch = c - r * S::CHUNKS;
                u32* kd = k_tile + r * S::PITCH + ch * 4;
                u32* vd = v_tile + r * S::PITCH + ch * 4;
                kd[0] = kv[b].x; kd[1] = kv[b].y; kd[2] = kv[b].z; kd[3] = kv[b].w;
                vd[0] = vv[b].x; vd[1] = vv[b].y; vd[2] = vv[b].z; vd[3] = vv[b].w;
            }
        }
    }
}

// Online-softmax attention of this warp's rows (warp + k * n_warps for k < rows_per_warp,
// those below n_rows) over positions pos_start..pos_end of `table`; with causal > 0, row
// r (member r / G) sees only positions below causal + r / G. q_s holds the CTA's query
// rows as f32 (n_rows, HS). On return o[k] is the lane's 2 * WPL output dims (dims
// 2 * (lane * WPL + w) and +1) normalised, and lse[k] the natural-log lse (a row that
// saw no position: o = 0, lse = -inf).
// Contains __syncthreads: every thread of the CTA must call it.
template <int HS, int R>
__device__ __forceinline__ void attend_tiles(float (&o)[R][2 * Shape<HS>::WPL],
                                             float (&lse)[R],
                                             const float* q_s, u32 n_rows,
                                             u32* k_tile, u32* v_tile,
                                             const bf16_t* __restrict__ k_arena,
                                             const bf16_t* __restrict__ v_arena,
                                             const u32* __restrict__ table,
                                             u32 pos_start, u32 pos_end, u32 kvh,
                                             u32 NKV, u32 BS, float scale, u32 causal,
                                             u32 G) {
    typedef Shape<HS> S;
    const u32 lane = threadIdx.x & 31;
    const u32 warp = threadIdx.x >> 5;
    const u32 n_warps = blockDim.x >> 5;
    const float scale_log2 = scale * LOG2E;
    float m[R];
    float l[R];
#pragma unroll
    for (int k = 0; k < R; ++k) {
        m[k] = NEG_INF;
        l[k] = 0.0f;
#pragma unroll
        for (int d = 0; d < 2 * S::WPL; ++d) {
            o[k][d] = 0.0f;
        }
    }
    for (u32 t0 = pos_start; t0 < pos_end; t0 += TILE) {
        __syncthreads();  // the previous tile has been consumed by every warp
        load_kv_tile<HS>(k_tile, v_tile, k_arena, v_arena, table, t0, pos_end, kvh, NKV, BS);
        __syncthreads();
        const bool valid = t0 + lane < pos_end;
        float p[R];
#pragma unroll
        for (int k = 0; k < R; ++k) {
            p[k] = 0.0f;
            const u32 row = warp + k * n_warps;
            // Warp-uniform: the row exists and sees some position of this tile (causal
            // rows see a prefix of the positions: once a tile is past the row's limit,
            // so is every later one, and its p stays 0).
            const u32 limit = causal > 0 ? causal + row / G : 0xffffffffu;
            if (row < n_rows && t0 < limit) {
                const float2* q2 = reinterpret_cast<const float2*>(q_s + row * HS);
                const u32* kr = k_tile + lane * S::PITCH;
                float s = 0.0f;
#pragma unroll 16
                for (int w = 0; w < S::WORDS; ++w) {
                    const float2 kk = bf16x2_to_f32x2(kr[w]);
                    const float2 qq = q2[w];
                    s = fmaf(qq.x, kk.x, s);
                    s = fmaf(qq.y, kk.y, s);
                }
                s = (valid && t0 + lane < limit) ? s * scale_log2 : NEG_INF;
                // The tile's first position is valid for this row (t0 < limit and
                // t0 < pos_end), so m_new is finite.
                const float m_new = fmaxf(m[k], warp_max(s));
                const float alpha = exp2f(m[k] - m_new);
                p[k] = exp2f(s - m_new);
                l[k] = l[k] * alpha + warp_sum(p[k]);
                m[k] = m_new;
#pragma unroll
                for (int d = 0; d < 2 * S::WPL; ++d) {
                    o[k][d] *= alpha;
                }
            }
        }
        // PV: each V word is read from smem once per tile and used by all the warp's rows.
#pragma unroll 4
        for (int j = 0; j < TILE; ++j) {
            float2 v[S::WPL];
#pragma unroll
            for (int w = 0; w < S::WPL; ++w) {
                v[w] = bf16x2_to_f32x2(v_tile[j * S::PITCH + lane * S::WPL + w]);
            }
#pragma unroll
            for (int k = 0; k < R; ++k) {
                const float pj = __shfl_sync(FULL_MASK, p[k], j);
#pragma unroll
                for (int w = 0; w < S::WPL; ++w) {
                    o[k][2 * w] = fmaf(pj, v[w].x, o[k][2 * w]);
                    o[k][2 * w + 1] = fmaf(pj, v[w].y, o[k][2 * w + 1]);
                }
            }
        }
    }
#pragma unroll
    for (int k = 0; k < R; ++k) {
        if (l[k] > 0.0f) {
            const float inv = 1.0f / l[k];
#pragma unroll
            for (int d = 0; d < 2 * S::WPL; ++d) {
                o[k][d] *= inv;
            }
            lse[k] = (m[k] + log2f(l[k])) * LN2;
        } else {
            lse[k] = NEG_INF;  // empty range: o stays 0
        }
    }
}

// Gather query rows into smem as f32: row r = m * G + j is query head kvh * G + j of
// sequence seq_start + m. 16-byte loads (HS % 8 == 0).
template <int HS>
__device__ __forceinline__ void load_queries(float* q_s, const bf16_t* __restrict__ q,
                                             u32 seq_start, u32 n_rows, u32 G, u32 NH,
                                             u32 kvh) {
    typedef Shape<HS> S;
    for (u32 c = threadIdx.x; c < n_rows * S::CHUNKS; c += blockDim.x) {
        const u32 r = c / S::CHUNKS;
        const u32 ch = c - r * S::CHUNKS;
        const u32 m = r / G;
        const u32 j = r - m * G;
        const u64 off = ((u64)(seq_start + m) * NH + kvh * G + j) * HS + ch * 8;
        const uint4 w = *reinterpret_cast<const uint4*>(q + off);
        float* d = q_s + r * HS + ch * 8;
        const float2 a = bf16x2_to_f32x2(w.x);
        const float2 b = bf16x2_to_f32x2(w.y);
        const float2 e = bf16x2_to_f32x2(w.z);
        const float2 f = bf16x2_to_f32x2(w.w);
        d[0] = a.x; d[1] = a.y; d[2] = b.x; d[3] = b.y;
        d[4] = e.x; d[5] = e.y; d[6] = f.x; d[7] = f.y;
    }
}

template <int HS>
__device__ __forceinline__ void paged_decode(bf16_t* __restrict__ out,
                                             const bf16_t* __restrict__ q,
                                             const bf16_t* __restrict__ k_arena,
                                             const bf16_t* __restrict__ v_arena,
                                             const u32* __restrict__ block_tables,
                                             u32 ld_table, const u32* __restrict__ seq_lens,
                                             u32 NH, u32 NKV, u32 BS, float scale) {
    typedef Shape<HS> S;
    __shared__ float q_s[MAX_ROWS * HS];
    __shared__ u32 k_tile[TILE * S::PITCH];
    __shared__ u32 v_tile[TILE * S::PITCH];
    const u32 kvh = blockIdx.x;
    const u32 b = blockIdx.y;
    const u32 G = NH / NKV;
    load_queries<HS>(q_s, q, b, G, G, NH, kvh);  // visible after attend_tiles' barrier
    float o[1][2 * S::WPL];
    float lse[1];
    attend_tiles<HS, 1>(o, lse, q_s, G, k_tile, v_tile, k_arena, v_arena,
                        block_tables + (u64)b * ld_table, 0, seq_lens[b], kvh, NKV, BS,
                        scale, 0u, G);
    const u32 lane = threadIdx.x & 31;
    const u32 j = threadIdx.x >> 5;
    if (j < G) {
        u32* dst = reinterpret_cast<u32*>(out + ((u64)b * NH + kvh * G + j) * HS);
#pragma unroll
        for (int w = 0; w < S::WPL; ++w) {
            dst[lane * S::WPL + w] = f32x2_to_bf16x2(o[0][2 * w], o[0][2 * w + 1]);
        }
    }
}

template <int HS>
__device__ __forceinline__ void attention_partial(float* __restrict__ states_o,
                                                  float* __restrict__ states_lse,
                                                  const bf16_t* __restrict__ q,
                                                  const bf16_t* __restrict__ k_arena,
                                                  const bf16_t* __restrict__ v_arena,
                                                  const u32* __restrict__ tables,
                                                  const u32* __restrict__ items,
                                                  u32 NH, u32 NKV, u32 BS, float scale) {
    typedef Shape<HS> S;
    __shared__ float q_s[MAX_ROWS * HS];
    __shared__ u32 k_tile[TILE * S::PITCH];
    __shared__ u32 v_tile[TILE * S::PITCH];
    const u32* item = items + (u64)blockIdx.x * ITEM_WORDS;
    const u32 table_off = item[0];
    const u32 pos_start = item[1];
    const u32 pos_end = item[2];
    const u32 seq_start = item[3];
    const u32 seq_count = item[4];
    const u32 slot = item[5];
    const u32 causal = item[6];
    const u32 kvh = blockIdx.y;
    const u32 G = NH / NKV;
    const u32 n_rows = min(seq_count * G, min((u32)MAX_ROWS, RPW * (blockDim.x >> 5)));
    load_queries<HS>(q_s, q, seq_start, n_rows, G, NH, kvh);
    float o[RPW][2 * S::WPL];
    float lse[RPW];
    attend_tiles<HS, RPW>(o, lse, q_s, n_rows, k_tile, v_tile, k_arena, v_arena,
                          tables + table_off, pos_start, pos_end, kvh, NKV, BS, scale, causal,
                          G);
    const u32 lane = threadIdx.x & 31;
    const u32 warp = threadIdx.x >> 5;
    const u32 n_warps = blockDim.x >> 5;
#pragma unroll
    for (int k = 0; k < RPW; ++k) {
        const u32 row = warp + k * n_warps;
        if (row < n_rows) {
            const u32 m = row / G;
            const u32 j = row - m * G;
            const u64 state = (u64)(slot + m) * NH + kvh * G + j;
            float2* dst = reinterpret_cast<float2*>(states_o + state * HS);
#pragma unroll
            for (int w = 0; w < S::WPL; ++w) {
                dst[lane * S::WPL + w] = make_float2(o[k][2 * w], o[k][2 * w + 1]);
            }
            if (lane == 0) {
                states_lse[state] = lse[k];
            }
        }
    }
}

#define ATTENTION_ENTRY_POINTS(HS)                                                        \
    extern "C" __global__ void paged_decode_attention_bf16_hs##HS(                        \
        bf16_t* out, const bf16_t* q, const bf16_t* k_arena, const bf16_t* v_arena,      \
        const u32* block_tables, u32 ld_table, const u32* seq_lens, u32 NH, u32 NKV,     \
        u32 BS, float scale) {                                                            \
        paged_decode<HS>(out, q, k_arena, v_arena, block_tables, ld_table, seq_lens, NH,  \
                         NKV, BS, scale);                                                 \
    }                                                                                     \
    extern "C" __global__ void attention_partial_bf16_hs##HS(                             \
        float* states_o, float* states_lse, const bf16_t* q, const bf16_t* k_arena,      \
        const bf16_t* v_arena, const u32* tables, const u32* items, u32 NH, u32 NKV,     \
        u32 BS, float scale) {                                                            \
        attention_partial<HS>(states_o, states_lse, q, k_arena, v_arena, tables, items,   \
                              NH, NKV, BS, scale);                                        \
    }

ATTENTION_ENTRY_POINTS(64)
ATTENTION_ENTRY_POINTS(128)

#define MERGE_DIMS 8   // HS <= 32 * MERGE_DIMS
#define MERGE_WARPS 4  // warps per (head, sequence): each takes every 4th round of slots

extern "C" __global__ void attention_merge_states_bf16(bf16_t* __restrict__ out,
                                                       const float* __restrict__ states_o,
                                                       const float* __restrict__ states_lse,
                                                       const u32* __restrict__ merge_offsets,
                                                       const u32* __restrict__ merge_slots,
                                                       u32 NH, u32 HS) {
    __shared__ float part[MERGE_WARPS][32 * MERGE_DIMS];
    __shared__ float part_den[MERGE_WARPS];
    __shared__ float part_max[MERGE_WARPS];
    const u32 h = blockIdx.x;
    const u32 b = blockIdx.y;
    const u32 lane = threadIdx.x & 31;
    const u32 warp = threadIdx.x >> 5;
    const u32 n_warps = blockDim.x >> 5;
    const u32 begin = merge_offsets[b];
    const u32 end = merge_offsets[b + 1];
    // Pass 1: the largest lse, all threads striding over the slots.
    float m = NEG_INF;
    for (u32 i = begin + threadIdx.x; i < end; i += blockDim.x) {
        m = fmaxf(m, states_lse[(u64)merge_slots[i] * NH + h]);
    }
    m = warp_max(m);
    if (lane == 0) {
        part_max[warp] = m;
    }
    __syncthreads();
    m = NEG_INF;
    for (u32 w = 0; w < n_warps; ++w) {
        m = fmaxf(m, part_max[w]);
    }
    bf16_t* dst = out + ((u64)b * NH + h) * HS;
    if (m == NEG_INF) {  // the same for every thread of the block
        for (u32 d = threadIdx.x; d < HS; d += blockDim.x) {
            dst[d] = 0;
        }
        return;
    }
    // Pass 2, rounds of 32 slots, warp w taking rounds w, w + n_warps, ...: lane i reads
    // slot i's id and lse and computes its weight; the round's slots are broadcast
    // (__shfl_sync) and every lane adds its dims d = lane + 32 j of each. The row loads
    // of a round depend on no other load, so they overlap.
    float acc[MERGE_DIMS];
#pragma unroll
    for (int j = 0; j < MERGE_DIMS; ++j) {
        acc[j] = 0.0f;
    }
    float denom = 0.0f;
    for (u32 i0 = begin + 32 * warp; i0 < end; i0 += 32 * n_warps) {
        const u32 n = min(32u, end - i0);
        u64 state = 0;
        float w = 0.0f;
        if (lane < n) {
            state = (u64)merge_slots[i0 + lane] * NH + h;
            w = exp2f((states_lse[state] - m) * LOG2E);
        }
        denom += warp_sum(w);
#pragma unroll 4
        for (u32 k = 0; k < n; ++k) {
            const float wk = __shfl_sync(FULL_MASK, w, k);
            const u64 sk = __shfl_sync(FULL_MASK, state, k);
            const float* o = states_o + sk * HS;
#pragma unroll
            for (int j = 0; j < MERGE_DIMS; ++j) {
                const u32 d = lane + 32 * j;
                if (d < HS) {
                    acc[j] = fmaf(wk, o[d], acc[j]);
                }
            }
        }
    }
    // The warps' partial sums meet in shared memory.
#pragma unroll
    for (int j = 0; j < MERGE_DIMS; ++j) {
        const u32 d = lane + 32 * j;
        if (d < HS) {
            part[warp][d] = acc[j];
        }
    }
    if (lane == 0) {
        part_den[warp] = denom;
    }
    __syncthreads();
    float den = 0.0f;
    for (u32 w = 0; w < n_warps; ++w) {
        den += part_den[w];
    }
    const float inv = 1.0f / den;
    for (u32 d = threadIdx.x; d < HS; d += blockDim.x) {
        float a = 0.0f;
        for (u32 w = 0; w < n_warps; ++w) {
            a += part[w][d];
        }
        dst[d] = f32_to_bf16(a * inv);
    }
}
