// AMX probe for issue 16 (not part of the engine): a 32-row GEMM over Q4_1-style weights (w = d*q + m,
// blocks of 32) on Sapphire Rapids' AMX bf16 tiles, at float32-like precision: w and x are each split into
// a bf16 high part and a bf16 low part, and y = x_hi*w_hi + x_lo*w_hi + x_hi*w_lo with fp32 accumulation over
// the whole K (three TDPBF16PS per 16x16x32 tile step; the dropped x_lo*w_lo term is ~2^-16 of the rest).
// Weights are dequantized per 32 output columns into the tiles' VNNI layout (scalar, then AVX-512 BF16),
// once per call; one thread. Beside it, a plain AVX-512 FMA GEMM over pre-dequantized float32 weights.
// Prints per shape: time, GMAC/s, and the largest error relative to sum |x*w| (float64 reference).
//
//   gcc -O3 -march=sapphirerapids bench/amx_probe.c -o /tmp/amx_probe -lm && /tmp/amx_probe 576 3072
//   (arguments: K N; M is 32; needs a CPU with AMX and Linux >= 5.16)
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct { uint8_t palette_id, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } __attribute__((packed)) tilecfg;

static uint16_t bf16(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return (uint16_t)(u >> 16); }
static float f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

static void dequant(const uint8_t *q, const float *d, const float *mn, int K, int n0, uint16_t *hi, uint16_t *lo) {
    const int KC = K / 32;
    for (int kc = 0; kc < KC; kc++)
        for (int nt = 0; nt < 2; nt++)
            for (int n = 0; n < 16; n++) {
                const int row = n0 + nt * 16 + n;
                const float dd = d[row * KC + kc], mm = mn[row * KC + kc];
                for (int k = 0; k < 32; k++) {
                    const float w = dd * (float)q[row * K + kc * 32 + k] + mm;
                    const uint16_t h = bf16(w);
                    const size_t off = (((size_t)kc * 2 + nt) * 16 + k / 2) * 32 + n * 2 + (k & 1);
                    hi[off] = h;
                    lo[off] = bf16(w - f32(h));
                }
            }
}


// q packed [N/16][K][16] bytes (column vectors of 16 rows per k); d, m [N/16][KC][16]
static void dequant_vec(const uint8_t *qp, const float *dp, const float *mp, int K, int n0, uint16_t *hi, uint16_t *lo) {
    const int KC = K / 32;
    const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int nt = 0; nt < 2; nt++) {
        const int g = n0 / 16 + nt;
        for (int kc = 0; kc < KC; kc++) {
            const __m512 d = _mm512_loadu_ps(dp + ((size_t)g * KC + kc) * 16), m = _mm512_loadu_ps(mp + ((size_t)g * KC + kc) * 16);
            uint16_t *th = hi + ((size_t)kc * 2 + nt) * 512, *tl = lo + ((size_t)kc * 2 + nt) * 512;
            const uint8_t *qb = qp + ((size_t)g * K + kc * 32) * 16;
            for (int kp = 0; kp < 16; kp++) {
                const __m512 wa = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qb + (2 * kp) * 16)))), m);
                const __m512 wb = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qb + (2 * kp + 1) * 16)))), m);
                const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(wb, wa);  // [a0..a15, b0..b15]
                const __m512 ha = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
                const __m512 hb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
                const __m512i l = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(wb, hb), _mm512_sub_ps(wa, ha));
                _mm512_store_si512((__m512i *)(th + kp * 32), _mm512_permutexvar_epi16(inter, h));
                _mm512_store_si512((__m512i *)(tl + kp * 32), _mm512_permutexvar_epi16(inter, l));
            }
        }
    }
}

