// The native CPU kernels' entry points, for the kernels that call each other (llama_layers.c).
#pragma once
#include <stdint.h>

// What gb_int8_linear does to its input rows before quantizing them.
enum { PROLOGUE_NONE = 0, PROLOGUE_RMS_NORM = 1, PROLOGUE_SILU_MUL = 2 };

void gb_int8_linear(const float *x, int64_t M, int64_t K, int64_t ldx, int prologue, const float *norm_weight,
                    float eps, const uint8_t *packed, const float *w_scale, const float *bias, int64_t N, float *y,
                    int64_t ldy, const float *residual, int64_t ldr);

void gb_paged_attention(const float *qkv, int64_t T, int64_t ld_qkv, const float *cos, const float *sin,
                        void *k_cache, void *v_cache, int cache_bf16, const int64_t *slot_mapping,
                        const int32_t *query_start_loc, int64_t S, const int32_t *block_tables, int64_t max_blocks,
                        const int32_t *context_lens, int64_t H, int64_t KVH, int64_t D, int64_t BS, float scale,
                        int64_t window, float *out);
