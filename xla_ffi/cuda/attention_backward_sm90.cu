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
//   With kDq other than BackwardDq::kSeparatePass the same kernel also produces dQ (five
//   products per step instead of the two passes' seven): each consumer
//   stores its dS^T to shared memory, and dQ(step) = dS K over all 128
//   keys (both dS^T halves) is an m64n64 product (D=128: each consumer its
//   64 columns; D=64: all 64 columns, by the consumers in turn, consumer
//   i % 2 taking step i). The fp32 result goes through shared memory
//   (two buffers) to warps 2 and 3 of the producer warpgroup (the dQ
//   writers, taking alternate steps), whose lane 0 adds it to a float32 dQ
//   workspace [B, Hq, q tiles, D / 64, 64, 64] with bulk (TMA) reductions,
//   16 KB per transfer, so that the adds cost the writer no per-element
//   instructions. kFusedOrdered: the writer of
//   key block n waits for its turn on the q tile (a flag counting the
//   contributors done) and the contributors add in descending key-block
//   order, so dQ is bitwise reproducible; the grid runs the key blocks in
//   that order (block n only waits on blocks dispatched before it), which
//   under a causal mask is also the order in which they reach a q tile.
//   The first contributor stores instead of adding (no clearing of the
//   workspace); dq_convert_kernel then scales and casts it into dQ.
//   kFusedAtomic: bulk adds on a cleared workspace in whatever order the
//   CTAs arrive (not reproducible).
// dq_wgmma_kernel: a CTA owns 128 queries of one q head (64 per consumer);
//   the producer loads Q and dO once, then 64-key K and V tiles: S = Q K^T,
//   dP = dO V^T, dS, dQ += dS K (K as an MN-major operand: the sw128 layout
//   serves both majors).
// Masks: the 64 x 64 plan; each consumer reads the class of its own plan
// tile, a step is skipped by the whole CTA when both are empty.

#include "attention_backward.h"
#include "dq_order.h"
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

// Fused dQ: the dS^T tiles ([128 keys][64 queries], two buffers, so that a
// consumer can store step i + 1's while the other still reads step i's)
// and the fp32 dQ staging slabs ([64 rows][64 columns], D / 64 of them: one
// per 64 columns, each a contiguous block in the workspace's layout, so
// that one bulk transfer adds it to the workspace), in two buffers: step
// i's in buffer i % 2, which dQ writer i % 2 moves out.
constexpr int kDsTileBytes = kBlock * kStep * 2;
constexpr int kDqSlabBytes = kStep * 64 * 4;
constexpr int kDqBuffers = 2;
template <int D>
constexpr int fused_bytes() {
  return 2 * kDsTileBytes + kDqBuffers * (D / 64) * kDqSlabBytes;
}
static_assert(kStep == kBackwardTileQ && kStep == kBackwardTileKv, "steps are plan tiles");

// A [64][64] float32 slab, dense rows, the 8-float chunks of row r at chunk
// index c ^ (r % 8): the consumers' float2 stores (rows g, columns 2t of
// each 8-column chunk) then hit 32 distinct banks per half warp. The
// workspace keeps the same order (dq_convert_kernel undoes it), so a slab
// moves there as one contiguous block.
__host__ __device__ __forceinline__ int slab_offset(int row, int col) {
  return row * 64 + (col ^ ((row % 8) * 8));
}

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

// Fused dQ: what warp 1 tells the dQ writers about a step, in a ring of
// kDqRing entries: the q tile (index into the dQ workspace), how many key
// blocks add to it before this one (kFusedOrdered), and `last` (the loop
// ends; the last step and the one after it carry it, one for each writer).
// The ring does not overrun: warp 1 fills step p (and p + 1 at the end)
// once the consumers freed stage p - kStages, i.e. had finished step
// p - kStages - 1 and so waited for the writers to take step
// p - kStages - 1 - kDqBuffers; later steps may still be unread.
struct alignas(16) DqStep {
  int32_t tile;  // < 2^31: its workspace block alone is 16-32 KB
  int32_t rank, last;
};
constexpr int kDqRing = 8;
static_assert(kDqRing > kStages + kDqBuffers + 1, "the writers' ring must outlast the steps in flight");

