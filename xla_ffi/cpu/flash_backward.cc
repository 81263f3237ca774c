#include "flash_backward.h"

#include <cmath>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "../common/thread_pool.h"
#include "bf16_tiles.h"
#include "gemm.h"
#include "tile_ops.h"
#include "vec_math.h"

namespace fastattn {
namespace cpu {
inline namespace FASTATTN_ISA_NS {
namespace {

// Everything the backward recomputes for one (q tile, kv tile) pair:
// probabilities P and the logits gradient dS, each [rows][tile_kv].
struct TileGradients {
  float* probs;
  float* d_logits;
};

// The bf16 operands of the two products that recompute S = Q K^T and
// dP = dO V^T as bf16 products (bf16_tiles.h): q and dO rows as they are,
// bf16 with row stride padded_dim, readable for rows rounded up to 16 (rows
// past the tile's are never used), and K and V tiles in the VNNI order of
// bf16_tiles.h's K. `amx`: on AMX tiles (TDPBF16PS), else with vdpbf16ps
// (AVX512-BF16). All null: those products run in float32.
struct Bf16Operands {
  const bf16_t* q = nullptr;
  const bf16_t* d_out = nullptr;
  const uint32_t* k = nullptr;
  const uint32_t* v = nullptr;
  bool amx = false;
};

#ifdef FASTATTN_HAVE_BF16_TILES
// logits [rows_p][ld] = a (bf16 rows) times the packed tile's keys.
inline void bf16_logits(float* logits, int64_t ld, const bf16_t* a, int64_t padded_dim, const uint32_t* packed,
                        int64_t rows_p, int64_t key_blocks, bool amx) {
#ifdef FASTATTN_HAVE_AMX_TILES
  if (amx) {
    amx_logits(logits, ld, a, padded_dim, packed, rows_p, key_blocks);
    return;
  }
#endif
  dot_logits(logits, ld, a, padded_dim, packed, rows_p, key_blocks);
}

// src [rows][cols] float32 (row stride ld) as bf16 in V order over the rows:
// [round_up(rows, 32) / 32 chunks][cols / 16 blocks][16 row pairs][16
// columns], a dword holding rows 2i and 2i + 1 of one column; rows past
// `rows` are zero. The B operand of dV^T += dO^T P and dK^T += Q^T dS.
inline void pack_row_pairs_bf16(uint32_t* dst, const float* src, int64_t ld, int64_t rows, int64_t cols) {
  const int64_t blocks = cols / kTileRows, chunks = (rows + kBf16KeyChunk - 1) / kBf16KeyChunk;
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t i = 0; i < kBf16KeyChunk / 2; ++i) {
      const int64_t r = c * kBf16KeyChunk + 2 * i;
      const float* even = r < rows ? src + r * ld : nullptr;
      const float* odd = r + 1 < rows ? src + (r + 1) * ld : nullptr;
      for (int64_t cb = 0; cb < blocks; ++cb) {
        __m512i pair = _mm512_setzero_si512();
        if (even != nullptr) {
          pair = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(even + cb * 16)));
        }
        if (odd != nullptr) {
          pair = _mm512_or_si512(
              pair, _mm512_slli_epi32(
                        _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(odd + cb * 16))), 16));
        }
        _mm512_storeu_si512(dst + ((c * blocks + cb) * 16 + i) * 16, pair);
      }
    }
  }
}

// src [rows][cols] float32 (cols a multiple of 32) as bf16 rows, rows from
// `rows` to rows_p zero: the A operand of dQ += dS K.
inline void rows_to_bf16(bf16_t* dst, const float* src, int64_t rows, int64_t rows_p, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; j += 32) {
      _mm512_storeu_si512(dst + i * cols + j, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i * cols + j + 16),
                                                                            _mm512_loadu_ps(src + i * cols + j)));
    }
  }
  std::fill(dst + rows * cols, dst + rows_p * cols, bf16_t{0});
}
#endif

