// Plain description of one decode-attention call (one new query token per
// sequence against a KV cache), shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "dtypes.h"

namespace fastattn {

// q [B, Hq, D]; the cache is either contiguous, k/v [B, Smax, Hkv, D]
// (page_table == nullptr: sequence b is "page" b of Smax rows), or paged,
// k/v [num_pages, page_size, Hkv, D] with page_table [B, max_pages] giving
// the page of each block of page_size positions. Only positions
// j < lengths[b] are read; rows past the length are never touched.
struct DecodeParams {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t page_size = 0;      // rows per page (Smax when contiguous)
  int64_t max_pages = 1;      // page_table row length (1 when contiguous)
  int64_t num_pages = 0;      // pages in k/v
  ElementType dtype = ElementType::kF32;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const int32_t* lengths = nullptr;     // [B]
  const int32_t* page_table = nullptr;  // [B, max_pages] or null
  float softmax_scale = 1.0f;
  void* out = nullptr;                  // [B, Hq, D] in dtype
  // [B, Hq] float32: log of the softmax denominator, log(sum_j exp(scale *
  // q.k_j)) over the row's valid keys; -inf for a row of length 0. Lets a
  // caller merge this result with attention over other keys.
  float* lse = nullptr;

  int64_t group() const { return q_heads / kv_heads; }
  int64_t max_len() const { return page_size * max_pages; }
};

}  // namespace fastattn
