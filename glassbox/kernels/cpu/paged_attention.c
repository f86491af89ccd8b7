// A step's attention on the CPU in one call, for prefill chunks and decode tokens alike: rotary embedding
// of q and k, the new k/v written to their slots of the paged cache, then causal softmax(q·kᵀ·scale)·v of
// every new token over its sequence's cached tokens, read straight through the block table (no gathered
// copy of the blocks).
//
// The oracle is the PyTorch path: layers/rotary.apply_rotary, attention_torch.store_kv and
// attention_torch.attention. Rotary and the stored values are the same float32 operations in the same
// order (bit for bit); the attention itself agrees to float32 rounding.
//
// Shapes (T new tokens of S sequences; H query heads, KVH kv heads, G = H / KVH, D head_dim, BS block size):
//   qkv [T, (H + 2 KVH) · D] float32, row stride ld_qkv: the fused q/k/v projection, before rotary
//   cos, sin [T, D] float32: the rotate-half tables of each token's position
//   k_cache, v_cache [num_blocks, BS, KVH, D] float32, or bfloat16 (cache_bf16: stored rounded to nearest
//     even as torch's .to(torch.bfloat16), read widened to float32); slot_mapping [T] int64
//   query_start_loc [S + 1] int32: sequence s's new tokens are [start[s], start[s + 1])
//   block_tables [S, max_blocks] int32; context_lens [S] int32 (the new tokens included)
//   out [T, H · D] float32
//
// A task is a new token with all its heads, so that it reads whole cache rows (one kv head of it where a
// step has under 4 tokens). Per kv head: scores of 16 keys at a time (16 dot products summed across lanes
// by one transpose tree instead of 16 horizontal reductions), softmax, then Σ p·v with the accumulators of
// the kv head's query heads in registers, so that each value row is loaded once.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"
#include "vec_math.h"

// x [D] rotated by position (rotate-half layout): x·cos + (-x2, x1)·sin, as apply_rotary computes it.
static void rotate(const float *x, const float *cos, const float *sin, int64_t D, float *out) {
    int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) out[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
    for (int64_t i = half; i < D; i++) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

// 16 cache values from element i of row (masked lanes 0), as float32. bfloat16 is float32's top half.
static inline __attribute__((always_inline)) __m512 load16(const void *row, int64_t i, __mmask16 m, const int bf16) {
    if (bf16) {
        const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)row + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)row + i);
}

// x [D] float32 -> a cache row: copied, or rounded to bfloat16 as torch rounds finite values (to nearest,
// ties to even).
static void store_row(const float *x, int64_t D, void *row, const int bf16) {
    for (int64_t i = 0; i < D; i += 16) {
        const __mmask16 m = tail_mask(D - i);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        if (!bf16) {
            _mm512_mask_storeu_ps((float *)row + i, m, v);
            continue;
        }
        const __m512i bits = _mm512_castps_si512(v);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
        _mm256_mask_storeu_epi16((uint16_t *)row + i, m, _mm512_cvtepi32_epi16(rounded));
    }
}

// p[j] holds 16 partial sums of key j's dot product; returns lane j = Σ p[j] for the 16 keys.
static inline __attribute__((always_inline)) __m512 transpose_sum16(const __m512 p[16]) {
    __m512 a[8], b[4], c[2];
    // Within each 128-bit chunk, pairs of keys: [a0+a2, b0+b2, a1+a3, b1+b3].
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(p[2 * i], p[2 * i + 1]), _mm512_unpackhi_ps(p[2 * i], p[2 * i + 1]));
    // Four keys per chunk, one lane each: [k0, k1, k2, k3] partial sums of that chunk.
    for (int i = 0; i < 4; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
    // Then across the four chunks: pairs of chunks, then the pairs' sums.
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

// Lane j = q · rows[j] for the first n ≤ 16 rows (lanes past n are 0).
static inline __attribute__((always_inline)) __m512 dot16(const float *q, const char *const *rows, int n, int64_t D,
                                                          const int bf16) {
    __m512 p[16];
    for (int j = 0; j < 16; j++) p[j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 m = tail_mask(D - d);
        const __m512 qd = _mm512_maskz_loadu_ps(m, q + d);
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++)
            if (j < n) p[j] = _mm512_fmadd_ps(qd, load16(rows[j], d, m, bf16), p[j]);
    }
    return _mm512_maskz_mov_ps(tail_mask(n), transpose_sum16(p));
}

