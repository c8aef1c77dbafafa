// qap_solve and qap_gradient, CPU kernels. One task per (problem, start), tasks in parallel;
// each task runs Frank-Wolfe (or graduated assignment) single-threaded in float64 with its
// own linear-assignment workspace (warm-started from the previous iteration's column
// potentials), then 2-opt. Frank-Wolfe reads the dense Q table once per problem (grad q(J/N),
// shared by the problem's starts); every later gradient follows by linearity from the O(N k^2)
// gradient of the oracle's vertex, so an iteration costs the linear assignment (its cost pass folds
// in the gradient's running scale) plus O(N k^2).
// Graduated assignment recomputes the dense gradient every iteration.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "assignment.h"
#include "multiversion.h"
#include "qap.h"
#include "qap_driver.h"

namespace exgramed {
namespace {

// One problem's data: U and Q row-major, neighbour tables, and the reverse (in-edge) lists
// the 2-opt gradient updates need (edges in increasing id: deterministic).
template <typename qt>
struct Problem {
  int64_t N = 0, k = 0, Nk = 0;
  const double* U = nullptr;
  const qt* Q = nullptr;  // [Nk, Nk]
  const int64_t* nbr1 = nullptr;
  const int64_t* nbr2 = nullptr;
  bool partial = false;
  std::vector<int64_t> in1_ptr, in1_e, in2_ptr, in2_f;
  std::vector<int64_t> in1_head, in2_head;  // e / k and f / k of the lists' edges (no division in the loops)
  std::vector<char> near1;  // near1[i*N+j]: an edge of graph 1 joins i and j, or a self-loop sits on i or j

