// Times cuda::attention_forward or cuda::attention_backward (dispatch.h)
// alone (no JAX), for ncu and quick A/B runs; build it with
// xla_ffi/cuda/dispatch.cc and the four attention_sm*.cu files:
//   cuda_attention_bench [batch seq heads dim causal tile_q fwd|bwd launches data choice]
// Prints the median of `launches` (default 20) and TFLOP/s (causal counts
// half; the backward counts 2.5x the forward's FLOPs, as FlashAttention
// reports it). data "uniform" (default): one array of uniform(-0.5, 0.5)
// values copied into q, k and v; "normal": q, k, v each standard normal, as
// python -m jax_fastattn.bench draws them (the two differ in power drawn,
// hence in clocks under a sustained load).
// The timed launches take the kernels of `choice`, a KernelChoice code
// (default 0, auto). Where the backward ran the wgmma kernels, it also
// compares their dQ, dK and dV with the mma.sync kernels'
// (KernelChoice::kMmaSync) on the same inputs: the largest difference
// relative to the largest value. The forward
// likewise compares its output and lse with the mma.sync forward's.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cuda/attention.h"
#include "cuda/dispatch.h"

using fastattn::cuda::KernelChoice;

// The CUDA error of a dispatch (a refused choice reads as invalid value,
// with its message printed).
cudaError_t launch_status(const fastattn::cuda::DispatchStatus& status) {
  if (!status.refused.empty()) {
    printf("%s\n", status.refused.c_str());
    return cudaErrorInvalidValue;
  }
  return status.launch;
}

// Runs `launch` (and waits for it) on the mma.sync kernels; false, with a
// message, if it failed.
template <typename Launch>
bool run_mma_sync(const char* what, Launch launch) {
  const cudaError_t launched = launch_status(launch(KernelChoice::kMmaSync));
  const cudaError_t finished = cudaDeviceSynchronize();
  if (launched != cudaSuccess || finished != cudaSuccess) {
    printf("%s on mma.sync failed: %s\n", what,
           cudaGetErrorString(launched != cudaSuccess ? launched : finished));
    return false;
  }
  return true;
}

