// Per-tile steps shared by the CPU forward and backward kernels: packing
// tiles of q/k/v (any storage dtype) into float32 scratch, adding bias and
// applying the element-wise mask inside partial tiles.
#pragma once

#include "isa_namespace.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/attention_params.h"
#include "../common/dtypes.h"
#include "../common/thread_pool.h"

namespace fastattn {
namespace cpu {
inline namespace FASTATTN_ISA_NS {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t multiple) {
  return (x + multiple - 1) / multiple * multiple;
}

// Rows of q, k and v are Hq·D or Hkv·D elements apart (4 KiB and more at
// 8 heads of D = 128 in float32), each row in a page of its own, where the
// hardware prefetchers, which stay within a 4 KiB page, do not follow. The
// packing loops ask for the row kRowsAhead ahead of the one they convert
// (all its cache lines), so that a row's memory latency is not paid in
// turn with each row.
constexpr int64_t kRowsAhead = 8;

template <typename T>
inline void prefetch_row(const T* row, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < count * int64_t(sizeof(T)); offset += 64) __builtin_prefetch(bytes + offset, 0, 3);
}

// The first kRowsAhead rows, before a loop that asks for row r + kRowsAhead
// at row r.
template <typename T>
inline void prefetch_first_rows(const T* src, int64_t src_row_stride, int64_t rows, int64_t count) {
  for (int64_t r = 0; r < std::min(rows, kRowsAhead); ++r) prefetch_row(src + r * src_row_stride, count);
}

// One row as float32: out[d] = scale * in[d] for d < head_dim, zero up to
// padded_dim; all zeros when `in` is null (a padding or invalid key).
template <typename T>
inline void convert_row(float* out, int64_t padded_dim, const T* in, int64_t head_dim, float scale) {
  int64_t d = 0;
  if (in != nullptr) {
    for (; d < head_dim; ++d) out[d] = scale * to_float(in[d]);
  }
  std::fill(out + d, out + padded_dim, 0.f);
}

// dst[r][d] = scale * src[r * src_row_stride + d] for r < rows, d < head_dim;
// zero for d in [head_dim, padded_dim). Rows whose key is padding
// (row_valid[r] == false) are zeroed, so garbage there (a KV cache past its
// length) can never reach the result, not even as 0 * NaN.
template <typename T>
void pack_rows(float* dst, int64_t padded_dim, const T* src, int64_t src_row_stride,
               int64_t rows, int64_t head_dim, float scale, const bool* row_valid) {
  prefetch_first_rows(src, src_row_stride, rows, head_dim);
  for (int64_t r = 0; r < rows; ++r) {
    if (r + kRowsAhead < rows) prefetch_row(src + (r + kRowsAhead) * src_row_stride, head_dim);
    const bool valid = row_valid == nullptr || row_valid[r];
    convert_row(dst + r * padded_dim, padded_dim, valid ? src + r * src_row_stride : nullptr, head_dim, scale);
  }
}

// dst[d][r] = src[r][d] for r < rows; columns [rows, padded_rows) and rows
// [head_dim, padded_dim) zero. Builds K^T / V^T so that the logits tile is a
// row-major product with the key index contiguous (vectorised over keys).
template <typename T>
void pack_transposed(float* dst, int64_t padded_rows, int64_t padded_dim, const T* src,
                     int64_t src_row_stride, int64_t rows, int64_t head_dim,
                     const bool* row_valid) {
  std::fill(dst, dst + padded_rows * padded_dim, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    if (row_valid != nullptr && !row_valid[r]) continue;
    const T* in = src + r * src_row_stride;
    for (int64_t d = 0; d < head_dim; ++d) dst[d * padded_rows + r] = to_float(in[d]);
  }
}

// One kv tile as the column panels of gemm_panels (kPanelCols =
// 32 columns each). Element (r, d) of the tile (key r, dim d) goes to
//   transposed (K^T, key columns):  panel r / 32, [padded_dim][32]
//   not transposed (V, dim columns): panel d / 32, [padded_rows][32]
// Keys in [rows, padded_rows), dims in [head_dim, padded_dim) and invalid
// keys (row_valid[r] == false) are zero.
constexpr int64_t kPanelCols = 32;

// Key r of the tile as float32, dims [head_dim, padded_dim) zero; zeros
// for keys past `rows` and invalid ones.
template <typename T>
inline void convert_key_row(float* out, int64_t padded_dim, const T* src, int64_t src_row_stride, int64_t r,
                            int64_t rows, int64_t head_dim, const bool* row_valid) {
  if (r + kRowsAhead < rows) prefetch_row(src + (r + kRowsAhead) * src_row_stride, head_dim);
  const bool valid = r < rows && (row_valid == nullptr || row_valid[r]);
  convert_row(out, padded_dim, valid ? src + r * src_row_stride : nullptr, head_dim, 1.f);
}

// Both layouts are written in order, one panel at a time: V's rows are
// copied piecewise; K^T's 32 keys of a panel are first converted into
// `rows_buf` (32 x padded_dim floats, contiguous reads) and then transposed
// from there (strided reads within L1, contiguous writes). Writing K^T one
// key at a time instead (a store 128 bytes apart per dim) and V by a
// scattered index made the packing about a tenth of a 1K-token forward.
template <typename T>
void pack_panels(float* dst, int64_t padded_rows, int64_t padded_dim, const T* src, int64_t src_row_stride,
                 int64_t rows, int64_t head_dim, const bool* row_valid, bool transposed, float* rows_buf) {
  prefetch_first_rows(src, src_row_stride, rows, head_dim);
  if (transposed) {
    for (int64_t r0 = 0; r0 < padded_rows; r0 += kPanelCols) {
      for (int64_t i = 0; i < kPanelCols; ++i) {
        convert_key_row(rows_buf + i * padded_dim, padded_dim, src, src_row_stride, r0 + i, rows, head_dim,
                        row_valid);
      }
      float* panel = dst + r0 * padded_dim;
      for (int64_t d = 0; d < padded_dim; ++d) {
        for (int64_t i = 0; i < kPanelCols; ++i) panel[d * kPanelCols + i] = rows_buf[i * padded_dim + d];
      }
    }
    return;
  }
  for (int64_t r = 0; r < padded_rows; ++r) {
    convert_key_row(rows_buf, padded_dim, src, src_row_stride, r, rows, head_dim, row_valid);
    for (int64_t d0 = 0; d0 < padded_dim; d0 += kPanelCols) {
      std::copy(rows_buf + d0, rows_buf + d0 + kPanelCols, dst + d0 * padded_rows + r * kPanelCols);
    }
  }
}

// Which keys of a tile may be read at all: inside Skv and, with segments, not
// padding (negative id).
inline void mark_valid_keys(bool* valid, const MaskParams& mask, const AttentionShape& shape,
                            int64_t b, int64_t k0, int64_t keys) {
  for (int64_t j = 0; j < keys; ++j) {
    valid[j] = mask.kv_segment == nullptr || mask.kv_segment[b * shape.kv_len + k0 + j] >= 0;
  }
}

// logits[i][j] += bias[b|0, h|0, q0 + i, k0 + j] for the valid rows/keys.
inline void add_bias_tile(float* logits, int64_t ld, const BiasParams& bias,
                          const AttentionShape& shape, int64_t b, int64_t h, int64_t q0,
                          int64_t rows, int64_t k0, int64_t keys) {
  const int64_t bb = bias.batch == 1 ? 0 : b;
  const int64_t bh = bias.heads == 1 ? 0 : h;
  const float* base =
      bias.data + ((bb * bias.heads + bh) * shape.q_len + q0) * shape.kv_len + k0;
  for (int64_t i = 0; i < rows; ++i) {
    const float* in = base + i * shape.kv_len;
    float* out = logits + i * ld;
    for (int64_t j = 0; j < keys; ++j) out[j] += in[j];
  }
}

// Sets logits of invisible (query, key) pairs of a partial tile to -inf, and
// every padded key column (keys..ld) to -inf.
inline void mask_tile(float* logits, int64_t ld, const MaskParams& mask,
                      const AttentionShape& shape, int64_t b, int64_t h, int64_t q0,
                      int64_t rows, int64_t k0, int64_t keys, bool partial) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = logits + i * ld;
    std::fill(row + keys, row + ld, kNegInf);
  }
  if (!partial) return;
  const int64_t db = mask.dense_batch == 1 ? 0 : b;
  const int64_t dh = mask.dense_heads == 1 ? 0 : h;
  for (int64_t i = 0; i < rows; ++i) {
    float* row = logits + i * ld;
    const int64_t qi = q0 + i;
    int64_t j_begin = 0, j_end = keys;  // band as a contiguous key range
    if (mask.has_band()) {
      j_begin = std::clamp<int64_t>(qi + mask.band_lo - k0, 0, keys);
      j_end = std::clamp<int64_t>(qi + mask.band_hi - k0 + 1, j_begin, keys);
    }
    std::fill(row, row + j_begin, kNegInf);
    std::fill(row + j_end, row + keys, kNegInf);
    if (mask.q_segment != nullptr) {
      const int32_t q_id = mask.q_segment[b * shape.q_len + qi];
      const int32_t* kv_ids = mask.kv_segment + b * shape.kv_len + k0;
      for (int64_t j = j_begin; j < j_end; ++j) {
        if (q_id < 0 || kv_ids[j] != q_id) row[j] = kNegInf;
      }
    }
    if (mask.dense != nullptr) {
      const uint8_t* allowed =
          mask.dense + ((db * mask.dense_heads + dh) * shape.q_len + qi) * shape.kv_len + k0;
      for (int64_t j = j_begin; j < j_end; ++j) {
        if (!allowed[j]) row[j] = kNegInf;
      }
    }
  }
}

