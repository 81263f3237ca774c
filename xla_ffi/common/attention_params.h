// Plain descriptions of one attention call, shared by the CPU and CUDA
// kernels. Nothing here knows about XLA: handlers fill these structs from FFI
// buffers after checking shapes, and kernels, tests and benchmarks take them.
#pragma once

#include <cstdint>

#include "dtypes.h"

namespace fastattn {

// Tile classes produced by jax_fastattn.masks (tiling-mask). A kernel skips
// kEmpty tiles, applies the element-wise mask only in kPartial ones and no
// mask at all in kFull ones.
enum TileClass : int8_t { kEmpty = 0, kPartial = 1, kFull = 2 };

// Band limits that mean "unbounded" (no causal / window bound on that side).
constexpr int64_t kUnboundedBand = int64_t(1) << 62;

// The mask of one call, as the kernel sees it. A key j is visible from query
// i of batch b and q head h iff all present parts agree:
//   band:      i + band_lo <= j <= i + band_hi      (causal, sliding window)
//   segments:  q_segment[b, i] == kv_segment[b, j] and both >= 0
//   dense:     dense[b|0, h|0, i, j] != 0
// and j < Skv. tile_class [tile_batch, tile_heads, num_q_tiles, num_kv_tiles]
// (batch/head dims 1 = broadcast) says which tiles need any of this.
struct MaskParams {
  int64_t band_lo = -kUnboundedBand;
  int64_t band_hi = kUnboundedBand;
  const int32_t* q_segment = nullptr;   // [B, Sq] or null
  const int32_t* kv_segment = nullptr;  // [B, Skv] or null
  const uint8_t* dense = nullptr;       // [dense_batch, dense_heads, Sq, Skv] or null
  int64_t dense_batch = 1, dense_heads = 1;
  const int8_t* tile_class = nullptr;   // never null
  int64_t tile_batch = 1, tile_heads = 1;
  int64_t tile_q = 64, tile_kv = 64;    // rows / keys per tile of the plan

  bool has_band() const {
    return band_lo > -kUnboundedBand || band_hi < kUnboundedBand;
  }
};

// Sizes and layout of q [B, Sq, Hq, D], k/v [B, Skv, Hkv, D] (jax layout).
struct AttentionShape {
  int64_t batch = 0, q_len = 0, kv_len = 0;
  int64_t q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t group() const { return q_heads / kv_heads; }  // q heads per kv head
  int64_t num_q_tiles(int64_t tile_q) const { return (q_len + tile_q - 1) / tile_q; }
  int64_t num_kv_tiles(int64_t tile_kv) const { return (kv_len + tile_kv - 1) / tile_kv; }
};

// Additive bias [bias_batch, bias_heads, Sq, Skv] (dims of 1 broadcast).
struct BiasParams {
  const float* data = nullptr;  // float32 or null
  int64_t batch = 1, heads = 1;
};

// Only the band decides visibility: no segments, dense mask or bias.
inline bool band_mask_only(const MaskParams& mask, const BiasParams& bias) {
  return mask.q_segment == nullptr && mask.dense == nullptr && bias.data == nullptr;
}

struct ForwardParams {
  AttentionShape shape;
  ElementType dtype = ElementType::kF32;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  BiasParams bias;
  MaskParams mask;
  float softmax_scale = 1.0f;
  void* out = nullptr;   // [B, Sq, Hq, D] in dtype
  float* lse = nullptr;  // [B, Hq, Sq]
};

struct BackwardParams {
  AttentionShape shape;
  ElementType dtype = ElementType::kF32;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;
  const void* d_out = nullptr;
  const float* lse = nullptr;    // [B, Hq, Sq]
  const float* d_lse = nullptr;  // [B, Hq, Sq] cotangent of lse, or null
  BiasParams bias;
  MaskParams mask;
  float softmax_scale = 1.0f;
  void* d_q = nullptr;       // [B, Sq, Hq, D] in dtype
  void* d_k = nullptr;       // [B, Skv, Hkv, D] in dtype
  void* d_v = nullptr;       // [B, Skv, Hkv, D] in dtype
  float* d_bias = nullptr;   // [B, Hq, Sq, Skv] float32, or null
};

inline int8_t tile_class_at(const MaskParams& m, int64_t b, int64_t h,
                            int64_t q_tile, int64_t kv_tile, int64_t num_q_tiles,
                            int64_t num_kv_tiles) {
  const int64_t tb = m.tile_batch == 1 ? 0 : b;
  const int64_t th = m.tile_heads == 1 ? 0 : h;
  return m.tile_class[((tb * m.tile_heads + th) * num_q_tiles + q_tile) * num_kv_tiles +
                      kv_tile];
}

}  // namespace fastattn