  void build_reverse() {
    near1.assign(N * N, 0);
    std::vector<char> loop(N, 0);
    for (int64_t e = 0; e < Nk; ++e) {
      const int64_t i = e / k, j = nbr1[e];
      near1[i * N + j] = near1[j * N + i] = 1;
      if (i == j) loop[i] = 1;
    }
    for (int64_t i = 0; i < N; ++i) {
      if (!loop[i]) continue;
      for (int64_t j = 0; j < N; ++j) near1[i * N + j] = near1[j * N + i] = 1;
    }
    auto rev = [&](const int64_t* nbr, std::vector<int64_t>& ptr, std::vector<int64_t>& lst) {
      ptr.assign(N + 1, 0);
      for (int64_t e = 0; e < Nk; ++e) ++ptr[nbr[e] + 1];
      for (int64_t j = 0; j < N; ++j) ptr[j + 1] += ptr[j];
      lst.assign(Nk, 0);
      std::vector<int64_t> fill(ptr.begin(), ptr.end() - 1);
      for (int64_t e = 0; e < Nk; ++e) lst[fill[nbr[e]]++] = e;
    };
    rev(nbr1, in1_ptr, in1_e);
    rev(nbr2, in2_ptr, in2_f);
    in1_head.resize(Nk);
    in2_head.resize(Nk);
    for (int64_t q = 0; q < Nk; ++q) {
      in1_head[q] = in1_e[q] / k;
      in2_head[q] = in2_f[q] / k;
    }
  }
};

// out = grad q(X) (N x N); xg: scratch N*Nk, xg[j, f] = X[j, t2(f)].
template <typename qt>
void grad_q(const Problem<qt>& p, const double* X, double* out, double* xg) {
  const int64_t N = p.N, k = p.k, Nk = p.Nk;
  std::fill(out, out + N * N, 0.0);
  for (int64_t j = 0; j < N; ++j) {
    for (int64_t f = 0; f < Nk; ++f) xg[j * Nk + f] = X[j * N + p.nbr2[f]];
  }
  for (int64_t e = 0; e < Nk; ++e) {
    const int64_t i = e / k, j = p.nbr1[e];
    const qt* qrow = p.Q + e * Nk;
    const double* xgj = xg + j * Nk;
    const double* xi = X + i * N;
    double* os = out + i * N;
    double* ot = out + j * N;
    for (int64_t a = 0; a < N; ++a) {
      // source term: (i, a) <- Q[e, f] X[t1(e), t2(f)] over the out-edges f of a
      double acc = 0.0;
      for (int64_t t = 0; t < k; ++t) acc += static_cast<double>(qrow[a * k + t]) * xgj[a * k + t];
      os[a] += acc;
      // target term: (t1(e), t2(f)) <- Q[e, f] X[s1(e), a]
      const double xa = xi[a];
      if (xa != 0.0) {
        for (int64_t t = 0; t < k; ++t) ot[p.nbr2[a * k + t]] += static_cast<double>(qrow[a * k + t]) * xa;
      }
    }
  }
}

// acc[0, n) = row[0, n) (copy_row) or acc += row (add_row), in float64: the dense part of grad q(J/N),
// vectorised (one pair per element, no scatter).
EXGRAMED_MULTIVERSION void copy_row_f32(const float* row, int64_t n, double* acc) {
  for (int64_t x = 0; x < n; ++x) acc[x] = static_cast<double>(row[x]);
}
EXGRAMED_MULTIVERSION void add_row_f32(const float* row, int64_t n, double* acc) {
  for (int64_t x = 0; x < n; ++x) acc[x] += static_cast<double>(row[x]);
}
EXGRAMED_MULTIVERSION void add_row_f64(const double* row, int64_t n, double* acc) {
  for (int64_t x = 0; x < n; ++x) acc[x] += row[x];
}
inline void copy_row(const float* row, int64_t n, double* acc) { copy_row_f32(row, n, acc); }
inline void copy_row(const double* row, int64_t n, double* acc) { std::copy(row, row + n, acc); }
inline void add_row(const float* row, int64_t n, double* acc) { add_row_f32(row, n, acc); }
inline void add_row(const double* row, int64_t n, double* acc) { add_row_f64(row, n, acc); }

// out = grad q(J/N), the gradient at the barycenter: (1/N) times, per (x, y), the sum of Q over the
// edge pairs with s1(e) = x, s2(f) = y (source term) and over those with t1(e) = x, t2(f) = y (target
// term). Per row x: the source term sums Q's rows x k .. x k + k - 1 (contiguous) and then groups the
// columns by their head f / k; the target term sums the rows of x's in-edges and then gathers the
// columns by their tail (graph 2's in-edge lists). Row sums first: N k^2 dense adds per x and
// O(N k) gathers, instead of one scatter per entry of Q. One read of Q (twice over), no X.
template <typename qt>
void grad_q_uniform(const Problem<qt>& p, double* out) {
  const int64_t N = p.N, k = p.k, Nk = p.Nk;
  const double c = 1.0 / static_cast<double>(N);
  if (Nk == 0) {
    std::fill(out, out + N * N, 0.0);
    return;
  }
  std::vector<double> acc(Nk);
  for (int64_t x = 0; x < N; ++x) {
    double* ox = out + x * N;
    const qt* rows = p.Q + x * k * Nk;
    copy_row(rows, Nk, acc.data());
    for (int64_t s = 1; s < k; ++s) add_row(rows + s * Nk, Nk, acc.data());
    for (int64_t y = 0; y < N; ++y) {
      double s = 0.0;
      for (int64_t t = 0; t < k; ++t) s += acc[y * k + t];
      ox[y] = s;
    }
    const int64_t q0 = p.in1_ptr[x], q1 = p.in1_ptr[x + 1];
    if (q0 < q1) {
      copy_row(p.Q + p.in1_e[q0] * Nk, Nk, acc.data());
      for (int64_t q = q0 + 1; q < q1; ++q) add_row(p.Q + p.in1_e[q] * Nk, Nk, acc.data());
      for (int64_t y = 0; y < N; ++y) {
        double s = 0.0;
        for (int64_t q = p.in2_ptr[y]; q < p.in2_ptr[y + 1]; ++q) s += acc[p.in2_f[q]];
        ox[y] += s;
      }
    }
    for (int64_t y = 0; y < N; ++y) ox[y] *= c;
  }
}

// out = keep * out + t * grad q(P) for a (partial) permutation P, perm[i] = column of row i or -1:
// O(N^2 + N k^2) instead of O(N^2 k^2), as P has one entry per row (keep = 0, t = 1: grad q(P)
// itself). Needs the reverse lists.
template <typename qt>
void grad_q_perm(const Problem<qt>& p, const int64_t* perm, double* out, double keep = 0.0, double t = 1.0) {
  const int64_t N = p.N, k = p.k, Nk = p.Nk;
  if (keep == 0.0) {
    std::fill(out, out + N * N, 0.0);
  } else if (keep != 1.0) {
    for (int64_t x = 0; x < N * N; ++x) out[x] *= keep;
  }
  // The entries read are scattered over Q (6.5 MB per problem at N = 256): their addresses are known
  // ahead, so row x + kAhead's are prefetched while row x is summed (latency-bound otherwise).
  constexpr int64_t kAhead = 2;
  auto prefetch_row = [&](int64_t x) {
    for (int64_t s = 0; s < k; ++s) {
      const int64_t e = x * k + s, b = perm[p.nbr1[e]];
      if (b < 0) continue;
      for (int64_t q = p.in2_ptr[b]; q < p.in2_ptr[b + 1]; ++q) __builtin_prefetch(p.Q + e * Nk + p.in2_f[q]);
    }
    for (int64_t q = p.in1_ptr[x]; q < p.in1_ptr[x + 1]; ++q) {
      const int64_t a = perm[p.in1_head[q]];
      if (a >= 0) __builtin_prefetch(p.Q + p.in1_e[q] * Nk + a * k);
    }
  };
  for (int64_t x = 0; x < std::min(N, kAhead); ++x) prefetch_row(x);
  for (int64_t x = 0; x < N; ++x) {
    if (x + kAhead < N) prefetch_row(x + kAhead);
    double* ox = out + x * N;
    // source term: P[t1(e), t2(f)] = 1 for the in-edges f of perm[t1(e)]
    for (int64_t s = 0; s < k; ++s) {
      const int64_t e = x * k + s, b = perm[p.nbr1[e]];
      if (b < 0) continue;
      const qt* qe = p.Q + e * Nk;
      for (int64_t q = p.in2_ptr[b]; q < p.in2_ptr[b + 1]; ++q) {
        ox[p.in2_head[q]] += t * static_cast<double>(qe[p.in2_f[q]]);
      }
    }
    // target term: P[s1(e), s2(f)] = 1 for the out-edges f of perm[s1(e)]
    for (int64_t q = p.in1_ptr[x]; q < p.in1_ptr[x + 1]; ++q) {
      const int64_t e = p.in1_e[q], a = perm[p.in1_head[q]];
      if (a < 0) continue;
      const qt* qf = p.Q + e * Nk + a * k;
      const int64_t* na = p.nbr2 + a * k;
      for (int64_t tt = 0; tt < k; ++tt) ox[na[tt]] += t * static_cast<double>(qf[tt]);
    }
  }
}

// q(P) of a (partial) permutation, perm[i] = column of row i or -1: O(N k^2).
template <typename qt>
double quad_perm(const Problem<qt>& p, const int64_t* perm) {
  if (p.Q == nullptr) return 0.0;
  const int64_t k = p.k, Nk = p.Nk;
  double s = 0.0;
  for (int64_t i = 0; i < p.N; ++i) {
    const int64_t a = perm[i];
    if (a < 0) continue;
    for (int64_t si = 0; si < k; ++si) {
      const int64_t e = i * k + si, b = perm[p.nbr1[e]];
      if (b < 0) continue;
      for (int64_t t = 0; t < k; ++t) {
        if (p.nbr2[a * k + t] == b) s += static_cast<double>(p.Q[e * Nk + a * k + t]);
      }
    }
  }
  return s;
}

inline double dot_perm(const double* M, const int64_t* perm, int64_t N) {
  double s = 0.0;
  for (int64_t i = 0; i < N; ++i) {
    if (perm[i] >= 0) s += M[i * N + perm[i]];
  }
  return s;
}

// Eight independent partial sums: a single running sum is one dependent add per element (the
// compiler may not reorder floating-point sums), which made the N^2 dot products of every
// Frank-Wolfe iteration latency-bound. Fixed order: deterministic.
EXGRAMED_MULTIVERSION double dot(const double* a, const double* b, int64_t n) {
  double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) s[l] += a[i + l] * b[i + l];
  }
  for (; i < n; ++i) s[0] += a[i] * b[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <typename qt>
double objective_perm(const Problem<qt>& p, const int64_t* perm) {
  return dot_perm(p.U, perm, p.N) + quad_perm(p, perm);
}

// Per-task scratch. gf, xg and L serve graduated assignment only (its dense gradient and Sinkhorn
// matrix: ~5 MB at N = 256, zero-filled, so not allocated for Frank-Wolfe or 2-opt).
struct Work {
  LapWorkspace lap, lap2;
  std::vector<double> X, gq, gf, xg, L;
  std::vector<int64_t> P, best, ext;
  std::vector<int64_t> verts;  // Frank-Wolfe: the vertices X is a combination of, N each
  std::vector<double> vert_w;  // and their weights
  void resize(int64_t N, int64_t k, bool annealing) {
    X.resize(N * N);
    gq.resize(N * N);
    if (annealing) {
      gf.resize(N * N);
      xg.resize(N * N * std::max<int64_t>(k, 1));
      L.resize(4 * N * N);
    }
    P.resize(N);
    best.resize(N);
    ext.resize(2 * N);
  }
};

// The vertex maximising <S, P>, S = S1 (+ scale2 * S2 if given): LAP of S (of max(S, 0) with the
// non-positive pairs dropped for partial permutations: max over partial permutations = that, as
// extending a partial matching by pairs of score >= 0 never lowers it). The drop reads the LAP's own
// cost matrix (c = -max(S, 0) < 0 exactly where S > 0), so both decisions see the same rounding of S.
template <typename qt>
void vertex_oracle(const Problem<qt>& p, const double* S1, const double* S2, Work& w, bool warm, int64_t* perm,
                   double scale2 = 1.0) {
  lap_solve_sum(S1, S2, p.N, /*maximize=*/true, p.partial, w.lap, warm, /*row_reduction=*/true, scale2);
  const double* cost = w.lap.cost.data();
  for (int64_t i = 0; i < p.N; ++i) {
    const int64_t j = w.lap.col4row[i];
    perm[i] = (p.partial && !(cost[i * p.N + j] < 0)) ? -1 : j;
  }
}

template <typename qt>
void keep_if_better(const Problem<qt>& p, const int64_t* perm, double f, double& best_f, int64_t* best) {
  if (f > best_f) {
    best_f = f;
    std::copy(perm, perm + p.N, best);
  }
}

// Frank-Wolfe from w.X with w.gq = grad q(w.X); the best vertex seen goes to w.best. f along
// X + t (P - X) is f(X) + t <grad f(X), P - X> + t^2 q(P - X), q(P - X) = q(P) - <grad q(X), P> + q(X).
// x_vertex: w.X is a (partial) permutation (then a candidate already).
// Per iteration, after the oracle: O(N k^2), no pass over an N x N matrix. grad q is linear,
// grad q(X + t (P - X)) = (1 - t) grad q(X) + t grad q(P), and grad q(P) of a vertex costs O(N k^2):
// grad q(X) is kept as gs * w.gq, so the (1 - t) is a scalar and the oracle folds gs into its cost
// pass. X itself is kept as c0 X0 + sum_v a_v P_v (the start and the vertices stepped to), formed
// only for the last rounding; <U, X> and q(X) follow the line in O(N) from the oracle's <U, P>,
// <grad q(X), P>, q(P).
template <typename qt>
double frank_wolfe(const Problem<qt>& p, Work& w, int64_t max_iter, double tol, bool x_vertex, double best_f) {
  const int64_t N = p.N, NN = N * N;
  double uX = dot(p.U, w.X.data(), NN), qX = 0.5 * dot(w.gq.data(), w.X.data(), NN);
  double gs = 1.0, c0 = 1.0;  // grad q(X) = gs * w.gq; X = c0 * w.X + sum_v a[v] * verts[v]
  std::vector<int64_t>& verts = w.verts;
  std::vector<double>& a = w.vert_w;
  verts.clear();
  a.clear();
  int64_t* P = w.P.data();
  for (int64_t it = 0; it < max_iter; ++it) {
    vertex_oracle(p, p.U, w.gq.data(), w, it > 0, P, gs);
    const double uP = dot_perm(p.U, P, N), gP = gs * dot_perm(w.gq.data(), P, N), qP = quad_perm(p, P);
    keep_if_better(p, P, uP + qP, best_f, w.best.data());
    const double fX = uX + qX;
    const double gap = (uP + gP) - (uX + 2.0 * qX);  // <grad f(X), P - X>, <grad q(X), X> = 2 q(X)
    if (gap <= tol * std::max(1.0, std::abs(fX))) break;
    const double b = qP - gP + qX;
    const double t = b < 0 ? std::min(1.0, -gap / (2 * b)) : 1.0;
    if (t == 1.0) {  // a full step: X = P
      c0 = 0.0;
      verts.assign(P, P + N);
      a.assign(1, 1.0);
      grad_q_perm(p, P, w.gq.data());
      gs = 1.0;
      uX = uP;
      qX = qP;
      x_vertex = true;
      continue;
    }
    c0 *= 1.0 - t;
    for (double& av : a) av *= 1.0 - t;
    verts.insert(verts.end(), P, P + N);
    a.push_back(t);
    gs *= 1.0 - t;
    if (gs < 1e-150) {  // keep the stored gradient in range (t < 1, so gs > 0)
      for (int64_t x = 0; x < NN; ++x) w.gq[x] *= gs;
      gs = 1.0;
    }
    grad_q_perm(p, P, w.gq.data(), 1.0, t / gs);
    uX += t * (uP - uX);
    qX += t * (gP - 2.0 * qX) + t * t * b;
    x_vertex = false;
  }
  if (!x_vertex) {  // the rounding of the last iterate (a vertex iterate is a candidate already)
    for (int64_t x = 0; x < NN; ++x) w.X[x] *= c0;
    for (size_t v = 0; v < a.size(); ++v) {
      const int64_t* pv = verts.data() + v * N;
      for (int64_t i = 0; i < N; ++i) {
        if (pv[i] >= 0) w.X[i * N + pv[i]] += a[v];
      }
    }
    vertex_oracle(p, w.X.data(), nullptr, w, false, P);
    keep_if_better(p, P, objective_perm(p, P), best_f, w.best.data());
  }
  return best_f;
}

// Sinkhorn of exp(grad f / T) (N x N, or 2N x 2N with zero-score dummies for partial) into
// w.X (and the extended matrix into w.L for partial). Exponentials are taken once, shifted by
// each row's maximum (every row keeps an entry 1); the sweeps are multiplicative. A line whose
// entries all underflow gets scale 0 (it stays 0) instead of a division by zero.
template <typename qt>
void sinkhorn(const Problem<qt>& p, Work& w, double T) {
  const int64_t N = p.N, M = p.partial ? 2 * N : N;
  double* K = w.L.data();
  for (int64_t i = 0; i < M; ++i) {
    double mx = 0.0;  // dummy entries have score 0
    if (i < N) {
      mx = p.partial ? 0.0 : -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < N; ++j) mx = std::max(mx, w.gf[i * N + j]);
    }
    for (int64_t j = 0; j < M; ++j) K[i * M + j] = std::exp((((i < N && j < N) ? w.gf[i * N + j] : 0.0) - mx) / T);
  }
  std::vector<double> cs(M);
  for (int64_t sweep = 0; sweep < kSinkhornInner; ++sweep) {
    for (int64_t i = 0; i < M; ++i) {
      double* r = K + i * M;
      double s = 0.0;
      for (int64_t j = 0; j < M; ++j) s += r[j];
      const double sc = s >= std::numeric_limits<double>::min() ? 1.0 / s : 0.0;
      for (int64_t j = 0; j < M; ++j) r[j] *= sc;
    }
    std::fill(cs.begin(), cs.end(), 0.0);
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < M; ++j) cs[j] += K[i * M + j];
    }
    for (int64_t j = 0; j < M; ++j) cs[j] = cs[j] >= std::numeric_limits<double>::min() ? 1.0 / cs[j] : 0.0;
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < M; ++j) K[i * M + j] *= cs[j];
    }
  }
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t j = 0; j < N; ++j) w.X[i * N + j] = K[i * M + j];
  }
}

