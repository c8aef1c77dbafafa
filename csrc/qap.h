// qap_solve / qap_gradient: what the CPU and CUDA kernels share (argument checks, the
// implicit-Q expansion, constants). The math is in exgramed_kernels/reference/qap.py.
//
// Quadratic term, edge e = i*k + s = (i, nbr1[i, s]), f = a*k + t = (a, nbr2[a, t]):
//   q(X) = sum_{e,f} Q[e,f] X[s1(e), s2(f)] X[t1(e), t2(f)]
//   dq/dX[x,y] = sum_{s1(e)=x, s2(f)=y} Q[e,f] X[t1(e),t2(f)] + sum_{t1(e)=x, t2(f)=y} Q[e,f] X[s1(e),s2(f)]
// Implicit Q (features): Q[e,f] = w1_e w2_f (C_ia - C_ib - C_ja + C_jb), C = H1 H2^T, w = 1/|H_i - H_j|
// (0 for a zero-length edge); expanded once per call into the dense [G, N*k, N*k] table by the
// pair_scores op (never the N^2 x N^2 Lawler matrix).
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <limits>
#include <string_view>

#include "checks.h"

namespace exgramed {

constexpr int64_t kSinkhornInner = 20;       // Sinkhorn sweeps per temperature
constexpr double kSinkhornTRatio = 1e-3;     // final / initial annealing temperature
constexpr int64_t kPolishMaxPasses = 100;    // 2-opt sweeps at most
constexpr int64_t kMaxRestarts = 1 << 16;    // starts per problem at most (each holds O(N) to O(N^2) state)

inline int64_t default_restarts(int64_t N) {
  if (N <= 8) return 32;
  if (N <= 16) return 16;
  if (N <= 32) return 8;
  if (N <= 64) return 4;
  return 2;
}

enum class QapMethod { FW, Sinkhorn };

// Counter-based random numbers for the random starts: the same permutations on every backend
// and thread count.
C10_HOST_DEVICE inline uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Fisher-Yates permutation of 0..N-1 for start r. Keyed by (seed, r) only: a problem's starts do not
// depend on its position in the batch.
C10_HOST_DEVICE inline void random_start_perm(int64_t seed, int64_t r, int64_t N, int64_t* perm) {
  uint64_t s = static_cast<uint64_t>(seed);
  s = splitmix64(s) ^ (static_cast<uint64_t>(r) * 0x8CB92BA72F3D8DD7ull);
  for (int64_t i = 0; i < N; ++i) perm[i] = i;
  for (int64_t i = N - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(splitmix64(s) % static_cast<uint64_t>(i + 1));
    const int64_t tmp = perm[i];
    perm[i] = perm[j];
    perm[j] = tmp;
  }
}

inline void check_nbr(const at::Tensor& nbr, const char* name, int64_t G, int64_t N, const at::Tensor& U,
                      bool check_values) {
  TORCH_CHECK(nbr.scalar_type() == at::kLong, "qap_solve: ", name, " must be an int64 tensor, got ",
              nbr.scalar_type());
  TORCH_CHECK(nbr.dim() == 3 && nbr.size(0) == G && nbr.size(1) == N, "qap_solve: ", name,
              " must have shape [G, N, k] = [", G, ", ", N, ", k], got ", nbr.sizes());
  TORCH_CHECK(nbr.device() == U.device(), "qap_solve: ", name, " and U must be on the same device, got ",
              nbr.device(), " and ", U.device());
  if (check_values && nbr.numel() > 0) {
    TORCH_CHECK(nbr.min().item<int64_t>() >= 0 && nbr.max().item<int64_t>() < N, "qap_solve: ", name,
                " entries must lie in [0, ", N, ")");
  }
}

// init: optional [G, N] int64 start per problem, a (partial) permutation: distinct columns in
// [0, N), -1 (unmatched) allowed with partial only.
inline void check_init(const c10::optional<at::Tensor>& init, const at::Tensor& U, bool partial) {
  if (!init.has_value()) return;
  const at::Tensor& t = *init;
  const int64_t G = U.size(0), N = U.size(1);
  TORCH_CHECK(t.scalar_type() == at::kLong, "qap_solve: init must be an int64 tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == G && t.size(1) == N, "qap_solve: init must have shape [G, N] = [", G,
              ", ", N, "], got ", t.sizes());
  TORCH_CHECK(t.device() == U.device(), "qap_solve: init and U must be on the same device, got ", t.device(),
              " and ", U.device());
  if (t.numel() == 0) return;
  TORCH_CHECK(t.min().item<int64_t>() >= (partial ? -1 : 0) && t.max().item<int64_t>() < N,
              "qap_solve: init entries must lie in [0, ", N, ")", partial ? " or be -1 (unmatched)" : "",
              partial ? "" : " (-1 = unmatched needs partial=True)");
  const at::Tensor counts = at::zeros({G, N + 1}, t.options()).scatter_add_(1, t + 1, at::ones_like(t));
  TORCH_CHECK(counts.narrow(1, 1, N).max().item<int64_t>() <= 1,
              "qap_solve: every row of init must be a (partial) permutation, but a column appears twice");
}

// Validates everything; returns the method.
inline QapMethod check_qap_args(const at::Tensor& U, const at::Tensor& nbr1, const at::Tensor& nbr2,
                                const c10::optional<at::Tensor>& Q, const c10::optional<at::Tensor>& H1,
                                const c10::optional<at::Tensor>& H2, c10::string_view method, int64_t max_iter,
                                double tol, int64_t restarts, c10::string_view estimator, double lambda,
                                bool check_q = true) {
  TORCH_CHECK(U.dim() == 3 && U.size(1) == U.size(2), "qap_solve: U must have shape [G, N, N], got ", U.sizes());
  check_float(U, "qap_solve: U");
  const int64_t G = U.size(0), N = U.size(1);
  check_nbr(nbr1, "nbr1", G, N, U, true);
  check_nbr(nbr2, "nbr2", G, N, U, true);
  TORCH_CHECK(nbr1.sizes() == nbr2.sizes(), "qap_solve: nbr1 and nbr2 must have the same shape [G, N, k], got ",
              nbr1.sizes(), " and ", nbr2.sizes());
  const int64_t k = nbr1.size(2);
  TORCH_CHECK(!(Q.has_value() && (H1.has_value() || H2.has_value())), "qap_solve: give either Q or (H1, H2), not both");
  TORCH_CHECK(H1.has_value() == H2.has_value(), "qap_solve: H1 and H2 must be given together");
  if (Q.has_value()) {
    const at::Tensor& q = *Q;
    TORCH_CHECK(q.dim() == 3 && q.size(0) == G && q.size(1) == N * k && q.size(2) == N * k,
                "qap_solve: Q must have shape [G, N*k, N*k] = [", G, ", ", N * k, ", ", N * k, "], got ", q.sizes());
    check_float(q, "qap_solve: Q");
    check_same_device(q, "qap_solve: Q", U, "U");
    if (check_q) check_finite(q, "qap_solve: Q");
  }
  if (H1.has_value()) {
    for (const auto& [h, name] : {std::pair<const at::Tensor&, const char*>(*H1, "H1"), {*H2, "H2"}}) {
      TORCH_CHECK(h.dim() == 3 && h.size(0) == G && h.size(1) == N, "qap_solve: ", name,
                  " must have shape [G, N, h] = [", G, ", ", N, ", h], got ", h.sizes());
      TORCH_CHECK(at::isFloatingType(h.scalar_type()), "qap_solve: ", name, " must be a floating-point tensor, got ",
                  h.scalar_type());
      TORCH_CHECK(h.device() == U.device(), "qap_solve: ", name, " and U must be on the same device, got ",
                  h.device(), " and ", U.device());
    }
    TORCH_CHECK(H1->size(2) == H2->size(2), "qap_solve: H1 and H2 must have the same feature size h, got ",
                H1->sizes(), " and ", H2->sizes());
    // The implicit Q squares the features' norms (the cross Gram, the squared edge lengths) in float32, or
    // float64 when either H is: every entry finite and below sqrt(max) / (2 sqrt(h)) keeps those finite.
    const bool dbl = compute_dtype(at::promote_types(H1->scalar_type(), H2->scalar_type())) == at::kDouble;
    const double limit = std::sqrt(dbl ? std::numeric_limits<double>::max() : std::numeric_limits<float>::max()) /
                         (2.0 * std::sqrt(static_cast<double>(std::max<int64_t>(1, H1->size(2)))));
    for (const auto& [h, name] : {std::pair<const at::Tensor&, const char*>(*H1, "H1"), {*H2, "H2"}}) {
      if (h.numel() == 0) continue;
      const double largest = at::amax(h.abs()).item<double>();  // NaN or Inf for a NaN or Inf entry
      TORCH_CHECK(std::isfinite(largest), "qap_solve: ", name, " contains NaN or Inf");
      TORCH_CHECK(largest <= limit, "qap_solve: ", name, " has entries up to ", largest, "; beyond ", limit,
                  " the implicit Q's squared norms overflow ", dbl ? "float64" : "float32", ": scale ", name,
                  " down (Q does not depend on the scale of H1 or H2)");
    }
  }
  const std::string_view m(method.data(), method.size());
  TORCH_CHECK(m == "fw" || m == "sinkhorn", "qap_solve: method must be 'fw' or 'sinkhorn', got '", std::string(m),
              "'");
  const std::string_view est(estimator.data(), estimator.size());
  TORCH_CHECK(est == "imle" || est == "blackbox" || est == "imle_symmetric",
              "qap_solve: estimator must be 'imle', 'blackbox' or 'imle_symmetric', got '", std::string(est), "'");
  TORCH_CHECK(lambda > 0 && std::isfinite(lambda), "qap_solve: lambda_ must be a positive finite number, got ",
              lambda);
  TORCH_CHECK(max_iter >= 1, "qap_solve: max_iter must be >= 1, got ", max_iter);
  TORCH_CHECK(tol >= 0, "qap_solve: tol must be >= 0, got ", tol);
  TORCH_CHECK(restarts == -1 || (restarts >= 1 && restarts <= kMaxRestarts), "qap_solve: restarts must be in [1, ",
              kMaxRestarts, "] (or -1 for the size-based default), got ", restarts);
  check_finite(U, "qap_solve: U");
  return m == "fw" ? QapMethod::FW : QapMethod::Sinkhorn;
}

inline void check_gradient_args(const at::Tensor& X, const at::Tensor& nbr1, const at::Tensor& nbr2,
                                const at::Tensor& Q) {
  TORCH_CHECK((X.dim() == 3 || X.dim() == 4) && X.size(-1) == X.size(-2),
              "qap_gradient: X must have shape [G, N, N] or [G, R, N, N], got ", X.sizes());
  check_float(X, "qap_gradient: X");
  const int64_t G = X.size(0), N = X.size(-1);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>(nbr1, "nbr1"), {nbr2, "nbr2"}}) {
    TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 3 && t.size(0) == G && t.size(1) == N, "qap_gradient: ",
                name, " must be int64 [G, N, k] = [", G, ", ", N, ", k], got ", t.scalar_type(), " ", t.sizes());
    check_same_device(t, name, X, "X");
    if (t.numel() > 0) {
      TORCH_CHECK(t.min().item<int64_t>() >= 0 && t.max().item<int64_t>() < N, "qap_gradient: ", name,
                  " entries must lie in [0, ", N, ")");
    }
  }
  const int64_t k = nbr1.size(2);
  TORCH_CHECK(nbr2.size(2) == k, "qap_gradient: nbr1 and nbr2 must have the same k, got ", nbr1.sizes(), " and ",
              nbr2.sizes());
  TORCH_CHECK(Q.dim() == 3 && Q.size(0) == G && Q.size(1) == N * k && Q.size(2) == N * k,
              "qap_gradient: Q must have shape [G, N*k, N*k] = [", G, ", ", N * k, ", ", N * k, "], got ", Q.sizes());
  check_float(Q, "qap_gradient: Q");
  check_same_device(Q, "qap_gradient: Q", X, "X");
}