static void amx_block(const uint16_t *xhi, const uint16_t *xlo, int K, const uint16_t *whi, const uint16_t *wlo, float *y, int N, int n0) {
    const int KC = K / 32;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int kc = 0; kc < KC; kc++) {
        const uint16_t *bh = whi + (size_t)kc * 2 * 512, *bl = wlo + (size_t)kc * 2 * 512;
        _tile_loadd(4, xhi + kc * 32, K * 2);
        _tile_loadd(5, xlo + kc * 32, K * 2);
        _tile_loadd(6, bh, 64);
        _tile_loadd(7, bl, 64);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(0, 5, 6); _tile_dpbf16ps(0, 4, 7);
        _tile_loadd(6, bh + 512, 64);
        _tile_loadd(7, bl + 512, 64);
        _tile_dpbf16ps(1, 4, 6); _tile_dpbf16ps(1, 5, 6); _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(4, xhi + 16 * K + kc * 32, K * 2);
        _tile_loadd(5, xlo + 16 * K + kc * 32, K * 2);
        _tile_dpbf16ps(3, 4, 6); _tile_dpbf16ps(3, 5, 6); _tile_dpbf16ps(3, 4, 7);
        _tile_loadd(6, bh, 64);
        _tile_loadd(7, bl, 64);
        _tile_dpbf16ps(2, 4, 6); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(2, 4, 7);
    }
    _tile_stored(0, y + n0, N * 4);
    _tile_stored(1, y + n0 + 16, N * 4);
    _tile_stored(2, y + 16 * N + n0, N * 4);
    _tile_stored(3, y + 16 * N + n0 + 16, N * 4);
}

static double err(const float *y, const float *x, const float *wf, int M, int N, int K) {
    double maxrel = 0;
    for (int m = 0; m < M; m++) for (int n = 0; n < N; n++) {
        double ref = 0, mag = 0;
        for (int k = 0; k < K; k++) { ref += (double)x[m * K + k] * wf[(size_t)n * K + k]; mag += fabs((double)x[m * K + k] * wf[(size_t)n * K + k]); }
        const double e = fabs(y[m * N + n] - ref) / mag; if (e > maxrel) maxrel = e;
    }
    return maxrel;
}

