// Device building blocks of the sm90a (Hopper) attention kernels: warpgroup
// matrix multiply (wgmma.mma_async) with operands in 128-byte-swizzled
// shared memory and its descriptors, mbarriers, TMA tile loads, setmaxnreg.
// nvcc only; everything is compiled for sm_90a alone (FASTATTN_HAS_WGMMA):
// other targets see an empty header.
//
// Shared-memory layout of a tile ("sw128"): a [rows][D] bf16/f16 tile is
// stored as D / 64 column blocks of [rows][64] elements; a row of a block is
// 128 bytes, and its 16-byte chunk c sits at position c ^ (row % 8). This is
// the canonical 128-byte-swizzle layout of the PTX ISA both as a K-major
// operand (Q and K: rows are M or N, the 64 columns are K) and as an
// MN-major one (V: rows are K, columns are N), so one loader serves all
// three; TMA with 128-byte swizzle writes it from boxes of [rows][64]. Blocks
// must start on 1024-byte boundaries.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FASTATTN_HAS_WGMMA 1
#else
#define FASTATTN_HAS_WGMMA 0
#endif

#if FASTATTN_HAS_WGMMA

namespace fastattn {
namespace cuda {
namespace sm90 {

// 64-bit wgmma shared-memory matrix descriptor, 128-byte swizzle: start
// address, leading and stride byte offsets (all >> 4), swizzle mode 1.
__device__ __forceinline__ uint64_t sw128_descriptor(uint32_t address, uint32_t leading_bytes,
                                                     uint32_t stride_bytes) {
  return static_cast<uint64_t>((address & 0x3FFFF) >> 4) |
         static_cast<uint64_t>(leading_bytes >> 4) << 16 |
         static_cast<uint64_t>(stride_bytes >> 4) << 32 | uint64_t(1) << 62;
}

// K-major operand (Q as A, K as B of S = Q K^T) of a sw128 tile with
// `rows` rows: k step kk (16 columns) of the rows starting at first_row
// (a multiple of 8). 8-row groups are 1024 bytes apart; the leading offset
// is unused for swizzled K-major operands.
__device__ __forceinline__ uint64_t k_major(uint32_t tile, int rows, int first_row, int kk) {
  return sw128_descriptor(tile + (kk / 4) * rows * 128 + first_row * 128 + (kk % 4) * 32, 16,
                          1024);
}

// MN-major operand (V as B of O = P V, rows = keys = K): k step kk (16
// keys). Leading offset: from one 64-column block to the next; stride
// offset: from one group of 8 keys to the next.
__device__ __forceinline__ uint64_t mn_major(uint32_t tile, int rows, int kk) {
  return sw128_descriptor(tile + kk * 16 * 128, rows * 128, 1024);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving reads or writes of accumulator registers
// across a wgmma fence or wait (it sees the asm as touching them).
template <int kTiles>
__device__ __forceinline__ void fence_operands(float (&d)[kTiles][4]) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" : "+f"(d[j][i])::"memory");
  }
}

#define FASTATTN_WGMMA_REGS32                                                                  \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define FASTATTN_WGMMA_REGS64                                                                  \
  FASTATTN_WGMMA_REGS32                                                                        \
  ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, "    \
  "%49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define FASTATTN_WGMMA_REGS88                                                                  \
  FASTATTN_WGMMA_REGS64                                                                        \
  ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, "    \
  "%81, %82, %83, %84, %85, %86, %87"
#define FASTATTN_D4(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define FASTATTN_D32                                                                       \
  FASTATTN_D4(0), FASTATTN_D4(1), FASTATTN_D4(2), FASTATTN_D4(3), FASTATTN_D4(4),          \
      FASTATTN_D4(5), FASTATTN_D4(6), FASTATTN_D4(7)
#define FASTATTN_D64                                                                       \
  FASTATTN_D32, FASTATTN_D4(8), FASTATTN_D4(9), FASTATTN_D4(10), FASTATTN_D4(11),          \
      FASTATTN_D4(12), FASTATTN_D4(13), FASTATTN_D4(14), FASTATTN_D4(15)
#define FASTATTN_D88                                                                       \
  FASTATTN_D64, FASTATTN_D4(16), FASTATTN_D4(17), FASTATTN_D4(18), FASTATTN_D4(19),        \
      FASTATTN_D4(20), FASTATTN_D4(21)

// d (m64 x nN, f32, the accumulator layout of mma.m16n8 per warp: n8 tile
// j of a warp's 16 rows in d[j]) += A B. `accumulate` false: d = A B.
//   ss<N>:   A and B from K-major descriptors, N = 64, 128 or 176.
//   tt:      A and B from MN-major descriptors (A stored as its transpose,
//            rows = K), N = 64.
//   rs<N>:   A from registers (the mma.m16n8k16 A fragment of the warp's 16
//            rows), B from an MN-major descriptor; N = 64 or 128.
#define FASTATTN_DEFINE_WGMMA(TYPE, PTX_TYPES)                                                 \
  template <>                                                                                  \
  struct Wgmma<TYPE> {                                                                         \
    template <int N>                                                                           \
    static __device__ __forceinline__ void ss(float (&d)[N / 8][4], uint64_t a, uint64_t b,    \
                                              bool accumulate) {                               \
      if constexpr (N == 176) {                                                                \
        asm volatile(                                                                          \
            "{\n.reg .pred p;\nsetp.ne.b32 p, %90, 0;\n"                                     \
            "wgmma.mma_async.sync.aligned.m64n176k16.f32" PTX_TYPES                            \
            " {" FASTATTN_WGMMA_REGS88 "}, %88, %89, p, 1, 1, 0, 0;\n}\n"                      \
            : FASTATTN_D88                                                                     \
            : "l"(a), "l"(b), "r"(int(accumulate)));                                           \
      } else if constexpr (N == 128) {                                                         \
        asm volatile(                                                                          \
            "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                     \
            "wgmma.mma_async.sync.aligned.m64n128k16.f32" PTX_TYPES                            \
            " {" FASTATTN_WGMMA_REGS64 "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                      \
            : FASTATTN_D64                                                                     \
            : "l"(a), "l"(b), "r"(int(accumulate)));                                           \
      } else {                                                                                 \
        static_assert(N == 64, "ss: N is 64, 128 or 176");                                     \
        asm volatile(                                                                          \
            "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                     \
            "wgmma.mma_async.sync.aligned.m64n64k16.f32" PTX_TYPES                             \
            " {" FASTATTN_WGMMA_REGS32 "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                      \
            : FASTATTN_D32                                                                     \
            : "l"(a), "l"(b), "r"(int(accumulate)));                                           \
      }                                                                                        \
    }                                                                                          \
    /* tt: A and B both MN-major (transposed) descriptors, N = 64. */                        \
    static __device__ __forceinline__ void tt(float (&d)[8][4], uint64_t a, uint64_t b,        \
                                              bool accumulate) {                               \
      asm volatile(                                                                            \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                       \
          "wgmma.mma_async.sync.aligned.m64n64k16.f32" PTX_TYPES                               \
          " {" FASTATTN_WGMMA_REGS32 "}, %32, %33, p, 1, 1, 1, 1;\n}\n"                       \
          : FASTATTN_D32                                                                       \
          : "l"(a), "l"(b), "r"(int(accumulate)));                                             \
    }                                                                                          \
    template <int N>                                                                           \
    static __device__ __forceinline__ void rs(float (&d)[N / 8][4], const uint32_t* a,         \
                                              uint64_t b, bool accumulate) {                   \
      if constexpr (N == 128) {                                                                \
        asm volatile(                                                                          \
            "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                     \
            "wgmma.mma_async.sync.aligned.m64n128k16.f32" PTX_TYPES                            \
            " {" FASTATTN_WGMMA_REGS64 "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"        \
            : FASTATTN_D64                                                                     \
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(int(accumulate)));      \
      } else {                                                                                 \
        static_assert(N == 64, "rs: N is 64 or 128");                                          \
        asm volatile(                                                                          \
            "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                     \
            "wgmma.mma_async.sync.aligned.m64n64k16.f32" PTX_TYPES                             \
            " {" FASTATTN_WGMMA_REGS32 "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"        \
            : FASTATTN_D32                                                                     \
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(int(accumulate)));      \
      }                                                                                        \
    }                                                                                          \
    /* rs_with_sums: rs<64> with B 72 columns wide, its last 8 columns into sums (a */          \
    /* ones block there makes them the row sums of A). */                                      \
    static __device__ __forceinline__ void rs_with_sums(float (&d)[8][4], float (&sums)[1][4], \
                                                        const uint32_t* a, uint64_t b,         \
                                                        bool accumulate) {                     \
      asm volatile(                                                                            \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %41, 0;\n"                                       \
          "wgmma.mma_async.sync.aligned.m64n72k16.f32" PTX_TYPES                               \
          " {" FASTATTN_WGMMA_REGS32 ", %32, %33, %34, %35}, {%36, %37, %38, %39}, %40, p, 1, " \
          "1, 1;\n}\n"                                                                          \
          : FASTATTN_D32, "+f"(sums[0][0]), "+f"(sums[0][1]), "+f"(sums[0][2]),              \
            "+f"(sums[0][3])                                                                   \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(int(accumulate)));        \
    }                                                                                          \
  };

template <typename T>
struct Wgmma;
FASTATTN_DEFINE_WGMMA(__nv_bfloat16, ".bf16.bf16")
FASTATTN_DEFINE_WGMMA(__half, ".f16.f16")

#undef FASTATTN_DEFINE_WGMMA
#undef FASTATTN_D88
#undef FASTATTN_D64
#undef FASTATTN_D32
#undef FASTATTN_D4
#undef FASTATTN_WGMMA_REGS88
#undef FASTATTN_WGMMA_REGS64
#undef FASTATTN_WGMMA_REGS32

// mbarriers (shared-memory barriers with a phase bit) and TMA tile loads.
__device__ __forceinline__ void mbarrier_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Makes initialised mbarriers visible to the async proxy (TMA) and the
// other threads; a __syncthreads must follow.
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Arrives and announces `bytes` of TMA writes the phase must also wait for.
__device__ __forceinline__ void mbarrier_arrive_expect_bytes(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// TMA: the box at coordinates (c0 innermost .. c3) of a 4-d tensor map into
// shared memory at `to`; completion counts its bytes on mbarrier `bar`.
__device__ __forceinline__ void tma_load_4d(uint32_t to, const void* tensor_map, int c0, int c1,
                                            int c2, int c3, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(to),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// Stores of one or two 32-bit words at a shared-memory address (32-bit,
// where a generic pointer would hold two registers of a producer's few).
__device__ __forceinline__ void store_shared(uint32_t address, uint32_t a, uint32_t b) {
  asm volatile("st.shared.v2.u32 [%0], {%1, %2};\n" ::"r"(address), "r"(a), "r"(b) : "memory");
}

// Named barrier `id` (1..15; 0 is __syncthreads) over `threads` threads:
// sync waits until that many have arrived, counting the caller's warp;
// arrive counts the caller's warp and goes on.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Orders this thread's generic-proxy shared-memory writes before later
// async-proxy reads of them (wgmma operands written by threads).
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Bulk (TMA) transfers of a contiguous shared-memory block into global
// memory, issued by one thread: an element-wise float add into what is there
// (done by the L2's reduction units, whole lines at a time) or a plain store.
// `bytes`: a multiple of 16, both addresses 16-byte aligned. They join the
// thread's bulk group; bulk_wait_read<N>() waits until at most N groups still
// read shared memory (the source may be overwritten), bulk_wait<N>() until
// their global writes are done.
__device__ __forceinline__ void bulk_add_f32(float* to, uint32_t from, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(to),
               "r"(from), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void bulk_store(float* to, uint32_t from, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(to), "r"(from),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void bulk_commit() {
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}

template <int kPending>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}

template <int kPending>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Orders this thread's completed async-proxy global writes (bulk_wait) before
// its later generic-proxy operations, such as a release store of a flag.
__device__ __forceinline__ void fence_proxy_async_global() {
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
}

// The acquire load and release store of a gpu-scope flag.
__device__ __forceinline__ int32_t load_acquire(const int32_t* at) {
  int32_t v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(at) : "memory");
  return v;
}

__device__ __forceinline__ void store_release(int32_t* at, int32_t v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(at), "r"(v) : "memory");
}

// Register budget of a warpgroup (setmaxnreg): producers give registers
// back, consumers take them.
template <int kRegisters>
__device__ __forceinline__ void release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

template <int kRegisters>
__device__ __forceinline__ void claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

}  // namespace sm90
}  // namespace cuda
}  // namespace fastattn

#endif  // FASTATTN_HAS_WGMMA
