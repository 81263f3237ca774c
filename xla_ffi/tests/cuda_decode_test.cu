// The CUDA decode kernels (no XLA) against the CPU decode kernel, on ragged
// lengths (0, 1, full), GQA/MQA/MHA, contiguous and paged caches, with NaN
// garbage past every length. Exit code 0 = pass. Built and run on a GPU
// machine (tools/gpu/run_on_device.sh), also under compute-sanitizer.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../common/decode_params.h"
#include "../cpu/decode.h"
#include "../cuda/decode.h"

using fastattn::DecodeParams;
using fastattn::ElementType;
using fastattn::bf16_t;

#define CHECK_CUDA(call)                                                        \
  do {                                                                          \
    cudaError_t status = (call);                                                \
    if (status != cudaSuccess) {                                                \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(status), __FILE__, __LINE__); \
      std::exit(2);                                                             \
    }                                                                           \
  } while (0)

namespace {

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* device = nullptr;
  CHECK_CUDA(cudaMalloc(&device, host.size() * sizeof(T) + 1));
  CHECK_CUDA(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return device;
}

// One call of the CUDA-core kernel (mma false) or the tensor-core one
// against the CPU kernel's result.
int run_case(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t head_dim, int64_t s_max,
             int64_t page_size, unsigned seed, bool mma = false) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  const bool paged = page_size > 0;
  const int64_t pages_per_row = paged ? (s_max + page_size - 1) / page_size : 1;
  const int64_t rows_per_page = paged ? page_size : s_max;
  const int64_t num_pages = paged ? batch * pages_per_row + 2 : batch;
  std::vector<int32_t> lengths(batch), table;
  for (int64_t b = 0; b < batch; ++b) lengths[b] = int32_t(b == 0 ? 0 : b == 1 ? 1 : b == 2 ? s_max : rng() % s_max);
  if (paged) {  // a shuffled pool: row b's page i is pool page perm[b * pages + i]
    std::vector<int32_t> perm(num_pages);
    for (int64_t i = 0; i < num_pages; ++i) perm[i] = int32_t(i);
    std::shuffle(perm.begin(), perm.end(), rng);
    table.assign(perm.begin(), perm.begin() + batch * pages_per_row);
  }
  const int64_t cache_elems = num_pages * rows_per_page * kv_heads * head_dim;
  std::vector<bf16_t> q(batch * q_heads * head_dim), k(cache_elems), v(cache_elems);
  auto bf16 = [](float x) { bf16_t r; fastattn::from_float(x, &r); return r; };
  for (auto& x : q) x = bf16(normal(rng));
  // Everything NaN first, then the valid prefix of every row gets data.
  for (auto& x : k) x = bf16(NAN);
  for (auto& x : v) x = bf16(NAN);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < lengths[b]; ++j) {
      const int64_t page = paged ? table[b * pages_per_row + j / page_size] : b;
      const int64_t row = page * rows_per_page + j % rows_per_page;
      for (int64_t e = 0; e < kv_heads * head_dim; ++e) {
        k[row * kv_heads * head_dim + e] = bf16(normal(rng));
        v[row * kv_heads * head_dim + e] = bf16(normal(rng));
      }
    }
  }

  DecodeParams p;
  p.batch = batch;
  p.q_heads = q_heads;
  p.kv_heads = kv_heads;
  p.head_dim = head_dim;
  p.page_size = rows_per_page;
  p.max_pages = pages_per_row;
  p.num_pages = num_pages;
  p.dtype = ElementType::kBF16;
  p.softmax_scale = 1.f / std::sqrt(float(head_dim));
  std::vector<bf16_t> expected(q.size()), actual(q.size());
  std::vector<float> expected_lse(batch * q_heads), actual_lse(batch * q_heads);
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.lengths = lengths.data();
  p.page_table = paged ? table.data() : nullptr;
  p.out = expected.data();
  p.lse = expected_lse.data();
  fastattn::cpu::decode_attention(p);

  const int64_t splits = 5;
  bf16_t* d_q = to_device(q);
  bf16_t* d_k = to_device(k);
  bf16_t* d_v = to_device(v);
  int32_t* d_lengths = to_device(lengths);
  int32_t* d_table = paged ? to_device(table) : nullptr;
  bf16_t* d_out = to_device(actual);
  float* d_lse = to_device(actual_lse);
  float* workspace = nullptr;
  CHECK_CUDA(cudaMalloc(&workspace, fastattn::cuda::decode_workspace_floats(p, splits) * sizeof(float)));
  p.q = d_q;
  p.k = d_k;
  p.v = d_v;
  p.lengths = d_lengths;
  p.page_table = d_table;
  p.out = d_out;
  p.lse = d_lse;
  if (mma) {
    if (!fastattn::cuda::decode_mma_supported(p)) {
      std::printf("FAIL: the tensor-core kernel does not take this case\n");
      return 1;
    }
    CHECK_CUDA(fastattn::cuda::decode_attention_mma(p, splits, workspace, nullptr));
  } else {
    CHECK_CUDA(fastattn::cuda::decode_attention(p, splits, workspace, nullptr));
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaMemcpy(actual.data(), d_out, actual.size() * sizeof(bf16_t), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(actual_lse.data(), d_lse, actual_lse.size() * sizeof(float), cudaMemcpyDeviceToHost));
  for (void* ptr : {(void*)d_q, (void*)d_k, (void*)d_v, (void*)d_lengths, (void*)d_table, (void*)d_out,
                    (void*)d_lse, (void*)workspace}) {
    if (ptr) CHECK_CUDA(cudaFree(ptr));
  }

  int failures = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    const float a = fastattn::to_float(actual[i]), e = fastattn::to_float(expected[i]);
    if (!(std::fabs(a - e) <= 2e-2f * (1.f + std::fabs(e)))) {
      if (failures++ < 5) std::printf("  mismatch at %zu: %g vs %g\n", i, a, e);
    }
  }
  for (size_t i = 0; i < actual_lse.size(); ++i) {
    const float a = actual_lse[i], e = expected_lse[i];
    const bool both_empty = std::isinf(a) && a < 0 && std::isinf(e) && e < 0;
    if (!both_empty && !(std::fabs(a - e) <= 1e-3f * (1.f + std::fabs(e)))) {
      if (failures++ < 5) std::printf("  lse mismatch at %zu: %g vs %g\n", i, a, e);
    }
  }
  std::printf("%s %s B=%ld Hq=%ld Hkv=%ld D=%ld S=%ld page=%ld: %d mismatches\n", failures ? "FAIL" : "ok",
              mma ? "mma_sync" : "simt", long(batch), long(q_heads), long(kv_heads), long(head_dim),
              long(s_max), long(page_size), failures);
  return failures;
}

}  // namespace

int main() {
  int failures = 0;
  failures += run_case(4, 32, 8, 128, 700, 0, 1);   // GQA 32/8, contiguous
  failures += run_case(4, 32, 8, 128, 700, 16, 2);  // paged, 16-row pages
  failures += run_case(3, 8, 1, 64, 300, 256, 3);   // MQA, 256-row pages
  failures += run_case(3, 4, 4, 256, 129, 0, 4);    // MHA, D = 256
  failures += run_case(4, 12, 4, 80, 200, 0, 5);    // D = 80 (padded lanes), group 3
  failures += run_case(4, 32, 8, 128, 700, 0, 6, true);   // tensor cores: GQA 32/8
  failures += run_case(3, 16, 1, 64, 300, 0, 7, true);    // group 16, D = 64
  failures += run_case(4, 12, 4, 128, 1000, 0, 8, true);  // group 3, a partial last tile
  failures += run_case(4, 32, 8, 128, 700, 24, 9, true);  // paged, 24-row pages
  std::printf(failures ? "FAILED\n" : "all checks passed\n");
  return failures ? 1 : 0;
}
