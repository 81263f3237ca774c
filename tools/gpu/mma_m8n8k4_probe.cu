#include <cuda_fp16.h>
// Prints where mma.m8n8k4 (.row.col and .row.row, f32 accumulate) puts each
// D element, given the fragment layouts the Volta kernel assumes, so that a
// layout mistake shows up as a table rather than as wrong attention.
// D[m][n] = (m + 1) * 10 + (n + 1) when the assumed A/B layouts are right.
#include <cstdio>

__global__ void probe(float* out, int row_row) {
  const int lane = threadIdx.x, l = lane & 3, h = lane >> 4;
  // A row-major: this thread holds row l + 4h, k = 0..3. A[m][0] = m + 1, A[m][1] = 1.
  const int m = l + 4 * h;
  __half a[4] = {__float2half(m + 1.f), __float2half(1.f), __float2half(0.f), __float2half(0.f)};
  // B[0][n] = 10, B[1][n] = n + 1 (so D = 10 (m+1) + n + 1).
  __half b[4];
  if (!row_row) {  // col-major: this thread holds column l + 4h, k = 0..3
    const int n = l + 4 * h;
    b[0] = __float2half(10.f); b[1] = __float2half(n + 1.f); b[2] = b[3] = __float2half(0.f);
  } else {  // row-major: this thread holds row k = l, columns 4h..4h+3
    for (int i = 0; i < 4; ++i) {
      const int n = 4 * h + i;
      b[i] = __float2half(l == 0 ? 10.f : l == 1 ? n + 1.f : 0.f);
    }
  }
  const unsigned* ar = reinterpret_cast<const unsigned*>(a);
  const unsigned* br = reinterpret_cast<const unsigned*>(b);
  float d[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (row_row) {
    asm volatile("mma.sync.aligned.m8n8k4.row.row.f32.f16.f16.f32 {%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9}, {%10,%11}, {%0,%1,%2,%3,%4,%5,%6,%7};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
                 : "r"(ar[0]), "r"(ar[1]), "r"(br[0]), "r"(br[1]));
  } else {
    asm volatile("mma.sync.aligned.m8n8k4.row.col.f32.f16.f16.f32 {%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9}, {%10,%11}, {%0,%1,%2,%3,%4,%5,%6,%7};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
                 : "r"(ar[0]), "r"(ar[1]), "r"(br[0]), "r"(br[1]));
  }
  for (int i = 0; i < 8; ++i) out[lane * 8 + i] = d[i];
}

int main() {
  float* device;
  float host[256];
  cudaMalloc(&device, sizeof(host));
  int bad = 0;
  for (int row_row = 0; row_row < 2; ++row_row) {
    probe<<<1, 32>>>(device, row_row);
    cudaMemcpy(host, device, sizeof(host), cudaMemcpyDeviceToHost);
    for (int lane = 0; lane < 32; ++lane) {
      const int l = lane & 3, h = lane >> 4;
      for (int i = 0; i < 8; ++i) {
        const int m = (l & 1) + (i & 2) + 4 * h, n = (i & 4) + (l & 2) + (i & 1);
        if (host[lane * 8 + i] != 10.f * (m + 1) + n + 1) ++bad;
      }
      if (lane < 4 || (lane >= 16 && lane < 20)) {
        printf("%s lane %2d:", row_row ? "row.row" : "row.col", lane);
        for (int i = 0; i < 8; ++i) printf(" %4.0f", host[lane * 8 + i]);
        printf("\n");
      }
    }
  }
  printf("mma.m8n8k4 layout probe: %d mismatches with the assumed C layout\n", bad);
  return bad != 0;
}
