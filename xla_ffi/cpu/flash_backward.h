// FlashAttention-2 backward pass on the CPU: dQ, dK, dV and dBias.
#pragma once

#include "isa_namespace.h"

#include "../common/attention_params.h"

namespace fastattn {
namespace cpu {
inline namespace FASTATTN_ISA_NS {

// Deterministic (bit for bit, whatever the thread count) and free of
// atomics. One pass over the (q tile, kv tile)
// pairs: a work item (kv chunk, batch, kv head) loops over its kv tiles, the
// q heads of its GQA group and their non-empty q tiles, recomputes
// P = exp(S - lse) from the forward's lse and dS once per pair, and uses
// them for dV, dK (complete per kv tile) and a dQ partial of its own; the
// partials of several kv chunks (used when the shape has few (batch, kv
// head) items; the count depends on the shape only) are summed in chunk
// order at the end.
// With the cotangent of lse, dS = P * (dP - (rowsum(dO * O) - dlse)).
void flash_backward(const BackwardParams& params);

}  // namespace FASTATTN_ISA_NS
}  // namespace cpu
}  // namespace fastattn
