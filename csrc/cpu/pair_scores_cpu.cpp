// pair_scores, CPU: one task per (problem, row e); the row's noise is generated into a buffer
// (vectorised hash + log), then the row is assembled from four gathers of C. The backward scans
// the incoming gradient once per problem and skips its zeros: the estimators' gradient has at
// most 2 N k non-zeros per problem, so the scan is the cost.
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
  at::Tensor out = empty_reused({P, Nk, Nk}, C.options());  // every element is written below
  if (out.numel() == 0) return out;
  const at::Tensor Cc = C.contiguous(), w1c = w1.contiguous(), w2c = w2.contiguous();
  const at::Tensor t1 = nbr1.contiguous(), t2 = nbr2.contiguous();
  const at::Tensor nz = a.has_noise ? noise->to(C.scalar_type()).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "pair_scores_cpu", [&] {
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
          noise_row_keys(a.seed, r, lo, hi);
          gumbel_row(g.data(), Nk, lo, hi);
          gumbel = g.data();
        }
        assemble(op + r * Nk, D.data(), a_of.data(), b_tab.data() + p * Nk, w2p + p * Nk, al * w1p[r], be, gumbel,
                 np != nullptr ? np + r * Nk : nullptr, ns, Nk);
      }
    });
  });
  return out;
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
  const at::Tensor g = grad.to(C.scalar_type()).contiguous();
  const at::Tensor Cc = C.contiguous(), w1c = w1.contiguous(), w2c = w2.contiguous();
  const at::Tensor t1 = nbr1.contiguous(), t2 = nbr2.contiguous();
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "pair_scores_backward_cpu", [&] {
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

// h in float32 / float64 as the kernels read it (half and bfloat16 are computed in float32).
at::Tensor edge_rows(const at::Tensor& h) {
  return (h.scalar_type() == at::kDouble || h.scalar_type() == at::kFloat) ? h.contiguous()
                                                                            : h.to(at::kFloat).contiguous();
}

// One task per node row: its k squared edge lengths, float64 sums in a fixed order (row_reductions.h).
at::Tensor edge_sq_norms_cpu(const at::Tensor& h, const at::Tensor& nbr) {
  TORCH_CHECK(h.device().is_cpu(), "edge_sq_norms: h must be a CPU tensor for the CPU kernel");
  check_edge_sq_norms_args(h, nbr, "edge_sq_norms");
  const int64_t G = h.size(0), N = h.size(1), H = h.size(2), k = nbr.size(2);
  const at::Tensor hc = edge_rows(h), nc = nbr.contiguous();
  at::Tensor out = at::empty({G, N * k}, hc.options());
  if (out.numel() == 0) return out.to(h.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(hc.scalar_type(), "edge_sq_norms_cpu", [&] {
    const scalar_t* hp = hc.data_ptr<scalar_t>();
    const int64_t* np = nc.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, G * N, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* hi = hp + r * H;
        const scalar_t* hg = hp + (r / N) * N * H;
        for (int64_t s = 0; s < k; ++s) {
          op[r * k + s] = static_cast<scalar_t>(sq_dist(hi, hg + np[r * k + s] * H, H));
        }
      }
    });
  });
  return out.to(h.scalar_type());
}

// dh_i += 2 g_e (h_i - h_j), dh_j -= 2 g_e (h_i - h_j) for every edge e = (i, j): one task per graph,
// edges in order (deterministic), zero gradients skipped.
at::Tensor edge_sq_norms_backward_cpu(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& nbr) {
  TORCH_CHECK(h.device().is_cpu(), "edge_sq_norms_backward: h must be a CPU tensor for the CPU kernel");
  check_edge_sq_norms_backward_args(grad, h, nbr);
  const int64_t G = h.size(0), N = h.size(1), H = h.size(2), k = nbr.size(2);
  const at::Tensor hc = edge_rows(h), nc = nbr.contiguous();
  at::Tensor dh = at::zeros_like(hc);
  if (hc.numel() == 0 || k == 0) return dh.to(h.scalar_type());
  const at::Tensor gc = grad.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES(hc.scalar_type(), "edge_sq_norms_backward_cpu", [&] {
    const scalar_t* hp = hc.data_ptr<scalar_t>();
    const int64_t* np = nc.data_ptr<int64_t>();
    const double* gp = gc.data_ptr<double>();
    scalar_t* dp = dh.data_ptr<scalar_t>();
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        for (int64_t e = g * N * k; e < (g + 1) * N * k; ++e) {
          const double c = 2.0 * gp[e];
          if (c == 0.0) continue;
          const int64_t i = g * N + (e - g * N * k) / k, j = g * N + np[e];
          const scalar_t cs = static_cast<scalar_t>(c);
          const scalar_t* hi = hp + i * H;
          const scalar_t* hj = hp + j * H;
          scalar_t* di = dp + i * H;
          scalar_t* dj = dp + j * H;
          for (int64_t t = 0; t < H; ++t) {
            const scalar_t d = cs * (hi[t] - hj[t]);
            di[t] += d;
            dj[t] -= d;
          }
        }
      }
    });
  });
  return dh.to(h.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(exgramed, CPU, m) {
  m.impl("pair_scores", &pair_scores_cpu);
  m.impl("pair_scores_backward", &pair_scores_backward_cpu);
  m.impl("edge_sq_norms", &edge_sq_norms_cpu);
  m.impl("edge_sq_norms_backward", &edge_sq_norms_backward_cpu);
}

}  // namespace exgramed
