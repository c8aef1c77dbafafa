// edge_sq_norms, CUDA: the ATen composites of edge_sq_norms.h (gathers, a reduction, and a batched GEMM
// with the one-hot tail matrix in the backward: deterministic).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "edge_sq_norms.h"

namespace exgramed {
namespace {

at::Tensor edge_sq_norms_cuda(const at::Tensor& h, const at::Tensor& nbr) {
  check_edge_sq_norms_args(h, nbr, "edge_sq_norms");
  const c10::cuda::CUDAGuard guard(h.device());
  return edge_sq_norms_aten(h.to(compute_dtype(h.scalar_type())), nbr).to(h.scalar_type());
}

at::Tensor edge_sq_norms_backward_cuda(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& nbr) {
  check_edge_sq_norms_backward_args(grad, h, nbr);
  const c10::cuda::CUDAGuard guard(h.device());
  const at::ScalarType ct = compute_dtype(h.scalar_type());
  return edge_sq_norms_backward_aten(grad.to(ct), h.to(ct), nbr).to(h.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(exgramed, CUDA, m) {
  m.impl("edge_sq_norms", &edge_sq_norms_cuda);
  m.impl("edge_sq_norms_backward", &edge_sq_norms_backward_cuda);
}

}  // namespace exgramed
