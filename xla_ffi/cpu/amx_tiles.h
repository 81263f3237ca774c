// What every AMX kernel of a level shares (the bf16 forward and backward in
// bf16_tiles.h, the decode steps in amx_decode.h): Linux's permission to use
// the tile registers, and the tile configuration as a scope that loads it
// and releases the tiles at its end, so two kernels' configurations never
// meet on one thread.
#pragma once

#include "isa_namespace.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace fastattn {
namespace cpu {
inline namespace FASTATTN_ISA_NS {

// True once the kernel let this process use the AMX tile registers (Linux
// 5.16+ grants the tile data state per process, on request).
inline bool amx_available() {
  static const bool granted = [] {
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return granted;
}

// The 64-byte tile configuration of LDTILECFG (palette 1): rows and bytes
// per row of each of the 8 tile registers (0 = unused).
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};

  AmxTileConfig& tile(int index, int tile_rows, int row_bytes) {
    rows[index] = uint8_t(tile_rows);
    bytes_per_row[index] = uint16_t(row_bytes);
    return *this;
  }
};

// Loads a configuration for the lifetime of the scope (one work item).
class AmxTileScope {
 public:
  explicit AmxTileScope(const AmxTileConfig& config) { _tile_loadconfig(&config); }
  ~AmxTileScope() { _tile_release(); }
  AmxTileScope(const AmxTileScope&) = delete;
  AmxTileScope& operator=(const AmxTileScope&) = delete;
};

}  // namespace FASTATTN_ISA_NS
}  // namespace cpu
}  // namespace fastattn

#endif  // __AMX_TILE__ && __AMX_BF16__
