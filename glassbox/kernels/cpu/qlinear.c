// Linear layer over block-quantized weights: y = x · wᵀ (+ bias) (+ residual).
//
// Weights are GGUF's Q8_0 or Q4_1 blocks (kernels.h), so a GGUF model runs on its weights as stored. The
// activations are multiplied one of two ways (gb_qweight.activations):
//
// FLOAT32 (the default): the float32 activations times each block's q (as floats), scaled once per block
// by its d and m (ftile): x·(d·q + m) = d·(x·q) + m·Σx, the model's own numerics to float32 rounding,
// reading 4 or 8 bits a weight.
//
// INT8, as llama.cpp computes: each row of x quantized per block of 32 values (d = max|x| / 127,
// q = round-half-even(x / d)), then per output row and block an exact integer dot product and two float32
// fused multiply-adds, in block order (tile):
//
//   acc = fma(Σ q_w·q_x, d_w·d_x, acc);   acc = fma(m_w, d_x·Σ q_x, acc)     (the second for Q4_1 only)
//
// Integer dot products do 2-4x the work per instruction of float ones, at the cost of rounding every
// activation to 255 levels per block (perplexity +0.3% on the default model, but greedy text drifts from
// float32's after ~20 tokens: docs/benchmarks.md).
//
// INT16: each row quantized per block to 65,279 levels (d = max|x| / 32639, x_q = round(x / d)), split in two
// int8 halves x_q = 256·hi + lo (hi in [-127, 127], lo in [-128, 127]) that run as two rows through INT8's
// inner loops; per block their exact sums are combined, Σ q_w·x_q = 256·Σ q_w·hi + Σ q_w·lo (|Σ| < 2^28), and
// scaled as INT8's, with d and Σ x_q. Twice INT8's products, one epilogue, and float32's greedy text on the
// default model (bench/activation_bits.py).
//
// INT12: INT16 with 4,079 levels (d = max|x| / 2039) and halves x_q = 16·hi + lo (lo in [-8, 7]). The same
// loops everywhere, but on AMX a Q4_1 block is then one tile product: [hi | lo] · [16·q ; q] (16·q ≤ 240 is
// still a byte), half the tile operations and epilogues of INT16's two (docs/benchmarks.md).
//
// Every way, every ISA does exactly these operations in this order, so every ISA gives the same bits (the
// RMSNorm and SiLU prologues aside, whose float sums follow the vector width). The PyTorch oracle is
// QLinear's reference path (layers/quantized_linear.py). Per ISA, only the inner loops differ:
//   AVX-512 VNNI  vpdpbusd: 4 unsigned × 4 signed bytes into int32, 16 rows per vector (INT12 over Q4_1:
//                 both halves into one sum, against q and 16·q, tile_fused)
//   AMX           (16 or more quantized rows of x) tile products per block: 16 rows of x × 16 output rows ×
//                 32 inputs (INT12 over Q4_1: 64, both halves) into int32, then tile's epilogue (amx_tile)
//   AVX2          vpmaddubsw (pairs into int16) + vpmaddwd, 8 rows per vector; Q4 sums stay in int16 over a
//                 block (at most 16 · 15 · 127 = 30480), Q8 uses the sign trick (|x| · ±w)
//   NEON          sdot by lane (4 signed × 4 signed bytes into int32), 8 rows as two vectors
//   generic C     plain loops
// A step's weights are read once per M_TILE rows of x: a batch-1 decode step streams each weight once.
// With float32 activations, one row of x runs over 4 groups at once (ftile_row: more multiply-add chains
// in flight), and on x86 8 rows or more read each pair of groups made floats once (ftile_pair: 1.3-1.6x
// per core at 13 and 32 rows against ftile, docs/benchmarks.md); all give ftile's bits.

#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
static int max_threads(void) { return omp_get_max_threads(); }
#else
static int max_threads(void) { return 1; }
#endif

#if GB_AVX512
#define ROWS 16
#define M_TILE 8  // rows of x per register block (32 vector registers here, 16 for AVX2)
#else
#define ROWS 8
#define M_TILE 4
#endif

int64_t gb_rows(void) { return ROWS; }
const char *gb_isa(void) { return GB_ISA; }

// The row the GEMM multiplies, into out [K] (the transformed row never goes to memory):
//   RMS_NORM: x [K] -> x / sqrt(mean(x²) + eps) * norm_weight (as F.rms_norm, to float32 rounding);
//   SILU_MUL: x [2K] = (gate, up) -> silu(gate) * up (LlamaMLP's activation).
static void prologue_row(int prologue, const float *x, int64_t K, const float *norm_weight, float eps, float *out) {
    if (prologue == PROLOGUE_RMS_NORM) {
        vf ss = vf_zero();
        for (int64_t k = 0; k < K; k += VW) {
            const vf v = vf_load_n(x + k, K - k);
            ss = vf_fma(v, v, ss);
        }
        const vf rstd = vf_set1(1.0f / sqrtf(vf_sum(ss) / (float)K + eps));
        for (int64_t k = 0; k < K; k += VW)
            vf_store_n(out + k, vf_mul(vf_mul(vf_load_n(x + k, K - k), rstd), vf_load_n(norm_weight + k, K - k)), K - k);
    } else {  // PROLOGUE_SILU_MUL
        for (int64_t k = 0; k < K; k += VW) {
            const vf g = vf_load_n(x + k, K - k), up = vf_load_n(x + K + k, K - k);
            const vf silu = vf_div(g, vf_add(vf_set1(1.0f), vf_exp(vf_sub(vf_zero(), g))));
            vf_store_n(out + k, vf_mul(silu, up), K - k);
        }
    }
}

// One block xb [32] on a grid of `levels` steps each side: r [32 / VW] = round-half-even(x / d) (as
// torch.round), returns d = max|x| / levels.
GB_INLINE float round_block(const float *xb, float levels, vf *r) {
    vf amax = vf_zero();
    for (int i = 0; i < QBLOCK; i += VW) amax = vf_max(amax, vf_abs(vf_load(xb + i)));
    const float top = vf_hmax(amax), scale = (top > 1e-10f ? top : 1e-10f) / levels;  // (fmaxf: a libm call)
    const vf s = vf_set1(scale);
    for (int i = 0; i < QBLOCK; i += VW) r[i / VW] = vf_round(vf_div(vf_load(xb + i), s));
    return scale;
}

// The sum of a block's rounded values (integers: exact in any order, |Σ| < 2^24).
GB_INLINE int32_t block_sum(const vf *r) {
    vf total = vf_zero();
    for (int i = 0; i < QBLOCK / VW; i++) total = vf_add(total, r[i]);
    return (int32_t)vf_sum(total);
}

// One row x [K] (K a multiple of 32) -> q [K] int8, and per block its scale d and Σ q.
static void quantize_row(const float *x, int64_t K, int8_t *q, float *d, int32_t *sum) {
    for (int64_t b = 0; b < K / QBLOCK; b++) {
        vf r[QBLOCK / VW];
        d[b] = round_block(x + b * QBLOCK, 127.0f, r);
        for (int i = 0; i < QBLOCK / VW; i++) vf_store_i8(q + b * QBLOCK + i * VW, r[i]);
        sum[b] = block_sum(r);
    }
}

// One row x [K] -> its blocks as two int8 halves (see INT16 and INT12 above), x_q = 2^shift·hi + lo: block b's
// halves at hi + b·stride and lo + b·stride [32], and per block d and Σ x_q. In float lanes, exactly:
// hi = floor((x_q + unit / 2) / unit) in [-127, 127] (a division by a power of 2), lo = x_q - unit·hi in
// [-unit / 2, unit / 2 - 1].
static void quantize_row_split(const float *x, int64_t K, int shift, int8_t *hi, int8_t *lo, int64_t stride, float *d,
                               int32_t *sum) {
    const float unit = (float)(1 << shift);
    const vf half_unit = vf_set1(unit / 2), inverse = vf_set1(1.0f / unit), units = vf_set1(unit);
    for (int64_t b = 0; b < K / QBLOCK; b++) {
        vf r[QBLOCK / VW];
        d[b] = round_block(x + b * QBLOCK, 127 * unit + unit / 2 - 1, r);  // (INT16 32639, INT12 2039)
        for (int i = 0; i < QBLOCK / VW; i++) {
            const vf h = vf_floor(vf_mul(vf_add(r[i], half_unit), inverse));
            vf_store_i8(hi + b * stride + i * VW, h);
            vf_store_i8(lo + b * stride + i * VW, vf_fnma(units, h, r[i]));
        }
        sum[b] = block_sum(r);
    }
}

