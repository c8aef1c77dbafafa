// qap_solve, CPU kernel. One task per (problem, start), tasks in parallel;
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
#include <mutex>
#include <vector>

#include "multiversion.h"
#include "qap_cpu.h"

namespace exgramed {
namespace {

using namespace qap_cpu;

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


// Start r: 0 the barycenter J/N (or the given init vertex), 1 the vertex LAP(U), r >= 2 the
// midpoint of J/N and a random permutation. g0: grad q(J/N) of the problem, for Frank-Wolfe's
// non-vertex starts (their gradients follow from it by linearity); null when no start needs it.
template <typename qt>
void solve_task(const Problem<qt>& p, int64_t r, QapMethod method, int64_t max_iter, double tol,
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
      random_start_perm(seed, r, N, start.data());
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

// grad q(J/N) of the last call's problems, handed to the next call on the same Q and neighbour
// tables: the estimators' re-solve (qap_solve.py's backward) solves the same Q at other unary scores, and
// grad q(J/N) depends on Q alone, so the re-solve skips its dense pass over Q (about a sixth of a solve at
// N = 256-1024). The key is the tensors themselves -- the same TensorImpl (held weakly, so a freed one
// cannot match a new tensor at its address), the same version counter (an in-place change misses) and
// the same data pointer -- and the entry is handed over once (a hit clears it) and stored only by a call
// whose inputs require grad, so it lives from a forward to its backward. The values are the ones the
// call would compute: results are unchanged.
class BarycenterGradientCache {
 public:
  at::Tensor take(const at::Tensor& Q, const at::Tensor& n1, const at::Tensor& n2) {
    std::lock_guard<std::mutex> lock(mu_);
    at::Tensor out;
    if (g0_.defined() && same(q_, Q) && same(n1_, n1) && same(n2_, n2)) out = g0_;
    clear();
    return out;
  }
  void put(const at::Tensor& Q, const at::Tensor& n1, const at::Tensor& n2, const at::Tensor& g0) {
    std::lock_guard<std::mutex> lock(mu_);
    q_ = Key(Q);
    n1_ = Key(n1);
    n2_ = Key(n2);
    g0_ = g0;
  }

 private:
  struct Key {
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl{
        c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
    int64_t version = -1;
    const void* data = nullptr;
    Key() = default;
    explicit Key(const at::Tensor& t) : impl(t.getIntrusivePtr()), version(t._version()), data(t.data_ptr()) {}
  };
  static bool same(const Key& k, const at::Tensor& t) {
    return !k.impl.expired() && k.impl._unsafe_get_target() == t.unsafeGetTensorImpl() &&
           k.version == t._version() && k.data == t.data_ptr();
  }
  void clear() {
    g0_ = at::Tensor();
    q_ = n1_ = n2_ = Key();
  }
  std::mutex mu_;
  Key q_, n1_, n2_;
  at::Tensor g0_;
};

BarycenterGradientCache& g0_cache() {
  static BarycenterGradientCache cache;
  return cache;
}

std::tuple<at::Tensor, at::Tensor> qap_solve_cpu(const at::Tensor& U, const at::Tensor& nbr1, const at::Tensor& nbr2,
                                                 const c10::optional<at::Tensor>& Q,
                                                 const c10::optional<at::Tensor>& H1,
                                                 const c10::optional<at::Tensor>& H2, c10::string_view method_name,
                                                 int64_t max_iter, double tol, int64_t restarts, bool partial,
                                                 int64_t seed, c10::string_view estimator, double lambda,
                                                 const c10::optional<at::Tensor>& init, bool /*sparse_q_grad*/) {
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
  const bool cacheable =
      with_g0 && Q.has_value() && !Q->is_inference() && !nbr1.is_inference() && !nbr2.is_inference();
  at::Tensor g0 = cacheable ? g0_cache().take(*Q, nbr1, nbr2) : at::Tensor();
  const bool g0_known = g0.defined();
  if (with_g0 && !g0_known) g0 = at::empty({G, N, N}, in.Ud.options());
  AT_DISPATCH_FLOATING_TYPES(in.Qt.scalar_type(), "qap_solve_cpu", [&] {
    const scalar_t* qp = in.has_q ? in.Qt.data_ptr<scalar_t>() : nullptr;
    auto problem = [&](int64_t g) {
      return make_problem<scalar_t>(in.Ud.data_ptr<double>() + g * N * N, in.has_q ? qp + g * N * k * N * k : nullptr,
                                    in.n1.data_ptr<int64_t>() + g * N * k, in.n2.data_ptr<int64_t>() + g * N * k, N, k,
                                    partial, true);
    };
    if (with_g0 && !g0_known) {
      at::parallel_for(0, G, 1, [&](int64_t g0_, int64_t g1_) {
        for (int64_t g = g0_; g < g1_; ++g) grad_q_uniform(problem(g), g0.data_ptr<double>() + g * N * N);
      });
      // Every entry of Q enters grad q(J/N) with weight 1/N: a NaN or Inf in Q makes it non-finite (prepare_qap
      // left Q's own check to this N^2 test; a non-finite result from finite huge values is told apart here).
      if (in.q_unchecked && !all_finite(g0)) check_finite(in.Qt, "qap_solve: Q");
      // A backward may follow (its re-solve solves this Q again): keep grad q(J/N) for it.
      if (cacheable && (U.requires_grad() || Q->requires_grad())) g0_cache().put(*Q, nbr1, nbr2, g0);
    } else if (in.q_unchecked && !g0_known) {  // a cached grad q(J/N) was computed from this very Q, checked
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
        solve_task(problem(g), r, in.method, max_iter, tol, seed, init_g,
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

}  // namespace

TORCH_LIBRARY_IMPL(exgramed, CPU, m) { m.impl("qap_solve", &qap_solve_cpu); }

}  // namespace exgramed
