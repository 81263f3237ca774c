// FastAttention's Volta forward kernel: fused attention on the sm70 tensor
// cores through mma.sync.aligned.m8n8k4 (f16 in, f32 accumulate).
//
// Compiled by NVRTC 12 to compute_70 PTX at build time
// (build_tools/volta_ptx.py) and loaded with the driver API by
// volta_forward_handler.cc; nvcc 13 cannot target sm70. Self-contained: no
// headers but volta_params.h (NVRTC has no standard library here).
//
// Work split. A CTA owns 128 query rows of one (batch, head), 4 warps of 32
// rows; it walks the key tiles of 32 keys (FlashAttention-2: O, row max and
// row sum stay in registers; one pass over K/V). In every m8n8k4 the warp's
// four quad-pairs (QP q = lanes 4q..4q+3 and 16+4q..16+4q+3) compute four
// independent 8x8x4 products; QP q always owns query rows 8q..8q+7 of its
// warp, so Q fragments are never duplicated and O needs no cross-QP sums.
//
// Fragments (PTX ISA, mma.m8n8k4 .f16/.f32; l = lane % 4, h = lane / 16):
//   A row-major: row l + 4h, k 0..3          (8 contiguous bytes)
//   B col-major: col l + 4h, k 0..3          (8 contiguous bytes of a K row)
//   B row-major: row l,      col 4h..4h+3    (8 contiguous bytes of a V row)
//   C/D f32:     c[i] at row (l & 1) + (i & 2) + 4h, col (i & 4) + (l & 2) + (i & 1)
//
// S = Q K^T: A = Q rows (row-major), B = K rows (col-major) -> S in C layout.
// O += P V:  A = P (row-major), B = V rows (row-major). A thread's S values
// cover two rows x keys {0,1,4,5} (l & 2 == 0) or {2,3,6,7} (l & 2 == 2) of
// each 8-key block, while the A fragment wants one row (l + 4h) x 4 keys.
// Each thread already holds its own row on its own 4 keys; the other row it
// holds is exactly what lane ^ 2 needs. So one 8-key block becomes two PV
// mmas, on keys {0,1,4,5} and {2,3,6,7}, after one register exchange of
// two packed f16x2 words with lane ^ 2 (shfl.xor): P never goes through
// shared memory. V's rows are read in the same key order.
//
// Shared-memory layout (docs/VOLTA.md has the derivation and bank tables).
// Rows of Q, K, V are stored as 8-byte chunks (one m8n8k4 operand each);
// chunk c of row r lives at r * D/4 + (c ^ g(r)) with
//   g(r) = (r & 3) | (((r >> 3) ^ (r >> 2)) & 1) << 2 | ((r >> 4) & 1) << 3.
// A warp's 64-bit loads are served per half-warp; within one:
//   Q (A): rows l + 8q (+4h fixed): bits 0,1,3,4 vary -> 16 distinct g
//   K (B col): keys l (+4h fixed): 4 distinct g
//   V (B row): keys {0,1,4,5} (or {2,3,6,7}): bits 0,2 vary -> 4 distinct g
// so no two distinct addresses of a half-warp share a bank. Stores of
// 16-byte row pieces keep the two chunks of a piece adjacent (c ^ g and
// (c+1) ^ g differ in bit 0 only); the halves swap when g is odd.
// FASTATTN_VOLTA_SWIZZLE=0 builds the naive row-major layout (g = 0) for
// the ablation: there the same loads hit one bank 4-16 times.
#include "volta_params.h"

#ifndef FASTATTN_VOLTA_SWIZZLE
#define FASTATTN_VOLTA_SWIZZLE 1
#endif

namespace fastattn {
namespace volta {
namespace {

constexpr signed char kTileEmpty = 0;
constexpr signed char kTileFull = 2;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
  unsigned short a, b;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(a) : "f"(lo));
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(hi));
  return unsigned(a) | (unsigned(b) << 16);
}

