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
// step has under 4 tokens). Per kv head: the scores of its query heads, softmax, then Σ p·v for up to
// PV_HEADS of its query heads at once (1.02-1.13x against a value row per query head at 32 tokens of 32-512
// keys, docs/benchmarks.md).

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"
#include "simd.h"

// Value rows stream through accumulators of up to PV_HEADS query heads x PV_VECS vectors of a row, in
// registers: each row is loaded (a bfloat16 one widened) once for all the heads of its kv head.
#define PV_HEADS 4
#define PV_VECS 4
// Value rows prefetched this many ahead (the first pass over a row's heads): a step's layers read more cache than
// the L3 holds, from scattered blocks (1.03-1.09x over 30 layers' caches; 16 ahead the same).
#define PV_AHEAD 8

// x [D] rotated by position (rotate-half layout): x·cos + (-x2, x1)·sin, as apply_rotary computes it.
static void rotate(const float *x, const float *cos, const float *sin, int64_t D, float *out) {
    int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) out[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
    for (int64_t i = half; i < D; i++) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

// Elements [i, i + min(n, VW)) of a cache row, as float32 (the others 0). bfloat16 is float32's top half.
GB_INLINE vf load_row(const void *row, int64_t i, int64_t n, const int bf16) {
    return bf16 ? vf_load_bf16_n((const uint16_t *)row + i, n) : vf_load_n((const float *)row + i, n);
}

GB_INLINE float bf16_widen(uint16_t x) {
    union { uint32_t u; float f; } v = {(uint32_t)x << 16};
    return v.f;
}

// x [D] float32 -> a cache row: copied, or rounded to bfloat16 as torch rounds finite values.
static void store_row(const float *x, int64_t D, void *row, const int bf16) {
    if (!bf16) {
        memcpy(row, x, sizeof(float) * (size_t)D);
        return;
    }
    for (int64_t i = 0; i < D; i++) ((uint16_t *)row)[i] = float_to_bf16(x[i]);
}

// s [n] -> softmax(s) in place.
static inline void softmax(float *s, int64_t n) {
    vf mx = vf_set1(-INFINITY);
    for (int64_t i = 0; i + VW <= n; i += VW) mx = vf_max(mx, vf_load(s + i));
    float top = vf_hmax(mx);
    for (int64_t i = n / VW * VW; i < n; i++) top = s[i] > top ? s[i] : top;
    const vf max = vf_set1(top);
    vf total = vf_zero();
    for (int64_t i = 0; i < n; i += VW) {
        const vf e = vf_exp(vf_sub(vf_load_n(s + i, n - i), max));
        vf_store_n(s + i, e, n - i);
        total = vf_add(total, vf_load_n(s + i, n - i));  // (the stored lanes only)
    }
    const vf inv = vf_set1(1.0f / vf_sum(total));
    for (int64_t i = 0; i < n; i += VW) vf_store_n(s + i, vf_mul(vf_load_n(s + i, n - i), inv), n - i);
}

// The query heads q [NK · G, D] of NK kv heads (kv head j's G heads are q[j·G ..]) over the n keys/values
// whose cache rows (from the first of the NK kv heads) are k_rows[t], v_rows[t]: out [NK · G, D].
// probs: scratch [NK · G, n].
GB_INLINE void attend(const float *q, int64_t NK, int64_t G, int64_t D, const char *const *k_rows,
                      const char *const *v_rows, int64_t n, float scale, float *probs, float *out, const int bf16) {
    const int64_t elem = bf16 ? 2 : 4;
    // Scores VW keys at a time: each key's products summed across lanes together (vf_sum_each).
    for (int64_t j = 0; j < NK; j++) {
        for (int64_t t0 = 0; t0 < n; t0 += VW) {
            const int64_t nt = n - t0 < VW ? n - t0 : VW;
            for (int64_t t = t0 + VW; t < t0 + 2 * VW && t < n; t++)  // (the hardware prefetcher does not follow
                for (int64_t b = 0; b < D * elem; b += 64) PREFETCH(k_rows[t] + j * D * elem + b);  // scattered rows)
            for (int64_t g = 0; g < G; g++) {
                const float *qg = q + (j * G + g) * D;
                vf dots[VW];
                for (int64_t i = 0; i < VW; i++) {
                    dots[i] = vf_zero();
                    if (i < nt)
                        for (int64_t d = 0; d < D; d += VW)
                            dots[i] = vf_fma(vf_load_n(qg + d, D - d), load_row(k_rows[t0 + i] + j * D * elem, d, D - d, bf16), dots[i]);
                }
                vf_store_n(probs + (j * G + g) * n + t0, vf_mul(vf_sum_each(dots), vf_set1(scale)), nt);
            }
        }
    }
    for (int64_t h = 0; h < NK * G; h++) softmax(probs + h * n, n);
    // out = Σ_t p_t · v_t, per kv head PV_HEADS of its heads by PV_VECS vectors of the row at a time.
    for (int64_t j = 0; j < NK; j++)
        for (int64_t g0 = 0; g0 < G; g0 += PV_HEADS)
            for (int64_t d0 = 0; d0 < D; d0 += PV_VECS * VW) {
                const float *p = probs + (j * G + g0) * n;
                vf acc[PV_HEADS][PV_VECS];
                for (int a = 0; a < PV_HEADS; a++)
                    for (int c = 0; c < PV_VECS; c++) acc[a][c] = vf_zero();
                for (int64_t t = 0; t < n; t++) {
                    const char *v = v_rows[t] + j * D * elem;
                    if (g0 == 0 && d0 == 0 && t + PV_AHEAD < n)
                        for (int64_t b = 0; b < D * elem; b += 64) PREFETCH(v_rows[t + PV_AHEAD] + j * D * elem + b);
                    vf row[PV_VECS];
#pragma GCC unroll 4
                    for (int c = 0; c < PV_VECS; c++) row[c] = load_row(v, d0 + c * VW, D - d0 - c * VW, bf16);
#pragma GCC unroll 4
                    for (int a = 0; a < PV_HEADS; a++) {
                        if (g0 + a >= G) break;
                        const vf pa = vf_set1(p[a * n + t]);
#pragma GCC unroll 4
                        for (int c = 0; c < PV_VECS; c++)
                            if (d0 + c * VW < D) acc[a][c] = vf_fma(pa, row[c], acc[a][c]);
                    }
                }
                for (int a = 0; a < PV_HEADS && g0 + a < G; a++)
                    for (int c = 0; c < PV_VECS && d0 + c * VW < D; c++)
                        vf_store_n(out + (j * G + g0 + a) * D + d0 + c * VW, acc[a][c], D - d0 - c * VW);
            }
}

// Quest's block summaries: sequence s's new tokens, in order, widen the min/max of their blocks' kv head kvh
// (a token at a block's first slot starts it afresh: the block may have held another sequence's keys).
// One call per sequence and kv head: a block is written by one sequence only.
static void update_summaries(float *summaries, const void *k_cache, int cache_bf16, const int64_t *slot_mapping,
                             int64_t first, int64_t end, int64_t kvh, int64_t KVH, int64_t D, int64_t BS) {
    const int64_t elem = cache_bf16 ? 2 : 4, row = KVH * D * elem;
    for (int64_t t = first; t < end; t++) {
        const int64_t slot = slot_mapping[t];
        const char *key = (const char *)k_cache + slot * row + kvh * D * elem;
        float *mn = summaries + ((slot / BS) * KVH + kvh) * 2 * D, *mx = mn + D;
        for (int64_t d = 0; d < D; d++) {
            const float k = cache_bf16 ? bf16_widen(((const uint16_t *)key)[d]) : ((const float *)key)[d];
            if (slot % BS == 0 || k < mn[d]) mn[d] = k;
            if (slot % BS == 0 || k > mx[d]) mx[d] = k;
        }
    }
}

// The k-th largest of a[0, n) (1 <= k <= n), by quickselect; a is reordered.
static float kth_largest(float *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    const int64_t target = k - 1;  // its index in descending order
    while (lo < hi) {
        const float pivot = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {  // Hoare's partition, larger values to the left
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                const float t = a[i];
                a[i++] = a[j];
                a[j--] = t;
            }
        }
        if (target <= j) hi = j;
        else if (target >= i) lo = i;
        else return a[target];  // between the halves: equal to the pivot
    }
    return a[target];
}

