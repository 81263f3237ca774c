// The order in which the ordered one-pass backward
// (attention_backward_sm90.cu, BackwardDq::kFusedOrdered) adds the key
// blocks' dQ contributions to a q tile: descending key block. A block's
// rank on a tile, the number of blocks that add to the tile before it, is
// the turn it waits for; every block that visits the tile must agree on
// it, or the chain of turns stalls. Plain C++ usable on the device and the
// host, so that xla_ffi/tests/dq_order_test.cc can check it against the
// mask plan (tests/test_dq_order.py).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define FASTATTN_DQ_ORDER_FN __host__ __device__ __forceinline__
#else
#define FASTATTN_DQ_ORDER_FN inline
#endif

namespace fastattn {
namespace cuda {

// The rank of key block `kv_block` (keys kv_block * block_keys ...) on the
// q tile whose last row is `q_last`, under the band mask alone (query i
// sees keys j with band_lo <= j - i <= band_hi, j < kv_len). The keys a
// range of rows sees form one run (the rows' bands overlap or touch), and
// the block holds some of them (it visits the tile), so the blocks adding
// before it are those above it up to the block of the run's last key,
// min(q_last + band_hi, kv_len - 1). band_hi may be "unbounded" (2^62):
// it is clipped to kv_len before the sum. The blocks that visit a tile come
// from the mask plan, so the plan must be the band's own (as
// jax_fastattn.masks builds it): a looser class would let a block the band
// cannot reach visit with a negative rank and wait forever.
FASTATTN_DQ_ORDER_FN int band_dq_rank(int64_t q_last, int64_t band_hi, int64_t kv_len,
                                      int64_t kv_block, int64_t block_keys) {
  const int64_t reach = band_hi < kv_len ? band_hi : kv_len;
  const int64_t last_key = q_last + reach < kv_len - 1 ? q_last + reach : kv_len - 1;
  return int(last_key / block_keys - kv_block);
}

}  // namespace cuda
}  // namespace fastattn

#undef FASTATTN_DQ_ORDER_FN
