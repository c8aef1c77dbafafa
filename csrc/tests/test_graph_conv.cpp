// graph_conv through the dispatcher (the public op and its backward), against an fp64
// loop-by-loop reference written here.
#include <algorithm>
#include <limits>
#include <vector>

#include "test_util.h"

using OptT = c10::optional<at::Tensor>;

static at::Tensor graph_conv(const at::Tensor& x, const at::Tensor& nbr, const at::Tensor& wr, const at::Tensor& wl,
                             const OptT& b, c10::string_view aggr, bool reverse, bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("exgramed::graph_conv", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const OptT&, c10::string_view, bool, bool)>();
  return op.call(x, nbr, wr, wl, b, aggr, reverse, relu);
}

// agg[g, i] over the neighbourhood of i: table row (reverse = false) or in-neighbours.
static at::Tensor loop_aggregate(const at::Tensor& x, const at::Tensor& nbr, bool is_max, bool reverse) {
  const int64_t G = x.size(0), N = x.size(1), d = x.size(2), k = nbr.size(2);
  at::Tensor agg = at::zeros({G, N, d}, at::kDouble);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < N; ++i) {
      std::vector<int64_t> hood;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t s = 0; s < k; ++s) {
          const int64_t j = nbr[g][n][s].item<int64_t>();
          if (!reverse && n == i) hood.push_back(j);
          if (reverse && j == i) hood.push_back(n);
        }
      for (int64_t f = 0; f < d; ++f) {
        double acc = is_max ? -std::numeric_limits<double>::infinity() : 0.0;
        for (int64_t j : hood) {
          const double v = x[g][j][f].item<double>();
          acc = is_max ? std::max(acc, v) : acc + v;
        }
        agg[g][i][f] = hood.empty() ? 0.0 : acc;
      }
    }
  return agg;
}

int main() {
  at::manual_seed(0);
  const int64_t G = 2, N = 7, k = 3, d = 4, h = 5;
  const auto x = at::randn({G, N, d}, at::kDouble);
  const auto nbr = at::randint(0, N, {G, N, k}, at::kLong);
  const auto w = at::randn({2 * d, h}, at::kDouble);
  const auto b = at::randn({h}, at::kDouble);
  for (bool reverse : {false, true})
    for (const char* aggr : {"max", "sum"}) {
      const bool is_max = std::string(aggr) == "max";
      const auto agg = loop_aggregate(x, nbr, is_max, reverse);
      const auto want = at::relu(at::matmul(x, w.narrow(0, 0, d)) + at::matmul(agg, w.narrow(0, d, d)) + b);
      const auto got = graph_conv(x, nbr, w.narrow(0, 0, d), w.narrow(0, d, d), b, aggr, reverse, true);
      EXPECT(got.sizes() == at::IntArrayRef({G, N, h}));
      EXPECT(at::allclose(got, want, 1e-12, 1e-12));
    }
  // Backward of sum without ReLU: grad_x = go W_root^T + A^T (go W_rel^T).
  {
    static auto fwd = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("exgramed::graph_conv_forward", "")
                          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
                              c10::string_view, bool, bool)>();
    static auto bwd = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("exgramed::graph_conv_backward", "")
                          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view, bool, bool)>();
    const auto wr = w.narrow(0, 0, d), wl = w.narrow(0, d, d);
    auto [out, xa, am] = fwd.call(x, nbr, wr, wl, b, "sum", false, false);
    const auto go = at::randn({G, N, h}, at::kDouble);
    auto [gx, gw, gb] = bwd.call(go, out, xa, am, nbr, wr, wl, "sum", false, false);
    const auto gagg = at::matmul(go, wl.t());
    at::Tensor want = at::matmul(go, wr.t());
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < N; ++i)
        for (int64_t s = 0; s < k; ++s) want[g][nbr[g][i][s].item<int64_t>()] += gagg[g][i];
    EXPECT(at::allclose(gx, want, 1e-12, 1e-12));
    EXPECT(at::allclose(gb, go.sum({0, 1}), 1e-12, 1e-12));
    EXPECT(gw.sizes() == at::IntArrayRef({2 * d, h}));
  }
  // Errors name the argument.
  EXPECT_THROWS_WITH(graph_conv(x, nbr, w.narrow(0, 0, d), w.narrow(0, d, d), b, "min", false, false), "aggr");
  EXPECT_THROWS_WITH(graph_conv(x, nbr + N, w.narrow(0, 0, d), w.narrow(0, d, d), b, "max", false, false),
                     "nbr entries must lie in");
  EXPECT_THROWS_WITH(graph_conv(x, nbr, w, w, b, "max", false, false), "w_root must have shape");
  if (exgramed_test::failures == 0) std::cout << "test_graph_conv: all checks passed\n";
  return exgramed_test::failures == 0 ? 0 : 1;
}
