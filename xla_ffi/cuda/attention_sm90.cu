// FlashAttention forward on sm90a (H100, H200): warpgroup MMA (wgmma) with
// K and V read by the tensor cores straight from shared memory. See
// attention.h.
//
// A CTA owns 128 query rows of one (batch, q head): two warpgroups of 64
// rows. Keys go by in tiles of 128 through two shared-memory stages (cp.async
// by all threads: tile j + 1 loads while tile j is computed). Per tile each
// warpgroup issues S = Q K^T (A = Q, B = K, both K-major descriptors), runs
// the online softmax on the accumulators in registers, and issues O += P V
// with P from registers (the accumulator layout is the A-fragment layout)
// and V as an MN-major descriptor, so P never touches shared memory.
//
// Tiling-mask: the plan is the forward's 64 x 64 one; a 128 x 128 tile is
// skipped when all four plan tiles in it are empty, and a warpgroup applies
// the element-wise mask when either of its two plan tiles is not full.
#include "attention.h"
#include "sm80_tiles.h"
#include "sm90_wgmma.h"

#include <cstdlib>
#include <cstring>

namespace fastattn {
namespace cuda {
namespace {

constexpr int kRows = 128;  // query rows per CTA
constexpr int kKeys = 128;  // keys per step
constexpr int kThreads = 256;

template <int D>
constexpr int shared_bytes() {
  return (kRows + 4 * kKeys) * D * 2 + 1024;  // Q, two K and two V stages, alignment slack
}

template <int D, typename T>
__global__ void __launch_bounds__(kThreads, 1) forward_wgmma_kernel(const ForwardParams p) {
#if FASTATTN_HAS_WGMMA
  using namespace sm80;
  using namespace sm90;
  extern __shared__ uint8_t shared_raw[];
  // The 128-byte swizzle pattern repeats every 1024 bytes: align the tiles.
  const uint32_t q_tile = (shared_address(shared_raw) + 1023) & ~1023u;
  constexpr uint32_t kTileBytes = kKeys * D * 2;
  const uint32_t k_tiles = q_tile + kRows * D * 2;
  const uint32_t v_tiles = k_tiles + 2 * kTileBytes;

  const AttentionShape& s = p.shape;
  const int warpgroup = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  // Heavier (later, under a causal mask) query tiles first.
  const int64_t q_block = gridDim.x - 1 - blockIdx.x;
  const int64_t head = blockIdx.y, batch = blockIdx.z;
  const int64_t kv_head = head / (s.q_heads / s.kv_heads);
  const int64_t q_stride = s.q_heads * D, kv_stride = s.kv_heads * D;
  const int64_t q0 = q_block * kRows;
  const int64_t warp_row0 = q0 + warpgroup * 64 + warp * 16;
  const T* q = static_cast<const T*>(p.q) + (batch * s.q_len * s.q_heads + head) * D;
  const T* k = static_cast<const T*>(p.k) + (batch * s.kv_len * s.kv_heads + kv_head) * D;
  const T* v = static_cast<const T*>(p.v) + (batch * s.kv_len * s.kv_heads + kv_head) * D;

  const int64_t num_kv = (s.kv_len + kKeys - 1) / kKeys;
  const int64_t plan_q = (s.q_len + kForwardTileQ - 1) / kForwardTileQ;
  const int64_t plan_kv = (s.kv_len + kForwardTileKv - 1) / kForwardTileKv;
  // Class of plan tile (q tile 2 q_block + half, kv tile plan_tile); tiles
  // past a sequence end hold nothing.
  auto class_of = [&](int half, int64_t plan_tile) -> int8_t {
    const int64_t q_tile = 2 * q_block + half;
    if (q_tile >= plan_q || plan_tile >= plan_kv) return kEmpty;
    return class_row(p.mask, batch, head, q_tile, plan_q, plan_kv)[plan_tile];
  };
  auto next_tile = [&](int64_t from) {
    for (; from < num_kv; ++from) {
      if (class_of(0, 2 * from) != kEmpty || class_of(0, 2 * from + 1) != kEmpty ||
          class_of(1, 2 * from) != kEmpty || class_of(1, 2 * from + 1) != kEmpty) {
        break;
      }
    }
    return from;
  };
  auto load_kv = [&](int64_t tile, int stage) {
    const int64_t kv0 = tile * kKeys;
    load_sw128_async<D, kKeys, kThreads>(k_tiles + stage * kTileBytes, k + kv0 * kv_stride,
                                         kv_stride, s.kv_len - kv0);
    load_sw128_async<D, kKeys, kThreads>(v_tiles + stage * kTileBytes, v + kv0 * kv_stride,
                                         kv_stride, s.kv_len - kv0);
  };

  load_sw128_async<D, kRows, kThreads>(q_tile, q + q0 * q_stride, q_stride, s.q_len - q0);
  int64_t tile = next_tile(0);
  if (tile < num_kv) load_kv(tile, 0);
  commit_async();

  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // row_sum: own columns
  const float scale_log2 = p.softmax_scale * kLog2e;
  int stage = 0;

  while (tile < num_kv) {
    const int64_t next = next_tile(tile + 1);
    if (next < num_kv) load_kv(next, stage ^ 1);
    commit_async();
    wait_async<1>();
    fence_proxy_async();
    __syncthreads();
    const uint32_t k_tile = k_tiles + stage * kTileBytes, v_tile = v_tiles + stage * kTileBytes;
    const int64_t kv0 = tile * kKeys;
    const bool masked = class_of(warpgroup, 2 * tile) != kFull ||
                        class_of(warpgroup, 2 * tile + 1) != kFull || kv0 + kKeys > s.kv_len;

    float sc[kKeys / 8][4];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      Wgmma<T>::ss_n128(sc, k_major(q_tile, kRows, warpgroup * 64, kk),
                        k_major(k_tile, kKeys, 0, kk), kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(sc);

#pragma unroll
    for (int nt = 0; nt < kKeys / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) sc[nt][i] *= scale_log2;
    mask_scores<kKeys / 8, false>(sc, s, p.mask, p.bias, batch, head, warp_row0, kv0, masked);

    // Online softmax for rows g (r = 0) and g + 8 (r = 1); a row's keys are
    // spread over the 4 lanes of a quad.
    float reference[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float m = row_max[r];
#pragma unroll
      for (int nt = 0; nt < kKeys / 8; ++nt) m = fmaxf(m, fmaxf(sc[nt][2 * r], sc[nt][2 * r + 1]));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
      reference[r] = m == -INFINITY ? 0.f : m;  // nothing visible yet: avoid inf - inf
      const float rescale = exp2_fast(row_max[r] - reference[r]);
      row_max[r] = m;
      row_sum[r] *= rescale;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][2 * r] *= rescale;
        o[dt][2 * r + 1] *= rescale;
      }
    }
    uint32_t pa[kKeys / 16][4];
#pragma unroll
    for (int nt = 0; nt < kKeys / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        sc[nt][i] = exp2_fast(sc[nt][i] - reference[i >> 1]);
        row_sum[i >> 1] += sc[nt][i];
      }
    }
#pragma unroll
    for (int kb = 0; kb < kKeys / 16; ++kb) c_to_a<T>(pa[kb], sc[2 * kb], sc[2 * kb + 1]);

