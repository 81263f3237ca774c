// FlashAttention-2 style forward on sm80+: mma.sync m16n8k16 (bf16/f16 in,
// f32 accumulate), ldmatrix, cp.async double buffering. See attention.h.
//
// A CTA owns 64 query rows of one (batch, q head): 4 warps x 16 rows, the
// warp's Q fragments in registers for the whole kernel. It walks the key
// tiles of 64 keys that the mask plan did not classify empty (tiling-mask);
// the element-wise mask runs only in partial tiles and at the sequence end.
// K and V tiles stream through two shared-memory buffers: tile j + 1 loads
// (cp.async) while tile j is computed. S = Q K^T stays in registers; its C
// fragments are, two n8 tiles at a time, the A fragments of P V, so P never
// leaves registers. At D=64, and at D=128 under the band mask alone, the
// tall kernel below runs instead: FlashAttention-2's 128 x 64 tile (4
// warps x 32 rows, Q fragments from shared memory, single K and V
// buffers), 13-19 % faster on an H100 (keeping Q in registers with double
// buffers at 32 rows per warp spills registers). At D=256 the O
// accumulator alone takes 128 registers per thread, so Q fragments are
// read from shared memory per k step instead of living in registers, and
// the 160 KiB of tiles leave one CTA per SM.
#include "attention.h"
#include "sm80_tiles.h"

