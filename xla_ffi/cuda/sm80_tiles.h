// Device building blocks of the sm80+ attention kernels (forward and
// backward): cp.async tile loads into XOR-swizzled shared memory, ldmatrix,
// mma.sync m16n8k16 and the element-wise mask of an accumulator block.
// nvcc only: included by the attention (forward, backward, sm90a) and decode
// kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/attention_params.h"

namespace fastattn {
namespace cuda {
namespace sm80 {

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

// 4 bytes (a float of an lse or delta row, which need not be 16-byte
// aligned); invalid ones become 0.
__device__ __forceinline__ void copy4_async(uint32_t shared, const void* global, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared), "l"(global),
               "r"(valid ? 4 : 0));
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

// The m16n8k16 C fragments of two adjacent n8 tiles are, packed to 16 bits,
// exactly the A fragment of one k16 step (the C and A layouts agree), so a
// product like P V takes P straight from the registers of S.
template <typename T>
__device__ __forceinline__ void c_to_a(uint32_t* a, const float* left, const float* right) {
  a[0] = Mma<T>::pack(left[0], left[1]);
  a[1] = Mma<T>::pack(left[2], left[3]);
  a[2] = Mma<T>::pack(right[0], right[1]);
  a[3] = Mma<T>::pack(right[2], right[3]);
}

__device__ __forceinline__ float exp2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 16-byte chunk `chunk` of tile row `row` (D / 8 chunks per row), swizzled:
// chunk c of row r is stored at c ^ (r & 7), so the 8 rows an ldmatrix phase
// reads hit 8 different 16-byte bank groups, for ldmatrix and
// ldmatrix.trans alike.
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
  static_assert(kThreads % kChunks == 0 && kRows % kStep == 0, "tile shape");
  const int first_row = threadIdx.x / kChunks, chunk = threadIdx.x % kChunks;
  if constexpr (kStep % 8 != 0) {  // D = 256: the swizzled column changes from row to row
#pragma unroll
    for (int i = 0; i < kRows / kStep; ++i) {
      const int row = first_row + i * kStep;
      const bool valid = row < valid_rows;
      copy16_async(shared_address(tile + chunk_of<D>(row, chunk)),
                   valid ? src + row * row_stride + chunk * 8 : src, valid);
    }
    return;
  }
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

// A fragment (16 rows x 16 columns kb*16..) of a swizzled [rows][D] tile for
// the warp's rows first_row..first_row+15 (Q or dO rows, or K/V rows).
template <int D>
__device__ __forceinline__ void load_a(uint32_t* a, const uint4* tile, int first_row, int kb) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(a, shared_address(tile + chunk_of<D>(first_row + (lane & 15), 2 * kb + (lane >> 4))));
}

// B fragments of two n8 tiles when the tile's rows are the n dimension
// (S = Q K^T reads K rows): columns kb*16.. of rows first_row..+15.
template <int D>
__device__ __forceinline__ void load_b_rows(uint32_t* b, const uint4* tile, int first_row, int kb) {
  const int lane = threadIdx.x & 31;
  const int row = first_row + (lane & 7) + ((lane >> 4) << 3);
  ldmatrix_x4(b, shared_address(tile + chunk_of<D>(row, 2 * kb + ((lane >> 3) & 1))));
}

// B fragments of two n8 tiles when the tile's rows are the k dimension
// (O = P V reads V rows as k): rows first_row..+15, columns 16*dp...
template <int D>
__device__ __forceinline__ void load_b_columns(uint32_t* b, const uint4* tile, int first_row,
                                               int dp) {
  const int lane = threadIdx.x & 31;
  const int row = first_row + (lane & 7) + (((lane >> 3) & 1) << 3);
  ldmatrix_x4_trans(b, shared_address(tile + chunk_of<D>(row, 2 * dp + (lane >> 4))));
}

__device__ __forceinline__ bool visible(const AttentionShape& s, const MaskParams& m,
                                        int64_t batch, int64_t head, int64_t i, int64_t j) {
  if (i >= s.q_len || j >= s.kv_len) return false;
  if (j < i + m.band_lo || j > i + m.band_hi) return false;
  if (m.q_segment != nullptr) {
    const int32_t a = m.q_segment[batch * s.q_len + i];
    const int32_t b = m.kv_segment[batch * s.kv_len + j];
    if (a != b || a < 0) return false;
  }
  if (m.dense != nullptr) {
    const int64_t db = m.dense_batch == 1 ? 0 : batch, dh = m.dense_heads == 1 ? 0 : head;
    if (m.dense[((db * m.dense_heads + dh) * s.q_len + i) * s.kv_len + j] == 0) return false;
  }
  return true;
}

// Bias and mask of a warp's 16 x (8 kN) block of scores (log2 units, i.e.
// already times scale * log2 e). Rows are queries and columns keys, or the
// other way round (kKeysAreRows, in the dK/dV kernel). `masked`: the tile is
// not fully visible (partial class or past a sequence end). Adds the bias
// and sets invisible scores to -inf; does nothing in a full tile without bias.
// kBandOnly: the caller guarantees no segments, dense mask or bias, and only
// the band test is compiled (fewer live registers).
template <int kN, bool kKeysAreRows, bool kBandOnly = false>
__device__ __forceinline__ void mask_scores(float (&s)[kN][4], const AttentionShape& shape,
                                            const MaskParams& mask, const BiasParams& bias,
                                            int64_t batch, int64_t head, int64_t row0,
                                            int64_t col0, bool masked) {
  const bool has_bias = !kBandOnly && bias.data != nullptr;
  if (!masked && !has_bias) return;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t q0 = kKeysAreRows ? col0 : row0, k0 = kKeysAreRows ? row0 : col0;
  if (kBandOnly || (mask.q_segment == nullptr && mask.dense == nullptr && !has_bias)) {
    // Causal / sliding-window tiles: 32-bit offsets from the block corner
    // (a block spans < 2^10 rows and columns, so clamping the bounds to
    // +-2^20 keeps every test exact).
    constexpr int64_t kFar = 1 << 20;
    const int64_t corner = k0 - q0;  // j - i at the block's first row and column
    auto clamp = [](int64_t x) { return int(x < -kFar ? -kFar : x > kFar ? kFar : x); };
    const int lo = clamp(mask.band_lo - corner), hi = clamp(mask.band_hi - corner);
    const int kv_left = clamp(shape.kv_len - k0), q_left = clamp(shape.q_len - q0);
#pragma unroll
    for (int nt = 0; nt < kN; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i >> 1), col = nt * 8 + 2 * t + (i & 1);
        const int qo = kKeysAreRows ? col : row, ko = kKeysAreRows ? row : col;
        const bool seen = ko < kv_left && qo < q_left && ko - qo >= lo && ko - qo <= hi;
        if (!seen) s[nt][i] = -INFINITY;
      }
    }
    return;
  }
  if constexpr (kBandOnly) return;
  const int64_t bb = bias.batch == 1 ? 0 : batch, bh = bias.heads == 1 ? 0 : head;
