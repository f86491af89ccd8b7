// A Llama-family model's decoder layers over one step's tokens in one call: per layer the five kernel
// calls of models/llama_native.py's layer forward, with no return to Python in between. At batch 1 the
// Python around 150 calls a step (argument conversion, output tensors, module attribute lookups) cost
// 3-4 ms of a ~13 ms decode step.
//
//   qkv = qkv_proj(rms_norm(x))                 gb_qlinear, RMSNorm prologue
//   a   = attention(rotary(qkv))                gb_paged_attention (stores the new k, v)
//   x   = x + o_proj(a)                         gb_qlinear, residual epilogue, in place
//   x   = x + down(silu_mul(gate_up(rms_norm(x))))   two gb_qlinear calls
//
// x [T, hidden] float32 is updated in place; the step's metadata is gb_paged_attention's, with Quest's block
// budgets per layer and sequence (quest_top [num_layers, S], or NULL: all dense; layers with summaries keep
// them up to date either way) and the attention keys received (observe, or NULL: out [num_layers, num_rows,
// KVH, width]).

#include <stdlib.h>

#include "kernels.h"

// One decoder layer's weights (layers/quantized_linear.QLinear's packed weights) and its slices of the KV pool.
typedef struct {
    const float *input_norm, *post_attention_norm;  // [hidden]
    gb_qweight qkv, o, gate_up, down;
    void *k_cache, *v_cache;
    int64_t sliding_window;  // 0: none
    float *quest_summaries;  // this layer's Quest block summaries [num_blocks, KVH, 2, D], or NULL (kernels.h)
} gb_llama_layer;

void gb_llama_layers(const gb_llama_layer *layers, int64_t num_layers, int64_t hidden, int64_t intermediate,
                     int64_t H, int64_t KVH, int64_t D, int64_t BS, float eps, float scale, int cache_bf16, float *x,
                     int64_t T, const float *cos, const float *sin, const int64_t *slot_mapping,
                     const int32_t *query_start_loc, int64_t S, const int32_t *block_tables, int64_t max_blocks,
                     const int32_t *context_lens, const int32_t *quest_top, const gb_observe *observe) {
    const int64_t qkv_n = (H + 2 * KVH) * D;
    float *qkv = malloc(sizeof(float) * (size_t)(T * qkv_n));
    float *attn = malloc(sizeof(float) * (size_t)(T * H * D));
    float *gate_up = malloc(sizeof(float) * (size_t)(T * 2 * intermediate));
    for (int64_t i = 0; i < num_layers; i++) {
        const gb_llama_layer *l = layers + i;
        // Quest: quest_top [num_layers, S] holds each sequence's block budget in each layer.
        const gb_quest quest = {l->quest_summaries, quest_top ? quest_top + i * S : NULL, NULL, 0};
        // H2O's history: observe->out is [num_layers, num_rows, KVH, width], a layer's slice to each call.
        gb_observe layer_observe = {0};
        if (observe) {
            layer_observe = *observe;
            layer_observe.out += i * observe->num_rows * KVH * observe->width;
        }
        gb_qlinear(x, T, hidden, hidden, PROLOGUE_RMS_NORM, l->input_norm, eps, &l->qkv, qkv_n, qkv, qkv_n, NULL, 0);
        gb_paged_attention(qkv, T, qkv_n, cos, sin, l->k_cache, l->v_cache, cache_bf16, slot_mapping,
                           query_start_loc, S, block_tables, max_blocks, context_lens, H, KVH, D, BS, scale,
                           l->sliding_window, l->quest_summaries ? &quest : NULL, observe ? &layer_observe : NULL,
                           attn);
        gb_qlinear(attn, T, H * D, H * D, PROLOGUE_NONE, NULL, 0.0f, &l->o, hidden, x, hidden, x, hidden);
        gb_qlinear(x, T, hidden, hidden, PROLOGUE_RMS_NORM, l->post_attention_norm, eps, &l->gate_up, 2 * intermediate,
                   gate_up, 2 * intermediate, NULL, 0);
        gb_qlinear(gate_up, T, intermediate, 2 * intermediate, PROLOGUE_SILU_MUL, NULL, 0.0f, &l->down, hidden, x,
                   hidden, x, hidden);
    }
    free(qkv);
    free(attn);
    free(gate_up);
}
