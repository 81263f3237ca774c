// The float32 FMA peak of one core: twelve independent chains of 512-bit
// vfmadd (enough to cover the FMA latency on both ports), timed five times.
// Run one copy per core at once to see the peak with every core busy:
//   g++ -O2 -mavx512f -mfma tools/fma_peak.cc -o /tmp/fma_peak
//   taskset -c 0 /tmp/fma_peak & taskset -c 1 /tmp/fma_peak; wait
#include <immintrin.h>

#include <chrono>
#include <cstdio>

int main() {
  constexpr int kChains = 12;
  constexpr long kSteps = 200000000;
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_setzero_ps();
  const __m512 a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(1e-7f);
  for (int rep = 0; rep < 5; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    for (long k = 0; k < kSteps; ++k) {
#pragma GCC unroll 12
      for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("%.1f GFLOP/s\n", kSteps * kChains * 16 * 2 / seconds / 1e9);
  }
  // The sum keeps the chains live.
  float sum = 0.f;
  for (int i = 0; i < kChains; ++i) sum += _mm512_reduce_add_ps(acc[i]);
  std::printf("(checksum %g)\n", sum);
}
