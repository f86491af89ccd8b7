// W8A8 linear layer for x86 CPUs with AVX-512 VNNI: y = (x_q · w_qᵀ) * x_scale * w_scale (+ bias) (+ residual).
//
// The math is Int8Linear's (layers/quantized_linear.py), which is the oracle: activations quantized per
// row to int8 with scale max|x| / 127 and round-half-even, weights int8 with one scale per output row,
// exact int32 accumulation, then the two float32 scale multiplications in the same order. So the result
// is bit for bit the PyTorch path's; what differs is that quantize, GEMM and the scaling are one pass
// with no intermediate tensors, and the weights are laid out for VNNI.
//
// VNNI's vpdpbusd multiplies 4 unsigned bytes by 4 signed bytes and adds the 4 products to an int32
// lane. The packed weights are the unsigned side: w + 128, in tiles of 16 output rows × 4 inputs, so
// one 64-byte load holds 4 inputs of 16 rows and the 4 matching activations are one broadcast int32:
//   packed [N/16, K/4, 16, 4] uint8,   acc[16 rows] += Σ_4 (w + 128) * x
// and the +128 is taken back once per row: Σ_k (w + 128) x = Σ_k w x + 128 Σ_k x.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "vec_math.h"

#define ROW_TILE 16   // output rows per vector
#define N_TILES 4     // row tiles per register block: 64 output rows
#define M_TILE 6      // activation rows per register block: 4 × 6 = 24 accumulators
#define GROUP (ROW_TILE * N_TILES)
#ifndef PREFETCH
#define PREFETCH 4096
#endif

// acc += Σ_4 w (unsigned) * x (signed), in place. Inline assembly rather than _mm512_dpbusd_epi32: GCC 12
// copies and spills the accumulators of the intrinsic (it does not see the instruction as in-place).
#define DPBUSD(acc, w, x) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x))

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// w [N, K] int8 (row-major) -> packed [N_pad/64, K_pad/4, 4, 16, 4] uint8 (w + 128; padding = 128, i.e. 0):
// the 4 row tiles of a 64-row group interleaved, so that a group is one sequential stream of memory.
void gb_int8_pack(const int8_t *w, int64_t N, int64_t K, uint8_t *packed) {
    int64_t K_pad = round_up(K, 4), N_pad = round_up(N, GROUP);
    memset(packed, 128, (size_t)(N_pad * K_pad));
    for (int64_t n = 0; n < N; n++) {
        uint8_t *row = packed + (n / GROUP) * K_pad * GROUP + (n % GROUP) * 4;
        for (int64_t k = 0; k < K; k++) row[(k / 4) * GROUP * 4 + (k % 4)] = (uint8_t)(w[n * K + k] + 128);
    }
}

// The row the GEMM multiplies, into out [K] (the prologue is done to a row of x before it is quantized, so
// the transformed row never goes to memory):
//   RMS_NORM: x [K] -> x / sqrt(mean(x²) + eps) * norm_weight (as F.rms_norm, to float32 rounding);
//   SILU_MUL: x [2K] = (gate, up) -> silu(gate) * up (LlamaMLP's activation).
static void prologue_row(int prologue, const float *x, int64_t K, const float *norm_weight, float eps, float *out) {
    if (prologue == PROLOGUE_RMS_NORM) {
        __m512 ss = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 v = _mm512_loadu_ps(x + k);
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        float sum = _mm512_reduce_add_ps(ss);
        for (; k < K; k++) sum += x[k] * x[k];
        const float rstd = 1.0f / sqrtf(sum / (float)K + eps);
        for (k = 0; k < K; k++) out[k] = x[k] * rstd * norm_weight[k];
    } else {  // PROLOGUE_SILU_MUL
        const __m512 one = _mm512_set1_ps(1.0f);
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 m = tail_mask(K - k);
            __m512 g = _mm512_maskz_loadu_ps(m, x + k), up = _mm512_maskz_loadu_ps(m, x + K + k);
            __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            _mm512_mask_storeu_ps(out + k, m, _mm512_mul_ps(silu, up));
        }
    }
}

// One row of x [K] float32 -> q [K_pad] int8 (zero padded), returns its scale; *sum = Σ q.
static float quantize_row(const float *x, int64_t K, int64_t K_pad, int8_t *q, int32_t *sum) {
    __m512 amax = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
    float a = _mm512_reduce_max_ps(amax);
    for (; k < K; k++) a = fmaxf(a, fabsf(x[k]));
    const float scale = fmaxf(a, 1e-10f) / 127.0f;
    // x / scale (a true division, as the PyTorch path) rounded half to even, as torch.round.
    const __m512 s = _mm512_set1_ps(scale);
    __m512i total = _mm512_setzero_si512();
    for (k = 0; k + 16 <= K; k += 16) {
        __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + k), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512i v = _mm512_cvtps_epi32(r);
        total = _mm512_add_epi32(total, v);
        _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtepi32_epi8(v));
    }
    int32_t t = _mm512_reduce_add_epi32(total);
    for (; k < K; k++) {
        int32_t v = (int32_t)nearbyintf(x[k] / scale);
        q[k] = (int8_t)v;
        t += v;
    }
    memset(q + K, 0, (size_t)(K_pad - K));
    *sum = t;
    return scale;
}

