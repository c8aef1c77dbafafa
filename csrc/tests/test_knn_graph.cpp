// knn_graph through the dispatcher, against a brute-force fp64 kNN written here.
#include <algorithm>
#include <numeric>
#include <vector>

#include "test_util.h"

static at::Tensor knn_graph(const at::Tensor& x, int64_t k, c10::string_view metric) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("exgramed::knn_graph", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t, c10::string_view)>();
  return op.call(x, k, metric);
}

static std::vector<int64_t> brute_force_row(const at::Tensor& xg, int64_t i, int64_t k) {
  const auto xd = xg.to(at::kDouble);
  const int64_t N = xd.size(0);
  std::vector<double> dist(N);
  for (int64_t j = 0; j < N; ++j) dist[j] = (xd[i] - xd[j]).pow(2).sum().item<double>();
  std::vector<int64_t> idx;
  for (int64_t j = 0; j < N; ++j)
    if (j != i) idx.push_back(j);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return dist[a] < dist[b]; });
  idx.resize(k);
  return idx;
}

int main() {
  at::manual_seed(0);
  // Random points: every row equals brute force.
  const auto x = at::randn({2, 40, 6});
  const auto nbr = knn_graph(x, 5, "l2");
  EXPECT(nbr.sizes() == at::IntArrayRef({2, 40, 5}));
  EXPECT(nbr.scalar_type() == at::kLong);
  for (int64_t g = 0; g < 2; ++g)
    for (int64_t i = 0; i < 40; ++i) {
      const auto want = brute_force_row(x[g], i, 5);
      for (int64_t s = 0; s < 5; ++s) EXPECT(nbr[g][i][s].item<int64_t>() == want[s]);
    }
  // Duplicated points: ties go to the lower index.
  const auto pts = at::randn({1, 5, 3});
  const auto dup = at::cat({pts, pts}, 1);
  const auto nd = knn_graph(dup, 2, "l2");
  EXPECT(nd[0][0][0].item<int64_t>() == 5);
  EXPECT(nd[0][5][0].item<int64_t>() == 0);
  // Errors name the argument.
  EXPECT_THROWS_WITH(knn_graph(x, 40, "l2"), "k must satisfy");
  EXPECT_THROWS_WITH(knn_graph(x, 3, "dot"), "metric");
  EXPECT_THROWS_WITH(knn_graph(at::randn({4, 3}), 2, "l2"), "[G, N, d]");
  if (exgramed_test::failures == 0) std::cout << "test_knn_graph: all checks passed\n";
  return exgramed_test::failures == 0 ? 0 : 1;
}
