// Attention backward on sm90a (H100, H200): the two passes of
// attention_backward_sm80.cu (dK/dV per key block, then dQ per query block;
// no atomics, so gradients stay bitwise reproducible) on warpgroup MMA, TMA
// and warp specialisation, as in the forward (attention_sm90.cu). The delta
// rows are computed before, by the sm80 file's delta kernel.
//
// dkdv_wgmma_kernel: a CTA owns 128 keys of one kv head; warpgroup 0 is the
//   producer (one thread loads K and V once, then 64-row Q and dO tiles of
//   every q head of the GQA group through kStages stages with TMA; warp 1
//   copies the matching lse and delta rows), warpgroups 1 and 2 own 64 keys
//   each: S^T = K Q^T and dP^T = V dO^T (m64n64, both operands in shared
//   memory), P^T and dS^T in registers, then dV += P^T dO and dK += dS^T Q
//   with P^T and dS^T as register A operands and dO, Q as MN-major ones.
// dq_wgmma_kernel: a CTA owns 128 queries of one q head (64 per consumer);
//   the producer loads Q and dO once, then 64-key K and V tiles: S = Q K^T,
//   dP = dO V^T, dS, dQ += dS K (K as an MN-major operand: the sw128 layout
//   serves both majors).
// Masks: the 64 x 64 plan; each consumer reads the class of its own plan
// tile, a step is skipped by the whole CTA when both are empty.

#include "attention_backward.h"
#include "sm80_tiles.h"
#include "sm90_tensor_map.h"
#include "sm90_wgmma.h"

namespace fastattn {
namespace cuda {
namespace {

constexpr int kBlock = 128;  // keys (dK/dV) or queries (dQ) per CTA
constexpr int kStep = 64;    // queries (dK/dV) or keys (dQ) per step
constexpr int kThreads = 384;
constexpr int kStages = 2;
static_assert(kStep == kBackwardTileQ && kStep == kBackwardTileKv, "steps are plan tiles");

// What the dK/dV producer tells its consumers about a stage (next to the
// stage's tiles): the q tile, its lse (log2 units) and delta rows, the plan
// class of each consumer's 64 x 64 tile, and `last` (no tiles: the loop
// ends). The consumers then need no plan lookups of their own (registers).
struct alignas(16) StepRecord {
  float lse[kStep], delta[kStep];
  int32_t q0, head;
  int8_t tile_class[2], last;
};
constexpr int kStepRecordBytes = sizeof(StepRecord);

template <int D>
constexpr int shared_bytes() {
  // The block's two tiles, kStages x two step tiles, lse and delta rows of
  // each stage, barriers, alignment slack.
  return 2 * kBlock * D * 2 + kStages * 2 * kStep * D * 2 + kStages * kStepRecordBytes + 256 +
         1024;
}

struct TensorMaps {
  CUtensorMap block_a, block_b;  // K, V (dK/dV) or Q, dO (dQ): kBlock-row boxes
  CUtensorMap step_a, step_b;    // Q, dO (dK/dV) or K, V (dQ): kStep-row boxes
};

#if FASTATTN_HAS_WGMMA
constexpr int kConsumerWarps = 8;

// Shared-memory map and barriers common to both kernels.
template <int D>
struct Layout {
  static constexpr uint32_t kBlockBytes = kBlock * D * 2, kStepBytes = kStep * D * 2;
  uint32_t block_a, block_b, step_a, step_b, barriers;
  StepRecord* records;  // [kStages] (dK/dV only)

  __device__ explicit Layout(uint8_t* raw) {
    const uint32_t base = sm80::shared_address(raw);
    const uint32_t aligned = (base + 1023) & ~1023u;
    block_a = aligned;
    block_b = block_a + kBlockBytes;
    step_a = block_b + kBlockBytes;  // [kStages]
    step_b = step_a + kStages * kStepBytes;
    const uint32_t records_at = step_b + kStages * kStepBytes;
    records = reinterpret_cast<StepRecord*>(raw + (records_at - base));
    barriers = records_at + kStages * kStepRecordBytes;
  }
  __device__ uint32_t block_full() const { return barriers; }
  __device__ uint32_t full(int stage) const { return barriers + 8 * (1 + stage); }
  __device__ uint32_t empty(int stage) const { return barriers + 8 * (1 + kStages + stage); }

