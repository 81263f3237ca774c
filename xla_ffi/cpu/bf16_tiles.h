// bfloat16 matrix products of the forward pass on the matrix units, with
// float32 results: logits = Q K^T and O += P V for one (q tile, kv tile).
//
// Both operands on the right are packed once per call in the "VNNI" order
// that AMX's TDPBF16PS and AVX512-BF16's vdpbf16ps take: a dword holds two
// bf16 values that are multiplied pairwise and summed into one float lane.
//   K tile: [tile_kv/16 key blocks][Dp/32 dim chunks][16 dim pairs][16 keys]
//           (one 1 KiB B tile per key block and dim chunk; a dword holds
//           dims 2i, 2i+1 of one key)
//   V tile: [tile_kv/32 key chunks][Dp/16 dim blocks][16 key pairs][16 dims]
//           (one 1 KiB B tile per key chunk and dim block; a dword holds
//           keys 2i, 2i+1 of one dim)
// Dp is the head dim rounded up to 32; padding dims and keys are zero.
// With AMX (the amx level) one TDPBF16PS is a 16x16x32 product; with
// AVX512-BF16 (the avx512_bf16 level) the same packed rows are the
// vector operand of vdpbf16ps and a dword of Q (or P) the broadcast one,
// two k-steps per instruction instead of one FMA.
#pragma once

#include "isa_namespace.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define FASTATTN_HAVE_BF16_TILES 1

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/attention_params.h"
#include "../common/dtypes.h"
#include "../common/thread_pool.h"
#include "amx_tiles.h"
#include "tile_ops.h"

