// knn_graph, CPU kernel: GEMM candidates + exact fp64 refinement of the scaled input (knn_graph.h),
// rows in parallel, partial selection by insertion into a C-slot buffer (never a sort
// of the whole row).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "multiversion.h"
#include "row_reductions.h"
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

// `xs`: the scaled input in float64 (knn_scaled_input); `norms` its float64 row norms.
double exact_distance(const double* a, const double* b, int64_t d, KnnMetric metric, double na, double nb) {
  if (metric == KnnMetric::Cosine) return (na == 0.0 || nb == 0.0) ? 1.0 : 1.0 - dot_f64(a, b, d) / (na * nb);
  return sq_dist_f64(a, b, d);
}

// Rows q in [q0, q0 + nrows) of the flattened [G*N] node list; gram row q is gram + (q - q0) * N.
template <typename acc_t>
void knn_rows(const double* xs, const double* norms, const acc_t* gram, const acc_t* sq, int64_t N, int64_t d,
              int64_t k, KnnMetric metric, int64_t q0, int64_t nrows, int64_t* out) {
  const int64_t C = knn_num_candidates(k, N);
  // Rounding bound of a Gram-form distance: |err| <= gamma * (|x_i|^2 + |x_j|^2) + tiny, tiny the
  // absolute error of the products and sums that fall below the normal range (rows far smaller than
  // their graph's largest).
  const double gamma = (d + 4) * std::numeric_limits<acc_t>::epsilon();
  const double tiny = 4.0 * (d + 4) * static_cast<double>(std::numeric_limits<acc_t>::denorm_min());
  at::parallel_for(0, nrows, 16, [&](int64_t r_begin, int64_t r_end) {
    std::vector<acc_t> cd(C);
    std::vector<int64_t> ci(C);
    std::vector<double> ed(C);
    std::vector<int64_t> ei(C);
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t q = q0 + r, g = q / N, i = q % N;
      const acc_t* grow = gram + r * N;
      const acc_t* sqg = sq + g * N;
      int64_t n = 0;
      for (int64_t j = 0; j < N; ++j) {
        if (j == i) continue;
        const acc_t dist = metric == KnnMetric::L2 ? sqg[i] + sqg[j] - 2 * grow[j] : acc_t(1) - grow[j];
        n = insert_sorted(cd.data(), ci.data(), n, C, dist, j);
      }
      // Candidates whose Gram distances lie within twice the rounding bound of each other
      // form a group whose order is uncertain; groups are ordered with certainty. Re-rank
      // just the groups that reach into the first k, by exact fp64 distance.
      double sq_max = 0.0;
      for (int64_t c = 0; c < n; ++c) sq_max = std::max<double>(sq_max, sqg[ci[c]]);
      const double bound = 2.0 * (gamma * (metric == KnnMetric::L2 ? sqg[i] + sq_max : 2.0) + tiny);
      const double* xg = xs + g * N * d;
      const double* ng = norms + g * N;
      for (int64_t start = 0; start < k;) {
        int64_t end = start + 1;
        while (end < n && static_cast<double>(cd[end]) - static_cast<double>(cd[end - 1]) <= bound) ++end;
        if (end - start > 1) {
          int64_t m = 0;
          for (int64_t c = start; c < end; ++c) {
            const int64_t j = ci[c];
            const double e = exact_distance(xg + i * d, xg + j * d, d, metric, ng[i], ng[j]);
            m = insert_sorted(ed.data(), ei.data(), m, end - start, e, j);
          }
          for (int64_t c = start; c < end; ++c) ci[c] = ei[c - start];
        }
        start = end;
      }
      int64_t* o = out + q * k;
      for (int64_t s = 0; s < k; ++s) o[s] = ci[s];
    }
  });
}

at::Tensor knn_graph_cpu(const at::Tensor& x, int64_t k, c10::string_view metric_name) {
  const KnnMetric metric = parse_knn_metric(std::string_view(metric_name.data(), metric_name.size()));
  TORCH_CHECK(x.device().is_cpu(), "knn_graph: x must be a CPU tensor for the CPU kernel");
  check_knn_args(x, k, /*check_values=*/false);
  const int64_t G = x.size(0), N = x.size(1), d = x.size(2);
  at::Tensor out = at::empty({G, N, k}, x.options().dtype(at::kLong));
  if (G == 0) return out;
  const at::Tensor xs = knn_scaled_input(x, metric);  // also the NaN/Inf check of x
  const double* xs_p = xs.data_ptr<double>();
  // float64 squared row norms (the Gram diagonal, and the exact cosine's denominators).
  at::Tensor sq64 = at::empty({G, N}, xs.options());
  double* sp = sq64.data_ptr<double>();
  at::parallel_for(0, G * N, 64, [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) sp[q] = dot_f64(xs_p + q * d, xs_p + q * d, d);
  });
  const KnnGramInputs in = knn_gram_inputs(xs, metric, sq64, compute_dtype(x.scalar_type()));
  const at::Tensor norms = sq64.sqrt();
  AT_DISPATCH_FLOATING_TYPES(in.xc.scalar_type(), "knn_graph_cpu", [&] {
    using acc_t = scalar_t;
    if (G * N * N <= (int64_t(1) << 22)) {
      // Small problems: one batched GEMM, one parallel loop over all rows of all graphs.
      const at::Tensor gram = at::bmm(in.xc, in.xc.transpose(1, 2)).contiguous();
      knn_rows<acc_t>(xs_p, norms.data_ptr<double>(), gram.data_ptr<acc_t>(), in.sq.data_ptr<acc_t>(), N, d, k,
                      metric, 0, G * N, out.data_ptr<int64_t>());
      return;
    }
    // Large problems: row blocks of one graph bound the Gram buffer to ~2^22 entries.
    const int64_t R = std::max<int64_t>(1, std::min<int64_t>(N, (int64_t(1) << 22) / N));
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t r0 = 0; r0 < N; r0 += R) {
        const int64_t nr = std::min(R, N - r0);
        const at::Tensor gram = at::matmul(in.xc[g].narrow(0, r0, nr), in.xc[g].t()).contiguous();
        knn_rows<acc_t>(xs_p, norms.data_ptr<double>(), gram.data_ptr<acc_t>(), in.sq.data_ptr<acc_t>(), N, d, k,
                        metric, g * N + r0, nr, out.data_ptr<int64_t>());
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(exgramed, CPU, m) { m.impl("knn_graph", &knn_graph_cpu); }

}  // namespace exgramed