// Graduated assignment from w.X: X <- Sinkhorn(exp(grad f(X) / T)), T from t_scale times the
// first gradient's range down to kSinkhornTRatio of it geometrically; each iterate rounded by LAP.
template <typename qt>
double graduated_assignment(const Problem<qt>& p, Work& w, int64_t max_iter, double tol, double t_scale) {
  const int64_t N = p.N, NN = N * N;
  double best_f = -std::numeric_limits<double>::infinity();
  double T0 = 1.0;
  std::vector<double> prev(NN);
  for (int64_t it = 0; it < max_iter; ++it) {
    grad_q(p, w.X.data(), w.gq.data(), w.xg.data());
    for (int64_t x = 0; x < NN; ++x) w.gf[x] = p.U[x] + w.gq[x];
    if (it == 0) {
      const auto mm = std::minmax_element(w.gf.begin(), w.gf.begin() + NN);
      T0 = t_scale * (*mm.second - *mm.first > 0 ? *mm.second - *mm.first : 1.0);
    }
    const double T = T0 * std::pow(kSinkhornTRatio, double(it) / double(std::max<int64_t>(1, max_iter - 1)));
    std::copy(w.X.begin(), w.X.begin() + NN, prev.begin());
    sinkhorn(p, w, T);
    if (p.partial) {
      // Round the extended matrix: a row whose mass sits on the dummies stays unmatched.
      lap_solve(w.L.data(), 2 * N, /*maximize=*/true, false, w.lap2, false);
      for (int64_t i = 0; i < N; ++i) w.P[i] = w.lap2.col4row[i] < N ? w.lap2.col4row[i] : -1;
    } else {
      vertex_oracle(p, w.X.data(), nullptr, w, it > 0, w.P.data());
    }
    keep_if_better(p, w.P.data(), objective_perm(p, w.P.data()), best_f, w.best.data());
    double change = 0.0;
    for (int64_t x = 0; x < NN; ++x) change = std::max(change, std::abs(w.X[x] - prev[x]));
    if (change <= tol) break;
  }
  return best_f;
}

