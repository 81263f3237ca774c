// Split-KV decode kernels. See decode.h.
//
// Grid of the split kernel: (split, kv head x head group, batch). A CTA of
// 4 warps streams its keys through shared memory in tiles (cp.async, 4
// stages: 64 KiB in flight per CTA, what HBM needs to stay busy); each key
// row (D elements) is spread over L lanes holding E elements each, so a
// warp handles 32 / L keys at once. Every lane keeps, for each of the CTA's
// q heads (all heads of a GQA group share each K/V byte), a running max,
// sum and its E-element slice of the output (online softmax, one update per
// tile). The partial results of the lanes, warps and then splits are merged
// through their log-sum-exps.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "decode.h"
#include "decode_partials.h"
#include "sm80_tiles.h"

namespace fastattn {
namespace cuda {
namespace {

using decode_split::DecodeArgs;
using decode_split::kMaxSplitsInShared;

#ifndef FASTATTN_DECODE_STAGES
#define FASTATTN_DECODE_STAGES 4
#endif

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

template <typename T>
__device__ __forceinline__ void unpack16(const uint4& raw, float* out);

template <>
__device__ __forceinline__ void unpack16<float>(const uint4& raw, float* out) {
  out[0] = __uint_as_float(raw.x);
  out[1] = __uint_as_float(raw.y);
  out[2] = __uint_as_float(raw.z);
  out[3] = __uint_as_float(raw.w);
}

template <>
__device__ __forceinline__ void unpack16<__nv_bfloat16>(const uint4& raw, float* out) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(words[i] << 16);
    out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

template <>
__device__ __forceinline__ void unpack16<__half>(const uint4& raw, float* out) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 pair = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
    out[2 * i] = pair.x;
    out[2 * i + 1] = pair.y;
  }
}

template <typename T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }

// Merges running softmax state (m, l, acc) with another one.
template <int E>
__device__ __forceinline__ void merge_state(float& m, float& l, float* acc, float m_other,
                                            float l_other, const float* acc_other) {
  const float m_new = fmaxf(m, m_other);
  if (m_new == -INFINITY) return;  // both empty
  const float a = __expf(m - m_new), b = __expf(m_other - m_new);
  l = l * a + l_other * b;
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = acc[e] * a + acc_other[e] * b;
  m = m_new;
}

// cp.async commit and wait: sm80_tiles.h.
using sm80::commit_async;
using sm80::wait_async;

// sm80_tiles.h's 16-byte cp.async (an invalid copy writes zeros and reads
// nothing), taking a pointer into shared memory.
__device__ __forceinline__ void copy16_async(void* shared, const void* global, bool valid) {
  sm80::copy16_async(sm80::shared_address(shared), global, valid);
}

// Shape of the kernel for one (dtype, padded head dim).
template <typename T, int D>
struct DecodeShape {
  static constexpr int kPer16B = 16 / int(sizeof(T));
  static constexpr int E = (D / 32 > kPer16B) ? D / 32 : kPer16B;  // elements per lane
  static constexpr int L = D / E;                                   // lanes per key
  static constexpr int kVecs = E / kPer16B;                         // 16-byte pieces per lane
  static constexpr int kKeysPerWarp = 32 / L;                       // keys a warp does at once
  static constexpr int kTileKeys = 8192 / (D * int(sizeof(T)));     // 8 KiB of K (+8 of V) per stage
  static constexpr int kSteps = kTileKeys / (kWarps * kKeysPerWarp);
  static constexpr int kStages = FASTATTN_DECODE_STAGES;            // 16 KiB of K+V tiles per stage
  static constexpr int kChunksPerRow = D / kPer16B;
  static constexpr size_t kSharedBytes = size_t(kStages) * 2 * kTileKeys * D * sizeof(T);
  static_assert(L >= 1 && L <= 32 && (L & (L - 1)) == 0, "lanes per key: power of two");
  static_assert(kSteps >= 1, "each warp takes at least one step per tile");
};

