#include "decode.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "../common/thread_pool.h"
#include "amx_decode.h"
#include "bf16_dot.h"
#include "tile_ops.h"
#include "vec_math.h"

namespace fastattn {
namespace cpu {
inline namespace FASTATTN_ISA_NS {
namespace {

constexpr int64_t kMinSplitKeys = 512, kMaxSplitKeys = 2048;  // keys per work item
constexpr int64_t kKeyBlock = 16;    // keys whose logits are computed together
constexpr int64_t kMaxChunks = 256 / kLanes;  // vectors in a row of the largest head dim
#ifndef FASTATTN_PREFETCH_KEYS
#define FASTATTN_PREFETCH_KEYS 8
#endif
constexpr int64_t kPrefetchKeys = FASTATTN_PREFETCH_KEYS;  // how far ahead rows are prefetched

// Keys per work item (batch row x split): long splits, so fewer partials to
// merge and fewer cold starts of the running max (2048 instead of 512 keys
// took B=8 S=4K from 22.8 to 24.2 GB/s on the 2-vCPU machine), while batch x
// splits still gives every thread about four items.
inline int64_t split_keys(int64_t batch, int64_t max_len) {
  const int64_t wanted_splits = std::max<int64_t>(1, (4 * parallel_threads() + batch - 1) / batch);
  const int64_t keys = round_up((max_len + wanted_splits - 1) / wanted_splits, 32);
  return std::clamp(keys, kMinSplitKeys, kMaxSplitKeys);
}

// One split's partial result for one query head.
struct Partial {
  float row_max, row_sum;
};

template <typename T>
inline void load_row(float* dst, const T* src, int64_t head_dim, int64_t padded_dim) {
  int64_t d = 0;
  for (; d + kLanes <= head_dim; d += kLanes) store(dst + d, load_as_float(src + d));
  for (; d < head_dim; ++d) dst[d] = to_float(src[d]);
  for (; d < padded_dim; ++d) dst[d] = 0.f;
}

#ifdef FASTATTN_HAVE_BF16_DOT
// The bf16 passes are compiled for each head dim (kChunks x 32 values) and
// for query heads taken kHeads at a time (1, 2 or 4 of a GQA group), so a
// key row, the dot accumulators and the output chunks all stay in
// registers: with run-time counts the compiler copied each K row to the
// stack and tested the chunk count before every vdpbf16ps (2x slower in
// the LLC-resident case).

// Pass 1: per-lane partial dots of q_h . k_j (unscaled; q is the bf16 input,
// used as is) for the keys of one block.
template <int kChunks, int kHeads>
void bf16_logits(const bf16_t* q, const bf16_t* const* k_rows, int64_t keys, int64_t kv_heads,
                 int64_t group, vfloat* dots) {
  constexpr int64_t kDim = kChunks * kBf16Chunk;
  for (int64_t j = 0; j < keys; ++j) {
    const int slot = transpose_sum_slot(int(j));
    for (int64_t kv_h = 0; kv_h < kv_heads; ++kv_h) {
      const bf16_t* src = k_rows[j] + kv_h * kDim;
      __m512bh row[kChunks];
#pragma GCC unroll 8
      for (int c = 0; c < kChunks; ++c) row[c] = load_bf16x32(src + c * kBf16Chunk);
      for (int64_t h0 = kv_h * group; h0 < (kv_h + 1) * group; h0 += kHeads) {
        vfloat dot[kHeads];  // one dependency chain per head
#pragma GCC unroll 4
        for (int i = 0; i < kHeads; ++i) dot[i] = splat(0.f);
#pragma GCC unroll 8
        for (int c = 0; c < kChunks; ++c) {
#pragma GCC unroll 4
          for (int i = 0; i < kHeads; ++i) {
            dot[i] = dot_pairs(dot[i], load_bf16x32(q + (h0 + i) * kDim + c * kBf16Chunk), row[c]);
          }
        }
#pragma GCC unroll 4
        for (int i = 0; i < kHeads; ++i) dots[(h0 + i) * 16 + slot] = dot[i];
      }
    }
  }
}

// Pass 2: acc[h] (pair order, see bf16_dot.h) += sum_j w[h][j] v_j, two keys
// per vdpbf16ps; kHeads heads of a group share each interleaved pair of V
// rows. Weights past `keys` are 0 (their row pointer repeats the last valid
// row, never past the length).
template <int kChunks, int kHeads>
void bf16_weighted_values(const bf16_t* const* v_rows, int64_t keys, int64_t kv_heads,
                          int64_t group, const float* weights, float* acc) {
  constexpr int64_t kDim = kChunks * kBf16Chunk;
  const int64_t key_pairs = (keys + 1) / 2;
  for (int64_t kv_h = 0; kv_h < kv_heads; ++kv_h) {
    for (int64_t h0 = kv_h * group; h0 < (kv_h + 1) * group; h0 += kHeads) {
      uint32_t pairs[kHeads][8];
#pragma GCC unroll 4
      for (int i = 0; i < kHeads; ++i) pack_weight_pairs(weights + (h0 + i) * 16, pairs[i]);
#pragma GCC unroll 8
      for (int c = 0; c < kChunks; ++c) {
        vfloat low[kHeads], high[kHeads];
#pragma GCC unroll 4
        for (int i = 0; i < kHeads; ++i) {
          low[i] = load(acc + (h0 + i) * kDim + c * kBf16Chunk);
          high[i] = load(acc + (h0 + i) * kDim + c * kBf16Chunk + 16);
        }
        for (int64_t pair = 0; pair < key_pairs; ++pair) {
          const int64_t j = 2 * pair, j1 = std::min(j + 1, keys - 1);
          __m512bh even, odd;
          interleave_rows(load_bf16x32(v_rows[j] + kv_h * kDim + c * kBf16Chunk),
                          load_bf16x32(v_rows[j1] + kv_h * kDim + c * kBf16Chunk), &even, &odd);
#pragma GCC unroll 4
          for (int i = 0; i < kHeads; ++i) {
            low[i] = weighted_pairs(low[i], even, pairs[i][pair]);
            high[i] = weighted_pairs(high[i], odd, pairs[i][pair]);
          }
        }
#pragma GCC unroll 4
        for (int i = 0; i < kHeads; ++i) {
          store(acc + (h0 + i) * kDim + c * kBf16Chunk, low[i]);
          store(acc + (h0 + i) * kDim + c * kBf16Chunk + 16, high[i]);
        }
      }
    }
  }
}

// The two passes of one head dim / heads-at-a-time pair, as function
// pointers picked once per call.
struct Bf16Passes {
  void (*logits)(const bf16_t*, const bf16_t* const*, int64_t, int64_t, int64_t, vfloat*);
  void (*weighted_values)(const bf16_t* const*, int64_t, int64_t, int64_t, const float*, float*);
};

template <int kChunks>
Bf16Passes bf16_passes_for_heads(int64_t group) {
  if (group % 4 == 0) return {bf16_logits<kChunks, 4>, bf16_weighted_values<kChunks, 4>};
  if (group % 2 == 0) return {bf16_logits<kChunks, 2>, bf16_weighted_values<kChunks, 2>};
  return {bf16_logits<kChunks, 1>, bf16_weighted_values<kChunks, 1>};
}

// head_dim a multiple of 32, at most 256.
inline Bf16Passes bf16_passes(int64_t head_dim, int64_t group) {
  switch (head_dim / kBf16Chunk) {
    case 1: return bf16_passes_for_heads<1>(group);
    case 2: return bf16_passes_for_heads<2>(group);
    case 3: return bf16_passes_for_heads<3>(group);
    case 4: return bf16_passes_for_heads<4>(group);
    case 5: return bf16_passes_for_heads<5>(group);
    case 6: return bf16_passes_for_heads<6>(group);
    case 7: return bf16_passes_for_heads<7>(group);
    default: return bf16_passes_for_heads<8>(group);
  }
}
#endif

template <typename T>
void decode_typed(const DecodeParams& p) {
  const int64_t group = p.group();
  const int64_t padded_dim = round_up(p.head_dim, kLanes);
  const bool direct = padded_dim == p.head_dim;
  const int64_t chunks = padded_dim / kLanes;
  const int64_t split_length = split_keys(p.batch, p.max_len());
  const int64_t splits = std::max<int64_t>(1, (p.max_len() + split_length - 1) / split_length);
#ifdef FASTATTN_HAVE_BF16_DOT
  constexpr bool kBf16Cache = std::is_same_v<T, bf16_t>;
#else
  constexpr bool kBf16Cache = false;
#endif
  // bf16 caches with D a multiple of 32 take the vdpbf16ps passes; their
  // logits are scaled after the dot and their accumulators are in pair order.
  const bool bf16_dot = kBf16Cache && p.head_dim % 32 == 0;
#ifdef FASTATTN_HAVE_BF16_DOT
  const Bf16Passes passes = bf16_dot ? bf16_passes(p.head_dim, group) : Bf16Passes{};
#endif
#ifdef FASTATTN_HAVE_AMX
  // Steps of 32 keys on AMX where each half's 16 rows are equally spaced
  // (one page holds them); the rest of a split takes the 16-key blocks.
  const bool amx = bf16_dot && group <= 16 &&
                   (p.page_table == nullptr || p.page_size % 16 == 0) && amx_available();
#endif
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  // Partial outputs [B, Hkv, splits, group, padded_dim] and their max/sum.
  std::vector<float> partial_out(p.batch * p.kv_heads * splits * group * padded_dim);
  std::vector<Partial> partial_stats(p.batch * p.kv_heads * splits * group);

  // Work item (batch, split) walks its keys in blocks of 16. Both passes
  // over a block (logits from K, then the weighted sum of V) go through the
  // cache in memory order, key by key and, within a key, kv head by kv head
  // ([j][kv head][d] is one contiguous stretch), so the hardware prefetchers
  // see two plain streams. (Walking one kv head's rows, 2 KiB apart, left
  // the kernel waiting on memory at a third of the copy bandwidth.)
  parallel_for(p.batch * splits, [&](int64_t item) {
    const int64_t split = item % splits;
    const int64_t b = item / splits;
    const int64_t length = std::clamp<int64_t>(p.lengths[b], 0, p.max_len());
    const int64_t begin = split * split_length, end = std::min(length, begin + split_length);

    Scratch& scratch = thread_scratch();
    float* q_rows = scratch.get(0, p.q_heads * padded_dim);  // scale * q, all heads
    float* acc = scratch.get(1, p.q_heads * padded_dim);     // running output per head
    float* logits = scratch.get(2, p.q_heads * kKeyBlock);   // weights per head, one block
    // Per-lane partial dots, [q_heads][16 keys] vectors (aligned for vfloat).
    float* dots_storage = scratch.get(7, p.q_heads * kKeyBlock * kLanes + kLanes);
    vfloat* dots = reinterpret_cast<vfloat*>(
        (reinterpret_cast<uintptr_t>(dots_storage) + 63) & ~uintptr_t(63));
    float* row_max = scratch.get(3, p.q_heads);
    float* row_sum = scratch.get(4, p.q_heads);
    float* k_row = scratch.get(5, padded_dim);               // converted row when D is ragged
    float* v_block = scratch.get(6, kKeyBlock * padded_dim);  // one kv head's V rows of a block
#ifdef FASTATTN_HAVE_AMX
    std::optional<AmxDecode> tiles;
    uint32_t* q_pairs = reinterpret_cast<uint32_t*>(scratch.get(8, p.q_heads * padded_dim / 2));
    float* amx_scratch = scratch.get(9, p.q_heads * AmxDecode::kKeys);
    if (amx) {
      tiles.emplace(p.kv_heads, group, p.head_dim);
      tiles->pack_queries(reinterpret_cast<const bf16_t*>(q) + b * p.q_heads * p.head_dim, q_pairs);
    }
#endif
    std::fill(acc, acc + p.q_heads * padded_dim, 0.f);
    std::fill(row_max, row_max + p.q_heads, kNegInf);
    std::fill(row_sum, row_sum + p.q_heads, 0.f);
    for (int64_t h = 0; h < p.q_heads && !bf16_dot; ++h) {  // the bf16 path reads q as is
      const T* src = q + (b * p.q_heads + h) * p.head_dim;
      for (int64_t d = 0; d < padded_dim; ++d) {
        q_rows[h * padded_dim + d] = d < p.head_dim ? p.softmax_scale * to_float(src[d]) : 0.f;
      }
    }
    auto row_pointer = [&](const T* cache, int64_t j, int64_t kv_h) {
      const int64_t page = p.page_table ? p.page_table[b * p.max_pages + j / p.page_size] : b;
      return cache + ((page * p.page_size + j % p.page_size) * p.kv_heads + kv_h) * p.head_dim;
    };
    // A row as float chunks: read in place when D fills whole vectors.
    auto chunk = [&](const T* src, float* converted, int64_t d) {
      return direct ? load_as_float(src + d) : load(converted + d);
    };

    // Software prefetch of the K/V rows kPrefetchKeys positions ahead (every
    // kv head): the demand loads alone left the loop stalled on memory.
    const int64_t key_bytes = p.kv_heads * p.head_dim * int64_t(sizeof(T));
    auto prefetch_key = [&](const T* cache, int64_t j) {
      if (j >= end) return;
      const char* row = reinterpret_cast<const char*>(row_pointer(cache, j, 0));
      for (int64_t offset = 0; offset < key_bytes; offset += 64) __builtin_prefetch(row + offset);
    };
    const T* block_rows[kKeyBlock];  // key j's row of kv head 0 (kv heads follow it)
    int64_t j0 = begin;
#ifdef FASTATTN_HAVE_AMX
    if constexpr (kBf16Cache) {
      for (; amx && j0 + AmxDecode::kKeys <= end; j0 += AmxDecode::kKeys) {
        for (int64_t j = 0; j < AmxDecode::kKeys; ++j) {
          prefetch_key(k, j0 + j + AmxDecode::kKeys);
          prefetch_key(v, j0 + j + AmxDecode::kKeys);
        }
        const T* k_half[2] = {row_pointer(k, j0, 0), row_pointer(k, j0 + 16, 0)};
        const T* v_half[2] = {row_pointer(v, j0, 0), row_pointer(v, j0 + 16, 0)};
        const int64_t row_stride = (row_pointer(k, j0 + 1, 0) - k_half[0]) * int64_t(sizeof(T));
        tiles->step(k_half, v_half, row_stride, q_pairs, p.softmax_scale, amx_scratch,
                    {row_max, row_sum, acc});
      }
    }
#endif
    for (; j0 < end; j0 += kKeyBlock) {
      const int64_t keys = std::min(kKeyBlock, end - j0);
      // Pass 1: per-lane partial dots of scale * q_h . k_j, one vector per
      // (head, key), summed across lanes for all 16 keys at once afterwards.
#ifdef FASTATTN_HAVE_BF16_DOT
      if constexpr (kBf16Cache) {
        if (bf16_dot) {
          for (int64_t j = 0; j < keys; ++j) {
            prefetch_key(k, j0 + j + kPrefetchKeys);
            block_rows[j] = row_pointer(k, j0 + j, 0);
          }
          passes.logits(q + b * p.q_heads * p.head_dim, block_rows, keys, p.kv_heads, group,
                        dots);
        }
      }
#endif
      for (int64_t j = 0; j < keys && !bf16_dot; ++j) {
        prefetch_key(k, j0 + j + kPrefetchKeys);
        const int slot = transpose_sum_slot(int(j));
        for (int64_t kv_h = 0; kv_h < p.kv_heads; ++kv_h) {
          const T* src = row_pointer(k, j0 + j, kv_h);
          if (!direct) load_row(k_row, src, p.head_dim, padded_dim);
          vfloat row[kMaxChunks];  // the key row, converted once for all g
          for (int64_t c = 0; c < chunks; ++c) row[c] = chunk(src, k_row, c * kLanes);
          for (int64_t g = 0; g < group; ++g) {
            const int64_t h = kv_h * group + g;
            const float* q_row = q_rows + h * padded_dim;
            vfloat dot = splat(0.f);
            for (int64_t c = 0; c < chunks; ++c) dot += load(q_row + c * kLanes) * row[c];
            dots[h * kKeyBlock + slot] = dot;
          }
        }
      }
      // Online softmax per head over the block: logits become weights.
      static_assert(kKeyBlock == kLanes, "one vector of logits per key block");
      vfloat beyond = splat(0.f);  // -inf for key slots past the valid ones
      const float logit_scale = bf16_dot ? p.softmax_scale : 1.f;  // else folded into q_rows
      for (int64_t j = keys; j < kKeyBlock; ++j) beyond[j] = kNegInf;
      for (int64_t h = 0; h < p.q_heads; ++h) {
        vfloat* head_dots = dots + h * kKeyBlock;
        for (int64_t j = keys; j < kKeyBlock; ++j) head_dots[transpose_sum_slot(int(j))] = splat(0.f);
        const vfloat block_logits = transpose_sum16(head_dots) * logit_scale + beyond;
        const float new_max = std::max(row_max[h], reduce_max(block_logits));
        const float correction = scalar_exp(row_max[h] - new_max);
        const vfloat weights = vexp(block_logits - new_max);
        store(logits + h * kKeyBlock, weights);
        row_sum[h] = row_sum[h] * correction + reduce_sum(weights);
        row_max[h] = new_max;
        float* out_row = acc + h * padded_dim;
        if (correction != 1.f) {
          for (int64_t d = 0; d < padded_dim; d += kLanes) store(out_row + d, load(out_row + d) * correction);
        }
      }
      // Pass 2: acc[h] += weight[h][j] * v_j. Per kv head, the block's V rows
      // are converted once into L1 and each output chunk of each head stays
      // in a register across the 16 keys.
      for (int64_t j = 0; j < keys; ++j) prefetch_key(v, j0 + j + kPrefetchKeys);
#ifdef FASTATTN_HAVE_BF16_DOT
      if constexpr (kBf16Cache) {
        if (bf16_dot) {
          for (int64_t j = 0; j < keys; ++j) block_rows[j] = row_pointer(v, j0 + j, 0);
          passes.weighted_values(block_rows, keys, p.kv_heads, group, logits, acc);
        }
      }
#endif
      for (int64_t kv_h = 0; kv_h < p.kv_heads && !bf16_dot; ++kv_h) {
        for (int64_t j = 0; j < keys; ++j) {
          load_row(v_block + j * padded_dim, row_pointer(v, j0 + j, kv_h), p.head_dim, padded_dim);
        }
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = kv_h * group + g;
          const float* weights = logits + h * kKeyBlock;
          float* out = acc + h * padded_dim;
          for (int64_t d = 0; d < padded_dim; d += kLanes) {
            vfloat out_chunk = load(out + d);
            for (int64_t j = 0; j < keys; ++j) out_chunk += weights[j] * load(v_block + j * padded_dim + d);
            store(out + d, out_chunk);
          }
        }
      }
    }
    // Hand the partials of this split to the merge step.
    for (int64_t h = 0; h < p.q_heads; ++h) {
      const int64_t kv_h = h / group, g = h % group;
      const int64_t slot = ((b * p.kv_heads + kv_h) * splits + split) * group + g;
      partial_stats[slot] = {row_max[h], row_sum[h]};
      float* to = partial_out.data() + slot * padded_dim;
      const float* from = acc + h * padded_dim;
#ifdef FASTATTN_HAVE_BF16_DOT
      if (bf16_dot) {
        for (int64_t i = 0; i < padded_dim; ++i) to[pair_order_dim(i)] = from[i];
        continue;
      }
#endif
      std::copy(from, from + padded_dim, to);
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
      p.lse[b * p.q_heads + h] = total > 0.f ? best + std::log(total) : kNegInf;
    }
  });
}

}  // namespace

void decode_attention(const DecodeParams& params) {
  dispatch_element_type(params.dtype, [&](auto tag) { decode_typed<decltype(tag)>(params); });
}

}  // namespace FASTATTN_ISA_NS
}  // namespace cpu
}  // namespace fastattn
