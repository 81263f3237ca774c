// The inner (register) level of the two-level tiling: a small matrix
// multiply-accumulate on float tiles already packed in L1/L2.
//
//   C[m][n] += sum_k A(m, k) * B[k][n]     for m < M, n < N, k < K
//
// A(m, k) = A[m * a_row_stride + k * a_k_stride], so the same routine takes A
// or A transposed (P^T dO, dS^T Q in the backward pass) without a copy. B is
// row-major with N contiguous, N a multiple of 32. The register block is
// kGemmRows rows x 32 columns. On AVX-512, 8 rows: 16 vector accumulators,
// 2 B loads and 8 broadcasts per k for 16 FMAs, so the FMA units, not the
// load ports, are the limit (measured on the 2-core CI machine, causal
// S=4096 D=64 forward: 4 rows 176, 6 rows 183, 8 rows 195 GFLOP/s).
#pragma once

#include "isa_namespace.h"

#include <cstdint>

#include "vec_math.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fastattn {
namespace cpu {
inline namespace FASTATTN_ISA_NS {

constexpr int kGemmCols = 2 * kLanes;  // N must be a multiple of this
#ifndef FASTATTN_GEMM_ROWS
#if defined(__AVX512F__)
#define FASTATTN_GEMM_ROWS 8  // 16 of 32 zmm registers hold accumulators
#else
#define FASTATTN_GEMM_ROWS 2  // AVX2: 8 of 16 ymm hold accumulators, 4 hold B
#endif
#endif
constexpr int kGemmRows = FASTATTN_GEMM_ROWS;

// Optional extras of a register block: kAccumulate = false starts the
// accumulators at zero instead of loading C (C = A B; no zero fill of C
// beforehand), and `prefetch_l2`, when not null, asks for K / 2 cache lines
// from there into L2 (one every second k), for the data of a later product.
inline void prefetch_line_l2(const char* line) { __builtin_prefetch(line, 0, 2); }

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// AVX2: native 8-lane registers. GCC keeps a 16-lane vfloat in two ymm only
// in simple code; in this loop it spilled the accumulators to the stack on
// every k (1.3 GFLOP/s instead of tens).
template <int kRows, bool kAccumulate = true>
inline void gemm_register_block(float* C, int64_t ldc, const float* A, int64_t a_row_stride,
                                int64_t a_k_stride, const float* B, int64_t ldb, int64_t K,
                                const char* prefetch_l2 = nullptr) {
  __m256 acc[kRows][4];
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < 4; ++c) {
      acc[r][c] = kAccumulate ? _mm256_loadu_ps(C + r * ldc + 8 * c) : _mm256_setzero_ps();
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    if (prefetch_l2 != nullptr && (k & 1) == 0) prefetch_line_l2(prefetch_l2 + k * 32);
    __m256 b[4];
    for (int c = 0; c < 4; ++c) b[c] = _mm256_loadu_ps(B + k * ldb + 8 * c);
    for (int r = 0; r < kRows; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * a_row_stride + k * a_k_stride);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_fmadd_ps(a, b[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < 4; ++c) _mm256_storeu_ps(C + r * ldc + 8 * c, acc[r][c]);
  }
}
#else
template <int kRows, bool kAccumulate = true>
inline void gemm_register_block(float* C, int64_t ldc, const float* A, int64_t a_row_stride,
                                int64_t a_k_stride, const float* B, int64_t ldb, int64_t K,
                                const char* prefetch_l2 = nullptr) {
  vfloat acc_lo[kRows], acc_hi[kRows];
  for (int r = 0; r < kRows; ++r) {
    acc_lo[r] = kAccumulate ? load(C + r * ldc) : splat(0.f);
    acc_hi[r] = kAccumulate ? load(C + r * ldc + kLanes) : splat(0.f);
  }
  for (int64_t k = 0; k < K; ++k) {
    if (prefetch_l2 != nullptr && (k & 1) == 0) prefetch_line_l2(prefetch_l2 + k * 32);
    const vfloat b_lo = load(B + k * ldb);
    const vfloat b_hi = load(B + k * ldb + kLanes);
    for (int r = 0; r < kRows; ++r) {
      const float a = A[r * a_row_stride + k * a_k_stride];
      acc_lo[r] += a * b_lo;
      acc_hi[r] += a * b_hi;
    }
  }
  for (int r = 0; r < kRows; ++r) {
    store(C + r * ldc, acc_lo[r]);
    store(C + r * ldc + kLanes, acc_hi[r]);
  }
}
#endif

// Rows left over after the full kRows blocks (fewer than kRows): one block
// of exactly that many rows.
template <int kRows, bool kAccumulate = true>
inline void gemm_leftover_rows(int64_t rows, float* C, int64_t ldc, const float* A, int64_t a_row_stride,
                               int64_t a_k_stride, const float* B, int64_t ldb, int64_t K) {
  if constexpr (kRows > 0) {
    if (rows == kRows) {
      return gemm_register_block<kRows, kAccumulate>(C, ldc, A, a_row_stride, a_k_stride, B, ldb, K);
    }
    gemm_leftover_rows<kRows - 1, kAccumulate>(rows, C, ldc, A, a_row_stride, a_k_stride, B, ldb, K);
  }
}

// `prefetch_l2` (may be null): full block i prefetches bytes
// [i K 32, (i + 1) K 32) from there (K / 2 lines) while that slice lies
// within `prefetch_bytes`.
template <int kRows, bool kAccumulate = true>
inline void gemm_row_blocks(float* C, int64_t ldc, const float* A, int64_t a_row_stride,
                            int64_t a_k_stride, const float* B, int64_t ldb, int64_t M,
                            int64_t K, const char* prefetch_l2 = nullptr, int64_t prefetch_bytes = 0) {
  int64_t m0 = 0, prefetch_offset = 0;
  for (; m0 + kRows <= M; m0 += kRows, prefetch_offset += K * 32) {
    const bool prefetch = prefetch_l2 != nullptr && prefetch_offset + K * 32 <= prefetch_bytes;
    gemm_register_block<kRows, kAccumulate>(C + m0 * ldc, ldc, A + m0 * a_row_stride, a_row_stride,
                                            a_k_stride, B, ldb, K,
                                            prefetch ? prefetch_l2 + prefetch_offset : nullptr);
  }
  gemm_leftover_rows<kRows - 1, kAccumulate>(M - m0, C + m0 * ldc, ldc, A + m0 * a_row_stride, a_row_stride,
                                             a_k_stride, B, ldb, K);
}

inline void gemm_accumulate(float* C, int64_t ldc, const float* A, int64_t a_row_stride,
                            int64_t a_k_stride, const float* B, int64_t ldb, int64_t M,
                            int64_t N, int64_t K) {
  // Column panels outermost: the K x 32 panel of B stays in L1 while every
  // row block of A streams past it.
  for (int64_t n0 = 0; n0 < N; n0 += kGemmCols) {
    gemm_row_blocks<kGemmRows>(C + n0, ldc, A, a_row_stride, a_k_stride, B + n0, ldb, M, K);
  }
}

// Register block rows of gemm_panels. On AVX-512, 14 rows: 28
// accumulators, 2 B vectors and 1 broadcast fill 31 of the 32 zmm, 24 FMAs
// per 2 B loads. Forward tile loop of a micro benchmark (64 x 128 tile,
// D = 128, packed K/V streaming from L3, one core): 8 rows 30.8, 12 rows
// 27.2, 14 rows 27.1 us per kv tile; 4 x 64 and 6 x 64 blocks 30.3 and
// 27.6. AVX2 and other targets keep kGemmRows (no registers to spare).
#if defined(__AVX512F__)
constexpr int kPanelGemmRows = 14;
#else
constexpr int kPanelGemmRows = kGemmRows;
#endif

// C (M x N, row-major) = A B (kAccumulate = false) or C += A B (true), A
// M x K with rows contiguous, B packed as column panels: panel p holds
// columns [32p, 32p + 32) as a contiguous [rows][32] block, `panel_stride`
// floats apart (at least K rows each). Each panel is one sequential stream
// that the hardware prefetchers follow (a 32-column slice of a row-major B
// is 128 bytes of every row instead, which streamed from L3 about 20 %
// slower in the forward's tile loop). `prefetch_l2` / `prefetch_bytes`: a
// block that the next product reads (the next packed K/V tile), brought
// into L2 while this one runs (K / 2 lines per register block).
template <bool kAccumulate>
inline void gemm_panels(float* C, int64_t ldc, const float* A, int64_t a_row_stride, const float* B,
                        int64_t panel_stride, int64_t M, int64_t N, int64_t K,
                        const float* prefetch_l2 = nullptr, int64_t prefetch_bytes = 0) {
  const char* prefetch = reinterpret_cast<const char*>(prefetch_l2);
  const int64_t panel_prefetch_bytes = M / kPanelGemmRows * K * 32;  // what one panel's blocks take
  for (int64_t n0 = 0, offset = 0; n0 < N; n0 += kGemmCols, offset += panel_prefetch_bytes) {
    const bool prefetch_panel = prefetch != nullptr && offset < prefetch_bytes;
    gemm_row_blocks<kPanelGemmRows, kAccumulate>(C + n0, ldc, A, a_row_stride, 1,
                                                 B + (n0 / kGemmCols) * panel_stride, kGemmCols, M, K,
                                                 prefetch_panel ? prefetch + offset : nullptr,
                                                 prefetch_bytes - offset);
  }
}

}  // namespace FASTATTN_ISA_NS
}  // namespace cpu
}  // namespace fastattn