// Every kv tile of one k or v array, converted to float32 and packed once per
// call (not once per q tile): [B][Hkv][num_kv_tiles][tile], each tile either
// row-major [tile_kv][padded_dim], transposed [padded_dim][tile_kv], or
// either one as 32-column panels (pack_panels: kRowPanels is V's layout for
// the forward's P V, kTransposedPanels K^T's for its Q K^T). Keys
// past Skv and padding keys (negative segment id) are zero. Costs
// O(Skv * D) memory, like the input itself, and turns the per-q-tile
// transpose (as many instructions as a third of the tile's FMAs) into a
// plain read.
enum class KvLayout { kRows, kTransposed, kRowPanels, kTransposedPanels };

// Reusable memory of the calling thread (the one XLA runs the custom call
// on): the packed K/V of a call live here, [slot] per packed array, so a
// call does not map and zero fresh pages each time (glibc hands blocks this
// large back to the OS on free; page zeroing was the largest single item in
// a profile of repeated bf16 forwards at S=4096). Kept until the thread
// ends, sized by the largest call.
template <typename T>
T* call_buffer(int slot, size_t count) {
  thread_local std::vector<T> buffers[4];
  if (buffers[slot].size() < count) buffers[slot].resize(count);
  return buffers[slot].data();
}

struct PackedKv {
  float* data = nullptr;
  int64_t tile_floats = 0, num_kv_tiles = 0, kv_heads = 0;
  const float* tile(int64_t b, int64_t kv_h, int64_t kv_tile) const {
    if (data == nullptr) return nullptr;  // not packed for this call
    return data + ((b * kv_heads + kv_h) * num_kv_tiles + kv_tile) * tile_floats;
  }
};

