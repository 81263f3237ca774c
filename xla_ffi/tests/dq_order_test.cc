// Reads lines "q_last band_hi kv_len kv_block block_keys" from stdin and
// prints band_dq_rank of each, one per line. tests/test_dq_order.py feeds
// it every (q tile, key block) pair the mask plan says adds to the tile
// and compares with the ranks the plan implies.
#include <cstdio>

#include "cuda/dq_order.h"

int main() {
  long long q_last, band_hi, kv_len, kv_block, block_keys;
  while (std::scanf("%lld %lld %lld %lld %lld", &q_last, &band_hi, &kv_len, &kv_block,
                    &block_keys) == 5) {
    std::printf("%d\n", fastattn::cuda::band_dq_rank(q_last, band_hi, kv_len, kv_block, block_keys));
  }
  return 0;
}
