// FlashAttention-2 style backward on sm80+ (see attention_backward.h), in
// three kernels on one stream:
//
//   delta_kernel  delta_i = rowsum(dO_i * O_i) - dlse_i (one warp per row).
//   dkdv_kernel   a CTA owns 64 keys of one kv head (4 warps x 16 keys, dK
//                 and dV accumulators in registers) and walks the visible q
//                 tiles of every q head of its GQA group: S^T = K Q^T,
//                 P^T = exp(S^T - lse), dP^T = V dO^T, dS^T = P^T (dP^T -
//                 delta); dV += P^T dO, dK += dS^T Q. Q, dO, lse and delta
//                 tiles stream through two cp.async buffers.
//   dq_kernel     a CTA owns 64 queries of one q head and walks the visible
//                 kv tiles: S, P, dP and dS as above (rows = queries), dQ +=
//                 dS K. Q in registers, K and V double-buffered.
//
// Why two passes instead of FlashAttention-2's one pass with atomic dQ
// adds: float atomics make dQ depend on the order CTAs finish; here every
// sum runs in a fixed order, so gradients are bitwise reproducible, at the
// price of recomputing S and dP in the dQ pass (7 instead of 5 matmuls).
//
// Scores live in registers as m16n8k16 C fragments and feed the next mma as
// A fragments (c_to_a), as in the forward kernel; P and dS never touch
// shared memory. Fully masked rows (lse = -inf) get P = 0, never NaN.
#include "attention_backward.h"
#include "sm80_tiles.h"

