// The plain C++ CPU kernels (no XLA in the loop) against a naive
// double-precision attention: forward output and lse, and the backward
// gradients against central finite differences of a scalar loss.
// Exit code 0 = pass. Built by Bazel (//:cpu_kernel_test) and by
// tests/test_cpp_kernel.py with the system compiler.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../common/attention_params.h"
#include "../cpu/flash_backward.h"
#include "../cpu/flash_forward.h"

using fastattn::AttentionShape;
using fastattn::ForwardParams;

namespace {

struct Problem {
  AttentionShape shape;
  int64_t band_lo, band_hi;
  std::vector<float> q, k, v;
  std::vector<int32_t> q_ids, kv_ids;
  std::vector<int8_t> tile_class;  // all PARTIAL: the kernel must mask right
  int64_t tile_q = 8, tile_kv = 32;
};

Problem make_problem(int64_t b, int64_t sq, int64_t skv, int64_t hq, int64_t hkv, int64_t d,
                     unsigned seed) {
  Problem p;
  p.shape = {b, sq, skv, hq, hkv, d};
  p.band_lo = -fastattn::kUnboundedBand;
  p.band_hi = skv - sq;  // bottom-right causal
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  for (auto* x : {&p.q, &p.k, &p.v}) {
    const int64_t n = x == &p.q ? b * sq * hq * d : b * skv * hkv * d;
    x->resize(n);
    for (auto& e : *x) e = normal(rng);
  }
  for (int64_t i = 0; i < b * sq; ++i) p.q_ids.push_back(int32_t((i % sq) * 3 / sq) - (i % sq == 0));
  for (int64_t j = 0; j < b * skv; ++j) p.kv_ids.push_back(int32_t((j % skv) * 3 / skv));
  const int64_t nq = p.shape.num_q_tiles(p.tile_q), nk = p.shape.num_kv_tiles(p.tile_kv);
  p.tile_class.assign(nq * nk, fastattn::kPartial);
  return p;
}

fastattn::MaskParams mask_of(const Problem& p) {
  fastattn::MaskParams m;
  m.band_lo = p.band_lo;
  m.band_hi = p.band_hi;
  m.q_segment = p.q_ids.data();
  m.kv_segment = p.kv_ids.data();
  m.tile_class = p.tile_class.data();
  m.tile_q = p.tile_q;
  m.tile_kv = p.tile_kv;
  return m;
}

bool visible(const Problem& p, int64_t b, int64_t i, int64_t j) {
  const int64_t rel = j - i;
  const int32_t qi = p.q_ids[b * p.shape.q_len + i], kj = p.kv_ids[b * p.shape.kv_len + j];
  return rel >= p.band_lo && rel <= p.band_hi && qi >= 0 && qi == kj;
}

// Naive attention in double: out and lse; loss = sum(out * w_out) + sum(lse_finite * w_lse).
void naive(const Problem& p, const std::vector<double>& q, const std::vector<double>& k,
           const std::vector<double>& v, float scale, std::vector<double>* out,
           std::vector<double>* lse) {
  const auto& s = p.shape;
  out->assign(s.batch * s.q_len * s.q_heads * s.head_dim, 0.0);
  lse->assign(s.batch * s.q_heads * s.q_len, -INFINITY);
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t h = 0; h < s.q_heads; ++h)
      for (int64_t i = 0; i < s.q_len; ++i) {
        std::vector<double> logits(s.kv_len, -INFINITY);
        double best = -INFINITY;
        for (int64_t j = 0; j < s.kv_len; ++j) {
          if (!visible(p, b, i, j)) continue;
          double dot = 0;
          for (int64_t d = 0; d < s.head_dim; ++d)
            dot += q[((b * s.q_len + i) * s.q_heads + h) * s.head_dim + d] *
                   k[((b * s.kv_len + j) * s.kv_heads + h / s.group()) * s.head_dim + d];
          logits[j] = dot * scale;
          best = std::max(best, logits[j]);
        }
        if (best == -INFINITY) continue;
        double total = 0;
        for (double& x : logits) total += (x = std::exp(x - best));
        (*lse)[(b * s.q_heads + h) * s.q_len + i] = best + std::log(total);
        for (int64_t j = 0; j < s.kv_len; ++j)
          for (int64_t d = 0; d < s.head_dim; ++d)
            (*out)[((b * s.q_len + i) * s.q_heads + h) * s.head_dim + d] +=
                logits[j] / total * v[((b * s.kv_len + j) * s.kv_heads + h / s.group()) * s.head_dim + d];
      }
}