// The quantized rows of x one tile reads: q [MT][ldq] int8 (INT16/INT12: rows 2i and 2i + 1 are row i's
// halves, x_q = 2^shift·hi + lo), and per row of x (i) and block (b) d, Σ x_q and d · Σ x_q: d, sum and ds
// [MT / H][ldq / 32].
typedef struct {
    const int8_t *q;
    const float *d;
    const int32_t *sum;
    const float *ds;
    int64_t ldq;
    int shift;
} qrows;

#define XQ(i, k) (xr.q + (i) * xr.ldq + (k))
#define XSUM(i, b) (xr.sum[(i) * (xr.ldq / QBLOCK) + (b)])
#define XD(i, b) (xr.d[(i) * (xr.ldq / QBLOCK) + (b)])
#define XS(i, b) (xr.ds[(i) * (xr.ldq / QBLOCK) + (b)])  // d_x · Σ q_x

static inline int32_t load4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

// out [MT / H][ROWS] = the group's ROWS output rows for MT ≤ M_TILE quantized rows of x (H = 2: INT16's
// pairs of halves). w: the group's data, sc: its scales (kernels.h), nb = K / 32 blocks. MT and H are
// constants at every call site (the accumulators stay in registers).
#if GB_AVX512
GB_INLINE void tile(const qrows xr, const int MT, const int H, const int format, const uint8_t *w, const uint16_t *sc, int64_t nb,
                    float *out) {
    __m512 acc[M_TILE];
    for (int i = 0; i < M_TILE; i++) acc[i] = _mm512_setzero_ps();
    const __m512i nib = _mm512_set1_epi8(0x0F), bias128 = _mm512_set1_epi8((char)0x80);
    for (int64_t b = 0; b < nb; b++) {
        __m512i isum[M_TILE];
        for (int i = 0; i < M_TILE; i++) isum[i] = _mm512_setzero_si512();
        __m512 dw, mw = _mm512_setzero_ps();
        if (format == FORMAT_Q4_1) {
            const uint8_t *wb = w + b * 4 * ROWS * 4;
            for (int j = 0; j < 4; j++) {
                const __m512i v = _mm512_loadu_si512((const void *)(wb + j * ROWS * 4));
                const __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
                for (int i = 0; i < MT; i++) {
                    isum[i] = _mm512_dpbusd_epi32(isum[i], lo, _mm512_set1_epi32(load4(XQ(i, b * QBLOCK + 8 * j))));
                    isum[i] = _mm512_dpbusd_epi32(isum[i], hi, _mm512_set1_epi32(load4(XQ(i, b * QBLOCK + 8 * j + 4))));
                }
            }
            dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + b * 2 * ROWS)));
            mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + b * 2 * ROWS + ROWS)));
        } else {
            // w + 128 is the unsigned operand; 128 · Σ q_x is taken back per block (below).
            const uint8_t *wb = w + b * 8 * ROWS * 4;
            for (int j = 0; j < 8; j++) {
                const __m512i v = _mm512_xor_si512(_mm512_loadu_si512((const void *)(wb + j * ROWS * 4)), bias128);
                for (int i = 0; i < MT; i++) isum[i] = _mm512_dpbusd_epi32(isum[i], v, _mm512_set1_epi32(load4(XQ(i, b * QBLOCK + 4 * j))));
            }
            dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + b * ROWS)));
        }
        for (int i = 0; i + H <= MT; i += H) {
            __m512i s = H == 2 ? _mm512_add_epi32(_mm512_sll_epi32(isum[i], _mm_cvtsi32_si128(xr.shift)), isum[i + 1]) : isum[i];
            if (format == FORMAT_Q8_0) s = _mm512_sub_epi32(s, _mm512_set1_epi32(128 * XSUM(i / H, b)));
            acc[i / H] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, _mm512_set1_ps(XD(i / H, b))), acc[i / H]);
            if (format == FORMAT_Q4_1) acc[i / H] = _mm512_fmadd_ps(mw, _mm512_set1_ps(XS(i / H, b)), acc[i / H]);
        }
    }
    for (int i = 0; i < MT / H; i++) _mm512_storeu_ps(out + i * ROWS, acc[i]);
}

// INT12 over Q4_1 with one sum per row of x: Σ q·x_q = Σ (16·q)·hi + Σ q·lo, and 16·q ≤ 240 is still an
// unsigned byte (AMX_FUSED's idea), so both halves' products go into one accumulator and need no combining,
// and a tile holds FUSED_MT rows of x (tile(): M_TILE / 2). The same integers, so the same bits.
#define FUSED 1
#define FUSED_MT 8
_Static_assert(FUSED_MT <= M_TILE, "a fused tile's rows fit gb_qlinear's tile buffer");
GB_INLINE void tile_fused(const qrows xr, const int MT, const uint8_t *w, const uint16_t *sc, int64_t nb, float *out) {
    __m512 acc[FUSED_MT];
    for (int i = 0; i < FUSED_MT; i++) acc[i] = _mm512_setzero_ps();
    const __m512i nib = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi8((char)0xF0);
    for (int64_t b = 0; b < nb; b++) {
        __m512i isum[FUSED_MT];
        for (int i = 0; i < FUSED_MT; i++) isum[i] = _mm512_setzero_si512();
        const uint8_t *wb = w + b * 4 * ROWS * 4;
        for (int j = 0; j < 4; j++) {
            const __m512i v = _mm512_loadu_si512((const void *)(wb + j * ROWS * 4));
            const __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
            const __m512i lo16 = _mm512_and_si512(_mm512_slli_epi16(v, 4), high), hi16 = _mm512_and_si512(v, high);
            for (int i = 0; i < MT; i++) {  // row i's halves: quantized rows 2i (hi) and 2i + 1 (lo)
                const int8_t *xh = XQ(2 * i, b * QBLOCK + 8 * j), *xl = XQ(2 * i + 1, b * QBLOCK + 8 * j);
                isum[i] = _mm512_dpbusd_epi32(isum[i], lo16, _mm512_set1_epi32(load4(xh)));
                isum[i] = _mm512_dpbusd_epi32(isum[i], hi16, _mm512_set1_epi32(load4(xh + 4)));
                isum[i] = _mm512_dpbusd_epi32(isum[i], lo, _mm512_set1_epi32(load4(xl)));
                isum[i] = _mm512_dpbusd_epi32(isum[i], hi, _mm512_set1_epi32(load4(xl + 4)));
            }
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + b * 2 * ROWS)));
        const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + b * 2 * ROWS + ROWS)));
        for (int i = 0; i < MT; i++) {
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i]), _mm512_mul_ps(dw, _mm512_set1_ps(XD(i, b))), acc[i]);
            acc[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(XS(i, b)), acc[i]);
        }
    }
    for (int i = 0; i < MT; i++) _mm512_storeu_ps(out + i * ROWS, acc[i]);
}
#elif GB_AVX2
// The accumulators are named variables, one per row of x (GCC keeps an array of them on the stack).
#define EACH_ROW(X) X(0) X(1) X(2) X(3)
GB_INLINE void tile(const qrows xr, const int MT, const int H, const int format, const uint8_t *w, const uint16_t *sc, int64_t nb,
                    float *out) {
    const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
#define DECLARE(i) __m256 acc##i = _mm256_setzero_ps(); __m256i s##i;
    EACH_ROW(DECLARE)
    for (int64_t b = 0; b < nb; b++) {
#define ZERO(i) s##i = _mm256_setzero_si256();
        EACH_ROW(ZERO)
        __m256 dw, mw = _mm256_setzero_ps();
        if (format == FORMAT_Q4_1) {
            // int16 sums: |Σ| ≤ 16 · 15 · 127 over a block; pairs of int16 lanes summed into int32 after it.
            const uint8_t *wb = w + b * 4 * ROWS * 4;
#pragma GCC unroll 1
            for (int j = 0; j < 4; j++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wb + j * ROWS * 4));
                const __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
#define Q4_STEP(i)                                                                                                  \
    if (MT > i) {                                                                                                   \
        s##i = _mm256_add_epi16(s##i, _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load4(XQ(i, b * QBLOCK + 8 * j))))); \
        s##i = _mm256_add_epi16(s##i, _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load4(XQ(i, b * QBLOCK + 8 * j + 4))))); \
    }
                EACH_ROW(Q4_STEP)
            }
#define WIDEN(i) s##i = _mm256_madd_epi16(s##i, ones);
            EACH_ROW(WIDEN)
            dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + b * 2 * ROWS)));
            mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + b * 2 * ROWS + ROWS)));
        } else {
            // maddubs wants one unsigned operand: |x| · (w with x's sign), each pair ≤ 2 · 127 · 127.
            const uint8_t *wb = w + b * 8 * ROWS * 4;
#pragma GCC unroll 1
            for (int j = 0; j < 8; j++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(wb + j * ROWS * 4));
#define Q8_STEP(i)                                                                                         \
    if (MT > i) {                                                                                          \
        const __m256i x = _mm256_set1_epi32(load4(XQ(i, b * QBLOCK + 4 * j)));                             \
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8(v, x));            \
        s##i = _mm256_add_epi32(s##i, _mm256_madd_epi16(pairs, ones));                                     \
    }
                EACH_ROW(Q8_STEP)
            }
            dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + b * ROWS)));
        }
        if (H == 2) {  // row i's sums: its halves' (2i, 2i + 1) combined
            const __m128i shift = _mm_cvtsi32_si128(xr.shift);
            if (MT > 1) s0 = _mm256_add_epi32(_mm256_sll_epi32(s0, shift), s1);
            if (MT > 3) s1 = _mm256_add_epi32(_mm256_sll_epi32(s2, shift), s3);
        }
