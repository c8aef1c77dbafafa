// edge_sq_norms, CUDA: the ATen composites of edge_sq_norms.h (gathers, a reduction, and a batched GEMM
// with the one-hot tail matrix in the backward: deterministic).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "edge_sq_norms.h"

namespace exgramed {
namespace {

at::Tensor edge_sq_norms_cuda(const at::Tensor& h, const at::Tensor& nbr) {
  const c10::cuda::CUDAGuard guard(h.device());
  check_edge_sq_norms_args(h, nbr, "edge_sq_norms");
  return edge_sq_norms_aten(h, nbr);
}

at::Tensor edge_sq_norms_backward_cuda(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& nbr) {
  const c10::cuda::CUDAGuard guard(h.device());
  check_edge_sq_norms_backward_args(grad, h, nbr);
  return edge_sq_norms_backward_aten(grad, h, nbr);
}

}  // namespace

TORCH_LIBRARY_IMPL(exgramed, CUDA, m) {
  m.impl("edge_sq_norms", &edge_sq_norms_cuda);
  m.impl("edge_sq_norms_backward", &edge_sq_norms_backward_cuda);
}

}  // namespace exgramed
