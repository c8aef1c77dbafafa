// knn_graph: what the CPU and CUDA kernels share.
//
// The input is first scaled by an exact power of two, per graph for l2 and per row for cosine, so that
// its largest entry lies in [1/2, 1) (knn_scaled_input): distances within a graph then all scale by the
// same factor (l2) or not at all (cosine), so the neighbours are those of the input, and no square or
// Gram entry overflows or underflows, whatever the input's magnitude (fp32 squares overflow above
// |x| ~ 1.8e19 and underflow below ~1e-19).
// Both backends rank candidates by Gram-form distances of the scaled input in the compute dtype (fp32
// for fp16/bf16/fp32 inputs, fp64 for fp64) from the platform GEMM:
//     l2:     D_ij = |x_i|^2 + |x_j|^2 - 2 <x_i, x_j>
//     cosine: D_ij = 1 - <x_i/|x_i|, x_j/|x_j|>      (a zero vector has cosine 0 to all: D = 1)
// keeping the C = min(N-1, k + kKnnSlack) smallest (self excluded), then settle the order
// in fp64 from the scaled input in fp64 (exact: a power-of-two multiple of the input): the CPU kernel
// re-ranks only the runs of candidates whose Gram distances lie within the GEMM rounding bound
// (d+4) eps (|x_i|^2 + |x_j|^2), plus the underflow of rows far smaller than their graph's largest, of
// each other, the CUDA kernel re-ranks all C. Ties are broken by the
// lower index. The result is the exact fp64 kNN unless more than kKnnSlack points lie within that
// rounding bound of the k-th distance; then a neighbour may be swapped for an equally distant (to GEMM
// precision) one.
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

// x * 2^-e in float64, with e the exponent of the largest |x| of each graph (l2: the distances of a graph
// all scale by 2^-2e) or of each row (cosine: scale-free), so that every such largest entry lies in
// [1/2, 1). A product by a power of two is exact (for float64 input, unless an entry lies some 2^1000
// below its graph's largest), so the exact re-ranking sees the input's distances times one power of two
// per graph (l2) or the input's own (cosine): the same order and the same ties. Also the NaN/Inf check of x, from the same reduction (a NaN or Inf entry makes
// its graph's or row's maximum NaN or Inf): one device->host sync on CUDA.
inline at::Tensor knn_scaled_input(const at::Tensor& x, KnnMetric metric) {
  const at::Tensor amax =
      (metric == KnnMetric::L2 ? at::amax(x.abs(), {1, 2}, true) : at::amax(x.abs(), {2}, true)).to(at::kDouble);
  TORCH_CHECK(all_finite(amax), "knn_graph: x contains NaN or Inf");
  // amax = m 2^e with m in [1/2, 1) (e = 0 for amax = 0), clamped so that 2^-e is a normal float64:
  // float64 has 1023 - (-e) as its biased exponent bits and zeros as its mantissa.
  const at::Tensor e = std::get<1>(at::frexp(amax)).to(at::kLong).clamp(-1023, 1022);
  const at::Tensor scale = ((1023 - e) * (int64_t(1) << 52)).view(at::kDouble);
  return (x.to(at::kDouble) * scale).contiguous();
}

// The compute-dtype copy the Gram matrix is taken from: rows normalised for cosine
// (zero rows stay zero), and the squared norms for l2 (zeros for cosine, unused).
struct KnnGramInputs {
  at::Tensor xc;  // [G, N, d] contiguous, float32 or float64
  at::Tensor sq;  // [G, N]
};

// `xs`: knn_scaled_input's [G, N, d] float64; `sq64`: its [G, N] squared row norms in float64, however
// the backend computes them; `dtype`: the compute dtype.
inline KnnGramInputs knn_gram_inputs(const at::Tensor& xs, KnnMetric metric, const at::Tensor& sq64,
                                     at::ScalarType dtype) {
  if (metric == KnnMetric::Cosine) {
    const at::Tensor norm = sq64.sqrt().unsqueeze(-1);
    const at::Tensor xn = xs * at::where(norm > 0, norm.reciprocal(), at::zeros_like(norm));
    return {xn.to(dtype).contiguous(), at::zeros(sq64.sizes(), sq64.options().dtype(dtype))};
  }
  return {xs.to(dtype).contiguous(), sq64.to(dtype).contiguous()};
}

}  // namespace exgramed
