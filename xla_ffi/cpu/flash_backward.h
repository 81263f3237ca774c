// FlashAttention-2 backward pass on the CPU: dQ, dK, dV and dBias.
#pragma once

#include "isa_namespace.h"

#include "../common/attention_params.h"

namespace fastattn {
namespace cpu {
inline namespace FASTATTN_ISA_NS {

// Deterministic and free of atomics: two passes that each own their output.
//   1. work item (batch, kv head, kv tile): loops over the q heads of its
//      GQA group and their non-empty q tiles, accumulating dK and dV.
//   2. work item (batch, q head, q tile): loops over non-empty kv tiles,
//      accumulating dQ and writing the dBias tile.
// Both recompute P = exp(S - lse) from the forward's lse. With the cotangent
// of lse, dS = P * (dP - (rowsum(dO * O) - dlse)).
void flash_backward(const BackwardParams& params);

}  // namespace FASTATTN_ISA_NS
}  // namespace cpu
}  // namespace fastattn