__device__ __forceinline__ float exp2_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float log2_fast(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ int swizzle(int row) {
#if FASTATTN_VOLTA_SWIZZLE
  return (row & 3) | ((((row >> 3) ^ (row >> 2)) & 1) << 2) | (((row >> 4) & 1) << 3);
#else
  return 0;
#endif
}

// Index (in 8-byte chunks) of chunk `chunk` of tile row `row`.
template <int D>
__device__ __forceinline__ int chunk_index(int row, int chunk) {
  return row * (D / 4) + (chunk ^ swizzle(row));
}

// d += a * b on the four quad-pairs; a row-major, b column-major.
__device__ __forceinline__ void mma_row_col(float* d, uint2 a, uint2 b) {
  asm volatile(
      "mma.sync.aligned.m8n8k4.row.col.f32.f16.f16.f32 {%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11}, {%0,%1,%2,%3,%4,%5,%6,%7};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7])
      : "r"(a.x), "r"(a.y), "r"(b.x), "r"(b.y));
}

// d += a * b on the four quad-pairs; a and b row-major.
__device__ __forceinline__ void mma_row_row(float* d, uint2 a, uint2 b) {
  asm volatile(
      "mma.sync.aligned.m8n8k4.row.row.f32.f16.f16.f32 {%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11}, {%0,%1,%2,%3,%4,%5,%6,%7};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7])
      : "r"(a.x), "r"(a.y), "r"(b.x), "r"(b.y));
}

// rows x D halves from global (row stride in halves) into the swizzled tile;
// rows at or past `valid_rows` are zero.
template <int D, int kRows>
__device__ __forceinline__ void load_tile(uint2* tile, const unsigned short* src,
                                          long long row_stride, long long valid_rows) {
  constexpr int kPieces = D / 8;  // 16-byte pieces per row
  for (int index = threadIdx.x; index < kRows * kPieces; index += kThreads) {
    const int row = index / kPieces;
    const int piece = index % kPieces;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (row < valid_rows) {
      value = *reinterpret_cast<const uint4*>(src + row * row_stride + piece * 8);
    }
    const int g = swizzle(row);
    if (g & 1) {  // the piece's two chunks trade places
      value = make_uint4(value.z, value.w, value.x, value.y);
    }
    *reinterpret_cast<uint4*>(tile + row * (D / 4) + ((2 * piece) ^ (g & ~1))) = value;
  }
}

__device__ __forceinline__ bool visible(const VoltaForwardParams& p, long long batch,
                                        long long head, long long i, long long j) {
  if (i >= p.q_len || j >= p.kv_len) return false;
  if (j < i + p.band_lo || j > i + p.band_hi) return false;
  if (p.q_segment != nullptr) {
    const int a = p.q_segment[batch * p.q_len + i];
    const int b = p.kv_segment[batch * p.kv_len + j];
    if (a != b || a < 0) return false;
  }
  if (p.dense != nullptr) {
    const long long db = p.dense_batch == 1 ? 0 : batch;
    const long long dh = p.dense_heads == 1 ? 0 : head;
    if (p.dense[((db * p.dense_heads + dh) * p.q_len + i) * p.kv_len + j] == 0) return false;
  }
  return true;
}

template <int D>
__device__ void attention_forward(const VoltaForwardParams& p) {
  constexpr int kChunks = D / 4;
  __shared__ uint2 q_tile[kTileQ * kChunks];
  __shared__ uint2 k_tile[kTileKv * kChunks];
  __shared__ uint2 v_tile[kTileKv * kChunks];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int l = lane & 3, h = lane >> 4, qp = (lane >> 2) & 3;
  const long long q_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const long long kv_head = head / (p.q_heads / p.kv_heads);
  const long long q_stride = p.q_heads * D, kv_stride = p.kv_heads * D;
  const long long q0 = q_block * kTileQ;
  const unsigned short* q = static_cast<const unsigned short*>(p.q) +
                            (batch * p.q_len * p.q_heads + head) * D;
  const unsigned short* k = static_cast<const unsigned short*>(p.k) +
                            (batch * p.kv_len * p.kv_heads + kv_head) * D;
  const unsigned short* v = static_cast<const unsigned short*>(p.v) +
                            (batch * p.kv_len * p.kv_heads + kv_head) * D;
  load_tile<D, kTileQ>(q_tile, q + q0 * q_stride, q_stride, p.q_len - q0);

  // This thread's two query rows in the C layout (tile-relative): row_a, row_a + 2.
  const int row_a = warp * 32 + qp * 8 + (l & 1) + 4 * h;
  const int a_row = warp * 32 + qp * 8 + l + 4 * h;  // its row in A fragments
  const bool low = (l & 2) == 0;
  float o[D / 8][8];
#pragma unroll
  for (int db = 0; db < D / 8; ++db)
#pragma unroll
    for (int i = 0; i < 8; ++i) o[db][i] = 0.f;
  float row_max[2] = {neg_inf(), neg_inf()};
  float row_sum[2] = {0.f, 0.f};  // this thread's keys only; reduced at the end

  const long long tb = p.tile_batch == 1 ? 0 : batch, th = p.tile_heads == 1 ? 0 : head;
  const signed char* tile_classes =
      p.tile_class + ((tb * p.tile_heads + th) * p.num_q_tiles + q_block) * p.num_kv_tiles;
  for (long long kv_block = 0; kv_block < p.num_kv_tiles; ++kv_block) {
    const signed char tile_class = tile_classes[kv_block];
    if (tile_class == kTileEmpty) continue;  // tiling-mask: nothing visible here
    const long long kv0 = kv_block * kTileKv;
    __syncthreads();  // the previous tile is no longer read
    load_tile<D, kTileKv>(k_tile, k + kv0 * kv_stride, kv_stride, p.kv_len - kv0);
    load_tile<D, kTileKv>(v_tile, v + kv0 * kv_stride, kv_stride, p.kv_len - kv0);
    __syncthreads();

    float s[4][8];
#pragma unroll
    for (int blk = 0; blk < 4; ++blk)
#pragma unroll
      for (int i = 0; i < 8; ++i) s[blk][i] = 0.f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const uint2 a = q_tile[chunk_index<D>(a_row, c)];
#pragma unroll
      for (int blk = 0; blk < 4; ++blk) {
        mma_row_col(s[blk], a, k_tile[chunk_index<D>(blk * 8 + l + 4 * h, c)]);
      }
    }

    // Scores in the log2 domain; the element-wise mask only where needed.
    const bool masked = tile_class != kTileFull || kv0 + kTileKv > p.kv_len;
#pragma unroll
    for (int blk = 0; blk < 4; ++blk) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const long long qi = q0 + row_a + (i & 2);
        const long long kj = kv0 + blk * 8 + (i & 4) + (l & 2) + (i & 1);
        float x = s[blk][i] * p.scale_log2;
        if (p.bias != nullptr && qi < p.q_len && kj < p.kv_len) {
          const long long bb = p.bias_batch == 1 ? 0 : batch;
          const long long bh = p.bias_heads == 1 ? 0 : head;
          x += p.bias[((bb * p.bias_heads + bh) * p.q_len + qi) * p.kv_len + kj] * kLog2e;
        }
        if (masked && !visible(p, batch, head, qi, kj)) x = neg_inf();
        s[blk][i] = x;
      }
    }

    // Online softmax: a row's 8 keys of a block sit in lanes l and l ^ 2.
    float reference[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float m = row_max[r];
#pragma unroll
      for (int blk = 0; blk < 4; ++blk) {
        m = fmaxf(m, fmaxf(fmaxf(s[blk][2 * r], s[blk][2 * r + 1]),
                           fmaxf(s[blk][2 * r + 4], s[blk][2 * r + 5])));
      }
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
      // A row with nothing visible yet keeps -inf; 0 as reference avoids inf - inf.
      reference[r] = m == neg_inf() ? 0.f : m;
      const float rescale = exp2_fast(row_max[r] - reference[r]);
      row_max[r] = m;
      row_sum[r] *= rescale;
#pragma unroll
      for (int db = 0; db < D / 8; ++db) {
        o[db][2 * r] *= rescale;
        o[db][2 * r + 1] *= rescale;
        o[db][2 * r + 4] *= rescale;
        o[db][2 * r + 5] *= rescale;
      }
    }
