// Split-KV decode, shared by its kernels (decode_sm80.cu: CUDA cores;
// decode_mma_sm80.cu: tensor cores): the launch arguments, the partials
// each split writes to the workspace, and the kernel that merges them.
// nvcc only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/decode_params.h"

namespace fastattn {
namespace cuda {
namespace decode_split {

struct DecodeArgs {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* lengths;
  const int32_t* page_table;
  int32_t batch, q_heads, kv_heads, head_dim, page_size, max_pages, head_groups;
  int64_t max_len, keys_per_split, num_splits;
  float softmax_scale;
  float* partial_out;    // [B, Hq, splits, D]
  float* partial_stats;  // [B, Hq, splits, 2] (max, sum)
  void* out;             // [B, Hq, D]
  float* lse;            // [B, Hq]: row_max + log(total); -inf for length 0
};

// The launch arguments of `p` with the partials in `workspace`
// (decode_workspace_floats() floats): partial outputs first, then the
// (max, sum) pairs. head_groups: CTAs per kv head along the q heads.
inline DecodeArgs make_args(const DecodeParams& p, int64_t num_splits, int64_t keys_per_split,
                            int head_groups, float* workspace) {
  DecodeArgs args;
  args.q = p.q;
  args.k = p.k;
  args.v = p.v;
  args.lengths = p.lengths;
  args.page_table = p.page_table;
  args.batch = int32_t(p.batch);
  args.q_heads = int32_t(p.q_heads);
  args.kv_heads = int32_t(p.kv_heads);
  args.head_dim = int32_t(p.head_dim);
  args.page_size = int32_t(p.page_size);
  args.max_pages = int32_t(p.max_pages);
  args.head_groups = head_groups;
  args.max_len = p.max_len();
  args.keys_per_split = keys_per_split;
  args.num_splits = num_splits;
  args.softmax_scale = p.softmax_scale;
  args.partial_out = workspace;
  args.partial_stats = workspace + p.batch * p.q_heads * num_splits * p.head_dim;
  args.out = p.out;
  args.lse = p.lse;
  return args;
}

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }

// One CTA per (batch, q head): merges the splits and writes the output.
// The split weights exp(m_s - max) / total are computed once, in parallel,
// into shared memory; then each thread sums its output element over the
// splits with independent loads in flight (a serial chain of loads over 132
// splits cost tens of microseconds at B = 1).
constexpr int kCombineThreads = 256;
constexpr int kMaxSplitsInShared = 4096;

template <typename T>
__global__ void __launch_bounds__(kCombineThreads) decode_combine_kernel(DecodeArgs args) {
  __shared__ float weights[kMaxSplitsInShared];
  __shared__ float reduce[kCombineThreads / 32];
  __shared__ float row_max, row_total;
  const int64_t row = blockIdx.x;  // b * Hq + h
  const int splits = int(args.num_splits);
  const float* stats = args.partial_stats + row * splits * 2;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  float best = -INFINITY;
  for (int s = threadIdx.x; s < splits; s += kCombineThreads) best = fmaxf(best, stats[2 * s]);
  for (int offset = 16; offset > 0; offset /= 2) best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, offset));
  if (lane == 0) reduce[warp] = best;
  __syncthreads();
  if (threadIdx.x == 0) {
    float m = -INFINITY;
    for (int w = 0; w < kCombineThreads / 32; ++w) m = fmaxf(m, reduce[w]);
    row_max = m;
  }
  __syncthreads();
  float total = 0.f;
  for (int s = threadIdx.x; s < splits; s += kCombineThreads) {
    const float l = stats[2 * s + 1];
    const float w = (row_max == -INFINITY || l == 0.f) ? 0.f : __expf(stats[2 * s] - row_max);
    weights[s] = w;
    total += l * w;
  }
  for (int offset = 16; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
  __syncthreads();
  if (lane == 0) reduce[warp] = total;
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int w = 0; w < kCombineThreads / 32; ++w) sum += reduce[w];
    row_total = sum;
  }
  __syncthreads();
  const float inv = row_total > 0.f ? 1.f / row_total : 0.f;  // length 0: zeros
  if (threadIdx.x == 0) args.lse[row] = row_total > 0.f ? row_max + logf(row_total) : -INFINITY;
  const float* partial = args.partial_out + row * splits * args.head_dim;
  for (int d = threadIdx.x; d < args.head_dim; d += kCombineThreads) {
    float value = 0.f;
#pragma unroll 8
    for (int s = 0; s < splits; ++s) value = fmaf(weights[s], partial[int64_t(s) * args.head_dim + d], value);
    static_cast<T*>(args.out)[row * args.head_dim + d] = from_f32<T>(value * inv);
  }
}

// Enqueues the merge of all splits (one CTA per batch row and q head).
template <typename T>
cudaError_t launch_combine(const DecodeArgs& args, cudaStream_t stream) {
  decode_combine_kernel<T><<<unsigned(args.batch * args.q_heads), kCombineThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace decode_split
}  // namespace cuda
}  // namespace fastattn
