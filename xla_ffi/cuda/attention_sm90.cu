// FlashAttention forward on sm90a (H100, H200): warpgroup MMA (wgmma), TMA
// and warp specialisation. See attention.h.
//
// The kernel is persistent: one CTA per SM takes work items (128 query
// rows of one (batch, q head)) in a fixed order: groups of heads whose K/V
// fit in L2 together, and within a group the query blocks from the last
// (the most keys under a causal mask) to the first, so that the short items
// fill the tail. Where items differ in length (any mask but no mask at
// all), a CTA takes after its first item the next one not yet taken from a
// counter in global memory (FlashAttention-3's dynamic scheduler), so that
// CTAs whose items ran short, or whose SMs ran slower, even out (kernel
// alone, H100, D=128 causal: 4K +5 %, 16K +6-9 %, B=3 S=1000 +10 %; no
// mask: items alike, a fixed stride, the counter's memset and atomics
// measured 1 % slower at 4K).
//
// A CTA has three warpgroups. Warpgroup 0 is the producer: one thread walks the
// CTA's items and their visible K/V tiles, issues TMA loads of each item's Q
// tile and of K and V tiles (176 keys at D=128 where nothing is masked, else
// 128) into shared-memory stages (128-byte swizzled, the layout wgmma reads),
// each stage with a "full" mbarrier the TMA completes and an "empty" one the
// consumers release, and leaves a record of the step (tile, mask needed, last
// of the item) beside it; the producer hands most of its registers to the
// consumers (setmaxnreg). The stage ring runs on across items, and the next Q
// is loaded as soon as the consumers have issued their last S of the current
// item. Warpgroups 1 and 2 are the consumers, 64 query rows each: per tile they
// issue S = Q K^T (Q and K as K-major shared-memory descriptors), run the
// online softmax on the accumulators in registers, and issue O += P V with P
// from registers (the accumulator layout is the A-fragment layout) and V as an
// MN-major descriptor, so P never touches shared memory. Within a consumer the
// tiles are software-pipelined (FlashAttention-3's intra-warpgroup overlap): S
// of tile i+1 is issued before O += P_i V_i, and the softmax of tile i+1 runs
// while that product is in flight; O is rescaled once it has landed. Between
// the consumers (FlashAttention-3's warp scheduling) two named barriers make
// them take turns issuing their wgmmas, so that one's softmax overlaps the
// other's products (kernel alone, H100: +5 % at D=128 4K full, +8 % at D=64).
//
// Tiling-mask: the plan is the forward's 64 x 64 one (the backward shares
// it); a 128 x 128 step is skipped when all four plan tiles in it are
// empty, and a consumer applies the element-wise mask when either of its
// two plan tiles is not full. Under the band mask alone the producer
// derives the same classes from the band, without reading the plan.
//
// Why this structure (H100, kernel alone, bf16, D=128, TFLOP/s at B=4 S=4K
// H=32 full / causal, then B=16 S=1K causal): persistent CTAs with step
// records 601 / 510 / 366 against 592 / 456 / 296 with a CTA per item;
// without the intra-warpgroup pipeline 525 / 428; without warp
// specialisation (all threads loading with cp.async, a CTA barrier per
// tile) 356 / 299; the mma.sync kernel 310 / 283. At D=64 persistent CTAs
// give 363 / 312 / 248 against 359 / 273 / 190. Multicasting each K/V tile
// to a 2-CTA cluster (each CTA loading half of it, FlashAttention-3's scheme
// for this case) measured 20-25 % slower on an H100 at D=128 with no mask
// (kernel alone, bf16, B x S = 16K, H=32, S = 1K / 4K / 16K: 401 / 484 /
// 530 against 506 / 645 / 663 TFLOP/s; docs/bench/cluster_forward_h100/),
// so the kernel does not use clusters.
#include <algorithm>
#include <cstdint>

#include "attention.h"
#include "sm80_tiles.h"
#include "sm90_tensor_map.h"
#include "sm90_wgmma.h"

