// edge_sq_norms, CPU: one task per node row, its k squared edge lengths as float64 sums of the
// differences in a fixed order (row_reductions.h); the backward gathers each node's out- and in-edges.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "edge_sq_norms.h"
#include "row_reductions.h"

namespace exgramed {
namespace {

// h as the kernels read it: contiguous, in compute_dtype.
at::Tensor edge_rows(const at::Tensor& h) { return h.to(compute_dtype(h.scalar_type())).contiguous(); }

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
  m.impl("edge_sq_norms", &edge_sq_norms_cpu);
  m.impl("edge_sq_norms_backward", &edge_sq_norms_backward_cpu);
}

}  // namespace exgramed