template <int D, bool kFused = false>
constexpr int shared_bytes() {
  // The block's two tiles, kStages x two step tiles, (fused dQ tiles,) lse
  // and delta rows of each stage, barriers, alignment slack.
  return 2 * kBlock * D * 2 + kStages * 2 * kStep * D * 2 +
         (kFused ? fused_bytes<D>() + kDqRing * int(sizeof(DqStep)) : 0) + kStages * kStepRecordBytes +
         256 + 1024;
}
// What one CTA may opt into on sm90 (227 KB); the fused D=128 kernel is the largest.
static_assert(shared_bytes<128, true>() <= 227 * 1024, "the fused D=128 kernel's shared memory");

struct TensorMaps {
  CUtensorMap block_a, block_b;  // K, V (dK/dV) or Q, dO (dQ): kBlock-row boxes
  CUtensorMap step_a, step_b;    // Q, dO (dK/dV) or K, V (dQ): kStep-row boxes
};

// Fused dQ workspace of one call: float32 [B, Hq, q tiles] blocks of
// [D / 64][64 rows][64 columns] (each the order of a staging slab,
// slab_offset) and the turn flags [B, Hq, q tiles] (kFusedOrdered: how many key blocks have added to
// the q tile; 0 = none, so the convert kernel writes zeros).
struct DqWorkspace {
  float* accum;
  int32_t* turns;
};

#if FASTATTN_HAS_WGMMA
constexpr int kConsumerWarps = 8;
// Named barrier of the fused dQ's dS^T tiles: both consumers have stored
// theirs (the dQ product reads all 128 keys).
constexpr int kDsBarrier = 1;

// Shared-memory map and barriers common to both kernels.
template <int D, bool kFused = false>
struct Layout {
  static constexpr uint32_t kBlockBytes = kBlock * D * 2, kStepBytes = kStep * D * 2;
  uint32_t block_a, block_b, step_a, step_b, ds, dq_slabs, barriers;
  StepRecord* records;  // [kStages] (dK/dV only)
  DqStep* dq_steps;     // [kDqRing] (fused dQ only)

  __device__ explicit Layout(uint8_t* raw) {
    const uint32_t base = sm80::shared_address(raw);
    const uint32_t aligned = (base + 1023) & ~1023u;
    block_a = aligned;
    block_b = block_a + kBlockBytes;
    step_a = block_b + kBlockBytes;  // [kStages]
    step_b = step_a + kStages * kStepBytes;
    ds = step_b + kStages * kStepBytes;  // [2] (fused dQ only)
    dq_slabs = ds + 2 * kDsTileBytes;    // [kDqBuffers][D / 64 slabs] (fused dQ only)
    const uint32_t records_at = kFused ? dq_slabs + kDqBuffers * (D / 64) * kDqSlabBytes : ds;
    records = reinterpret_cast<StepRecord*>(raw + (records_at - base));
    const uint32_t dq_steps_at = records_at + kStages * kStepRecordBytes;
    dq_steps = reinterpret_cast<DqStep*>(raw + (dq_steps_at - base));
    barriers = dq_steps_at + (kFused ? kDqRing * int(sizeof(DqStep)) : 0);
  }
  __device__ uint32_t block_full() const { return barriers; }
  __device__ uint32_t full(int stage) const { return barriers + 8 * (1 + stage); }
  __device__ uint32_t empty(int stage) const { return barriers + 8 * (1 + kStages + stage); }
  // Fused dQ, per slab buffer (and writer): the buffer holds a step's dQ
  // (consumers -> writer), and is free again (writer -> consumers).
  __device__ uint32_t dq_full(int buffer) const { return barriers + 8 * (1 + 2 * kStages + buffer); }
  __device__ uint32_t dq_free(int buffer) const {
    return barriers + 8 * (1 + 2 * kStages + kDqBuffers + buffer);
  }

  // One thread: the barriers, with the arrivals that fill and that free a
  // stage.
  __device__ void init_barriers(int fill_arrivals, int free_arrivals) const {
    sm90::mbarrier_init(block_full(), 1);
    for (int stage = 0; stage < kStages; ++stage) {
      sm90::mbarrier_init(full(stage), fill_arrivals);
      sm90::mbarrier_init(empty(stage), free_arrivals);
    }
    if (kFused) {
      for (int buffer = 0; buffer < kDqBuffers; ++buffer) {
        sm90::mbarrier_init(dq_full(buffer), (D / 64) * 128);  // the consumers that store a slab
        sm90::mbarrier_init(dq_free(buffer), 32);
      }
    }
    sm90::mbarrier_init_fence();
  }
};