// Given packed scale*Q [rows][padded_dim], dO [rows][padded_dim], K^T and V^T
// [padded_dim][tile_kv], recomputes P and dS for one tile pair.
inline void tile_gradients(const TileGradients& t, const float* q_scaled, const float* d_out,
                           const float* k_t, const float* v_t, const float* lse,
                           const float* delta, int64_t rows, int64_t tile_kv,
                           int64_t padded_dim, const BackwardParams& p, int64_t b, int64_t h,
                           int64_t q0, int64_t k0, int64_t keys, bool partial,
                           const Bf16Operands& bf16 = {}) {
  const AttentionShape& s = p.shape;
#ifdef FASTATTN_HAVE_BF16_TILES
  if (bf16.q != nullptr) {
    // Columns past round_up(keys, 32) are not written: the mask below makes
    // them -inf in S (P = 0) and no product reads them from dS.
    const int64_t rows_p = round_up(rows, kTileRows), key_blocks = 2 * ((keys + 31) / 32);
    bf16_logits(t.probs, tile_kv, bf16.q, padded_dim, bf16.k, rows_p, key_blocks, bf16.amx);
    for (int64_t i = 0; i < rows; ++i) {
      float* row = t.probs + i * tile_kv;
      for (int64_t j = 0; j < tile_kv; j += kLanes) store(row + j, load(row + j) * p.softmax_scale);
    }
  } else
#endif
  {
    std::fill(t.probs, t.probs + rows * tile_kv, 0.f);
    gemm_accumulate(t.probs, tile_kv, q_scaled, padded_dim, 1, k_t, tile_kv, rows, tile_kv,
                    padded_dim);
  }
  if (p.bias.data != nullptr) add_bias_tile(t.probs, tile_kv, p.bias, s, b, h, q0, rows, k0, keys);
  mask_tile(t.probs, tile_kv, p.mask, s, b, h, q0, rows, k0, keys, partial);
  for (int64_t i = 0; i < rows; ++i) {
    float* row = t.probs + i * tile_kv;
    if (lse[i] == kNegInf) {  // the row saw no key: no gradient flows
      std::fill(row, row + tile_kv, 0.f);
      continue;
    }
    for (int64_t j = 0; j < tile_kv; j += kLanes) store(row + j, vexp(load(row + j) - lse[i]));
  }
#ifdef FASTATTN_HAVE_BF16_TILES
  if (bf16.q != nullptr) {
    bf16_logits(t.d_logits, tile_kv, bf16.d_out, padded_dim, bf16.v, round_up(rows, kTileRows),
                2 * ((keys + 31) / 32), bf16.amx);
  } else
#endif
  {
    std::fill(t.d_logits, t.d_logits + rows * tile_kv, 0.f);
    gemm_accumulate(t.d_logits, tile_kv, d_out, padded_dim, 1, v_t, tile_kv, rows, tile_kv,
                    padded_dim);
  }
  for (int64_t i = 0; i < rows; ++i) {
    float* d_row = t.d_logits + i * tile_kv;
    const float* p_row = t.probs + i * tile_kv;
    for (int64_t j = 0; j < tile_kv; j += kLanes) {
      store(d_row + j, load(p_row + j) * (load(d_row + j) - delta[i]));
    }
  }
}