#pragma unroll
  for (int nt = 0; nt < kN; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i >> 1), col = nt * 8 + 2 * t + (i & 1);
      const int64_t qi = q0 + (kKeysAreRows ? col : row), kj = k0 + (kKeysAreRows ? row : col);
      float x = s[nt][i];
      if (has_bias && qi < shape.q_len && kj < shape.kv_len) {
        x += bias.data[((bb * bias.heads + bh) * shape.q_len + qi) * shape.kv_len + kj] * kLog2e;
      }
      if (masked && !visible(shape, mask, batch, head, qi, kj)) x = -INFINITY;
      s[nt][i] = x;
    }
  }
}

// The maximum of `running` and the scores of the thread's row g (r = 0) or
// g + 8 (r = 1) over the quad's lanes.
template <int kN>
__device__ __forceinline__ float quad_row_max(const float (&s)[kN][4], float running, int r) {
  float m = running;
#pragma unroll
  for (int nt = 0; nt < kN; ++nt) m = fmaxf(m, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
  m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
  return fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
}

// Online softmax of a block of scores for the thread's rows g and g + 8,
// whose keys are spread over the 4 lanes of a quad: updates the running row
// maxima and the thread's partial row sums, turns the scores into P in place
// and returns in `rescale` the factor by which the output accumulated so far
// must be scaled (the caller applies it: a wgmma may still be writing that
// output). kRaw false (online_softmax): scores in log2 units, scaled,
// masked. kRaw true (online_softmax_raw): raw scores, masked, and the
// scale folded into the FFMA before each exp2; row_max then stays in raw
// units (times `scale` it is online_softmax's). Raw needs scale > 0 and no
// bias, which is added in scaled units.
// kSums false: row_sum is left alone (the caller sums P elsewhere, e.g. on
// the tensor cores).
template <int kN, bool kRaw, bool kSums = true>
__device__ __forceinline__ void online_softmax_in(float (&s)[kN][4], float (&row_max)[2],
                                                  float (&row_sum)[2], float (&rescale)[2],
                                                  float scale) {
  float reference[2];  // log2 units
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float m = quad_row_max(s, row_max[r], r);
    // m == -inf: nothing visible yet, avoid inf - inf
    reference[r] = m == -INFINITY ? 0.f : kRaw ? m * scale : m;
    rescale[r] = exp2_fast((kRaw ? row_max[r] * scale : row_max[r]) - reference[r]);
    row_max[r] = m;
    if constexpr (kSums) row_sum[r] *= rescale[r];
  }
#pragma unroll
  for (int nt = 0; nt < kN; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = exp2_fast(kRaw ? fmaf(s[nt][e], scale, -reference[e >> 1])
                                : s[nt][e] - reference[e >> 1]);
      if constexpr (kSums) row_sum[e >> 1] += s[nt][e];
    }
  }
}

