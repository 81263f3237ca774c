// FlashAttention-2 style forward on sm80+: mma.sync m16n8k16 (bf16/f16 in,
// f32 accumulate), ldmatrix, cp.async double buffering. See attention.h.
//
// A CTA owns 64 query rows of one (batch, q head): 4 warps x 16 rows, the
// warp's Q fragments in registers for the whole kernel (a 32-rows-per-warp
// variant, kMTiles = 2, is kept for experiments but not dispatched). It walks the key
// tiles of 64 keys that the mask plan did not classify empty (tiling-mask);
// the element-wise mask runs only in partial tiles and at the sequence end.
// K and V tiles stream through two shared-memory buffers: tile j + 1 loads
// (cp.async) while tile j is computed. S = Q K^T stays in registers; its C
// fragments are, two n8 tiles at a time, exactly the A fragments of P V
// (the m16n8k16 C and A layouts agree), so P never leaves registers.
//
// Shared-memory tiles are rows of D halves in 16-byte chunks; chunk c of row
// r is stored at c ^ (r & 7), so the 8 rows an ldmatrix phase reads hit 8
// different 16-byte bank groups (no bank conflicts), for K (ldmatrix) and V
// (ldmatrix.trans) alike.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attention.h"

namespace fastattn {
namespace cuda {
namespace {

constexpr int kBc = kForwardTileKv;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

__device__ __forceinline__ void copy16_async(uint32_t shared, const void* global, bool valid) {
  // A source size of 0 writes 16 zero bytes and reads nothing.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared), "l"(global),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void copy16_async(uint32_t shared, const void* global) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared), "l"(global));
}

__device__ __forceinline__ void commit_async() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void wait_async() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
};

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
};

__device__ __forceinline__ float exp2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 16-byte chunk `chunk` of tile row `row` (D / 8 chunks per row), swizzled.
template <int D>
__device__ __forceinline__ int chunk_of(int row, int chunk) {
  return row * (D / 8) + (chunk ^ (row & 7));
}

// rows x D elements, row stride in elements, into a swizzled tile; rows at
// or past valid_rows are zero-filled.
template <int D, int kRows, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(uint4* tile, const T* src, int64_t row_stride,
                                                int64_t valid_rows) {
  // A thread copies the same chunk of rows first_row, first_row + kStep, ...;
  // with kStep a multiple of 8 its swizzled column is the same in all of them,
  // so addresses advance by constant strides (no per-row index arithmetic).
  constexpr int kChunks = D / 8;
  constexpr int kStep = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kStep % 8 == 0 && kRows % kStep == 0, "tile shape");
  const int first_row = threadIdx.x / kChunks, chunk = threadIdx.x % kChunks;
  const uint32_t to = shared_address(tile + chunk_of<D>(first_row, chunk));
  const T* const from = src + first_row * row_stride + chunk * 8;
  const int64_t from_step = kStep * row_stride;
  if (valid_rows >= kRows) {  // the common case: no bounds to check
#pragma unroll
    for (int i = 0; i < kRows / kStep; ++i) {
      copy16_async(to + i * kStep * kChunks * 16, from + i * from_step);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < kRows / kStep; ++i) {
    const bool valid = first_row + i * kStep < valid_rows;
    copy16_async(to + i * kStep * kChunks * 16, valid ? from + i * from_step : src, valid);
  }
}

__device__ __forceinline__ bool visible(const ForwardParams& p, int64_t batch, int64_t head,
                                        int64_t i, int64_t j) {
  const MaskParams& m = p.mask;
  if (i >= p.shape.q_len || j >= p.shape.kv_len) return false;
  if (j < i + m.band_lo || j > i + m.band_hi) return false;
  if (m.q_segment != nullptr) {
    const int32_t a = m.q_segment[batch * p.shape.q_len + i];
    const int32_t b = m.kv_segment[batch * p.shape.kv_len + j];
    if (a != b || a < 0) return false;
  }
  if (m.dense != nullptr) {
    const int64_t db = m.dense_batch == 1 ? 0 : batch, dh = m.dense_heads == 1 ? 0 : head;
    if (m.dense[((db * m.dense_heads + dh) * p.shape.q_len + i) * p.shape.kv_len + j] == 0) {
      return false;
    }
  }
  return true;
}

// 4 warps of kMTiles x 16 query rows: the CTA's query tile is 64 * kMTiles.
// With two m-tiles per warp every K/V fragment read from shared memory feeds
// two mmas (half the shared-memory traffic per flop); Q is then re-read
// from shared memory per 16 columns instead of living in registers.
template <int D, int kMTiles, typename T>
__global__ void __launch_bounds__(128) forward_kernel(const ForwardParams p) {
  constexpr int kThreads = 128;
  constexpr int kRowsPerWarp = 16 * kMTiles;
  constexpr int kBr = 4 * kRowsPerWarp;
  constexpr bool kQInRegisters = kMTiles == 1;
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
  const int64_t kv_head = head / (s.q_heads / s.kv_heads);
  const int64_t q_stride = s.q_heads * D, kv_stride = s.kv_heads * D;
  const int64_t q0 = q_block * kBr;
  const int warp_row = warp * kRowsPerWarp;
  const T* q = static_cast<const T*>(p.q) + (batch * s.q_len * s.q_heads + head) * D;
  const T* k = static_cast<const T*>(p.k) + (batch * s.kv_len * s.kv_heads + kv_head) * D;
  const T* v = static_cast<const T*>(p.v) + (batch * s.kv_len * s.kv_heads + kv_head) * D;

  const int64_t num_kv = (s.kv_len + kBc - 1) / kBc;
  const int8_t* classes = p.mask.tile_class +
                          (((p.mask.tile_batch == 1 ? 0 : batch) * p.mask.tile_heads +
                            (p.mask.tile_heads == 1 ? 0 : head)) *
                               gridDim.x +
                           q_block) *
                              num_kv;
  auto next_tile = [&](int64_t from) {
    while (from < num_kv && classes[from] == kEmpty) ++from;
    return from;
  };
  auto load_kv = [&](int64_t tile, int stage) {
    const int64_t kv0 = tile * kBc;
    load_tile_async<D, kBc, kThreads>(k_tiles + stage * kBc * D / 8, k + kv0 * kv_stride,
                                      kv_stride, s.kv_len - kv0);
    load_tile_async<D, kBc, kThreads>(v_tiles + stage * kBc * D / 8, v + kv0 * kv_stride,
                                      kv_stride, s.kv_len - kv0);
  };
  auto q_fragment = [&](uint32_t* a, int mt, int kb) {
    ldmatrix_x4(a, shared_address(q_tile + chunk_of<D>(warp_row + mt * 16 + (lane & 15),
                                                       2 * kb + (lane >> 4))));
  };

  load_tile_async<D, kBr, kThreads>(q_tile, q + q0 * q_stride, q_stride, s.q_len - q0);
  int64_t tile = next_tile(0);
  if (tile < num_kv) load_kv(tile, 0);
  commit_async();
  wait_async<0>();
  __syncthreads();

  // One 16-row warp keeps its Q fragments in registers for the whole kernel.
  uint32_t q_frag[kQInRegisters ? D / 16 : 1][4];
  if constexpr (kQInRegisters) {
#pragma unroll
    for (int kb = 0; kb < D / 16; ++kb) q_fragment(q_frag[kb], 0, kb);
  }

  float o[kMTiles][D / 8][4];
  float row_max[kMTiles][2], row_sum[kMTiles][2];  // row_sum: this thread's columns
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }
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