namespace fastattn {
namespace cuda {
namespace {

using namespace sm80;

constexpr int kBr = kForwardTileQ;
constexpr int kBc = kForwardTileKv;
constexpr int kThreads = 128;

// Row 0 of one (batch, q head) in q and of its K/V head (GQA by index) in
// k and v, and their row strides ([B, S, H, D] layout).
template <int D, typename T>
struct HeadRows {
  const T *q, *k, *v;
  int64_t q_stride, kv_stride;
  __device__ __forceinline__ HeadRows(const ForwardParams& p, int64_t batch, int64_t head) {
    const AttentionShape& s = p.shape;
    const int64_t kv_head = head / (s.q_heads / s.kv_heads);
    q_stride = s.q_heads * D;
    kv_stride = s.kv_heads * D;
    q = static_cast<const T*>(p.q) + (batch * s.q_len * s.q_heads + head) * D;
    k = static_cast<const T*>(p.k) + (batch * s.kv_len * s.kv_heads + kv_head) * D;
    v = static_cast<const T*>(p.v) + (batch * s.kv_len * s.kv_heads + kv_head) * D;
  }
};

template <int D, typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardParams p) {
  extern __shared__ uint4 shared[];
  uint4* q_tile = shared;                       // [kBr][D]
  uint4* k_tiles = q_tile + kBr * D / 8;        // [2][kBc][D]
  uint4* v_tiles = k_tiles + 2 * kBc * D / 8;   // [2][kBc][D]

  const AttentionShape& s = p.shape;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  // Heavier (later, under a causal mask) query tiles first.
  const int64_t q_block = gridDim.x - 1 - blockIdx.x;
  const int64_t head = blockIdx.y, batch = blockIdx.z;
  const HeadRows<D, T> rows(p, batch, head);
  const int64_t q_stride = rows.q_stride, kv_stride = rows.kv_stride;
  const int64_t q0 = q_block * kBr;
  const int warp_row = warp * 16;
  const T *q = rows.q, *k = rows.k, *v = rows.v;

  const int64_t num_kv = (s.kv_len + kBc - 1) / kBc;
  const int8_t* classes = class_row(p.mask, batch, head, q_block, gridDim.x, num_kv);
  auto next_tile = [&](int64_t from) { return next_visible(classes, from, num_kv); };
  auto load_kv = [&](int64_t tile, int stage) {
    const int64_t kv0 = tile * kBc;
    load_tile_async<D, kBc, kThreads>(k_tiles + stage * kBc * D / 8, k + kv0 * kv_stride,
                                      kv_stride, s.kv_len - kv0);
    load_tile_async<D, kBc, kThreads>(v_tiles + stage * kBc * D / 8, v + kv0 * kv_stride,
                                      kv_stride, s.kv_len - kv0);
  };

  load_tile_async<D, kBr, kThreads>(q_tile, q + q0 * q_stride, q_stride, s.q_len - q0);
  int64_t tile = next_tile(0);
  if (tile < num_kv) load_kv(tile, 0);
  commit_async();
  wait_async<0>();
  __syncthreads();

  constexpr bool kQInRegisters = D <= 128;
  constexpr int kKeys = D <= 128 ? kBc : 32;
  uint32_t q_frag[kQInRegisters ? D / 16 : 1][4];
  if constexpr (kQInRegisters) {
#pragma unroll
    for (int kb = 0; kb < D / 16; ++kb) load_a<D>(q_frag[kb], q_tile, warp_row, kb);
  }

  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // row_sum: own columns
  const float scale_log2 = p.softmax_scale * kLog2e;
  int stage = 0;

  while (tile < num_kv) {
    const int64_t next = next_tile(tile + 1);
    if (next < num_kv) load_kv(next, stage ^ 1);
    commit_async();
    wait_async<1>();
    __syncthreads();
    const uint4* k_tile = k_tiles + stage * kBc * D / 8;
    const uint4* v_tile = v_tiles + stage * kBc * D / 8;
    const int64_t kv0 = tile * kBc;

    const bool masked = classes[tile] != kFull || kv0 + kBc > s.kv_len;
    // Keys of the tile in slices of kKeys (the whole tile but at D=256,
    // where O's 128 registers leave room for scores of 32 keys only).
#pragma unroll 1
    for (int slice = 0; slice < kBc / kKeys; ++slice) {
      const int key0 = slice * kKeys;
      float sc[kKeys / 8][4];
#pragma unroll
      for (int nt = 0; nt < kKeys / 8; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll kQInRegisters ? D / 16 : 4
      for (int kb = 0; kb < D / 16; ++kb) {
        uint32_t q_shared[4];
        if constexpr (!kQInRegisters) load_a<D>(q_shared, q_tile, warp_row, kb);
        const uint32_t* a = kQInRegisters ? q_frag[kQInRegisters ? kb : 0] : q_shared;
#pragma unroll
        for (int np = 0; np < kKeys / 16; ++np) {
          uint32_t b[4];
          load_b_rows<D>(b, k_tile, key0 + np * 16, kb);
          Mma<T>::run(sc[2 * np], a, b[0], b[1]);
          Mma<T>::run(sc[2 * np + 1], a, b[2], b[3]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < kKeys / 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) sc[nt][i] *= scale_log2;
      mask_scores<kKeys / 8, false>(sc, s, p.mask, p.bias, batch, head, q0 + warp_row,
                                    kv0 + key0, masked);

      float rescale[2];
      online_softmax(sc, row_max, row_sum, rescale);
      scale_rows(o, rescale);

      // O += P V, P straight from the score registers.
#pragma unroll
      for (int kb = 0; kb < kKeys / 16; ++kb) {
        uint32_t a[4];
        c_to_a<T>(a, sc[2 * kb], sc[2 * kb + 1]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t b[4];
          load_b_columns<D>(b, v_tile, key0 + kb * 16, dp);
          Mma<T>::run(o[2 * dp], a, b[0], b[1]);
          Mma<T>::run(o[2 * dp + 1], a, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // this stage's buffers may be refilled next iteration
    stage ^= 1;
    tile = next;
  }

  store_output_rows<D>(o, row_max, row_sum,
                       static_cast<T*>(p.out) + (batch * s.q_len * s.q_heads + head) * D,
                       q_stride, p.lse + (batch * s.q_heads + head) * s.q_len, q0 + warp_row + g,
                       s.q_len, t);
}

// FlashAttention-2's tile for D 64/128 (128 x 64, 4 warps of 32 rows):
// each K/V fragment read from shared memory feeds both of a warp's m-tiles,
// so the kernel reads a third less shared memory per flop than the 16-row
// one above; Q fragments come from shared memory per k step. K and V have
// one buffer each, loaded while the other is in use (V of tile j during
// S_j, K of tile j+1 during P_j V_j): 64 KB at D=128, two CTAs per SM on an
// A100. A CTA's 128 rows are two of the plan's 64-row tiles.
constexpr int kTallRows = 128;

template <int D, typename T, bool kBandOnly>
__global__ void __launch_bounds__(kThreads) forward_tall_kernel(const ForwardParams p) {
  extern __shared__ uint4 shared[];
  uint4* q_tile = shared;                        // [kTallRows][D]
  uint4* k_tile = q_tile + kTallRows * D / 8;    // [kBc][D]
  uint4* v_tile = k_tile + kBc * D / 8;          // [kBc][D]

  const AttentionShape& s = p.shape;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t q_block = gridDim.x - 1 - blockIdx.x;  // heavier (causal) blocks first
  const int64_t head = blockIdx.y, batch = blockIdx.z;
  const HeadRows<D, T> rows(p, batch, head);
  const int64_t q_stride = rows.q_stride, kv_stride = rows.kv_stride;
  const int64_t q0 = q_block * kTallRows;
  const int warp_row = warp * 32;
  const T *q = rows.q, *k = rows.k, *v = rows.v;

  const int64_t num_kv = (s.kv_len + kBc - 1) / kBc;
  const int64_t plan_q = (s.q_len + kBr - 1) / kBr;
  const int8_t* upper = class_row(p.mask, batch, head, 2 * q_block, plan_q, num_kv);
  const bool has_lower = 2 * q_block + 1 < plan_q;
  const int8_t* lower = has_lower ? upper + num_kv : upper;  // the next plan row
  const int8_t* mine = warp < 2 ? upper : lower;  // the plan row of this warp's 32 rows
  auto next_tile = [&](int64_t from) {
    while (from < num_kv && upper[from] == kEmpty && lower[from] == kEmpty) ++from;
    return from;
  };
  auto load_rows = [&](uint4* tile, const T* src, int64_t tile_index) {
    const int64_t kv0 = tile_index * kBc;
    load_tile_async<D, kBc, kThreads>(tile, src + kv0 * kv_stride, kv_stride, s.kv_len - kv0);
  };

  int64_t tile = next_tile(0);
  load_tile_async<D, kTallRows, kThreads>(q_tile, q + q0 * q_stride, q_stride, s.q_len - q0);
  if (tile < num_kv) load_rows(k_tile, k, tile);
  commit_async();

  float o[2][D / 8][4];
  float row_max[2][2], row_sum[2][2];  // [m tile][row g / g + 8]; row_sum: own columns
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
    }
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }
  const float scale_log2 = p.softmax_scale * kLog2e;
  // At D=128 with the band mask alone the softmax takes raw scores and
  // folds the scale into its exp2 FFMAs (kernel alone, H100: +1-2 %); at
  // D=64 that measured 9 % slower, so D=64 scales the scores first.
  constexpr bool kRawScores = kBandOnly && D == 128;

  while (tile < num_kv) {
    wait_async<0>();  // K of `tile` (and Q, the first time)
    __syncthreads();  // ... seen by all warps, and V's buffer free
    load_rows(v_tile, v, tile);
    commit_async();
    const int64_t kv0 = tile * kBc;
    const bool masked = mine[tile] != kFull || kv0 + kBc > s.kv_len;

    float sc[2][kBc / 8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < kBc / 8; ++nt) {
        sc[mt][nt][0] = sc[mt][nt][1] = sc[mt][nt][2] = sc[mt][nt][3] = 0.f;
      }
#pragma unroll
    for (int kb = 0; kb < D / 16; ++kb) {
      uint32_t a[2][4];
      load_a<D>(a[0], q_tile, warp_row, kb);
      load_a<D>(a[1], q_tile, warp_row + 16, kb);
#pragma unroll
      for (int np = 0; np < kBc / 16; ++np) {
        uint32_t b[4];
        load_b_rows<D>(b, k_tile, np * 16, kb);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          Mma<T>::run(sc[mt][2 * np], a[mt], b[0], b[1]);
          Mma<T>::run(sc[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      float rescale[2];
      if constexpr (kRawScores) {
        mask_scores<kBc / 8, false, kBandOnly>(sc[mt], s, p.mask, p.bias, batch, head,
                                               q0 + warp_row + mt * 16, kv0, masked);
        online_softmax_raw(sc[mt], row_max[mt], row_sum[mt], rescale, scale_log2);
      } else {
#pragma unroll
        for (int nt = 0; nt < kBc / 8; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) sc[mt][nt][i] *= scale_log2;
        mask_scores<kBc / 8, false, kBandOnly>(sc[mt], s, p.mask, p.bias, batch, head,
                                               q0 + warp_row + mt * 16, kv0, masked);
        online_softmax(sc[mt], row_max[mt], row_sum[mt], rescale);
      }
      scale_rows(o[mt], rescale);
    }

    wait_async<0>();  // V of `tile`
    __syncthreads();  // ... seen by all warps, and K's buffer free
    const int64_t next = next_tile(tile + 1);
    if (next < num_kv) load_rows(k_tile, k, next);
    commit_async();

    // O += P V, P straight from the score registers.
#pragma unroll
    for (int kb = 0; kb < kBc / 16; ++kb) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) c_to_a<T>(a[mt], sc[mt][2 * kb], sc[mt][2 * kb + 1]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        load_b_columns<D>(b, v_tile, kb * 16, dp);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          Mma<T>::run(o[mt][2 * dp], a[mt], b[0], b[1]);
          Mma<T>::run(o[mt][2 * dp + 1], a[mt], b[2], b[3]);
        }
      }
    }
    tile = next;
  }
  wait_async<0>();  // Q's copy, where no tile was visible (nothing may land after exit)

#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    if constexpr (kRawScores) {  // row maxima in log2 units, as store_output_rows takes them
      row_max[mt][0] *= scale_log2;
      row_max[mt][1] *= scale_log2;
    }
    store_output_rows<D>(o[mt], row_max[mt], row_sum[mt],
                         static_cast<T*>(p.out) + (batch * s.q_len * s.q_heads + head) * D,
                         q_stride, p.lse + (batch * s.q_heads + head) * s.q_len,
                         q0 + warp_row + mt * 16 + g, s.q_len, t);
  }
}

// One CTA of kThreads per `rows` query rows of each (batch, q head).
cudaError_t launch_per_q_block(void (*kernel)(ForwardParams), int rows, int shared_bytes,
                               const ForwardParams& p, cudaStream_t stream) {
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           shared_bytes);
      e != cudaSuccess) {
    return e;
  }
  const dim3 grid(static_cast<unsigned>(p.shape.num_q_tiles(rows)),
                  static_cast<unsigned>(p.shape.q_heads), static_cast<unsigned>(p.shape.batch));
  kernel<<<grid, kThreads, shared_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <int D, typename T, bool kBandOnly>
cudaError_t launch_tall(const ForwardParams& p, cudaStream_t stream) {
  return launch_per_q_block(forward_tall_kernel<D, T, kBandOnly>, kTallRows,
                            (kTallRows + 2 * kBc) * D * 2, p, stream);
}

template <int D, typename T>
cudaError_t launch(const ForwardParams& p, cudaStream_t stream) {
  return launch_per_q_block(forward_kernel<D, T>, kBr, (kBr + 4 * kBc) * D * 2, p, stream);
}

template <typename T>
cudaError_t dispatch_dim(const ForwardParams& p, cudaStream_t stream) {
  const bool band_only = forward_band_only(p);
  switch (p.shape.head_dim) {
    case 64:
      return band_only ? launch_tall<64, T, true>(p, stream) : launch_tall<64, T, false>(p, stream);
    case 128:  // the general mask's registers do not fit the tall tile at D=128 (it spills)
      return band_only ? launch_tall<128, T, true>(p, stream) : launch<128, T>(p, stream);
    default: return launch<256, T>(p, stream);
  }
}

}  // namespace

bool forward_supported(const ForwardParams& params) {
  return (params.dtype == ElementType::kBF16 || params.dtype == ElementType::kF16) &&
         (params.shape.head_dim == 64 || params.shape.head_dim == 128 ||
          params.shape.head_dim == 256) &&
         params.mask.tile_q == kForwardTileQ &&
         params.mask.tile_kv == kForwardTileKv;
}

cudaError_t attention_forward_mma_sync(const ForwardParams& params, cudaStream_t stream) {
  if (params.dtype == ElementType::kBF16) return dispatch_dim<__nv_bfloat16>(params, stream);
  return dispatch_dim<__half>(params, stream);
}

}  // namespace cuda
}  // namespace fastattn