#define SCALE(i)                                                                                                   \
    if (MT / H > i) {                                                                                              \
        acc##i = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s##i), _mm256_mul_ps(dw, _mm256_set1_ps(XD(i, b))), acc##i);   \
        if (format == FORMAT_Q4_1) acc##i = _mm256_fmadd_ps(mw, _mm256_set1_ps(XS(i, b)), acc##i);                 \
    }
        EACH_ROW(SCALE)
    }
#define STORE(i) if (MT / H > i) _mm256_storeu_ps(out + i * ROWS, acc##i);
    EACH_ROW(STORE)
}
#elif GB_NEON
// sdot by lane: lane l of x (its bytes 4l..4l+3) against the 4 bytes of each of a vector's 4 rows.
#define SDOT(acc, w, x, l) acc = vdotq_laneq_s32(acc, w, x, l)
GB_INLINE float32x4_t half4(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
GB_INLINE void tile(const qrows xr, const int MT, const int H, const int format, const uint8_t *w, const uint16_t *sc, int64_t nb,
                    float *out) {
    float32x4_t acc[M_TILE][2];
    for (int i = 0; i < M_TILE; i++) acc[i][0] = acc[i][1] = vdupq_n_f32(0.0f);
    const uint8x16_t nib = vdupq_n_u8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        int32x4_t isum[M_TILE][2];
        for (int i = 0; i < M_TILE; i++) isum[i][0] = isum[i][1] = vdupq_n_s32(0);
        float32x4_t dw[2], mw[2] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
        if (format == FORMAT_Q4_1) {
            const uint8_t *wb = w + b * 4 * ROWS * 4;
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                int8x16_t lo[2], hi[2];
                for (int h = 0; h < 2; h++) {
                    const uint8x16_t v = vld1q_u8(wb + j * ROWS * 4 + 16 * h);
                    lo[h] = vreinterpretq_s8_u8(vandq_u8(v, nib));
                    hi[h] = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
                }
                for (int i = 0; i < MT; i++) {
                    const int8x16_t x = vld1q_s8(XQ(i, b * QBLOCK + 16 * (j / 2)));  // chunk j: lanes 2(j%2), 2(j%2)+1
                    for (int h = 0; h < 2; h++) {
                        if (j % 2 == 0) {
                            SDOT(isum[i][h], lo[h], x, 0);
                            SDOT(isum[i][h], hi[h], x, 1);
                        } else {
                            SDOT(isum[i][h], lo[h], x, 2);
                            SDOT(isum[i][h], hi[h], x, 3);
                        }
                    }
                }
            }
            for (int h = 0; h < 2; h++) {
                dw[h] = half4(sc + b * 2 * ROWS + 4 * h);
                mw[h] = half4(sc + b * 2 * ROWS + ROWS + 4 * h);
            }
        } else {
            const uint8_t *wb = w + b * 8 * ROWS * 4;
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                const int8x16_t v0 = vld1q_s8((const int8_t *)wb + j * ROWS * 4), v1 = vld1q_s8((const int8_t *)wb + j * ROWS * 4 + 16);
                for (int i = 0; i < MT; i++) {
                    const int8x16_t x = vld1q_s8(XQ(i, b * QBLOCK + 16 * (j / 4)));
                    switch (j % 4) {
                        case 0: SDOT(isum[i][0], v0, x, 0); SDOT(isum[i][1], v1, x, 0); break;
                        case 1: SDOT(isum[i][0], v0, x, 1); SDOT(isum[i][1], v1, x, 1); break;
                        case 2: SDOT(isum[i][0], v0, x, 2); SDOT(isum[i][1], v1, x, 2); break;
                        default: SDOT(isum[i][0], v0, x, 3); SDOT(isum[i][1], v1, x, 3); break;
                    }
                }
            }
            for (int h = 0; h < 2; h++) dw[h] = half4(sc + b * ROWS + 4 * h);
        }
        for (int i = 0; i + H <= MT; i += H) {
            for (int h = 0; h < 2; h++) {
                const int32x4_t s = H == 2 ? vaddq_s32(vshlq_s32(isum[i][h], vdupq_n_s32(xr.shift)), isum[i + 1][h]) : isum[i][h];
                acc[i / H][h] = vfmaq_f32(acc[i / H][h], vcvtq_f32_s32(s), vmulq_f32(dw[h], vdupq_n_f32(XD(i / H, b))));
                if (format == FORMAT_Q4_1) acc[i / H][h] = vfmaq_f32(acc[i / H][h], mw[h], vdupq_n_f32(XS(i / H, b)));
            }
        }
    }
    for (int i = 0; i < MT / H; i++) {
        vst1q_f32(out + i * ROWS, acc[i][0]);
        vst1q_f32(out + i * ROWS + 4, acc[i][1]);
    }
}
#else
// Σ q_w·q_x over block b of output row r of the group and the quantized row x [32].
static int32_t block_dot(const int format, const uint8_t *w, int64_t b, int r, const int8_t *x) {
    int32_t isum = 0;
    if (format == FORMAT_Q4_1) {
        const uint8_t *wb = w + b * 4 * ROWS * 4;
        for (int j = 0; j < 4; j++)
            for (int t = 0; t < 4; t++) {
                const uint8_t byte = wb[(j * ROWS + r) * 4 + t];
                isum += (byte & 0x0F) * x[8 * j + t] + (byte >> 4) * x[8 * j + 4 + t];
            }
    } else {
        const int8_t *wb = (const int8_t *)w + b * 8 * ROWS * 4;
        for (int j = 0; j < 8; j++)
            for (int t = 0; t < 4; t++) isum += wb[(j * ROWS + r) * 4 + t] * x[4 * j + t];
    }
    return isum;
}

GB_INLINE void tile(const qrows xr, const int MT, const int H, const int format, const uint8_t *w, const uint16_t *sc, int64_t nb,
                    float *out) {
    for (int i = 0; i < MT / H * ROWS; i++) out[i] = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        for (int i = 0; i + H <= MT; i += H) {
            for (int r = 0; r < ROWS; r++) {
                int32_t isum = block_dot(format, w, b, r, XQ(i, b * QBLOCK));
                if (H == 2) isum = (1 << xr.shift) * isum + block_dot(format, w, b, r, XQ(i + 1, b * QBLOCK));
                const float dw = half_to_float(sc[b * (format == FORMAT_Q4_1 ? 2 : 1) * ROWS + r]);
                float *o = out + i / H * ROWS + r;
                *o = fmaf((float)isum, dw * XD(i / H, b), *o);
                if (format == FORMAT_Q4_1) *o = fmaf(half_to_float(sc[b * 2 * ROWS + ROWS + r]), XS(i / H, b), *o);
            }
        }
    }
}
#endif

#ifndef FUSED
#define FUSED 0
#define FUSED_MT 1
#endif