// 2-opt on w.best: swap the columns of rows i < j while f increases. With partial, rows and
// columns N..2N-1 are dummies (score 0, no edges): swapping with them matches/unmatches.
// Delta of a swap D = P' - P: <U, D> + <grad q(P), D> + q(D); q(D) only over edges inside
// {i, j} x {a, b}; grad q(P) is kept up to date by adding grad q(D) (O(k^2 + in-degree^2)).
template <typename qt>
double polish(const Problem<qt>& p, Work& w) {
  const int64_t N = p.N, k = p.k, Nk = p.Nk, M = p.partial ? 2 * N : N;
  int64_t* ext = w.ext.data();
  if (p.partial) {
    std::vector<char> used(N, 0);
    for (int64_t i = 0; i < N; ++i) {
      ext[i] = w.best[i] >= 0 ? w.best[i] : N + i;
      if (w.best[i] >= 0) used[w.best[i]] = 1;
    }
    int64_t r = N;
    for (int64_t a = 0; a < N; ++a) {
      if (!used[a]) ext[r++] = a;
    }
    for (int64_t i = 0; i < N; ++i) {
      if (w.best[i] >= 0) ext[r++] = N + i;
    }
  } else {
    std::copy(w.best.begin(), w.best.begin() + N, ext);
  }
  double* G = w.gq.data();
  grad_q_perm(p, w.best.data(), G);
  double cur = objective_perm(p, w.best.data());
  const double thr = 1e-12 * std::max(1.0, std::abs(cur));
  auto u = [&](int64_t x, int64_t y) { return (x < N && y < N) ? p.U[x * N + y] + G[x * N + y] : 0.0; };
  for (int64_t pass = 0; pass < kPolishMaxPasses; ++pass) {
    bool improved = false;
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = i + 1; j < M; ++j) {
        const int64_t a = ext[i], b = ext[j];
        if ((i >= N && j >= N) || (a >= N && b >= N)) continue;  // no real entry changes
        // D(x, c): the change of P at real (x, c) when rows i, j swap columns a, b.
        auto D = [&](int64_t x, int64_t c) -> double {
          if (x == i) return c == a ? -1.0 : (c == b ? 1.0 : 0.0);
          if (x == j) return c == b ? -1.0 : (c == a ? 1.0 : 0.0);
          return 0.0;
        };
        double delta = u(i, b) + u(j, a) - u(i, a) - u(j, b);
        if (k > 0 && i < N && j < N && p.near1[i * N + j]) {  // q(D) = 0 unless i, j share an edge
          for (const int64_t x : {i, j}) {
            for (int64_t s = 0; s < k; ++s) {
              const int64_t e = x * k + s, y = p.nbr1[e];
              if (y != i && y != j) continue;
              for (const int64_t c : {a, b}) {
                if (c >= N) continue;
                const double dxc = D(x, c);
                for (int64_t t = 0; t < k; ++t) {
                  const int64_t f = c * k + t, d = p.nbr2[f];
                  if (d != a && d != b) continue;
                  delta += static_cast<double>(p.Q[e * Nk + f]) * dxc * D(y, d);
                }
              }
            }
          }
        }
        if (!(delta > thr)) continue;
        // grad q += grad q(D): source term over in-edges of {i, j} x {a, b}, target term over out-edges.
        if (k > 0) {
          for (const int64_t x : {i, j}) {
            if (x >= N) continue;
            for (const int64_t c : {a, b}) {
              if (c >= N) continue;
              const double dxc = D(x, c);
              for (int64_t q1 = p.in1_ptr[x]; q1 < p.in1_ptr[x + 1]; ++q1) {
                const int64_t e = p.in1_e[q1];
                for (int64_t q2 = p.in2_ptr[c]; q2 < p.in2_ptr[c + 1]; ++q2) {
                  const int64_t f = p.in2_f[q2];
                  G[p.in1_head[q1] * N + p.in2_head[q2]] += static_cast<double>(p.Q[e * Nk + f]) * dxc;
                }
              }
              for (int64_t s = 0; s < k; ++s) {
                const int64_t e = x * k + s;
                for (int64_t t = 0; t < k; ++t) {
                  const int64_t f = c * k + t;
                  G[p.nbr1[e] * N + p.nbr2[f]] += static_cast<double>(p.Q[e * Nk + f]) * dxc;
                }
              }
            }
          }
        }
        ext[i] = b;
        ext[j] = a;
        cur += delta;
        improved = true;
      }
    }
    if (!improved) break;
  }
  for (int64_t i = 0; i < N; ++i) w.best[i] = ext[i] < N ? ext[i] : -1;
  return objective_perm(p, w.best.data());
}