namespace fastattn {
namespace cuda {
namespace {

using namespace sm80;

constexpr int kBq = kBackwardTileQ;
constexpr int kBk = kBackwardTileKv;
constexpr int kThreads = 128;

template <int D, typename T>
__global__ void __launch_bounds__(256) delta_kernel(const BackwardParams p, float* delta) {
  const AttentionShape& s = p.shape;
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);  // over [B, Sq, Hq]
  if (row >= s.batch * s.q_len * s.q_heads) return;
  const int64_t head = row % s.q_heads, position = row / s.q_heads % s.q_len;
  const int64_t batch = row / (s.q_heads * s.q_len);
  constexpr int kPerLane = D / 32;  // 2 or 4 elements: one 4- or 8-byte load
  const T* out = static_cast<const T*>(p.out) + row * D + lane * kPerLane;
  const T* d_out = static_cast<const T*>(p.d_out) + row * D + lane * kPerLane;
  float dot = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) dot += float(out[i]) * float(d_out[i]);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
  if (lane == 0) {
    const int64_t at = (batch * s.q_heads + head) * s.q_len + position;
    delta[at] = dot - (p.d_lse != nullptr ? p.d_lse[at] : 0.f);
  }
}

// Keys per warp: 16, queries per step: a whole q tile of 64. (Two steps of
// 32 queries, fewer live registers at D=128, measured 5 % slower on an H100:
// each K/V fragment then fed half as many mmas.)
template <int D, typename T>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const BackwardParams p,
                                                        const float* delta) {
  extern __shared__ uint4 shared[];
  uint4* k_tile = shared;                     // [kBk][D]
  uint4* v_tile = k_tile + kBk * D / 8;       // [kBk][D]
  uint4* q_tiles = v_tile + kBk * D / 8;      // [2][kBq][D]
  uint4* do_tiles = q_tiles + 2 * kBq * D / 8;  // [2][kBq][D]
  float* lse_rows = reinterpret_cast<float*>(do_tiles + 2 * kBq * D / 8);  // [2][kBq]
  float* delta_rows = lse_rows + 2 * kBq;                                  // [2][kBq]

  const AttentionShape& s = p.shape;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t kv_block = blockIdx.x;  // early key tiles see the most queries under causal: first
  const int64_t kv_head = blockIdx.y, batch = blockIdx.z;
  const int64_t group = s.q_heads / s.kv_heads;
  const int64_t q_stride = s.q_heads * D, kv_stride = s.kv_heads * D;
  const int64_t kv0 = kv_block * kBk;
  const int64_t num_q = (s.q_len + kBq - 1) / kBq, num_kv = gridDim.x;
  const int warp_key = warp * 16;

  const T* k = static_cast<const T*>(p.k) + (batch * s.kv_len * s.kv_heads + kv_head) * D;
  const T* v = static_cast<const T*>(p.v) + (batch * s.kv_len * s.kv_heads + kv_head) * D;
  load_tile_async<D, kBk, kThreads>(k_tile, k + kv0 * kv_stride, kv_stride, s.kv_len - kv0);
  load_tile_async<D, kBk, kThreads>(v_tile, v + kv0 * kv_stride, kv_stride, s.kv_len - kv0);
  commit_async();

  // Work items: (q head of the group, q tile), q tiles inner.
  const int64_t num_items = group * num_q;
  auto class_of = [&](int64_t item) {
    const int64_t head = kv_head * group + item / num_q;
    return class_row(p.mask, batch, head, item % num_q, num_q, num_kv)[kv_block];
  };
  auto next_item = [&](int64_t from) {
    while (from < num_items && class_of(from) == kEmpty) ++from;
    return from;
  };
  auto load_q_side = [&](int64_t item, int stage) {
    const int64_t head = kv_head * group + item / num_q, q0 = item % num_q * kBq;
    const int64_t offset = (batch * s.q_len + q0) * s.q_heads * D + head * D;
    load_tile_async<D, kBq, kThreads>(q_tiles + stage * kBq * D / 8,
                                      static_cast<const T*>(p.q) + offset, q_stride, s.q_len - q0);
    load_tile_async<D, kBq, kThreads>(do_tiles + stage * kBq * D / 8,
                                      static_cast<const T*>(p.d_out) + offset, q_stride,
                                      s.q_len - q0);
    // Threads 0-63 fetch lse, 64-127 delta; rows past Sq read as 0 (their Q
    // and dO rows are 0 too, so they add nothing to dK and dV).
    const int row = threadIdx.x & (kBq - 1);
    const bool valid = q0 + row < s.q_len;
    const int64_t at = (batch * s.q_heads + head) * s.q_len + q0 + row;
    const float* from = threadIdx.x < kBq ? p.lse + at : delta + at;
    float* to = (threadIdx.x < kBq ? lse_rows : delta_rows) + stage * kBq + row;
    copy4_async(shared_address(to), valid ? from : p.lse, valid);
  };

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) dk[dt][i] = dv[dt][i] = 0.f;
  }
  const float scale_log2 = p.softmax_scale * kLog2e;
  int64_t item = next_item(0);
  if (item < num_items) load_q_side(item, 0);
  commit_async();
  int stage = 0;

  while (item < num_items) {
    const int64_t next = next_item(item + 1);
    if (next < num_items) load_q_side(next, stage ^ 1);
    commit_async();
    wait_async<1>();
    __syncthreads();
    const int64_t head = kv_head * group + item / num_q, q0 = item % num_q * kBq;
    const uint4* q_tile = q_tiles + stage * kBq * D / 8;
    const uint4* do_tile = do_tiles + stage * kBq * D / 8;
    const float* lse_tile = lse_rows + stage * kBq;
    const float* delta_tile = delta_rows + stage * kBq;
    const bool masked = class_of(item) != kFull;

    float st[kBq / 8][4], dpt[kBq / 8][4];  // S^T and dP^T: keys x queries
#pragma unroll
    for (int nt = 0; nt < kBq / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) st[nt][i] = dpt[nt][i] = 0.f;
    }
