// Costs of the AMX operations the bf16 CPU kernels are built from, on one
// core: TDPBF16PS with operands already in tile registers, TILELOADD of a
// 1 KiB tile from L1, TILESTORED, and the 2x2-blocked product step of
// bf16_tiles.h (four operand loads feeding four products). The bf16
// kernels' speed limit follows from these: see docs/BENCHMARKS.md.
//
//   g++ -O2 -std=c++17 -march=x86-64-v4 -mavx512bf16 -mamx-tile -mamx-bf16
//       -Ixla_ffi tools/amx_probe.cc -o /tmp/amx_probe && /tmp/amx_probe [GHz]
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cpu/amx_tiles.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)  // as amx_tiles.h
using fastattn::cpu::AmxTileConfig;
using fastattn::cpu::AmxTileScope;
using fastattn::cpu::amx_available;

namespace {

constexpr int kSteps = 200000;

// Seconds per operation of `step`, which performs `ops` operations.
template <typename Step>
double seconds_per_op(Step step, int ops) {
  step(0);  // warm-up
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < kSteps; ++i) step(i);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return seconds / (double(kSteps) * ops);
}

}  // namespace

int main(int argc, char** argv) {
  const double ghz = argc > 1 ? std::atof(argv[1]) : 0.0;
  if (!amx_available()) {
    std::fprintf(stderr, "this CPU or kernel does not grant the AMX tile registers\n");
    return 1;
  }
  // 32 KiB of operands (L1-resident): 4 slots of 8 KiB, each probe step
  // reading 4 tiles of 1 KiB from one slot.
  std::vector<uint32_t> operands(8192, 0x3f803f80u);  // bf16 1.0 pairs
  std::vector<float> results(16 * 32);
  AmxTileConfig config;
  for (int t = 0; t < 8; ++t) config.tile(t, 16, 64);
  AmxTileScope scope(config);
  const uint32_t* base = operands.data();
  auto slot = [&](int i) { return base + (i & 3) * 2048; };
  // The operand registers 4-7 from one slot (tile register numbers are
  // immediates): the load probe, and the operands of the product probe.
  auto load_operands = [](const uint32_t* b) {
    _tile_loadd(4, b, 64);
    _tile_loadd(5, b + 256, 64);
    _tile_loadd(6, b + 512, 64);
    _tile_loadd(7, b + 768, 64);
  };
  load_operands(base);

  struct Row {
    const char* what;
    double seconds;
  };
  Row rows[] = {
      {"TDPBF16PS, 4 independent accumulators", seconds_per_op([&](int) {
         _tile_dpbf16ps(0, 4, 6);
         _tile_dpbf16ps(1, 4, 7);
         _tile_dpbf16ps(2, 5, 6);
         _tile_dpbf16ps(3, 5, 7);
       }, 4)},
      {"TILELOADD of 1 KiB from L1, 4 registers", seconds_per_op([&](int i) { load_operands(slot(i)); }, 4)},
      {"TILESTORED of 1 KiB, 2 registers", seconds_per_op([&](int) {
         _tile_stored(0, results.data(), 128);
         _tile_stored(1, results.data() + 16, 128);
       }, 2)},
      {"2x2 product step: 4 loads + 4 TDPBF16PS (per product)", seconds_per_op([&](int i) {
         const uint32_t* b = slot(i);
         _tile_loadd(4, b, 64);
         _tile_loadd(6, b + 256, 64);
         _tile_loadd(7, b + 512, 64);
         _tile_dpbf16ps(0, 4, 6);
         _tile_dpbf16ps(1, 4, 7);
         _tile_loadd(5, b + 768, 64);
         _tile_dpbf16ps(2, 5, 6);
         _tile_dpbf16ps(3, 5, 7);
       }, 4)},
  };
  for (const Row& row : rows) {
    if (ghz > 0) {
      std::printf("%-56s %6.2f ns  %5.1f cycles at %.2f GHz\n", row.what, row.seconds * 1e9, row.seconds * ghz * 1e9,
                  ghz);
    } else {
      std::printf("%-56s %6.2f ns\n", row.what, row.seconds * 1e9);
    }
  }
  return 0;
}
#else
int main() {
  std::fprintf(stderr, "built without AMX (-mamx-tile -mamx-bf16)\n");
  return 1;
}
#endif