namespace fastattn {
namespace cpu {
inline namespace FASTATTN_ISA_NS {

constexpr int64_t kBf16DimChunk = 32;  // tile depth of Q K^T (dims)
constexpr int64_t kBf16KeyChunk = 32;  // tile depth of P V (keys)
constexpr int64_t kTileRows = 16;      // rows of an AMX tile, and lanes of a result vector

inline uint32_t bf16_pair(uint16_t low, uint16_t high) { return uint32_t{low} | uint32_t{high} << 16; }

// Every kv tile of k and v in the VNNI order above, once per call.
struct PackedBf16Kv {
  uint32_t* k = nullptr;  // call_buffer slots 0 and 1
  uint32_t* v = nullptr;
  int64_t tile_dwords = 0, num_kv_tiles = 0, kv_heads = 0;
  const uint32_t* k_tile(int64_t b, int64_t kv_h, int64_t t) const {
    return k + ((b * kv_heads + kv_h) * num_kv_tiles + t) * tile_dwords;
  }
  const uint32_t* v_tile(int64_t b, int64_t kv_h, int64_t t) const {
    return v + ((b * kv_heads + kv_h) * num_kv_tiles + t) * tile_dwords;
  }
};

// Keys past Skv and padding keys (negative segment id) are zero, so garbage
// there never reaches the result (not even as 0 * NaN). v may be null (only
// k is packed; the backward packs V in K's layout this way, for dO V^T).
// The arrays go to call_buffer slots first_slot and first_slot + 1.
inline PackedBf16Kv pack_bf16_kv(const bf16_t* k, const bf16_t* v, const AttentionShape& s,
                                 const MaskParams& mask, int64_t padded_dim, int first_slot = 0) {
  PackedBf16Kv packed;
  const int64_t tile_kv = mask.tile_kv, chunks = padded_dim / kBf16DimChunk;
  const int64_t dim_blocks = padded_dim / kTileRows, head_dim = s.head_dim;
  packed.tile_dwords = tile_kv * padded_dim / 2;
  packed.num_kv_tiles = s.num_kv_tiles(tile_kv);
  packed.kv_heads = s.kv_heads;
  const size_t total = s.batch * s.kv_heads * packed.num_kv_tiles * packed.tile_dwords;
  packed.k = call_buffer<uint32_t>(first_slot, total);
  packed.v = v == nullptr ? nullptr : call_buffer<uint32_t>(first_slot + 1, total);
  const int64_t row_stride = s.kv_heads * head_dim;
  parallel_for(s.batch * s.kv_heads * packed.num_kv_tiles, [&](int64_t item) {
    const int64_t t = item % packed.num_kv_tiles;
    const int64_t kv_h = (item / packed.num_kv_tiles) % s.kv_heads;
    const int64_t b = item / (packed.num_kv_tiles * s.kv_heads);
    const int64_t k0 = t * tile_kv, keys = std::min(tile_kv, s.kv_len - k0);
    uint32_t* k_dst = packed.k + item * packed.tile_dwords;
    uint16_t* v_dst = v == nullptr ? nullptr : reinterpret_cast<uint16_t*>(packed.v + item * packed.tile_dwords);
    std::fill(k_dst, k_dst + packed.tile_dwords, 0u);
    if (v != nullptr) std::fill(v_dst, v_dst + 2 * packed.tile_dwords, uint16_t{0});
    const int64_t offset = ((b * s.kv_len + k0) * s.kv_heads + kv_h) * head_dim;
    auto key_valid = [&](int64_t j) {
      return j < keys && (mask.kv_segment == nullptr || mask.kv_segment[b * s.kv_len + k0 + j] >= 0);
    };
    if (head_dim % kBf16DimChunk == 0) {
      // Vectorised: K by dword gathers (one B-tile row = dword kk of 16
      // keys), V by widening two keys' rows and interleaving them.
      const int32_t row_dwords = int32_t(row_stride / 2);
      const __m512i key_offsets = _mm512_mullo_epi32(
          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(row_dwords));
      for (int64_t kb = 0; kb * kTileRows < keys; ++kb) {
        __mmask16 valid = 0;
        for (int jj = 0; jj < 16; ++jj) valid |= __mmask16(key_valid(kb * kTileRows + jj)) << jj;
        const void* base = k + offset + kb * kTileRows * row_stride;
        for (int64_t c = 0; c < chunks; ++c) {
          for (int kk = 0; kk < 16; ++kk) {
            const __m512i index = _mm512_add_epi32(key_offsets, _mm512_set1_epi32(int32_t(c * 16 + kk)));
            _mm512_storeu_si512(k_dst + (kb * chunks + c) * 256 + kk * 16,
                                _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, index, base, 4));
          }
        }
      }
      uint32_t* v_pairs = reinterpret_cast<uint32_t*>(v_dst);
      for (int64_t j = 0; v != nullptr && j < keys; j += 2) {
        const bool even_valid = key_valid(j), odd_valid = key_valid(j + 1);
        const bf16_t* even = v + offset + j * row_stride;
        uint32_t* dst = v_pairs + ((j / kBf16KeyChunk) * dim_blocks * 16 + (j % kBf16KeyChunk) / 2) * 16;
        for (int64_t db = 0; db < dim_blocks; ++db) {
          __m512i pair = _mm512_setzero_si512();
          if (even_valid) pair = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(even + db * 16)));
          if (odd_valid) {
            pair = _mm512_or_si512(pair, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                                               (const __m256i*)(even + row_stride + db * 16))),
                                                           16));
          }
          _mm512_storeu_si512(dst + db * 256, pair);
        }
      }
      return;
    }
    for (int64_t j = 0; j < keys; ++j) {
      if (!key_valid(j)) continue;
      const bf16_t* k_row = k + offset + j * row_stride;
      uint32_t* k_key = k_dst + (j / kTileRows) * chunks * 256 + j % kTileRows;
      for (int64_t d = 0; d < head_dim; d += 2) {
        const uint16_t high = d + 1 < head_dim ? k_row[d + 1].bits : uint16_t{0};
        k_key[(d / kBf16DimChunk) * 256 + (d % kBf16DimChunk) / 2 * 16] = bf16_pair(k_row[d].bits, high);
      }
      if (v == nullptr) continue;
      const bf16_t* v_row = v + offset + j * row_stride;
      uint16_t* v_key = v_dst + ((j / kBf16KeyChunk) * dim_blocks * 256 + (j % kBf16KeyChunk) / 2 * 16) * 2 +
                        j % 2;
      for (int64_t d = 0; d < head_dim; ++d) v_key[((d / kTileRows) * 256 + d % kTileRows) * 2] = v_row[d].bits;
    }
  });
  return packed;
}