    float sc[kMTiles][kBc / 8][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kBc / 8; ++nt)
        sc[mt][nt][0] = sc[mt][nt][1] = sc[mt][nt][2] = sc[mt][nt][3] = 0.f;
#pragma unroll
    for (int kb = 0; kb < D / 16; ++kb) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        if constexpr (kQInRegisters) {
#pragma unroll
          for (int i = 0; i < 4; ++i) a[mt][i] = q_frag[kb][i];
        } else {
          q_fragment(a[mt], mt, kb);
        }
      }
#pragma unroll
      for (int np = 0; np < kBc / 16; ++np) {
        uint32_t b[4];
        const int key = np * 16 + (lane & 7) + ((lane >> 4) << 3);
        ldmatrix_x4(b, shared_address(k_tile + chunk_of<D>(key, 2 * kb + ((lane >> 3) & 1))));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          Mma<T>::run(sc[mt][2 * np], a[mt], b[0], b[1]);
          Mma<T>::run(sc[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }

    const bool masked = classes[tile] != kFull || kv0 + kBc > s.kv_len;
    const bool has_bias = p.bias.data != nullptr;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kBc / 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) sc[mt][nt][i] *= scale_log2;
      // One uniform branch around the element-wise work: full tiles without
      // bias (most of them) skip it entirely.
      const bool band_only = p.mask.q_segment == nullptr && p.mask.dense == nullptr && !has_bias;
      if (masked && band_only) {
        // Causal / sliding-window tiles: 32-bit offsets from the tile corner.
        const int64_t corner = kv0 - (q0 + warp_row + mt * 16);
        const int64_t kv_left = s.kv_len - kv0, q_left = s.q_len - (q0 + warp_row + mt * 16);
#pragma unroll
        for (int nt = 0; nt < kBc / 8; ++nt) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int row = g + 8 * (i >> 1), col = nt * 8 + 2 * t + (i & 1);
            const int64_t offset = corner + col - row;  // j - i
            const bool seen = col < kv_left && row < q_left && offset >= p.mask.band_lo &&
                              offset <= p.mask.band_hi;
            if (!seen) sc[mt][nt][i] = -INFINITY;
          }
        }
      } else if (masked || has_bias) {
#pragma unroll
        for (int nt = 0; nt < kBc / 8; ++nt) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int64_t qi = q0 + warp_row + mt * 16 + g + 8 * (i >> 1);
            const int64_t kj = kv0 + nt * 8 + 2 * t + (i & 1);
            float x = sc[mt][nt][i];
            if (has_bias && qi < s.q_len && kj < s.kv_len) {
              const int64_t bb = p.bias.batch == 1 ? 0 : batch, bh = p.bias.heads == 1 ? 0 : head;
              x += p.bias.data[((bb * p.bias.heads + bh) * s.q_len + qi) * s.kv_len + kj] * kLog2e;
            }
            if (masked && !visible(p, batch, head, qi, kj)) x = -INFINITY;
            sc[mt][nt][i] = x;
          }
        }
      }

      // Online softmax for rows g (r = 0) and g + 8 (r = 1) of this m-tile;
      // a row's keys are spread over the 4 lanes of a quad.
      float reference[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float m = row_max[mt][r];
#pragma unroll
        for (int nt = 0; nt < kBc / 8; ++nt) {
          m = fmaxf(m, fmaxf(sc[mt][nt][2 * r], sc[mt][nt][2 * r + 1]));
        }
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        reference[r] = m == -INFINITY ? 0.f : m;  // nothing visible yet: avoid inf - inf
        const float rescale = exp2_fast(row_max[mt][r] - reference[r]);
        row_max[mt][r] = m;
        row_sum[mt][r] *= rescale;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          o[mt][dt][2 * r] *= rescale;
          o[mt][dt][2 * r + 1] *= rescale;
        }
      }