// The epilogue of one 16-row tile of one activation row: exact int32 -> float32, scaled as Int8Linear does.
static inline void store_tile(__m512i acc, int64_t row, int64_t n0, const int32_t *xsum, const float *xscale,
                              const float *w_scale, const float *bias, int64_t N, float *y, int64_t ldy,
                              const float *residual, int64_t ldr) {
    __mmask16 mask = tail_mask(N - n0);  // the rows of a group past N are padding
    if (!mask) return;
    __m512i exact = _mm512_sub_epi32(acc, _mm512_set1_epi32(128 * xsum[row]));
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(exact), _mm512_set1_ps(xscale[row]));
    v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, w_scale + n0));
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + n0));
    if (residual) v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, residual + row * ldr + n0), v);
    _mm512_mask_storeu_ps(y + row * ldy + n0, mask, v);
}

// Rows [m0, m0 + MT) × the 64 output rows of group g. MT ≤ 6 is a constant at every call site: the
// accumulators are named variables (an array of them is spilled to the stack by GCC).
#define ACC(i) __m512i c##i##0 = _mm512_setzero_si512(), c##i##1 = c##i##0, c##i##2 = c##i##0, c##i##3 = c##i##0;
#define DOT(i)                                                                    \
    if (MT > i) {                                                                 \
        int32_t x4;                                                               \
        memcpy(&x4, xq + (m0 + i) * K_pad + k4 * 4, 4);                           \
        __m512i xb = _mm512_set1_epi32(x4);                                       \
        DPBUSD(c##i##0, w0, xb);                                                  \
        DPBUSD(c##i##1, w1, xb);                                                  \
        DPBUSD(c##i##2, w2, xb);                                                  \
        DPBUSD(c##i##3, w3, xb);                                                  \
    }
#define STORE(i)                                                                                             \
    if (MT > i) {                                                                                            \
        __m512i acc[4] = {c##i##0, c##i##1, c##i##2, c##i##3};                                               \
        for (int t = 0; t < N_TILES; t++)                                                                    \
            store_tile(acc[t], m0 + i, (g * N_TILES + t) * ROW_TILE, xsum, xscale, w_scale, bias, N, y, ldy, \
                       residual, ldr);                                                                       \
    }

static inline __attribute__((always_inline)) void block(const int8_t *xq, int64_t K_pad, const int32_t *xsum,
                                                        const float *xscale, int64_t m0, const int MT,
                                                        const uint8_t *packed, int64_t g, const float *w_scale,
                                                        const float *bias, int64_t N, float *y, int64_t ldy,
                                                        const float *residual, int64_t ldr) {
    ACC(0) ACC(1) ACC(2) ACC(3) ACC(4) ACC(5)
    const uint8_t *w_base = packed + g * K_pad * GROUP;
    for (int64_t k4 = 0; k4 < K_pad / 4; k4++) {
        const uint8_t *wk = w_base + k4 * 4 * GROUP;
        // A small matrix ends before the hardware prefetcher ramps up: ask for the lines PREFETCH bytes ahead.
        for (int line = 0; line < 4; line++) _mm_prefetch((const char *)(wk + PREFETCH + line * 64), _MM_HINT_T0);
        __m512i w0 = _mm512_loadu_si512((const void *)wk);
        __m512i w1 = _mm512_loadu_si512((const void *)(wk + 64));
        __m512i w2 = _mm512_loadu_si512((const void *)(wk + 128));
        __m512i w3 = _mm512_loadu_si512((const void *)(wk + 192));
        DOT(0) DOT(1) DOT(2) DOT(3) DOT(4) DOT(5)
    }
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
}

// x [M, K] (row stride ldx) float32 -> y [M, N] (row stride ldy) float32, x first transformed by the
// prologue (RMS_NORM: with norm_weight [K] and eps; SILU_MUL: x is [M, 2K]).
// bias [N] and residual [M, N] (row stride ldr; may alias y) are optional (NULL).
void gb_int8_linear(const float *x, int64_t M, int64_t K, int64_t ldx, int prologue, const float *norm_weight,
                    float eps, const uint8_t *packed, const float *w_scale, const float *bias, int64_t N, float *y,
                    int64_t ldy, const float *residual, int64_t ldr) {
    int64_t K_pad = round_up(K, 4);
    int8_t *xq = aligned_alloc(64, (size_t)round_up(M * K_pad, 64));
    float *xscale = malloc(sizeof(float) * (size_t)M);
    int32_t *xsum = malloc(sizeof(int32_t) * (size_t)M);
#pragma omp parallel for schedule(static) if (M > 1)
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * ldx;
        float *transformed = NULL;
        if (prologue != PROLOGUE_NONE) {
            transformed = malloc(sizeof(float) * (size_t)K);
            prologue_row(prologue, row, K, norm_weight, eps, transformed);
            row = transformed;
        }
        xscale[m] = quantize_row(row, K, K_pad, xq + m * K_pad, xsum + m);
        free(transformed);
    }

    int64_t groups = round_up(N, GROUP) / GROUP;
    int64_t m_blocks = (M + M_TILE - 1) / M_TILE;
    // Each thread takes whole 64-row groups (its weights stream once per M_TILE rows of x).
#pragma omp parallel for schedule(static) collapse(2)
    for (int64_t g = 0; g < groups; g++) {
        for (int64_t mb = 0; mb < m_blocks; mb++) {
            int64_t m0 = mb * M_TILE;
            // Constant tile sizes let the compiler keep the accumulators in registers.
#define BLOCK(MT) block(xq, K_pad, xsum, xscale, m0, MT, packed, g, w_scale, bias, N, y, ldy, residual, ldr)
            switch (M - m0 < M_TILE ? M - m0 : M_TILE) {
                case 1: BLOCK(1); break;
                case 2: BLOCK(2); break;
                case 3: BLOCK(3); break;
                case 4: BLOCK(4); break;
                case 5: BLOCK(5); break;
                default: BLOCK(6); break;
            }
#undef BLOCK
        }
    }
    free(xq);
    free(xscale);
    free(xsum);
}