#pragma unroll
    for (int kb = 0; kb < D / 16; ++kb) {
      uint32_t k_frag[4], v_frag[4];
      load_a<D>(k_frag, k_tile, warp_key, kb);
      load_a<D>(v_frag, v_tile, warp_key, kb);
#pragma unroll
      for (int np = 0; np < kBq / 16; ++np) {
        uint32_t b[4];
        load_b_rows<D>(b, q_tile, np * 16, kb);
        Mma<T>::run(st[2 * np], k_frag, b[0], b[1]);
        Mma<T>::run(st[2 * np + 1], k_frag, b[2], b[3]);
        load_b_rows<D>(b, do_tile, np * 16, kb);
        Mma<T>::run(dpt[2 * np], v_frag, b[0], b[1]);
        Mma<T>::run(dpt[2 * np + 1], v_frag, b[2], b[3]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < kBq / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) st[nt][i] *= scale_log2;
    }
    mask_scores<kBq / 8, true>(st, s, p.mask, p.bias, batch, head, kv0 + warp_key, q0, masked);
#pragma unroll
    for (int nt = 0; nt < kBq / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int column = nt * 8 + 2 * t + (i & 1);  // query in the tile
        const float prob = exp2_fast(st[nt][i] - lse_log2(lse_tile[column]));
        const float d_score = prob * (dpt[nt][i] - delta_tile[column]);
        if (p.d_bias != nullptr) {
          const int64_t qi = q0 + column, kj = kv0 + warp_key + g + 8 * (i >> 1);
          if (qi < s.q_len && kj < s.kv_len) {
            p.d_bias[((batch * s.q_heads + head) * s.q_len + qi) * s.kv_len + kj] = d_score;
          }
        }
        st[nt][i] = prob;
        dpt[nt][i] = d_score;
      }
    }
    // dV += P^T dO and dK += dS^T Q: queries are the k dimension.
#pragma unroll
    for (int kb = 0; kb < kBq / 16; ++kb) {
      uint32_t p_frag[4], ds_frag[4];
      c_to_a<T>(p_frag, st[2 * kb], st[2 * kb + 1]);
      c_to_a<T>(ds_frag, dpt[2 * kb], dpt[2 * kb + 1]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        load_b_columns<D>(b, do_tile, kb * 16, dp);
        Mma<T>::run(dv[2 * dp], p_frag, b[0], b[1]);
        Mma<T>::run(dv[2 * dp + 1], p_frag, b[2], b[3]);
        load_b_columns<D>(b, q_tile, kb * 16, dp);
        Mma<T>::run(dk[2 * dp], ds_frag, b[0], b[1]);
        Mma<T>::run(dk[2 * dp + 1], ds_frag, b[2], b[3]);
      }
    }
    __syncthreads();  // this stage's buffers may be refilled next iteration
    stage ^= 1;
    item = next;
  }

  // Keys past Skv are not stored (their rows were zero-filled loads).
  T* d_k = static_cast<T*>(p.d_k) + (batch * s.kv_len * s.kv_heads + kv_head) * D;
  T* d_v = static_cast<T*>(p.d_v) + (batch * s.kv_len * s.kv_heads + kv_head) * D;
  store_key_rows<D>(dk, dv, d_k, d_v, kv_stride, kv0 + warp_key + g, s.kv_len, t,
                    p.softmax_scale);
}

