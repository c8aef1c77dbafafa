// knn_graph: what the CPU and CUDA kernels share.
//
// Both backends rank candidates by Gram-form distances in the compute dtype (fp32 for
// fp16/bf16/fp32 inputs, fp64 for fp64) from the platform GEMM:
//     l2:     D_ij = |x_i|^2 + |x_j|^2 - 2 <x_i, x_j>
//     cosine: D_ij = 1 - <x_i/|x_i|, x_j/|x_j|>      (a zero vector has cosine 0 to all: D = 1)
// keeping the C = min(N-1, k + kKnnSlack) smallest (self excluded), then settle the order
// in fp64 from the original input: the CPU kernel re-ranks only the runs of candidates whose
// Gram distances lie within the GEMM rounding bound (d+4) eps (|x_i|^2 + |x_j|^2) of each
// other, the CUDA kernel re-ranks all C. Ties are broken by the lower index. The result is
// the exact fp64 kNN unless more than kKnnSlack points lie within that rounding bound of the
// k-th distance; then a neighbour may be swapped for an equally distant (to GEMM precision) one.
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

// check_values=false: the caller checks finiteness itself (fused into another pass).
inline void check_knn_args(const at::Tensor& x, int64_t k, bool check_values = true) {
  check_dim(x, 3, "knn_graph: x", "[G, N, d]");
  check_float(x, "knn_graph: x");
  const int64_t N = x.size(1);
  TORCH_CHECK(N >= 2, "knn_graph: x must have at least 2 nodes per graph (N >= 2), got N = ", N);
  TORCH_CHECK(k >= 1 && k < N, "knn_graph: k must satisfy 1 <= k < N (N = ", N, "), got k = ", k);
  TORCH_CHECK(x.size(2) >= 1, "knn_graph: x must have at least one feature (d >= 1)");
  if (check_values) check_finite(x, "knn_graph: x");
}

inline int64_t knn_num_candidates(int64_t k, int64_t N) { return std::min<int64_t>(N - 1, k + kKnnSlack); }

// The compute-dtype copy the Gram matrix is taken from: rows normalised for cosine
// (zero rows stay zero), and the squared norms for l2 (zeros for cosine, unused).
struct KnnGramInputs {
  at::Tensor xc;  // [G, N, d] contiguous, float32 or float64
  at::Tensor sq;  // [G, N]
};

inline at::ScalarType knn_compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// `sq_norms`: [G, N] squared row norms of x in the compute dtype, however the backend computes them.
inline KnnGramInputs knn_gram_inputs(const at::Tensor& x, KnnMetric metric, const at::Tensor& sq_norms) {
  at::Tensor xc = x.to(knn_compute_dtype(x)).contiguous();
  if (metric == KnnMetric::Cosine) {
    const at::Tensor norm = sq_norms.sqrt().unsqueeze(-1);
    xc = (xc * at::where(norm > 0, norm.reciprocal(), at::zeros_like(norm))).contiguous();
    return {xc, at::zeros_like(sq_norms)};
  }
  return {xc, sq_norms.contiguous()};
}

}  // namespace exgramed
