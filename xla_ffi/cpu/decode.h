// Split-KV (flash-decoding) attention of one query token per sequence on the
// CPU. Bandwidth-bound: every K/V byte of the valid prefix is read once.
#pragma once

#include "isa_namespace.h"

#include "../common/decode_params.h"

namespace fastattn {
namespace cpu {
inline namespace FASTATTN_ISA_NS {

// Work items are (batch, split of the keys); for each block of keys and
// each kv head an item computes all Hq/Hkv query heads of the GQA group at
// once (every K/V byte read once), keeping a running max, sum and output per
// query head. A second
// step merges the splits of each (batch, kv head) through their
// log-sum-exps. Rows at or past lengths[b] are never read.
void decode_attention(const DecodeParams& params);

}  // namespace FASTATTN_ISA_NS
}  // namespace cpu
}  // namespace fastattn
