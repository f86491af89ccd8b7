// The native kernels as a program, for running a cross-compiled build (ARM64 under qemu-aarch64) from the
// tests (tests/test_native_arm.py). Reads one call from stdin, writes its outputs to stdout.
//
// Input: an operation name (16 bytes, NUL padded), int64 parameters, then arrays, each an int64 byte count
// and its bytes. Output: the output arrays the same way.
//   qlinear   params M K N format prologue has_bias activations; arrays x [M, K or 2K] f32, data, scales, bias?,
//             norm_weight? (rms_norm), eps [1] f32          -> y [M, N] f32
//   argmax    params M N; arrays x [M, N] f32               -> out [M] i64
//   attention params T ld_qkv cache_bf16 S max_blocks H KVH D BS window; arrays qkv, cos, sin, k_cache,
//             v_cache, slot_mapping, query_start_loc, block_tables, context_lens, scale [1] f32
//                                                           -> out [T, H * D] f32, k_cache, v_cache

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

void gb_argmax(const float *x, int64_t M, int64_t N, int64_t ldx, int64_t *out);
const char *gb_isa(void);

static void *read_array(int64_t *bytes) {
    if (fread(bytes, sizeof(int64_t), 1, stdin) != 1) exit(2);
    void *p = malloc((size_t)(*bytes > 0 ? *bytes : 1));
    if (*bytes && fread(p, 1, (size_t)*bytes, stdin) != (size_t)*bytes) exit(2);
    return p;
}

static void write_array(const void *p, int64_t bytes) {
    fwrite(&bytes, sizeof(int64_t), 1, stdout);
    fwrite(p, 1, (size_t)bytes, stdout);
}

int main(void) {
    char op[16];
    int64_t n, p[10];
    if (fread(op, 1, 16, stdin) != 16) return 2;
    if (!strcmp(op, "isa")) {
        write_array(gb_isa(), (int64_t)strlen(gb_isa()));
    } else if (!strcmp(op, "qlinear")) {
        if (fread(p, sizeof(int64_t), 7, stdin) != 7) return 2;
        const int64_t M = p[0], K = p[1], N = p[2], prologue = p[4];
        float *x = read_array(&n);
        gb_qweight w = {read_array(&n), read_array(&n), NULL, p[3], p[6]};
        if (p[5]) w.bias = read_array(&n);
        float *norm = prologue == PROLOGUE_RMS_NORM ? read_array(&n) : NULL;
        float *eps = read_array(&n);
        float *y = malloc(sizeof(float) * (size_t)(M * N));
        gb_qlinear(x, M, K, prologue == PROLOGUE_SILU_MUL ? 2 * K : K, (int)prologue, norm, *eps, &w, N, y, N, NULL, 0);
        write_array(y, (int64_t)sizeof(float) * M * N);
    } else if (!strcmp(op, "argmax")) {
        if (fread(p, sizeof(int64_t), 2, stdin) != 2) return 2;
        float *x = read_array(&n);
        int64_t *out = malloc(sizeof(int64_t) * (size_t)p[0]);
        gb_argmax(x, p[0], p[1], p[1], out);
        write_array(out, (int64_t)sizeof(int64_t) * p[0]);
    } else if (!strcmp(op, "attention")) {
        if (fread(p, sizeof(int64_t), 10, stdin) != 10) return 2;
        int64_t k_bytes, v_bytes;
        float *qkv = read_array(&n), *cos = read_array(&n), *sin = read_array(&n);
        void *k = read_array(&k_bytes), *v = read_array(&v_bytes);
        int64_t *slots = read_array(&n);
        int32_t *starts = read_array(&n), *tables = read_array(&n), *contexts = read_array(&n);
        float *scale = read_array(&n);
        const int64_t T = p[0], H = p[5], D = p[7];
        float *out = malloc(sizeof(float) * (size_t)(T * H * D));
        gb_paged_attention(qkv, T, p[1], cos, sin, k, v, (int)p[2], slots, starts, p[3], tables, p[4], contexts, H,
                           p[6], D, p[8], *scale, p[9], NULL, NULL, out);
        write_array(out, (int64_t)sizeof(float) * T * H * D);
        write_array(k, k_bytes);
        write_array(v, v_bytes);
    } else {
        return 2;
    }
    return 0;
}