// ---- AVX512-BF16: vdpbf16ps with the packed rows as the vector operand.

// logits[i][j] = sum_d q[i][d] k[j][d] for rows [0, rows_p) (a multiple of
// 8) and keys [0, key_blocks * 16), key_blocks even. q: bf16 [rows][Dp].
inline void dot_logits(float* logits, int64_t ld, const bf16_t* q, int64_t padded_dim,
                       const uint32_t* k_tile, int64_t rows_p, int64_t key_blocks) {
  constexpr int kRows = 8;
  const int64_t chunks = padded_dim / kBf16DimChunk, pairs = padded_dim / 2;
  const uint32_t* q_pairs = reinterpret_cast<const uint32_t*>(q);
  for (int64_t kb = 0; kb < key_blocks; kb += 2) {
    for (int64_t r0 = 0; r0 < rows_p; r0 += kRows) {
      __m512 acc[kRows][2];
      for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const uint32_t* b0 = k_tile + (kb * chunks + c) * 256;
        const uint32_t* b1 = b0 + chunks * 256;
        for (int64_t kk = 0; kk < 16; ++kk) {
          const __m512bh k0 = (__m512bh)_mm512_loadu_si512(b0 + kk * 16);
          const __m512bh k1 = (__m512bh)_mm512_loadu_si512(b1 + kk * 16);
          for (int r = 0; r < kRows; ++r) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32(int(q_pairs[(r0 + r) * pairs + c * 16 + kk]));
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, k0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, k1);
          }
        }
      }
      for (int r = 0; r < kRows; ++r) {
        _mm512_storeu_ps(logits + (r0 + r) * ld + kb * 16, acc[r][0]);
        _mm512_storeu_ps(logits + (r0 + r) * ld + kb * 16 + 16, acc[r][1]);
      }
    }
  }
}

// acc[i][d] += sum_j p[i][j] v[j][d] for rows [0, rows_p) (a multiple of 8)
// and keys [0, key_chunks * 32). p: bf16 [rows][ld_p]; acc: [rows][Dp].
inline void dot_accumulate_pv(float* acc, int64_t padded_dim, const bf16_t* p, int64_t ld_p,
                              const uint32_t* v_tile, int64_t rows_p, int64_t key_chunks) {
  constexpr int kRows = 8;
  const int64_t dim_blocks = padded_dim / kTileRows;
  const uint32_t* p_pairs = reinterpret_cast<const uint32_t*>(p);
  for (int64_t db = 0; db < dim_blocks; db += 2) {
    for (int64_t r0 = 0; r0 < rows_p; r0 += kRows) {
      __m512 sum[kRows][2];
      for (int r = 0; r < kRows; ++r) {
        sum[r][0] = _mm512_loadu_ps(acc + (r0 + r) * padded_dim + db * 16);
        sum[r][1] = _mm512_loadu_ps(acc + (r0 + r) * padded_dim + db * 16 + 16);
      }
      for (int64_t kc = 0; kc < key_chunks; ++kc) {
        const uint32_t* b0 = v_tile + (kc * dim_blocks + db) * 256;
        for (int64_t kp = 0; kp < 16; ++kp) {
          const __m512bh v0 = (__m512bh)_mm512_loadu_si512(b0 + kp * 16);
          const __m512bh v1 = (__m512bh)_mm512_loadu_si512(b0 + 256 + kp * 16);
          for (int r = 0; r < kRows; ++r) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32(int(p_pairs[((r0 + r) * ld_p) / 2 + kc * 16 + kp]));
            sum[r][0] = _mm512_dpbf16_ps(sum[r][0], a, v0);
            sum[r][1] = _mm512_dpbf16_ps(sum[r][1], a, v1);
          }
        }
      }
      for (int r = 0; r < kRows; ++r) {
        _mm512_storeu_ps(acc + (r0 + r) * padded_dim + db * 16, sum[r][0]);
        _mm512_storeu_ps(acc + (r0 + r) * padded_dim + db * 16 + 16, sum[r][1]);
      }
    }
  }
}

// ---- AMX: TDPBF16PS on 16x64-byte tiles.
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define FASTATTN_HAVE_AMX_TILES 1

