// Split-KV decode on tensor cores (sm80 and newer, bf16/f16, D = 64 or 128,
// GQA groups of up to 16 q heads; contiguous or paged caches).
//
// The q heads of one kv head's group are the 16 rows of an m16n8k16 A
// operand (rows past the group are zero), so Q Kᵀ and P V run as mma.sync
// products, as in the attention forward kernel, and every K/V byte loaded
// serves all the group's heads. Against the CUDA-core kernel
// (decode_sm80.cu), whose lanes do a dot product per key and head and
// shuffle-reduce it, this takes an order of magnitude fewer instructions
// per key, leaving the loads as the only work that scales with the cache.
//
// Grid: (split, kv head, batch); 4 warps per CTA. Keys stream through
// shared memory in tiles of 64 (16 per warp: each warp keeps its own
// online-softmax state over its keys), cp.async kStages deep. At the end
// the warps' states merge through shared memory into the split's partial
// (unnormalised output, max, sum), which decode_partials.h's combine kernel
// merges over the splits exactly as for the CUDA-core kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "decode.h"
#include "decode_partials.h"
#include "sm80_tiles.h"

namespace fastattn {
namespace cuda {
namespace {

using decode_split::DecodeArgs;
using namespace sm80;

#ifndef FASTATTN_DECODE_MMA_STAGES
#define FASTATTN_DECODE_MMA_STAGES 3
#endif

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kWarpKeys = 16;                       // keys per warp and tile: one n16 slab
constexpr int kTileKeys = kWarpKeys * kMmaWarps;    // 64: decode_keys_per_split is a multiple
constexpr int kGroupRows = 16;                      // q heads one CTA serves (the A operand's rows)

template <typename T, int D>
struct MmaDecodeShape {
  static constexpr int kStages = FASTATTN_DECODE_MMA_STAGES;
  static constexpr int kTileChunks = kTileKeys * D / 8;   // 16-byte chunks of one K or V tile
  // K and V tiles of every stage; reused at the end for the warps' merge.
  static constexpr size_t kTileBytes = size_t(kStages) * 2 * kTileChunks * 16;
  static constexpr size_t kMergeBytes = size_t(kMmaWarps) * kGroupRows * (D + 2) * sizeof(float);
  static constexpr size_t kSharedBytes = kTileBytes > kMergeBytes ? kTileBytes : kMergeBytes;
};

// kTileKeys rows of a paged cache into swizzled K and V tiles: each row's
// page from the table (a 32-bit division per row, shared by K and V; a
// page's rows are contiguous). Rows at or past valid_rows are zero-filled
// and their pages never looked up. k_head / v_head: row 0 of page 0 at the
// tile's kv head.
template <int D, typename T>
__device__ __forceinline__ void load_paged_tiles_async(uint4* k_tile, uint4* v_tile, const T* k_head,
                                                       const T* v_head, const int32_t* table,
                                                       int page_size, int first_key,
                                                       int64_t row_stride, int64_t valid_rows) {
  constexpr int kChunks = D / 8;
  constexpr int kStep = kMmaThreads / kChunks;
  static_assert(kMmaThreads % kChunks == 0 && kTileKeys % kStep == 0, "tile shape");
  const int row0 = threadIdx.x / kChunks, chunk = threadIdx.x % kChunks;
#pragma unroll
  for (int i = 0; i < kTileKeys / kStep; ++i) {
    const int row = row0 + i * kStep;
    const bool valid = row < valid_rows;
    int64_t offset = 0;  // a zero-filling copy reads nothing; any in-bounds address will do
    if (valid) {
      const int j = first_key + row;
      offset = (int64_t(table[j / page_size]) * page_size + j % page_size) * row_stride + chunk * 8;
    }
    const int slot = chunk_of<D>(row, chunk);
    copy16_async(shared_address(k_tile + slot), k_head + offset, valid);
    copy16_async(shared_address(v_tile + slot), v_head + offset, valid);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kMmaThreads) decode_mma_kernel(DecodeArgs args) {
  using S = MmaDecodeShape<T, D>;
  constexpr int kStages = S::kStages;
  extern __shared__ uint4 tile_storage[];
  uint4* k_tiles = tile_storage;                                // [kStages][kTileKeys][D], swizzled
  uint4* v_tiles = tile_storage + kStages * S::kTileChunks;     // [kStages][kTileKeys][D], swizzled
  __shared__ uint4 q_tile[kGroupRows * D / 8];                  // the group's q rows, swizzled

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;   // accumulator rows g, g + 8; columns 2t, 2t + 1
  const int split = blockIdx.x, kv_h = blockIdx.y, b = blockIdx.z;
  const int group = args.q_heads / args.kv_heads;
  const int h0 = kv_h * group;

  const int64_t length = min(int64_t(max(args.lengths[b], 0)), args.max_len);
  const int64_t begin = int64_t(split) * args.keys_per_split;
  const int64_t end = min(length, begin + args.keys_per_split);
  const int num_tiles = end > begin ? int((end - begin + kTileKeys - 1) / kTileKeys) : 0;
  const int64_t row_stride = int64_t(args.kv_heads) * D;
  const T* k_head = static_cast<const T*>(args.k) + int64_t(kv_h) * D;
  const T* v_head = static_cast<const T*>(args.v) + int64_t(kv_h) * D;
  const int32_t* table = args.page_table ? args.page_table + int64_t(b) * args.max_pages : nullptr;
  // Contiguous cache: row b * Smax + j holds position j of sequence b.
  const int64_t first_row = int64_t(b) * args.page_size + begin;
  const T* k = k_head + first_row * row_stride;
  const T* v = v_head + first_row * row_stride;

  // Q rows (rows past the group zero-filled), in the first commit group.
  load_tile_async<D, kGroupRows, kMmaThreads>(q_tile, static_cast<const T*>(args.q) +
                                                          (int64_t(b) * args.q_heads + h0) * D,
                                              D, group);
  auto load_tile = [&](int tile) {
    if (tile < num_tiles) {
      const int stage = tile % kStages;
      const int64_t key0 = int64_t(tile) * kTileKeys;
      // Rows at or past `end` are zero-filled, never read.
      uint4* k_dst = k_tiles + stage * S::kTileChunks;
      uint4* v_dst = v_tiles + stage * S::kTileChunks;
      const int64_t rows = end - begin - key0;
      if (table) {
        const int first_key = int(begin + key0);
        load_paged_tiles_async<D>(k_dst, v_dst, k_head, v_head, table, args.page_size, first_key,
                                  row_stride, rows);
      } else {
        load_tile_async<D, kTileKeys, kMmaThreads>(k_dst, k + key0 * row_stride, row_stride, rows);
        load_tile_async<D, kTileKeys, kMmaThreads>(v_dst, v + key0 * row_stride, row_stride, rows);
      }
    }
    commit_async();  // an empty group past the last tile keeps the counting simple
  };
#pragma unroll
  for (int tile = 0; tile < kStages - 1; ++tile) load_tile(tile);

  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // log2 units; own columns
  const float scale_log2 = args.softmax_scale * kLog2e;
  uint32_t q_frag[D / 16][4];

  for (int tile = 0; tile < num_tiles; ++tile) {
    load_tile(tile + kStages - 1);
    wait_async<kStages - 1>();  // this thread's copies of `tile` (and of Q) have landed
    __syncthreads();            // ... and everyone else's
    if (tile == 0) {
#pragma unroll
      for (int kb = 0; kb < D / 16; ++kb) load_a<D>(q_frag[kb], q_tile, 0, kb);
    }
    const int stage = tile % kStages;
    const uint4* k_tile = k_tiles + stage * S::kTileChunks;
    const uint4* v_tile = v_tiles + stage * S::kTileChunks;
    const int key0 = warp * kWarpKeys;  // the warp's keys within the tile

    float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kb = 0; kb < D / 16; ++kb) {
      uint32_t kf[4];
      load_b_rows<D>(kf, k_tile, key0, kb);
      Mma<T>::run(sc[0], q_frag[kb], kf[0], kf[1]);
      Mma<T>::run(sc[1], q_frag[kb], kf[2], kf[3]);
    }
    // Scores in log2 units; keys at or past the split's end are invisible.
    const int64_t valid_keys = end - begin - int64_t(tile) * kTileKeys - key0;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int column = nt * 8 + 2 * t + (e & 1);
        sc[nt][e] = column < valid_keys ? sc[nt][e] * scale_log2 : -INFINITY;
      }
    }
    float rescale[2];
    online_softmax(sc, row_max, row_sum, rescale);
    scale_rows(o, rescale);
    uint32_t p[4];
    c_to_a<T>(p, sc[0], sc[1]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t vf[4];
      load_b_columns<D>(vf, v_tile, key0, dp);
      Mma<T>::run(o[2 * dp], p, vf[0], vf[1]);
      Mma<T>::run(o[2 * dp + 1], p, vf[2], vf[3]);
    }
    __syncthreads();  // the stage is refilled by the next iteration's load
  }
  wait_async<0>();
  __syncthreads();  // tile memory is reused below

