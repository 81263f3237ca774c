#include "flash_forward.h"

#include <cmath>

#include "../common/thread_pool.h"
#include "gemm.h"
#include "tile_ops.h"
#include "vec_math.h"

namespace fastattn {
namespace cpu {
inline namespace FASTATTN_ISA_NS {
namespace {

// Online softmax (FlashAttention-2, Algorithm 1) over `rows` logits rows:
// turns each row into weights relative to its new running max and rescales
// the running sum and output row. While nothing in a row has been visible
// yet, its weights are all zero and its running state stays empty. Two
// sweeps over the rows, each a loop of independent rows that the
// out-of-order core overlaps: the maxima, then weights, sums and rescaling
// (one row at a time, each row's chain of dependent steps left the core
// idle: 3.2 vs 2.1 us for a 64 x 128 tile in a micro benchmark).
inline void online_softmax_rows(float* logits, int64_t rows, int64_t cols, float* row_max, float* row_sum,
                                float* acc, int64_t padded_dim, float* new_max) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* row = logits + i * cols;
    vfloat best0 = load(row), best1 = load(row + kLanes);
    for (int64_t j = 2 * kLanes; j < cols; j += 2 * kLanes) {
      best0 = vmax(best0, load(row + j));
      best1 = vmax(best1, load(row + j + kLanes));
    }
    new_max[i] = std::max(row_max[i], reduce_max(vmax(best0, best1)));
  }
  for (int64_t i = 0; i < rows; ++i) {
    float* row = logits + i * cols;
    const float max = new_max[i];
    if (max == kNegInf) {
      std::fill(row, row + cols, 0.f);
      continue;
    }
    vfloat total0 = splat(0.f), total1 = splat(0.f);
    for (int64_t j = 0; j < cols; j += 2 * kLanes) {
      const vfloat p0 = vexp(load(row + j) - max), p1 = vexp(load(row + j + kLanes) - max);
      store(row + j, p0);
      store(row + j + kLanes, p1);
      total0 += p0;
      total1 += p1;
    }
    const float tile_sum = reduce_sum(total0 + total1);
    if (row_max[i] == max) {  // running max unchanged: nothing to rescale
      row_sum[i] += tile_sum;
      continue;
    }
    const float correction = scalar_exp(row_max[i] - max);  // 0 while the row had seen nothing
    row_sum[i] = row_sum[i] * correction + tile_sum;
    row_max[i] = max;
    float* out_row = acc + i * padded_dim;
    for (int64_t d = 0; d < padded_dim; d += kLanes) store(out_row + d, load(out_row + d) * correction);
  }
}

template <typename T>
void forward_typed(const ForwardParams& p) {
  const AttentionShape& s = p.shape;
  const MaskParams& mask = p.mask;
  const int64_t tile_q = mask.tile_q, tile_kv = mask.tile_kv;
  const int64_t padded_dim = round_up(s.head_dim, kGemmCols);
  const int64_t num_q_tiles = s.num_q_tiles(tile_q);
  const int64_t num_kv_tiles = s.num_kv_tiles(tile_kv);
  const int64_t q_row_stride = s.q_heads * s.head_dim;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  // Both products take B as 32-column panels (gemm_panels):
  // K^T's panels are 32 keys x padded_dim, V's are tile_kv keys x 32 dims.
  const PackedKv k_t_tiles = pack_kv_tiles(k, s, mask, padded_dim, KvLayout::kTransposedPanels, 0);
  const PackedKv v_tiles = pack_kv_tiles(v, s, mask, padded_dim, KvLayout::kRowPanels, 1);

  parallel_for(s.batch * s.q_heads * num_q_tiles, [&](int64_t item) {
    // Heaviest q tiles (the last ones under a causal mask) go out first.
    const int64_t q_tile = num_q_tiles - 1 - item % num_q_tiles;
    const int64_t h = (item / num_q_tiles) % s.q_heads;
    const int64_t b = item / (num_q_tiles * s.q_heads);
    const int64_t kv_h = h / s.group();
    const int64_t q0 = q_tile * tile_q;
    const int64_t rows = std::min(tile_q, s.q_len - q0);

    Scratch& scratch = thread_scratch();
    float* q_tile_buf = scratch.get(0, tile_q * padded_dim);
    float* logits = scratch.get(3, tile_q * tile_kv);
    float* acc = scratch.get(4, tile_q * padded_dim);
    float* row_max = scratch.get(5, tile_q);
    float* row_sum = scratch.get(6, tile_q);
    float* new_max = scratch.get(7, tile_q);

    // Pre-scaling q makes q k^T the scaled logits directly.
    pack_rows(q_tile_buf, padded_dim, q + ((b * s.q_len + q0) * s.q_heads + h) * s.head_dim,
              q_row_stride, rows, s.head_dim, p.softmax_scale, nullptr);
    std::fill(acc, acc + rows * padded_dim, 0.f);
    std::fill(row_max, row_max + rows, kNegInf);
    std::fill(row_sum, row_sum + rows, 0.f);

    for (int64_t kv_tile = 0; kv_tile < num_kv_tiles; ++kv_tile) {
      const int8_t cls = tile_class_at(mask, b, h, q_tile, kv_tile, num_q_tiles, num_kv_tiles);
      if (cls == kEmpty) continue;
      const int64_t k0 = kv_tile * tile_kv;
      const int64_t keys = std::min(tile_kv, s.kv_len - k0);
      const float* k_t = k_t_tiles.tile(b, kv_h, kv_tile);
      const float* v_tile = v_tiles.tile(b, kv_h, kv_tile);

      // Each product brings the tile that the next one reads into L2: V of
      // this kv tile during Q K^T, K^T of the next kv tile during P V.
      const int64_t tile_bytes = tile_kv * padded_dim * int64_t(sizeof(float));
      gemm_panels</*kAccumulate=*/false>(logits, tile_kv, q_tile_buf, padded_dim, k_t, padded_dim * kPanelCols,
                                         rows, tile_kv, padded_dim, v_tile, tile_bytes);
      if (p.bias.data != nullptr) {
        add_bias_tile(logits, tile_kv, p.bias, s, b, h, q0, rows, k0, keys);
      }
      mask_tile(logits, tile_kv, mask, s, b, h, q0, rows, k0, keys, cls == kPartial);
      online_softmax_rows(logits, rows, tile_kv, row_max, row_sum, acc, padded_dim, new_max);
      const float* next_k_t = kv_tile + 1 < num_kv_tiles ? k_t_tiles.tile(b, kv_h, kv_tile + 1) : nullptr;
      gemm_panels</*kAccumulate=*/true>(acc, padded_dim, logits, tile_kv, v_tile, tile_kv * kPanelCols, rows,
                                        padded_dim, keys, next_k_t, tile_bytes);
    }

    write_normalized_rows(out + ((b * s.q_len + q0) * s.q_heads + h) * s.head_dim, q_row_stride,
                          p.lse + (b * s.q_heads + h) * s.q_len + q0, acc, padded_dim, row_max, row_sum, rows,
                          s.head_dim);
  });
}

}  // namespace

void flash_forward(const ForwardParams& params) {
  if (flash_forward_bf16(params)) return;
  dispatch_element_type(params.dtype, [&](auto tag) { forward_typed<decltype(tag)>(params); });
}

}  // namespace FASTATTN_ISA_NS
}  // namespace cpu
}  // namespace fastattn
