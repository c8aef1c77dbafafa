// qap_gradient, CPU kernel: grad q(X) of the quadratic term per problem (and per iterate), float64
// accumulation, problems in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "qap_cpu.h"

namespace exgramed {
namespace {

using namespace qap_cpu;

at::Tensor qap_gradient_cpu(const at::Tensor& X, const at::Tensor& nbr1, const at::Tensor& nbr2, const at::Tensor& Q) {
  TORCH_CHECK(X.device().is_cpu(), "qap_gradient: X must be a CPU tensor for the CPU kernel");
  check_gradient_args(X, nbr1, nbr2, Q);
  const int64_t G = X.size(0), N = X.size(-1), k = nbr1.size(2);
  const int64_t R = X.dim() == 4 ? X.size(1) : 1;
  at::Tensor out = at::zeros({G * R, N, N}, X.options().dtype(at::kDouble));
  if (G * R == 0 || N == 0 || k == 0) return out.view(X.sizes()).to(X.scalar_type());
  const at::Tensor Xd = X.to(at::kDouble).contiguous();
  const at::Tensor Qt = solver_q_table(Q);
  const at::Tensor n1 = nbr1.contiguous(), n2 = nbr2.contiguous();
  AT_DISPATCH_FLOATING_TYPES(Qt.scalar_type(), "qap_gradient_cpu", [&] {
    at::parallel_for(0, G * R, 1, [&](int64_t t0, int64_t t1) {
      std::vector<double> xg(N * N * k);
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t g = task / R;
        const Problem<scalar_t> p = make_problem<scalar_t>(
            nullptr, Qt.data_ptr<scalar_t>() + g * N * k * N * k, n1.data_ptr<int64_t>() + g * N * k,
            n2.data_ptr<int64_t>() + g * N * k, N, k, false, false);
        grad_q(p, Xd.data_ptr<double>() + task * N * N, out.data_ptr<double>() + task * N * N, xg.data());
      }
    });
  });
  return out.view(X.sizes()).to(X.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(exgramed, CPU, m) { m.impl("qap_gradient", &qap_gradient_cpu); }

}  // namespace exgramed