int main(int argc, char **argv) {
    const int M = 32, K = argc > 1 ? atoi(argv[1]) : 576, N = argc > 2 ? atoi(argv[2]) : 3072, KC = K / 32;
    if (syscall(SYS_arch_prctl, 0x1023, 18)) { printf("no AMX\n"); return 1; }
    tilecfg cfg; memset(&cfg, 0, sizeof cfg); cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
    uint8_t *q = malloc((size_t)N * K); float *d = malloc(sizeof(float) * N * KC), *mn = malloc(sizeof(float) * N * KC);
    float *x = malloc(sizeof(float) * M * K), *y = aligned_alloc(64, sizeof(float) * M * N), *wf = aligned_alloc(64, sizeof(float) * (size_t)N * K);
    srand(1);
    for (size_t i = 0; i < (size_t)N * K; i++) q[i] = rand() & 15;
    for (int i = 0; i < N * KC; i++) { d[i] = (float)(rand() % 1000 + 1) * 1e-5f; mn[i] = -(float)(rand() % 1000) * 1e-4f; }
    for (int i = 0; i < M * K; i++) x[i] = (float)rand() / RAND_MAX * 2 - 1;
    uint16_t *xhi = aligned_alloc(64, 2 * M * K), *xlo = aligned_alloc(64, 2 * M * K);
    uint16_t *whi = aligned_alloc(64, 2 * 32 * K), *wlo = aligned_alloc(64, 2 * 32 * K);
    for (int n = 0; n < N; n++) for (int k = 0; k < K; k++) wf[(size_t)n * K + k] = d[n * KC + k / 32] * q[(size_t)n * K + k] + mn[n * KC + k / 32];
    double best = 1e9, bestc = 1e9;
    for (int rep = 0; rep < 20; rep++) {
        double t0 = now();
        for (int i = 0; i < M * K; i++) { xhi[i] = bf16(x[i]); xlo[i] = bf16(x[i] - f32(xhi[i])); }
        for (int n0 = 0; n0 < N; n0 += 32) { dequant(q, d, mn, K, n0, whi, wlo); amx_block(xhi, xlo, K, whi, wlo, y, N, n0); }
        double t = now() - t0; if (t < best) best = t;
        t0 = now();
        for (int n0 = 0; n0 < N; n0 += 32) amx_block(xhi, xlo, K, whi, wlo, y, N, 0);  // tile work alone
        t = now() - t0; if (t < bestc) bestc = t;
    }
    for (int n0 = 0; n0 < N; n0 += 32) { dequant(q, d, mn, K, n0, whi, wlo); amx_block(xhi, xlo, K, whi, wlo, y, N, n0); }
    double maxrel = err(y, x, wf, M, N, K);
    uint8_t *qp = aligned_alloc(64, (size_t)N * K); float *dp = malloc(sizeof(float) * N * KC), *mp = malloc(sizeof(float) * N * KC);
    for (int n = 0; n < N; n++) {
        for (int k = 0; k < K; k++) qp[((size_t)(n / 16) * K + k) * 16 + n % 16] = q[(size_t)n * K + k];
        for (int kc = 0; kc < KC; kc++) { dp[((size_t)(n / 16) * KC + kc) * 16 + n % 16] = d[n * KC + kc]; mp[((size_t)(n / 16) * KC + kc) * 16 + n % 16] = mn[n * KC + kc]; }
    }
    double bestv = 1e9;
    for (int rep = 0; rep < 20; rep++) {
        const double t0 = now();
        for (int i = 0; i < M * K; i++) { xhi[i] = bf16(x[i]); xlo[i] = bf16(x[i] - f32(xhi[i])); }
        for (int n0 = 0; n0 < N; n0 += 32) { dequant_vec(qp, dp, mp, K, n0, whi, wlo); amx_block(xhi, xlo, K, whi, wlo, y, N, n0); }
        const double t = now() - t0; if (t < bestv) bestv = t;
    }
    const double maxrelv = err(y, x, wf, M, N, K);
    printf("vectorized dequant + AMX: %.0f us = %.1f GMAC/s, rel err %.1e\n", bestv * 1e6, (double)M * N * K / bestv * 1e-9, maxrelv);
    double bestf = 1e9; float *yf = aligned_alloc(64, sizeof(float) * M * N);
    float *wt = aligned_alloc(64, sizeof(float) * (size_t)N * K);
    for (int n = 0; n < N; n++) for (int k = 0; k < K; k++) wt[((size_t)(n / 16) * K + k) * 16 + n % 16] = wf[(size_t)n * K + k];
    for (int rep = 0; rep < 20; rep++) {
        const double t0 = now();
        for (int nt = 0; nt < N / 16; nt++)
            for (int m0 = 0; m0 < M; m0 += 8) {
                __m512 acc[8]; for (int i = 0; i < 8; i++) acc[i] = _mm512_setzero_ps();
                for (int k = 0; k < K; k++) {
                    const __m512 w = _mm512_load_ps(wt + ((size_t)nt * K + k) * 16);
                    for (int i = 0; i < 8; i++) acc[i] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[(m0 + i) * K + k]), acc[i]);
                }
                for (int i = 0; i < 8; i++) _mm512_storeu_ps(yf + (m0 + i) * N + nt * 16, acc[i]);
            }
        const double t = now() - t0; if (t < bestf) bestf = t;
    }
    const double macs = (double)M * N * K;
    printf("M=%d K=%d N=%d  AMX hi/lo incl. dequant %.0f us = %.1f GMAC/s (tiles alone %.0f us = %.1f) rel err %.1e | AVX-512 fp32 FMA %.0f us = %.1f GMAC/s rel err %.1e\n",
           M, K, N, best * 1e6, macs / best * 1e-9, bestc * 1e6, macs / bestc * 1e-9, maxrel, bestf * 1e6, macs / bestf * 1e-9, err(yf, x, wf, M, N, K));
    _tile_release();
    return 0;
}