// s [n] -> softmax(s) in place.
static inline void softmax(float *s, int64_t n) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < n; i += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, tail_mask(n - i), s + i));
    const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 total = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        const __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + i), max)));
        _mm512_mask_storeu_ps(s + i, m, e);
        total = _mm512_add_ps(total, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int64_t i = 0; i < n; i += 16) _mm512_mask_storeu_ps(s + i, tail_mask(n - i), _mm512_mul_ps(_mm512_maskz_loadu_ps(tail_mask(n - i), s + i), inv));
}

// The query heads q [NK · G, D] of NK kv heads (kv head j's G heads are q[j·G ..]) over the n keys/values
// whose cache rows (from the first of the NK kv heads) are k_rows[t], v_rows[t]: out [NK · G, D].
// probs: scratch [NK · G, n].
static inline __attribute__((always_inline)) void attend(const float *q, int64_t NK, int64_t G, int64_t D,
                                                         const char *const *k_rows, const char *const *v_rows,
                                                         int64_t n, float scale, float *probs, float *out,
                                                         const int bf16) {
    const int64_t elem = bf16 ? 2 : 4;
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t t = 0; t < n; t += 16) {
        const int chunk = n - t < 16 ? (int)(n - t) : 16;
        // The next chunk's key rows, while this one computes.
        for (int64_t j = t + 16; j < t + 32 && j < n; j++)
            for (int64_t b = 0; b < NK * D * elem; b += 64) _mm_prefetch(k_rows[j] + b, _MM_HINT_T0);
        for (int64_t j = 0; j < NK; j++) {
            const char *kr[16];
            for (int i = 0; i < chunk; i++) kr[i] = k_rows[t + i] + j * D * elem;
            // (a full chunk with n a constant: no per-row checks)
            for (int64_t g = 0; g < G; g++) {
                const float *qg = q + (j * G + g) * D;
                const __m512 dots = chunk == 16 ? dot16(qg, kr, 16, D, bf16) : dot16(qg, kr, chunk, D, bf16);
                _mm512_mask_storeu_ps(probs + (j * G + g) * n + t, tail_mask(chunk), _mm512_mul_ps(dots, sc));
            }
        }
    }
    const int64_t G0 = G;
    G *= NK;
    for (int64_t g = 0; g < G; g++) softmax(probs + g * n, n);
    // out = Σ_t p_t · v_t: up to 256 values of a head (16 vectors) per pass, as many heads at once as fit in
    // 16 accumulators (4 heads of 64, 2 of 128), so each value row is loaded once per pass.
    for (int64_t d0 = 0; d0 < D; d0 += 256) {
        const int64_t width = D - d0 < 256 ? D - d0 : 256, nv = (width + 15) / 16, heads = 16 / nv;
        // heads of one kv head at a time (they read the same value rows)
        for (int64_t g0 = 0, gn; g0 < G; g0 += gn) {
            gn = G0 - g0 % G0 < heads ? G0 - g0 % G0 : heads;
            __m512 acc[16];
            for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
            for (int64_t t = 0; t < n; t++) {
                const char *v = v_rows[t] + ((g0 / G0) * D + d0) * elem;
                if (t + 8 < n)  // (the hardware prefetcher does not follow rows scattered over blocks)
                    for (int64_t b = 0; b < width * elem; b += 64) _mm_prefetch(v_rows[t + 8] + ((g0 / G0) * D + d0) * elem + b, _MM_HINT_T0);
                __m512 vv[16];
#pragma GCC unroll 16
                for (int c = 0; c < 16; c++)
                    if (c < nv) vv[c] = load16(v, 16 * c, tail_mask(width - 16 * c), bf16);
#pragma GCC unroll 16
                for (int h = 0; h < 16; h++) {
                    if (h >= gn) break;
                    const __m512 p = _mm512_set1_ps(probs[(g0 + h) * n + t]);
#pragma GCC unroll 16
                    for (int c = 0; c < 16; c++)
                        if (c < nv && h * nv + c < 16) acc[h * nv + c] = _mm512_fmadd_ps(p, vv[c], acc[h * nv + c]);
                }
            }
#pragma GCC unroll 16
            for (int h = 0; h < 16; h++) {
                if (h >= gn) break;
#pragma GCC unroll 16
                for (int c = 0; c < 16; c++)
                    if (c < nv && h * nv + c < 16)
                        _mm512_mask_storeu_ps(out + (g0 + h) * D + d0 + 16 * c, tail_mask(width - 16 * c), acc[h * nv + c]);
            }
        }
    }
}