// Start r: 0 the barycenter J/N (or the given init vertex), 1 the vertex LAP(U), r >= 2 the
// midpoint of J/N and a random permutation. g0: grad q(J/N) of the problem, for Frank-Wolfe's
// non-vertex starts (their gradients follow from it by linearity); null when no start needs it.
template <typename qt>
void solve_task(const Problem<qt>& p, int64_t g, int64_t r, QapMethod method, int64_t max_iter, double tol,
                int64_t seed, const int64_t* init, const double* g0, Work& w, int64_t* out_perm, double* out_f) {
  const int64_t N = p.N, NN = N * N;
  if (p.Q == nullptr) {  // linear: the assignment of U is optimal
    vertex_oracle(p, p.U, nullptr, w, false, out_perm);
    *out_f = objective_perm(p, out_perm);
    return;
  }
  double best_f = -std::numeric_limits<double>::infinity();
  std::vector<int64_t> start;  // the start vertex, if the start is one
  if (r == 1 || (r == 0 && init != nullptr)) {
    start.resize(N);
    if (r == 1) {
      vertex_oracle(p, p.U, nullptr, w, false, start.data());
    } else {
      std::copy(init, init + N, start.begin());
    }
    std::fill(w.X.begin(), w.X.begin() + NN, 0.0);
    for (int64_t i = 0; i < N; ++i) {
      if (start[i] >= 0) w.X[i * N + start[i]] = 1.0;
    }
  } else {
    const double c = r == 0 ? 1.0 / N : 0.5 / N;
    std::fill(w.X.begin(), w.X.begin() + NN, c);
    if (r >= 2) {
      start.resize(N);
      random_start_perm(seed, g, r, N, start.data());
      for (int64_t i = 0; i < N; ++i) w.X[i * N + start[i]] += 0.5;
    }
  }
  if (method == QapMethod::FW) {
    const bool vertex = r == 1 || (r == 0 && init != nullptr);
    if (vertex) {
      keep_if_better(p, start.data(), objective_perm(p, start.data()), best_f, w.best.data());  // first: wins ties
      grad_q_perm(p, start.data(), w.gq.data());
    } else {
      TORCH_INTERNAL_ASSERT(g0 != nullptr, "qap_solve: a start at J/N needs grad q(J/N)");
      if (r == 0) {
        std::copy(g0, g0 + NN, w.gq.begin());
      } else {  // grad q(J / 2N + P / 2) = grad q(J/N) / 2 + grad q(P) / 2
        grad_q_perm(p, start.data(), w.gq.data());
        for (int64_t x = 0; x < NN; ++x) w.gq[x] = 0.5 * g0[x] + 0.5 * w.gq[x];
      }
    }
    frank_wolfe(p, w, max_iter, tol, vertex, best_f);
  } else {
    // Starts also differ in the initial temperature (annealing forgets a hot start).
    graduated_assignment(p, w, max_iter, tol, std::pow(0.5, double(r % 6)));
  }
  *out_f = polish(p, w);
  std::copy(w.best.begin(), w.best.begin() + N, out_perm);
}