  // One thread: the barriers, with the arrivals that fill and that free a
  // stage.
  __device__ void init_barriers(int fill_arrivals, int free_arrivals) const {
    sm90::mbarrier_init(block_full(), 1);
    for (int stage = 0; stage < kStages; ++stage) {
      sm90::mbarrier_init(full(stage), fill_arrivals);
      sm90::mbarrier_init(empty(stage), free_arrivals);
    }
    sm90::mbarrier_init_fence();
  }
};

// TMA of `rows` rows (row0..) of one head into a sw128 tile, in boxes of 64
// columns; their bytes count on `full` (whose expected bytes the caller set).
template <int D>
__device__ __forceinline__ void load_rows(uint32_t to, const CUtensorMap* map, int rows,
                                          int64_t head, int64_t row0, int64_t batch,
                                          uint32_t full) {
#pragma unroll
  for (int block = 0; block < D / 64; ++block) {
    sm90::tma_load_4d(to + block * rows * 128, map, block * 64, int(head), int(row0), int(batch),
                      full);
  }
}
#endif

// kBandOnly: no segments, dense mask or bias (the band test alone); then
// dP^T is computed while the consumer masks S^T and takes P^T. The general
// mask needs the registers of dP^T, so that variant issues it afterwards.
template <int D, typename T, bool kBandOnly>
__global__ void __launch_bounds__(kThreads, 1)
    dkdv_wgmma_kernel(const BackwardParams p, const float* delta,
                      const __grid_constant__ TensorMaps maps) {
#if FASTATTN_HAS_WGMMA
  using namespace sm80;
  using namespace sm90;
  extern __shared__ uint8_t shared_raw[];
  const Layout<D> at(shared_raw);
  const uint32_t k_tile = at.block_a, v_tile = at.block_b;

  const AttentionShape& s = p.shape;
  const int warpgroup = threadIdx.x / 128;
  const int64_t kv_block = blockIdx.x;  // early key blocks see the most queries under causal
  const int64_t kv_head = blockIdx.y, batch = blockIdx.z;
  const int64_t group = s.q_heads / s.kv_heads;
  const int64_t kv0 = kv_block * kBlock;
  const int plan_q = int((s.q_len + kStep - 1) / kStep);
  const int64_t plan_kv = (s.kv_len + kStep - 1) / kStep;
  // Work items: (q head of the group, q tile), q tiles inner.
  const int num_items = int(group) * plan_q;
  // Plan classes of this block's two 64-key tiles for the group's first
  // head and q tile 0 (the producer's lookups: few registers).
  const int8_t* classes =
      class_row(p.mask, batch, kv_head * group, 0, plan_q, plan_kv) + 2 * kv_block;
  const int64_t head_step = p.mask.tile_heads == 1 ? 0 : plan_q * plan_kv;
  const int halves = int(min(int64_t(2), plan_kv - 2 * kv_block));  // 1 at a ragged end
  auto class_of = [&](int item, int half) -> int8_t {
    if (half >= halves) return kEmpty;
    return classes[(item / plan_q) * head_step + (item % plan_q) * plan_kv + half];
  };
  // The class a consumer acts on: its keys past Skv need the mask too.
  auto consumer_class = [&](int item, int half) -> int8_t {
    const int8_t c = class_of(item, half);
    return c == kFull && kv0 + 64 * (half + 1) > s.kv_len ? int8_t(kPartial) : c;
  };
  auto next_item = [&](int from) {
    while (from < num_items && class_of(from, 0) == kEmpty && class_of(from, 1) == kEmpty) ++from;
    return from;
  };

  // Fill: the TMA thread and warp 1's lanes (which store the record). Free:
  // every consumer thread, as each reads the record (an arrival releases
  // only the arriving thread's own reads).
  if (threadIdx.x == 0) at.init_barriers(1 + 32, 32 * kConsumerWarps);
  __syncthreads();

  if (warpgroup == 0) {  // producer
    release_registers<24>();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (warp > 1) return;
    if (threadIdx.x == 0) {
      mbarrier_arrive_expect_bytes(at.block_full(), 2 * Layout<D>::kBlockBytes);
      load_rows<D>(k_tile, &maps.block_a, kBlock, kv_head, kv0, batch, at.block_full());
      load_rows<D>(v_tile, &maps.block_b, kBlock, kv_head, kv0, batch, at.block_full());
    }
    // One stage past the last item carries `last`.
    for (int item = next_item(0), i = 0;; item = next_item(item + 1), ++i) {
      const int stage = i % kStages;
      mbarrier_wait(at.empty(stage), ((i / kStages) & 1) ^ 1);
      const bool last = item >= num_items;
      const int64_t head = kv_head * group + item / plan_q, q0 = item % plan_q * kStep;
      if (warp == 0) {
        if (lane == 0 && last) mbarrier_arrive(at.full(stage));
        if (lane == 0 && !last) {
          const uint32_t full = at.full(stage);
          mbarrier_arrive_expect_bytes(full, 2 * Layout<D>::kStepBytes);
          load_rows<D>(at.step_a + stage * Layout<D>::kStepBytes, &maps.step_a, kStep, head, q0,
                       batch, full);
          load_rows<D>(at.step_b + stage * Layout<D>::kStepBytes, &maps.step_b, kStep, head, q0,
                       batch, full);
        }
      } else {
        // Rows past Sq: P = 0 (lse +inf) and delta 0; their Q and dO rows
        // are TMA zeros.
        StepRecord& record = at.records[stage];
        if (!last) {
          const int64_t row_at = (batch * s.q_heads + head) * s.q_len + q0;
          for (int r = lane; r < kStep; r += 32) {
            const bool valid = q0 + r < s.q_len;
            record.lse[r] = valid ? lse_log2(p.lse[row_at + r]) : INFINITY;
            record.delta[r] = valid ? delta[row_at + r] : 0.f;
          }
        }
        if (lane == 0) {
          record.last = last;
          if (!last) {
            record.q0 = int32_t(q0);
            record.head = int32_t(head);
            record.tile_class[0] = consumer_class(item, 0);
            record.tile_class[1] = consumer_class(item, 1);
          }
        }
        mbarrier_arrive(at.full(stage));
      }
      if (last) break;
    }
    return;
  }

  claim_registers<240>();
  const int consumer = warpgroup - 1, warp = (threadIdx.x / 32) % 4;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int key_row = consumer * 64 + warp * 16;  // the warp's first key in the block
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;
  }
  const float scale_log2 = p.softmax_scale * kLog2e;
  mbarrier_wait(at.block_full(), 0);