#pragma unroll
      for (int nt = 0; nt < kBc / 8; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          sc[mt][nt][i] = exp2_fast(sc[mt][nt][i] - reference[i >> 1]);
          row_sum[mt][i >> 1] += sc[mt][nt][i];
        }
      }
    }

    // O += P V: two n8 tiles of S form one k16 A fragment of P.
#pragma unroll
    for (int kb = 0; kb < kBc / 16; ++kb) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        a[mt][0] = Mma<T>::pack(sc[mt][2 * kb][0], sc[mt][2 * kb][1]);
        a[mt][1] = Mma<T>::pack(sc[mt][2 * kb][2], sc[mt][2 * kb][3]);
        a[mt][2] = Mma<T>::pack(sc[mt][2 * kb + 1][0], sc[mt][2 * kb + 1][1]);
        a[mt][3] = Mma<T>::pack(sc[mt][2 * kb + 1][2], sc[mt][2 * kb + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        const int key = kb * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
        ldmatrix_x4_trans(b, shared_address(v_tile + chunk_of<D>(key, 2 * dp + (lane >> 4))));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          Mma<T>::run(o[mt][2 * dp], a[mt], b[0], b[1]);
          Mma<T>::run(o[mt][2 * dp + 1], a[mt], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // this stage's buffers may be refilled next iteration
    stage ^= 1;
    tile = next;
  }

  T* out = static_cast<T*>(p.out) + (batch * s.q_len * s.q_heads + head) * D;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float total = row_sum[mt][r];
      total += __shfl_xor_sync(0xffffffffu, total, 1);
      total += __shfl_xor_sync(0xffffffffu, total, 2);
      const int64_t qi = q0 + warp_row + mt * 16 + g + 8 * r;
      if (qi >= s.q_len) continue;
      const float inverse = total > 0.f ? 1.f / total : 0.f;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<uint32_t*>(out + qi * q_stride + dt * 8 + 2 * t) =
            Mma<T>::pack(o[mt][dt][2 * r] * inverse, o[mt][dt][2 * r + 1] * inverse);
      }
      if (t == 0) {
        p.lse[(batch * s.q_heads + head) * s.q_len + qi] =
            total > 0.f ? (row_max[mt][r] + log2f(total)) * kLn2 : -INFINITY;
      }
    }
  }
}

