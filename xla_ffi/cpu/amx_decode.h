// One step of the decode kernel over 32 keys on AMX tiles, for bf16 caches.
// Pass 1 (logits q_h . k_j): one TDPBF16PS multiplies a 16-key x 32-dim
// slice of K, loaded straight from the cache rows (any row stride), by the
// matching slice of the group's queries, laid out once per work item as the
// VNNI B tile. Online softmax over the 32 logits of each head. Pass 2
// (acc_h += sum_j w_hj v_j): A = the weights as bf16 [group][32 keys], B =
// V rows interleaved two keys at a time (the VNNI layout, staged in L1), C
// = the output rows in "pair order" (bf16_dot.h), loaded from and stored
// back to the accumulators. 32 keys fill the tile depth of pass 2 (K = 32)
// and halve the per-head softmax work per key against 16-key blocks.
// On a 2-vCPU Xeon with AMX, pass 1 took 110
// ns per key with vdpbf16ps and 44 ns on AMX (cache-resident micro benchmark,
// D=128, 8 kv heads x 4 q heads). Built where the compiler targets
// AMX-BF16; used only after Linux granted the tile state (arch_prctl).
#pragma once

#include "isa_namespace.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define FASTATTN_HAVE_AMX 1

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "../common/dtypes.h"
#include "amx_tiles.h"
#include "tile_ops.h"
#include "vec_math.h"