  for (int i = 0;; ++i) {
    const int stage = i % kStages;
    mbarrier_wait(at.full(stage), (i / kStages) & 1);
    const StepRecord& record = at.records[stage];
    if (record.last) break;
    const int8_t cls = record.tile_class[consumer];
    if (cls == kEmpty) {
      mbarrier_arrive(at.empty(stage));
      continue;
    }
    const int64_t head = record.head, q0 = record.q0;
    const uint32_t q_tile = at.step_a + stage * Layout<D>::kStepBytes;
    const uint32_t do_tile = at.step_b + stage * Layout<D>::kStepBytes;
    const float* lse_rows = record.lse;
    const float* delta_rows = record.delta;

    float st[kStep / 8][4], dpt[kStep / 8][4];  // S^T, dP^T: keys x queries
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      Wgmma<T>::template ss<kStep>(st, k_major(k_tile, kBlock, consumer * 64, kk),
                                   k_major(q_tile, kStep, 0, kk), kk > 0);
    }
    wgmma_commit();
    auto issue_dpt = [&] {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        Wgmma<T>::template ss<kStep>(dpt, k_major(v_tile, kBlock, consumer * 64, kk),
                                     k_major(do_tile, kStep, 0, kk), kk > 0);
      }
      wgmma_commit();
    };
    if constexpr (kBandOnly) {
      issue_dpt();
      wgmma_wait<1>();
    } else {
      wgmma_wait<0>();
    }
    fence_operands(st);
#pragma unroll
    for (int nt = 0; nt < kStep / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] *= scale_log2;
    mask_scores<kStep / 8, true, kBandOnly>(st, s, p.mask, p.bias, batch, head, kv0 + key_row,
                                            q0, cls != kFull);
    if constexpr (!kBandOnly) {
      wgmma_fence();
      issue_dpt();
    }
#pragma unroll
    for (int nt = 0; nt < kStep / 8; ++nt) {
      const float2 lse = *reinterpret_cast<const float2*>(lse_rows + nt * 8 + 2 * t);
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = exp2_fast(st[nt][e] - (e & 1 ? lse.y : lse.x));
    }
    wgmma_wait<0>();
    fence_operands(dpt);
#pragma unroll
    for (int nt = 0; nt < kStep / 8; ++nt) {
      const float2 d = *reinterpret_cast<const float2*>(delta_rows + nt * 8 + 2 * t);
#pragma unroll
      for (int e = 0; e < 4; ++e) dpt[nt][e] = st[nt][e] * (dpt[nt][e] - (e & 1 ? d.y : d.x));
    }
    uint32_t pa[kStep / 16][4], dsa[kStep / 16][4];
#pragma unroll
    for (int kb = 0; kb < kStep / 16; ++kb) {
      c_to_a<T>(pa[kb], st[2 * kb], st[2 * kb + 1]);
      c_to_a<T>(dsa[kb], dpt[2 * kb], dpt[2 * kb + 1]);
    }
    // dV += P^T dO, dK += dS^T Q: queries are the k dimension.
    fence_operands(dv);
    fence_operands(dk);
    wgmma_fence();
#pragma unroll
    for (int kb = 0; kb < kStep / 16; ++kb) {
      Wgmma<T>::template rs<D>(dv, pa[kb], mn_major(do_tile, kStep, kb), true);
    }
#pragma unroll
    for (int kb = 0; kb < kStep / 16; ++kb) {
      Wgmma<T>::template rs<D>(dk, dsa[kb], mn_major(q_tile, kStep, kb), true);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(dv);
    fence_operands(dk);
    mbarrier_arrive(at.empty(stage));
  }