template <int D, int kMTiles, typename T>
cudaError_t launch(const ForwardParams& p, cudaStream_t stream) {
  constexpr int kBr = 64 * kMTiles;
  const int shared_bytes = (kBr + 4 * kBc) * D * 2;
  auto kernel = forward_kernel<D, kMTiles, T>;
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           shared_bytes);
      e != cudaSuccess) {
    return e;
  }
  const dim3 grid(static_cast<unsigned>(p.shape.num_q_tiles(kBr)),
                  static_cast<unsigned>(p.shape.q_heads), static_cast<unsigned>(p.shape.batch));
  kernel<<<grid, 128, shared_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <int kMTiles, typename T>
cudaError_t dispatch_dim(const ForwardParams& p, cudaStream_t stream) {
  return p.shape.head_dim == 64 ? launch<64, kMTiles, T>(p, stream)
                                : launch<128, kMTiles, T>(p, stream);
}

// Only the 16-rows-per-warp variant is dispatched: on an H200 the 32-row
// one (kMTiles = 2) measured slower (D=128: 165 vs 172 TFLOP/s, with spills;
// D=64: 103 vs 162), see docs/BENCHMARKS.md.
template <typename T>
cudaError_t dispatch_tile(const ForwardParams& p, cudaStream_t stream) {
  return dispatch_dim<1, T>(p, stream);
}

}  // namespace

bool forward_supported(const ForwardParams& params) {
  return (params.dtype == ElementType::kBF16 || params.dtype == ElementType::kF16) &&
         (params.shape.head_dim == 64 || params.shape.head_dim == 128) &&
         params.mask.tile_q == kForwardTileQ &&
         params.mask.tile_kv == kForwardTileKv;
}

cudaError_t attention_forward(const ForwardParams& params, cudaStream_t stream) {
  if (params.dtype == ElementType::kBF16) return dispatch_tile<__nv_bfloat16>(params, stream);
  return dispatch_tile<__half>(params, stream);
}

}  // namespace cuda
}  // namespace fastattn