// Dense Q [G, N*k, N*k] of the implicit form, in `dtype` (any device): the cross Gram C = H1 H2^T and
// the inverse edge lengths (0 for a zero-length edge) through align's own ops, edge_sq_norms and
// pair_scores (Q[e, f] = w1_e w2_f (C_ia - C_ib - C_ja + C_jb)), called through the dispatcher.
inline at::Tensor implicit_q_dense(const at::Tensor& H1, const at::Tensor& H2, const at::Tensor& nbr1,
                                   const at::Tensor& nbr2, at::ScalarType dtype) {
  static const auto edge_sq_norms = c10::Dispatcher::singleton()
                                        .findSchemaOrThrow("exgramed::edge_sq_norms", "")
                                        .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  static const auto pair_scores =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("exgramed::pair_scores", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, double, double, const c10::optional<at::Tensor>&, double,
                            const c10::optional<at::Tensor>&)>();
  const at::Tensor h1 = H1.to(dtype), h2 = H2.to(dtype);
  const at::Tensor C = at::bmm(h1, h2.transpose(1, 2));  // [G, N, N]
  auto inv_len = [&](const at::Tensor& H, const at::Tensor& nbr) {
    const at::Tensor len = edge_sq_norms.call(H, nbr).sqrt();  // [G, N*k], from the exact differences
    return at::where(len > 0, 1.0 / len, at::zeros_like(len));
  };
  return pair_scores.call(C, inv_len(h1, nbr1), inv_len(h2, nbr2), nbr1, nbr2, 1.0, 0.0, c10::nullopt, 0.0,
                          c10::nullopt);
}

