// The instruction set the library is compiled for, and the float vector the kernels are written in.
//
// The library is built once per instruction set (kernels/cpu_native.py picks the flags from the CPU, or
// GLASSBOX_NATIVE_ISA): AVX-512 (with VNNI; "amx": with AMX's int8 tiles too), AVX2 (with FMA and F16C),
// ARM64 NEON (with the dot-product extension) or plain C. The kernels are written once against `vf`, a vector
// of VW floats, and the few operations below; only the integer dot products of qlinear.c have their own inner
// loop per ISA.
//
// Every ISA computes the same operations in the same order per lane (fused multiply-adds where written,
// e^x by the same polynomial), so results differ between ISAs only where a reduction's order does (sums
// across a vector's lanes).

#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define GB_AVX512 1
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define GB_AMX 1  // AVX-512 plus AMX's int8 tiles for qlinear's integer products (qlinear.c)
#define GB_ISA "amx"
#else
#define GB_ISA "avx512"
#endif
#define VW 16
#include <immintrin.h>
typedef __m512 vf;
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define GB_AVX2 1
#define GB_ISA "avx2"
#define VW 8
#include <immintrin.h>
typedef __m256 vf;
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#define GB_NEON 1
#define GB_ISA "neon"
#define VW 4
#include <arm_neon.h>
typedef float32x4_t vf;
#else
#define GB_GENERIC 1
#define GB_ISA "generic"
#define VW 1
typedef float vf;
#endif

#define GB_INLINE static inline __attribute__((always_inline))
#define PREFETCH(p) __builtin_prefetch(p)