#define AMX_M 16  // rows of x per AMX tile (INT16/INT12 rows are quantized in its layout when AMX runs)
#if GB_AMX
// ---- AMX: the integer products of tile() as 16 x 16 tile products ----
// A tile covers 16 rows of x and a group's 16 output rows. Per block of 32 inputs, tile products into int32
// C [16 rows of x][16 output rows], then tile()'s fused multiply-adds on C's rows in the same order: the
// integer sums are exact, so AMX gives every ISA's bits. Three kinds:
//   AMX_INT8    C = A [16][32] (the rows' quantized block, loaded from q as it lies) · B [32][16]
//   AMX_HALVES  INT16/INT12: C_hi = A_hi · B and C_lo = A_lo · B, combined per row as 2^shift·C_hi + C_lo
//   AMX_FUSED   INT12 over Q4_1: C = [A_hi | A_lo] [16][64] · [16·B ; B] [64][16], the combined sums at once
// B is AMX's VNNI layout (row j: inputs 4j..4j+3 of each output row), which is Q8_0's packing as stored (step
// j); Q4_1's nibbles are unpacked to it once per group (chunk j's low nibbles are B's row 2j, its high ones
// row 2j + 1; FUSED: 16·q's 8 rows first), unsigned. INT16/INT12 rows come quantized in tiles' layout: per 16
// rows of x and block, [16][hi 32 | lo 32] (gb_qlinear).
enum { AMX_INT8, AMX_HALVES, AMX_FUSED };
// Tile registers (numbers: GCC's tile intrinsics paste them into the instruction). A block's products go to
// a slot: slot 0 is C0 (HALVES: C0 hi, C1 lo) from A0 (and A1) and B0; slot 1 is C2 (C3) from A1 (A0) and B1.
#define TILE_C0 0
#define TILE_C1 1
#define TILE_C2 2
#define TILE_C3 3
#define TILE_A0 4
#define TILE_A1 5
#define TILE_B0 6
#define TILE_B1 7

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) amx_config;

// Each thread loads the tiles' shapes before its first tile op (the configuration is per thread, and other
// code on the thread, e.g. oneDNN, loads its own).
static void amx_configure(int kind) {
    amx_config c = {0};
    c.palette = 1;
    const int k = kind == AMX_FUSED ? 2 * QBLOCK : QBLOCK;  // inputs (bytes of A's rows) per product
    for (int t = TILE_C0; t <= TILE_C3; t++) c.rows[t] = AMX_M, c.colsb[t] = ROWS * 4;
    c.rows[TILE_A0] = c.rows[TILE_A1] = AMX_M, c.colsb[TILE_A0] = c.colsb[TILE_A1] = k;
    c.rows[TILE_B0] = c.rows[TILE_B1] = k / 4, c.colsb[TILE_B0] = c.colsb[TILE_B1] = ROWS * 4;
    _tile_loadconfig(&c);
}

// A group's Q4_1 data [nb][4][ROWS][4] -> B [nb][8][ROWS][4] (nibbles as bytes, 0..15), or for FUSED
// [nb][16][ROWS][4] (rows 0-7: 16·q, rows 8-15: q).
static void amx_unpack_q4(const uint8_t *w, int64_t nb, int fused, uint8_t *out) {
    const __m512i low = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi8((char)0xF0);
    const int64_t step = ROWS * 4;  // bytes of a row of B
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *o = out + b * (fused ? 16 : 8) * step, *oq = fused ? o + 8 * step : o;
        for (int j = 0; j < 4; j++) {
            const __m512i v = _mm512_loadu_si512((const void *)(w + (b * 4 + j) * step));
            if (fused) {  // 16·q: each nibble moved to its byte's high half
                _mm512_storeu_si512((void *)(o + 2 * j * step), _mm512_and_si512(_mm512_slli_epi16(v, 4), high));
                _mm512_storeu_si512((void *)(o + (2 * j + 1) * step), _mm512_and_si512(v, high));
            }
            _mm512_storeu_si512((void *)(oq + 2 * j * step), _mm512_and_si512(v, low));
            _mm512_storeu_si512((void *)(oq + (2 * j + 1) * step), _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
        }
    }
}

// acc [16] += block b's sums c [16][ROWS] (HALVES: 2^shift·c + c_lo), scaled as in tile().
GB_INLINE void amx_epilogue(const qrows xr, const int kind, const int format, const uint16_t *sc, int64_t b,
                            const int32_t *c, const int32_t *c_lo, __m512 *acc) {
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + b * (format == FORMAT_Q4_1 ? 2 : 1) * ROWS)));
    const __m512 mw = format == FORMAT_Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + b * 2 * ROWS + ROWS))) : dw;
    const __m128i shift = _mm_cvtsi32_si128(xr.shift);
    for (int i = 0; i < AMX_M; i++) {
        __m512i s = _mm512_load_si512(c + i * ROWS);
        if (kind == AMX_HALVES) s = _mm512_add_epi32(_mm512_sll_epi32(s, shift), _mm512_load_si512(c_lo + i * ROWS));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, _mm512_set1_ps(XD(i, b))), acc[i]);
        if (format == FORMAT_Q4_1) acc[i] = _mm512_fmadd_ps(mw, _mm512_set1_ps(XS(i, b)), acc[i]);
    }
}

#define AMX_DP(C, A, B)                                                                           \
    do {                                                                                          \
        if (format == FORMAT_Q4_1) _tile_dpbsud(C, A, B); /* signed x, unsigned nibbles */        \
        else _tile_dpbssd(C, A, B);                                                               \
    } while (0)
// Block b's products into a slot: C (and CL, HALVES' lo half) from A (AL) and B.
#define AMX_PRODUCTS(C, CL, A, AL, B, b)                                                                    \
    do {                                                                                                    \
        _tile_zero(C);                                                                                      \
        _tile_loadd(B, wb + (b) * (kind == AMX_FUSED ? 2 : 1) * QBLOCK * ROWS, ROWS * 4);                  \
        if (kind == AMX_INT8) _tile_loadd(A, xr.q + (b) * QBLOCK, xr.ldq);                                  \
        else _tile_loadd(A, xr.q + (b) * AMX_M * 2 * QBLOCK, 2 * QBLOCK); /* FUSED: [hi | lo]; HALVES: hi */ \
        AMX_DP(C, A, B);                                                                                    \
        if (kind == AMX_HALVES) {                                                                           \
            _tile_zero(CL);                                                                                 \
            _tile_loadd(AL, xr.q + (b) * AMX_M * 2 * QBLOCK + QBLOCK, 2 * QBLOCK);                          \
            AMX_DP(CL, AL, B);                                                                              \
        }                                                                                                   \
    } while (0)

// out [16][ROWS] = the group's output rows for the 16 rows of x at xr (all readable: gb_qlinear pads). wb:
// the group's blocks as B (Q8_0's data, or unpacked Q4_1).
// Software-pipelined: the products of blocks b + 2 and b + 3 run while blocks b and b + 1 are scaled (a tile
// product's latency, ~50 cycles, is most of a pair's time otherwise).
GB_INLINE void amx_tile(const qrows xr, const int kind, const int format, const uint8_t *wb, const uint16_t *sc, int64_t nb,
                        float *out) {
    __m512 acc[AMX_M];
    for (int i = 0; i < AMX_M; i++) acc[i] = _mm512_setzero_ps();
    _Alignas(64) int32_t c[4][AMX_M * ROWS];  // the slots' tiles, stored: C0, C1, C2, C3
    AMX_PRODUCTS(TILE_C0, TILE_C1, TILE_A0, TILE_A1, TILE_B0, 0);
    if (nb > 1) AMX_PRODUCTS(TILE_C2, TILE_C3, TILE_A1, TILE_A0, TILE_B1, 1);
    for (int64_t b = 0; b < nb; b += 2) {
        const int pair = b + 1 < nb;
        _tile_stored(TILE_C0, c[0], ROWS * 4);
        if (kind == AMX_HALVES) _tile_stored(TILE_C1, c[1], ROWS * 4);
        if (pair) {
            _tile_stored(TILE_C2, c[2], ROWS * 4);
            if (kind == AMX_HALVES) _tile_stored(TILE_C3, c[3], ROWS * 4);
        }
        if (b + 2 < nb) AMX_PRODUCTS(TILE_C0, TILE_C1, TILE_A0, TILE_A1, TILE_B0, b + 2);
        if (b + 3 < nb) AMX_PRODUCTS(TILE_C2, TILE_C3, TILE_A1, TILE_A0, TILE_B1, b + 3);
        amx_epilogue(xr, kind, format, sc, b, c[0], c[1], acc);
        if (pair) amx_epilogue(xr, kind, format, sc, b + 1, c[2], c[3], acc);
    }
    for (int i = 0; i < AMX_M; i++) _mm512_storeu_ps(out + i * ROWS, acc[i]);
}
#endif

