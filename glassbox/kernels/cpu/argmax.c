// Greedy sampling's argmax over the vocabulary, one row per sequence: torch.argmax(x, dim=-1) for float32
// rows (the first index of the maximum; a row holding NaN gives its first NaN, as torch does).
// PyTorch's CPU argmax is a scalar reduction per row here: ~1.5 ms for 32 rows of 49152, most of a
// decode step's sampling. This one finds the maximum a vector at a time, then the first vector holding
// it; rows are split over the threads.
//
// x [M, N] float32, row stride ldx -> out [M] int64.

#include <math.h>
#include <stdint.h>

#include "simd.h"

static int64_t argmax_row(const float *x, int64_t N) {
    vf best = vf_set1(-INFINITY), nan = vf_zero();
    int64_t i = 0;
    for (; i + VW <= N; i += VW) {
        const vf v = vf_load(x + i);
        best = vf_max(best, v);
        nan = vf_add(nan, vf_sub(v, v));  // NaN where a value is NaN (or infinite: then a scan finds none)
    }
    float top = vf_hmax(best);
    int any_nan = isnan(vf_sum(nan));
    for (int64_t j = i; j < N; j++) {
        any_nan |= isnan(x[j]);
        top = x[j] > top ? x[j] : top;
    }
    if (any_nan)
        for (int64_t j = 0; j < N; j++)
            if (isnan(x[j])) return j;
    for (i = 0; i + VW <= N; i += VW)
        if (vf_any_eq(vf_load(x + i), top)) break;
    for (; i < N; i++)
        if (x[i] == top) return i;
    return 0;  // (a row of -inf only: index 0, as torch)
}

void gb_argmax(const float *x, int64_t M, int64_t N, int64_t ldx, int64_t *out) {
#pragma omp parallel for schedule(static) if (M > 1)
    for (int64_t m = 0; m < M; m++) out[m] = argmax_row(x + m * ldx, N);
}
