#include "ffi_decode.h"

#include <string>

#include "check.h"

namespace fastattn {
namespace {

std::string dims_string(ffi::AnyBuffer::Dimensions dims) {
  Message out;
  out << "[";
  for (size_t i = 0; i < dims.size(); ++i) out << (i ? ", " : "") << dims[i];
  out << "]";
  return out.str();
}

}  // namespace

ffi::Error element_type_of(const ffi::AnyBuffer& buffer, const char* name, ElementType* type) {
  switch (buffer.element_type()) {
    case ffi::DataType::F32: *type = ElementType::kF32; break;
    case ffi::DataType::BF16: *type = ElementType::kBF16; break;
    case ffi::DataType::F16: *type = ElementType::kF16; break;
    default: FFI_CHECK(false, name << " must be float32, bfloat16 or float16");
  }
  return ffi::Error::Success();
}

ffi::Error expect_shape(const ffi::AnyBuffer& buffer, const char* name,
                        std::initializer_list<int64_t> dims, ffi::DataType dtype) {
  auto actual = buffer.dimensions();
  bool same = actual.size() == dims.size();
  size_t i = 0;
  for (int64_t d : dims) same = same && actual[i++] == d;
  if (!same) {
    Message expected;
    expected << "[";
    i = 0;
    for (int64_t d : dims) expected << (i++ ? ", " : "") << d;
    expected << "]";
    FFI_CHECK(false, name << " must have shape " << expected.str() << ", got " << dims_string(actual));
  }
  FFI_CHECK(buffer.element_type() == dtype,
            name << " has dtype code " << int(buffer.element_type()) << ", expected code "
                 << int(dtype));
  return ffi::Error::Success();
}

ffi::Error decode_shape(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                        const ffi::AnyBuffer& v, AttentionShape* shape, ElementType* dtype) {
  FFI_CHECK(q.dimensions().size() == 4,
            "q must have rank 4 [B, Sq, Hq, D], got " << dims_string(q.dimensions()));
  FFI_CHECK(k.dimensions().size() == 4,
            "k must have rank 4 [B, Skv, Hkv, D], got " << dims_string(k.dimensions()));
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  shape->batch = qd[0];
  shape->q_len = qd[1];
  shape->q_heads = qd[2];
  shape->head_dim = qd[3];
  shape->kv_len = kd[1];
  shape->kv_heads = kd[2];
  FFI_CHECK(kd[0] == qd[0] && kd[3] == qd[3],
            "k " << dims_string(kd) << " must match q " << dims_string(qd)
                 << " in batch and head dim");
  FFI_CHECK(shape->kv_heads > 0 && shape->q_heads % shape->kv_heads == 0,
            "q heads (" << shape->q_heads << ") must be a multiple of k/v heads ("
                        << shape->kv_heads << ")");
  FFI_CHECK(shape->head_dim >= 1 && shape->head_dim <= 256,
            "head dim must be in [1, 256], got " << shape->head_dim);
  FFI_CHECK(shape->q_len >= 1 && shape->kv_len >= 1, "sequence lengths must be >= 1");
  if (auto e = element_type_of(q, "q", dtype); e.failure()) return e;
  if (auto e = expect_shape(v, "v", {kd[0], kd[1], kd[2], kd[3]}, q.element_type()); e.failure())
    return e;
  FFI_CHECK(k.element_type() == q.element_type(), "k must have q's dtype");
  return ffi::Error::Success();
}

ffi::Error decode_bias(const ffi::AnyBuffer& bias, const AttentionShape& shape,
                       BiasParams* params) {
  if (is_absent(bias)) {
    *params = BiasParams{};
    return ffi::Error::Success();
  }
  auto d = bias.dimensions();
  FFI_CHECK(d.size() == 4 && (d[0] == 1 || d[0] == shape.batch) &&
                (d[1] == 1 || d[1] == shape.q_heads) && d[2] == shape.q_len &&
                d[3] == shape.kv_len,
            "bias must have shape [B|1, Hq|1, Sq, Skv], got " << dims_string(d));
  FFI_CHECK(bias.element_type() == ffi::DataType::F32, "bias must be float32 here");
  params->data = static_cast<const float*>(bias.untyped_data());
  params->batch = d[0];
  params->heads = d[1];
  return ffi::Error::Success();
}

ffi::Error decode_mask(const ffi::AnyBuffer& q_segment, const ffi::AnyBuffer& kv_segment,
                       const ffi::AnyBuffer& dense, const ffi::AnyBuffer& tile_class,
                       const AttentionShape& shape, int64_t band_lo, int64_t band_hi,
                       int64_t tile_q, int64_t tile_kv, MaskParams* mask) {
  FFI_CHECK(tile_q >= 1 && tile_q <= 4096, "tile_q must be in [1, 4096], got " << tile_q);
  FFI_CHECK(tile_kv >= 32 && tile_kv <= 4096 && tile_kv % 32 == 0,
            "tile_kv must be a multiple of 32 in [32, 4096], got " << tile_kv);
  *mask = MaskParams{};
  mask->band_lo = band_lo;
  mask->band_hi = band_hi;
  mask->tile_q = tile_q;
  mask->tile_kv = tile_kv;
  FFI_CHECK(is_absent(q_segment) == is_absent(kv_segment),
            "q_segment_ids and kv_segment_ids must be given together");
  if (!is_absent(q_segment)) {
    if (auto e = expect_shape(q_segment, "q_segment_ids", {shape.batch, shape.q_len},
                              ffi::DataType::S32);
        e.failure())
      return e;
    if (auto e = expect_shape(kv_segment, "kv_segment_ids", {shape.batch, shape.kv_len},
                              ffi::DataType::S32);
        e.failure())
      return e;
    mask->q_segment = static_cast<const int32_t*>(q_segment.untyped_data());
    mask->kv_segment = static_cast<const int32_t*>(kv_segment.untyped_data());
  }
  if (!is_absent(dense)) {
    auto d = dense.dimensions();
    FFI_CHECK(d.size() == 4 && (d[0] == 1 || d[0] == shape.batch) &&
                  (d[1] == 1 || d[1] == shape.q_heads) && d[2] == shape.q_len &&
                  d[3] == shape.kv_len,
              "dense mask must have shape [B|1, Hq|1, Sq, Skv], got " << dims_string(d));
    FFI_CHECK(dense.element_type() == ffi::DataType::PRED, "dense mask must be bool");
    mask->dense = static_cast<const uint8_t*>(dense.untyped_data());
    mask->dense_batch = d[0];
    mask->dense_heads = d[1];
  }
  auto t = tile_class.dimensions();
  const int64_t nq = shape.num_q_tiles(tile_q), nk = shape.num_kv_tiles(tile_kv);
  FFI_CHECK(t.size() == 4 && (t[0] == 1 || t[0] == shape.batch) &&
                (t[1] == 1 || t[1] == shape.q_heads) && t[2] == nq && t[3] == nk,
            "tile_class must have shape [B|1, Hq|1, " << nq << ", " << nk << "], got "
                                                       << dims_string(t));
  FFI_CHECK(tile_class.element_type() == ffi::DataType::S8, "tile_class must be int8");
  mask->tile_class = static_cast<const int8_t*>(tile_class.untyped_data());
  mask->tile_batch = t[0];
  mask->tile_heads = t[1];
  return ffi::Error::Success();
}

namespace {

// What every attention call shares, into the same-named fields of
// ForwardParams or BackwardParams: shape and dtype of q, k, v; bias; mask.
template <typename Params>
ffi::Error decode_inputs(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                         const ffi::AnyBuffer& v, const ffi::AnyBuffer& bias,
                         const ffi::AnyBuffer& q_segment, const ffi::AnyBuffer& kv_segment,
                         const ffi::AnyBuffer& dense, const ffi::AnyBuffer& tile_class,
                         int64_t band_lo, int64_t band_hi, int64_t tile_q, int64_t tile_kv,
                         Params* params) {
  if (auto e = decode_shape(q, k, v, &params->shape, &params->dtype); e.failure()) return e;
  if (auto e = decode_bias(bias, params->shape, &params->bias); e.failure()) return e;
  return decode_mask(q_segment, kv_segment, dense, tile_class, params->shape, band_lo, band_hi,
                     tile_q, tile_kv, &params->mask);
}

}  // namespace

ffi::Error decode_forward_args(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                               const ffi::AnyBuffer& v, const ffi::AnyBuffer& bias,
                               const ffi::AnyBuffer& q_segment, const ffi::AnyBuffer& kv_segment,
                               const ffi::AnyBuffer& dense, const ffi::AnyBuffer& tile_class,
                               ffi::AnyBuffer& out, ffi::AnyBuffer& lse, float softmax_scale,
                               int64_t band_lo, int64_t band_hi, int64_t tile_q, int64_t tile_kv,
                               ForwardParams* params) {
  if (auto e = decode_inputs(q, k, v, bias, q_segment, kv_segment, dense, tile_class, band_lo,
                             band_hi, tile_q, tile_kv, params);
      e.failure())
    return e;
  const AttentionShape& s = params->shape;
  if (auto e = expect_shape(out, "out", {s.batch, s.q_len, s.q_heads, s.head_dim},
                            q.element_type());
      e.failure())
    return e;
  if (auto e = expect_shape(lse, "lse", {s.batch, s.q_heads, s.q_len}, ffi::DataType::F32);
      e.failure())
    return e;
  params->q = q.untyped_data();
  params->k = k.untyped_data();
  params->v = v.untyped_data();
  params->softmax_scale = softmax_scale;
  params->out = out.untyped_data();
  params->lse = static_cast<float*>(lse.untyped_data());
  return ffi::Error::Success();
}

ffi::Error decode_backward_args(
    const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
    const ffi::AnyBuffer& out, const ffi::AnyBuffer& lse, const ffi::AnyBuffer& d_out,
    const ffi::AnyBuffer& d_lse, const ffi::AnyBuffer& bias, const ffi::AnyBuffer& q_segment,
    const ffi::AnyBuffer& kv_segment, const ffi::AnyBuffer& dense,
    const ffi::AnyBuffer& tile_class, ffi::AnyBuffer& d_q, ffi::AnyBuffer& d_k,
    ffi::AnyBuffer& d_v, ffi::AnyBuffer& d_bias, float softmax_scale, int64_t band_lo,
    int64_t band_hi, int64_t tile_q, int64_t tile_kv, BackwardParams* params) {
  if (auto e = decode_inputs(q, k, v, bias, q_segment, kv_segment, dense, tile_class, band_lo,
                             band_hi, tile_q, tile_kv, params);
      e.failure())
    return e;
  const AttentionShape& s = params->shape;
  const auto dtype = q.element_type();
  const std::initializer_list<int64_t> q_dims = {s.batch, s.q_len, s.q_heads, s.head_dim};
  const std::initializer_list<int64_t> kv_dims = {s.batch, s.kv_len, s.kv_heads, s.head_dim};
  const std::initializer_list<int64_t> lse_dims = {s.batch, s.q_heads, s.q_len};
  if (auto e = expect_shape(out, "out", q_dims, dtype); e.failure()) return e;
  if (auto e = expect_shape(d_out, "d_out", q_dims, dtype); e.failure()) return e;
  if (auto e = expect_shape(lse, "lse", lse_dims, ffi::DataType::F32); e.failure()) return e;
  if (!is_absent(d_lse)) {
    if (auto e = expect_shape(d_lse, "d_lse", lse_dims, ffi::DataType::F32); e.failure())
      return e;
    params->d_lse = static_cast<const float*>(d_lse.untyped_data());
  }
  if (auto e = expect_shape(d_q, "d_q", q_dims, dtype); e.failure()) return e;
  if (auto e = expect_shape(d_k, "d_k", kv_dims, dtype); e.failure()) return e;
  if (auto e = expect_shape(d_v, "d_v", kv_dims, dtype); e.failure()) return e;
  if (params->bias.data != nullptr) {
    if (auto e = expect_shape(d_bias, "d_bias", {s.batch, s.q_heads, s.q_len, s.kv_len},
                              ffi::DataType::F32);
        e.failure())
      return e;
    params->d_bias = static_cast<float*>(d_bias.untyped_data());
  }
  params->q = q.untyped_data();
  params->k = k.untyped_data();
  params->v = v.untyped_data();
  params->out = out.untyped_data();
  params->lse = static_cast<const float*>(lse.untyped_data());
  params->d_out = d_out.untyped_data();
  params->softmax_scale = softmax_scale;
  params->d_q = d_q.untyped_data();
  params->d_k = d_k.untyped_data();
  params->d_v = d_v.untyped_data();
  return ffi::Error::Success();
}

ffi::Error decode_decode_args(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                              const ffi::AnyBuffer& v, const ffi::AnyBuffer& lengths,
                              const ffi::AnyBuffer& page_table, const ffi::AnyBuffer& out,
                              const ffi::AnyBuffer& lse, DecodeParams* p) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  FFI_CHECK(qd.size() == 3, "q must have rank 3 [B, Hq, D], got " << dims_string(qd));
  FFI_CHECK(kd.size() == 4, "k cache must have rank 4, got " << dims_string(kd));
  p->batch = qd[0];
  p->q_heads = qd[1];
  p->head_dim = qd[2];
  p->kv_heads = kd[2];
  p->num_pages = kd[0];
  p->page_size = kd[1];
  FFI_CHECK(kd[3] == p->head_dim, "k cache head dim " << kd[3] << " must equal q's " << p->head_dim);
  FFI_CHECK(p->kv_heads > 0 && p->q_heads % p->kv_heads == 0,
            "q heads (" << p->q_heads << ") must be a multiple of k/v heads (" << p->kv_heads << ")");
  FFI_CHECK(p->head_dim >= 1 && p->head_dim <= 256, "head dim must be in [1, 256]");
  if (auto e = element_type_of(q, "q", &p->dtype); e.failure()) return e;
  FFI_CHECK(k.element_type() == q.element_type(), "k cache must have q's dtype");
  if (auto e = expect_shape(v, "v cache", {kd[0], kd[1], kd[2], kd[3]}, q.element_type()); e.failure())
    return e;
  if (auto e = expect_shape(lengths, "lengths", {p->batch}, ffi::DataType::S32); e.failure()) return e;
  if (is_absent(page_table)) {
    FFI_CHECK(p->num_pages == p->batch,
              "contiguous k cache must have batch " << p->batch << ", got " << p->num_pages);
    p->max_pages = 1;
    p->page_table = nullptr;
  } else {
    auto td = page_table.dimensions();
    FFI_CHECK(td.size() == 2 && td[0] == p->batch,
              "page_table must have shape [B, max_pages] with B=" << p->batch << ", got "
                                                                    << dims_string(td));
    FFI_CHECK(page_table.element_type() == ffi::DataType::S32, "page_table must be int32");
    p->max_pages = td[1];
    p->page_table = static_cast<const int32_t*>(page_table.untyped_data());
  }
  if (auto e = expect_shape(out, "out", {p->batch, p->q_heads, p->head_dim}, q.element_type());
      e.failure())
    return e;
  if (auto e = expect_shape(lse, "lse", {p->batch, p->q_heads}, ffi::DataType::F32); e.failure()) return e;
  p->q = q.untyped_data();
  p->k = k.untyped_data();
  p->v = v.untyped_data();
  p->lengths = static_cast<const int32_t*>(lengths.untyped_data());
  p->out = out.untyped_data();
  p->lse = static_cast<float*>(lse.untyped_data());
  return ffi::Error::Success();
}

}  // namespace fastattn