// ---- float32 activations: each weight dequantized once per tile, multiplied in float32 ----
// The 32-bit lane of a packed step holds 4 bytes of one output row (kernels.h), so a vector of lanes is a
// vector of rows: byte t of each lane, shifted and masked, is the weight of input t (Q8_0, sign extended)
// or, per nibble, of inputs t and t + 4 (Q4_1). dq4/dq8 -> VW rows' values of one input, as float.
#if GB_AVX512
GB_INLINE vf dq4(const uint8_t *p, int shift) {
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(_mm512_loadu_si512((const void *)p), shift), _mm512_set1_epi32(0xF)));
}
GB_INLINE vf dq8(const uint8_t *p, int t) {
    return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(_mm512_loadu_si512((const void *)p), 24 - 8 * t), 24));
}
#elif GB_AVX2
GB_INLINE vf dq4(const uint8_t *p, int shift) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(_mm256_loadu_si256((const __m256i *)p), shift), _mm256_set1_epi32(0xF)));
}
GB_INLINE vf dq8(const uint8_t *p, int t) {
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)p), 24 - 8 * t), 24));
}
#elif GB_NEON
GB_INLINE vf dq4(const uint8_t *p, int shift) {
    return vcvtq_f32_u32(vandq_u32(vshlq_u32(vld1q_u32((const uint32_t *)p), vdupq_n_s32(-shift)), vdupq_n_u32(0xF)));
}
GB_INLINE vf dq8(const uint8_t *p, int t) {
    return vcvtq_f32_s32(vshlq_s32(vshlq_s32(vld1q_s32((const int32_t *)p), vdupq_n_s32(24 - 8 * t)), vdupq_n_s32(-24)));
}
#else
GB_INLINE vf dq4(const uint8_t *p, int shift) {
    uint32_t v;
    memcpy(&v, p, 4);
    return (float)((v >> shift) & 0xF);
}
GB_INLINE vf dq8(const uint8_t *p, int t) { return (float)(int8_t)p[t]; }
#endif

// On x86, ftile_row does not shift a weight down to bit 0: a Q4_1 nibble masked in place,
// (lane & 0xF << 8t), is q·2^8t, exact as a float, and it multiplies x·2^-8t (copy t of the row, scaled
// by gb_qlinear); a Q8_0 byte shifted to the top and masked, top_byte, is q·2^24 (signed) against
// x·2^-24. The same products q·x, so the same bits (for activations above 2^-100 in magnitude, whose
// copies are exact), with one vector shift fewer a weight: AVX2 runs one shift a cycle.
#if GB_AVX512
#define X86_NIBBLES 1
typedef __m512i vi;
GB_INLINE vi vi_load(const uint8_t *p) { return _mm512_loadu_si512((const void *)p); }
GB_INLINE vi vi_high_nibbles(vi v) { return _mm512_srli_epi32(v, 4); }
GB_INLINE vf nibble(vi v, int t) { return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF << 8 * t))); }
GB_INLINE vf top_byte(vi v, int t) {
    return _mm512_cvtepi32_ps(_mm512_and_si512(t == 3 ? v : _mm512_slli_epi32(v, 24 - 8 * t), _mm512_set1_epi32((int)0xFF000000)));
}
#elif GB_AVX2
#define X86_NIBBLES 1
typedef __m256i vi;
GB_INLINE vi vi_load(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
GB_INLINE vi vi_high_nibbles(vi v) { return _mm256_srli_epi32(v, 4); }
GB_INLINE vf nibble(vi v, int t) { return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF << 8 * t))); }
GB_INLINE vf top_byte(vi v, int t) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(t == 3 ? v : _mm256_slli_epi32(v, 24 - 8 * t), _mm256_set1_epi32((int)0xFF000000)));
}
#else
#define X86_NIBBLES 0
#endif

// out [MT][ROWS] = the group's rows for MT ≤ M_TILE rows of x (row stride ldx), in float32. Per output and
// block, Σ q·x over the block's 32 inputs in two fused multiply-add chains (the inputs k with k / 4 even,
// and odd: two multiply-adds in flight), then scaled once — the block's weights are d·q + m, so
//   acc = fma(d, p_even + p_odd, acc);   acc = fma(m, Σ x, acc)     (the second for Q4_1; xsum [MT][nb])
// in block order: the integer q become floats with no rounding, and only the block's sums see d and m.
GB_INLINE void ftile(const float *x, int64_t ldx, const float *xsum, const int MT, const int format, const uint8_t *w,
                     const uint16_t *sc, int64_t nb, float *out) {
    for (int i = 0; i < MT * ROWS; i++) out[i] = 0.0f;
#pragma GCC unroll 8
    for (int rv = 0; rv < ROWS; rv += VW) {
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + b * QBLOCK;
            vf p[M_TILE][2];
            for (int i = 0; i < M_TILE; i++) p[i][0] = p[i][1] = vf_zero();
            if (format == FORMAT_Q4_1) {
                const uint8_t *wb = w + b * 4 * ROWS * 4 + rv * 4;
                for (int j = 0; j < 4; j++) {
#pragma GCC unroll 4
                    for (int t = 0; t < 4; t++) {
#pragma GCC unroll 2
                        for (int h = 0; h < 2; h++) {
                            const vf q = dq4(wb + j * ROWS * 4, 8 * t + 4 * h);
                            for (int i = 0; i < MT; i++) p[i][h] = vf_fma(q, vf_set1(xb[i * ldx + 8 * j + 4 * h + t]), p[i][h]);
                        }
                    }
                }
                const vf d = vf_load_half(sc + b * 2 * ROWS + rv), m = vf_load_half(sc + b * 2 * ROWS + ROWS + rv);
                for (int i = 0; i < MT; i++) {
                    vf acc = vf_fma(d, vf_add(p[i][0], p[i][1]), vf_load(out + i * ROWS + rv));
                    vf_store(out + i * ROWS + rv, vf_fma(m, vf_set1(xsum[i * nb + b]), acc));
                }
            } else {
                const uint8_t *wb = w + b * 8 * ROWS * 4 + rv * 4;
#pragma GCC unroll 2
                for (int j = 0; j < 8; j++) {
#pragma GCC unroll 4
                    for (int t = 0; t < 4; t++) {
                        const vf q = dq8(wb + j * ROWS * 4, t);
                        for (int i = 0; i < MT; i++) p[i][j % 2] = vf_fma(q, vf_set1(xb[i * ldx + 4 * j + t]), p[i][j % 2]);
                    }
                }
                const vf d = vf_load_half(sc + b * ROWS + rv);
                for (int i = 0; i < MT; i++)
                    vf_store(out + i * ROWS + rv, vf_fma(d, vf_add(p[i][0], p[i][1]), vf_load(out + i * ROWS + rv)));
            }
        }
    }
}

// ftile for one row of x and GROUPS groups at once (weights gstride bytes and sstride scales apart; out
// [GROUPS][M_TILE][ROWS], row 0 of each): a multiply-add waits ~4 cycles for its chain's previous one, and
// one row of x over one group keeps only 2 chains in flight. Each output's operations and order are ftile's.
#define GROUPS 4
GB_INLINE void ftile_row(const float *x, const float *xs, int64_t K, const float *xsum, const int format,
                         const uint8_t *w, int64_t gstride, const uint16_t *sc, int64_t sstride, int64_t nb, float *out) {
    for (int g = 0; g < GROUPS; g++)
        for (int r = 0; r < ROWS; r++) out[g * M_TILE * ROWS + r] = 0.0f;
#pragma GCC unroll 8
    for (int rv = 0; rv < ROWS; rv += VW) {
        for (int64_t b = 0; b < nb; b++) {
#if !X86_NIBBLES  // (x86 reads the row's scaled copies, xs)
            const float *xb = x + b * QBLOCK;
#endif
            vf p[GROUPS][2];
            for (int g = 0; g < GROUPS; g++) p[g][0] = p[g][1] = vf_zero();
            if (format == FORMAT_Q4_1) {
                const uint8_t *wb = w + b * 4 * ROWS * 4 + rv * 4;
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) {
#if X86_NIBBLES
                    const float *xj = xs + b * QBLOCK + 8 * j;  // xs: the row's copies [4][K]
#pragma GCC unroll 4
                    for (int g = 0; g < GROUPS; g++) {
                        const vi v = vi_load(wb + g * gstride + j * ROWS * 4), high = vi_high_nibbles(v);
#pragma GCC unroll 4
                        for (int t = 0; t < 4; t++) {
                            p[g][0] = vf_fma(nibble(v, t), vf_set1(xj[t * K + t]), p[g][0]);
                            p[g][1] = vf_fma(nibble(high, t), vf_set1(xj[t * K + 4 + t]), p[g][1]);
                        }
                    }
#else
#pragma GCC unroll 4
                    for (int t = 0; t < 4; t++) {
                        const vf x0 = vf_set1(xb[8 * j + t]), x1 = vf_set1(xb[8 * j + 4 + t]);
#pragma GCC unroll 4
                        for (int g = 0; g < GROUPS; g++) {
                            p[g][0] = vf_fma(dq4(wb + g * gstride + j * ROWS * 4, 8 * t), x0, p[g][0]);
                            p[g][1] = vf_fma(dq4(wb + g * gstride + j * ROWS * 4, 8 * t + 4), x1, p[g][1]);
                        }
                    }
#endif
                }
#pragma GCC unroll 4
                for (int g = 0; g < GROUPS; g++) {
                    const uint16_t *s = sc + g * sstride + b * 2 * ROWS + rv;
                    const vf acc = vf_fma(vf_load_half(s), vf_add(p[g][0], p[g][1]), vf_load(out + g * M_TILE * ROWS + rv));
                    vf_store(out + g * M_TILE * ROWS + rv, vf_fma(vf_load_half(s + ROWS), vf_set1(xsum[b]), acc));
                }
            } else {
                const uint8_t *wb = w + b * 8 * ROWS * 4 + rv * 4;
#pragma GCC unroll 8
                for (int j = 0; j < 8; j++) {
#if X86_NIBBLES
                    const float *xj = xs + b * QBLOCK + 4 * j;  // xs: the row scaled by 2^-24
#pragma GCC unroll 4
                    for (int g = 0; g < GROUPS; g++) {
                        const vi v = vi_load(wb + g * gstride + j * ROWS * 4);
#pragma GCC unroll 4
                        for (int t = 0; t < 4; t++) p[g][j % 2] = vf_fma(top_byte(v, t), vf_set1(xj[t]), p[g][j % 2]);
                    }
#else
#pragma GCC unroll 4
                    for (int t = 0; t < 4; t++) {
                        const vf xv = vf_set1(xb[4 * j + t]);
#pragma GCC unroll 4
                        for (int g = 0; g < GROUPS; g++) p[g][j % 2] = vf_fma(dq8(wb + g * gstride + j * ROWS * 4, t), xv, p[g][j % 2]);
                    }
#endif
                }
#pragma GCC unroll 4
                for (int g = 0; g < GROUPS; g++) {
                    const vf d = vf_load_half(sc + g * sstride + b * ROWS + rv);
                    vf_store(out + g * M_TILE * ROWS + rv, vf_fma(d, vf_add(p[g][0], p[g][1]), vf_load(out + g * M_TILE * ROWS + rv)));
                }
            }
        }
    }
}

