// The two passes of decode over a block of 16 keys on AMX tiles, for bf16
// caches. Pass 1 (logits q_h . k_j): one TDPBF16PS multiplies a 16-key x
// 32-dim slice of K, loaded straight from the cache rows (any row stride), by
// the matching slice of the group's queries, laid out once per work item as
// the VNNI B tile. Pass 2 (acc_h += sum_j w_hj v_j): A = the weights as bf16
// [group][16 keys], B = V rows interleaved two keys at a time (the VNNI
// layout, staged in L1), C = the output rows in "pair order" (bf16_dot.h),
// loaded from and stored back to the accumulators. On this project's CPU
// machine (Xeon with AMX, 2 vCPUs), pass 1 took 110 ns per key with
// vdpbf16ps and 44 ns on AMX (cache-resident micro benchmark, D=128, 8 kv
// heads x 4 q heads). Built where the compiler targets AMX-BF16; used only
// after Linux granted the tile state (arch_prctl).
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define FASTATTN_HAVE_AMX 1

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

#include "../common/dtypes.h"

namespace fastattn {
namespace cpu {

// True once the kernel let this process use the AMX tile registers.
inline bool amx_available() {
  static const bool granted = [] {
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return granted;
}

// Both passes for `group` query heads (at most 16) of a kv head and 16 keys;
// head dims are multiples of 32.
class AmxDecode {
 public:
  // Configures this thread's tiles. Pass 1: 0 = logits [16 keys][group] f32,
  // 1 = a K slice [16 keys][32 bf16], 2 = a query slice [16 dim pairs][group].
  // Pass 2: 3 = output columns [group][16] f32, 4 = weights [group][16 keys]
  // bf16, 5 = a V slice [8 key pairs][16 columns x 2 keys].
  explicit AmxDecode(int64_t group) : group_(group) {
    Config config{};
    config.palette = 1;
    config.rows[0] = 16;
    config.bytes_per_row[0] = uint16_t(group * 4);
    config.rows[1] = 16;
    config.bytes_per_row[1] = 64;
    config.rows[2] = 16;
    config.bytes_per_row[2] = uint16_t(group * 4);
    config.rows[3] = uint8_t(group);
    config.bytes_per_row[3] = 64;
    config.rows[4] = uint8_t(group);
    config.bytes_per_row[4] = 32;
    config.rows[5] = 8;
    config.bytes_per_row[5] = 64;
    _tile_loadconfig(&config);
  }
  ~AmxDecode() { _tile_release(); }
  AmxDecode(const AmxDecode&) = delete;
  AmxDecode& operator=(const AmxDecode&) = delete;

  // q_pairs [kv_heads][chunks][16][group] dwords from q [q_heads][D] bf16:
  // pair kk of chunk c of head g holds dims c*32 + 2kk, +1 (the VNNI layout).
  static void pack_queries(const bf16_t* q, int64_t kv_heads, int64_t group, int64_t head_dim,
                           uint32_t* q_pairs) {
    const int64_t chunks = head_dim / 32;
    for (int64_t kv_h = 0; kv_h < kv_heads; ++kv_h) {
      for (int64_t c = 0; c < chunks; ++c) {
        for (int64_t kk = 0; kk < 16; ++kk) {
          for (int64_t g = 0; g < group; ++g) {
            const bf16_t* pair = q + (kv_h * group + g) * head_dim + c * 32 + 2 * kk;
            q_pairs[((kv_h * chunks + c) * 16 + kk) * group + g] =
                uint32_t{pair[0].bits} | uint32_t{pair[1].bits} << 16;
          }
        }
      }
    }
  }

  // logits[j][g] (f32, row j of 16 keys) = q_{kv_h, g} . k_j for the rows
  // k_row0 + j * row_stride (bytes) of one kv head.
  void logits(const bf16_t* k_row0, int64_t row_stride, const uint32_t* q_pairs_of_head,
           int64_t chunks, float* logits) const {
    _tile_zero(0);
    for (int64_t c = 0; c < chunks; ++c) {
      _tile_loadd(1, k_row0 + c * 32, row_stride);
      _tile_loadd(2, q_pairs_of_head + c * 16 * group_, group_ * 4);
      _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, logits, group_ * 4);
  }

  // acc[h][d] (pair order, row stride head_dim floats) += sum_j
  // weight_pairs[h][j] v_j[d] over the 16 rows v_rows[j] (+ offset) of one kv
  // head; weight_pairs [group][8] dwords are the bf16 weights of the block
  // (0 past its valid keys, whose row pointers repeat a valid row).
  void weighted_values(const bf16_t* const* v_rows, int64_t offset, int64_t head_dim,
                       const uint32_t* weight_pairs, float* acc) const {
    alignas(64) bf16_t staged[2][8][32];  // [low/high][key pair][16 columns x 2 keys]
    _tile_loadd(4, weight_pairs, 32);
    for (int64_t c = 0; c < head_dim / 32; ++c) {
      for (int pair = 0; pair < 8; ++pair) {
        const __m512i even = _mm512_loadu_si512(v_rows[2 * pair] + offset + c * 32);
        const __m512i odd = _mm512_loadu_si512(v_rows[2 * pair + 1] + offset + c * 32);
        _mm512_store_si512(staged[0][pair], _mm512_unpacklo_epi16(even, odd));
        _mm512_store_si512(staged[1][pair], _mm512_unpackhi_epi16(even, odd));
      }
      _tile_loadd(3, acc + c * 32, head_dim * 4);
      _tile_loadd(5, staged[0], 64);
      _tile_dpbf16ps(3, 4, 5);
      _tile_stored(3, acc + c * 32, head_dim * 4);
      _tile_loadd(3, acc + c * 32 + 16, head_dim * 4);
      _tile_loadd(5, staged[1], 64);
      _tile_dpbf16ps(3, 4, 5);
      _tile_stored(3, acc + c * 32 + 16, head_dim * 4);
    }
  }

 private:
  struct alignas(64) Config {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
  };
  int64_t group_;
};

}  // namespace cpu
}  // namespace fastattn

#endif  // __AMX_TILE__ && __AMX_BF16__
