// The native CPU kernels' shared types and the entry points that call each other (llama_layers.c).
#pragma once
#include <stdint.h>

// What gb_qlinear does to its input rows before quantizing them.
enum { PROLOGUE_NONE = 0, PROLOGUE_RMS_NORM = 1, PROLOGUE_SILU_MUL = 2 };

// Weight formats, GGUF's block formats over 32 inputs of one output row (w ≈ d·q + m):
//   Q8_0: q int8 in [-127, 127], scale d (m = 0);   Q4_1: q in [0, 15], scale d and minimum m.
enum { FORMAT_Q8_0 = 0, FORMAT_Q4_1 = 1 };
#define QBLOCK 32
// What the weights multiply: the float32 activations (the model's own numerics), or the activations
// quantized per block of 32 to int8 (llama.cpp's arithmetic: integer dot products, faster at large batches),
// or to int16 as two int8 halves (x = 256·hi + lo: the int8 products twice, float32's greedy text), or to
// int12 as two (x = 16·hi + lo: on AMX one tile product against Q4_1's q and 16·q side by side).
enum { ACTIVATIONS_FLOAT32 = 0, ACTIVATIONS_INT8 = 1, ACTIVATIONS_INT16 = 2, ACTIVATIONS_INT12 = 3 };

// A quantized weight [N, K] packed for the kernels (layers/quantized_linear.py packs it), in groups of
// gb_rows() output rows (ROWS), per group and block of 32 inputs:
//   Q8_0 data [N/ROWS, K/32, 8, ROWS, 4] int8: step j holds inputs 4j..4j+3 of each row
//   Q4_1 data [N/ROWS, K/32, 4, ROWS, 4] uint8: chunk j holds inputs 8j+t (low nibble) and 8j+4+t (high)
//   scales [N/ROWS, K/32, ROWS] float16 (d), or [N/ROWS, K/32, 2, ROWS] (d, then m) for Q4_1
// N is padded to a multiple of ROWS (padding rows are 0).
typedef struct {
    const void *data;
    const uint16_t *scales;
    const float *bias;  // [N] or NULL
    int64_t format;
    int64_t activations;
} gb_qweight;

void gb_qlinear(const float *x, int64_t M, int64_t K, int64_t ldx, int prologue, const float *norm_weight,
                float eps, const gb_qweight *w, int64_t N, float *y, int64_t ldy, const float *residual,
                int64_t ldr);

// Quest (Tang et al., 2024): block-sparse decode that reads only the blocks whose keys can score high.
// Per cache block and kv head the elementwise min and max of its keys bound q·k for any key in it:
// Σ_d max(q_d·min_d, q_d·max_d). A decode token (its sequence's only new token) attends to its last block
// and the top_blocks[s] - 1 other blocks of highest bound (the max over the kv head's query heads: one
// choice per kv head, so that the head group reads each block once), in block order; prefill tokens,
// windowed layers, budgets of 0 and sequences of <= top_blocks[s] blocks attend to everything. The call
// keeps the summaries of the blocks its new tokens fill up to date.
typedef struct {
    float *summaries;           // [num_blocks, KVH, 2, D] float32: min then max of each block's stored keys
    const int32_t *top_blocks;  // [S]: blocks each sequence's decode token reads (0 or NULL: all)
    int32_t *selected;          // [T, KVH, selected_width] or NULL: the blocks (of the sequence's table) each
                                // token's kv head read, in order (-1: all its blocks: no choice made)
    int64_t selected_width;
} gb_quest;

// The attention each key received (H2O's history): a token t with rows[t] >= 0 adds, for each kv head,
// the softmax probabilities of its query heads over its keys, summed over the heads, to
// out [num_rows, KVH, width] at row rows[t] (key i of its context at column i). Tokens that read Quest's
// chosen blocks add nothing.
typedef struct {
    const int32_t *rows;  // [T]: each token's row in out, or -1
    int64_t num_rows, width;
    float *out;
} gb_observe;

void gb_paged_attention(const float *qkv, int64_t T, int64_t ld_qkv, const float *cos, const float *sin,
                        void *k_cache, void *v_cache, int cache_bf16, const int64_t *slot_mapping,
                        const int32_t *query_start_loc, int64_t S, const int32_t *block_tables, int64_t max_blocks,
                        const int32_t *context_lens, int64_t H, int64_t KVH, int64_t D, int64_t BS, float scale,
                        int64_t window, const gb_quest *quest, const gb_observe *observe, float *out);