    // O += P V.
    fence_operands(o);
    wgmma_fence();
#pragma unroll
    for (int kb = 0; kb < kKeys / 16; ++kb) {
      Wgmma<T>::template rs<D>(o, pa[kb], mn_major(v_tile, kKeys, kb), true);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(o);
    __syncthreads();  // this stage's buffers may be refilled next iteration
    stage ^= 1;
    tile = next;
  }

  T* out = static_cast<T*>(p.out) + (batch * s.q_len * s.q_heads + head) * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float total = row_sum[r];
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    const int64_t qi = warp_row0 + g + 8 * r;
    if (qi >= s.q_len) continue;
    const float inverse = total > 0.f ? 1.f / total : 0.f;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(out + qi * q_stride + dt * 8 + 2 * t) =
          Mma<T>::pack(o[dt][2 * r] * inverse, o[dt][2 * r + 1] * inverse);
    }
    if (t == 0) {
      p.lse[(batch * s.q_heads + head) * s.q_len + qi] =
          total > 0.f ? (row_max[r] + log2f(total)) * kLn2 : -INFINITY;
    }
  }
#endif  // FASTATTN_HAS_WGMMA
}

template <int D, typename T>
cudaError_t launch(const ForwardParams& p, cudaStream_t stream) {
  auto kernel = forward_wgmma_kernel<D, T>;
  if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           shared_bytes<D>());
      e != cudaSuccess) {
    return e;
  }
  const dim3 grid(static_cast<unsigned>(p.shape.num_q_tiles(kRows)),
                  static_cast<unsigned>(p.shape.q_heads), static_cast<unsigned>(p.shape.batch));
  kernel<<<grid, kThreads, shared_bytes<D>(), stream>>>(p);
  return cudaGetLastError();
}

// True when the current device is compute capability 9.0 and this build
// holds sm_90a code of the kernel (FASTATTN_CUDA_ARCHS has 90a). Cached per
// device.
bool device_runs_wgmma() {
  static int cached[64];  // 0 unknown, 1 yes, 2 no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) {
    cudaGetLastError();
    return false;
  }
  if (cached[device] == 0) {
    int major = 0, minor = 0;
    cudaFuncAttributes attributes;
    const bool yes =
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess &&
        major == 9 && minor == 0 &&
        cudaFuncGetAttributes(&attributes, forward_wgmma_kernel<128, __nv_bfloat16>) ==
            cudaSuccess &&
        attributes.binaryVersion == 90;
    cudaGetLastError();  // a missing kernel image must not linger as the last error
    cached[device] = yes ? 1 : 2;
  }
  return cached[device] == 1;
}

}  // namespace

bool forward_wgmma_selected(const ForwardParams& params) {
  const char* choice = std::getenv("FASTATTN_CUDA_FORWARD");
  if (choice != nullptr && std::strcmp(choice, "mma_sync") == 0) return false;
  return (params.shape.head_dim == 64 || params.shape.head_dim == 128) && device_runs_wgmma();
}

cudaError_t attention_forward_wgmma(const ForwardParams& params, cudaStream_t stream) {
  const bool bf16 = params.dtype == ElementType::kBF16;
  if (params.shape.head_dim == 64) {
    return bf16 ? launch<64, __nv_bfloat16>(params, stream) : launch<64, __half>(params, stream);
  }
  return bf16 ? launch<128, __nv_bfloat16>(params, stream) : launch<128, __half>(params, stream);
}

}  // namespace cuda
}  // namespace fastattn
