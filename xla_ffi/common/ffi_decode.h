// Turns the FFI buffers of an attention custom call into the plain structs
// of attention_params.h, checking every shape on the way. Shared by the CPU
// and CUDA handlers. Optional inputs (bias, segment ids, dense mask) arrive
// as empty rank-1 arrays when absent.
#pragma once

#include <cstdint>
#include <utility>

#include "attention_params.h"
#include "decode_params.h"
#include "xla/ffi/api/ffi.h"

namespace fastattn {

namespace ffi = ::xla::ffi;

// q [B, Sq, Hq, D], k and v [B, Skv, Hkv, D], one float dtype.
ffi::Error decode_shape(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                        const ffi::AnyBuffer& v, AttentionShape* shape, ElementType* dtype);

ffi::Error decode_bias(const ffi::AnyBuffer& bias, const AttentionShape& shape,
                       BiasParams* params);

ffi::Error decode_mask(const ffi::AnyBuffer& q_segment, const ffi::AnyBuffer& kv_segment,
                       const ffi::AnyBuffer& dense, const ffi::AnyBuffer& tile_class,
                       const AttentionShape& shape, int64_t band_lo, int64_t band_hi,
                       int64_t tile_q, int64_t tile_kv, MaskParams* mask);

// All arguments of a forward custom call (q, k, v, bias, segment ids, dense
// mask, tile classes; out, lse) into `params`, every shape checked.
ffi::Error decode_forward_args(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                               const ffi::AnyBuffer& v, const ffi::AnyBuffer& bias,
                               const ffi::AnyBuffer& q_segment, const ffi::AnyBuffer& kv_segment,
                               const ffi::AnyBuffer& dense, const ffi::AnyBuffer& tile_class,
                               ffi::AnyBuffer& out, ffi::AnyBuffer& lse, float softmax_scale,
                               int64_t band_lo, int64_t band_hi, int64_t tile_q, int64_t tile_kv,
                               ForwardParams* params);

// The forward custom call's buffers and attributes, appended to a binding
// (after any context): one signature for the CPU, CUDA and Volta handlers.
template <typename Binding>
auto bind_forward_args(Binding binding) {
  return std::move(binding).template Arg<ffi::AnyBuffer>()  // q
      .template Arg<ffi::AnyBuffer>()            // k
      .template Arg<ffi::AnyBuffer>()            // v
      .template Arg<ffi::AnyBuffer>()            // bias
      .template Arg<ffi::AnyBuffer>()            // q_segment_ids
      .template Arg<ffi::AnyBuffer>()            // kv_segment_ids
      .template Arg<ffi::AnyBuffer>()            // dense
      .template Arg<ffi::AnyBuffer>()            // tile_class
      .template Ret<ffi::AnyBuffer>()            // out
      .template Ret<ffi::AnyBuffer>()            // lse
      .template Attr<float>("softmax_scale")
      .template Attr<int64_t>("band_lo")
      .template Attr<int64_t>("band_hi")
      .template Attr<int64_t>("tile_q")
      .template Attr<int64_t>("tile_kv");
}

// All arguments of a backward custom call (q, k, v, out, lse, d_out, d_lse,
// bias, segment ids, dense mask, tile classes; d_q, d_k, d_v, d_bias) into
// `params`, every shape checked. d_lse and d_bias may be absent.
ffi::Error decode_backward_args(
    const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
    const ffi::AnyBuffer& out, const ffi::AnyBuffer& lse, const ffi::AnyBuffer& d_out,
    const ffi::AnyBuffer& d_lse, const ffi::AnyBuffer& bias, const ffi::AnyBuffer& q_segment,
    const ffi::AnyBuffer& kv_segment, const ffi::AnyBuffer& dense,
    const ffi::AnyBuffer& tile_class, ffi::AnyBuffer& d_q, ffi::AnyBuffer& d_k,
    ffi::AnyBuffer& d_v, ffi::AnyBuffer& d_bias, float softmax_scale, int64_t band_lo,
    int64_t band_hi, int64_t tile_q, int64_t tile_kv, BackwardParams* params);

// The backward custom call's buffers and attributes, appended to a binding
// (after any context): one signature for the CPU and CUDA handlers.
template <typename Binding>
auto bind_backward_args(Binding binding) {
  return std::move(binding).template Arg<ffi::AnyBuffer>()  // q
      .template Arg<ffi::AnyBuffer>()            // k
      .template Arg<ffi::AnyBuffer>()            // v
      .template Arg<ffi::AnyBuffer>()            // out
      .template Arg<ffi::AnyBuffer>()            // lse
      .template Arg<ffi::AnyBuffer>()            // d_out
      .template Arg<ffi::AnyBuffer>()            // d_lse
      .template Arg<ffi::AnyBuffer>()            // bias
      .template Arg<ffi::AnyBuffer>()            // q_segment_ids
      .template Arg<ffi::AnyBuffer>()            // kv_segment_ids
      .template Arg<ffi::AnyBuffer>()            // dense
      .template Arg<ffi::AnyBuffer>()            // tile_class
      .template Ret<ffi::AnyBuffer>()            // d_q
      .template Ret<ffi::AnyBuffer>()            // d_k
      .template Ret<ffi::AnyBuffer>()            // d_v
      .template Ret<ffi::AnyBuffer>()            // d_bias
      .template Attr<float>("softmax_scale")
      .template Attr<int64_t>("band_lo")
      .template Attr<int64_t>("band_hi")
      .template Attr<int64_t>("tile_q")
      .template Attr<int64_t>("tile_kv");
}

// q [B, Hq, D]; k, v [B, Smax, Hkv, D] (page_table absent) or
// [num_pages, page_size, Hkv, D] with page_table int32 [B, max_pages];
// lengths int32 [B]; out [B, Hq, D]; lse float32 [B, Hq].
ffi::Error decode_decode_args(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                              const ffi::AnyBuffer& v, const ffi::AnyBuffer& lengths,
                              const ffi::AnyBuffer& page_table, const ffi::AnyBuffer& out,
                              const ffi::AnyBuffer& lse, DecodeParams* params);

// The kernels' ElementType of a float32/bfloat16/float16 buffer.
ffi::Error element_type_of(const ffi::AnyBuffer& buffer, const char* name, ElementType* type);

// Checks that `buffer` has exactly `dims` and the given dtype.
ffi::Error expect_shape(const ffi::AnyBuffer& buffer, const char* name,
                        std::initializer_list<int64_t> dims, ffi::DataType dtype);

inline bool is_absent(const ffi::AnyBuffer& buffer) {
  return buffer.dimensions().size() == 1 && buffer.dimensions()[0] == 0;
}

}  // namespace fastattn