// Quest's choice for one decode token's kv head: its G query heads q [G, D] against the summaries of the
// sequence's nblocks blocks (table) -> keep [top] block indices (into table) in block order: the last
// block and the top - 1 others of highest bound, ties to the earlier block. bound, scratch: [nblocks].
static void quest_select(const float *q, int64_t G, int64_t D, const float *summaries, int64_t KVH, int64_t kvh,
                         const int32_t *table, int64_t nblocks, int64_t top, float *bound, float *scratch,
                         int32_t *keep) {
    for (int64_t b = 0; b < nblocks - 1; b++) {
        const float *mn = summaries + ((int64_t)table[b] * KVH + kvh) * 2 * D, *mx = mn + D;
        float best = -INFINITY;
        for (int64_t g = 0; g < G; g++) {
            vf total = vf_zero();
            for (int64_t d = 0; d < D; d += VW) {
                const vf qd = vf_load_n(q + g * D + d, D - d);
                total = vf_add(total, vf_max(vf_mul(qd, vf_load_n(mn + d, D - d)), vf_mul(qd, vf_load_n(mx + d, D - d))));
            }
            const float u = vf_sum(total);
            best = u > best ? u : best;
        }
        bound[b] = best;
    }
    // The (top - 1)-th highest bound (linear time), then one pass in block order: every block above it and
    // as many of those equal to it as are still needed, the earlier first.
    const int64_t need = top - 1, candidates = nblocks - 1;
    if (need == 0) {  // the last block only
        keep[0] = (int32_t)(nblocks - 1);
        return;
    }
    memcpy(scratch, bound, sizeof(float) * (size_t)candidates);
    const float kth = kth_largest(scratch, candidates, need);
    int64_t ties = need;
    for (int64_t b = 0; b < candidates; b++) ties -= bound[b] > kth;
    int64_t n = 0;
    for (int64_t b = 0; b < candidates && n < need; b++)
        if (bound[b] > kth || (bound[b] == kth && ties-- > 0)) keep[n++] = (int32_t)b;
    keep[n] = (int32_t)(nblocks - 1);
}

