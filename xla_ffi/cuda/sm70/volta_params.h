// Arguments of the Volta attention kernel, passed by value to cuLaunchKernel.
// Shared by the host handler (g++/nvcc) and the kernel (NVRTC, compute_70),
// so it uses only built-in types: NVRTC has no standard headers here.
#pragma once

namespace fastattn {
namespace volta {

// Tiles of the kernel: 4 warps x 32 query rows, 32 keys per step. The mask
// plan's tile classes must be computed with these sizes.
constexpr int kTileQ = 128;
constexpr int kTileKv = 32;
constexpr int kThreads = 128;

struct VoltaForwardParams {
  const void* q;             // [B, Sq, Hq, D] float16
  const void* k;             // [B, Skv, Hkv, D]
  const void* v;
  void* out;                 // [B, Sq, Hq, D]
  float* lse;                // [B, Hq, Sq]
  const float* bias;         // [bias_batch, bias_heads, Sq, Skv] or null
  const int* q_segment;      // [B, Sq] or null
  const int* kv_segment;     // [B, Skv] or null
  const unsigned char* dense;      // [dense_batch, dense_heads, Sq, Skv] or null
  const signed char* tile_class;   // [tile_batch, tile_heads, q tiles, kv tiles]
  long long q_len, kv_len, q_heads, kv_heads;
  long long bias_batch, bias_heads, dense_batch, dense_heads, tile_batch, tile_heads;
  long long num_q_tiles, num_kv_tiles;
  long long band_lo, band_hi;  // key j visible from query i iff i+lo <= j <= i+hi
  float scale_log2;            // softmax_scale * log2(e)
  float softmax_scale;
};

}  // namespace volta
}  // namespace fastattn