// window > 0: each query sees only its last `window` keys (the model's sliding window).
void gb_paged_attention(const float *qkv, int64_t T, int64_t ld_qkv, const float *cos, const float *sin,
                        void *k_cache, void *v_cache, int cache_bf16, const int64_t *slot_mapping,
                        const int32_t *query_start_loc, int64_t S, const int32_t *block_tables, int64_t max_blocks,
                        const int32_t *context_lens, int64_t H, int64_t KVH, int64_t D, int64_t BS, float scale,
                        int64_t window, float *out) {
    const int64_t G = H / KVH, elem = cache_bf16 ? 2 : 4, row = KVH * D * elem;  // row: bytes per token
    // A task is a new token and all its heads (it reads whole cache rows), or one kv head of it where
    // the step has too few tokens to keep the threads busy (a batch-1 decode step).
    const int64_t KVT = T >= 4 ? 1 : KVH, NK = KVH / KVT;
    int64_t max_ctx = 0;
    int32_t *seq_of = malloc(sizeof(int32_t) * (size_t)T);  // token -> its sequence
    for (int64_t s = 0; s < S; s++) {
        for (int64_t t = query_start_loc[s]; t < query_start_loc[s + 1]; t++) seq_of[t] = (int32_t)s;
        if (context_lens[s] > max_ctx) max_ctx = context_lens[s];
    }
#pragma omp parallel
    {
        float *rotated = malloc(sizeof(float) * (size_t)D);
        // Every new key and value is in the cache before any token attends: a prefill token sees its
        // chunk's earlier tokens (and itself).
#pragma omp for schedule(static)
        for (int64_t task = 0; task < T * KVH; task++) {
            const int64_t t = task / KVH, kvh = task % KVH, at = slot_mapping[t] * row + kvh * D * elem;
            const float *x = qkv + t * ld_qkv;
            rotate(x + (H + kvh) * D, cos + t * D, sin + t * D, D, rotated);
            store_row(rotated, D, (char *)k_cache + at, cache_bf16);
            store_row(x + (H + KVH + kvh) * D, D, (char *)v_cache + at, cache_bf16);
        }  // (the loop's barrier)

        float *q = malloc(sizeof(float) * (size_t)(H * D));
        float *probs = malloc(sizeof(float) * (size_t)(H * max_ctx));
        const char **k_rows = malloc(sizeof(char *) * (size_t)(2 * max_ctx));
        const char **v_rows = k_rows + max_ctx;
        // Dynamic: a prefill's later tokens see more keys than its first ones.
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < T * KVT; task++) {
            const int64_t t = task / KVT, s = seq_of[t], kvh = task % KVT * NK;
            // This token is at position ctx - (tokens after it in the chunk) - 1; it sees keys [start, end).
            const int64_t end = context_lens[s] - (query_start_loc[s + 1] - 1 - t);
            const int64_t start = window > 0 && end > window ? end - window : 0, n = end - start;
            const int32_t *table = block_tables + s * max_blocks;
            // Key i's row is table[i / BS] * BS + i % BS; walked block by block (a 64-bit division per
            // key cost more than its dot product).
            for (int64_t i = start; i < end;) {
                const int64_t offset = ((int64_t)table[i / BS] * BS + i % BS) * row + kvh * D * elem;
                for (int64_t stop = i + BS - i % BS < end ? i + BS - i % BS : end, r = offset; i < stop; i++, r += row) {
                    k_rows[i - start] = (const char *)k_cache + r;
                    v_rows[i - start] = (const char *)v_cache + r;
                }
            }
            const float *x = qkv + t * ld_qkv;
            for (int64_t g = 0; g < NK * G; g++) rotate(x + (kvh * G + g) * D, cos + t * D, sin + t * D, D, q + g * D);
            float *o = out + t * H * D + kvh * G * D;
            // Constant head sizes and cache types for the common cases: the loops over D unroll.
#define ATTEND(HEAD_DIM, BF16) attend(q, NK, G, HEAD_DIM, k_rows, v_rows, n, scale, probs, o, BF16)
            if (cache_bf16) {
                if (D == 64) ATTEND(64, 1);
                else if (D == 128) ATTEND(128, 1);
                else ATTEND(D, 1);
            } else {
                if (D == 64) ATTEND(64, 0);
                else if (D == 128) ATTEND(128, 0);
                else ATTEND(D, 0);
            }
#undef ATTEND
        }
        free(rotated);
        free(q);
        free(probs);
        free(k_rows);
    }
    free(seq_of);
}