// `slot`: which call_buffer holds it (one per array packed in a call).
template <typename T>
PackedKv pack_kv_tiles(const T* src, const AttentionShape& s, const MaskParams& mask,
                       int64_t padded_dim, KvLayout layout, int slot);

// Thread-private scratch, grown on demand and reused across calls.
struct Scratch {
  std::vector<float> buffers[14];
  float* get(int slot, int64_t count) {
    if (int64_t(buffers[slot].size()) < count) buffers[slot].resize(count);
    return buffers[slot].data();
  }
};

inline Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

}  // namespace FASTATTN_ISA_NS
}  // namespace cpu
}  // namespace fastattn

namespace fastattn {
namespace cpu {
inline namespace FASTATTN_ISA_NS {

template <typename T>
PackedKv pack_kv_tiles(const T* src, const AttentionShape& s, const MaskParams& mask,
                       int64_t padded_dim, KvLayout layout, int slot) {
  PackedKv packed;
  const int64_t tile_kv = mask.tile_kv;
  packed.tile_floats = tile_kv * padded_dim;
  packed.num_kv_tiles = s.num_kv_tiles(tile_kv);
  packed.kv_heads = s.kv_heads;
  packed.data = call_buffer<float>(slot, s.batch * s.kv_heads * packed.num_kv_tiles * packed.tile_floats);
  const int64_t row_stride = s.kv_heads * s.head_dim;
  parallel_for(s.batch * s.kv_heads * packed.num_kv_tiles, [&](int64_t item) {
    const int64_t kv_tile = item % packed.num_kv_tiles;
    const int64_t kv_h = (item / packed.num_kv_tiles) % s.kv_heads;
    const int64_t b = item / (packed.num_kv_tiles * s.kv_heads);
    const int64_t k0 = kv_tile * tile_kv;
    const int64_t keys = std::min(tile_kv, s.kv_len - k0);
    bool valid_keys[4096];
    const bool* valid = nullptr;
    if (mask.kv_segment != nullptr) {
      mark_valid_keys(valid_keys, mask, s, b, k0, keys);
      valid = valid_keys;
    }
    float* dst = packed.data + item * packed.tile_floats;
    const T* in = src + ((b * s.kv_len + k0) * s.kv_heads + kv_h) * s.head_dim;
    if (layout == KvLayout::kTransposed) {
      pack_transposed(dst, tile_kv, padded_dim, in, row_stride, keys, s.head_dim, valid);
    } else if (layout == KvLayout::kRowPanels || layout == KvLayout::kTransposedPanels) {
      // The staging rows live in this thread's scratch: packing runs before
      // any work item of the call takes its scratch.
      pack_panels(dst, tile_kv, padded_dim, in, row_stride, keys, s.head_dim, valid,
                  layout == KvLayout::kTransposedPanels, thread_scratch().get(0, kPanelCols * padded_dim));
    } else {
      pack_rows(dst, padded_dim, in, row_stride, keys, s.head_dim, 1.f, valid);
      std::fill(dst + keys * padded_dim, dst + tile_kv * padded_dim, 0.f);
    }
  });
  return packed;
}

// The forward's epilogue for `rows` query rows: out row i = acc row i / its
// softmax sum, lse[i] = max + log(sum). A row that saw no key returns zeros
// and lse = -inf (never NaN).
template <typename T>
inline void write_normalized_rows(T* out, int64_t out_row_stride, float* lse, const float* acc,
                                  int64_t acc_row_stride, const float* row_max, const float* row_sum,
                                  int64_t rows, int64_t head_dim) {
  for (int64_t i = 0; i < rows; ++i) {
    const bool seen = row_sum[i] > 0.f;
    const float inv_sum = seen ? 1.f / row_sum[i] : 0.f;
    T* o = out + i * out_row_stride;
    for (int64_t d = 0; d < head_dim; ++d) from_float(acc[i * acc_row_stride + d] * inv_sum, &o[d]);
    lse[i] = seen ? row_max[i] + std::log(row_sum[i]) : kNegInf;
  }
}

}  // namespace FASTATTN_ISA_NS
}  // namespace cpu
}  // namespace fastattn