// Q as the solvers read it: contiguous, in compute_dtype.
inline at::Tensor solver_q_table(const at::Tensor& Q) { return Q.to(compute_dtype(Q.scalar_type())).contiguous(); }

// The checked, converted inputs of a solve: U in float64, Q dense in float32/float64 (from H
// when given), R starts per problem (1 when there is no quadratic term).
struct QapInputs {
  at::Tensor Ud, Qt, n1, n2, init;  // init: [G, N] int64 contiguous, or undefined
  int64_t G = 0, N = 0, k = 0, R = 1;
  bool has_q = false;
  bool q_unchecked = false;  // Q's NaN/Inf check was deferred to the kernel (defer_q_check)
  QapMethod method = QapMethod::FW;
};

inline QapInputs prepare_qap(const at::Tensor& U, const at::Tensor& nbr1, const at::Tensor& nbr2,
                             const c10::optional<at::Tensor>& Q, const c10::optional<at::Tensor>& H1,
                             const c10::optional<at::Tensor>& H2, c10::string_view method, int64_t max_iter,
                             double tol, int64_t restarts, c10::string_view estimator, double lambda,
                             const c10::optional<at::Tensor>& init, bool partial, bool defer_q_check = false) {
  QapInputs in;
  in.method = check_qap_args(U, nbr1, nbr2, Q, H1, H2, method, max_iter, tol, restarts, estimator, lambda,
                             !defer_q_check);
  check_init(init, U, partial);
  if (init.has_value()) in.init = init->contiguous();
  in.G = U.size(0);
  in.N = U.size(1);
  in.k = nbr1.size(2);
  in.Ud = U.to(at::kDouble).contiguous();
  in.n1 = nbr1.contiguous();
  in.n2 = nbr2.contiguous();
  if (in.G == 0 || in.N == 0) return in;
  if (Q.has_value()) {
    in.Qt = solver_q_table(*Q);
    in.q_unchecked = defer_q_check;
  } else if (H1.has_value()) {
    const at::ScalarType ct = compute_dtype(at::promote_types(H1->scalar_type(), H2->scalar_type()));
    in.Qt = implicit_q_dense(*H1, *H2, in.n1, in.n2, ct);
  }
  in.has_q = in.Qt.defined() && in.k > 0;
  if (!in.has_q) in.Qt = at::empty({0}, U.options().dtype(at::kFloat));
  in.R = in.has_q ? (restarts < 0 ? default_restarts(in.N) : restarts) : 1;
  return in;
}

// Z [G, N, N] (U's dtype) of permutations perm [G, N] (-1: unmatched).
inline at::Tensor perm_to_z(const at::Tensor& perm, int64_t N, at::ScalarType dtype) {
  const at::Tensor ones = (perm >= 0).to(dtype).unsqueeze(2);
  return at::zeros({perm.size(0), N, N}, ones.options()).scatter_(2, perm.clamp_min(0).unsqueeze(2), ones);
}

// The in-edges of every node, CSR: ptr [G, N + 1], edge ids [G, N * k] (increasing per node).
inline std::pair<at::Tensor, at::Tensor> in_edges_csr(const at::Tensor& nbr) {
  const int64_t G = nbr.size(0), N = nbr.size(1), k = nbr.size(2);
  const at::Tensor t = nbr.reshape({G, N * k});
  const at::Tensor order = std::get<1>(at::sort(t, /*stable=*/true, 1, false));
  const at::Tensor counts = at::zeros({G, N}, nbr.options()).scatter_add_(1, t, at::ones_like(t));
  const at::Tensor ptr = at::cat({at::zeros({G, 1}, nbr.options()), counts.cumsum(1)}, 1);
  return {ptr.contiguous(), order.contiguous()};
}

}  // namespace exgramed