// ftile for many rows of x on x86 (prefill, batches): two groups' q are made floats once, into wq
// [nb][32][2][ROWS], and every tile of FM rows of x reads them there, so each q is converted once per call
// (not once per M_TILE rows) and each broadcast x feeds two multiply-adds. out [FM][2][ROWS]. Each
// output's operations and order are ftile's.
#if GB_AVX2 || GB_AVX512
#define PAIRED 1
// 2 groups x 2 chains x FM rows of x: 12 of AVX2's 16 registers, 24 of AVX-512's 32
#if GB_AVX512
#define FM 6
#else
#define FM 3
#endif
GB_INLINE void dequantize_pair(const int format, const uint8_t *w, int64_t gstride, int64_t nb, float *wq) {
    for (int64_t b = 0; b < nb; b++) {
        for (int g = 0; g < 2; g++) {
            float *dst = wq + b * QBLOCK * 2 * ROWS + g * ROWS;
            if (format == FORMAT_Q4_1) {
                const uint8_t *wb = w + g * gstride + b * 4 * ROWS * 4;
                for (int j = 0; j < 4; j++)
                    for (int t = 0; t < 4; t++)
                        for (int h = 0; h < 2; h++) vf_store(dst + (8 * j + 4 * h + t) * 2 * ROWS, dq4(wb + j * ROWS * 4, 8 * t + 4 * h));
            } else {
                const uint8_t *wb = w + g * gstride + b * 8 * ROWS * 4;
                for (int j = 0; j < 8; j++)
                    for (int t = 0; t < 4; t++) vf_store(dst + (4 * j + t) * 2 * ROWS, dq8(wb + j * ROWS * 4, t));
            }
        }
    }
}

GB_INLINE void ftile_pair(const float *x, int64_t ldx, const float *xsum, const int MT, const int format, const float *wq,
                          const uint16_t *sc, int64_t sstride, int64_t nb, float *out) {
    vf acc[FM][2];
    for (int i = 0; i < FM; i++) acc[i][0] = acc[i][1] = vf_zero();
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * QBLOCK, *wb = wq + b * QBLOCK * 2 * ROWS;
        vf p[FM][2][2];  // [row][group][chain]
        for (int i = 0; i < FM; i++) p[i][0][0] = p[i][0][1] = p[i][1][0] = p[i][1][1] = vf_zero();
#pragma GCC unroll 32
        for (int k = 0; k < QBLOCK; k++) {
            const vf w0 = vf_load(wb + k * 2 * ROWS), w1 = vf_load(wb + k * 2 * ROWS + ROWS);
            const int c = (k / 4) % 2;
            for (int i = 0; i < MT; i++) {
                const vf xv = vf_set1(xb[i * ldx + k]);
                p[i][0][c] = vf_fma(w0, xv, p[i][0][c]);
                p[i][1][c] = vf_fma(w1, xv, p[i][1][c]);
            }
        }
        for (int g = 0; g < 2; g++) {
            if (format == FORMAT_Q4_1) {
                const uint16_t *s = sc + g * sstride + b * 2 * ROWS;
                const vf d = vf_load_half(s), m = vf_load_half(s + ROWS);
                for (int i = 0; i < MT; i++)
                    acc[i][g] = vf_fma(m, vf_set1(xsum[i * nb + b]), vf_fma(d, vf_add(p[i][g][0], p[i][g][1]), acc[i][g]));
            } else {
                const vf d = vf_load_half(sc + g * sstride + b * ROWS);
                for (int i = 0; i < MT; i++) acc[i][g] = vf_fma(d, vf_add(p[i][g][0], p[i][g][1]), acc[i][g]);
            }
        }
    }
    for (int i = 0; i < MT; i++) {
        vf_store(out + i * 2 * ROWS, acc[i][0]);
        vf_store(out + i * 2 * ROWS + ROWS, acc[i][1]);
    }
}
#else
#define PAIRED 0
#endif

// y's rows [m0, m0 + mt) and columns [n0, n0 + ROWS) (those < N) = a tile's out (its row i at out + i * ld)
// + bias [N] (or NULL) + residual (row stride ldr; or NULL; may alias y).
GB_INLINE void store_tile(const float *out, int64_t ld, int64_t mt, int64_t m0, int64_t n0, int64_t N, const float *bias,
                          const float *residual, int64_t ldr, float *y, int64_t ldy) {
    const int64_t rows = N - n0 < ROWS ? N - n0 : ROWS;
    for (int64_t i = 0; i < mt; i++) {
        for (int64_t r = 0; r < rows; r += VW) {
            vf v = vf_load(out + i * ld + r);
            if (bias) v = vf_add(v, vf_load_n(bias + n0 + r, rows - r));
            if (residual) v = vf_add(vf_load_n(residual + (m0 + i) * ldr + n0 + r, rows - r), v);
            vf_store_n(y + (m0 + i) * ldy + n0 + r, v, rows - r);
        }
    }
}

