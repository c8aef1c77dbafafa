// edge_sq_norms: d2[g, i*k + s] = sum_c (h[g, i, c] - h[g, nbr[g, i, s], c])^2, the squared lengths of
// the kNN edges (align's edge normalisation), from the differences themselves (no cancellation). What the
// CPU and CUDA kernels share; the math is in exgramed_kernels/reference/edge_sq_norms.py.
#pragma once
#include <ATen/ATen.h>

#include <string>

#include "checks.h"

namespace exgramed {

// check_values=false skips the NaN/Inf check of h (the backward's: the forward checked it).
inline void check_edge_sq_norms_args(const at::Tensor& h, const at::Tensor& nbr, const char* op,
                                     bool check_values = true) {
  TORCH_CHECK(h.dim() == 3, op, ": h must have shape [G, N, h], got ", h.sizes());
  check_float(h, (std::string(op) + ": h").c_str());
  TORCH_CHECK(nbr.scalar_type() == at::kLong && nbr.dim() == 3 && nbr.size(0) == h.size(0) && nbr.size(1) == h.size(1),
              op, ": nbr must be int64 [G, N, k] = [", h.size(0), ", ", h.size(1), ", k], got ", nbr.scalar_type(), " ",
              nbr.sizes());
  check_same_device(nbr, "nbr", h, "h");
  if (nbr.numel() > 0) {
    TORCH_CHECK(nbr.min().item<int64_t>() >= 0 && nbr.max().item<int64_t>() < h.size(1), op,
                ": nbr entries must lie in [0, ", h.size(1), ")");
  }
  if (check_values) check_finite(op, {{"h", h}});
}

inline void check_edge_sq_norms_backward_args(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& nbr) {
  check_edge_sq_norms_args(h, nbr, "edge_sq_norms_backward", /*check_values=*/false);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == h.size(0) && grad.size(1) == h.size(1) * nbr.size(2),
              "edge_sq_norms_backward: grad must have shape [G, N*k] = [", h.size(0), ", ", h.size(1) * nbr.size(2),
              "], got ", grad.sizes());
  check_same_device(grad, "grad", h, "h");
}

// The squared lengths with ATen ops (any device; the CPU has a fused kernel): [G, N k] in h's dtype.
inline at::Tensor edge_sq_norms_aten(const at::Tensor& h, const at::Tensor& nbr) {
  const int64_t G = h.size(0), N = h.size(1), H = h.size(2), k = nbr.size(2);
  const at::Tensor rows = (nbr + N * at::arange(G, nbr.options()).view({G, 1, 1})).reshape({G * N * k});
  const at::Tensor diff = h.unsqueeze(2) - h.reshape({G * N, H}).index_select(0, rows).view({G, N, k, H});
  return diff.square().sum(-1).reshape({G, N * k});
}

// Its backward with ATen ops: dh_i = 2 sum_s g_is (h_i - h_j) - 2 sum_{edges (x, i)} g_x. (h_x - h_i), the
// second sum as a batched GEMM with the one-hot tail matrix (deterministic, no atomics).
inline at::Tensor edge_sq_norms_backward_aten(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& nbr) {
  const int64_t G = h.size(0), N = h.size(1), H = h.size(2), k = nbr.size(2);
  const at::Tensor rows = (nbr + N * at::arange(G, nbr.options()).view({G, 1, 1})).reshape({G * N * k});
  const at::Tensor diff = h.unsqueeze(2) - h.reshape({G * N, H}).index_select(0, rows).view({G, N, k, H});
  const at::Tensor gd = (2 * grad.to(h.scalar_type()).view({G, N, k, 1})) * diff;  // [G, N, k, H]
  const at::Tensor tails = at::zeros({G, N * k, N}, h.options()).scatter_(2, nbr.reshape({G, N * k, 1}), 1.0);
  return gd.sum(2) - at::bmm(tails.transpose(1, 2), gd.reshape({G, N * k, H}));
}

}  // namespace exgramed