// window > 0: each query sees only its last `window` keys (the model's sliding window). quest: NULL, or
// Quest's summaries (kept up to date) and the sequences' block budgets (kernels.h). observe: NULL, or where
// tokens add the attention their keys received (kernels.h).
void gb_paged_attention(const float *qkv, int64_t T, int64_t ld_qkv, const float *cos, const float *sin,
                        void *k_cache, void *v_cache, int cache_bf16, const int64_t *slot_mapping,
                        const int32_t *query_start_loc, int64_t S, const int32_t *block_tables, int64_t max_blocks,
                        const int32_t *context_lens, int64_t H, int64_t KVH, int64_t D, int64_t BS, float scale,
                        int64_t window, const gb_quest *quest, const gb_observe *observe, float *out) {
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
        if (quest) {
#pragma omp for schedule(static)
            for (int64_t task = 0; task < S * KVH; task++)
                update_summaries(quest->summaries, k_cache, cache_bf16, slot_mapping, query_start_loc[task / KVH],
                                 query_start_loc[task / KVH + 1], task % KVH, KVH, D, BS);
        }  // (the loop's barrier: every summary is up to date before any token chooses)

        float *q = malloc(sizeof(float) * (size_t)(H * D));
        float *probs = malloc(sizeof(float) * (size_t)(H * max_ctx));
        const char **k_rows = malloc(sizeof(char *) * (size_t)(2 * max_ctx));
        const char **v_rows = k_rows + max_ctx;
        float *bound = quest ? malloc(sizeof(float) * (size_t)(2 * (max_ctx / BS + 1))) : NULL;  // + scratch
        int32_t *keep = quest ? malloc(sizeof(int32_t) * (size_t)(max_ctx / BS + 1)) : NULL;
        // Dynamic: a prefill's later tokens see more keys than its first ones.
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < T * KVT; task++) {
            const int64_t t = task / KVT, s = seq_of[t], kvh = task % KVT * NK;
            // This token is at position ctx - (tokens after it in the chunk) - 1; it sees keys [start, end).
            const int64_t end = context_lens[s] - (query_start_loc[s + 1] - 1 - t);
            const int64_t start = window > 0 && end > window ? end - window : 0, n = end - start;
            const int32_t *table = block_tables + s * max_blocks;
            const float *x = qkv + t * ld_qkv;
            for (int64_t g = 0; g < NK * G; g++) rotate(x + (kvh * G + g) * D, cos + t * D, sin + t * D, D, q + g * D);
            float *o = out + t * H * D + kvh * G * D;
            const int64_t nblocks = (end + BS - 1) / BS, top = quest && quest->top_blocks ? quest->top_blocks[s] : 0;
            if (top > 0 && window == 0 && query_start_loc[s + 1] - query_start_loc[s] == 1 && nblocks > top) {
                // Quest: per kv head, the rows of its chosen blocks only.
                for (int64_t j = 0; j < NK; j++) {
                    quest_select(q + j * G * D, G, D, quest->summaries, KVH, kvh + j, table, nblocks, top, bound,
                                 bound + max_ctx / BS + 1, keep);
                    if (quest->selected)
                        for (int64_t i = 0; i < top; i++) quest->selected[(t * KVH + kvh + j) * quest->selected_width + i] = keep[i];
                    int64_t m = 0;
                    for (int64_t i = 0; i < top; i++) {
                        const int64_t first = keep[i] * BS, last = first + BS < end ? first + BS : end;
                        const int64_t base = (int64_t)table[keep[i]] * BS * row + (kvh + j) * D * elem;
                        for (int64_t r = first; r < last; r++, m++) {
                            k_rows[m] = (const char *)k_cache + base + (r - first) * row;
                            v_rows[m] = (const char *)v_cache + base + (r - first) * row;
                        }
                    }
#define ATTEND1(HEAD_DIM, BF16) attend(q + j * G * D, 1, G, HEAD_DIM, k_rows, v_rows, m, scale, probs, o + j * G * D, BF16)
                    if (cache_bf16) {
                        if (D == 64) ATTEND1(64, 1);
                        else ATTEND1(D, 1);
                    } else {
                        if (D == 64) ATTEND1(64, 0);
                        else ATTEND1(D, 0);
                    }
#undef ATTEND1
                }
                continue;
            }
            if (quest && quest->selected)  // (all of its blocks: none chosen)
                for (int64_t j = 0; j < NK; j++)
                    for (int64_t i = 0; i < quest->selected_width; i++) quest->selected[(t * KVH + kvh + j) * quest->selected_width + i] = -1;
            // Key i's row is table[i / BS] * BS + i % BS; walked block by block (a 64-bit division per
            // key cost more than its dot product).
            for (int64_t i = start; i < end;) {
                const int64_t offset = ((int64_t)table[i / BS] * BS + i % BS) * row + kvh * D * elem;
                for (int64_t stop = i + BS - i % BS < end ? i + BS - i % BS : end, r = offset; i < stop; i++, r += row) {
                    k_rows[i - start] = (const char *)k_cache + r;
                    v_rows[i - start] = (const char *)v_cache + r;
                }
            }

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
            if (observe && observe->rows[t] >= 0)  // probs [NK · G, n]: this task's kv heads' query heads
                for (int64_t j = 0; j < NK; j++) {
                    float *received = observe->out + (observe->rows[t] * KVH + kvh + j) * observe->width + start;
                    for (int64_t g = 0; g < G; g++)
                        for (int64_t i = 0; i < n; i++) received[i] += probs[(j * G + g) * n + i];
                }
        }
        free(rotated);
        free(q);
        free(probs);
        free(k_rows);
        free(bound);
        free(keep);
    }
    free(seq_of);
}