// Keys stream HBM -> shared memory through a kStages-deep cp.async pipeline
// (tiles of kTileKeys rows of K and V), which keeps ~64 KiB per CTA in
// flight without spending registers on it; compute reads the tiles from
// shared memory (each key slot reads one contiguous row: no bank conflicts).
template <typename T, int D, int HEADS>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(DecodeArgs args) {
  using S = DecodeShape<T, D>;
  constexpr int E = S::E, L = S::L, kVecs = S::kVecs, kPer16B = S::kPer16B;
  constexpr int kKeysPerWarp = S::kKeysPerWarp, kTileKeys = S::kTileKeys, kSteps = S::kSteps;
  constexpr int kStages = S::kStages;
  extern __shared__ __align__(16) unsigned char tile_storage[];
  T* k_tiles = reinterpret_cast<T*>(tile_storage);             // [kStages][kTileKeys][D]
  T* v_tiles = k_tiles + size_t(kStages) * kTileKeys * D;       // [kStages][kTileKeys][D]

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int slot = lane / L, part = lane % L;
  const int split = blockIdx.x;
  const int kv_h = blockIdx.y / args.head_groups;
  const int head_group = blockIdx.y % args.head_groups;
  const int b = blockIdx.z;
  const int group = args.q_heads / args.kv_heads;
  const int h0 = kv_h * group + head_group * HEADS;
  const int heads = min(HEADS, group - head_group * HEADS);

  float q[HEADS][E];
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int d = part * E + e;
      q[h][e] = (h < heads && d < args.head_dim)
                    ? args.softmax_scale *
                          to_f32(static_cast<const T*>(args.q)[(int64_t(b) * args.q_heads + h0 + h) *
                                                                   args.head_dim + d])
                    : 0.f;
    }
  }
  float m[HEADS], l[HEADS], acc[HEADS][E];
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[h][e] = 0.f;
  }

  const int64_t length = min(int64_t(max(args.lengths[b], 0)), args.max_len);
  const int64_t begin = int64_t(split) * args.keys_per_split;
  const int64_t end = min(length, begin + args.keys_per_split);
  const int num_tiles = end > begin ? int((end - begin + kTileKeys - 1) / kTileKeys) : 0;
  const T* k = static_cast<const T*>(args.k);
  const T* v = static_cast<const T*>(args.v);
  const int row_chunks = (args.head_dim + kPer16B - 1) / kPer16B;  // real 16-byte pieces of a row

  // Row offsets need one division by the page size per row (32-bit: a 64-bit
  // division costs ~70 instructions and, per 16-byte piece, was most of the
  // kernel's issue slots); contiguous caches need none.
  const int64_t row_stride = int64_t(args.kv_heads) * args.head_dim;
  const T* k_base = k + int64_t(kv_h) * args.head_dim;
  const T* v_base = v + int64_t(kv_h) * args.head_dim;
  const int32_t* table = args.page_table ? args.page_table + int64_t(b) * args.max_pages : nullptr;
  const int64_t contiguous_row0 = int64_t(b) * args.page_size;
  auto load_tile = [&](int tile) {
    if (tile < num_tiles) {
      const int stage = tile % kStages;
      T* k_dst = k_tiles + size_t(stage) * kTileKeys * D;
      T* v_dst = v_tiles + size_t(stage) * kTileKeys * D;
      const int key0 = int(begin) + tile * kTileKeys;
#pragma unroll
      for (int i = threadIdx.x; i < kTileKeys * S::kChunksPerRow; i += kThreads) {
        const int row = i / S::kChunksPerRow, chunk = i % S::kChunksPerRow;  // constants: shifts
        const int j = key0 + row;
        const bool valid = j < end && chunk < row_chunks;
        int64_t cache_row = 0;
        if (valid) {
          cache_row = table ? int64_t(table[j / args.page_size]) * args.page_size + j % args.page_size
                            : contiguous_row0 + j;
        }
        const int64_t offset = cache_row * row_stride + chunk * kPer16B;
        copy16_async(k_dst + row * D + chunk * kPer16B, k_base + offset, valid);
        copy16_async(v_dst + row * D + chunk * kPer16B, v_base + offset, valid);
      }
    }
    commit_async();  // an empty group past the last tile keeps the counting simple
  };