// ---- loads and stores (the _n forms take the first min(n, VW) lanes; the others read as 0) ----
#if GB_AVX512
GB_INLINE __mmask16 lanes(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }
GB_INLINE vf vf_zero(void) { return _mm512_setzero_ps(); }
GB_INLINE vf vf_set1(float x) { return _mm512_set1_ps(x); }
GB_INLINE vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
GB_INLINE vf vf_load_n(const float *p, int64_t n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
GB_INLINE void vf_store(float *p, vf v) { _mm512_storeu_ps(p, v); }
GB_INLINE void vf_store_n(float *p, vf v, int64_t n) { _mm512_mask_storeu_ps(p, lanes(n), v); }
GB_INLINE vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
GB_INLINE vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
GB_INLINE vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
GB_INLINE vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
GB_INLINE vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
GB_INLINE vf vf_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
GB_INLINE vf vf_fnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
GB_INLINE vf vf_abs(vf a) { return _mm512_abs_ps(a); }
GB_INLINE vf vf_round(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
GB_INLINE vf vf_floor(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
// The lanes (integers in [-128, 127]) as VW int8 at p.
GB_INLINE void vf_store_i8(int8_t *p, vf v) { _mm_storeu_si128((__m128i *)p, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v))); }
GB_INLINE float vf_sum(vf a) { return _mm512_reduce_add_ps(a); }
// VW sums at once: lane i of the result = the sum of v[i]'s lanes (a transpose by halves: 45 operations for
// 16 sums, against ~8 each one at a time).
GB_INLINE vf vf_sum_each(const vf *v) {
    __m512 w[8], e[4], f[2];
    for (int i = 0; i < 8; i++)  // per 128-bit lane: v[2i]'s and v[2i + 1]'s sums of pairs, interleaved
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  // per 128-bit lane: v[4i .. 4i + 3]'s sums of that lane
        e[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; i++)  // lanes (0 + 1, 2 + 3) of e[2i], then of e[2i + 1]
        f[i] = _mm512_add_ps(_mm512_shuffle_f32x4(e[2 * i], e[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(e[2 * i], e[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(f[0], f[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(f[0], f[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
GB_INLINE float vf_hmax(vf a) { return _mm512_reduce_max_ps(a); }
GB_INLINE int vf_any_eq(vf a, float x) { return _mm512_cmp_ps_mask(a, _mm512_set1_ps(x), _CMP_EQ_OQ) != 0; }
// 2^n for integral n in [-126, 127]
GB_INLINE vf vf_pow2i(vf n) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23)); }
GB_INLINE vf vf_load_bf16_n(const uint16_t *p, int64_t n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes(n), p)), 16));
}
GB_INLINE vf vf_load_half(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
#elif GB_AVX2
GB_INLINE __m256i lanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 0 ? 0 : n > 8 ? 8 : n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
GB_INLINE vf vf_zero(void) { return _mm256_setzero_ps(); }
GB_INLINE vf vf_set1(float x) { return _mm256_set1_ps(x); }
GB_INLINE vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
GB_INLINE vf vf_load_n(const float *p, int64_t n) { return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes(n)); }
GB_INLINE void vf_store(float *p, vf v) { _mm256_storeu_ps(p, v); }
GB_INLINE void vf_store_n(float *p, vf v, int64_t n) {
    if (n >= 8) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, lanes(n), v);
}
GB_INLINE vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
GB_INLINE vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
GB_INLINE vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
GB_INLINE vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
GB_INLINE vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
GB_INLINE vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
GB_INLINE vf vf_fnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
GB_INLINE vf vf_abs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
GB_INLINE vf vf_round(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
GB_INLINE vf vf_floor(vf a) { return _mm256_floor_ps(a); }
GB_INLINE void vf_store_i8(int8_t *p, vf v) {
    const __m256i i = _mm256_cvtps_epi32(v);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64((__m128i *)p, _mm_packs_epi16(w, w));
}
GB_INLINE float vf_sum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
GB_INLINE vf vf_sum_each(const vf *v) {  // lane i: the sum of v[i] (as AVX-512's, by halves)
    __m256 w[4], e[2];
    for (int i = 0; i < 4; i++)
        w[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        e[i] = _mm256_add_ps(_mm256_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm256_add_ps(_mm256_permute2f128_ps(e[0], e[1], 0x20), _mm256_permute2f128_ps(e[0], e[1], 0x31));
}
GB_INLINE float vf_hmax(vf a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
GB_INLINE int vf_any_eq(vf a, float x) { return _mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_set1_ps(x), _CMP_EQ_OQ)) != 0; }
GB_INLINE vf vf_pow2i(vf n) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)); }
GB_INLINE vf vf_load_half(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
GB_INLINE vf vf_load_bf16_n(const uint16_t *p, int64_t n) {
    __m128i h;
    if (n >= 8) {
        h = _mm_loadu_si128((const __m128i *)p);
    } else {
        uint16_t tmp[8] = {0};
        memcpy(tmp, p, sizeof(uint16_t) * (size_t)(n < 0 ? 0 : n));
        h = _mm_loadu_si128((const __m128i *)tmp);
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#elif GB_NEON
GB_INLINE vf vf_zero(void) { return vdupq_n_f32(0.0f); }
GB_INLINE vf vf_set1(float x) { return vdupq_n_f32(x); }
GB_INLINE vf vf_load(const float *p) { return vld1q_f32(p); }
GB_INLINE vf vf_load_n(const float *p, int64_t n) {
    if (n >= 4) return vld1q_f32(p);
    float tmp[4] = {0};
    memcpy(tmp, p, sizeof(float) * (size_t)(n < 0 ? 0 : n));
    return vld1q_f32(tmp);
}
GB_INLINE void vf_store(float *p, vf v) { vst1q_f32(p, v); }
GB_INLINE void vf_store_n(float *p, vf v, int64_t n) {
    if (n >= 4) {
        vst1q_f32(p, v);
        return;
    }
    float tmp[4];
    vst1q_f32(tmp, v);
    memcpy(p, tmp, sizeof(float) * (size_t)(n < 0 ? 0 : n));
}
GB_INLINE vf vf_add(vf a, vf b) { return vaddq_f32(a, b); }
GB_INLINE vf vf_sub(vf a, vf b) { return vsubq_f32(a, b); }
GB_INLINE vf vf_mul(vf a, vf b) { return vmulq_f32(a, b); }
GB_INLINE vf vf_div(vf a, vf b) { return vdivq_f32(a, b); }
GB_INLINE vf vf_max(vf a, vf b) { return vmaxq_f32(a, b); }
GB_INLINE vf vf_fma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
GB_INLINE vf vf_fnma(vf a, vf b, vf c) { return vfmsq_f32(c, a, b); }
GB_INLINE vf vf_abs(vf a) { return vabsq_f32(a); }
GB_INLINE vf vf_round(vf a) { return vrndnq_f32(a); }
GB_INLINE vf vf_floor(vf a) { return vrndmq_f32(a); }
GB_INLINE void vf_store_i8(int8_t *p, vf v) {
    const int16x4_t w = vmovn_s32(vcvtnq_s32_f32(v));
    const int8x8_t b = vmovn_s16(vcombine_s16(w, w));
    vst1_lane_s32((int32_t *)(void *)p, vreinterpret_s32_s8(b), 0);
}
GB_INLINE float vf_sum(vf a) { return vaddvq_f32(a); }
GB_INLINE vf vf_sum_each(const vf *v) { return vpaddq_f32(vpaddq_f32(v[0], v[1]), vpaddq_f32(v[2], v[3])); }
GB_INLINE float vf_hmax(vf a) { return vmaxvq_f32(a); }
GB_INLINE int vf_any_eq(vf a, float x) { return vmaxvq_u32(vceqq_f32(a, vdupq_n_f32(x))) != 0; }
GB_INLINE vf vf_pow2i(vf n) { return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23)); }
GB_INLINE vf vf_load_half(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
GB_INLINE vf vf_load_bf16_n(const uint16_t *p, int64_t n) {
    uint16_t tmp[4] = {0};
    memcpy(tmp, p, sizeof(uint16_t) * (size_t)(n < 0 ? 0 : n > 4 ? 4 : n));
    return vreinterpretq_f32_u32(vshlq_n_u32(vmovl_u16(vld1_u16(tmp)), 16));
}
#else
GB_INLINE vf vf_zero(void) { return 0.0f; }
GB_INLINE vf vf_set1(float x) { return x; }
GB_INLINE vf vf_load(const float *p) { return *p; }
GB_INLINE vf vf_load_n(const float *p, int64_t n) { return n >= 1 ? *p : 0.0f; }
GB_INLINE void vf_store(float *p, vf v) { *p = v; }
GB_INLINE void vf_store_n(float *p, vf v, int64_t n) {
    if (n >= 1) *p = v;
}
GB_INLINE vf vf_add(vf a, vf b) { return a + b; }
GB_INLINE vf vf_sub(vf a, vf b) { return a - b; }
GB_INLINE vf vf_mul(vf a, vf b) { return a * b; }
GB_INLINE vf vf_div(vf a, vf b) { return a / b; }
GB_INLINE vf vf_max(vf a, vf b) { return a > b ? a : b; }  // (maxps: the second operand where either is NaN)
GB_INLINE vf vf_fma(vf a, vf b, vf c) { return fmaf(a, b, c); }
GB_INLINE vf vf_fnma(vf a, vf b, vf c) { return fmaf(-a, b, c); }
GB_INLINE vf vf_abs(vf a) { return fabsf(a); }
GB_INLINE vf vf_round(vf a) { return nearbyintf(a); }
GB_INLINE vf vf_floor(vf a) { return floorf(a); }
GB_INLINE void vf_store_i8(int8_t *p, vf v) { *p = (int8_t)(int32_t)v; }
GB_INLINE float vf_sum(vf a) { return a; }
GB_INLINE vf vf_sum_each(const vf *v) { return v[0]; }
GB_INLINE float vf_hmax(vf a) { return a; }
GB_INLINE int vf_any_eq(vf a, float x) { return a == x; }
GB_INLINE vf vf_pow2i(vf n) {
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
GB_INLINE vf vf_load_bf16_n(const uint16_t *p, int64_t n) {
    uint32_t bits = n >= 1 ? (uint32_t)*p << 16 : 0;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
#endif

// e^x to ~2 ulp: e^x = 2^n · e^r with n = round(x · log2 e) and |r| ≤ ln 2 / 2, e^r by a degree-6
// polynomial (Taylor's coefficients; the truncation error is < 2e-8 on that interval). x is clamped to
// [-87.3, 88]: 0 below (as expf underflows there), e^88 above; x = -inf gives 0.
GB_INLINE vf vf_exp(vf x) {
    x = vf_max(x, vf_set1(-87.3f));
    x = vf_sub(vf_zero(), vf_max(vf_sub(vf_zero(), x), vf_set1(-88.0f)));  // min(x, 88)
    const vf n = vf_round(vf_mul(x, vf_set1(1.44269504088896341f)));
    vf r = vf_fnma(n, vf_set1(0.693359375f), x);
    r = vf_fnma(n, vf_set1(-2.12194440e-4f), r);
    vf p = vf_set1(1.0f / 720);
    p = vf_fma(p, r, vf_set1(1.0f / 120));
    p = vf_fma(p, r, vf_set1(1.0f / 24));
    p = vf_fma(p, r, vf_set1(1.0f / 6));
    p = vf_fma(p, r, vf_set1(0.5f));
    p = vf_fma(p, r, vf_set1(1.0f));
    p = vf_fma(p, r, vf_set1(1.0f));
    return vf_mul(p, vf_pow2i(n));
}

// Scalar conversions: IEEE half -> float (the weight scales), float -> bfloat16 rounded to nearest even
// as torch's .to(torch.bfloat16) rounds finite values (the KV cache).
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000 | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {  // subnormal: value = mant · 2^-24, exact in float
        float f = (float)mant * 5.9604644775390625e-8f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#if GB_GENERIC
GB_INLINE vf vf_load_half(const uint16_t *p) { return half_to_float(*p); }
#endif

// float -> IEEE half, rounded to nearest even as torch's .half() (the weight scales as they are stored).
static inline uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000, absx = x & 0x7FFFFFFF;
    if (absx >= 0x7F800000) return (uint16_t)(sign | 0x7C00 | (absx > 0x7F800000 ? 0x200 : 0));  // inf, NaN
    if (absx >= 0x477FF000) return (uint16_t)(sign | 0x7C00);  // rounds past 65504: inf
    if (absx < 0x38800000) {  // under 2^-14: a subnormal half, m · 2^-24 (m = 1024 is the smallest normal)
        float v;
        memcpy(&v, &absx, 4);
        return (uint16_t)(sign | (uint32_t)nearbyintf(v * 16777216.0f));
    }
    return (uint16_t)(sign | ((absx + 0xFFF + ((absx >> 13) & 1) - 0x38000000) >> 13));
}

static inline uint16_t float_to_bf16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}