template <typename qt>
Problem<qt> make_problem(const double* U, const qt* Q, const int64_t* n1, const int64_t* n2, int64_t N, int64_t k,
                         bool partial, bool with_reverse) {
  Problem<qt> p;
  p.N = N;
  p.k = k;
  p.Nk = N * k;
  p.U = U;
  p.Q = Q;
  p.nbr1 = n1;
  p.nbr2 = n2;
  p.partial = partial;
  if (with_reverse && Q != nullptr) p.build_reverse();
  return p;
}

std::tuple<at::Tensor, at::Tensor> qap_solve_cpu(const at::Tensor& U, const at::Tensor& nbr1, const at::Tensor& nbr2,
                                                 const c10::optional<at::Tensor>& Q,
                                                 const c10::optional<at::Tensor>& H1,
                                                 const c10::optional<at::Tensor>& H2, c10::string_view method_name,
                                                 int64_t max_iter, double tol, int64_t restarts, bool partial,
                                                 int64_t seed, c10::string_view estimator, double lambda,
                                                 const c10::optional<at::Tensor>& init) {
  TORCH_CHECK(U.device().is_cpu(), "qap_solve: U must be a CPU tensor for the CPU kernel");
  const QapInputs in = prepare_qap(U, nbr1, nbr2, Q, H1, H2, method_name, max_iter, tol, restarts, estimator,
                                   lambda, init, partial, /*defer_q_check=*/true);
  const int64_t G = in.G, N = in.N, k = in.k, R = in.R;
  if (G == 0 || N == 0) return {at::zeros({G, N, N}, U.options()), at::zeros({G}, U.options())};
  std::vector<int64_t> perms(G * R * N);
  std::vector<double> fvals(G * R);
  // Frank-Wolfe's starts at J/N (r = 0 without init) and J/2N + P/2 (r >= 2) all begin from grad q(J/N):
  // one dense pass over Q per problem, shared by its starts.
  const bool with_g0 = in.has_q && in.method == QapMethod::FW && (!in.init.defined() || R > 2);
  at::Tensor g0 = with_g0 ? at::empty({G, N, N}, in.Ud.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(in.Qt.scalar_type(), "qap_solve_cpu", [&] {
    const scalar_t* qp = in.has_q ? in.Qt.data_ptr<scalar_t>() : nullptr;
    auto problem = [&](int64_t g) {
      return make_problem<scalar_t>(in.Ud.data_ptr<double>() + g * N * N, in.has_q ? qp + g * N * k * N * k : nullptr,
                                    in.n1.data_ptr<int64_t>() + g * N * k, in.n2.data_ptr<int64_t>() + g * N * k, N, k,
                                    partial, true);
    };
    if (with_g0) {
      at::parallel_for(0, G, 1, [&](int64_t g0_, int64_t g1_) {
        for (int64_t g = g0_; g < g1_; ++g) grad_q_uniform(problem(g), g0.data_ptr<double>() + g * N * N);
      });
      // Every entry of Q enters grad q(J/N) with weight 1/N: a NaN or Inf in Q makes it non-finite (prepare_qap
      // left Q's own check to this N^2 test; a non-finite result from finite huge values is told apart here).
      if (in.q_unchecked && !all_finite(g0)) check_finite(in.Qt, "qap_solve: Q");
    } else if (in.q_unchecked) {
      check_finite(in.Qt, "qap_solve: Q");
    }
    // Tasks handed out one at a time (their costs differ by the iterations they take; fixed chunks left
    // a thread idle). Each task starts cold and writes only its own slots: results do not depend on
    // which thread runs it.
    const int64_t T = G * R;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(T, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      Work w;
      w.resize(N, k, in.method == QapMethod::Sinkhorn);
      for (int64_t task = next++; task < T; task = next++) {
        const int64_t g = task / R, r = task % R;
        const int64_t* init_g = in.init.defined() ? in.init.data_ptr<int64_t>() + g * N : nullptr;
        solve_task(problem(g), g, r, in.method, max_iter, tol, seed, init_g,
                   with_g0 ? g0.data_ptr<double>() + g * N * N : nullptr, w, perms.data() + task * N,
                   fvals.data() + task);
      }
    });
  });
  at::Tensor best = at::empty({G, N}, U.options().dtype(at::kLong));
  at::Tensor obj = at::empty({G}, U.options().dtype(at::kDouble));
  for (int64_t g = 0; g < G; ++g) {
    int64_t br = 0;
    for (int64_t r = 1; r < R; ++r) {
      if (fvals[g * R + r] > fvals[g * R + br]) br = r;
    }
    std::copy(perms.begin() + (g * R + br) * N, perms.begin() + (g * R + br + 1) * N, best.data_ptr<int64_t>() + g * N);
    obj.data_ptr<double>()[g] = fvals[g * R + br];
  }
  return {perm_to_z(best, N, U.scalar_type()), obj.to(U.scalar_type())};
}

