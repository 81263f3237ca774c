// FlashAttention-2 forward pass on the CPU: output and log-sum-exp.
#pragma once

#include "isa_namespace.h"

#include "../common/attention_params.h"

namespace fastattn {
namespace cpu {
inline namespace FASTATTN_ISA_NS {

// Two-level tiling. Outer level: one work item is (batch, q head, q tile of
// mask.tile_q rows); work items are spread over the thread pool, heaviest
// (last, under a causal mask) first. For each work item the loop runs over
// key tiles of mask.tile_kv keys, skipping tiles the mask plan marks empty;
// the q tile, the packed K^T and V tiles and the logits tile stay in L2.
// Inner level: gemm.h's register blocks over 32-column panels of the packed
// K^T and V tiles (gemm_panels), vectorised over keys (for q k^T)
// and over the head dim (for P V). Requires tile_kv % 32 == 0.
void flash_forward(const ForwardParams& params);

// The bf16 forward on the matrix units (flash_forward_bf16.cc): AMX tiles
// where this level has AMX and Linux granted the tile state, else
// AVX512-BF16 dot products. False (nothing done) for other dtypes and at
// levels without AVX512-BF16.
bool flash_forward_bf16(const ForwardParams& params);

}  // namespace FASTATTN_ISA_NS
}  // namespace cpu
}  // namespace fastattn
