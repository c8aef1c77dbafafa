// edge_pair_indicator_sparse, CPU: the non-zero entries of sum_t weights[t, g] * P(Z_t)[g],
// P(Z)[e, f] = Z_ia Z_jb for edge e = (i, j) of graph 1 and f = (a, b) of graph 2 -- qap_solve's dL/dQ in
// its estimators' backward. A matching has at most N k such entries per problem (edge e pairs only with the
// out-edges of a = Z(i) that end at b = Z(j)), so the result is built per edge from O(T k) candidates --
// coalesced (sorted by (g, e, f), duplicates summed in term order, zero sums dropped). Its consumer is
// pair_scores_backward_sparse.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "checks.h"

namespace exgramed {
namespace {

void check_tables(const at::Tensor& nbr1, const at::Tensor& nbr2, const char* op) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>(nbr1, "nbr1"), {nbr2, "nbr2"}}) {
    TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 3, op, ": ", name, " must be int64 [G, N, k], got ",
                t.scalar_type(), " ", t.sizes());
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the CPU kernel");
  }
  TORCH_CHECK(nbr1.sizes() == nbr2.sizes(), op, ": nbr1 and nbr2 must have the same shape, got ", nbr1.sizes(),
              " and ", nbr2.sizes());
  const int64_t N = nbr1.size(1);
  for (const at::Tensor& t : {nbr1, nbr2}) {
    if (t.numel() > 0) {
      TORCH_CHECK(t.min().item<int64_t>() >= 0 && t.max().item<int64_t>() < N, op,
                  ": nbr1 and nbr2 entries must lie in [0, ", N, ")");
    }
  }
}

// The column of each row of Z [G, N, N] (0/1 matchings): the first index of the row's maximum if that is
// > 0, else -1 (an empty row). The maximum in a branch-free pass (it vectorises), then its first index.
template <typename scalar_t>
void matching_rows(const scalar_t* Z, int64_t rows, int64_t N, int64_t* perm) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* z = Z + r * N;
    scalar_t top = z[0];
    for (int64_t c = 1; c < N; ++c) top = z[c] > top ? z[c] : top;
    int64_t best = 0;
    while (best + 1 < N && !(z[best] == top)) ++best;
    perm[r] = top > scalar_t(0) ? best : -1;
  }
}

std::tuple<at::Tensor, at::Tensor> edge_pair_indicator_sparse_cpu(at::TensorList Z, const at::Tensor& weights,
                                                                  const at::Tensor& nbr1, const at::Tensor& nbr2) {
  constexpr const char* op = "edge_pair_indicator_sparse";
  check_tables(nbr1, nbr2, op);
  const int64_t G = nbr1.size(0), N = nbr1.size(1), k = nbr1.size(2), Nk = N * k, T = Z.size();
  check_float(weights, "edge_pair_indicator_sparse: weights");
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == T && weights.size(1) == G, op,
              ": weights must have shape [T, G] = [", T, ", ", G, "] (one row per matching), got ", weights.sizes());
  TORCH_CHECK(weights.device().is_cpu(), op, ": weights must be a CPU tensor for the CPU kernel");
  check_finite(weights, "edge_pair_indicator_sparse: weights");
  std::vector<int64_t> perm(T * G * N);
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor& z = Z[t];
    check_float(z, "edge_pair_indicator_sparse: Z");
    TORCH_CHECK(z.dim() == 3 && z.size(0) == G && z.size(1) == N && z.size(2) == N, op, ": Z[", t,
                "] must have shape [G, N, N] = [", G, ", ", N, ", ", N, "], got ", z.sizes());
    TORCH_CHECK(z.device().is_cpu(), op, ": Z[", t, "] must be a CPU tensor for the CPU kernel");
    const at::Tensor zc = z.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "edge_pair_indicator_sparse", [&] {
      matching_rows(zc.data_ptr<scalar_t>(), G * N, N, perm.data() + t * G * N);
    });
  }
  const at::Tensor wd = weights.to(at::kDouble).contiguous();
  const double* w = wd.data_ptr<double>();
  const at::Tensor n1 = nbr1.contiguous(), n2 = nbr2.contiguous();
  const int64_t* t1 = n1.data_ptr<int64_t>();
  const int64_t* t2 = n2.data_ptr<int64_t>();
  std::vector<int64_t> ge, ff;  // (g * Nk + e) and f of each entry, in order
  std::vector<double> vals;
  std::vector<std::pair<int64_t, double>> cand;  // one edge's candidates (f, weight)
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t e = 0; e < Nk; ++e) {
      const int64_t i = e / k, j = t1[g * Nk + e];
      cand.clear();
      for (int64_t t = 0; t < T; ++t) {
        const int64_t* p = perm.data() + (t * G + g) * N;
        const int64_t a = p[i], b = p[j];
        if (a < 0 || b < 0) continue;
        for (int64_t s = 0; s < k; ++s) {
          if (t2[g * Nk + a * k + s] == b) cand.emplace_back(a * k + s, w[t * G + g]);
        }
      }
      // Sort by f, stable: duplicates keep the terms' order for their sum.
      std::stable_sort(cand.begin(), cand.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
      for (size_t c = 0; c < cand.size();) {
        double s = 0.0;
        size_t d = c;
        for (; d < cand.size() && cand[d].first == cand[c].first; ++d) s += cand[d].second;
        if (s != 0.0) {
          ge.push_back(g * Nk + e);
          ff.push_back(cand[c].first);
          vals.push_back(s);
        }
        c = d;
      }
    }
  }
  const int64_t nnz = static_cast<int64_t>(vals.size());
  at::Tensor indices = at::empty({3, nnz}, nbr1.options());
  int64_t* ip = indices.data_ptr<int64_t>();
  for (int64_t x = 0; x < nnz; ++x) {
    ip[x] = ge[x] / Nk;
    ip[nnz + x] = ge[x] % Nk;
    ip[2 * nnz + x] = ff[x];
  }
  at::Tensor values = at::from_blob(vals.data(), {nnz}, at::TensorOptions().dtype(at::kDouble))
                          .to(weights.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  return {indices, values};
}

}  // namespace

TORCH_LIBRARY_IMPL(exgramed, CPU, m) { m.impl("edge_pair_indicator_sparse", &edge_pair_indicator_sparse_cpu); }

}  // namespace exgramed