int failures = 0;

void expect_close(const char* what, double got, double want, double tol) {
  const bool both_inf = std::isinf(got) && std::isinf(want) && (got > 0) == (want > 0);
  if (!both_inf && !(std::fabs(got - want) <= tol)) {
    if (failures < 10) std::printf("FAIL %s: got %.7g want %.7g\n", what, got, want);
    ++failures;
  }
}

std::vector<double> to_double(const std::vector<float>& x) { return {x.begin(), x.end()}; }

}  // namespace

int main() {
  Problem p = make_problem(2, 19, 45, 4, 2, 12, 1);
  const auto& s = p.shape;
  const float scale = 0.35f;

  std::vector<float> out(p.q.size()), lse(s.batch * s.q_heads * s.q_len);
  ForwardParams fwd;
  fwd.shape = s;
  fwd.q = p.q.data();
  fwd.k = p.k.data();
  fwd.v = p.v.data();
  fwd.mask = mask_of(p);
  fwd.softmax_scale = scale;
  fwd.out = out.data();
  fwd.lse = lse.data();
  fastattn::cpu::flash_forward(fwd);

  std::vector<double> ref_out, ref_lse;
  naive(p, to_double(p.q), to_double(p.k), to_double(p.v), scale, &ref_out, &ref_lse);
  for (size_t i = 0; i < out.size(); ++i) expect_close("out", out[i], ref_out[i], 2e-5);
  for (size_t i = 0; i < lse.size(); ++i) expect_close("lse", lse[i], ref_lse[i], 2e-5);

  // Backward: loss = sum(out * w), gradient vs finite differences.
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<float> weights(out.size());
  for (auto& w : weights) w = normal(rng);
  std::vector<float> d_q(p.q.size()), d_k(p.k.size()), d_v(p.v.size());
  fastattn::BackwardParams bwd;
  bwd.shape = s;
  bwd.q = p.q.data();
  bwd.k = p.k.data();
  bwd.v = p.v.data();
  bwd.out = out.data();
  bwd.d_out = weights.data();
  bwd.lse = lse.data();
  bwd.mask = mask_of(p);
  bwd.softmax_scale = scale;
  bwd.d_q = d_q.data();
  bwd.d_k = d_k.data();
  bwd.d_v = d_v.data();
  fastattn::cpu::flash_backward(bwd);

  auto loss = [&](const std::vector<double>& q, const std::vector<double>& k,
                  const std::vector<double>& v) {
    std::vector<double> o, l;
    naive(p, q, k, v, scale, &o, &l);
    double total = 0;
    for (size_t i = 0; i < o.size(); ++i) total += o[i] * weights[i];
    return total;
  };
  const double eps = 1e-5;
  auto check_grad = [&](const char* name, const std::vector<float>& x, const std::vector<float>& grad,
                        int which) {
    for (size_t i = 0; i < x.size(); i += 7) {  // a spread-out sample of entries
      std::vector<double> args[3] = {to_double(p.q), to_double(p.k), to_double(p.v)};
      args[which][i] += eps;
      const double up = loss(args[0], args[1], args[2]);
      args[which][i] -= 2 * eps;
      const double down = loss(args[0], args[1], args[2]);
      expect_close(name, grad[i], (up - down) / (2 * eps), 1e-3);
    }
  };
  check_grad("dq", p.q, d_q, 0);
  check_grad("dk", p.k, d_k, 1);
  check_grad("dv", p.v, d_v, 2);

  std::printf(failures ? "%d FAILURES\n" : "all checks passed\n", failures);
  return failures ? 1 : 0;
}