template <int kN>
__device__ __forceinline__ void online_softmax(float (&s)[kN][4], float (&row_max)[2],
                                               float (&row_sum)[2], float (&rescale)[2]) {
  online_softmax_in<kN, false>(s, row_max, row_sum, rescale, 1.f);
}

template <int kN, bool kSums = true>
__device__ __forceinline__ void online_softmax_raw(float (&s)[kN][4], float (&row_max)[2],
                                                   float (&row_sum)[2], float (&rescale)[2],
                                                   float scale) {
  online_softmax_in<kN, true, kSums>(s, row_max, row_sum, rescale, scale);
}

// Rows g and g + 8 of an output accumulator times online_softmax's rescale.
template <int kN>
__device__ __forceinline__ void scale_rows(float (&o)[kN][4], const float (&rescale)[2]) {
#pragma unroll
  for (int dt = 0; dt < kN; ++dt) {
    o[dt][0] *= rescale[0];
    o[dt][1] *= rescale[0];
    o[dt][2] *= rescale[1];
    o[dt][3] *= rescale[1];
  }
}

// Forward epilogue of the thread's two query rows `row` and row + 8 (the
// accumulator rows g and g + 8; t = lane % 4 picks its columns): O divided
// by the row sums (row_sum holds the thread's own columns, summed over the
// quad here) to `out` rows of q_stride elements, and the rows' lse (natural
// log; -inf where a row saw no key). `out` and `lse` point at row 0 of the
// (batch, head); rows past Sq are not stored. kQuadSums false: row_sum
// holds the whole rows' sums already.
template <int D, typename T, bool kQuadSums = true>
__device__ __forceinline__ void store_output_rows(const float (&o)[D / 8][4],
                                                  const float (&row_max)[2],
                                                  const float (&row_sum)[2], T* out,
                                                  int64_t q_stride, float* lse, int64_t row,
                                                  int64_t q_len, int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float total = row_sum[r];
    if constexpr (kQuadSums) {
      total += __shfl_xor_sync(0xffffffffu, total, 1);
      total += __shfl_xor_sync(0xffffffffu, total, 2);
    }
    const int64_t qi = row + 8 * r;
    if (qi >= q_len) continue;
    const float inverse = total > 0.f ? 1.f / total : 0.f;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(out + qi * q_stride + dt * 8 + 2 * t) =
          Mma<T>::pack(o[dt][2 * r] * inverse, o[dt][2 * r + 1] * inverse);
    }
    if (t == 0) lse[qi] = total > 0.f ? (row_max[r] + log2f(total)) * kLn2 : -INFINITY;
  }
}