#pragma unroll
  for (int tile = 0; tile < kStages - 1; ++tile) load_tile(tile);
  for (int tile = 0; tile < num_tiles; ++tile) {
    load_tile(tile + kStages - 1);
    wait_async<kStages - 1>();  // this thread's copies of `tile` have landed
    __syncthreads();            // ... and everyone else's
    const int stage = tile % kStages;
    const T* k_tile = k_tiles + size_t(stage) * kTileKeys * D;
    const T* v_tile = v_tiles + size_t(stage) * kTileKeys * D;
    const int64_t tile_start = begin + int64_t(tile) * kTileKeys;

    float dots[kSteps][HEADS];
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int row = (warp * kSteps + step) * kKeysPerWarp + slot;
      const bool valid = tile_start + row < end;
      float key[E];
#pragma unroll
      for (int c = 0; c < kVecs; ++c) {
        unpack16<T>(reinterpret_cast<const uint4*>(k_tile + row * D + part * E)[c], key + c * kPer16B);
      }
#pragma unroll
      for (int h = 0; h < HEADS; ++h) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) dot = fmaf(q[h][e], key[e], dot);
#pragma unroll
        for (int offset = L / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        dots[step][h] = valid ? dot : -INFINITY;
      }
    }
    // One softmax update per head for the warp's keys of this tile.
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
      float chunk_max = dots[0][h];
#pragma unroll
      for (int step = 1; step < kSteps; ++step) chunk_max = fmaxf(chunk_max, dots[step][h]);
      const float m_new = fmaxf(m[h], chunk_max);
      if (m_new == -INFINITY) continue;  // nothing visible yet in this slot
      const float correction = __expf(m[h] - m_new);
      l[h] *= correction;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[h][e] *= correction;
      m[h] = m_new;
#pragma unroll
      for (int step = 0; step < kSteps; ++step) dots[step][h] = __expf(dots[step][h] - m_new);  // -inf -> 0
    }
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int row = (warp * kSteps + step) * kKeysPerWarp + slot;
      float value[E];
#pragma unroll
      for (int c = 0; c < kVecs; ++c) {
        unpack16<T>(reinterpret_cast<const uint4*>(v_tile + row * D + part * E)[c], value + c * kPer16B);
      }
#pragma unroll
      for (int h = 0; h < HEADS; ++h) {
        if (m[h] == -INFINITY) continue;
        const float p = dots[step][h];
        l[h] += p;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[h][e] = fmaf(p, value[e], acc[h][e]);
      }
    }
    __syncthreads();  // the stage is refilled by the next iteration's load
  }
  wait_async<0>();

  // Merge the key slots of the warp (lanes with the same `part`).
#pragma unroll
  for (int offset = L; offset < 32; offset *= 2) {
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
      float acc_other[E];
      const float m_other = __shfl_xor_sync(0xffffffffu, m[h], offset);
      const float l_other = __shfl_xor_sync(0xffffffffu, l[h], offset);
#pragma unroll
      for (int e = 0; e < E; ++e) acc_other[e] = __shfl_xor_sync(0xffffffffu, acc[h][e], offset);
      merge_state<E>(m[h], l[h], acc[h], m_other, l_other, acc_other);
    }
  }
  // Merge the warps through shared memory; warp 0 writes the split's partials.
  __shared__ float shared_acc[kWarps][HEADS][D];
  __shared__ float shared_ml[kWarps][HEADS][2];
  if (slot == 0) {
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
#pragma unroll
      for (int e = 0; e < E; ++e) shared_acc[warp][h][part * E + e] = acc[h][e];
      if (part == 0) {
        shared_ml[warp][h][0] = m[h];
        shared_ml[warp][h][1] = l[h];
      }
    }
  }
  __syncthreads();
  if (warp == 0 && slot == 0) {
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
      for (int w = 1; w < kWarps; ++w) {
        float acc_other[E];
#pragma unroll
        for (int e = 0; e < E; ++e) acc_other[e] = shared_acc[w][h][part * E + e];
        merge_state<E>(m[h], l[h], acc[h], shared_ml[w][h][0], shared_ml[w][h][1], acc_other);
      }
      if (h < heads) {
        const int64_t row = (int64_t(b) * args.q_heads + h0 + h) * args.num_splits + split;
        if (part * E < args.head_dim) {
#pragma unroll
          for (int e = 0; e < E; ++e) {
            if (part * E + e < args.head_dim) args.partial_out[row * args.head_dim + part * E + e] = acc[h][e];
          }
        }
        if (part == 0) {
          args.partial_stats[row * 2] = m[h];
          args.partial_stats[row * 2 + 1] = l[h];
        }
      }
    }
  }
}