// Stores a consumer's dS^T fragment (the mma A layout of its warp's 16
// keys x 64 queries, as bf16/f16 pairs) into a sw128 [128 keys][64
// queries] tile with one stmatrix.x4 per 16 queries: lane L gives the
// address of row L % 8 of 8 x 8 matrix L / 8 (matrices: keys +0/+8 x
// queries +0/+8, the order of the fragment's registers). first_key: the
// warp's first key row (a multiple of 8, so that a row's swizzle is
// (L % 8)); 8 distinct 16-byte chunks per matrix: no bank conflicts.
__device__ __forceinline__ void store_ds_tile(uint32_t tile, const uint32_t (&a)[kStep / 16][4],
                                              int first_key, int lane) {
  const int row = lane % 8, matrix = lane / 8;
  const uint32_t row_at = tile + (first_key + (matrix & 1) * 8 + row) * 128;
#pragma unroll
  for (int kb = 0; kb < kStep / 16; ++kb) {
    const uint32_t at = row_at + (((2 * kb + (matrix >> 1)) ^ row) << 4);
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(at),
                 "r"(a[kb][0]), "r"(a[kb][1]), "r"(a[kb][2]), "r"(a[kb][3])
                 : "memory");
  }
}

// A consumer's m64n64 dQ accumulator into its slab.
__device__ __forceinline__ void store_dq_slab(uint32_t slab, const float (&dq)[8][4], int warp,
                                              int g, int t) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const uint32_t at = slab + slab_offset(warp * 16 + g + 8 * r, 8 * j + 2 * t) * 4;
      asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(at), "f"(dq[j][2 * r]),
                   "f"(dq[j][2 * r + 1])
                   : "memory");
    }
  }
}

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
template <int D, typename T, bool kBandOnly, BackwardDq kDq>
__global__ void __launch_bounds__(kThreads, 1)
    dkdv_wgmma_kernel(const BackwardParams p, const float* delta,
                      const __grid_constant__ TensorMaps maps, const DqWorkspace dq_ws) {
#if FASTATTN_HAS_WGMMA
  using namespace sm80;
  using namespace sm90;
  constexpr bool kFused = kDq != BackwardDq::kSeparatePass;
  extern __shared__ uint8_t shared_raw[];
  const Layout<D, kFused> at(shared_raw);
  const uint32_t k_tile = at.block_a, v_tile = at.block_b;

  const AttentionShape& s = p.shape;
  const int warpgroup = threadIdx.x / 128;
  // Early key blocks see the most queries under causal; the fused kernel
  // runs them last (its dQ order waits on later blocks).
  const int64_t kv_block = kFused ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int64_t kv_head = blockIdx.y, batch = blockIdx.z;
  const int64_t group = s.q_heads / s.kv_heads;
  const int64_t kv0 = kv_block * kBlock;
  const int plan_q = int((s.q_len + kStep - 1) / kStep);
  const int64_t plan_kv = (s.kv_len + kStep - 1) / kStep;
  // Work items: (q head of the group, q tile), q tiles inner.
  const int num_items = int(group) * plan_q;
  // Plan classes of the group's first head and q tile 0 (the producer's
  // lookups: few registers); item i's row is head_step and plan_kv apart.
  const int8_t* class_base = class_row(p.mask, batch, kv_head * group, 0, plan_q, plan_kv);
  const int8_t* classes = class_base + 2 * kv_block;
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
    release_registers<kFused ? 40 : 24>();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // Warps 0 and 1 first, the dQ writers after: the values the loads and
    // records need are then dead in the writers' code, and the producer's
    // few registers suffice for both without spilling.
    if (warp <= 1) {  // the loads (warp 0) and the step records (warp 1)
      if (threadIdx.x == 0) {
        mbarrier_arrive_expect_bytes(at.block_full(), 2 * Layout<D, kFused>::kBlockBytes);
        load_rows<D>(k_tile, &maps.block_a, kBlock, kv_head, kv0, batch, at.block_full());
        load_rows<D>(v_tile, &maps.block_b, kBlock, kv_head, kv0, batch, at.block_full());
      }
      // One stage past the last item carries `last`. In the fused kernels
      // warp 1 reads the item's lse and delta rows (and its dQ rank) before
      // waiting for the stage, so that their latency overlaps the consumers'
      // work on the stages in flight.
      for (int item = next_item(0), i = 0;; item = next_item(item + 1), ++i) {
        const int stage = i % kStages;
        const int empty_parity = ((i / kStages) & 1) ^ 1;
        const bool last = item >= num_items;
        const int64_t head = kv_head * group + item / plan_q, q0 = item % plan_q * kStep;
        // The fused kernels' warp 1 waits after its reads.
        if (!kFused || warp == 0) mbarrier_wait(at.empty(stage), empty_parity);
        if (warp == 0) {
          if (lane == 0 && last) mbarrier_arrive(at.full(stage));
          if (lane == 0 && !last) {
            const uint32_t full = at.full(stage);
            mbarrier_arrive_expect_bytes(full, 2 * Layout<D, kFused>::kStepBytes);
            load_rows<D>(at.step_a + stage * Layout<D, kFused>::kStepBytes, &maps.step_a, kStep,
                         head, q0, batch, full);
            load_rows<D>(at.step_b + stage * Layout<D, kFused>::kStepBytes, &maps.step_b, kStep,
                         head, q0, batch, full);
          }
        } else {
          // Rows past Sq: P = 0 (lse +inf) and delta 0; their Q and dO rows
          // are TMA zeros.
          static_assert(kStep == 64, "two rows per lane");
          StepRecord& record = at.records[stage];
          int rank = 0;  // the writers' (kFusedOrdered)
          if constexpr (kFused) {
            float lse_rows[2] = {INFINITY, INFINITY}, delta_rows[2] = {0.f, 0.f};
            const int64_t row_at = (batch * s.q_heads + head) * s.q_len + q0;
#pragma unroll
            for (int k = 0; k < 2; ++k) {
              if (!last && q0 + lane + 32 * k < s.q_len) {
                lse_rows[k] = lse_log2(p.lse[row_at + lane + 32 * k]);
                delta_rows[k] = delta[row_at + lane + 32 * k];
              }
            }
            // Fused ordered dQ: key blocks after this one that add to the q
            // tile (those whose two plan tiles are not both empty) add before
            // it: from the band alone where it decides (dq_order.h; the plan
            // is then the band's own, as the Python side builds it and as
            // the visits above assume), else counted in the plan.
            if constexpr (kDq == BackwardDq::kFusedOrdered) {
              if (!last && kBandOnly) {
                rank = band_dq_rank(min(q0 + kStep, s.q_len) - 1, p.mask.band_hi, s.kv_len, kv_block,
                                    kBlock);
              } else if (!last) {
                const int8_t* row = class_base + (item / plan_q) * head_step + (item % plan_q) * plan_kv;
                const int64_t num_blocks = (plan_kv + 1) / 2;
                int adds = 0;
#pragma unroll 1
                for (int64_t block = kv_block + 1 + lane; block < num_blocks; block += 32) {
                  adds += row[2 * block] != kEmpty ||
                          (2 * block + 1 < plan_kv && row[2 * block + 1] != kEmpty);
                }
                rank = __reduce_add_sync(~0u, adds);
              }
            }
            mbarrier_wait(at.empty(stage), empty_parity);
            if (!last) {
#pragma unroll
              for (int k = 0; k < 2; ++k) {
                record.lse[lane + 32 * k] = lse_rows[k];
                record.delta[lane + 32 * k] = delta_rows[k];
              }
            }
          } else if (!last) {  // a row at a time: the two-pass producer has 24 registers
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
            if constexpr (kFused) {
              const int64_t tile = (batch * s.q_heads + head) * plan_q + q0 / kStep;
              at.dq_steps[i % kDqRing] = DqStep{int32_t(tile), rank, int32_t(last)};
              // The writer of the step after the last one learns of the end too.
              if (last) at.dq_steps[(i + 1) % kDqRing] = DqStep{0, 0, 1};
            }
          }
          mbarrier_arrive(at.full(stage));
        }
        if (last) break;
      }
      return;
    }
    if constexpr (kFused) {  // the dQ writers: warp 2 takes the even steps, warp 3 the odd ones
      // Lane 0 moves the step's slabs (slab c: columns 64c..) into the q
      // tile's workspace block with bulk transfers.
      // kFusedOrdered: a step's turn passes as soon as its adds are done
      // in global memory; the later key blocks of the q tile wait for it.
      // Two writers, so that one waits for its turn, or for its adds to
      // complete before it passes the turn on, while the other moves the
      // next step: a writer's step then takes two steps of the consumers,
      // and the chain's latency stays off their path.
      const int writer = warp - 2;
      float* const accum = dq_ws.accum;
      for (int j = 0;; ++j) {
        const int i = kDqBuffers * j + writer;
        mbarrier_wait(at.dq_full(writer), j & 1);
        const DqStep step = at.dq_steps[i % kDqRing];
        if (step.last) {
          if (lane == 0) bulk_wait<0>();
          return;
        }
        const uint32_t slabs = at.dq_slabs + writer * (D / 64) * kDqSlabBytes;
        int32_t* const turn = dq_ws.turns + step.tile;
        if (lane == 0) {
          if constexpr (kDq == BackwardDq::kFusedOrdered) {
            while (load_acquire(turn) != step.rank) {
            }
            fence_proxy_async_global();  // the earlier adds, before this one's
          }
          // The first block to add to a tile stores (no cleared workspace).
          const bool first_add = kDq == BackwardDq::kFusedOrdered && step.rank == 0;
          float* to = accum + int64_t(step.tile) * (kStep * D);
#pragma unroll
          for (int slab = 0; slab < D / 64; ++slab) {
            const uint32_t from = slabs + slab * kDqSlabBytes;
            if (first_add) {
              bulk_store(to + slab * kStep * 64, from, kDqSlabBytes);
            } else {
              bulk_add_f32(to + slab * kStep * 64, from, kDqSlabBytes);
            }
          }
          bulk_commit();
          bulk_wait_read<0>();
        }
        // Every lane arrives, once lane 0's transfer has read the slabs: the
        // consumers may overwrite them.
        __syncwarp();
        mbarrier_arrive(at.dq_free(writer));
        if constexpr (kDq == BackwardDq::kFusedOrdered) {
          if (lane == 0) {
            bulk_wait<0>();              // the adds are done in global memory
            fence_proxy_async_global();  // ... and ordered before the release
            store_release(turn, step.rank + 1);
          }
        }
      }
    }
    return;
  }

  claim_registers<kFused ? 232 : 240>();
  const int consumer = warpgroup - 1, warp = (threadIdx.x / 32) % 4;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int key_row = consumer * 64 + warp * 16;  // the warp's first key in the block
  // Fused dQ: which consumers make step i's dQ (D=128 both, D=64 consumer
  // i % 2) and which 64 columns this one makes (its column box of K and
  // its slab of the buffer).
  auto makes_dq = [&](int i) { return D == 128 || i % kDqBuffers == consumer; };
  const int dq_box = D == 128 ? consumer : 0;
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
    if (record.last) {
      if constexpr (kFused) {  // each writer learns of the end as of a step: i and i + 1
        for (int k = i; k < i + kDqBuffers; ++k) {
          if (!makes_dq(k)) continue;
          if (k >= kDqBuffers) mbarrier_wait(at.dq_free(k % kDqBuffers), (k / kDqBuffers - 1) & 1);
          mbarrier_arrive(at.dq_full(k % kDqBuffers));
        }
      }
      break;
    }
    const int8_t cls = record.tile_class[consumer];
    // The fused kernel's consumers both take every step (each dQ product
    // reads both dS^T halves); an empty tile's dS^T is zero.
    if (!kFused && cls == kEmpty) {
      mbarrier_arrive(at.empty(stage));
      continue;
    }
    const int64_t head = record.head, q0 = record.q0;
    const uint32_t q_tile = at.step_a + stage * Layout<D, kFused>::kStepBytes;
    const uint32_t do_tile = at.step_b + stage * Layout<D, kFused>::kStepBytes;
    const float* lse_rows = record.lse;
    const float* delta_rows = record.delta;

    uint32_t pa[kStep / 16][4], dsa[kStep / 16][4];
    if (cls != kEmpty) {
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
    } else {
#pragma unroll
      for (int kb = 0; kb < kStep / 16; ++kb) dsa[kb][0] = dsa[kb][1] = dsa[kb][2] = dsa[kb][3] = 0;
    }
    if constexpr (kFused) {
      // dS^T to shared memory, then dQ(step) = dS K over all 128 keys
      // (both halves of dS^T and of K's rows): D=128, this consumer's 64
      // columns; D=64, all 64 columns, by consumer i % 2 alone (one slab,
      // which the writer adds as it is; the other consumer goes on to the
      // next step, and the two alternate).
      const uint32_t ds_tile = at.ds + (i & 1) * kDsTileBytes;
      store_ds_tile(ds_tile, dsa, key_row, lane);
      fence_proxy_async_shared();
      named_barrier_sync(kDsBarrier, 2 * 128);
      const bool stores_dq = makes_dq(i);
      float dq[8][4];
      if (stores_dq) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBlock / 16; ++kk) {
          Wgmma<T>::tt(dq, mn_major(ds_tile, kBlock, kk),
                       mn_major(k_tile + dq_box * kBlock * 128, kBlock, kk), kk > 0);
        }
        wgmma_commit();
      }
      wgmma_wait<0>();
      fence_operands(dv);
      fence_operands(dk);
      mbarrier_arrive(at.empty(stage));
      if (stores_dq) {
        fence_operands(dq);
        // Buffer i % 2 is free once its writer has moved step i - 2 out.
        const int buffer = i % kDqBuffers;
        if (i >= kDqBuffers) mbarrier_wait(at.dq_free(buffer), (i / kDqBuffers - 1) & 1);
        store_dq_slab(at.dq_slabs + (buffer * (D / 64) + dq_box) * kDqSlabBytes, dq, warp, g, t);
        fence_proxy_async_shared();  // the stores, before the writer's bulk transfer reads them
        mbarrier_arrive(at.dq_full(buffer));
      }
    } else {
      wgmma_wait<0>();
      fence_operands(dv);
      fence_operands(dk);
      mbarrier_arrive(at.empty(stage));
    }
  }

  // Keys past Skv are not stored (their rows were TMA zeros).
  const int64_t kv_stride = s.kv_heads * D;
  T* d_k = static_cast<T*>(p.d_k) + (batch * s.kv_len * s.kv_heads + kv_head) * D;
  T* d_v = static_cast<T*>(p.d_v) + (batch * s.kv_len * s.kv_heads + kv_head) * D;
  store_key_rows<D>(dk, dv, d_k, d_v, kv_stride, kv0 + key_row + g, s.kv_len, t,
                    p.softmax_scale);