// Backward epilogues, for the thread's two accumulator rows `row` and
// row + 8 (t = lane % 4 picks its columns), into rows of `stride` elements
// from row 0 of the (batch, head); rows at or past `len` are not stored.
// dQ: the accumulator times `scale` (taken by reference, so that the
// kernels read the softmax scale where they use it: a copy changes the
// register allocation of the D=128 dK/dV kernels).
template <int D, typename T>
__device__ __forceinline__ void store_scaled_rows(const float (&acc)[D / 8][4], T* out,
                                                  int64_t stride, int64_t row, int64_t len,
                                                  int t, const float& scale) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t at = row + 8 * r;
    if (at >= len) continue;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(out + at * stride + dt * 8 + 2 * t) =
          Mma<T>::pack(acc[dt][2 * r] * scale, acc[dt][2 * r + 1] * scale);
    }
  }
}

// dK (times `scale`) and dV of the same key rows, stored side by side.
template <int D, typename T>
__device__ __forceinline__ void store_key_rows(const float (&dk)[D / 8][4],
                                               const float (&dv)[D / 8][4], T* d_k, T* d_v,
                                               int64_t stride, int64_t row, int64_t len, int t,
                                               const float& scale) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t key = row + 8 * r;
    if (key >= len) continue;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int64_t at = key * stride + dt * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(d_k + at) =
          Mma<T>::pack(dk[dt][2 * r] * scale, dk[dt][2 * r + 1] * scale);
      *reinterpret_cast<uint32_t*>(d_v + at) = Mma<T>::pack(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  }
}

// exp2 argument offset of a row in the backward: lse in log2 units; a row
// that sees no key (lse = -inf) gets +inf, so that its P = exp2(-inf or
// finite - inf) = 0.
__device__ __forceinline__ float lse_log2(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

// The dQ pass's lse (log2 units) and delta of the thread's rows `row` and
// row + 8 (from row 0 of the (batch, head)); rows past Sq get P = 0 (lse
// +inf) and delta 0.
__device__ __forceinline__ void load_row_stats(const float* lse, const float* delta, int64_t row,
                                               int64_t q_len, float (&row_lse)[2],
                                               float (&row_delta)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t qi = row + 8 * r;
    row_lse[r] = qi < q_len ? lse_log2(lse[qi]) : INFINITY;
    row_delta[r] = qi < q_len ? delta[qi] : 0.f;
  }
}

// First tile at or after `from` of a class row that is not empty.
__device__ __forceinline__ int64_t next_visible(const int8_t* classes, int64_t from,
                                                int64_t num_tiles) {
  while (from < num_tiles && classes[from] == kEmpty) ++from;
  return from;
}

// Row of the tile classes of (batch, head, q tile): one class per kv tile.
__device__ __forceinline__ const int8_t* class_row(const MaskParams& m, int64_t batch,
                                                   int64_t head, int64_t q_tile,
                                                   int64_t num_q_tiles, int64_t num_kv_tiles) {
  return m.tile_class +
         (((m.tile_batch == 1 ? 0 : batch) * m.tile_heads + (m.tile_heads == 1 ? 0 : head)) *
              num_q_tiles +
          q_tile) *
             num_kv_tiles;
}

}  // namespace sm80
}  // namespace cuda
}  // namespace fastattn
