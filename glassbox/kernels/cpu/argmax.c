// Greedy sampling's argmax over the vocabulary, one row per sequence: torch.argmax(x, dim=-1) for float32
// rows (the first index of the maximum; a row holding NaN gives its first NaN, as torch does).
// PyTorch's CPU argmax is a scalar reduction per row here: ~1.5 ms for 32 rows of 49152, most of a
// decode step's sampling. This one takes 16 lanes at a time, rows split over the threads.
//
// x [M, N] float32, row stride ldx -> out [M] int64.

#include <math.h>
#include <stdint.h>

#include "vec_math.h"

static int64_t argmax_row(const float *x, int64_t N) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i best_at = _mm512_set1_epi32(-1), at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    __mmask16 nan = 0;
    for (int64_t i = 0; i < N; i += 16, at = _mm512_add_epi32(at, step)) {
        const __mmask16 m = tail_mask(N - i);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
        // Strictly greater: a lane keeps the first index of its maximum.
        const __mmask16 gt = _mm512_mask_cmp_ps_mask(m, v, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, gt, v);
        best_at = _mm512_mask_mov_epi32(best_at, gt, at);
    }
    if (nan) {
        for (int64_t i = 0; i < N; i++)
            if (isnan(x[i])) return i;
    }
    const float top = _mm512_reduce_max_ps(best);
    // Of the lanes holding the maximum, the smallest index (-1: a row of -inf only, index 0 as torch).
    const __mmask16 at_top = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ) &
                             _mm512_cmpge_epi32_mask(best_at, _mm512_setzero_si512());
    if (!at_top) return 0;
    return _mm512_mask_reduce_min_epi32(at_top, best_at);
}

void gb_argmax(const float *x, int64_t M, int64_t N, int64_t ldx, int64_t *out) {
#pragma omp parallel for schedule(static) if (M > 1)
    for (int64_t m = 0; m < M; m++) out[m] = argmax_row(x + m * ldx, N);
}