template <typename T>
void backward_typed(const BackwardParams& p) {
  const AttentionShape& s = p.shape;
  const MaskParams& mask = p.mask;
  const int64_t tile_q = mask.tile_q, tile_kv = mask.tile_kv;
  const int64_t padded_dim = round_up(s.head_dim, kGemmCols);
  const int64_t num_q_tiles = s.num_q_tiles(tile_q);
  const int64_t num_kv_tiles = s.num_kv_tiles(tile_kv);
  const int64_t q_row_stride = s.q_heads * s.head_dim;
  const int64_t kv_row_stride = s.kv_heads * s.head_dim;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* out = static_cast<const T*>(p.out);
  const T* d_out = static_cast<const T*>(p.d_out);
  auto q_offset = [&](int64_t b, int64_t h, int64_t q0) {
    return ((b * s.q_len + q0) * s.q_heads + h) * s.head_dim;
  };
  auto kv_offset = [&](int64_t b, int64_t kv_h, int64_t k0) {
    return ((b * s.kv_len + k0) * s.kv_heads + kv_h) * s.head_dim;
  };


  // bf16 where the level has bf16 products (AMX tiles, else AVX512-BF16
  // vdpbf16ps): S = Q K^T and dP = dO V^T as bf16 products. With vdpbf16ps
  // and tiles of whole 32-row and 32-key chunks (the default 64 x 128) the
  // other three run in bf16 too (`all_bf16`), as FlashAttention-2 does on
  // GPUs: P and dS rounded to bf16, float32 accumulators; dV^T += dO^T P
  // and dK^T += Q^T dS, so that P and dS are the packed B operands and
  // dO^T, Q^T are packed once per work item; dQ += dS K. Otherwise (and on
  // AMX tiles) those three stay float32.
  bool use_bf16 = false, use_amx = false, all_bf16 = false;
  const uint32_t* k_vnni = nullptr;
  const uint32_t* v_vnni = nullptr;
  const uint32_t* k_pairs = nullptr;  // K in V order (keys in pairs): B of dQ += dS K
  int64_t vnni_tile_dwords = 0;
#ifdef FASTATTN_HAVE_BF16_TILES
  if constexpr (std::is_same_v<T, bf16_t>) {
    use_bf16 = padded_dim % kBf16DimChunk == 0;
#ifdef FASTATTN_HAVE_AMX_TILES
    use_amx = use_bf16 && amx_available();
#endif
    all_bf16 = use_bf16 && !use_amx && tile_q % kBf16KeyChunk == 0 && tile_kv % kBf16KeyChunk == 0;
    if (use_bf16) {
      const PackedBf16Kv k_packed = pack_bf16_kv(k, all_bf16 ? k : nullptr, s, mask, padded_dim, 0);
      const PackedBf16Kv v_packed = pack_bf16_kv(v, nullptr, s, mask, padded_dim, 2);
      k_vnni = k_packed.k;
      k_pairs = k_packed.v;
      v_vnni = v_packed.k;
      vnni_tile_dwords = k_packed.tile_dwords;
    }
  }
#endif
  // K^T and V^T in float32 only where S and dP are float32 products.
  const PackedKv k_t_tiles =
      use_bf16 ? PackedKv{} : pack_kv_tiles(k, s, mask, padded_dim, KvLayout::kTransposed, 0);
  const PackedKv v_t_tiles =
      use_bf16 ? PackedKv{} : pack_kv_tiles(v, s, mask, padded_dim, KvLayout::kTransposed, 1);
  const PackedKv k_tiles = all_bf16 ? PackedKv{} : pack_kv_tiles(k, s, mask, padded_dim, KvLayout::kRows, 2);

  // delta = rowsum(dO * O) - dlse, [B, Hq, Sq].
  std::vector<float> delta(s.batch * s.q_heads * s.q_len);
  parallel_for(s.batch * s.q_heads, [&](int64_t bh) {
    const int64_t b = bh / s.q_heads, h = bh % s.q_heads;
    for (int64_t i = 0; i < s.q_len; ++i) {
      const int64_t offset = q_offset(b, h, i);
      float dot = 0.f;
      for (int64_t d = 0; d < s.head_dim; ++d) {
        dot += to_float(d_out[offset + d]) * to_float(out[offset + d]);
      }
      const int64_t row = bh * s.q_len + i;
      delta[row] = dot - (p.d_lse != nullptr ? p.d_lse[row] : 0.f);
    }
  });

  // One pass over the tile pairs: a work item (kv chunk, batch, kv head)
  // owns the kv tiles of its chunk, visits every q head of its GQA group and
  // every non-empty q tile, and computes P and dS once per pair for all three
  // products (dV += P^T dO, dK += dS^T Q, dQ += dS K): 5 matrix products
  // per pair instead of the 7 of a dK/dV pass and a separate dQ pass. dK and
  // dV of a kv tile are complete when the item leaves it. dQ rows receive
  // from every kv tile, so each item accumulates its own dQ partial; with
  // one chunk that partial is the whole dQ and is written out directly,
  // otherwise the partials of the chunks are summed in chunk order
  // afterwards: no atomics.
  const int64_t group = s.group();
  const int64_t group_rows = s.batch * s.kv_heads;
  if (group_rows == 0) return;
  // Rows per head of the bf16 q side: the bf16 products read round_up(rows, 16) rows from
  // a q tile's first row, which need not be a multiple of 16 (tile_q is any
  // size), so up to 15 rows past q_len; they are zero.
  const int64_t rows_padded = round_up(s.q_len, 16) + 16;
  const int64_t dq_elems = group * s.q_len * padded_dim;  // one item's dQ partial
  // The number of chunks depends on the shape only, never on the thread
  // count, so that the result is the same bit for bit on any machine: about
  // 64 items wanted (enough for pools of up to ~16 threads), chunks of at
  // least 4 kv tiles (the last may be shorter), at most 1 GiB of partials.
  constexpr int64_t kWantedItems = 64;
  int64_t num_chunks = std::min<int64_t>((kWantedItems + group_rows - 1) / group_rows,
                                         std::max<int64_t>(1, num_kv_tiles / 4));
  while (num_chunks > 1 && num_chunks * group_rows * dq_elems * 4 > (int64_t{1} << 30)) --num_chunks;
  const int64_t tiles_per_chunk = (num_kv_tiles + num_chunks - 1) / num_chunks;
  num_chunks = (num_kv_tiles + tiles_per_chunk - 1) / tiles_per_chunk;
  // Not zeroed here: each item zeroes its own partial before accumulating.
  const std::unique_ptr<float[]> dq_partials(num_chunks > 1 ? new float[num_chunks * group_rows * dq_elems]
                                                             : nullptr);

  auto write_d_q = [&](const float* acc, int64_t b, int64_t h, int64_t i0, int64_t rows) {
    T* d_q_out = static_cast<T*>(p.d_q) + q_offset(b, h, i0);
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t d = 0; d < s.head_dim; ++d) {
        from_float(p.softmax_scale * acc[i * padded_dim + d], &d_q_out[i * q_row_stride + d]);
      }
    }
  };

  // Chunk-major order: under a causal mask the first chunks (earliest keys)
  // carry the most q tiles, so the heaviest items start first.
  parallel_for(num_chunks * group_rows, [&](int64_t item) {
    const int64_t chunk = item / group_rows;
    const int64_t b = (item % group_rows) / s.kv_heads;
    const int64_t kv_h = item % s.kv_heads;
    const int64_t first_tile = chunk * tiles_per_chunk;
    const int64_t last_tile = std::min(num_kv_tiles, first_tile + tiles_per_chunk);
    Scratch& scratch = thread_scratch();

    // The group's q side, packed once per item: scale*Q and dO in float32
    // [group][Sq][Dp], and for the bf16 products Q and dO [group][rows_padded][Dp], zero
    // past Sq.
    float* q_scaled = all_bf16 ? nullptr : scratch.get(0, dq_elems);
    float* d_out_rows = all_bf16 ? nullptr : scratch.get(1, dq_elems);
    bf16_t* q_bf16 = nullptr;
    bf16_t* d_out_bf16 = nullptr;
    for (int64_t g = 0; g < group && !all_bf16; ++g) {
      const int64_t h = kv_h * group + g;
      pack_rows(q_scaled + g * s.q_len * padded_dim, padded_dim, q + q_offset(b, h, 0), q_row_stride,
                s.q_len, s.head_dim, p.softmax_scale, nullptr);
      pack_rows(d_out_rows + g * s.q_len * padded_dim, padded_dim, d_out + q_offset(b, h, 0),
                q_row_stride, s.q_len, s.head_dim, 1.f, nullptr);
    }
    // Q and dO of the group as bf16 (T is bf16 wherever this runs), `per_head`
    // elements a head, zero where `place` (head's array, row index, source
    // row) puts nothing.
    auto pack_group_bf16 = [&](bf16_t* q_dst, bf16_t* d_out_dst, int64_t per_head, auto&& place) {
      for (int slot = 0; slot < 2; ++slot) {
        bf16_t* dst_all = slot == 0 ? q_dst : d_out_dst;
        const T* src_all = slot == 0 ? q : d_out;
        std::fill(dst_all, dst_all + group * per_head, bf16_t{0});
        for (int64_t g = 0; g < group; ++g) {
          const T* src = src_all + q_offset(b, kv_h * group + g, 0);
          for (int64_t i = 0; i < s.q_len; ++i) place(dst_all + g * per_head, i, src + i * q_row_stride);
        }
      }
    };
    if constexpr (std::is_same_v<T, bf16_t>) {
      if (use_bf16) {
        const int64_t per_head = rows_padded * padded_dim;
        q_bf16 = reinterpret_cast<bf16_t*>(scratch.get(8, (group * per_head + 1) / 2));
        d_out_bf16 = reinterpret_cast<bf16_t*>(scratch.get(9, (group * per_head + 1) / 2));
        pack_group_bf16(q_bf16, d_out_bf16, per_head, [&](bf16_t* dst, int64_t i, const T* row) {
          std::copy(row, row + s.head_dim, dst + i * padded_dim);
        });
      }
    }
#ifdef FASTATTN_HAVE_BF16_TILES
    // all_bf16: Q^T and dO^T as bf16, q tile by q tile: [group][q tile][Dp]
    // [tile_q], zero past Sq: the A operands of dK^T += Q^T dS and
    // dV^T += dO^T P, each tile's rows tile_q * 2 bytes apart (with the whole
    // [Dp][Sq] as one array, the 8 rows a register block reads were Sq * 2
    // bytes apart, a multiple of 4 KiB at S = 4K: one L1 set).
    bf16_t* q_t_bf16 = nullptr;
    bf16_t* d_out_t_bf16 = nullptr;
    if constexpr (std::is_same_v<T, bf16_t>) {
      if (all_bf16) {
        const int64_t per_head = num_q_tiles * padded_dim * tile_q;
        q_t_bf16 = reinterpret_cast<bf16_t*>(scratch.get(0, (group * per_head + 1) / 2));
        d_out_t_bf16 = reinterpret_cast<bf16_t*>(scratch.get(1, (group * per_head + 1) / 2));
        pack_group_bf16(q_t_bf16, d_out_t_bf16, per_head, [&](bf16_t* dst, int64_t i, const T* row) {
          bf16_t* tile_column = dst + (i / tile_q) * padded_dim * tile_q + i % tile_q;
          for (int64_t d = 0; d < s.head_dim; ++d) tile_column[d * tile_q] = row[d];
        });
      }
    }
    // Per tile pair: P and dS as B operands (row pairs), dS as bf16 rows,
    // and dS K of the tile before it is added to the item's dQ.
    uint32_t* p_pairs = nullptr;
    uint32_t* d_logits_pairs = nullptr;
    bf16_t* d_logits_bf16 = nullptr;
    float* d_q_tile = nullptr;
    if (all_bf16) {
      const int64_t pair_floats = round_up(tile_q, kBf16KeyChunk) / 2 * tile_kv;
      p_pairs = reinterpret_cast<uint32_t*>(scratch.get(10, pair_floats));
      d_logits_pairs = reinterpret_cast<uint32_t*>(scratch.get(11, pair_floats));
      d_logits_bf16 = reinterpret_cast<bf16_t*>(scratch.get(12, round_up(tile_q, kTileRows) * tile_kv / 2));
      d_q_tile = scratch.get(13, round_up(tile_q, kTileRows) * padded_dim);
    }
#endif
    float* d_q_acc = num_chunks == 1
                         ? scratch.get(2, dq_elems)
                         : dq_partials.get() + (chunk * group_rows + b * s.kv_heads + kv_h) * dq_elems;
    std::fill(d_q_acc, d_q_acc + dq_elems, 0.f);

    TileGradients t{scratch.get(4, round_up(tile_q, 16) * tile_kv),
                    scratch.get(5, round_up(tile_q, 16) * tile_kv)};
#ifdef FASTATTN_HAVE_AMX_TILES
    std::optional<AmxTileScope> tiles;
    if (use_amx) tiles.emplace(uniform_tile_config());
#endif
    float* d_k = scratch.get(6, tile_kv * padded_dim);
    float* d_v = scratch.get(7, tile_kv * padded_dim);
    for (int64_t kv_tile = first_tile; kv_tile < last_tile; ++kv_tile) {
      const int64_t k0 = kv_tile * tile_kv;
      const int64_t keys = std::min(tile_kv, s.kv_len - k0);
      const float* k_t = k_t_tiles.tile(b, kv_h, kv_tile);
      const float* v_t = v_t_tiles.tile(b, kv_h, kv_tile);
      const float* k_rows = k_tiles.tile(b, kv_h, kv_tile);
      const int64_t tile_index = (b * s.kv_heads + kv_h) * num_kv_tiles + kv_tile;
      Bf16Operands bf16;
      if (use_bf16) {
        bf16.k = k_vnni + tile_index * vnni_tile_dwords;
        bf16.v = v_vnni + tile_index * vnni_tile_dwords;
        bf16.amx = use_amx;
      }
      std::fill(d_k, d_k + tile_kv * padded_dim, 0.f);
      std::fill(d_v, d_v + tile_kv * padded_dim, 0.f);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kv_h * group + g;
        for (int64_t q_tile = 0; q_tile < num_q_tiles; ++q_tile) {
          const int64_t q0 = q_tile * tile_q;
          const int64_t rows = std::min(tile_q, s.q_len - q0);
          const int64_t row0 = (b * s.q_heads + h) * s.q_len + q0;
          float* d_bias_tile = p.d_bias == nullptr ? nullptr : p.d_bias + (row0 * s.kv_len) + k0;
          const int8_t cls = tile_class_at(mask, b, h, q_tile, kv_tile, num_q_tiles, num_kv_tiles);
          if (cls == kEmpty) {
            if (d_bias_tile != nullptr) {
              for (int64_t i = 0; i < rows; ++i) {
                std::fill(d_bias_tile + i * s.kv_len, d_bias_tile + i * s.kv_len + keys, 0.f);
              }
            }
            continue;
          }
          const int64_t q_side = (g * s.q_len + q0) * padded_dim;
          const float* q_tile_scaled = all_bf16 ? nullptr : q_scaled + q_side;
          const float* d_out_tile = all_bf16 ? nullptr : d_out_rows + q_side;
          if (use_bf16) {
            bf16.q = q_bf16 + (g * rows_padded + q0) * padded_dim;
            bf16.d_out = d_out_bf16 + (g * rows_padded + q0) * padded_dim;
          }
          tile_gradients(t, q_tile_scaled, d_out_tile, k_t, v_t, p.lse + row0, delta.data() + row0,
                         rows, tile_kv, padded_dim, p, b, h, q0, k0, keys, cls == kPartial, bf16);
#ifdef FASTATTN_HAVE_BF16_TILES
          if (all_bf16) {
            // dV^T += dO^T P ; dK^T += Q^T dS (times scale at the end) ; dQ += dS K
            const int64_t q_chunks = (rows + kBf16KeyChunk - 1) / kBf16KeyChunk;
            const int64_t rows_p = round_up(rows, kTileRows);
            const int64_t q_t_offset = (g * num_q_tiles + q_tile) * padded_dim * tile_q;
            pack_row_pairs_bf16(p_pairs, t.probs, tile_kv, rows, tile_kv);
            pack_row_pairs_bf16(d_logits_pairs, t.d_logits, tile_kv, rows, tile_kv);
            dot_accumulate_pv(d_v, tile_kv, d_out_t_bf16 + q_t_offset, tile_q, p_pairs, padded_dim, q_chunks);
            dot_accumulate_pv(d_k, tile_kv, q_t_bf16 + q_t_offset, tile_q, d_logits_pairs, padded_dim, q_chunks);
            rows_to_bf16(d_logits_bf16, t.d_logits, rows, rows_p, tile_kv);
            std::fill(d_q_tile, d_q_tile + rows_p * padded_dim, 0.f);
            dot_accumulate_pv(d_q_tile, padded_dim, d_logits_bf16, tile_kv, k_pairs + tile_index * vnni_tile_dwords,
                              rows_p, (keys + kBf16KeyChunk - 1) / kBf16KeyChunk);
            float* d_q_rows = d_q_acc + q_side;
            for (int64_t e = 0; e < rows * padded_dim; e += kLanes) {
              store(d_q_rows + e, load(d_q_rows + e) + load(d_q_tile + e));
            }
          } else
#endif
          {
            // dV += P^T dO ; dK += dS^T (scale * Q) ; dQ += dS K (times scale at the end)
            gemm_accumulate(d_v, padded_dim, t.probs, 1, tile_kv, d_out_tile, padded_dim, keys,
                            padded_dim, rows);
            gemm_accumulate(d_k, padded_dim, t.d_logits, 1, tile_kv, q_tile_scaled, padded_dim, keys,
                            padded_dim, rows);
            gemm_accumulate(d_q_acc + q_side, padded_dim, t.d_logits, tile_kv, 1, k_rows, padded_dim,
                            rows, padded_dim, keys);
          }
          if (d_bias_tile != nullptr) {
            for (int64_t i = 0; i < rows; ++i) {
              std::copy(t.d_logits + i * tile_kv, t.d_logits + i * tile_kv + keys,
                        d_bias_tile + i * s.kv_len);
            }
          }
        }
      }
      T* d_k_out = static_cast<T*>(p.d_k) + kv_offset(b, kv_h, k0);
      T* d_v_out = static_cast<T*>(p.d_v) + kv_offset(b, kv_h, k0);
      // d_k, d_v: [tile_kv][Dp], or transposed [Dp][tile_kv] with dK not yet scaled (all_bf16).
      const int64_t key_step = all_bf16 ? 1 : padded_dim, dim_step = all_bf16 ? tile_kv : 1;
      const float d_k_scale = all_bf16 ? p.softmax_scale : 1.f;
      for (int64_t j = 0; j < keys; ++j) {
        for (int64_t d = 0; d < s.head_dim; ++d) {
          from_float(d_k_scale * d_k[j * key_step + d * dim_step], &d_k_out[j * kv_row_stride + d]);
          from_float(d_v[j * key_step + d * dim_step], &d_v_out[j * kv_row_stride + d]);
        }
      }
    }
    if (num_chunks == 1) {
      for (int64_t g = 0; g < group; ++g) {
        write_d_q(d_q_acc + g * s.q_len * padded_dim, b, kv_h * group + g, 0, s.q_len);
      }
    }
  });
  if (num_chunks == 1) return;

  // dQ = scale * (sum of the chunks' partials), per (batch, q head, q tile).
  parallel_for(s.batch * s.q_heads * num_q_tiles, [&](int64_t item) {
    const int64_t q_tile = item % num_q_tiles;
    const int64_t h = (item / num_q_tiles) % s.q_heads;
    const int64_t b = item / (num_q_tiles * s.q_heads);
    const int64_t q0 = q_tile * tile_q;
    const int64_t rows = std::min(tile_q, s.q_len - q0);
    const int64_t offset = (b * s.kv_heads + h / group) * dq_elems +
                           ((h % group) * s.q_len + q0) * padded_dim;
    float* sum = thread_scratch().get(3, tile_q * padded_dim);
    std::copy(dq_partials.get() + offset, dq_partials.get() + offset + rows * padded_dim, sum);
    for (int64_t c = 1; c < num_chunks; ++c) {
      const float* part = dq_partials.get() + c * group_rows * dq_elems + offset;
      for (int64_t e = 0; e < rows * padded_dim; e += kLanes) store(sum + e, load(sum + e) + load(part + e));
    }
    write_d_q(sum, b, h, q0, rows);
  });
}

}  // namespace

void flash_backward(const BackwardParams& params) {
  dispatch_element_type(params.dtype, [&](auto tag) { backward_typed<decltype(tag)>(params); });
}

}  // namespace FASTATTN_ISA_NS
}  // namespace cpu
}  // namespace fastattn