// x [M, K] (row stride ldx; K a multiple of 32) float32 -> y [M, N] (row stride ldy) float32, x first
// transformed by the prologue (RMS_NORM: with norm_weight [K] and eps; SILU_MUL: x is [M, 2K]).
// residual [M, N] (row stride ldr; may alias y) is optional (NULL), as is w->bias.
void gb_qlinear(const float *x, int64_t M, int64_t K, int64_t ldx, int prologue, const float *norm_weight,
                float eps, const gb_qweight *w, int64_t N, float *y, int64_t ldy, const float *residual,
                int64_t ldr) {
    const int64_t nb = K / QBLOCK;
    const int integer = w->activations != ACTIVATIONS_FLOAT32;  // integer products: INT8, or INT16/INT12 as two INT8 rows
    const int64_t halves = w->activations == ACTIVATIONS_INT16 || w->activations == ACTIVATIONS_INT12 ? 2 : 1;
    const int64_t MQ = halves * M;                                  // quantized rows
    const int shift = w->activations == ACTIVATIONS_INT12 ? 4 : 8;  // INT16/INT12: the hi half's weight, 2^shift
#if GB_AMX
    const int amx = integer && MQ >= AMX_M;  // (fewer rows: the weights' bytes bound the call; VNNI runs it)
    const int tiled = amx && halves == 2;    // rows quantized in tiles' layout (amx_tile)
    const int64_t MP = amx ? (M + AMX_M - 1) / AMX_M * AMX_M : M;  // rows of x allocated: AMX reads whole tiles
#else
    const int tiled = 0;
    const int64_t MP = M;
#endif
    // float32 activations: the rows themselves, or their transformed copies; integer: their blocks.
    float *rows = prologue != PROLOGUE_NONE && !integer ? malloc(sizeof(float) * (size_t)(M * K)) : NULL;
    // float32 activations over Q4_1: each block's Σ x, for its minimum (in input order)
    float *xsum = !integer && w->format == FORMAT_Q4_1 ? malloc(sizeof(float) * (size_t)(M * nb)) : NULL;
    int8_t *q = integer ? aligned_alloc(64, (size_t)((halves * MP * K + 63) / 64 * 64)) : NULL;
    // (d and Σ x_q per row of x and block; INT16's and INT12's halves share them)
    float *d = integer ? malloc(sizeof(float) * (size_t)(MP * nb)) : NULL;
    int32_t *sum = integer ? malloc(sizeof(int32_t) * (size_t)(MP * nb)) : NULL;
    float *ds = integer ? malloc(sizeof(float) * (size_t)(MP * nb)) : NULL;  // d · Σ x_q, for Q4_1's m
    if (MP > M) {  // padding rows: zeros, whose products are 0 (tiled: the last tile's, whose rows interleave)
        const int64_t first = tiled ? M / AMX_M * AMX_M : M;
        memset(q + halves * first * K, 0, (size_t)(halves * (MP - first) * K));
        memset(d + M * nb, 0, sizeof(float) * (size_t)((MP - M) * nb));
        memset(sum + M * nb, 0, sizeof(int32_t) * (size_t)((MP - M) * nb));
        memset(ds + M * nb, 0, sizeof(float) * (size_t)((MP - M) * nb));
    }
    if (prologue != PROLOGUE_NONE || integer || xsum) {
#pragma omp parallel for schedule(static) if (M > 1)
        for (int64_t m = 0; m < M; m++) {
            const float *row = x + m * ldx;
            float *transformed = rows ? rows + m * K : NULL;
            if (prologue != PROLOGUE_NONE) {
                if (!transformed) transformed = malloc(sizeof(float) * (size_t)K);
                prologue_row(prologue, row, K, norm_weight, eps, transformed);
                row = transformed;
            }
            if (integer) {
                if (tiled) {  // row m's blocks in its tile: hi, lo at [m / 16][block][m % 16][0 | 32]
                    int8_t *hi = q + m / AMX_M * AMX_M * 2 * K + m % AMX_M * 2 * QBLOCK;
                    quantize_row_split(row, K, shift, hi, hi + QBLOCK, AMX_M * 2 * QBLOCK, d + m * nb, sum + m * nb);
                } else if (halves == 2)  // rows 2m (hi), 2m + 1 (lo)
                    quantize_row_split(row, K, shift, q + 2 * m * K, q + (2 * m + 1) * K, QBLOCK, d + m * nb, sum + m * nb);
                else quantize_row(row, K, q + m * K, d + m * nb, sum + m * nb);
                for (int64_t b = 0; b < nb; b++) ds[m * nb + b] = (float)sum[m * nb + b] * d[m * nb + b];
                free(transformed);
            } else if (xsum) {
                for (int64_t b = 0; b < nb; b++) {
                    float total = 0.0f;
                    for (int i = 0; i < QBLOCK; i++) total += row[b * QBLOCK + i];
                    xsum[m * nb + b] = total;
                }
            }
        }
    }
    const float *xf = rows ? rows : x;
    const int64_t ldf = rows ? K : ldx;

    // (M_TILE is even: a tile holds both halves of its INT16/INT12 rows)
    // (INT12 over Q4_1 on AVX-512: tile_fused's FUSED_MT rows of x, both halves, a tile, from 8 rows of x on;
    // with fewer, tile()'s fewer unpacking operations a weight vector win: 0.87-0.96x a layer at one row)
    const int fused = FUSED && w->activations == ACTIVATIONS_INT12 && w->format == FORMAT_Q4_1 && M >= FUSED_MT;
    const int64_t m_tile = fused ? 2 * FUSED_MT : M_TILE;  // quantized rows a tile
    const int64_t groups = (N + ROWS - 1) / ROWS, m_blocks = (MQ + m_tile - 1) / m_tile;
    const int64_t group_bytes = w->format == FORMAT_Q4_1 ? nb * QBLOCK * ROWS / 2 : nb * QBLOCK * ROWS;
    const int64_t group_scales = w->format == FORMAT_Q4_1 ? nb * 2 * ROWS : nb * ROWS;
#if GB_AMX
    if (amx) {  // each thread takes whole groups, all the rows of x (amx_tile)
        const int kind = halves == 1 ? AMX_INT8 : w->format == FORMAT_Q4_1 && shift == 4 ? AMX_FUSED : AMX_HALVES;
#pragma omp parallel
        {
            amx_configure(kind);
            uint8_t *wq = w->format == FORMAT_Q4_1 ? aligned_alloc(64, (size_t)((kind == AMX_FUSED ? 2 : 1) * nb * QBLOCK * ROWS)) : NULL;
            float out[AMX_M * ROWS];
#pragma omp for schedule(dynamic, 1)
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *wg = (const uint8_t *)w->data + g * group_bytes;
                const uint16_t *sg = w->scales + g * group_scales;
                if (wq) amx_unpack_q4(wg, nb, kind == AMX_FUSED, wq);
                for (int64_t m0 = 0; m0 < M; m0 += AMX_M) {
                    const int64_t mt = M - m0 < AMX_M ? M - m0 : AMX_M;
                    const qrows xr = {q + halves * m0 * K, d + m0 * nb, sum + m0 * nb, ds + m0 * nb, K, shift};
                    if (kind == AMX_FUSED) amx_tile(xr, AMX_FUSED, FORMAT_Q4_1, wq, sg, nb, out);
                    else if (kind == AMX_HALVES) {
                        if (wq) amx_tile(xr, AMX_HALVES, FORMAT_Q4_1, wq, sg, nb, out);
                        else amx_tile(xr, AMX_HALVES, FORMAT_Q8_0, wg, sg, nb, out);
                    } else {
                        if (wq) amx_tile(xr, AMX_INT8, FORMAT_Q4_1, wq, sg, nb, out);
                        else amx_tile(xr, AMX_INT8, FORMAT_Q8_0, wg, sg, nb, out);
                    }
                    store_tile(out, ROWS, mt, m0, g * ROWS, N, w->bias, residual, ldr, y, ldy);
                }
            }
            _tile_release();
            free(wq);
        }
        goto done;
    }
#endif
    // Each thread takes whole groups of output rows (their weights stream once per M_TILE rows of x); the
    // float32 path takes GROUPS groups at a time when x has one row (ftile_row). With more rows, work is
    // handed out in chunks (dynamic): a thread the OS preempts (another process on a 2-core machine) holds
    // up one chunk, not half the call (10-20% faster under light background load). Integer chunks are a
    // group's tiles for all the rows of x: the group's weights come from memory once, to one thread.
#if PAIRED
    // Many rows over float32: each thread takes pairs of groups, all the rows of x (ftile_pair).
    if (!integer && M >= 8) {
        const int64_t pairs = (groups + 1) / 2;
#pragma omp parallel
        {
            float *wq = aligned_alloc(64, sizeof(float) * (size_t)(nb * QBLOCK * 2 * ROWS));
            float out[FM * 2 * ROWS];
#pragma omp for schedule(dynamic, 4)
            for (int64_t pr = 0; pr < pairs; pr++) {
                const int64_t g0 = 2 * pr;
                // (an odd last group: its pair's second group is itself again, and not stored)
                const int64_t gstride = g0 + 1 < groups ? group_bytes : 0, sstride = g0 + 1 < groups ? group_scales : 0;
                const uint8_t *wg = (const uint8_t *)w->data + g0 * group_bytes;
                const uint16_t *sg = w->scales + g0 * group_scales;
                if (w->format == FORMAT_Q4_1) dequantize_pair(FORMAT_Q4_1, wg, gstride, nb, wq);
                else dequantize_pair(FORMAT_Q8_0, wg, gstride, nb, wq);
                for (int64_t m0 = 0; m0 < M; m0 += FM) {
                    const int64_t mt = M - m0 < FM ? M - m0 : FM;
                    const float *xm = xf + m0 * ldf, *xs = xsum ? xsum + m0 * nb : NULL;
#define PAIR(MT)                                                                              \
    if (w->format == FORMAT_Q4_1) ftile_pair(xm, ldf, xs, MT, FORMAT_Q4_1, wq, sg, sstride, nb, out); \
    else ftile_pair(xm, ldf, xs, MT, FORMAT_Q8_0, wq, sg, sstride, nb, out);
                    switch (mt) {
                        case 1: PAIR(1); break;
                        case 2: PAIR(2); break;
#if FM > 3
                        case 3: PAIR(3); break;
                        case 4: PAIR(4); break;
                        case 5: PAIR(5); break;
#endif
                        default: PAIR(FM); break;
                    }
#undef PAIR
                    for (int64_t gi = 0; gi < 2 && g0 + gi < groups; gi++)
                        store_tile(out + gi * ROWS, 2 * ROWS, mt, m0, (g0 + gi) * ROWS, N, w->bias, residual, ldr, y, ldy);
                }
            }
            free(wq);
        }
        goto done;
    }
