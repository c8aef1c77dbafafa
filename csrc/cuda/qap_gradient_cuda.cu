// qap_gradient, CUDA kernel: grad q(X) per problem and iterate (cuda/qap_cuda.cuh).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/qap_cuda.cuh"
#include "qap.h"

namespace exgramed {
namespace {

using namespace qap_cuda;

at::Tensor qap_gradient_cuda(const at::Tensor& X, const at::Tensor& nbr1, const at::Tensor& nbr2,
                             const at::Tensor& Q) {
  check_gradient_args(X, nbr1, nbr2, Q);
  const c10::cuda::CUDAGuard guard(X.device());
  const int64_t G = X.size(0), N = X.size(-1), k = nbr1.size(2);
  const int64_t R = X.dim() == 4 ? X.size(1) : 1;
  if (G * R == 0 || N == 0 || k == 0) return at::zeros_like(X);
  const at::Tensor Xd = X.to(at::kDouble).reshape({G * R, N, N});
  const at::Tensor Qt = solver_q_table(Q);
  const CudaGraphs gr = make_graphs(nbr1, nbr2);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(Qt.scalar_type(), "qap_gradient_cuda",
                             [&] { out = launch_grad<scalar_t>(Xd, Qt, gr, R, N, k); });
  return out.view(X.sizes()).to(X.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(exgramed, CUDA, m) { m.impl("qap_gradient", &qap_gradient_cuda); }

}  // namespace exgramed