int main(int argc, char** argv) {
  const long batch = argc > 1 ? atol(argv[1]) : 4, seq = argc > 2 ? atol(argv[2]) : 4096;
  const long heads = argc > 3 ? atol(argv[3]) : 32, dim = argc > 4 ? atol(argv[4]) : 128;
  const bool causal = argc > 5 && atoi(argv[5]) != 0;
  const long tile_q = argc > 6 ? atol(argv[6]) : 64;
  const bool backward = argc > 7 && argv[7][0] == 'b';
  const int launches = argc > 8 ? std::max(1, atoi(argv[8])) : 20;
  const bool normal = argc > 9 && std::string(argv[9]) == "normal";
  // The timed call's KernelChoice code (kernel_choice.h; 0 auto; e.g. 1 or
  // 2, wgmma or mma_sync, or 3/4, the one-pass backwards).
  const KernelChoice choice = static_cast<KernelChoice>(argc > 10 ? atoi(argv[10]) : 0);
  const KernelChoice backward_choice = choice;
  const long tile_kv = fastattn::cuda::kForwardTileKv;
  const size_t elements = size_t(batch) * seq * heads * dim;
  std::vector<__nv_bfloat16> host(elements);
  std::mt19937 generator(0);
  std::normal_distribution<float> gaussian;
  auto fill = [&] {
    for (size_t i = 0; i < elements; ++i) {
      host[i] = __float2bfloat16(normal ? gaussian(generator) : float(rand()) / RAND_MAX - 0.5f);
    }
  };
  fill();
  void *q, *k, *v, *out;
  float* lse;
  int8_t* classes;
  const long nq = (seq + tile_q - 1) / tile_q, nk = (seq + tile_kv - 1) / tile_kv;
  std::vector<int8_t> host_classes(nq * nk, fastattn::kFull);
  if (causal) {  // bottom-right = top-left for Sq == Skv
    for (long i = 0; i < nq; ++i)
      for (long j = 0; j < nk; ++j) {
        const long q_lo = i * tile_q, q_hi = std::min(seq, q_lo + tile_q) - 1;
        const long k_lo = j * tile_kv, k_hi = std::min(seq, k_lo + tile_kv) - 1;
        host_classes[i * nk + j] = k_lo > q_hi ? fastattn::kEmpty
                                   : k_hi <= q_lo ? fastattn::kFull
                                                  : fastattn::kPartial;
      }
  }
  for (void** p : {&q, &k, &v, &out}) cudaMalloc(p, elements * 2);
  cudaMalloc(&lse, batch * heads * seq * 4);
  cudaMalloc(&classes, host_classes.size());
  for (void* p : {q, k, v}) {
    cudaMemcpy(p, host.data(), elements * 2, cudaMemcpyHostToDevice);
    if (normal) fill();  // a draw of its own for each of q, k, v
  }
  cudaMemcpy(classes, host_classes.data(), host_classes.size(), cudaMemcpyHostToDevice);

  fastattn::ForwardParams params;
  params.shape = {batch, seq, seq, heads, heads, dim};
  params.dtype = fastattn::ElementType::kBF16;
  params.q = q;
  params.k = k;
  params.v = v;
  params.out = out;
  params.lse = lse;
  params.softmax_scale = 1.0f / sqrtf(float(dim));
  params.mask.tile_class = classes;
  params.mask.tile_q = tile_q;
  params.mask.tile_kv = tile_kv;
  if (causal) params.mask.band_hi = 0;
  if (!fastattn::cuda::forward_supported(params)) {
    printf("unsupported configuration\n");
    return 1;
  }
  int32_t* work_counter = nullptr;  // the wgmma forward's
  cudaMalloc(&work_counter, sizeof(int32_t));
  fastattn::BackwardParams grads;
  float* delta = nullptr;
  float* dq_accum = nullptr;
  int32_t* dq_turns = nullptr;
  if (backward) {
    fastattn::cuda::attention_forward(params, KernelChoice::kAuto, work_counter, nullptr);
    grads.shape = params.shape;
    grads.dtype = params.dtype;
    grads.q = q;
    grads.k = k;
    grads.v = v;
    grads.out = out;
    grads.lse = lse;
    grads.mask = params.mask;
    grads.softmax_scale = params.softmax_scale;
    void *d_out, *d_q, *d_k, *d_v;
    for (void** p : {&d_out, &d_q, &d_k, &d_v}) cudaMalloc(p, elements * 2);
    cudaMemcpy(d_out, host.data(), elements * 2, cudaMemcpyHostToDevice);
    cudaMalloc(&delta, batch * heads * seq * 4);
    const int64_t q_tiles = (seq + 63) / 64;  // the fused wgmma backward's dQ workspace
    cudaMalloc(&dq_accum, batch * heads * q_tiles * 64 * dim * 4);
    cudaMalloc(&dq_turns, batch * heads * q_tiles * 4);
    grads.d_out = d_out;
    grads.d_q = d_q;
    grads.d_k = d_k;
    grads.d_v = d_v;
  }
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<float> ms;
  for (int i = 0; i < launches + 2; ++i) {
    cudaEventRecord(start);
    const cudaError_t e = launch_status(
        backward ? fastattn::cuda::attention_backward(grads, backward_choice, delta, dq_accum,
                                                        dq_turns, nullptr)
                 : fastattn::cuda::attention_forward(params, choice, work_counter, nullptr));
    if (e != cudaSuccess) {
      printf("launch failed: %s\n", cudaGetErrorString(e));
      return 1;
    }
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float elapsed = 0;
    cudaEventElapsedTime(&elapsed, start, stop);
    if (i >= 2) ms.push_back(elapsed);
  }
  std::sort(ms.begin(), ms.end());
  fastattn::cuda::Kernel selected = fastattn::cuda::Kernel::kMmaSync;
  if (backward) fastattn::cuda::select_backward_kernel(grads, backward_choice, &selected);
  if (backward && selected == fastattn::cuda::Kernel::kWgmma) {
    std::vector<std::vector<__nv_bfloat16>> wgmma(3, std::vector<__nv_bfloat16>(elements));
    void* outputs[3] = {grads.d_q, grads.d_k, grads.d_v};
    for (int i = 0; i < 3; ++i)
      cudaMemcpy(wgmma[i].data(), outputs[i], elements * 2, cudaMemcpyDeviceToHost);
    for (void* output : outputs) cudaMemset(output, 0, elements * 2);
    if (!run_mma_sync("backward", [&](KernelChoice choice) {
          return fastattn::cuda::attention_backward(grads, choice, delta, dq_accum, dq_turns,
                                                  nullptr);
        })) {
      return 1;
    }
    std::vector<__nv_bfloat16> mma_sync(elements);
    for (int i = 0; i < 3; ++i) {
      cudaMemcpy(mma_sync.data(), outputs[i], elements * 2, cudaMemcpyDeviceToHost);
      double diff = 0, largest = 0;
      for (size_t j = 0; j < elements; ++j) {
        const double a = __bfloat162float(wgmma[i][j]), b = __bfloat162float(mma_sync[j]);
        diff = std::max(diff, std::abs(a - b));
        largest = std::max(largest, std::abs(b));
      }
      printf("d%c: max |wgmma - mma_sync| %.3g, max |mma_sync| %.3g\n", "qkv"[i], diff, largest);
    }
  }
  if (!backward) {  // the selected forward against the mma.sync forward, same inputs
    std::vector<__nv_bfloat16> selected(elements), mma_sync(elements);
    std::vector<float> selected_lse(batch * heads * seq), mma_sync_lse(batch * heads * seq);
    cudaMemcpy(selected.data(), out, elements * 2, cudaMemcpyDeviceToHost);
    cudaMemcpy(selected_lse.data(), lse, selected_lse.size() * 4, cudaMemcpyDeviceToHost);
    cudaMemset(out, 0, elements * 2);
    if (!run_mma_sync("forward", [&](KernelChoice choice) {
          return fastattn::cuda::attention_forward(params, choice, work_counter, nullptr);
        })) {
      return 1;
    }
    cudaMemcpy(mma_sync.data(), out, elements * 2, cudaMemcpyDeviceToHost);
    cudaMemcpy(mma_sync_lse.data(), lse, mma_sync_lse.size() * 4, cudaMemcpyDeviceToHost);
    double diff = 0, largest = 0, lse_diff = 0;
    for (size_t j = 0; j < elements; ++j) {
      const double a = __bfloat162float(selected[j]), b = __bfloat162float(mma_sync[j]);
      diff = std::max(diff, std::abs(a - b));  // NaN in either shows as nan below
      if (a != a || b != b) diff = NAN;
      largest = std::max(largest, std::abs(b));
    }
    for (size_t j = 0; j < selected_lse.size(); ++j)
      lse_diff = std::max(lse_diff, double(std::abs(selected_lse[j] - mma_sync_lse[j])));
    printf("out: max |selected - mma_sync| %.3g (max |mma_sync| %.3g), lse %.3g\n", diff,
           largest, lse_diff);
  }
  const double flops =
      4.0 * batch * heads * seq * seq * dim * (causal ? 0.5 : 1.0) * (backward ? 2.5 : 1.0);
  printf("%s B%ld S%ld H%ld D%ld causal=%d tile_q=%ld: median %.3f ms, %.1f TFLOP/s\n",
         backward ? "bwd" : "fwd", batch, seq, heads,
         dim, int(causal), tile_q, ms[ms.size() / 2], flops / (ms[ms.size() / 2] * 1e-3) / 1e12);
  return 0;
}
