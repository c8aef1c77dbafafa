// knn_graph, CPU kernel: GEMM candidates + exact fp64 refinement (see knn_graph.h),
// rows in parallel, partial selection by insertion into a C-slot buffer (never a sort
// of the whole row).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "knn_graph.h"

namespace exgramed {
namespace {

// Insert (d, j) into the ascending buffer (dist, idx) of current size n <= cap, ordered
// lexicographically by (distance, index). Returns the new size.
template <typename T>
inline int64_t insert_sorted(T* dist, int64_t* idx, int64_t n, int64_t cap, T d, int64_t j) {
  if (n == cap && !(d < dist[n - 1] || (d == dist[n - 1] && j < idx[n - 1]))) return n;
  int64_t p = n < cap ? n : cap - 1;
  while (p > 0 && (d < dist[p - 1] || (d == dist[p - 1] && j < idx[p - 1]))) {
    dist[p] = dist[p - 1];
    idx[p] = idx[p - 1];
    --p;
  }
  dist[p] = d;
  idx[p] = j;
  return n < cap ? n + 1 : n;
}

template <typename scalar_t>
double exact_distance(const scalar_t* a, const scalar_t* b, int64_t d, KnnMetric metric, double na, double nb) {
  double acc = 0.0;
  if (metric == KnnMetric::L2) {
    for (int64_t t = 0; t < d; ++t) {
      const double diff = static_cast<double>(a[t]) - static_cast<double>(b[t]);
      acc += diff * diff;
    }
    return acc;
  }
  if (na == 0.0 || nb == 0.0) return 1.0;
  for (int64_t t = 0; t < d; ++t) acc += static_cast<double>(a[t]) * static_cast<double>(b[t]);
  return 1.0 - acc / (na * nb);
}

template <typename scalar_t, typename acc_t>
void knn_rows(const scalar_t* x, const double* norms, const acc_t* gram, const acc_t* sq, int64_t N, int64_t d,
              int64_t k, KnnMetric metric, int64_t row0, int64_t nrows, int64_t* out) {
  const int64_t C = knn_num_candidates(k, N);
  at::parallel_for(0, nrows, 1, [&](int64_t r_begin, int64_t r_end) {
    std::vector<acc_t> cd(C);
    std::vector<int64_t> ci(C);
    std::vector<double> ed(C);
    std::vector<int64_t> ei(C);
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t i = row0 + r;
      const acc_t* g = gram + r * N;
      int64_t n = 0;
      for (int64_t j = 0; j < N; ++j) {
        if (j == i) continue;
        const acc_t dist = metric == KnnMetric::L2 ? sq[i] + sq[j] - 2 * g[j] : acc_t(1) - g[j];
        n = insert_sorted(cd.data(), ci.data(), n, C, dist, j);
      }
      int64_t m = 0;
      for (int64_t c = 0; c < n; ++c) {
        const int64_t j = ci[c];
        const double e = exact_distance(x + i * d, x + j * d, d, metric, norms[i], norms[j]);
        m = insert_sorted(ed.data(), ei.data(), m, n, e, j);
      }
      for (int64_t s = 0; s < k; ++s) out[i * k + s] = ei[s];
    }
  });
}

at::Tensor knn_graph_cpu(const at::Tensor& x_in, int64_t k, c10::string_view metric_name) {
  const KnnMetric metric = parse_knn_metric(std::string_view(metric_name.data(), metric_name.size()));
  TORCH_CHECK(x_in.device().is_cpu(), "knn_graph: x must be a CPU tensor for the CPU kernel");
  check_knn_args(x_in, k);
  const int64_t G = x_in.size(0), N = x_in.size(1), d = x_in.size(2);
  at::Tensor out = at::empty({G, N, k}, x_in.options().dtype(at::kLong));
  if (G == 0) return out;
  const at::Tensor x = x_in.contiguous();
  const KnnGramInputs in = knn_gram_inputs(x, metric);
  // fp64 norms of the original rows, for the exact cosine refinement.
  const at::Tensor norms = x.to(at::kDouble).norm(2, {-1}).contiguous();
  // Row blocks bound the Gram buffer to ~2^22 entries per GEMM.
  const int64_t R = std::max<int64_t>(1, std::min<int64_t>(N, (int64_t(1) << 22) / N));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "knn_graph_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    for (int64_t gi = 0; gi < G; ++gi) {
      const at::Tensor xg = in.xc[gi];
      for (int64_t r0 = 0; r0 < N; r0 += R) {
        const int64_t nr = std::min(R, N - r0);
        const at::Tensor gram = at::matmul(xg.narrow(0, r0, nr), xg.t()).contiguous();
        knn_rows<scalar_t, acc_t>(x.data_ptr<scalar_t>() + gi * N * d, norms.data_ptr<double>() + gi * N,
                                  gram.data_ptr<acc_t>(), in.sq.data_ptr<acc_t>() + gi * N, N, d, k, metric, r0,
                                  nr, out.data_ptr<int64_t>() + gi * N * k);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(exgramed, CPU, m) { m.impl("knn_graph", &knn_graph_cpu); }

}  // namespace exgramed
