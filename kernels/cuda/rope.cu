// rope.cu: RoPE on Q and K, fused with writing K and V into the paged KV cache.
// Same math as kernels/src/reference/rope.rs (rotate-half form, transformers'
// apply_rotary_pos_emb): for i < HS/2, f = pos * inv_freq[i] in f32,
//   out[i]        = x[i] * cos(f) - x[i + HS/2] * sin(f)
//   out[i + HS/2] = x[i + HS/2] * cos(f) + x[i] * sin(f)
// computed in f32 (precise sincosf: positions reach 10^5), rounded once to bf16.
// inv_freq comes from the host, so Llama 3 style rope scaling is the host's business.
//
// Cache layout (docs/architecture.md, reference/attention_paged.rs): per layer a K arena
// and a V arena, each (NB, BS, NKV, HS) bf16. Sequence s owns the block table row
// block_tables[s * ld_table ..]; its position p lives in block table[p / BS] at offset
// p % BS, i.e. arena row ((table[p / BS] * BS + p % BS) * NKV + kv_head) * HS.
//
// rope_qkv_paged_bf16(q_out, k_arena, v_arena, qkv, positions, token_seq, block_tables,
//                     inv_freq, NH, NKV, HS, BS, ld_qkv, ld_table)
//   launch: grid (T tokens, Y), block 128 threads (any multiple of 32 up to 1024), no
//           smem. The Y blocks of a token share its (head, pair) items and V words
//           (grid-stride over blockIdx.y * blockDim.x + threadIdx.x): at decode one token
//           is then many blocks with one item each, not one block looping.
//   q_out        bf16 (T, NH, HS)   rotated queries
//   k_arena      bf16 (NB, BS, NKV, HS)  rotated K rows written at each token's slot
//   v_arena      bf16 (NB, BS, NKV, HS)  V rows copied to each token's slot
//   qkv          bf16 (T, ld_qkv)   the QKV projection: Q at column 0 (NH*HS wide), K at
//                                   NH*HS (NKV*HS wide), V at (NH+NKV)*HS (NKV*HS wide)
//   positions    u32 (T)            position of each token in its sequence
//   token_seq    u32 (T)            which block-table row (sequence) each token belongs to
//                                   (decode: token t of sequence t; prefill: all the same)
//   block_tables u32 (n_seqs, ld_table)
//   inv_freq     f32 (HS/2)
//   HS must be even. Thread k handles pairs (head, i) = (k / (HS/2), k % (HS/2)): reads of
//   x[i] and x[i + HS/2] by consecutive threads are coalesced.

extern "C" __global__ void rope_qkv_paged_bf16(bf16_t* __restrict__ q_out,
                                               bf16_t* __restrict__ k_arena,
                                               bf16_t* __restrict__ v_arena,
                                               const bf16_t* __restrict__ qkv,
                                               const u32* __restrict__ positions,
                                               const u32* __restrict__ token_seq,
                                               const u32* __restrict__ block_tables,
                                               const float* __restrict__ inv_freq,
                                               u32 NH, u32 NKV, u32 HS, u32 BS,
                                               u32 ld_qkv, u32 ld_table) {
    const u32 t = blockIdx.x;
    const u32 pos = positions[t];
    const u32* table = block_tables + (u64)token_seq[t] * ld_table;
    const u32 block = table[pos / BS];
    // Arena row of KV head 0 at this token's slot.
    const u64 slot = ((u64)block * BS + pos % BS) * NKV * HS;
    const bf16_t* src = qkv + (u64)t * ld_qkv;
    const u32 half = HS / 2;

    // Q and K heads, rotated. Heads 0..NH are Q, NH..NH+NKV are K (adjacent in qkv).
    const u32 n_pairs = (NH + NKV) * half;
    const u32 first = blockIdx.y * blockDim.x + threadIdx.x;
    const u32 stride = gridDim.y * blockDim.x;
    for (u32 k = first; k < n_pairs; k += stride) {
        const u32 head = k / half;
        const u32 i = k - head * half;
        const bf16_t* x = src + (u64)head * HS;
        const float a = bf16_to_f32(x[i]);
        const float b = bf16_to_f32(x[i + half]);
        float s, c;
        sincosf((float)pos * inv_freq[i], &s, &c);
        bf16_t* dst = head < NH ? q_out + ((u64)t * NH + head) * HS
                                : k_arena + slot + (u64)(head - NH) * HS;
        dst[i] = f32_to_bf16(a * c - b * s);
        dst[i + half] = f32_to_bf16(b * c + a * s);
    }

    // V heads, copied (bf16 bits unchanged).
    const bf16_t* v = src + (u64)(NH + NKV) * HS;
    for (u32 k = first; k < NKV * HS; k += stride) {
        v_arena[slot + k] = v[k];
    }
}