  // Each warp's state of its rows into shared memory: the output columns,
  // then (max, sum) with the sum over the quad's columns.
  float* merge_out = reinterpret_cast<float*>(tile_storage);             // [warps][16][D]
  float* merge_stats = merge_out + kMmaWarps * kGroupRows * D;            // [warps][16][2]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    float* row_g = merge_out + (warp * kGroupRows + g) * D + dt * 8 + 2 * t;
    row_g[0] = o[dt][0];
    row_g[1] = o[dt][1];
    row_g[8 * D] = o[dt][2];
    row_g[8 * D + 1] = o[dt][3];
  }
  if (t == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      merge_stats[(warp * kGroupRows + g + 8 * r) * 2] = row_max[r];
      merge_stats[(warp * kGroupRows + g + 8 * r) * 2 + 1] = row_sum[r];
    }
  }
  __syncthreads();

  // The split's partial of each of the group's rows: output unnormalised,
  // max in natural-log units (the combine kernel's), sum.
  for (int i = threadIdx.x; i < group * D; i += kMmaThreads) {
    const int r = i / D, d = i % D;
    float best = -INFINITY;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) best = fmaxf(best, merge_stats[(w * kGroupRows + r) * 2]);
    float value = 0.f, total = 0.f;
    if (best != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kMmaWarps; ++w) {
        const float weight = exp2_fast(merge_stats[(w * kGroupRows + r) * 2] - best);  // -inf -> 0
        value = fmaf(weight, merge_out[(w * kGroupRows + r) * D + d], value);
        total = fmaf(weight, merge_stats[(w * kGroupRows + r) * 2 + 1], total);
      }
    }
    const int64_t row = (int64_t(b) * args.q_heads + h0 + r) * args.num_splits + split;
    args.partial_out[row * D + d] = value;
    if (d == 0) {
      args.partial_stats[row * 2] = best == -INFINITY ? -INFINITY : best * kLn2;
      args.partial_stats[row * 2 + 1] = total;
    }
  }
}