template <typename T, int D, int HEADS>
cudaError_t launch_typed(const DecodeArgs& args, cudaStream_t stream) {
  const dim3 grid(unsigned(args.num_splits), unsigned(args.kv_heads * args.head_groups), unsigned(args.batch));
  constexpr size_t shared = DecodeShape<T, D>::kSharedBytes;
  // Set on every launch (a cheap host call), not once per process: the
  // attribute is per device, and one process may drive several GPUs.
  if (cudaError_t e = cudaFuncSetAttribute(decode_split_kernel<T, D, HEADS>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
      e != cudaSuccess)
    return e;
  decode_split_kernel<T, D, HEADS><<<grid, kThreads, shared, stream>>>(args);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  return decode_split::launch_combine<T>(args, stream);
}

template <typename T, int HEADS>
cudaError_t launch_dim(const DecodeArgs& args, cudaStream_t stream) {
  // Head dims round up to the next supported power of two; lanes past D idle.
  if (args.head_dim <= 32) return launch_typed<T, 32, HEADS>(args, stream);
  if (args.head_dim <= 64) return launch_typed<T, 64, HEADS>(args, stream);
  if (args.head_dim <= 128) return launch_typed<T, 128, HEADS>(args, stream);
  return launch_typed<T, 256, HEADS>(args, stream);
}

// q heads per CTA: the group size rounded up to 1, 2, 4 or 8 (so no CTA
// computes more than twice the heads it needs); larger groups are split
// over several CTAs of 8.
inline int heads_per_cta(int group) {
  if (group >= kDecodeMaxHeadsPerCta) return kDecodeMaxHeadsPerCta;
  int heads = 1;
  while (heads < group) heads *= 2;
  return heads;
}

template <typename T>
cudaError_t launch_heads(const DecodeArgs& args, int group, cudaStream_t stream) {
  switch (heads_per_cta(group)) {
    case 1: return launch_dim<T, 1>(args, stream);
    case 2: return launch_dim<T, 2>(args, stream);
    case 4: return launch_dim<T, 4>(args, stream);
    default: return launch_dim<T, kDecodeMaxHeadsPerCta>(args, stream);
  }
}

}  // namespace

int64_t decode_keys_per_split(const DecodeParams& p, int64_t num_splits) {
  const int64_t keys = (p.max_len() + num_splits - 1) / num_splits;
  return std::max<int64_t>(64, (keys + 63) / 64 * 64);
}

int64_t decode_workspace_floats(const DecodeParams& p, int64_t num_splits) {
  return p.batch * p.q_heads * num_splits * (p.head_dim + 2);
}

bool decode_supported(const DecodeParams& p) {
  const int64_t bytes = p.dtype == ElementType::kF32 ? 4 : 2;
  return p.head_dim <= 256 && (p.head_dim * bytes) % 16 == 0;
}

cudaError_t decode_attention(const DecodeParams& p, int64_t num_splits, float* workspace,
                             cudaStream_t stream) {
  if (num_splits > kMaxSplitsInShared) return cudaErrorInvalidValue;
  const int group = int(p.group());
  const int cta_heads = heads_per_cta(group);
  const DecodeArgs args = decode_split::make_args(p, num_splits, decode_keys_per_split(p, num_splits),
                                                  (group + cta_heads - 1) / cta_heads, workspace);
  switch (p.dtype) {
    case ElementType::kF32: return launch_heads<float>(args, group, stream);
    case ElementType::kBF16: return launch_heads<__nv_bfloat16>(args, group, stream);
    case ElementType::kF16: return launch_heads<__half>(args, group, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastattn
