#include "decode.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/thread_pool.h"
#include "tile_ops.h"
#include "vec_math.h"

namespace fastattn {
namespace cpu {
namespace {

constexpr int64_t kSplitKeys = 512;  // keys per work item
constexpr int64_t kKeyBlock = 16;    // keys whose logits are computed together

// One split's partial result for one query head.
struct Partial {
  float row_max, row_sum;
};

template <typename T>
inline void load_row(float* dst, const T* src, int64_t head_dim, int64_t padded_dim) {
  for (int64_t d = 0; d < head_dim; ++d) dst[d] = to_float(src[d]);
  for (int64_t d = head_dim; d < padded_dim; ++d) dst[d] = 0.f;
}

template <typename T>
void decode_typed(const DecodeParams& p) {
  const int64_t group = p.group();
  const int64_t padded_dim = round_up(p.head_dim, kLanes);
  const int64_t splits = std::max<int64_t>(1, (p.max_len() + kSplitKeys - 1) / kSplitKeys);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  // Partial outputs [B, Hkv, splits, group, padded_dim] and their max/sum.
  std::vector<float> partial_out(p.batch * p.kv_heads * splits * group * padded_dim);
  std::vector<Partial> partial_stats(p.batch * p.kv_heads * splits * group);

  parallel_for(p.batch * p.kv_heads * splits, [&](int64_t item) {
    const int64_t split = item % splits;
    const int64_t kv_h = (item / splits) % p.kv_heads;
    const int64_t b = item / (splits * p.kv_heads);
    const int64_t length = std::clamp<int64_t>(p.lengths[b], 0, p.max_len());
    const int64_t begin = split * kSplitKeys, end = std::min(length, begin + kSplitKeys);
    Partial* stats = partial_stats.data() + item * group;
    float* acc = partial_out.data() + item * group * padded_dim;
    for (int64_t g = 0; g < group; ++g) stats[g] = {kNegInf, 0.f};
    std::fill(acc, acc + group * padded_dim, 0.f);
    if (begin >= end) return;

    Scratch& scratch = thread_scratch();
    float* q_rows = scratch.get(0, group * padded_dim);       // scale * q
    float* k_rows = scratch.get(1, kKeyBlock * padded_dim);
    float* v_rows = scratch.get(2, kKeyBlock * padded_dim);
    float* logits = scratch.get(3, group * kKeyBlock);
    for (int64_t g = 0; g < group; ++g) {
      const T* src = q + (b * p.q_heads + kv_h * group + g) * p.head_dim;
      for (int64_t d = 0; d < padded_dim; ++d) {
        q_rows[g * padded_dim + d] = d < p.head_dim ? p.softmax_scale * to_float(src[d]) : 0.f;
      }
    }
    auto row_pointer = [&](const T* cache, int64_t j) {
      const int64_t page = p.page_table ? p.page_table[b * p.max_pages + j / p.page_size] : b;
      return cache + ((page * p.page_size + j % p.page_size) * p.kv_heads + kv_h) * p.head_dim;
    };
    for (int64_t j0 = begin; j0 < end; j0 += kKeyBlock) {
      const int64_t keys = std::min(kKeyBlock, end - j0);
      for (int64_t j = 0; j < keys; ++j) {
        load_row(k_rows + j * padded_dim, row_pointer(k, j0 + j), p.head_dim, padded_dim);
        load_row(v_rows + j * padded_dim, row_pointer(v, j0 + j), p.head_dim, padded_dim);
      }
      for (int64_t g = 0; g < group; ++g) {
        const float* q_row = q_rows + g * padded_dim;
        float* s = logits + g * kKeyBlock;
        float block_max = kNegInf;
        for (int64_t j = 0; j < keys; ++j) {
          vfloat dot = splat(0.f);
          for (int64_t d = 0; d < padded_dim; d += kLanes) {
            dot += load(q_row + d) * load(k_rows + j * padded_dim + d);
          }
          s[j] = reduce_sum(dot);
          block_max = std::max(block_max, s[j]);
        }
        const float new_max = std::max(stats[g].row_max, block_max);
        const float correction = scalar_exp(stats[g].row_max - new_max);
        float* out_row = acc + g * padded_dim;
        float block_sum = 0.f;
        for (int64_t d = 0; d < padded_dim; d += kLanes) store(out_row + d, load(out_row + d) * correction);
        for (int64_t j = 0; j < keys; ++j) {
          const float weight = std::exp(s[j] - new_max);
          block_sum += weight;
          for (int64_t d = 0; d < padded_dim; d += kLanes) {
            store(out_row + d, load(out_row + d) + weight * load(v_rows + j * padded_dim + d));
          }
        }
        stats[g] = {new_max, stats[g].row_sum * correction + block_sum};
      }
    }
  });

  // Merge the splits of each (batch, q head) by their log-sum-exps.
  T* out = static_cast<T*>(p.out);
  parallel_for(p.batch * p.kv_heads, [&](int64_t pair) {
    for (int64_t g = 0; g < group; ++g) {
      float best = kNegInf;
      for (int64_t s = 0; s < splits; ++s) {
        best = std::max(best, partial_stats[(pair * splits + s) * group + g].row_max);
      }
      std::vector<float> merged(padded_dim, 0.f);
      float total = 0.f;
      if (best != kNegInf) {
        for (int64_t s = 0; s < splits; ++s) {
          const Partial part = partial_stats[(pair * splits + s) * group + g];
          if (part.row_sum == 0.f) continue;
          const float weight = std::exp(part.row_max - best);
          total += part.row_sum * weight;
          const float* src = partial_out.data() + ((pair * splits + s) * group + g) * padded_dim;
          for (int64_t d = 0; d < padded_dim; ++d) merged[d] += weight * src[d];
        }
      }
      const float inv = total > 0.f ? 1.f / total : 0.f;  // length 0: zeros
      const int64_t b = pair / p.kv_heads, h = (pair % p.kv_heads) * group + g;
      T* dst = out + (b * p.q_heads + h) * p.head_dim;
      for (int64_t d = 0; d < p.head_dim; ++d) from_float(merged[d] * inv, &dst[d]);
    }
  });
}

}  // namespace

void decode_attention(const DecodeParams& params) {
  switch (params.dtype) {
    case ElementType::kF32: return decode_typed<float>(params);
    case ElementType::kBF16: return decode_typed<bf16_t>(params);
    case ElementType::kF16: return decode_typed<f16_t>(params);
  }
}

}  // namespace cpu
}  // namespace fastattn