namespace fastattn {
namespace cuda {
namespace {

constexpr int kRows = 128;  // query rows per work item
constexpr int kThreads = 384;
constexpr int64_t kL2Bytes = 24 << 20;  // K/V bytes a group of concurrent items may share in L2

// Keys per step: 128, or FlashAttention-3's 176 where no key is masked
// (the band mask alone, and no band: no causal or window bound), at D=128.
// 176 keys mean fewer steps, so less per-step overhead (waits, row maxima,
// the O rescale), with 88 score and 44 P registers beside O's 64; under a
// causal band they cost more than they save (more steps cross the
// diagonal), and the general mask's registers do not fit them. K/V stages:
// three of 128 keys, or two of 176 (32 KB of Q + 2 x 88 KB at D=128).
constexpr int kLongKeys = 176;

__host__ __device__ constexpr int stages_for(int keys) { return keys == kLongKeys ? 2 : 3; }

// Row sums on the tensor cores (D=64 under the band mask alone): O += P V
// runs 72 columns wide, V's 64 and 8 of a block of ones (kKeys rows of 128
// bytes, beside the V stages), whose 8 result columns are then the row sums
// of P as the product used it (rounded to T). That takes an FADD per score
// off the softmax: at D=64 a score carries half the product FLOPs it does at
// D=128, so the softmax's instructions per score weigh twice as much. D=128
// has no shared memory left for the ones block.
template <int D, bool kBandOnly>
__host__ __device__ constexpr bool tensor_row_sums() { return kBandOnly && D == 64; }

template <int D, int kKeys, bool kBandOnly>
constexpr int shared_bytes() {  // tiles, (ones,) barriers, alignment
  return (kRows + 2 * stages_for(kKeys) * kKeys) * D * 2 +
         (tensor_row_sums<D, kBandOnly>() ? kKeys * 128 : 0) + 1024 + 1024;
}

struct TensorMaps {
  CUtensorMap q, k, v;
};

// One K/V step as the producer hands it to the consumers, beside the
// stage's tiles: which tile, whether each consumer's 64 rows need the
// element-wise mask there, and whether it is the item's last. Consumers
// thus never read the tile plan in their loop (its loads sat on the path
// from one product to the next). The producer writes it as two words (the
// tile; masked[0] | masked[1] << 8 | last << 16), lane 0 reads it as one.
struct StepRecord {
  int32_t tile;
  uint8_t masked[2];
  uint8_t last;
  uint8_t unused;
};

// Work items in launch order: groups of `group` (batch, q head) pairs whose
// K/V fit in L2 together, and within a group the query blocks from the last
// (the most keys under a causal mask) to the first, heads interleaved.
struct WorkItem {
  int q_block, head, batch;
};

// 32-bit: the items number at most 2^31 (the launch checks).
__device__ __forceinline__ WorkItem work_item(int w, int num_q_blocks, int pairs, int group,
                                              int q_heads) {
  const int first_pair = w / (group * num_q_blocks) * group;
  const int size = min(group, pairs - first_pair);
  const int r = w - first_pair * num_q_blocks;
  const int pair = first_pair + r % size;
  return {num_q_blocks - 1 - r / size, pair % q_heads, pair / q_heads};
}

// kBandOnly: no segments, dense mask or bias (the band test alone). The
// general mask needs the registers of P and of the output product, so that
// variant waits for O += P V before the softmax of the next tile instead of
// running it alongside.
//
// Persistent when launched with fewer CTAs than work items: a CTA takes item
// blockIdx.x, then gridDim.x + a ticket from `work_counter` (zero at the
// launch; null: w + gridDim.x) per item until past the items; the stage ring
// runs on across items, and the next item's Q is loaded once the consumers have
// issued their last S of the current one, so its start overlaps the current
// item's last softmax, product and stores.
template <int D, typename T, bool kBandOnly, int kKeys>
__global__ void __launch_bounds__(kThreads, 1)
    forward_wgmma_kernel(const ForwardParams p, const __grid_constant__ TensorMaps maps,
                         const int group, int32_t* work_counter) {
#if FASTATTN_HAS_WGMMA
  using namespace sm80;
  using namespace sm90;
  static_assert(kKeys == 2 * kForwardTileKv || kBandOnly,
                "the general mask reads the plan's 64-key tiles in pairs");
  constexpr int kStages = stages_for(kKeys);
  extern __shared__ uint8_t shared_raw[];
  const uint32_t q_tile = (shared_address(shared_raw) + 1023) & ~1023u;
  constexpr uint32_t kTileBytes = kKeys * D * 2;
  const uint32_t k_tiles = q_tile + kRows * D * 2;        // [kStages]
  const uint32_t v_tiles = k_tiles + kStages * kTileBytes;  // [kStages]
  constexpr bool kTensorSums = tensor_row_sums<D, kBandOnly>();
  constexpr bool kEarlyStart = kTensorSums;  // see start_item
  const uint32_t ones_tile = v_tiles + kStages * kTileBytes;  // kTensorSums: [kKeys][128 bytes]
  const uint32_t barriers = ones_tile + (kTensorSums ? kKeys * 128 : 0);
  const uint32_t q_full = barriers, q_empty = barriers + 8;
  auto k_full = [&](int stage) { return barriers + 8 * (2 + stage); };
  auto v_full = [&](int stage) { return barriers + 8 * (2 + kStages + stage); };
  auto k_empty = [&](int stage) { return barriers + 8 * (2 + 2 * kStages + stage); };
  auto v_empty = [&](int stage) { return barriers + 8 * (2 + 3 * kStages + stage); };
  // Step records [kStages], then the item record: whether it has any step,
  // and its index (num_work or more: no item, the CTA is done).
  const uint32_t records_at = barriers + 512, item_at = records_at + 8 * kStages;
  const StepRecord* records =
      reinterpret_cast<const StepRecord*>(shared_raw + (records_at - shared_address(shared_raw)));
  const uint32_t* item_record = reinterpret_cast<const uint32_t*>(records + kStages);
  constexpr int kConsumerWarps = 8;
  // Registers per thread: 3 x 168 what the CTA was given, 24 + 2 x 240 at
  // D=128 under the band mask alone (176-key steps need 240), else 40 + 2 x
  // 232 (the general mask's plan lookups on the producer).
  constexpr bool kLeanProducer = kBandOnly && D == 128;
  constexpr int kProducerRegisters = kLeanProducer ? 24 : 40;
  constexpr int kConsumerRegisters = kLeanProducer ? 240 : 232;

  const AttentionShape& s = p.shape;
  const int warpgroup = threadIdx.x / 128;
  // Step indices are 32-bit on the producer (24 or 40 registers): the steps
  // number at most 2^31 / kKeys, as the rows of a tensor map's box do.
  const int num_kv = int((s.kv_len + kKeys - 1) / kKeys);
  const int64_t plan_q = (s.q_len + kForwardTileQ - 1) / kForwardTileQ;
  const int64_t plan_kv = (s.kv_len + kForwardTileKv - 1) / kForwardTileKv;
  const int num_q_blocks = int((s.q_len + kRows - 1) / kRows);
  const int pairs = int(s.batch * s.q_heads);
  const int num_work = num_q_blocks * pairs;
  auto item_of = [&](int w) { return work_item(w, num_q_blocks, pairs, group, int(s.q_heads)); };

  if (threadIdx.x == 0) {
    mbarrier_init(q_full, 1);
    mbarrier_init(q_empty, kConsumerWarps);
    for (int stage = 0; stage < kStages; ++stage) {
      mbarrier_init(k_full(stage), 1);
      mbarrier_init(v_full(stage), 1);
      mbarrier_init(k_empty(stage), kConsumerWarps);
      mbarrier_init(v_empty(stage), kConsumerWarps);
    }
    mbarrier_init_fence();
  }
  if constexpr (kTensorSums) {  // all ones: the swizzle moves nothing that matters
    const uint32_t one = sm80::Mma<T>::pack(1.f, 1.f);
    uint4* ones = reinterpret_cast<uint4*>(shared_raw + (ones_tile - shared_address(shared_raw)));
    for (int at = threadIdx.x; at < kKeys * 128 / 16; at += kThreads) ones[at] = {one, one, one, one};
    fence_proxy_async_shared();  // before the wgmmas read them
  }
  __syncthreads();

  if (warpgroup == 0) {  // producer
    release_registers<kProducerRegisters>();
    if (threadIdx.x == 0) {
      const int heads_per_kv = int(s.q_heads / s.kv_heads);
      int i = 0;  // steps issued
      for (int w = blockIdx.x, n = 0;; ++n) {  // n: items issued
        if (w >= num_work) {  // no item left: tell the consumers
          mbarrier_wait(q_empty, (n & 1) ^ 1);
          store_shared(item_at, 0u, uint32_t(w));
          mbarrier_arrive(q_full);  // releases the record
          break;
        }
        const WorkItem item = item_of(w);
        const int kv_head = item.head / heads_per_kv;
        // The general mask's plan rows of the two 64-row halves (the first
        // only when the second lies past the queries).
        const int64_t plan_row = 2 * int64_t(item.q_block);
        const int8_t* plan_rows = kBandOnly ? nullptr
                                            : class_row(p.mask, item.batch, item.head, plan_row,
                                                        plan_q, plan_kv);
        const int halves = plan_row + 1 < plan_q ? 2 : 1;
        auto class_of = [&](int half, int plan_tile) -> int8_t {
          if (half >= halves || plan_tile >= plan_kv) return kEmpty;
          return plan_rows[half * plan_kv + plan_tile];
        };
        // Under the band mask alone the plan is the band's own, so the
        // steps follow from the band, once per item: no plan loads or
        // per-step tests on the lone producer thread, whose work short steps
        // wait on (reading the plan in a loop measured 3-10 % slower; a scan
        // over the empty steps after the diagonal grew with the length).
        // Rows [r0, r1] see keys [r0 + band_lo, r1 + band_hi] together, one
        // run, so the visible steps are those from the run's first to its
        // last; all their rows see keys [r1 + band_lo, r0 + band_hi], so a
        // 64-row half needs no mask on the steps inside that run.
        int first_visible = 0, last_visible = -1;     // none
        int first_full[2] = {0, 0}, last_full[2] = {-1, -1};
        if constexpr (kKeys == kLongKeys) {
          // 176-key steps run with no band: every step visible, all but a
          // short last one full to rows that exist.
          first_visible = 0;
          last_visible = num_kv - 1;
          last_full[0] = int(s.kv_len / kKeys) - 1;
          if (int64_t(item.q_block) * kRows + kRows / 2 < s.q_len) last_full[1] = last_full[0];
        } else if constexpr (kBandOnly) {
          // Keys [lo, hi] clipped to [0, kv_len) (32-bit: TMA coordinates are).
          auto clip = [&](int64_t lo, int64_t hi, int* from, int* to) {
            *from = int(lo < 0 ? 0 : lo < s.kv_len ? lo : s.kv_len);
            *to = int(hi < -1 ? -1 : hi < s.kv_len ? hi : s.kv_len - 1);
          };
          const int64_t r0 = int64_t(item.q_block) * kRows;
          const int64_t r1 = (r0 + kRows < s.q_len ? r0 + kRows : s.q_len) - 1;
          int lo, hi;
          clip(r0 + p.mask.band_lo, r1 + p.mask.band_hi, &lo, &hi);
          if (p.mask.band_lo <= p.mask.band_hi && lo <= hi) {
            first_visible = lo / kKeys;
            last_visible = hi / kKeys;
          }
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int64_t h0 = r0 + half * (kRows / 2);
            const int64_t h1 = (h0 + kRows / 2 < s.q_len ? h0 + kRows / 2 : s.q_len) - 1;
            clip(h1 + p.mask.band_lo, h0 + p.mask.band_hi, &lo, &hi);
            if (h0 <= h1 && lo <= hi) {  // whole steps within [lo, hi]
              first_full[half] = (lo + kKeys - 1) / kKeys;
              last_full[half] = (hi + 1) / kKeys - 1;
            }
          }
        }
        // A step is skipped when it shows nothing to either half: with the
        // general mask, when all four 64 x 64 plan tiles in it are empty.
        auto next_tile = [&](int from) {
          if constexpr (kBandOnly) {
            if (from < first_visible) from = first_visible;
            return from <= last_visible ? from : num_kv;
          } else {
            for (; from < num_kv; ++from) {
              if (class_of(0, 2 * from) != kEmpty || class_of(0, 2 * from + 1) != kEmpty ||
                  class_of(1, 2 * from) != kEmpty || class_of(1, 2 * from + 1) != kEmpty) {
                break;
              }
            }
            return from;
          }
        };
        // Rows (the box height of `map`) from row0 of one head, in boxes of
        // 64 columns; their bytes complete the phase of `full`.
        auto load_rows = [&](uint32_t to, const CUtensorMap* map, int rows, int64_t head_index,
                             int64_t row0, uint32_t full) {
          mbarrier_arrive_expect_bytes(full, rows * D * 2);
#pragma unroll
          for (int block = 0; block < D / 64; ++block) {
            tma_load_4d(to + block * rows * 128, map, block * 64, int(head_index), int(row0),
                        int(item.batch), full);
          }
        };
        int tile = next_tile(0);
        mbarrier_wait(q_empty, (n & 1) ^ 1);
        store_shared(item_at, tile < num_kv, uint32_t(w));  // released by the arrive in load_rows
        load_rows(q_tile, &maps.q, kRows, item.head, int64_t(item.q_block) * kRows, q_full);
        while (tile < num_kv) {
          const int next = next_tile(tile + 1);
          const int stage = i % kStages;
          const uint32_t free_parity = ((i / kStages) & 1) ^ 1;
          uint32_t flags = next >= num_kv ? 1u << 16 : 0u;  // StepRecord's masked[2], last
          for (int half = 0; half < 2; ++half) {
            bool masked;
            if constexpr (kBandOnly) {
              masked = tile < first_full[half] || tile > last_full[half];
            } else {
              masked = class_of(half, 2 * tile) != kFull || class_of(half, 2 * tile + 1) != kFull ||
                       int64_t(tile + 1) * kKeys > s.kv_len;
            }
            flags |= uint32_t(masked) << (8 * half);
          }
          mbarrier_wait(k_empty(stage), free_parity);
          store_shared(records_at + 8 * stage, uint32_t(tile), flags);  // released by load_rows
          load_rows(k_tiles + stage * kTileBytes, &maps.k, kKeys, kv_head, tile * kKeys,
                    k_full(stage));
          mbarrier_wait(v_empty(stage), free_parity);
          load_rows(v_tiles + stage * kTileBytes, &maps.v, kKeys, kv_head, tile * kKeys,
                    v_full(stage));
          tile = next;
          ++i;
        }
        // The next item, taken once this one's loads are out (its latency
        // then falls within the stages the producer runs ahead).
        w = int(gridDim.x) + (work_counter != nullptr ? atomicAdd(work_counter, 1) : w);
      }
    }
    return;
  }