template <int D, typename T>
__global__ void __launch_bounds__(kThreads) dq_kernel(const BackwardParams p,
                                                      const float* delta) {
  extern __shared__ uint4 shared[];
  uint4* q_tile = shared;                       // [kBq][D]
  uint4* do_tile = q_tile + kBq * D / 8;        // [kBq][D]
  uint4* k_tiles = do_tile + kBq * D / 8;       // [2][kBk][D]
  uint4* v_tiles = k_tiles + 2 * kBk * D / 8;   // [2][kBk][D]

  const AttentionShape& s = p.shape;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t q_block = gridDim.x - 1 - blockIdx.x;  // heavier (causal) tiles first
  const int64_t head = blockIdx.y, batch = blockIdx.z;
  const int64_t kv_head = head / (s.q_heads / s.kv_heads);
  const int64_t q_stride = s.q_heads * D, kv_stride = s.kv_heads * D;
  const int64_t q0 = q_block * kBq;
  const int warp_row = warp * 16;
  const int64_t q_offset = (batch * s.q_len * s.q_heads + head) * D;
  const T* k = static_cast<const T*>(p.k) + (batch * s.kv_len * s.kv_heads + kv_head) * D;
  const T* v = static_cast<const T*>(p.v) + (batch * s.kv_len * s.kv_heads + kv_head) * D;

  const int64_t num_kv = (s.kv_len + kBk - 1) / kBk;
  const int8_t* classes = class_row(p.mask, batch, head, q_block, gridDim.x, num_kv);
  auto next_tile = [&](int64_t from) { return next_visible(classes, from, num_kv); };
  auto load_kv = [&](int64_t tile, int stage) {
    const int64_t kv0 = tile * kBk;
    load_tile_async<D, kBk, kThreads>(k_tiles + stage * kBk * D / 8, k + kv0 * kv_stride,
                                      kv_stride, s.kv_len - kv0);
    load_tile_async<D, kBk, kThreads>(v_tiles + stage * kBk * D / 8, v + kv0 * kv_stride,
                                      kv_stride, s.kv_len - kv0);
  };

  load_tile_async<D, kBq, kThreads>(q_tile, static_cast<const T*>(p.q) + q_offset + q0 * q_stride,
                                    q_stride, s.q_len - q0);
  load_tile_async<D, kBq, kThreads>(do_tile,
                                    static_cast<const T*>(p.d_out) + q_offset + q0 * q_stride,
                                    q_stride, s.q_len - q0);
  int64_t tile = next_tile(0);
  if (tile < num_kv) load_kv(tile, 0);
  commit_async();
  wait_async<0>();
  __syncthreads();

  uint32_t q_frag[D / 16][4];
#pragma unroll
  for (int kb = 0; kb < D / 16; ++kb) load_a<D>(q_frag[kb], q_tile, warp_row, kb);
  float row_lse[2], row_delta[2];
  const int64_t row_at = (batch * s.q_heads + head) * s.q_len;
  load_row_stats(p.lse + row_at, delta + row_at, q0 + warp_row + g, s.q_len, row_lse, row_delta);
  float dq[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;
  const float scale_log2 = p.softmax_scale * kLog2e;
  int stage = 0;

  while (tile < num_kv) {
    const int64_t next = next_tile(tile + 1);
    if (next < num_kv) load_kv(next, stage ^ 1);
    commit_async();
    wait_async<1>();
    __syncthreads();
    const uint4* k_tile = k_tiles + stage * kBk * D / 8;
    const uint4* v_tile = v_tiles + stage * kBk * D / 8;
    const int64_t kv0 = tile * kBk;

    float sc[kBk / 8][4], dps[kBk / 8][4];  // S and dP: queries x keys
#pragma unroll
    for (int nt = 0; nt < kBk / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) sc[nt][i] = dps[nt][i] = 0.f;
    }
#pragma unroll
    for (int kb = 0; kb < D / 16; ++kb) {
      uint32_t do_frag[4];
      load_a<D>(do_frag, do_tile, warp_row, kb);
#pragma unroll
      for (int np = 0; np < kBk / 16; ++np) {
        uint32_t b[4];
        load_b_rows<D>(b, k_tile, np * 16, kb);
        Mma<T>::run(sc[2 * np], q_frag[kb], b[0], b[1]);
        Mma<T>::run(sc[2 * np + 1], q_frag[kb], b[2], b[3]);
        load_b_rows<D>(b, v_tile, np * 16, kb);
        Mma<T>::run(dps[2 * np], do_frag, b[0], b[1]);
        Mma<T>::run(dps[2 * np + 1], do_frag, b[2], b[3]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < kBk / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) sc[nt][i] *= scale_log2;
    }
    const bool masked = classes[tile] != kFull || kv0 + kBk > s.kv_len;
    mask_scores<kBk / 8, false>(sc, s, p.mask, p.bias, batch, head, q0 + warp_row, kv0, masked);
#pragma unroll
    for (int nt = 0; nt < kBk / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float prob = exp2_fast(sc[nt][i] - row_lse[i >> 1]);
        dps[nt][i] = prob * (dps[nt][i] - row_delta[i >> 1]);
      }
    }
    // dQ += dS K: keys are the k dimension.
#pragma unroll
    for (int kb = 0; kb < kBk / 16; ++kb) {
      uint32_t ds_frag[4];
      c_to_a<T>(ds_frag, dps[2 * kb], dps[2 * kb + 1]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        load_b_columns<D>(b, k_tile, kb * 16, dp);
        Mma<T>::run(dq[2 * dp], ds_frag, b[0], b[1]);
        Mma<T>::run(dq[2 * dp + 1], ds_frag, b[2], b[3]);
      }
    }
    __syncthreads();
    stage ^= 1;
    tile = next;
  }

  store_scaled_rows<D>(dq, static_cast<T*>(p.d_q) + q_offset, q_stride, q0 + warp_row + g,
                       s.q_len, t, p.softmax_scale);
}

