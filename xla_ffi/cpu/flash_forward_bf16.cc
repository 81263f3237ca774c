// The bf16 forward pass on the matrix units (bf16_tiles.h): Q K^T and P V
// as bf16 products with float32 results; scale, bias, mask and the online
// softmax in float32, as the float32 kernel does them. Only the softmax
// weights are rounded to bf16 before P V (as FlashAttention-2 on GPUs does).
#include <cmath>
#include <optional>

#include "bf16_tiles.h"
#include "flash_forward.h"
#include "tile_ops.h"
#include "vec_math.h"

#ifdef FASTATTN_HAVE_BF16_TILES


namespace fastattn {
namespace cpu {
inline namespace FASTATTN_ISA_NS {
namespace {

constexpr int64_t kGroupRows = 32;  // rows per logits / softmax / P V step

// e^x for softmax weights that are rounded to bf16 next, given t = x·log2(e):
// 2^t = 2^n · 2^f (n = round(t), |f| <= 1/2), 2^f by its degree-4 Taylor
// polynomial: relative error < 5e-5, far below bf16's rounding step (2^-9)
// and 9 instructions instead of vexp's 14. t <= -200 (masked logits are
// -inf) gives exactly 0.
inline __m512 exp2_for_bf16(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-200.f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 poly = _mm512_set1_ps(9.6181291e-3f);                   // ln2^4 / 24
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(5.5504109e-2f));  // ln2^3 / 6
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(2.4022651e-1f));  // ln2^2 / 2
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(6.9314718e-1f));  // ln2
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(poly, n);
}

constexpr float kLog2e = 1.44269504088896341f;

// Online softmax (FlashAttention-2 Algorithm 1) of up to kGroupRows rows of
// logits (bias added and masked, not yet scaled): rescales the running sums
// and output rows and writes the weights relative to the new running maxima
// as bf16. `scale` (> 0) multiplies the logits on the way, folded into the
// exponent: p = 2^(x·scale·log2e − max·log2e). Two sweeps over the rows,
// each a loop of independent rows that the out-of-order core overlaps: the
// maxima, then weights, sums and rescaling (one row at a time, each row's
// chain of dependent steps left the core idle: 3.6 vs 2.3 µs for a 64x128
// tile in a micro benchmark).
inline void softmax_rows_to_bf16(const float* logits, int64_t rows, int64_t cols, float scale, float* row_max,
                                 float* row_sum, float* acc, int64_t padded_dim, bf16_t* weights) {
  float new_max[kGroupRows];
  for (int64_t i = 0; i < rows; ++i) {
    const float* row = logits + i * cols;
    __m512 best0 = _mm512_loadu_ps(row), best1 = _mm512_loadu_ps(row + 16);
    for (int64_t j = 32; j < cols; j += 32) {
      best0 = _mm512_max_ps(best0, _mm512_loadu_ps(row + j));
      best1 = _mm512_max_ps(best1, _mm512_loadu_ps(row + j + 16));
    }
    new_max[i] = std::max(row_max[i], scale * _mm512_reduce_max_ps(_mm512_max_ps(best0, best1)));
  }
  for (int64_t i = 0; i < rows; ++i) {
    const float* row = logits + i * cols;
    bf16_t* w = weights + i * cols;
    if (new_max[i] == kNegInf) {  // nothing visible yet: all weights 0
      std::fill(w, w + cols, bf16_t{0});
      continue;
    }
    const __m512 exponent_scale = _mm512_set1_ps(scale * kLog2e);
    const __m512 exponent_shift = _mm512_set1_ps(-new_max[i] * kLog2e);
    __m512 total0 = _mm512_setzero_ps(), total1 = _mm512_setzero_ps();
    for (int64_t j = 0; j < cols; j += 32) {
      const __m512 p0 = exp2_for_bf16(_mm512_fmadd_ps(_mm512_loadu_ps(row + j), exponent_scale, exponent_shift));
      const __m512 p1 = exp2_for_bf16(_mm512_fmadd_ps(_mm512_loadu_ps(row + j + 16), exponent_scale, exponent_shift));
      total0 = _mm512_add_ps(total0, p0);
      total1 = _mm512_add_ps(total1, p1);
      _mm512_storeu_si512(w + j, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
    }
    const float tile_sum = _mm512_reduce_add_ps(_mm512_add_ps(total0, total1));
    if (row_max[i] == new_max[i]) {  // running max unchanged: nothing to rescale
      row_sum[i] += tile_sum;
      continue;
    }
    // exp(old max - new max); 0 while the row had seen nothing (-inf).
    const __m512 correction = exp2_for_bf16(_mm512_set1_ps((row_max[i] - new_max[i]) * kLog2e));
    row_sum[i] = row_sum[i] * _mm512_cvtss_f32(correction) + tile_sum;
    row_max[i] = new_max[i];
    float* out_row = acc + i * padded_dim;
    for (int64_t d = 0; d < padded_dim; d += 16) {
      _mm512_storeu_ps(out_row + d, _mm512_mul_ps(_mm512_loadu_ps(out_row + d), correction));
    }
  }
}

template <bool kAmx>
void forward_bf16(const ForwardParams& p) {
  const AttentionShape& s = p.shape;
  const MaskParams& mask = p.mask;
  const int64_t tile_q = mask.tile_q, tile_kv = mask.tile_kv;
  const int64_t padded_dim = round_up(s.head_dim, kBf16DimChunk);
  const int64_t padded_rows = round_up(tile_q, kTileRows);
  const int64_t num_q_tiles = s.num_q_tiles(tile_q), num_kv_tiles = s.num_kv_tiles(tile_kv);
  const int64_t q_row_stride = s.q_heads * s.head_dim;
  const bf16_t* q = static_cast<const bf16_t*>(p.q);
  bf16_t* out = static_cast<bf16_t*>(p.out);
  const PackedBf16Kv kv = pack_bf16_kv(static_cast<const bf16_t*>(p.k), static_cast<const bf16_t*>(p.v), s,
                                       mask, padded_dim);
  const bool prescale = p.bias.data != nullptr || !(p.softmax_scale > 0.f);

  parallel_for(s.batch * s.q_heads * num_q_tiles, [&](int64_t item) {
    // Heaviest q tiles (the last ones under a causal mask) go out first.
    const int64_t q_tile = num_q_tiles - 1 - item % num_q_tiles;
    const int64_t h = (item / num_q_tiles) % s.q_heads;
    const int64_t b = item / (num_q_tiles * s.q_heads);
    const int64_t kv_h = h / s.group();
    const int64_t q0 = q_tile * tile_q, rows = std::min(tile_q, s.q_len - q0);
    const int64_t rows_p = round_up(rows, kTileRows);

    Scratch& scratch = thread_scratch();
    // bf16 buffers live in float scratch (two values per float).
    bf16_t* q_tile_buf = reinterpret_cast<bf16_t*>(scratch.get(0, padded_rows * padded_dim / 2));
    bf16_t* weights = reinterpret_cast<bf16_t*>(scratch.get(1, padded_rows * tile_kv / 2));
    float* logits = scratch.get(3, padded_rows * tile_kv);
    float* acc = scratch.get(4, padded_rows * padded_dim);
    float* row_max = scratch.get(5, padded_rows);
    float* row_sum = scratch.get(6, padded_rows);

    // q rows as they are (bf16, zero padded to rows_p x Dp): the scale goes
    // on the float32 logits, so q is not rounded twice.
    std::fill(q_tile_buf, q_tile_buf + rows_p * padded_dim, bf16_t{0});
    const bf16_t* q_base = q + ((b * s.q_len + q0) * s.q_heads + h) * s.head_dim;
    for (int64_t i = 0; i < rows; ++i) {
      std::copy(q_base + i * q_row_stride, q_base + i * q_row_stride + s.head_dim, q_tile_buf + i * padded_dim);
    }
    std::fill(weights, weights + rows_p * tile_kv, bf16_t{0});  // rows past `rows` stay 0
    std::fill(acc, acc + rows_p * padded_dim, 0.f);
    std::fill(row_max, row_max + rows, kNegInf);
    std::fill(row_sum, row_sum + rows, 0.f);
#ifdef FASTATTN_HAVE_AMX_TILES
    std::optional<AmxTileScope> tiles;
    if (kAmx) tiles.emplace(uniform_tile_config());
#endif

    for (int64_t kv_tile = 0; kv_tile < num_kv_tiles; ++kv_tile) {
      const int8_t cls = tile_class_at(mask, b, h, q_tile, kv_tile, num_q_tiles, num_kv_tiles);
      if (cls == kEmpty) continue;
      const int64_t k0 = kv_tile * tile_kv, keys = std::min(tile_kv, s.kv_len - k0);
      const int64_t key_chunks = (keys + kBf16KeyChunk - 1) / kBf16KeyChunk;
      const uint32_t* k_tile = kv.k_tile(b, kv_h, kv_tile);
      const uint32_t* v_tile = kv.v_tile(b, kv_h, kv_tile);
      // Rows in groups of 32 (two AMX row blocks), in the order logits(g),
      // P V(g - 1), softmax(g), so that the matrix unit can work through
      // P V of one group while the vector units run the softmax of the
      // next, which does not depend on it. (Against logits, softmax, P V
      // of all rows in turn: within the noise of the shared 2-core machine.)
      auto group_logits = [&](int64_t g) {
        const int64_t r0 = g * kGroupRows, group_rows = std::min(kGroupRows, rows_p - r0);
#ifdef FASTATTN_HAVE_AMX_TILES
        if (kAmx) {
          amx_logits(logits + r0 * tile_kv, tile_kv, q_tile_buf + r0 * padded_dim, padded_dim, k_tile,
                     group_rows, 2 * key_chunks);
          return;
        }
#endif
        dot_logits(logits + r0 * tile_kv, tile_kv, q_tile_buf + r0 * padded_dim, padded_dim, k_tile,
                   group_rows, 2 * key_chunks);
      };
      auto group_pv = [&](int64_t g) {
        const int64_t r0 = g * kGroupRows, group_rows = std::min(kGroupRows, rows_p - r0);
#ifdef FASTATTN_HAVE_AMX_TILES
        if (kAmx) {
          amx_accumulate_pv(acc + r0 * padded_dim, padded_dim, weights + r0 * tile_kv, tile_kv, v_tile,
                            group_rows, key_chunks);
          return;
        }
#endif
        dot_accumulate_pv(acc + r0 * padded_dim, padded_dim, weights + r0 * tile_kv, tile_kv, v_tile,
                          group_rows, key_chunks);
      };
      auto group_softmax = [&](int64_t g) {
        const int64_t r0 = g * kGroupRows, group_rows = std::min(kGroupRows, rows - r0);
        float* group_logits = logits + r0 * tile_kv;
        float scale = p.softmax_scale;
        if (prescale) {
          for (int64_t i = 0; i < group_rows; ++i) {
            float* row = group_logits + i * tile_kv;
            for (int64_t j = 0; j < tile_kv; j += kLanes) store(row + j, load(row + j) * scale);
          }
          scale = 1.f;
          if (p.bias.data != nullptr) {
            add_bias_tile(group_logits, tile_kv, p.bias, s, b, h, q0 + r0, group_rows, k0, keys);
          }
        }
        // Masked logits are -inf, which the softmax's scale keeps -inf.
        mask_tile(group_logits, tile_kv, mask, s, b, h, q0 + r0, group_rows, k0, keys, cls == kPartial);
        softmax_rows_to_bf16(group_logits, group_rows, tile_kv, scale, row_max + r0, row_sum + r0,
                             acc + r0 * padded_dim, padded_dim, weights + r0 * tile_kv);
      };
      const int64_t groups = (rows_p + kGroupRows - 1) / kGroupRows;
      group_logits(0);
      group_softmax(0);
      for (int64_t g = 1; g < groups; ++g) {
        group_logits(g);
        group_pv(g - 1);
        group_softmax(g);
      }
      group_pv(groups - 1);
    }

    write_normalized_rows(out + ((b * s.q_len + q0) * s.q_heads + h) * s.head_dim, q_row_stride,
                          p.lse + (b * s.q_heads + h) * s.q_len + q0, acc, padded_dim, row_max, row_sum, rows,
                          s.head_dim);
  });
}

}  // namespace

bool flash_forward_bf16(const ForwardParams& params) {
  if (params.dtype != ElementType::kBF16) return false;
#ifdef FASTATTN_HAVE_AMX_TILES
  if (amx_available()) {
    forward_bf16<true>(params);
    return true;
  }
#endif
  forward_bf16<false>(params);
  return true;
}

}  // namespace FASTATTN_ISA_NS
}  // namespace cpu
}  // namespace fastattn

#else  // no AVX512-BF16 at this level: the float32 kernel takes bf16 too

namespace fastattn {
namespace cpu {
inline namespace FASTATTN_ISA_NS {
bool flash_forward_bf16(const ForwardParams&) { return false; }
}  // namespace FASTATTN_ISA_NS
}  // namespace cpu
}  // namespace fastattn

#endif