  // Keys past Skv are not stored (their rows were TMA zeros).
  const int64_t kv_stride = s.kv_heads * D;
  T* d_k = static_cast<T*>(p.d_k) + (batch * s.kv_len * s.kv_heads + kv_head) * D;
  T* d_v = static_cast<T*>(p.d_v) + (batch * s.kv_len * s.kv_heads + kv_head) * D;
  store_key_rows<D>(dk, dv, d_k, d_v, kv_stride, kv0 + key_row + g, s.kv_len, t,
                    p.softmax_scale);
#endif  // FASTATTN_HAS_WGMMA
}

template <int D, typename T>
__global__ void __launch_bounds__(kThreads, 1)
    dq_wgmma_kernel(const BackwardParams p, const float* delta,
                    const __grid_constant__ TensorMaps maps) {
#if FASTATTN_HAS_WGMMA
  using namespace sm80;
  using namespace sm90;
  extern __shared__ uint8_t shared_raw[];
  const Layout<D> at(shared_raw);
  const uint32_t q_tile = at.block_a, do_tile = at.block_b;

  const AttentionShape& s = p.shape;
  const int warpgroup = threadIdx.x / 128;
  const int64_t q_block = gridDim.x - 1 - blockIdx.x;  // heavier (causal) blocks first
  const int64_t head = blockIdx.y, batch = blockIdx.z;
  const int64_t kv_head = head / (s.q_heads / s.kv_heads);
  const int64_t q0 = q_block * kBlock;
  const int64_t plan_q = (s.q_len + kStep - 1) / kStep;
  const int64_t num_kv = (s.kv_len + kStep - 1) / kStep;
  auto class_of = [&](int half, int64_t tile) -> int8_t {
    const int64_t q_tile_index = 2 * q_block + half;
    if (q_tile_index >= plan_q) return kEmpty;
    return class_row(p.mask, batch, head, q_tile_index, plan_q, num_kv)[tile];
  };
  auto next_tile = [&](int64_t from) {
    while (from < num_kv && class_of(0, from) == kEmpty && class_of(1, from) == kEmpty) ++from;
    return from;
  };

  if (threadIdx.x == 0) at.init_barriers(1, kConsumerWarps);  // shared memory is TMA-written
  __syncthreads();

  if (warpgroup == 0) {  // producer
    release_registers<24>();
    if (threadIdx.x == 0) {
      mbarrier_arrive_expect_bytes(at.block_full(), 2 * Layout<D>::kBlockBytes);
      load_rows<D>(q_tile, &maps.block_a, kBlock, head, q0, batch, at.block_full());
      load_rows<D>(do_tile, &maps.block_b, kBlock, head, q0, batch, at.block_full());
      int i = 0;
      for (int64_t tile = next_tile(0); tile < num_kv; tile = next_tile(tile + 1), ++i) {
        const int stage = i % kStages;
        mbarrier_wait(at.empty(stage), ((i / kStages) & 1) ^ 1);
        const uint32_t full = at.full(stage);
        mbarrier_arrive_expect_bytes(full, 2 * Layout<D>::kStepBytes);
        load_rows<D>(at.step_a + stage * Layout<D>::kStepBytes, &maps.step_a, kStep, kv_head,
                     tile * kStep, batch, full);
        load_rows<D>(at.step_b + stage * Layout<D>::kStepBytes, &maps.step_b, kStep, kv_head,
                     tile * kStep, batch, full);
      }
    }
    return;
  }

  claim_registers<240>();
  const int consumer = warpgroup - 1, warp = (threadIdx.x / 32) % 4;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t warp_row0 = q0 + consumer * 64 + warp * 16;
  float row_lse[2], row_delta[2];
  const int64_t row_at = (batch * s.q_heads + head) * s.q_len;
  load_row_stats(p.lse + row_at, delta + row_at, warp_row0 + g, s.q_len, row_lse, row_delta);
  float dq[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;
  const float scale_log2 = p.softmax_scale * kLog2e;
  mbarrier_wait(at.block_full(), 0);

  int i = 0;
  for (int64_t tile = next_tile(0); tile < num_kv; tile = next_tile(tile + 1), ++i) {
    const int stage = i % kStages;
    const int8_t cls = class_of(consumer, tile);
    mbarrier_wait(at.full(stage), (i / kStages) & 1);
    if (cls == kEmpty) {
      if (lane == 0) mbarrier_arrive(at.empty(stage));
      continue;
    }
    const uint32_t k_tile = at.step_a + stage * Layout<D>::kStepBytes;
    const uint32_t v_tile = at.step_b + stage * Layout<D>::kStepBytes;
    const int64_t kv0 = tile * kStep;

    float sc[kStep / 8][4], dps[kStep / 8][4];  // S, dP: queries x keys
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      Wgmma<T>::template ss<kStep>(sc, k_major(q_tile, kBlock, consumer * 64, kk),
                                   k_major(k_tile, kStep, 0, kk), kk > 0);
    }
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      Wgmma<T>::template ss<kStep>(dps, k_major(do_tile, kBlock, consumer * 64, kk),
                                   k_major(v_tile, kStep, 0, kk), kk > 0);
    }
    wgmma_commit();
    wgmma_wait<1>();
    fence_operands(sc);
#pragma unroll
    for (int nt = 0; nt < kStep / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[nt][e] *= scale_log2;
    mask_scores<kStep / 8, false>(sc, s, p.mask, p.bias, batch, head, warp_row0, kv0,
                                  cls != kFull || kv0 + kStep > s.kv_len);
#pragma unroll
    for (int nt = 0; nt < kStep / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[nt][e] = exp2_fast(sc[nt][e] - row_lse[e >> 1]);
    wgmma_wait<0>();
    fence_operands(dps);
    uint32_t dsa[kStep / 16][4];
#pragma unroll
    for (int nt = 0; nt < kStep / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dps[nt][e] = sc[nt][e] * (dps[nt][e] - row_delta[e >> 1]);
#pragma unroll
    for (int kb = 0; kb < kStep / 16; ++kb) c_to_a<T>(dsa[kb], dps[2 * kb], dps[2 * kb + 1]);
    // dQ += dS K: keys are the k dimension.
    fence_operands(dq);
    wgmma_fence();
#pragma unroll
    for (int kb = 0; kb < kStep / 16; ++kb) {
      Wgmma<T>::template rs<D>(dq, dsa[kb], mn_major(k_tile, kStep, kb), true);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(dq);
    if (lane == 0) mbarrier_arrive(at.empty(stage));
  }

  const int64_t q_stride = s.q_heads * D;
  store_scaled_rows<D>(dq, static_cast<T*>(p.d_q) + (batch * s.q_len * s.q_heads + head) * D,
                       q_stride, warp_row0 + g, s.q_len, t, p.softmax_scale);
#endif  // FASTATTN_HAS_WGMMA
}

template <int D, typename T>
cudaError_t launch(const BackwardParams& p, const float* delta, cudaStream_t stream) {
  const AttentionShape& s = p.shape;
  TensorMaps kv_side, q_side;  // maps of the dK/dV kernel and of the dQ kernel
  const bool encoded =
      encode_tensor_map(&kv_side.block_a, p.k, p.dtype, s.batch, s.kv_len, s.kv_heads, D, kBlock) &&
      encode_tensor_map(&kv_side.block_b, p.v, p.dtype, s.batch, s.kv_len, s.kv_heads, D, kBlock) &&
      encode_tensor_map(&kv_side.step_a, p.q, p.dtype, s.batch, s.q_len, s.q_heads, D, kStep) &&
      encode_tensor_map(&kv_side.step_b, p.d_out, p.dtype, s.batch, s.q_len, s.q_heads, D, kStep) &&
      encode_tensor_map(&q_side.block_a, p.q, p.dtype, s.batch, s.q_len, s.q_heads, D, kBlock) &&
      encode_tensor_map(&q_side.block_b, p.d_out, p.dtype, s.batch, s.q_len, s.q_heads, D, kBlock) &&
      encode_tensor_map(&q_side.step_a, p.k, p.dtype, s.batch, s.kv_len, s.kv_heads, D, kStep) &&
      encode_tensor_map(&q_side.step_b, p.v, p.dtype, s.batch, s.kv_len, s.kv_heads, D, kStep);
  if (!encoded) return cudaErrorInvalidValue;
  constexpr int bytes = shared_bytes<D>();
  const bool band_only = band_mask_only(p.mask, p.bias);
  auto dkdv = band_only ? dkdv_wgmma_kernel<D, T, true> : dkdv_wgmma_kernel<D, T, false>;
  auto dq = dq_wgmma_kernel<D, T>;
  for (const void* kernel : {reinterpret_cast<const void*>(dkdv), reinterpret_cast<const void*>(dq)}) {
    if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             bytes);
        e != cudaSuccess) {
      return e;
    }
  }
  const auto blocks = [](int64_t len) { return static_cast<unsigned>((len + kBlock - 1) / kBlock); };
  dkdv<<<dim3(blocks(s.kv_len), static_cast<unsigned>(s.kv_heads), static_cast<unsigned>(s.batch)),
         kThreads, bytes, stream>>>(p, delta, kv_side);
  dq<<<dim3(blocks(s.q_len), static_cast<unsigned>(s.q_heads), static_cast<unsigned>(s.batch)),
       kThreads, bytes, stream>>>(p, delta, q_side);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_backward_wgmma(const BackwardParams& params, const float* delta,
                                     cudaStream_t stream) {
  const bool bf16 = params.dtype == ElementType::kBF16;
  if (params.shape.head_dim == 64) {
    return bf16 ? launch<64, __nv_bfloat16>(params, delta, stream)
                : launch<64, __half>(params, delta, stream);
  }
  return bf16 ? launch<128, __nv_bfloat16>(params, delta, stream)
              : launch<128, __half>(params, delta, stream);
}

}  // namespace cuda
}  // namespace fastattn
