// Decode pass 1 (logits q_h . k_j of a block of 16 keys) on AMX tiles, for
// bf16 caches: one TDPBF16PS multiplies a 16-key x 32-dim slice of K (loaded
// straight from the cache rows, any row stride) by the matching 32-dim
// slice of the group's queries, laid out once per work item as the VNNI B
// tile. On this project's CPU machine (Xeon with AMX, 2 vCPUs) this pass took
// 110 ns per key with vdpbf16ps and 44 ns on AMX (cache-resident micro
// benchmark, D=128, 8 kv heads x 4 q heads). Built where the compiler targets
// AMX-BF16; used only after Linux granted the tile state (arch_prctl).
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

// Logits of `group` query heads (at most 16) against 16 keys, D = 32 kChunks.
class AmxLogits {
 public:
  // Configures this thread's tiles: 0 = logits [16 keys][group] f32,
  // 1 = a K slice [16 keys][32 bf16], 2 = a query slice [16 dim pairs][group].
  explicit AmxLogits(int64_t group) : group_(group) {
    Config config{};
    config.palette = 1;
    config.rows[0] = 16;
    config.bytes_per_row[0] = uint16_t(group * 4);
    config.rows[1] = 16;
    config.bytes_per_row[1] = 64;
    config.rows[2] = 16;
    config.bytes_per_row[2] = uint16_t(group * 4);
    _tile_loadconfig(&config);
  }
  ~AmxLogits() { _tile_release(); }
  AmxLogits(const AmxLogits&) = delete;
  AmxLogits& operator=(const AmxLogits&) = delete;

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
  void run(const bf16_t* k_row0, int64_t row_stride, const uint32_t* q_pairs_of_head,
           int64_t chunks, float* logits) const {
    _tile_zero(0);
    for (int64_t c = 0; c < chunks; ++c) {
      _tile_loadd(1, k_row0 + c * 32, row_stride);
      _tile_loadd(2, q_pairs_of_head + c * 16 * group_, group_ * 4);
      _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, logits, group_ * 4);
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
