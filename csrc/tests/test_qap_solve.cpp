// linear_assignment and qap_solve through the dispatcher, against brute force over all
// permutations written here.
#include <algorithm>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "test_util.h"

static at::Tensor linear_assignment(const at::Tensor& s, bool maximize) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("exgramed::linear_assignment", "")
                       .typed<at::Tensor(const at::Tensor&, bool)>();
  return op.call(s, maximize);
}

using QapSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                                 const std::optional<at::Tensor>&, c10::string_view, int64_t, double,
                                                 int64_t, bool, int64_t, c10::string_view, double,
                                                 const std::optional<at::Tensor>&, bool);

static std::tuple<at::Tensor, at::Tensor> qap_solve(const at::Tensor& U, const at::Tensor& n1, const at::Tensor& n2,
                                                    const at::Tensor& Q) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("exgramed::qap_solve", "").typed<QapSig>();
  return op.call(U, n1, n2, Q, std::nullopt, std::nullopt, "fw", 30, 1e-6, -1, false, 0, "imle", 80.0,
                 std::nullopt, false);
}

// f(perm) by the definition.
static double objective(const at::Tensor& U, const at::Tensor& n1, const at::Tensor& n2, const at::Tensor& Q,
                        const std::vector<int64_t>& p) {
  const int64_t N = U.size(0), k = n1.size(1);
  const auto Ua = U.accessor<double, 2>();
  const auto Qa = Q.accessor<double, 2>();
  const auto a1 = n1.accessor<int64_t, 2>();
  const auto a2 = n2.accessor<int64_t, 2>();
  double f = 0;
  for (int64_t i = 0; i < N; ++i) f += Ua[i][p[i]];
  for (int64_t i = 0; i < N; ++i)
    for (int64_t s = 0; s < k; ++s)
      for (int64_t a = 0; a < N; ++a)
        for (int64_t t = 0; t < k; ++t)
          if (p[i] == a && p[a1[i][s]] == a2[a][t]) f += Qa[i * k + s][a * k + t];
  return f;
}

int main() {
  at::manual_seed(0);
  // linear_assignment: the brute-force optimum, ties included.
  for (int64_t N : {1, 3, 6}) {
    for (bool ties : {false, true}) {
      const auto s = ties ? at::randint(0, 2, {3, N, N}, at::kDouble) : at::rand({3, N, N}, at::kDouble);
      const auto cols = linear_assignment(s, true);
      for (int64_t g = 0; g < 3; ++g) {
        std::vector<int64_t> p(N);
        std::iota(p.begin(), p.end(), 0);
        double best = -std::numeric_limits<double>::infinity(), ours = 0;
        do {
          double v = 0;
          for (int64_t i = 0; i < N; ++i) v += s[g][i][p[i]].item<double>();
          best = std::max(best, v);
        } while (std::next_permutation(p.begin(), p.end()));
        std::vector<char> seen(N, 0);
        for (int64_t i = 0; i < N; ++i) {
          const int64_t c = cols[g][i].item<int64_t>();
          EXPECT(c >= 0 && c < N && !seen[c]);
          seen[c] = 1;
          ours += s[g][i][c].item<double>();
        }
        EXPECT(std::abs(ours - best) < 1e-12);
      }
    }
  }
  EXPECT_THROWS_WITH(linear_assignment(at::rand({2, 3, 4}), true), "square");
  EXPECT_THROWS_WITH(linear_assignment(at::full({1, 2, 2}, NAN), true), "NaN or Inf");

  // qap_solve: N = 6, k = 2, dense Q; the objective is f(Z) and within 5% of the brute-force optimum.
  const int64_t N = 6, k = 2;
  const auto U = at::randn({2, N, N}, at::kDouble);
  const auto n1 = (at::arange(N).view({1, N, 1}) + at::randint(1, N, {2, N, k})).remainder(N);
  const auto n2 = (at::arange(N).view({1, N, 1}) + at::randint(1, N, {2, N, k})).remainder(N);
  const auto Q = at::randn({2, N * k, N * k}, at::kDouble);
  const auto [Z, obj] = qap_solve(U, n1, n2, Q);
  for (int64_t g = 0; g < 2; ++g) {
    std::vector<int64_t> zp(N);
    for (int64_t i = 0; i < N; ++i) {
      EXPECT(Z[g][i].sum().item<double>() == 1.0);
      zp[i] = Z[g][i].argmax().item<int64_t>();
    }
    const double f = objective(U[g], n1[g], n2[g], Q[g], zp);
    EXPECT(std::abs(f - obj[g].item<double>()) < 1e-9);
    std::vector<int64_t> p(N);
    std::iota(p.begin(), p.end(), 0);
    double best = -std::numeric_limits<double>::infinity(), worst = std::numeric_limits<double>::infinity();
    do {
      const double v = objective(U[g], n1[g], n2[g], Q[g], p);
      best = std::max(best, v);
      worst = std::min(worst, v);
    } while (std::next_permutation(p.begin(), p.end()));
    EXPECT(f <= best + 1e-9 && (f - worst) >= 0.95 * (best - worst));
  }
  EXPECT_THROWS_WITH(qap_solve(U, n1, n2, Q.narrow(1, 0, 3)), "Q must have shape");
  EXPECT_THROWS_WITH(qap_solve(U, n1 + N, n2, Q), "nbr1 entries must lie in");
  if (exgramed_test::failures == 0) std::cout << "test_qap_solve: all checks passed\n";
  return exgramed_test::failures == 0 ? 0 : 1;
}
