// The CPU graph-matching solver's shared pieces: one problem's data, the quadratic term's gradient and
// value at a matrix or a (partial) permutation, the linear oracle, and 2-opt. Used by qap_solve's CPU
// kernel (Frank-Wolfe / graduated assignment per task), qap_gradient's, and the CPU run of the lock-step
// driver (qap_solve_lockstep).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "assignment.h"
#include "qap.h"

namespace exgramed {
namespace qap_cpu {

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

template <typename qt>
double objective_perm(const Problem<qt>& p, const int64_t* perm) {
  return dot_perm(p.U, perm, p.N) + quad_perm(p, perm);
}

// Per-task scratch. gf, xg and L serve graduated assignment only (its dense gradient and Sinkhorn
// matrix: ~5 MB at N = 256, zero-filled, so not allocated for Frank-Wolfe or 2-opt).
struct Work {
  LapWorkspace lap, lap2;
  std::vector<double> X, gq, gf, xg, L;
  std::vector<double> own;  // 2-opt: each row's current entry of U + grad q (X holds them transposed)
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
  for (int64_t i = 0; i < p.N; ++i) {
    const int64_t j = w.lap.col4row[i];
    perm[i] = (p.partial && !(w.lap.cost_at(i, j) < 0)) ? -1 : j;
  }
}

template <typename qt>
void keep_if_better(const Problem<qt>& p, const int64_t* perm, double f, double& best_f, int64_t* best) {
  if (f > best_f) {
    best_f = f;
    std::copy(perm, perm + p.N, best);
  }
}

// The linear part of 2-opt's swap deltas for a real row i (< N) against rows j = j0 .. j1 - 1 (polish):
// d[j - j0] = ((u(i, b) + u(j, a)) - u(i, a)) - u(j, b), b = ext[j], with u(x, y) = U + G at a real entry
// and 0 at a dummy (row or column >= N). u(i, .) is read from row i of U and G (Ui, Gi), u(., a) from the
// transposed copy (uta[j] = u(j, a); null for a dummy a), u(j, b) from own[j]: contiguous reads, where the
// plain scan read two scattered entries of every row j. Same values, same order of the sums. The rows
// j < N and j >= N (u(j, a) = 0) run as separate loops without a branch (u(i, b) read at a clamped column).
template <bool kCol>
inline void swap_deltas_range(const double* Ui, const double* Gi, const double* uta, const int64_t* ext,
                              const double* own, int64_t N, int64_t j0, int64_t j1, double uia, double* d) {
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t b = ext[j];
    const int64_t bc = b < N ? b : 0;
    const double v = Ui[bc] + Gi[bc];
    const double uib = b < N ? v : 0.0;
    const double uja = kCol ? uta[j] : 0.0;
    d[j - j0] = ((uib + uja) - uia) - own[j];
  }
}

inline void swap_deltas(const double* Ui, const double* Gi, const double* uta, const int64_t* ext, const double* own,
                        int64_t N, int64_t j0, int64_t j1, double uia, double* d) {
  const int64_t jm = std::min(std::max(j0, N), j1);  // rows j < jm are real, j >= jm dummies
  if (uta != nullptr) {
    swap_deltas_range<true>(Ui, Gi, uta, ext, own, N, j0, jm, uia, d);
  } else {
    swap_deltas_range<false>(Ui, Gi, uta, ext, own, N, j0, jm, uia, d);
  }
  swap_deltas_range<false>(Ui, Gi, uta, ext, own, N, jm, j1, uia, d + (jm - j0));
}

// D(x, c) of a swap: the change of P at real (x, c) when rows i, j swap their columns a, b.
inline double swap_change(int64_t i, int64_t j, int64_t a, int64_t b, int64_t x, int64_t c) {
  if (x == i) return c == a ? -1.0 : (c == b ? 1.0 : 0.0);
  if (x == j) return c == b ? -1.0 : (c == a ? 1.0 : 0.0);
  return 0.0;
}

// delta + q(D) for the swap of rows i, j (columns a, b; a dummy >= N has no edges): q(D) is non-zero only
// over the edges inside {i, j} x {a, b}; its terms are added to delta one by one, in a fixed order.
template <typename qt>
double add_swap_quad(const Problem<qt>& p, int64_t i, int64_t j, int64_t a, int64_t b, double delta) {
  const int64_t N = p.N, k = p.k, Nk = p.Nk;
  for (const int64_t x : {i, j}) {
    for (int64_t s = 0; s < k; ++s) {
      const int64_t e = x * k + s, y = p.nbr1[e];
      if (y != i && y != j) continue;
      for (const int64_t c : {a, b}) {
        if (c >= N) continue;
        const double dxc = swap_change(i, j, a, b, x, c);
        for (int64_t t = 0; t < k; ++t) {
          const int64_t f = c * k + t, d = p.nbr2[f];
          if (d != a && d != b) continue;
          delta += static_cast<double>(p.Q[e * Nk + f]) * dxc * swap_change(i, j, a, b, y, d);
        }
      }
    }
  }
  return delta;
}

// grad q(D) for the swap of rows i, j (columns a, b), entry by entry as add(x, y, value): the source term
// over the in-edges of {i, j} x {a, b}, the target term over their out-edges.
template <typename qt, typename Add>
void swap_grad_q(const Problem<qt>& p, int64_t i, int64_t j, int64_t a, int64_t b, Add add) {
  const int64_t N = p.N, k = p.k, Nk = p.Nk;
  for (const int64_t x : {i, j}) {
    if (x >= N) continue;
    for (const int64_t c : {a, b}) {
      if (c >= N) continue;
      const double dxc = swap_change(i, j, a, b, x, c);
      for (int64_t q1 = p.in1_ptr[x]; q1 < p.in1_ptr[x + 1]; ++q1) {
        const int64_t e = p.in1_e[q1];
        for (int64_t q2 = p.in2_ptr[c]; q2 < p.in2_ptr[c + 1]; ++q2) {
          add(p.in1_head[q1], p.in2_head[q2], static_cast<double>(p.Q[e * Nk + p.in2_f[q2]]) * dxc);
        }
      }
      for (int64_t s = 0; s < k; ++s) {
        const int64_t e = x * k + s;
        for (int64_t t = 0; t < k; ++t) {
          const int64_t f = c * k + t;
          add(p.nbr1[e], p.nbr2[f], static_cast<double>(p.Q[e * Nk + f]) * dxc);
        }
      }
    }
  }
}

// 2-opt on w.best: swap the columns of rows i < j while f increases. With partial, rows and
// columns N..2N-1 are dummies (score 0, no edges): swapping with them matches/unmatches.
// Delta of a swap D = P' - P: <U, D> + <grad q(P), D> + q(D); q(D) only over edges inside
// {i, j} x {a, b}; grad q(P) is kept up to date by adding grad q(D) (O(k^2 + in-degree^2)).
// The linear part <U + grad q(P), D> is computed for a block of rows j at a time (swap_deltas); the
// first j of the block whose swap improves f (q(D) added where i and j share an edge) is taken, and
// the scan goes on from j + 1 with the updated tables: the swaps of a plain first-improvement scan.
template <typename qt>
double polish(const Problem<qt>& p, Work& w) {
  const int64_t N = p.N, k = p.k, M = p.partial ? 2 * N : N;
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
  // ut: u transposed (in 8 x 8 tiles), in the storage of w.X (the iterate is done with; already paged in);
  // own[x] = u(x, ext[x]).
  w.own.resize(M);
  double* ut = w.X.data();
  double* own = w.own.data();
  for (int64_t x0 = 0; x0 < N; x0 += 8) {
    const int64_t x1 = std::min(N, x0 + 8);
    for (int64_t y0 = 0; y0 < N; y0 += 8) {
      const int64_t y1 = std::min(N, y0 + 8);
      for (int64_t x = x0; x < x1; ++x) {
        for (int64_t y = y0; y < y1; ++y) ut[y * N + x] = u(x, y);
      }
    }
  }
  for (int64_t x = 0; x < M; ++x) own[x] = u(x, ext[x]);
  auto add_g = [&](int64_t x, int64_t y, double v) {  // G[x, y] += v, with ut and own kept equal to u
    G[x * N + y] += v;
    ut[y * N + x] = u(x, y);
    if (ext[x] == y) own[x] = ut[y * N + x];
  };
  constexpr int64_t kBlock = 128;
  double d[kBlock];
  for (int64_t pass = 0; pass < kPolishMaxPasses; ++pass) {
    bool improved = false;
    for (int64_t i = 0; i < N; ++i) {  // a dummy row i has only dummy rows j > i: no real entry changes
      const char* near_i = k > 0 ? p.near1.data() + i * N : nullptr;
      int64_t j = i + 1;
      while (j < M) {
        const int64_t a = ext[i], j1 = std::min(M, j + kBlock);
        swap_deltas(p.U + i * N, G + i * N, a < N ? ut + a * N : nullptr, ext, own, N, j, j1, u(i, a), d);
        int64_t hit = -1;
        double hit_delta = 0.0;
        for (int64_t jj = j; jj < j1 && hit < 0; ++jj) {
          const bool near = near_i != nullptr && jj < N && near_i[jj];  // q(D) = 0 unless i, j share an edge
          if (!near && !(d[jj - j] > thr)) continue;
          const int64_t b = ext[jj];
          if (a >= N && b >= N) continue;  // no real entry changes
          const double delta = near ? add_swap_quad(p, i, jj, a, b, d[jj - j]) : d[jj - j];
          if (delta > thr) {
            hit = jj;
            hit_delta = delta;
          }
        }
        if (hit < 0) {
          j = j1;
          continue;
        }
        const int64_t b = ext[hit];
        if (k > 0) swap_grad_q(p, i, hit, a, b, add_g);  // grad q += grad q(D)
        ext[i] = b;
        ext[hit] = a;
        own[i] = u(i, b);
        own[hit] = u(hit, a);
        cur += hit_delta;
        improved = true;
        j = hit + 1;
      }
    }
    if (!improved) break;
  }
  for (int64_t i = 0; i < N; ++i) w.best[i] = ext[i] < N ? ext[i] : -1;
  return objective_perm(p, w.best.data());
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

}  // namespace qap_cpu
}  // namespace exgramed