// The batched driver (qap_driver.h) with CPU hooks: what the CUDA kernel runs, testable here.
std::tuple<at::Tensor, at::Tensor> qap_solve_batched_cpu(
    const at::Tensor& U, const at::Tensor& nbr1, const at::Tensor& nbr2, const c10::optional<at::Tensor>& Q,
    const c10::optional<at::Tensor>& H1, const c10::optional<at::Tensor>& H2, c10::string_view method_name,
    int64_t max_iter, double tol, int64_t restarts, bool partial, int64_t seed, c10::string_view estimator,
    double lambda, const c10::optional<at::Tensor>& init) {
  TORCH_CHECK(U.device().is_cpu(), "qap_solve: U must be a CPU tensor for the CPU kernel");
  const QapInputs in = prepare_qap(U, nbr1, nbr2, Q, H1, H2, method_name, max_iter, tol, restarts, estimator,
                                   lambda, init, partial);
  const int64_t G = in.G, N = in.N, k = in.k, R = in.R, B = G * R;
  if (G == 0 || N == 0) return {at::zeros({G, N, N}, U.options()), at::zeros({G}, U.options())};
  at::Tensor perm, obj;
  AT_DISPATCH_FLOATING_TYPES(in.Qt.scalar_type(), "qap_solve_batched_cpu", [&] {
    const scalar_t* qp = in.has_q ? in.Qt.data_ptr<scalar_t>() : nullptr;
    std::vector<Problem<scalar_t>> probs;
    for (int64_t g = 0; g < G; ++g) {
      probs.push_back(make_problem<scalar_t>(in.Ud.data_ptr<double>() + g * N * N,
                                             in.has_q ? qp + g * N * k * N * k : nullptr,
                                             in.n1.data_ptr<int64_t>() + g * N * k,
                                             in.n2.data_ptr<int64_t>() + g * N * k, N, k, partial, true));
    }
    QapHooks h;
    h.grad = [&](const at::Tensor& X) {
      const at::Tensor Xc = X.contiguous();
      at::Tensor out = at::empty_like(Xc);
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<double> xg(N * N * std::max<int64_t>(k, 1));
        for (int64_t b = b0; b < b1; ++b) {
          grad_q(probs[b / R], Xc.data_ptr<double>() + b * N * N, out.data_ptr<double>() + b * N * N, xg.data());
        }
      });
      return out;
    };
    h.lap = [&](const at::Tensor& S, at::Tensor& v, bool warm, bool clamp) {
      const at::Tensor Sc = S.contiguous();
      const int64_t Bs = Sc.size(0), n = Sc.size(1);
      at::Tensor cols = at::empty({Bs, n}, S.options().dtype(at::kLong));
      at::parallel_for(0, Bs, 1, [&](int64_t b0, int64_t b1) {
        LapWorkspace ws;
        for (int64_t b = b0; b < b1; ++b) {
          ws.resize(n);
          double* vb = v.data_ptr<double>() + b * n;
          if (warm) std::copy(vb, vb + n, ws.v.begin());
          lap_solve(Sc.data_ptr<double>() + b * n * n, n, true, clamp, ws, warm);
          std::copy(ws.v.begin(), ws.v.end(), vb);
          std::copy(ws.col4row.begin(), ws.col4row.end(), cols.data_ptr<int64_t>() + b * n);
        }
      });
      return cols;
    };
    h.quad_perm = [&](const at::Tensor& pm) {
      const at::Tensor pc = pm.contiguous();
      at::Tensor out = at::empty({pc.size(0)}, U.options().dtype(at::kDouble));
      for (int64_t b = 0; b < pc.size(0); ++b) {
        out.data_ptr<double>()[b] = quad_perm(probs[b / R], pc.data_ptr<int64_t>() + b * N);
      }
      return out;
    };
    h.random_perms = [&](int64_t sd) {
      at::Tensor out = at::empty({B, N}, U.options().dtype(at::kLong));
      for (int64_t b = 0; b < B; ++b) random_start_perm(sd, b / R, b % R, N, out.data_ptr<int64_t>() + b * N);
      return out;
    };
    h.polish = [&](at::Tensor& pm, const at::Tensor&) {
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        Work w;
        w.resize(N, k, /*annealing=*/false);  // 2-opt only
        for (int64_t b = b0; b < b1; ++b) {
          int64_t* row = pm.data_ptr<int64_t>() + b * N;
          std::copy(row, row + N, w.best.begin());
          polish(probs[b / R], w);
          std::copy(w.best.begin(), w.best.begin() + N, row);
        }
      });
    };
    std::tie(perm, obj) =
        qap_solve_driver(in.Ud, R, in.has_q, in.method, max_iter, tol, partial, seed, in.init, h);
  });
  return {perm_to_z(perm, N, U.scalar_type()), obj.to(U.scalar_type())};
}

