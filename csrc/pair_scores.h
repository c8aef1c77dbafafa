// pair_scores: the edge-pair (quadratic) scores of align in one pass, with the Gumbel noise
// generated in the kernel. What the CPU and CUDA kernels share; the math is in
// exgramed_kernels/reference/pair_scores.py.
//
//   Q[p, e, f] = alpha * w1[p, e] * w2[p, f] * (C_ia - C_ib - C_ja + C_jb) + beta + noise_scale * n[p, e, f]
//
// e = i*k + s, j = nbr1[p, i, s]; f = a*k + t, b = nbr2[p, a, t]; C = C[p] (N x N). n is the given
// noise tensor, or (noise_seed given) a standard Gumbel sample from a counter-based generator keyed
// by (noise_seed[p], e, f): -log(-log(u)), u = (23 random bits, then a 1) / 2^24, in float32 on every
// backend. The key travels with the problem: a problem's noise does not depend on its row in the batch.
#pragma once
#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "checks.h"
#include "qap.h"  // splitmix64

namespace exgramed {

// 32-bit integer hash (lowbias32, Wellons): vectorisable on the CPU (32-bit multiplies).
C10_HOST_DEVICE inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The two 32-bit keys of row e of a problem's noise (seed: the problem's noise_seed).
C10_HOST_DEVICE inline void noise_row_keys(int64_t seed, int64_t row, uint32_t& lo, uint32_t& hi) {
  uint64_t s = static_cast<uint64_t>(seed);
  s = splitmix64(s) ^ (static_cast<uint64_t>(row) * 0xD1B54A32D192ED03ull);
  const uint64_t z = splitmix64(s);
  lo = static_cast<uint32_t>(z);
  hi = static_cast<uint32_t>(z >> 32);
}

// Reinterpret the bits of a 32-bit value as the other type (float <-> int32), on every backend.
template <typename To, typename From>
C10_HOST_DEVICE inline To bit_cast32(From x) {
  static_assert(sizeof(To) == 4 && sizeof(From) == 4, "bit_cast32: 32-bit types only");
  To out;
  memcpy(&out, &x, sizeof(out));
  return out;
}

// Natural log of a positive normal float: exponent + an odd series in t = (m - 1) / (m + 1),
// m in [sqrt(1/2), sqrt(2)) (|t| <= 0.172, truncation error < 4e-10). Branch-free, so it
// vectorises; the same code runs on every backend.
C10_HOST_DEVICE inline float log_positive(float x) {
  int32_t bits = bit_cast32<int32_t>(x);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  bits = (bits & 0x007fffff) | 0x3f800000;
  float m = bit_cast32<float>(bits);
  const bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  const float t = (m - 1.0f) / (m + 1.0f), t2 = t * t;
  const float series = t * (2.0f + t2 * (0.666666667f + t2 * (0.4f + t2 * (0.285714286f + t2 * 0.222222222f))));
  return series + static_cast<float>(e) * 0.693147181f;
}

// The standard Gumbel sample of column f of a row with keys (lo, hi).
C10_HOST_DEVICE inline float gumbel_at(uint32_t f, uint32_t lo, uint32_t hi) {
  const uint32_t x = hash32(hash32(f ^ lo) ^ hi);
  // An odd multiple of 2^-24 (exact in float32): u in [2^-24, 1 - 2^-24], never 0 or 1.
  const float u = static_cast<float>((x >> 8) | 1u) * (1.0f / 16777216.0f);
  return -log_positive(-log_positive(u));
}

struct PairScoresArgs {
  int64_t P = 0, N = 0, k = 0, Nk = 0;
  bool has_noise = false, has_seed = false;
  at::Tensor seeds;  // noise_seed as a contiguous int64 [P] tensor on C's device
};

// Checks; returns the sizes. noise_seed: int64 [P] on C's device, one key per problem. check_values=false
// skips the NaN/Inf checks of C, w1, w2 and noise (the backward's: the forward checked them).
inline PairScoresArgs check_pair_scores_args(const at::Tensor& C, const at::Tensor& w1, const at::Tensor& w2,
                                             const at::Tensor& nbr1, const at::Tensor& nbr2,
                                             const c10::optional<at::Tensor>& noise,
                                             const c10::optional<at::Tensor>& noise_seed, const char* op,
                                             bool check_values = true) {
  PairScoresArgs a;
  TORCH_CHECK(C.dim() == 3 && C.size(1) == C.size(2), op, ": C must have shape [P, N, N], got ", C.sizes());
  check_float(C, (std::string(op) + ": C").c_str());
  a.P = C.size(0);
  a.N = C.size(1);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>(nbr1, "nbr1"), {nbr2, "nbr2"}}) {
    TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 3 && t.size(0) == a.P && t.size(1) == a.N, op, ": ", name,
                " must be int64 [P, N, k] = [", a.P, ", ", a.N, ", k], got ", t.scalar_type(), " ", t.sizes());
    check_same_device(t, name, C, "C");
    if (t.numel() > 0) {
      TORCH_CHECK(t.min().item<int64_t>() >= 0 && t.max().item<int64_t>() < a.N, op, ": ", name,
                  " entries must lie in [0, ", a.N, ")");
    }
  }
  TORCH_CHECK(nbr1.size(2) == nbr2.size(2), op, ": nbr1 and nbr2 must have the same k, got ", nbr1.sizes(), " and ",
              nbr2.sizes());
  a.k = nbr1.size(2);
  a.Nk = a.N * a.k;
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>(w1, "w1"), {w2, "w2"}}) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == a.P && t.size(1) == a.Nk, op, ": ", name, " must have shape [P, N*k] = [",
                a.P, ", ", a.Nk, "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == C.scalar_type(), op, ": ", name, " must have C's dtype ", C.scalar_type(), ", got ",
                t.scalar_type());
    check_same_device(t, name, C, "C");
  }
  TORCH_CHECK(!(noise.has_value() && noise_seed.has_value()), op, ": give either noise or noise_seed, not both");
  if (noise.has_value()) {
    const at::Tensor& n = *noise;
    TORCH_CHECK(n.dim() == 3 && n.size(0) == a.P && n.size(1) == a.Nk && n.size(2) == a.Nk, op,
                ": noise must have shape [P, N*k, N*k] = [", a.P, ", ", a.Nk, ", ", a.Nk, "], got ", n.sizes());
    check_float(n, (std::string(op) + ": noise").c_str());
    check_same_device(n, "noise", C, "C");
    a.has_noise = true;
  }
  if (noise_seed.has_value()) {
    const at::Tensor& s = *noise_seed;
    TORCH_CHECK(s.scalar_type() == at::kLong && s.dim() == 1 && s.size(0) == a.P, op,
                ": noise_seed must be an int64 tensor of shape [P] = [", a.P, "] (one seed per problem), got ",
                s.scalar_type(), " ", s.sizes());
    check_same_device(s, "noise_seed", C, "C");
    a.has_seed = true;
    a.seeds = s.contiguous();
  }
  TORCH_CHECK(a.Nk < (int64_t(1) << 31), op, ": N*k must be < 2^31, got ", a.Nk);
  if (check_values) {
    check_finite(op, {{"C", C}, {"w1", w1}, {"w2", w2}, {"noise", noise.has_value() ? *noise : at::Tensor()}});
  }
  return a;
}

