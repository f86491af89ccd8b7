// A decode step's attention on the CPU in one call: rotary embedding of q and k, the new k/v written to
// their slots of the paged cache, and softmax(q·kᵀ·scale)·v over each sequence's cached tokens read
// straight through its block table (no gathered copy of the blocks).
//
// The oracle is the PyTorch path: layers/rotary.apply_rotary, attention_torch.store_kv and
// attention_torch.paged_decode_attention. Rotary and the stored values are the same float32 operations in
// the same order (bit for bit); the attention itself agrees to float32 rounding.
//
// Shapes (S sequences, one new token each; H query heads, KVH kv heads, D head_dim, BS block size):
//   qkv [S, (H + 2 KVH) · D] float32, row stride ld_qkv: the fused q/k/v projection, before rotary
//   cos, sin [S, D] float32: the rotate-half tables of each sequence's position
//   k_cache, v_cache [num_blocks, BS, KVH, D] float32; slot_mapping [S] int64
//   block_tables [S, max_blocks] int32; context_lens [S] int32 (the new token included)
//   out [S, H · D] float32

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vec_math.h"

// x [D] rotated by position (rotate-half layout): x·cos + (-x2, x1)·sin, as apply_rotary computes it.
static void rotate(const float *x, const float *cos, const float *sin, int64_t D, float *out) {
    int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) out[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
    for (int64_t i = half; i < D; i++) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

static inline __attribute__((always_inline)) float dot(const float *a, const float *b, int64_t D) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) {
        __mmask16 m = tail_mask(D - i);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

// One (sequence, kv head): its G = H / KVH query heads attend to keys [start, ctx).
static inline __attribute__((always_inline)) void attend_group(const float *q, int64_t G, int64_t D, const float *k_cache, const float *v_cache,
                         const int32_t *block_table, int64_t BS, int64_t KVH, int64_t kvh, int64_t start,
                         int64_t ctx, float scale, float *scores, float *out) {
    const int64_t n = ctx - start, row = KVH * D;
    // Token t's row is block_table[t / BS] * BS + t % BS; walked block by block (a 64-bit division per
    // token cost more than the dot products).
    for (int64_t t = start; t < ctx;) {
        const float *k = k_cache + ((int64_t)block_table[t / BS] * BS + t % BS) * row + kvh * D;
        for (int64_t end = t + BS - t % BS < ctx ? t + BS - t % BS : ctx; t < end; t++, k += row)
            for (int64_t g = 0; g < G; g++) scores[g * n + (t - start)] = dot(q + g * D, k, D) * scale;
    }
    for (int64_t g = 0; g < G; g++) {
        float *s = scores + g * n;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t i = 0; i < n; i += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, tail_mask(n - i), s + i));
        const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 total = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 m = tail_mask(n - i);
            __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + i), max)));
            _mm512_mask_storeu_ps(s + i, m, e);
            total = _mm512_add_ps(total, e);
        }
        const float inv = 1.0f / _mm512_reduce_add_ps(total);
        // out = Σ_t p_t · v_t, 64 values of the head at a time (four accumulators in registers).
        float *o = out + g * D;
        for (int64_t i = 0; i < D; i += 64) {
            const __mmask16 m0 = tail_mask(D - i), m1 = tail_mask(D - i - 16), m2 = tail_mask(D - i - 32),
                            m3 = tail_mask(D - i - 48);
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t t = start; t < ctx;) {
                const float *v = v_cache + ((int64_t)block_table[t / BS] * BS + t % BS) * row + kvh * D + i;
                for (int64_t end = t + BS - t % BS < ctx ? t + BS - t % BS : ctx; t < end; t++, v += row) {
                    const __m512 p = _mm512_set1_ps(s[t - start]);
                    a0 = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(m0, v), a0);
                    if (D - i > 16) a1 = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(m1, v + 16), a1);
                    if (D - i > 32) a2 = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(m2, v + 32), a2);
                    if (D - i > 48) a3 = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(m3, v + 48), a3);
                }
            }
            const __m512 r = _mm512_set1_ps(inv);
            _mm512_mask_storeu_ps(o + i, m0, _mm512_mul_ps(a0, r));
            if (D - i > 16) _mm512_mask_storeu_ps(o + i + 16, m1, _mm512_mul_ps(a1, r));
            if (D - i > 32) _mm512_mask_storeu_ps(o + i + 32, m2, _mm512_mul_ps(a2, r));
            if (D - i > 48) _mm512_mask_storeu_ps(o + i + 48, m3, _mm512_mul_ps(a3, r));
        }
    }
}

// window > 0: each query sees only its last `window` keys (the model's sliding window).
void gb_decode_attention(const float *qkv, int64_t S, int64_t ld_qkv, const float *cos, const float *sin,
                         float *k_cache, float *v_cache, const int64_t *slot_mapping, const int32_t *block_tables,
                         int64_t max_blocks, const int32_t *context_lens, int64_t H, int64_t KVH, int64_t D,
                         int64_t BS, float scale, int64_t window, float *out) {
    const int64_t G = H / KVH, row = KVH * D;
    // Tasks are (sequence, kv head) pairs, contiguous per thread: a thread reads whole cache rows mostly.
#pragma omp parallel for schedule(static)
    for (int64_t task = 0; task < S * KVH; task++) {
        const int64_t s = task / KVH, kvh = task % KVH;
        const float *x = qkv + s * ld_qkv, *c = cos + s * D, *sn = sin + s * D;
        // This head's new key (rotated) and value go to the cache first: the token attends to itself.
        const int64_t slot = slot_mapping[s];
        rotate(x + (H + kvh) * D, c, sn, D, k_cache + slot * row + kvh * D);
        const float *v = x + (H + KVH + kvh) * D;
        for (int64_t i = 0; i < D; i++) v_cache[slot * row + kvh * D + i] = v[i];

        const int64_t ctx = context_lens[s];
        const int64_t start = window > 0 && ctx > window ? ctx - window : 0;
        float *q = malloc(sizeof(float) * (size_t)(G * D));
        float *scores = malloc(sizeof(float) * (size_t)(G * (ctx - start)));
        for (int64_t g = 0; g < G; g++) rotate(x + (kvh * G + g) * D, c, sn, D, q + g * D);
        // Constant head sizes for the common cases: the loops over D unroll.
#define ATTEND(HEAD_DIM)                                                                                      \
    attend_group(q, G, HEAD_DIM, k_cache, v_cache, block_tables + s * max_blocks, BS, KVH, kvh, start, ctx, scale, \
                 scores, out + s * H * D + kvh * G * D)
        if (D == 64) ATTEND(64);
        else if (D == 128) ATTEND(128);
        else ATTEND(D);
#undef ATTEND
        free(q);
        free(scores);
    }
}