#pragma unroll
    for (int blk = 0; blk < 4; ++blk) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        s[blk][i] = exp2_fast(s[blk][i] - reference[(i >> 1) & 1]);
        row_sum[(i >> 1) & 1] += s[blk][i];
      }
    }

    // O += P V, two mmas per 8-key block after the lane ^ 2 exchange.
    const int key_low = (l & 1) + ((l & 2) << 1);  // k-slot l -> key {0,1,4,5}[l]
#pragma unroll
    for (int blk = 0; blk < 4; ++blk) {
      const float* c = s[blk];
      const uint2 row_a_words = make_uint2(pack_half2(c[0], c[1]), pack_half2(c[4], c[5]));
      const uint2 row_b_words = make_uint2(pack_half2(c[2], c[3]), pack_half2(c[6], c[7]));
      const uint2 own = low ? row_a_words : row_b_words;
      const uint2 other = low ? row_b_words : row_a_words;
      const uint2 received = make_uint2(__shfl_xor_sync(0xffffffffu, other.x, 2),
                                        __shfl_xor_sync(0xffffffffu, other.y, 2));
      const uint2 keys_0145 = low ? own : received;
      const uint2 keys_2367 = low ? received : own;
      const int key = blk * 8 + key_low;
#pragma unroll
      for (int db = 0; db < D / 8; ++db) {
        mma_row_row(o[db], keys_0145, v_tile[chunk_index<D>(key, 2 * db + h)]);
        mma_row_row(o[db], keys_2367, v_tile[chunk_index<D>(key + 2, 2 * db + h)]);
      }
    }
  }

  // Normalise and store: c[i], c[i+1] (i even) are adjacent columns.
  unsigned short* out = static_cast<unsigned short*>(p.out) +
                        (batch * p.q_len * p.q_heads + head) * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float total = row_sum[r] + __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
    const long long qi = q0 + row_a + 2 * r;
    const float inverse = total > 0.f ? 1.f / total : 0.f;
    if (qi < p.q_len) {
#pragma unroll
      for (int db = 0; db < D / 8; ++db) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int i = 2 * r + 4 * half;
          const int col = db * 8 + 4 * half + (l & 2);
          *reinterpret_cast<unsigned*>(out + qi * q_stride + col) =
              pack_half2(o[db][i] * inverse, o[db][i + 1] * inverse);
        }
      }
      if (low) {
        p.lse[(batch * p.q_heads + head) * p.q_len + qi] =
            total > 0.f ? (row_max[r] + log2_fast(total)) * kLn2 : neg_inf();
      }
    }
  }
}

}  // namespace
}  // namespace volta
}  // namespace fastattn

extern "C" __global__ void __launch_bounds__(fastattn::volta::kThreads)
    fastattn_volta_forward_d64(fastattn::volta::VoltaForwardParams p) {
  fastattn::volta::attention_forward<64>(p);
}

extern "C" __global__ void __launch_bounds__(fastattn::volta::kThreads)
    fastattn_volta_forward_d128(fastattn::volta::VoltaForwardParams p) {
  fastattn::volta::attention_forward<128>(p);
}
