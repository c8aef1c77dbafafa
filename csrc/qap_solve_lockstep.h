// The batched, device-generic graph-matching driver: every start of every problem advances
// in lock-step as one batch of B = G * R iterates, with ATen ops for the elementwise work and
// backend hooks for the kernels (gradient, linear assignment, vertex objective, random starts,
// 2-opt). No host synchronisation inside an iteration: converged starts are masked (step 0),
// and the loop checks "all converged" once every kSyncEvery iterations. This is what the CUDA
// kernel of qap_solve runs; the CPU kernel runs one task per start instead (faster on a CPU).
// The testing op qap_solve_lockstep runs this driver with CPU hooks, so the CPU tests cover it.
//
// Same algorithm, starts, tie rules and constants as the CPU solver (qap_solve_cpu.cpp) and the
// reference (exgramed_kernels/reference/qap.py); the 2-opt may take improving swaps in another
// order (best-improvement per round on the GPU), so results may differ between backends.
#pragma once
#include <ATen/ATen.h>

#include <cfloat>
#include <cmath>
#include <functional>

#include "qap.h"

namespace exgramed {

constexpr int64_t kSyncEvery = 8;

struct QapHooks {
  // grad q(X) for X [B, N, N] float64 (problem b / R).
  std::function<at::Tensor(const at::Tensor&)> grad;
  // Maximising assignment of S [B, n, n] float64 (of max(S, 0) if clamp), column potentials v
  // [B, n] float64 read when warm and written back. Returns int64 [B, n].
  std::function<at::Tensor(const at::Tensor&, at::Tensor&, bool, bool)> lap;
  // q(P) [B] float64 for (partial) permutations perm [B, N] (-1: unmatched).
  std::function<at::Tensor(const at::Tensor&)> quad_perm;
  // Random permutations [B, N] int64 of start r = b % R (the same for every problem).
  std::function<at::Tensor(int64_t)> random_perms;
  // 2-opt on perm [B, N] (in place); f_start [B] float64 is f(perm).
  std::function<void(at::Tensor&, const at::Tensor&)> polish;
};

inline at::Tensor dot_perm(const at::Tensor& M, const at::Tensor& perm) {
  const at::Tensor vals = at::gather(M, 2, perm.clamp_min(0).unsqueeze(2)).squeeze(2);
  return at::where(perm >= 0, vals, at::zeros_like(vals)).sum(1);
}

inline at::Tensor perm_matrix(const at::Tensor& perm, int64_t N) {
  const at::Tensor ones = (perm >= 0).to(at::kDouble).unsqueeze(2);
  return at::zeros({perm.size(0), N, N}, ones.options()).scatter_(2, perm.clamp_min(0).unsqueeze(2), ones);
}

// U: [G, N, N] float64 contiguous. has_q false: the linear assignment of U. Returns the best
// permutation per problem [G, N] (-1 unmatched) and its objective [G] float64.
inline std::tuple<at::Tensor, at::Tensor> qap_solve_driver(const at::Tensor& U, int64_t R, bool has_q,
                                                           QapMethod method, int64_t max_iter, double tol,
                                                           bool partial, int64_t seed, const at::Tensor& init,
                                                           QapHooks& h) {
  const int64_t G = U.size(0), N = U.size(1);
  const auto dopt = U.options();
  auto vertex = [&](const at::Tensor& S, at::Tensor& v, bool warm) {
    const at::Tensor cols = h.lap(S, v, warm, partial);
    if (!partial) return cols;
    const at::Tensor keep = at::gather(S, 2, cols.unsqueeze(2)).squeeze(2) > 0;
    return at::where(keep, cols, at::full_like(cols, -1));
  };
  if (!has_q) {
    at::Tensor v = at::zeros({G, N}, dopt);
    const at::Tensor perm = vertex(U, v, false);
    return {perm, dot_perm(U, perm)};
  }
  const int64_t B = G * R;
  const at::Tensor Ub = U.repeat_interleave(R, 0).contiguous();
  auto objective = [&](const at::Tensor& perm) { return dot_perm(Ub, perm) + h.quad_perm(perm); };
  // Starts: r = 0 the barycenter (or the init vertex), r = 1 the vertex LAP(U), r >= 2 midpoint of
  // J/N and a random permutation.
  const at::Tensor r_of_b = at::arange(B, U.options().dtype(at::kLong)).remainder(R).view({B, 1, 1});
  at::Tensor vU = at::zeros({G, N}, dopt);
  const at::Tensor PU = perm_matrix(vertex(U, vU, false), N).repeat_interleave(R, 0);
  const at::Tensor Prand = perm_matrix(h.random_perms(seed), N);
  const at::Tensor X0 = init.defined() ? perm_matrix(init, N).repeat_interleave(R, 0)
                                       : at::full({B, N, N}, 1.0 / N, dopt);
  at::Tensor X = at::where(r_of_b == 0, X0,
                           at::where(r_of_b == 1, PU, 0.5 / N + 0.5 * Prand))
                     .contiguous();
  at::Tensor best_f = at::full({B}, -INFINITY, dopt);
  at::Tensor best_perm = at::zeros({B, N}, U.options().dtype(at::kLong));
  at::Tensor done = at::zeros({B}, U.options().dtype(at::kBool));
  at::Tensor v = at::zeros({B, N}, dopt);
  auto keep_if_better = [&](const at::Tensor& perm, const at::Tensor& active) {
    const at::Tensor f = objective(perm);
    const at::Tensor upd = (f > best_f).logical_and(active);
    best_f = at::where(upd, f, best_f);
    best_perm = at::where(upd.unsqueeze(1), perm, best_perm);
  };
  if (method == QapMethod::FW) {
    // A start at a vertex (r = 1, and r = 0 with init) is a candidate itself (first: wins ties).
    const at::Tensor r_flat = r_of_b.view({B});
    const at::Tensor vertex_start = init.defined() ? r_flat <= 1 : r_flat == 1;
    keep_if_better(at::where(X.sum(2) > 0, X.argmax(2), at::full({B, N}, -1, best_perm.options())), vertex_start);
    for (int64_t it = 0; it < max_iter; ++it) {
      const at::Tensor gq = h.grad(X);
      const at::Tensor gf = Ub + gq;
      const at::Tensor perm = vertex(gf, v, it > 0);
      keep_if_better(perm, done.logical_not());
      const at::Tensor qX = 0.5 * (gq * X).sum({1, 2});
      const at::Tensor fX = (Ub * X).sum({1, 2}) + qX;
      const at::Tensor gap = dot_perm(gf, perm) - (gf * X).sum({1, 2});
      done = done.logical_or(gap <= tol * fX.abs().clamp_min(1.0));
      const at::Tensor b = h.quad_perm(perm) - dot_perm(gq, perm) + qX;
      at::Tensor t = at::where(b < 0, (-gap / (2 * b)).clamp_max(1.0), at::ones_like(b));
      t = at::where(done, at::zeros_like(t), t).view({B, 1, 1});
      X = (X * (1 - t) + t * perm_matrix(perm, N)).contiguous();
      if ((it + 1) % kSyncEvery == 0 && done.all().item<bool>()) break;
    }
    at::Tensor v0 = at::zeros({B, N}, dopt);
    keep_if_better(vertex(X, v0, false), at::ones_like(done));  // the rounding of the last iterate
  } else {
    const at::Tensor t_scale = at::pow(0.5, r_of_b.view({B}).remainder(6).to(at::kDouble));
    at::Tensor T0;
    const int64_t M = partial ? 2 * N : N;
    at::Tensor v2 = at::zeros({B, M}, dopt);
    for (int64_t it = 0; it < max_iter; ++it) {
      const at::Tensor gf = Ub + h.grad(X);
      if (it == 0) {
        const at::Tensor range = gf.amax({1, 2}) - gf.amin({1, 2});
        T0 = t_scale * at::where(range > 0, range, at::ones_like(range));
      }
      const double frac = double(it) / double(std::max<int64_t>(1, max_iter - 1));
      const at::Tensor T = (T0 * std::pow(kSinkhornTRatio, frac)).view({B, 1, 1});
      at::Tensor S = gf;
      if (partial) {  // zero-score dummy rows and columns
        S = at::zeros({B, M, M}, dopt);
        S.narrow(1, 0, N).narrow(2, 0, N).copy_(gf);
      }
      // exponentials shifted by each row's maximum (dummy entries count with score 0)
      at::Tensor rowmax = S.amax(2, true);
      at::Tensor K = at::exp((S - rowmax) / T);
      for (int64_t sweep = 0; sweep < kSinkhornInner; ++sweep) {
        const at::Tensor rs = K.sum(2, true);
        K = K * at::where(rs >= DBL_MIN, 1.0 / rs, at::zeros_like(rs));
        const at::Tensor cs = K.sum(1, true);
        K = K * at::where(cs >= DBL_MIN, 1.0 / cs, at::zeros_like(cs));
      }
      const at::Tensor X_new = K.narrow(1, 0, N).narrow(2, 0, N).contiguous();
      at::Tensor perm;
      if (partial) {
        const at::Tensor cols = h.lap(K.contiguous(), v2, false, false).narrow(1, 0, N);
        perm = at::where(cols < N, cols, at::full_like(cols, -1)).contiguous();
      } else {
        perm = vertex(X_new, v, it > 0);
      }
      const at::Tensor active = done.logical_not();
      keep_if_better(perm, active);
      const at::Tensor change = (X_new - X).abs().amax({1, 2});
      X = at::where(active.view({B, 1, 1}), X_new, X).contiguous();
      done = done.logical_or(change <= tol);
      if ((it + 1) % kSyncEvery == 0 && done.all().item<bool>()) break;
    }
  }
  best_perm = best_perm.contiguous();
  h.polish(best_perm, objective(best_perm));
  const at::Tensor f = objective(best_perm).view({G, R});
  const at::Tensor br = f.argmax(1);  // the first maximum: the lowest start on ties
  const at::Tensor perm =
      at::gather(best_perm.view({G, R, N}), 1, br.view({G, 1, 1}).expand({G, 1, N})).squeeze(1).contiguous();
  return {perm, at::gather(f, 1, br.view({G, 1})).squeeze(1)};
}

}  // namespace exgramed