namespace fastattn {
namespace cpu {
inline namespace FASTATTN_ISA_NS {

// The running softmax state of one work item (one batch row, a range of
// keys), all query heads: max and sum per head, accumulators [q_heads][D]
// in pair order.
struct DecodeState {
  float* row_max;
  float* row_sum;
  float* acc;
};

// Steps of 32 keys for `group` query heads per kv head (at most 16) and
// head dims that are multiples of 32.
class AmxDecode {
 public:
  static constexpr int64_t kKeys = 32;

  // Configures this thread's tiles. Pass 1: 0 = logits [16 keys][group] f32,
  // 1 = a K slice [16 keys][32 bf16], 2 = a query slice [16 dim pairs][group].
  // Pass 2: 3 = output columns [group][16] f32, 4 = weights [group][32 keys]
  // bf16, 5 = a V slice [16 key pairs][16 columns x 2 keys].
  AmxDecode(int64_t kv_heads, int64_t group, int64_t head_dim)
      : tiles_(AmxTileConfig()
                   .tile(0, 16, int(group * 4))
                   .tile(1, 16, 64)
                   .tile(2, 16, int(group * 4))
                   .tile(3, int(group), 64)
                   .tile(4, int(group), 64)
                   .tile(5, 16, 64)),
        kv_heads_(kv_heads),
        group_(group),
        head_dim_(head_dim) {}
  AmxDecode(const AmxDecode&) = delete;
  AmxDecode& operator=(const AmxDecode&) = delete;

  // q_pairs [kv_heads][chunks][16][group] dwords from q [q_heads][D] bf16:
  // pair kk of chunk c of head g holds dims c*32 + 2kk, +1 (the VNNI layout).
  void pack_queries(const bf16_t* q, uint32_t* q_pairs) const {
    const int64_t chunks = head_dim_ / 32;
    for (int64_t kv_h = 0; kv_h < kv_heads_; ++kv_h) {
      for (int64_t c = 0; c < chunks; ++c) {
        for (int64_t kk = 0; kk < 16; ++kk) {
          for (int64_t g = 0; g < group_; ++g) {
            const bf16_t* pair = q + (kv_h * group_ + g) * head_dim_ + c * 32 + 2 * kk;
            q_pairs[((kv_h * chunks + c) * 16 + kk) * group_ + g] =
                uint32_t{pair[0].bits} | uint32_t{pair[1].bits} << 16;
          }
        }
      }
    }
  }

  // Keys j0..j0+31: rows of kv head 0 at k_half[i] + j * row_stride (bytes)
  // for the 16 keys of half i (likewise v_half); all valid. `scratch` holds
  // q_heads * 32 floats.
  void step(const bf16_t* const* k_half, const bf16_t* const* v_half, int64_t row_stride,
            const uint32_t* q_pairs, float scale, float* scratch, DecodeState state) const {
    const int64_t q_heads = kv_heads_ * group_;
    float* logits = scratch;  // [q_heads][32], then the weights in place
    for (int64_t kv_h = 0; kv_h < kv_heads_; ++kv_h) {
      for (int half = 0; half < 2; ++half) {
        alignas(64) float staged[16 * 16];  // [16 keys][group]
        pass1(k_half[half] + kv_h * head_dim_, row_stride, q_pairs + kv_h * (head_dim_ / 32) * 16 * group_,
              staged);
        for (int64_t g = 0; g < group_; ++g) {
          float* row = logits + (kv_h * group_ + g) * kKeys + half * 16;
          for (int64_t j = 0; j < 16; ++j) row[j] = staged[j * group_ + g];
        }
      }
    }
    alignas(64) uint32_t weight_pairs[16 * 16];  // [group][32 bf16] of one kv head
    for (int64_t h = 0; h < q_heads; ++h) {
      float* row = logits + h * kKeys;
      const vfloat low = load(row) * scale, high = load(row + 16) * scale;
      const float new_max = std::max(state.row_max[h], reduce_max(vmax(low, high)));
      const float correction = scalar_exp(state.row_max[h] - new_max);
      const vfloat w_low = vexp(low - new_max), w_high = vexp(high - new_max);
      store(row, w_low);
      store(row + 16, w_high);
      state.row_sum[h] = state.row_sum[h] * correction + reduce_sum(w_low + w_high);
      state.row_max[h] = new_max;
      if (correction != 1.f) {
        float* out = state.acc + h * head_dim_;
        for (int64_t d = 0; d < head_dim_; d += kLanes) store(out + d, load(out + d) * correction);
      }
    }
    for (int64_t kv_h = 0; kv_h < kv_heads_; ++kv_h) {
      for (int64_t g = 0; g < group_; ++g) {
        const float* w = logits + (kv_h * group_ + g) * kKeys;
        const __m512bh packed = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(w + 16), _mm512_loadu_ps(w));
        _mm512_store_si512(weight_pairs + g * 16, (__m512i)packed);
      }
      pass2(v_half, kv_h * head_dim_, row_stride, weight_pairs,
            state.acc + kv_h * group_ * head_dim_);
    }
  }

 private:
  // staged[j][g] (f32) = q_g . k_j for the 16 rows k_row0 + j * row_stride.
  void pass1(const bf16_t* k_row0, int64_t row_stride, const uint32_t* q_pairs_of_head,
             float* staged) const {
    _tile_zero(0);
    for (int64_t c = 0; c < head_dim_ / 32; ++c) {
      _tile_loadd(1, k_row0 + c * 32, row_stride);
      _tile_loadd(2, q_pairs_of_head + c * 16 * group_, group_ * 4);
      _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, staged, group_ * 4);
  }

  // acc[g][d] (pair order, row stride head_dim) += sum_j w[g][j] v_j[d] for
  // the 32 keys of the step (columns `offset`.. of each row).
  void pass2(const bf16_t* const* v_half, int64_t offset, int64_t row_stride,
             const uint32_t* weight_pairs, float* acc) const {
    alignas(64) bf16_t staged[2][16][32];  // [low/high][key pair][16 columns x 2 keys]
    const int64_t stride = row_stride / int64_t(sizeof(bf16_t));
    _tile_loadd(4, weight_pairs, 64);
    for (int64_t c = 0; c < head_dim_ / 32; ++c) {
      for (int pair = 0; pair < 16; ++pair) {
        const bf16_t* even = v_half[pair / 8] + (2 * (pair % 8)) * stride + offset + c * 32;
        const __m512i a = _mm512_loadu_si512(even), b = _mm512_loadu_si512(even + stride);
        _mm512_store_si512(staged[0][pair], _mm512_unpacklo_epi16(a, b));
        _mm512_store_si512(staged[1][pair], _mm512_unpackhi_epi16(a, b));
      }
      for (int half = 0; half < 2; ++half) {
        float* columns = acc + c * 32 + half * 16;
        _tile_loadd(3, columns, head_dim_ * 4);
        _tile_loadd(5, staged[half], 64);
        _tile_dpbf16ps(3, 4, 5);
        _tile_stored(3, columns, head_dim_ * 4);
      }
    }
  }

  AmxTileScope tiles_;
  int64_t kv_heads_, group_, head_dim_;
};

}  // namespace FASTATTN_ISA_NS
}  // namespace cpu
}  // namespace fastattn

#endif  // __AMX_TILE__ && __AMX_BF16__