template <typename Kernel>
cudaError_t allow_shared(Kernel kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <int D, typename T>
cudaError_t launch_delta(const BackwardParams& p, float* delta, cudaStream_t stream) {
  const int64_t rows = p.shape.batch * p.shape.q_len * p.shape.q_heads;
  delta_kernel<D, T><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(p, delta);
  return cudaGetLastError();
}

template <int D, typename T>
cudaError_t launch(const BackwardParams& p, const float* delta, cudaStream_t stream) {
  const AttentionShape& s = p.shape;
  if (p.d_bias != nullptr) {
    // Tiles the plan skips are never visited: their dBias is 0.
    const size_t bytes = sizeof(float) * s.batch * s.q_heads * s.q_len * s.kv_len;
    if (cudaError_t e = cudaMemsetAsync(p.d_bias, 0, bytes, stream); e != cudaSuccess) return e;
  }
  const int dkdv_bytes = (2 * kBk + 4 * kBq) * D * 2 + 4 * kBq * int(sizeof(float));
  if (cudaError_t e = allow_shared(dkdv_kernel<D, T>, dkdv_bytes); e != cudaSuccess) return e;
  const dim3 kv_grid(static_cast<unsigned>(s.num_kv_tiles(kBk)),
                     static_cast<unsigned>(s.kv_heads), static_cast<unsigned>(s.batch));
  dkdv_kernel<D, T><<<kv_grid, kThreads, dkdv_bytes, stream>>>(p, delta);
  const int dq_bytes = (2 * kBq + 4 * kBk) * D * 2;
  if (cudaError_t e = allow_shared(dq_kernel<D, T>, dq_bytes); e != cudaSuccess) return e;
  const dim3 q_grid(static_cast<unsigned>(s.num_q_tiles(kBq)), static_cast<unsigned>(s.q_heads),
                    static_cast<unsigned>(s.batch));
  dq_kernel<D, T><<<q_grid, kThreads, dq_bytes, stream>>>(p, delta);
  return cudaGetLastError();
}

}  // namespace

bool backward_supported(const BackwardParams& params) {
  return (params.dtype == ElementType::kBF16 || params.dtype == ElementType::kF16) &&
         (params.shape.head_dim == 64 || params.shape.head_dim == 128) &&
         params.mask.tile_q == kBackwardTileQ && params.mask.tile_kv == kBackwardTileKv;
}

cudaError_t attention_backward_delta(const BackwardParams& params, float* delta,
                                     cudaStream_t stream) {
  const bool bf16 = params.dtype == ElementType::kBF16;
  if (params.shape.head_dim == 64) {
    return bf16 ? launch_delta<64, __nv_bfloat16>(params, delta, stream)
                : launch_delta<64, __half>(params, delta, stream);
  }
  return bf16 ? launch_delta<128, __nv_bfloat16>(params, delta, stream)
              : launch_delta<128, __half>(params, delta, stream);
}

cudaError_t attention_backward_mma_sync(const BackwardParams& params, const float* delta,
                                        cudaStream_t stream) {
  const bool bf16 = params.dtype == ElementType::kBF16;
  if (params.shape.head_dim == 64) {
    return bf16 ? launch<64, __nv_bfloat16>(params, delta, stream)
                : launch<64, __half>(params, delta, stream);
  }
  return bf16 ? launch<128, __nv_bfloat16>(params, delta, stream)
              : launch<128, __half>(params, delta, stream);
}

}  // namespace cuda
}  // namespace fastattn
