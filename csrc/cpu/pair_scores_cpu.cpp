// pair_scores, CPU: one task per (problem, row e); the row's noise is generated into a buffer
// (vectorised hash + log), then the row is assembled from four gathers of C. The backward scans
// the incoming gradient once per problem and skips its zeros: the estimators' gradient has at
// most 2 N k non-zeros per problem, so the scan is the cost; pair_scores_backward_sparse takes those
// entries as a list instead.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "buffer_pool.h"
#include "multiversion.h"
#include "pair_scores.h"
#include "row_reductions.h"

namespace exgramed {
namespace {

EXGRAMED_MULTIVERSION void gumbel_row(float* out, int64_t n, uint32_t lo, uint32_t hi) {
  for (int64_t f = 0; f < n; ++f) out[f] = gumbel_at(static_cast<uint32_t>(f), lo, hi);
}

// One row of scores, flat over f with int32 index tables (vectorises with gathers):
// row[f] = we w2[f] (D[a(f)] - D[b(f)]) + be (+ ns n[f]), D = C_i. - C_j. of the row's edge (i, j).
template <typename scalar_t, typename noise_t>
inline void assemble_row(scalar_t* row, const scalar_t* D, const int32_t* a_of, const int32_t* b_of,
                         const scalar_t* w2r, scalar_t we, scalar_t be, const noise_t* noise, scalar_t ns, int64_t Nk) {
  if (noise == nullptr) {
    for (int64_t f = 0; f < Nk; ++f) row[f] = we * w2r[f] * (D[a_of[f]] - D[b_of[f]]) + be;
  } else {
    for (int64_t f = 0; f < Nk; ++f) {
      const scalar_t v = we * w2r[f] * (D[a_of[f]] - D[b_of[f]]) + be;
      row[f] = v + ns * static_cast<scalar_t>(noise[f]);
    }
  }
}

EXGRAMED_MULTIVERSION void assemble_row_f32(float* row, const float* D, const int32_t* a_of, const int32_t* b_of,
                                            const float* w2r, float we, float be, const float* noise, float ns,
                                            int64_t Nk) {
  assemble_row<float, float>(row, D, a_of, b_of, w2r, we, be, noise, ns, Nk);
}

EXGRAMED_MULTIVERSION void assemble_row_f64(double* row, const double* D, const int32_t* a_of, const int32_t* b_of,
                                            const double* w2r, double we, double be, const float* gumbel,
                                            const double* noise, double ns, int64_t Nk) {
  if (gumbel != nullptr) {
    assemble_row<double, float>(row, D, a_of, b_of, w2r, we, be, gumbel, ns, Nk);
  } else {
    assemble_row<double, double>(row, D, a_of, b_of, w2r, we, be, noise, ns, Nk);
  }
}

inline void assemble(float* row, const float* D, const int32_t* a_of, const int32_t* b_of, const float* w2r,
                     float we, float be, const float* gumbel, const float* noise, float ns, int64_t Nk) {
  assemble_row_f32(row, D, a_of, b_of, w2r, we, be, gumbel != nullptr ? gumbel : noise, ns, Nk);
}

inline void assemble(double* row, const double* D, const int32_t* a_of, const int32_t* b_of, const double* w2r,
                     double we, double be, const float* gumbel, const double* noise, double ns, int64_t Nk) {
  assemble_row_f64(row, D, a_of, b_of, w2r, we, be, gumbel, noise, ns, Nk);
}

at::Tensor pair_scores_cpu(const at::Tensor& C, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& nbr1,
                           const at::Tensor& nbr2, double alpha, double beta, const c10::optional<at::Tensor>& noise,
                           double noise_scale, const c10::optional<at::Tensor>& noise_seed) {
  TORCH_CHECK(C.device().is_cpu(), "pair_scores: C must be a CPU tensor for the CPU kernel");
  const PairScoresArgs a = check_pair_scores_args(C, w1, w2, nbr1, nbr2, noise, noise_seed, "pair_scores");
  const int64_t P = a.P, N = a.N, k = a.k, Nk = a.Nk;
  const at::ScalarType ct = compute_dtype(C.scalar_type());
  at::Tensor out = empty_reused({P, Nk, Nk}, C.options().dtype(ct));  // every element is written below
  if (out.numel() == 0) return out.to(C.scalar_type());
  const at::Tensor Cc = C.to(ct).contiguous(), w1c = w1.to(ct).contiguous(), w2c = w2.to(ct).contiguous();
  const at::Tensor t1 = nbr1.contiguous(), t2 = nbr2.contiguous();
  const at::Tensor nz = a.has_noise ? noise->to(ct).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(ct, "pair_scores_cpu", [&] {
    const scalar_t* Cp = Cc.data_ptr<scalar_t>();
    const scalar_t* w1p = w1c.data_ptr<scalar_t>();
    const scalar_t* w2p = w2c.data_ptr<scalar_t>();
    const int64_t* t1p = t1.data_ptr<int64_t>();
    const int64_t* t2p = t2.data_ptr<int64_t>();
    const scalar_t* np = a.has_noise ? nz.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t al = static_cast<scalar_t>(alpha), be = static_cast<scalar_t>(beta);
    const scalar_t ns = static_cast<scalar_t>(noise_scale);
    // Per problem: f -> a = f / k and f -> b = nbr2[p, f] as int32 tables (N k < 2^31, checked).
    std::vector<int32_t> a_of(Nk), b_tab(P * Nk);
    for (int64_t f = 0; f < Nk; ++f) a_of[f] = static_cast<int32_t>(f / k);
    for (int64_t x = 0; x < P * Nk; ++x) b_tab[x] = static_cast<int32_t>(t2p[x]);
    const int64_t* seeds = a.has_seed ? a.seeds.data_ptr<int64_t>() : nullptr;
    at::parallel_for(0, P * Nk, 8, [&](int64_t r0, int64_t r1) {
      std::vector<float> g(a.has_seed ? Nk : 0);
      std::vector<scalar_t> D(N);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t p = r / Nk, e = r % Nk;
        const scalar_t* Ci = Cp + (p * N + e / k) * N;
        const scalar_t* Cj = Cp + (p * N + t1p[r]) * N;
        // (C_ia - C_ib) - (C_ja - C_jb) = D_a - D_b with D = C_i. - C_j. (one row difference per e)
        for (int64_t x = 0; x < N; ++x) D[x] = Ci[x] - Cj[x];
        const float* gumbel = nullptr;
        if (a.has_seed) {
          uint32_t lo, hi;
          noise_row_keys(seeds[p], e, lo, hi);
          gumbel_row(g.data(), Nk, lo, hi);
          gumbel = g.data();
        }
        assemble(op + r * Nk, D.data(), a_of.data(), b_tab.data() + p * Nk, w2p + p * Nk, al * w1p[r], be, gumbel,
                 np != nullptr ? np + r * Nk : nullptr, ns, Nk);
      }
    });
  });
  return out.to(C.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_scores_backward_cpu(const at::Tensor& grad, const at::Tensor& C,
                                                                        const at::Tensor& w1, const at::Tensor& w2,
                                                                        const at::Tensor& nbr1, const at::Tensor& nbr2,
                                                                        double alpha) {
  TORCH_CHECK(C.device().is_cpu(), "pair_scores_backward: C must be a CPU tensor for the CPU kernel");
  const PairScoresArgs a = check_pair_scores_backward_args(grad, C, w1, w2, nbr1, nbr2);
  const int64_t P = a.P, N = a.N, k = a.k, Nk = a.Nk;
  at::Tensor gC = at::zeros({P, N, N}, C.options().dtype(at::kDouble));
  at::Tensor gw1 = at::zeros({P, Nk}, C.options().dtype(at::kDouble));
  at::Tensor gw2 = at::zeros({P, Nk}, C.options().dtype(at::kDouble));
  if (P * Nk == 0) return {gC.to(C.scalar_type()), gw1.to(C.scalar_type()), gw2.to(C.scalar_type())};
  const at::ScalarType ct = compute_dtype(C.scalar_type());
  const at::Tensor g = grad.to(ct).contiguous();
  const at::Tensor Cc = C.to(ct).contiguous(), w1c = w1.to(ct).contiguous(), w2c = w2.to(ct).contiguous();
  const at::Tensor t1 = nbr1.contiguous(), t2 = nbr2.contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "pair_scores_backward_cpu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* Cp = Cc.data_ptr<scalar_t>();
    const scalar_t* w1p = w1c.data_ptr<scalar_t>();
    const scalar_t* w2p = w2c.data_ptr<scalar_t>();
    const int64_t* t1p = t1.data_ptr<int64_t>();
    const int64_t* t2p = t2.data_ptr<int64_t>();
    double* gCp = gC.data_ptr<double>();
    double* gw1p = gw1.data_ptr<double>();
    double* gw2p = gw2.data_ptr<double>();
    // One task per problem: each accumulates into its own slices, in a fixed order (deterministic).
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* Cq = Cp + p * N * N;
        double* gCq = gCp + p * N * N;
        const scalar_t* w2r = w2p + p * Nk;
        const int64_t* b_of = t2p + p * Nk;
        for (int64_t e = 0; e < Nk; ++e) {
          const int64_t r = p * Nk + e, i = e / k, j = t1p[r];
          const scalar_t* grow = gp + r * Nk;
          const double we = static_cast<double>(w1p[r]);
          double acc_w1 = 0.0;
          for (int64_t f = 0; f < Nk; ++f) {
            const double gv = static_cast<double>(grow[f]);
            if (gv == 0.0) continue;
            acc_w1 += pair_scores_grad_entry(Cq, N, i, j, f / k, b_of[f], gv, we, static_cast<double>(w2r[f]), alpha,
                                             gCq, gw2p[p * Nk + f]);
          }
          gw1p[r] += alpha * acc_w1;
        }
      }
    });
  });
  return {gC.to(C.scalar_type()), gw1.to(C.scalar_type()), gw2.to(C.scalar_type())};
}