#endif
    const int GN = !integer && M == 1 ? GROUPS : 1;
    // ftile_row on x86: the row as 4 copies [4][K], copy t scaled by 2^-8t (Q4_1), or one scaled by 2^-24
    float *xcopies = NULL;
    if (X86_NIBBLES && GN > 1) {
        const int q4 = w->format == FORMAT_Q4_1;
        xcopies = malloc(sizeof(float) * (size_t)((q4 ? 4 : 1) * K));
        for (int t = 0; t < (q4 ? 4 : 1); t++)
            for (int64_t k = 0; k < K; k++) xcopies[t * K + k] = xf[k] * (1.0f / (float)(1 << (q4 ? 8 * t : 24)));
    }
    const int64_t units = (groups + GN - 1) / GN;
    // (one row of x: even shares, as a static schedule: a decode step's many short calls feel the hand-out)
    // (integer: whole groups, at least 4 tiles a chunk: handing out one tile at a time costs more than a tile)
    const int64_t chunk = M == 1 ? (units + max_threads() - 1) / max_threads() : integer ? (4 + m_blocks - 1) / m_blocks * m_blocks : 4;
#pragma omp parallel for schedule(dynamic, chunk) collapse(2)
    for (int64_t u = 0; u < units; u++) {
        for (int64_t mb = 0; mb < m_blocks; mb++) {
            const int64_t m0 = mb * m_tile, mt = MQ - m0 < m_tile ? MQ - m0 : m_tile;
            const int64_t g0 = u * GN, gn = groups - g0 < GN ? groups - g0 : GN;
            const qrows xr = {q + m0 * K, d + m0 / halves * nb, sum + m0 / halves * nb, ds + m0 / halves * nb, K, shift};
            const uint8_t *wg = (const uint8_t *)w->data + g0 * group_bytes;
            const uint16_t *sg = w->scales + g0 * group_scales;
            const float *xm = xf + m0 / halves * ldf, *xs = xsum ? xsum + m0 * nb : NULL;
            float out[GROUPS * M_TILE * ROWS];
            // (every combination spelled out: MT, GN and the format are constants inside each tile)
#define TILE(MT)                                                                                                     \
    if (halves == 2) {                                                                                               \
        if (w->format == FORMAT_Q4_1) tile(xr, MT, 2, FORMAT_Q4_1, wg, sg, nb, out);                                \
        else tile(xr, MT, 2, FORMAT_Q8_0, wg, sg, nb, out);                                                         \
    } else if (integer) {                                                                                            \
        if (w->format == FORMAT_Q4_1) tile(xr, MT, 1, FORMAT_Q4_1, wg, sg, nb, out);                                \
        else tile(xr, MT, 1, FORMAT_Q8_0, wg, sg, nb, out);                                                         \
    } else {                                                                                                         \
        for (int64_t gi = 0; gi < gn; gi++) {                                                                        \
            const uint8_t *wi = wg + gi * group_bytes;                                                               \
            const uint16_t *si = sg + gi * group_scales;                                                             \
            if (w->format == FORMAT_Q4_1) ftile(xm, ldf, xs, MT, FORMAT_Q4_1, wi, si, nb, out + gi * M_TILE * ROWS); \
            else ftile(xm, ldf, xs, MT, FORMAT_Q8_0, wi, si, nb, out + gi * M_TILE * ROWS);                          \
        }                                                                                                            \
    }
            if (fused) {
#if FUSED
                switch (mt / 2) {
                    case 1: tile_fused(xr, 1, wg, sg, nb, out); break;
                    case 2: tile_fused(xr, 2, wg, sg, nb, out); break;
                    case 3: tile_fused(xr, 3, wg, sg, nb, out); break;
                    case 4: tile_fused(xr, 4, wg, sg, nb, out); break;
                    case 5: tile_fused(xr, 5, wg, sg, nb, out); break;
                    case 6: tile_fused(xr, 6, wg, sg, nb, out); break;
                    case 7: tile_fused(xr, 7, wg, sg, nb, out); break;
                    default: tile_fused(xr, FUSED_MT, wg, sg, nb, out); break;
                }
#endif
            } else if (gn == GROUPS && M == 1) {  // (only the float32 path takes GROUPS at once)
                if (w->format == FORMAT_Q4_1) ftile_row(xm, xcopies, K, xs, FORMAT_Q4_1, wg, group_bytes, sg, group_scales, nb, out);
                else ftile_row(xm, xcopies, K, xs, FORMAT_Q8_0, wg, group_bytes, sg, group_scales, nb, out);
            } else {
                switch (mt) {
                    case 1: TILE(1); break;
                    case 2: TILE(2); break;
                    case 3: TILE(3); break;
#if M_TILE > 4
                    case 4: TILE(4); break;
                    case 5: TILE(5); break;
                    case 6: TILE(6); break;
                    case 7: TILE(7); break;
#endif
                    default: TILE(M_TILE); break;
                }
            }
#undef TILE
            for (int64_t gi = 0; gi < gn; gi++)
                store_tile(out + gi * M_TILE * ROWS, ROWS, mt / halves, m0 / halves, (g0 + gi) * ROWS, N, w->bias, residual, ldr, y, ldy);
        }
    }
    free(xcopies);
#if PAIRED || GB_AMX
done:  // (the paired and AMX paths' end)
#endif
    free(rows);
    free(xsum);
    free(q);
    free(d);
    free(sum);
    free(ds);
}

// For the tests: x [M, K] -> q [M, K] int8, d and sum [M, K / 32], as gb_qlinear quantizes its rows.
void gb_quantize_rows(const float *x, int64_t M, int64_t K, int8_t *q, float *d, int32_t *sum) {
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, K, q + m * K, d + m * (K / QBLOCK), sum + m * (K / QBLOCK));
}

// Weights w [N, K] float32 (K a multiple of 32) -> their blocks, packed (kernels.h): data and scales,
// zero-filled by the caller for the padding rows; error [N]: each row's max |dequantized - w|. The same
// numbers as layers/quantized_linear.quantize_weight then pack (tested bit for bit), in one pass.
void gb_quantize(const float *w, int64_t N, int64_t K, int64_t format, uint8_t *data, uint16_t *scales, float *error) {
    const int64_t nb = K / QBLOCK;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int64_t g = n / ROWS, r = n % ROWS;
        float worst = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const float *x = w + n * K + b * QBLOCK;
            const int64_t block = g * nb + b;
            int q[QBLOCK];
            float low = x[0], high = x[0], amax = 0.0f;
            for (int i = 0; i < QBLOCK; i++) {
                low = fminf(low, x[i]);
                high = fmaxf(high, x[i]);
                amax = fmaxf(amax, fabsf(x[i]));
            }
            // As torch: q = clamp(round(nan_to_num((x - m) / d)), range), against the float16 d and m.
            const uint16_t d16 = float_to_half(format == FORMAT_Q4_1 ? (high - low) / 15.0f : amax / 127.0f);
            const uint16_t m16 = format == FORMAT_Q4_1 ? float_to_half(low) : 0;
            const float d = half_to_float(d16), m = half_to_float(m16);
            const float lo = format == FORMAT_Q4_1 ? 0.0f : -127.0f, hi = format == FORMAT_Q4_1 ? 15.0f : 127.0f;
            for (int i = 0; i < QBLOCK; i++) {
                float v = (x[i] - m) / d;
                v = isnan(v) ? 0.0f : nearbyintf(v);
                q[i] = (int)fminf(fmaxf(v, lo), hi);
                worst = fmaxf(worst, fabsf((float)q[i] * d + m - x[i]));
            }
            if (format == FORMAT_Q4_1) {
                uint8_t *out = data + block * 4 * ROWS * 4 + r * 4;
                for (int j = 0; j < 4; j++)
                    for (int t = 0; t < 4; t++) out[j * ROWS * 4 + t] = (uint8_t)(q[8 * j + t] | q[8 * j + 4 + t] << 4);
                scales[block * 2 * ROWS + r] = d16;
                scales[block * 2 * ROWS + ROWS + r] = m16;
            } else {
                uint8_t *out = data + block * 8 * ROWS * 4 + r * 4;
                for (int j = 0; j < 8; j++)
                    for (int t = 0; t < 4; t++) out[j * ROWS * 4 + t] = (uint8_t)(int8_t)q[4 * j + t];
                scales[block * ROWS + r] = d16;
            }
        }
        error[n] = worst;
    }
}