template <typename T, int D>
cudaError_t launch_mma(const DecodeArgs& args, cudaStream_t stream) {
  constexpr size_t shared = MmaDecodeShape<T, D>::kSharedBytes;
  // Set on every launch (a cheap host call), not once per process: the
  // attribute is per device, and one process may drive several GPUs.
  if (cudaError_t e = cudaFuncSetAttribute(decode_mma_kernel<T, D>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
      e != cudaSuccess)
    return e;
  const dim3 grid(unsigned(args.num_splits), unsigned(args.kv_heads), unsigned(args.batch));
  decode_mma_kernel<T, D><<<grid, kMmaThreads, shared, stream>>>(args);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  return decode_split::launch_combine<T>(args, stream);
}

template <typename T>
cudaError_t launch_mma_dim(const DecodeArgs& args, cudaStream_t stream) {
  return args.head_dim == 64 ? launch_mma<T, 64>(args, stream) : launch_mma<T, 128>(args, stream);
}

}  // namespace

bool decode_mma_supported(const DecodeParams& p) {
  return (p.dtype == ElementType::kBF16 || p.dtype == ElementType::kF16) &&
         (p.head_dim == 64 || p.head_dim == 128) && p.group() <= kGroupRows;
}

cudaError_t decode_attention_mma(const DecodeParams& p, int64_t num_splits, float* workspace,
                                 cudaStream_t stream) {
  if (!decode_mma_supported(p) || num_splits > decode_split::kMaxSplitsInShared ||
      decode_keys_per_split(p, num_splits) % kTileKeys != 0) {
    return cudaErrorInvalidValue;
  }
  const DecodeArgs args =
      decode_split::make_args(p, num_splits, decode_keys_per_split(p, num_splits), 1, workspace);
  return p.dtype == ElementType::kBF16 ? launch_mma_dim<__nv_bfloat16>(args, stream)
                                       : launch_mma_dim<__half>(args, stream);
}

}  // namespace cuda
}  // namespace fastattn