// pair_scores_backward for a gradient given by its entries (a COO tensor's indices and values, e.g.
// edge_pair_indicator_sparse's): visits the entries only, float64 accumulation in their order.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_scores_backward_sparse_cpu(
    const at::Tensor& indices, const at::Tensor& values, const at::Tensor& C, const at::Tensor& w1,
    const at::Tensor& w2, const at::Tensor& nbr1, const at::Tensor& nbr2, double alpha) {
  constexpr const char* op = "pair_scores_backward_sparse";
  TORCH_CHECK(C.device().is_cpu(), op, ": C must be a CPU tensor for the CPU kernel");
  const PairScoresArgs a =
      check_pair_scores_args(C, w1, w2, nbr1, nbr2, c10::nullopt, c10::nullopt, op, /*check_values=*/false);
  const int64_t P = a.P, N = a.N, k = a.k, Nk = a.Nk;
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 2 && indices.size(0) == 3, op,
              ": indices must be int64 [3, nnz] (problem, row e, column f), got ", indices.scalar_type(), " ",
              indices.sizes());
  const int64_t nnz = indices.size(1);
  check_float(values, "pair_scores_backward_sparse: values");
  TORCH_CHECK(values.dim() == 1 && values.size(0) == nnz, op, ": values must have shape [nnz] = [", nnz, "], got ",
              values.sizes());
  check_same_device(indices, "indices", C, "C");
  check_same_device(values, "values", C, "C");
  check_finite(values, "pair_scores_backward_sparse: values");
  const at::Tensor ic = indices.contiguous();
  const int64_t* ip = ic.data_ptr<int64_t>();
  for (int64_t x = 0; x < nnz; ++x) {
    TORCH_CHECK(ip[x] >= 0 && ip[x] < P && ip[nnz + x] >= 0 && ip[nnz + x] < Nk && ip[2 * nnz + x] >= 0 &&
                    ip[2 * nnz + x] < Nk,
                op, ": index (", ip[x], ", ", ip[nnz + x], ", ", ip[2 * nnz + x], ") is outside [", P, ", ", Nk,
                ", ", Nk, "]");
  }
  at::Tensor gC = at::zeros({P, N, N}, C.options().dtype(at::kDouble));
  at::Tensor gw1 = at::zeros({P, Nk}, C.options().dtype(at::kDouble));
  at::Tensor gw2 = at::zeros({P, Nk}, C.options().dtype(at::kDouble));
  const at::Tensor vd = values.to(at::kDouble).contiguous();
  const double* vp = vd.data_ptr<double>();
  const at::ScalarType ct = compute_dtype(C.scalar_type());
  const at::Tensor Cc = C.to(ct).contiguous(), w1c = w1.to(ct).contiguous(), w2c = w2.to(ct).contiguous();
  const at::Tensor n1 = nbr1.contiguous(), n2 = nbr2.contiguous();
  const int64_t* t1 = n1.data_ptr<int64_t>();
  const int64_t* t2 = n2.data_ptr<int64_t>();
  double* gCp = gC.data_ptr<double>();
  double* gw1p = gw1.data_ptr<double>();
  double* gw2p = gw2.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(ct, "pair_scores_backward_sparse_cpu", [&] {
    const scalar_t* Cp = Cc.data_ptr<scalar_t>();
    const scalar_t* w1p = w1c.data_ptr<scalar_t>();
    const scalar_t* w2p = w2c.data_ptr<scalar_t>();
    // The dense kernel's step (pair_scores.h), entry by entry.
    for (int64_t x = 0; x < nnz; ++x) {
      const int64_t p = ip[x], e = ip[nnz + x], f = ip[2 * nnz + x];
      gw1p[p * Nk + e] += alpha * pair_scores_grad_entry(Cp + p * N * N, N, e / k, t1[p * Nk + e], f / k,
                                                         t2[p * Nk + f], vp[x], static_cast<double>(w1p[p * Nk + e]),
                                                         static_cast<double>(w2p[p * Nk + f]), alpha,
                                                         gCp + p * N * N, gw2p[p * Nk + f]);
    }
  });
  return {gC.to(C.scalar_type()), gw1.to(C.scalar_type()), gw2.to(C.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(exgramed, CPU, m) {
  m.impl("pair_scores", &pair_scores_cpu);
  m.impl("pair_scores_backward", &pair_scores_backward_cpu);
  m.impl("pair_scores_backward_sparse", &pair_scores_backward_sparse_cpu);
}

}  // namespace exgramed