inline PairScoresArgs check_pair_scores_backward_args(const at::Tensor& grad, const at::Tensor& C, const at::Tensor& w1,
                                                      const at::Tensor& w2, const at::Tensor& nbr1,
                                                      const at::Tensor& nbr2) {
  const PairScoresArgs a = check_pair_scores_args(C, w1, w2, nbr1, nbr2, c10::nullopt, c10::nullopt,
                                                  "pair_scores_backward", /*check_values=*/false);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == a.P && grad.size(1) == a.Nk && grad.size(2) == a.Nk,
              "pair_scores_backward: grad must have shape [P, N*k, N*k] = [", a.P, ", ", a.Nk, ", ", a.Nk, "], got ",
              grad.sizes());
  check_same_device(grad, "grad", C, "C");
  return a;
}

// The CPU backward's step for one entry gv of the incoming gradient at the edge pair e = (i, j),
// f = (a, b) of a problem (C its N x N cross Gram, gC its float64 grad_C, gw2f its grad_w2[f]): adds
// alpha gv we wf (+ - - +) to grad_C at (i, a), (i, b), (j, a), (j, b) and alpha gv we d to grad_w2[f],
// d = (C_ia - C_ib) - (C_ja - C_jb); returns gv wf d, grad_w1[e]'s share before the alpha (the dense and the
// sparse kernels sum it differently).
template <typename scalar_t>
inline double pair_scores_grad_entry(const scalar_t* C, int64_t N, int64_t i, int64_t j, int64_t a, int64_t b,
                                     double gv, double we, double wf, double alpha, double* gC, double& gw2f) {
  const double d = static_cast<double>((C[i * N + a] - C[i * N + b]) - (C[j * N + a] - C[j * N + b]));
  gw2f += alpha * gv * we * d;
  const double gc = alpha * gv * we * wf;
  gC[i * N + a] += gc;
  gC[i * N + b] -= gc;
  gC[j * N + a] -= gc;
  gC[j * N + b] += gc;
  return gv * wf * d;
}

// The backward on any device with ATen ops (the CUDA kernel uses it; the CPU has a fused one):
// inner = M1 C M2^T through gathers, grad_C = M1^T (alpha grad w1 w2) M2 through batched GEMMs
// with the signed incidence matrices (deterministic, no atomics). In C's dtype: the caller passes
// half and bfloat16 in float32.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_scores_backward_aten(
    const at::Tensor& grad, const at::Tensor& C, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& nbr1,
    const at::Tensor& nbr2, double alpha) {
  const int64_t P = C.size(0), N = C.size(1), k = nbr1.size(2), Nk = N * k;
  auto incidence = [&](const at::Tensor& nbr) {
    const at::Tensor heads = at::arange(N, nbr.options()).repeat_interleave(k).view({1, Nk, 1}).expand({P, Nk, 1});
    at::Tensor M = at::zeros({P, Nk, N}, C.options()).scatter_(2, heads, 1.0);
    return M.scatter_add_(2, nbr.reshape({P, Nk, 1}), at::full({P, Nk, 1}, -1.0, C.options()));
  };
  const at::Tensor M1 = incidence(nbr1), M2 = incidence(nbr2);
  const at::Tensor g = grad.to(C.scalar_type());
  const at::Tensor inner = at::bmm(at::bmm(M1, C), M2.transpose(1, 2));  // [P, Nk, Nk]
  const at::Tensor gi = g * alpha;
  const at::Tensor grad_C =
      at::bmm(at::bmm(M1.transpose(1, 2), gi * w1.unsqueeze(2) * w2.unsqueeze(1)), M2);  // [P, N, N]
  const at::Tensor gin = gi * inner;
  const at::Tensor grad_w1 = (gin * w2.unsqueeze(1)).sum(2);
  const at::Tensor grad_w2 = (gin * w1.unsqueeze(2)).sum(1);
  return {grad_C, grad_w1, grad_w2};
}

}  // namespace exgramed