#endif  // FASTATTN_HAS_WGMMA
}

// Fused dQ: dQ[b, i, h, :] = scale * workspace row (b, h, i), or zeros where
// no key block added to the row's q tile (turns 0; kFusedOrdered). One thread
// per 8 columns.
template <int D, typename T>
__global__ void dq_convert_kernel(const BackwardParams p, const DqWorkspace dq_ws, bool ordered) {
  const AttentionShape& s = p.shape;
  const int64_t plan_q = (s.q_len + kStep - 1) / kStep;
  const int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = s.batch * s.q_heads * s.q_len * (D / 8);
  if (index >= total) return;
  const int col = int(index % (D / 8)) * 8;
  const int64_t row = index / (D / 8);  // (b, h, i)
  const int64_t i = row % s.q_len, bh = row / s.q_len;
  const int64_t head = bh % s.q_heads, batch = bh / s.q_heads;
  const int64_t tile = bh * plan_q + i / kStep;
  T* to = static_cast<T*>(p.d_q) + ((batch * s.q_len + i) * s.q_heads + head) * D + col;
  uint32_t packed[4] = {0, 0, 0, 0};
  if (!ordered || dq_ws.turns[tile] > 0) {
    // The workspace block of a q tile: [D / 64][64 rows][64 columns], in
    // the slabs' chunk order (8 columns stay together).
    const float* from = dq_ws.accum + tile * kStep * D + (col / 64) * kStep * 64 +
                        slab_offset(int(i % kStep), col % 64);
    const float4 a = *reinterpret_cast<const float4*>(from);
    const float4 b = *reinterpret_cast<const float4*>(from + 4);
    const float scale = p.softmax_scale;
    packed[0] = sm80::Mma<T>::pack(a.x * scale, a.y * scale);
    packed[1] = sm80::Mma<T>::pack(a.z * scale, a.w * scale);
    packed[2] = sm80::Mma<T>::pack(b.x * scale, b.y * scale);
    packed[3] = sm80::Mma<T>::pack(b.z * scale, b.w * scale);
  }
  *reinterpret_cast<uint4*>(to) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
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
cudaError_t launch(const BackwardParams& p, const float* delta, BackwardDq dq_mode,
                   const DqWorkspace& dq_ws, cudaStream_t stream) {
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
  const bool band_only = band_mask_only(p.mask, p.bias);
  const auto blocks = [](int64_t len) { return static_cast<unsigned>((len + kBlock - 1) / kBlock); };
  const dim3 kv_grid(blocks(s.kv_len), static_cast<unsigned>(s.kv_heads),
                     static_cast<unsigned>(s.batch));
  auto set_shared = [](const void* kernel, int bytes) {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  };
  if (dq_mode != BackwardDq::kSeparatePass) {
    const int64_t plan_q = (s.q_len + kStep - 1) / kStep;
    const int64_t tiles = s.batch * s.q_heads * plan_q;
    if (cudaError_t e = cudaMemsetAsync(dq_ws.turns, 0, tiles * sizeof(int32_t), stream);
        e != cudaSuccess) {
      return e;
    }
    if (dq_mode == BackwardDq::kFusedAtomic) {
      if (cudaError_t e =
              cudaMemsetAsync(dq_ws.accum, 0, tiles * kStep * D * sizeof(float), stream);
          e != cudaSuccess) {
        return e;
      }
    }
    constexpr int bytes = shared_bytes<D, true>();
    using Kernel = void (*)(const BackwardParams, const float*, const TensorMaps, const DqWorkspace);
    Kernel fused;
    if (dq_mode == BackwardDq::kFusedOrdered) {
      fused = band_only ? dkdv_wgmma_kernel<D, T, true, BackwardDq::kFusedOrdered>
                        : dkdv_wgmma_kernel<D, T, false, BackwardDq::kFusedOrdered>;
    } else {
      fused = band_only ? dkdv_wgmma_kernel<D, T, true, BackwardDq::kFusedAtomic>
                        : dkdv_wgmma_kernel<D, T, false, BackwardDq::kFusedAtomic>;
    }
    if (cudaError_t e = set_shared(reinterpret_cast<const void*>(fused), bytes); e != cudaSuccess) {
      return e;
    }
    fused<<<kv_grid, kThreads, bytes, stream>>>(p, delta, kv_side, dq_ws);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    constexpr int kConvertThreads = 256;
    const int64_t work = s.batch * s.q_heads * s.q_len * (D / 8);
    dq_convert_kernel<D, T><<<static_cast<unsigned>((work + kConvertThreads - 1) / kConvertThreads),
                              kConvertThreads, 0, stream>>>(p, dq_ws,
                                                            dq_mode == BackwardDq::kFusedOrdered);
    return cudaGetLastError();
  }
  constexpr int bytes = shared_bytes<D>();
  auto dkdv = band_only ? dkdv_wgmma_kernel<D, T, true, BackwardDq::kSeparatePass>
                        : dkdv_wgmma_kernel<D, T, false, BackwardDq::kSeparatePass>;
  auto dq = dq_wgmma_kernel<D, T>;
  for (const void* kernel : {reinterpret_cast<const void*>(dkdv), reinterpret_cast<const void*>(dq)}) {
    if (cudaError_t e = set_shared(kernel, bytes); e != cudaSuccess) return e;
  }
  dkdv<<<kv_grid, kThreads, bytes, stream>>>(p, delta, kv_side, DqWorkspace{nullptr, nullptr});
  dq<<<dim3(blocks(s.q_len), static_cast<unsigned>(s.q_heads), static_cast<unsigned>(s.batch)),
       kThreads, bytes, stream>>>(p, delta, q_side);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_backward_wgmma(const BackwardParams& params, const float* delta,
                                     BackwardDq dq, float* dq_accum, int32_t* dq_turns,
                                     cudaStream_t stream) {
  const DqWorkspace ws{dq_accum, dq_turns};
  const bool bf16 = params.dtype == ElementType::kBF16;
  if (params.shape.head_dim == 64) {
    return bf16 ? launch<64, __nv_bfloat16>(params, delta, dq, ws, stream)
                : launch<64, __half>(params, delta, dq, ws, stream);
  }
  return bf16 ? launch<128, __nv_bfloat16>(params, delta, dq, ws, stream)
              : launch<128, __half>(params, delta, dq, ws, stream);
}

}  // namespace cuda
}  // namespace fastattn