// Every tile register as 16 rows x 64 bytes: 0-3 results (2x2 blocks of
// 16x16 float32), 4-5 A (16 rows x 32 bf16), 6-7 B (VNNI, 16 x 32 bf16).
inline AmxTileConfig uniform_tile_config() {
  AmxTileConfig config;
  for (int t = 0; t < 8; ++t) config.tile(t, 16, 64);
  return config;
}

// As dot_logits, on AMX: rows_p a multiple of 16. 2x2 blocks of 16x16
// results, so each A and B tile load feeds two products.
inline void amx_logits(float* logits, int64_t ld, const bf16_t* q, int64_t padded_dim,
                       const uint32_t* k_tile, int64_t rows_p, int64_t key_blocks) {
  const int64_t chunks = padded_dim / kBf16DimChunk, q_stride = padded_dim * 2;
  const int64_t row_blocks = rows_p / kTileRows;
  for (int64_t rb = 0; rb < row_blocks; rb += 2) {
    const bool two_rows = rb + 1 < row_blocks;
    const bf16_t* q0 = q + rb * kTileRows * padded_dim;
    const bf16_t* q1 = q0 + kTileRows * padded_dim;
    for (int64_t kb = 0; kb < key_blocks; kb += 2) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint32_t* b0 = k_tile + kb * chunks * 256;
      const uint32_t* b1 = b0 + chunks * 256;
      for (int64_t c = 0; c < chunks; ++c) {
        _tile_loadd(4, q0 + c * kBf16DimChunk, q_stride);
        _tile_loadd(6, b0 + c * 256, 64);
        _tile_loadd(7, b1 + c * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two_rows) {
          _tile_loadd(5, q1 + c * kBf16DimChunk, q_stride);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      float* out = logits + rb * kTileRows * ld + kb * 16;
      _tile_stored(0, out, ld * 4);
      _tile_stored(1, out + 16, ld * 4);
      if (two_rows) {
        _tile_stored(2, out + kTileRows * ld, ld * 4);
        _tile_stored(3, out + kTileRows * ld + 16, ld * 4);
      }
    }
  }
}

// As dot_accumulate_pv, on AMX: rows_p a multiple of 16.
inline void amx_accumulate_pv(float* acc, int64_t padded_dim, const bf16_t* p, int64_t ld_p,
                              const uint32_t* v_tile, int64_t rows_p, int64_t key_chunks) {
  const int64_t dim_blocks = padded_dim / kTileRows, row_blocks = rows_p / kTileRows;
  const int64_t acc_stride = padded_dim * 4, p_stride = ld_p * 2;
  for (int64_t rb = 0; rb < row_blocks; rb += 2) {
    const bool two_rows = rb + 1 < row_blocks;
    const bf16_t* p0 = p + rb * kTileRows * ld_p;
    const bf16_t* p1 = p0 + kTileRows * ld_p;
    for (int64_t db = 0; db < dim_blocks; db += 2) {
      float* c0 = acc + rb * kTileRows * padded_dim + db * 16;
      float* c1 = c0 + kTileRows * padded_dim;
      _tile_loadd(0, c0, acc_stride);
      _tile_loadd(1, c0 + 16, acc_stride);
      if (two_rows) {
        _tile_loadd(2, c1, acc_stride);
        _tile_loadd(3, c1 + 16, acc_stride);
      }
      for (int64_t kc = 0; kc < key_chunks; ++kc) {
        const uint32_t* b0 = v_tile + (kc * dim_blocks + db) * 256;
        _tile_loadd(4, p0 + kc * kBf16KeyChunk, p_stride);
        _tile_loadd(6, b0, 64);
        _tile_loadd(7, b0 + 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two_rows) {
          _tile_loadd(5, p1 + kc * kBf16KeyChunk, p_stride);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, c0, acc_stride);
      _tile_stored(1, c0 + 16, acc_stride);
      if (two_rows) {
        _tile_stored(2, c1, acc_stride);
        _tile_stored(3, c1 + 16, acc_stride);
      }
    }
  }
}
#endif  // AMX

}  // namespace FASTATTN_ISA_NS
}  // namespace cpu
}  // namespace fastattn

#endif  // __AVX512BF16__
