// knn_graph: what the CPU and CUDA kernels share.
//
// Both backends compute a candidate set per row from the Gram matrix in the compute
// dtype (fp32 for fp16/bf16/fp32 inputs, fp64 for fp64), via the platform GEMM:
//     l2:     D_ij = |x_i|^2 + |x_j|^2 - 2 <x_i, x_j>
//     cosine: D_ij = 1 - <x_i/|x_i|, x_j/|x_j|>      (a zero vector has cosine 0 to all: D = 1)
// keep the C = min(N-1, k + kKnnSlack) smallest (self excluded), then recompute the exact
// distance of those C candidates directly in fp64 from the original input and pick the k
// smallest, ties broken by the lower index. The k neighbours are therefore exact in fp64
// unless more than kKnnSlack other points lie within the GEMM rounding error of the k-th
// distance -- the only case in which a neighbour may be swapped for an equally distant
// (to fp32 GEMM precision) one.
#pragma once
#include <ATen/ATen.h>

#include <string_view>

#include "checks.h"

namespace exgramed {

enum class KnnMetric { L2, Cosine };

constexpr int64_t kKnnSlack = 8;

inline KnnMetric parse_knn_metric(std::string_view metric) {
  if (metric == "l2") return KnnMetric::L2;
  if (metric == "cosine") return KnnMetric::Cosine;
  TORCH_CHECK(false, "knn_graph: metric must be 'l2' or 'cosine', got '", std::string(metric), "'");
}

inline void check_knn_args(const at::Tensor& x, int64_t k) {
  check_dim(x, 3, "knn_graph: x", "[G, N, d]");
  check_float(x, "knn_graph: x");
  const int64_t N = x.size(1);
  TORCH_CHECK(N >= 2, "knn_graph: x must have at least 2 nodes per graph (N >= 2), got N = ", N);
  TORCH_CHECK(k >= 1 && k < N, "knn_graph: k must satisfy 1 <= k < N (N = ", N, "), got k = ", k);
  TORCH_CHECK(x.size(2) >= 1, "knn_graph: x must have at least one feature (d >= 1)");
  check_finite(x, "knn_graph: x");
}

inline int64_t knn_num_candidates(int64_t k, int64_t N) { return std::min<int64_t>(N - 1, k + kKnnSlack); }

// The compute-dtype copy the Gram matrix is taken from: rows normalised for cosine
// (zero rows stay zero), and the squared norms for l2 (zeros for cosine, unused).
struct KnnGramInputs {
  at::Tensor xc;  // [G, N, d] contiguous, float32 or float64
  at::Tensor sq;  // [G, N]
};

inline KnnGramInputs knn_gram_inputs(const at::Tensor& x, KnnMetric metric) {
  const auto ct = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor xc = x.to(ct).contiguous();
  if (metric == KnnMetric::Cosine) {
    at::Tensor norm = xc.norm(2, {-1}, /*keepdim=*/true);
    xc = at::where(norm > 0, xc / norm, at::zeros_like(xc)).contiguous();
    return {xc, at::zeros({x.size(0), x.size(1)}, xc.options())};
  }
  return {xc, (xc * xc).sum(-1).contiguous()};
}

}  // namespace exgramed