  claim_registers<kConsumerRegisters>();
  const int consumer = warpgroup - 1, warp = (threadIdx.x / 32) % 4;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const float scale_log2 = p.softmax_scale * kLog2e;
  // With the band mask alone the softmax takes raw scores and folds the
  // scale into its exp2 FFMAs (kernel alone, H100, B=4 S=4K, TFLOP/s: D=64
  // full 359 -> 394, causal 311 -> 332; D=128 full 620 -> 648, causal
  // 530 -> 556).
  constexpr bool kRawScores = kBandOnly;
  // Lane 0 reads what the producer left and tells its warp, so that only
  // lane 0, which releases the stage or Q, has read it.
  auto warp_broadcast = [&](uint32_t value) { return __shfl_sync(0xffffffffu, value, 0); };
  // The consumers take turns issuing their products (FlashAttention-3's
  // warp scheduling), so that one's softmax runs while the other's wgmmas
  // hold the tensor cores: a consumer waits for its turn on its named
  // barrier, issues, and passes the turn on the other's. Consumer 0 starts;
  // every item gives both the same issues (one per step, plus one), and
  // consumer 0 takes a last turn at the end so that no arrival is left.
  auto take_turn = [&] { named_barrier_sync(1 + consumer, 2 * 128); };
  auto pass_turn = [&] { named_barrier_arrive(2 - consumer, 2 * 128); };
  if (consumer == 1) pass_turn();
  int i = 0;  // steps done, as the producer counts them
  // S = Q K^T of the step in `stage`, issued (not waited for); returns
  // the step's record as {tile, masked, last}.
  struct Step {
    int64_t tile;
    bool masked, last;
  };
  auto issue_scores = [&](float (&sc)[kKeys / 8][4], int stage, uint32_t parity) {
    mbarrier_wait(k_full(stage), parity);
    uint32_t packed[2] = {0u, 0u};
    if (lane == 0) {
      const uint2 raw = *reinterpret_cast<const uint2*>(records + stage);  // after the wait
      packed[0] = raw.x;
      packed[1] = raw.y;
    }
    packed[0] = warp_broadcast(packed[0]);
    packed[1] = warp_broadcast(packed[1]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      Wgmma<T>::template ss<kKeys>(sc, k_major(q_tile, kRows, consumer * 64, kk),
                                   k_major(k_tiles + stage * kTileBytes, kKeys, 0, kk), kk > 0);
    }
    wgmma_commit();
    return Step{int64_t(packed[0]), ((packed[1] >> (8 * consumer)) & 0xff) != 0,
                ((packed[1] >> 16) & 0xff) != 0};
  };
  auto release_q = [&] {
    if (lane == 0) mbarrier_arrive(q_empty);
  };
  // An item starts with its Q and its first scores: start_item waits for
  // item n's Q and record. kEarlyStart (D=64, band mask alone): it also
  // issues S of the item's first step into `first_scores`, and the
  // consumers start item n + 1 so before they store item n's output, whose
  // stores then overlap that product. Elsewhere the item's first product
  // is issued at its top, after the previous item's stores: the general
  // mask's registers do not hold the scores beside O (it spilled), and at
  // D=128 starting early was slower (it waits for the next Q before the
  // stores).
  float first_scores[kKeys / 8][4];
  struct ItemStart {
    int w;
    bool has_steps;
    Step step;
  };
  // The products read their accumulators ("+f"): zeros end the previous
  // scores' live range, which else spans the whole item loop (and spills).
  auto clear_first_scores = [&] {
#pragma unroll
    for (int nt = 0; nt < kKeys / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) first_scores[nt][e] = 0.f;
  };
  auto issue_first_scores = [&](float (&sc)[kKeys / 8][4]) {
    take_turn();
    const Step step = issue_scores(sc, i % kStages, (i / kStages) & 1);
    pass_turn();
    return step;
  };
  auto start_item = [&](int n, auto&& store_previous) {
    if constexpr (kEarlyStart) clear_first_scores();  // on every path
    mbarrier_wait(q_full, n & 1);
    ItemStart next{int(warp_broadcast(lane == 0 ? item_record[1] : 0u)), false, Step{0, false, true}};
    if (next.w < num_work) next.has_steps = warp_broadcast(lane == 0 ? item_record[0] : 0u) != 0;
    if (next.w < num_work && !next.has_steps) release_q();  // nothing visible: zeros and lse -inf
    if (kEarlyStart && next.has_steps) {
      // The scores are waited for on this path: ptxas serialises every
      // wgmma of the kernel when a product's registers are in flight
      // where paths join.
      next.step = issue_first_scores(first_scores);
      store_previous();
      wgmma_wait<0>();
    } else {
      store_previous();
    }
    return next;
  };
  ItemStart started{};  // kEarlyStart: item n's start, made before item n - 1's stores
  for (int n = 0;; ++n) {  // n: items done
    const ItemStart current = kEarlyStart && n > 0 ? started : start_item(n, [] {});
    if (current.w >= num_work) break;
    const WorkItem item = item_of(current.w);
    const int64_t warp_row0 = int64_t(item.q_block) * kRows + consumer * 64 + warp * 16;
    float o[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // row_sum: own columns
    float sums[1][4] = {{0.f, 0.f, 0.f, 0.f}};  // kTensorSums: rows g, g + 8 (whole rows)

    // Finished scores: scale and mask them, then the online softmax (P in
    // place; O may still be the target of a wgmma in flight, so the caller
    // applies `rescale` to it later).
    auto softmax = [&](float (&sc)[kKeys / 8][4], const Step& step, float (&rescale)[2]) {
      if constexpr (kRawScores) {
        mask_scores<kKeys / 8, false, kBandOnly>(sc, s, p.mask, p.bias, item.batch, item.head,
                                                 warp_row0, step.tile * kKeys, step.masked);
        online_softmax_raw<kKeys / 8, !kTensorSums>(sc, row_max, row_sum, rescale, scale_log2);
      } else {
#pragma unroll
        for (int nt = 0; nt < kKeys / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) sc[nt][e] *= scale_log2;
        mask_scores<kKeys / 8, false, kBandOnly>(sc, s, p.mask, p.bias, item.batch, item.head,
                                                 warp_row0, step.tile * kKeys, step.masked);
        online_softmax(sc, row_max, row_sum, rescale);
      }
    };
    // Software pipeline within the warpgroup: S of step i+1 is issued
    // before O += P_i V_i, and its softmax runs while that product is in
    // flight.
    if (current.has_steps) {
      float item_scores[kKeys / 8][4];  // the first scores unless kEarlyStart
      float(&scores)[kKeys / 8][4] = kEarlyStart ? first_scores : item_scores;
      Step step = current.step;
      if constexpr (!kEarlyStart) step = issue_first_scores(scores);
      uint32_t pa[kKeys / 16][4];
      {
        float rescale[2];
        wgmma_wait<0>();
        fence_operands(scores);
        if (lane == 0) mbarrier_arrive(k_empty(i % kStages));
        if (step.last) release_q();
        softmax(scores, step, rescale);  // O is 0: nothing to rescale
#pragma unroll
        for (int kb = 0; kb < kKeys / 16; ++kb) {
          c_to_a<T>(pa[kb], scores[2 * kb], scores[2 * kb + 1]);
        }
      }
      auto issue_output = [&](int stage, uint32_t parity) {  // O += P V, issued
        mbarrier_wait(v_full(stage), parity);
        fence_operands(o);
        if constexpr (kTensorSums) fence_operands(sums);
        wgmma_fence();
        const uint32_t v_tile = v_tiles + stage * kTileBytes;
#pragma unroll
        for (int kb = 0; kb < kKeys / 16; ++kb) {
          if constexpr (kTensorSums) {
            // The ones block as V's second 64-column block (the leading offset).
            Wgmma<T>::rs_with_sums(o, sums, pa[kb],
                                   sw128_descriptor(v_tile + kb * 16 * 128, ones_tile - v_tile, 1024),
                                   true);
          } else {
            Wgmma<T>::template rs<D>(o, pa[kb], mn_major(v_tile, kKeys, kb), true);
          }
        }
        wgmma_commit();
      };
      for (; !step.last; ++i) {  // `step` sits in stage i % kStages
        const int stage = i % kStages, next_stage = (i + 1) % kStages;
        float sc[kKeys / 8][4], rescale[2];
        take_turn();
        const Step next = issue_scores(sc, next_stage, ((i + 1) / kStages) & 1);
        issue_output(stage, (i / kStages) & 1);
        pass_turn();
        if constexpr (kBandOnly) {
          wgmma_wait<1>();  // the scores of `next`
        } else {
          wgmma_wait<0>();  // and O += P V of `step`
        }
        fence_operands(sc);
        if (lane == 0) mbarrier_arrive(k_empty(next_stage));
        if (next.last) release_q();
        softmax(sc, next, rescale);
        wgmma_wait<0>();  // O += P V of `step`
        fence_operands(o);
        if constexpr (kTensorSums) fence_operands(sums);
        if (lane == 0) mbarrier_arrive(v_empty(stage));
        scale_rows(o, rescale);
        if constexpr (kTensorSums) scale_rows(sums, rescale);
#pragma unroll
        for (int kb = 0; kb < kKeys / 16; ++kb) c_to_a<T>(pa[kb], sc[2 * kb], sc[2 * kb + 1]);
        step = next;
      }
      take_turn();
      issue_output(i % kStages, (i / kStages) & 1);
      pass_turn();
      wgmma_wait<0>();
      fence_operands(o);
      if constexpr (kTensorSums) fence_operands(sums);
      if (lane == 0) mbarrier_arrive(v_empty(i % kStages));
      ++i;
    }

    auto store_item = [&] {
      if constexpr (kRawScores) {
        row_max[0] *= scale_log2;
        row_max[1] *= scale_log2;
      }
      const int64_t q_stride = s.q_heads * D;
      if constexpr (kTensorSums) {
        row_sum[0] = sums[0][0];
        row_sum[1] = sums[0][2];
      }
      store_output_rows<D, T, !kTensorSums>(
          o, row_max, row_sum,
          static_cast<T*>(p.out) + (int64_t(item.batch) * s.q_len * s.q_heads + item.head) * D,
          q_stride, p.lse + (int64_t(item.batch) * s.q_heads + item.head) * s.q_len,
          warp_row0 + g, s.q_len, t);
    };
    if constexpr (kEarlyStart) {
      started = start_item(n + 1, store_item);
    } else {
      store_item();
    }
  }
  if (consumer == 0) take_turn();  // consumer 1's last pass
#endif  // FASTATTN_HAS_WGMMA
}

template <int D, typename T, bool kBandOnly, int kKeys = 128>
cudaError_t launch_variant(const ForwardParams& p, int32_t* work_counter, cudaStream_t stream) {
  constexpr int kShared = shared_bytes<D, kKeys, kBandOnly>();
  const AttentionShape& s = p.shape;
  TensorMaps maps;
  if (!encode_tensor_map(&maps.q, p.q, p.dtype, s.batch, s.q_len, s.q_heads, D, kRows) ||
      !encode_tensor_map(&maps.k, p.k, p.dtype, s.batch, s.kv_len, s.kv_heads, D, kKeys) ||
      !encode_tensor_map(&maps.v, p.v, p.dtype, s.batch, s.kv_len, s.kv_heads, D, kKeys)) {
    return cudaErrorInvalidValue;
  }
  auto kernel = forward_wgmma_kernel<D, T, kBandOnly, kKeys>;
  if (cudaError_t e =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kShared);
      e != cudaSuccess) {
    return e;
  }
  int device = 0, sms = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  if (cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
      e != cudaSuccess) {
    return e;
  }
  // The (batch, q head) pairs whose K/V share L2: a q head's share of its
  // K/V head's bytes. With no mask at all every item of a pair reads all
  // its K/V and items cost alike, so pairs run one after another (group 1):
  // the CTAs running at once then read the K/V of a few pairs rather than of
  // a whole group's heads interleaved. On an H100, kernel alone, bf16, H=32,
  // D=128, no mask: 561 vs 511 TFLOP/s at S=1K, 655 vs 636 at 4K; under a
  // causal band group 1 was slower (570 vs 581 at 4K), as the longest-first
  // order then holds within a pair only. Other masks (segments, a dense
  // mask, a bias) keep the groups too: their items differ in cost.
  const bool items_alike = kBandOnly && !p.mask.has_band();
  const int64_t pairs = s.batch * s.q_heads;
  const int64_t bytes_per_pair = s.kv_len * D * 2 * 2 * s.kv_heads / s.q_heads;
  const int64_t group =
      items_alike
          ? 1
          : std::max<int64_t>(1, std::min(pairs, kL2Bytes / std::max<int64_t>(1, bytes_per_pair)));
  const int64_t work = s.num_q_tiles(kRows) * pairs;
  if (work > INT32_MAX) return cudaErrorInvalidValue;
  const int64_t ctas = std::min<int64_t>(work, sms);  // one per SM (its shared memory)
  if (work_counter == nullptr) return cudaErrorInvalidValue;
  if (items_alike) {
    work_counter = nullptr;  // a fixed stride
  } else if (cudaError_t e = cudaMemsetAsync(work_counter, 0, sizeof(int32_t), stream);
             e != cudaSuccess) {
    return e;
  }
  kernel<<<static_cast<unsigned>(ctas), kThreads, kShared, stream>>>(p, maps, int(group),
                                                                      work_counter);
  return cudaGetLastError();
}

template <int D, typename T>
cudaError_t launch(const ForwardParams& p, int32_t* work_counter, cudaStream_t stream) {
  if (!forward_band_only(p)) return launch_variant<D, T, false>(p, work_counter, stream);
  if constexpr (D == 128) {
    if (!p.mask.has_band()) return launch_variant<D, T, true, kLongKeys>(p, work_counter, stream);
  }
  return launch_variant<D, T, true>(p, work_counter, stream);
}

}  // namespace

// Asks for the forward kernel's image; the backward kernels are built for
// the same targets.
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
        cudaFuncGetAttributes(&attributes, forward_wgmma_kernel<128, __nv_bfloat16, true, 128>) ==
            cudaSuccess &&
        attributes.binaryVersion == 90;
    cudaGetLastError();  // a missing kernel image must not linger as the last error
    cached[device] = yes ? 1 : 2;
  }
  return cached[device] == 1;
}

cudaError_t attention_forward_wgmma(const ForwardParams& params, int32_t* work_counter,
                                    cudaStream_t stream) {
  const bool bf16 = params.dtype == ElementType::kBF16;
  if (params.shape.head_dim == 64) {
    return bf16 ? launch<64, __nv_bfloat16>(params, work_counter, stream)
                : launch<64, __half>(params, work_counter, stream);
  }
  return bf16 ? launch<128, __nv_bfloat16>(params, work_counter, stream)
              : launch<128, __half>(params, work_counter, stream);
}

}  // namespace cuda
}  // namespace fastattn