at::Tensor qap_gradient_cpu(const at::Tensor& X, const at::Tensor& nbr1, const at::Tensor& nbr2, const at::Tensor& Q) {
  TORCH_CHECK(X.device().is_cpu(), "qap_gradient: X must be a CPU tensor for the CPU kernel");
  check_gradient_args(X, nbr1, nbr2, Q);
  const int64_t G = X.size(0), N = X.size(-1), k = nbr1.size(2);
  const int64_t R = X.dim() == 4 ? X.size(1) : 1;
  at::Tensor out = at::zeros({G * R, N, N}, X.options().dtype(at::kDouble));
  if (G * R == 0 || N == 0 || k == 0) return out.view(X.sizes()).to(X.scalar_type());
  const at::Tensor Xd = X.to(at::kDouble).contiguous();
  const at::Tensor Qt = solver_q_table(Q);
  const at::Tensor n1 = nbr1.contiguous(), n2 = nbr2.contiguous();
  AT_DISPATCH_FLOATING_TYPES(Qt.scalar_type(), "qap_gradient_cpu", [&] {
    at::parallel_for(0, G * R, 1, [&](int64_t t0, int64_t t1) {
      std::vector<double> xg(N * N * k);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t g = task / R;
        const Problem<scalar_t> p = make_problem<scalar_t>(
            nullptr, Qt.data_ptr<scalar_t>() + g * N * k * N * k, n1.data_ptr<int64_t>() + g * N * k,
            n2.data_ptr<int64_t>() + g * N * k, N, k, false, false);
        grad_q(p, Xd.data_ptr<double>() + task * N * N, out.data_ptr<double>() + task * N * N, xg.data());
      }
    });
  });
  return out.view(X.sizes()).to(X.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(exgramed, CPU, m) {
  m.impl("qap_solve", &qap_solve_cpu);
  m.impl("qap_gradient", &qap_gradient_cpu);
  m.impl("qap_solve_batched", &qap_solve_batched_cpu);
}

}  // namespace exgramed
