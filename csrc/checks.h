// Argument checks shared by every kernel: each error names the argument.
#pragma once
#include <ATen/ATen.h>

namespace exgramed {

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()),
              name, " must be a floating-point tensor (float16, bfloat16, float32, float64), got ",
              t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* shape) {
  TORCH_CHECK(t.dim() == dim, name, " must have shape ", shape, " (", dim, " dims), got ", t.sizes());
}

inline void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be an int64 tensor, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb) {
  TORCH_CHECK(a.device() == b.device(), na, " and ", nb, " must be on the same device, got ", a.device(), " and ",
              b.device());
}

// NaN/Inf are rejected up front: every downstream selection would be meaningless.
// (On CUDA this costs one device->host sync.)
inline void check_finite(const at::Tensor& t, const char* name) {
  if (t.numel() == 0) return;
  TORCH_CHECK(at::isfinite(t).all().item<bool>(), name, " contains NaN or Inf");
}

}  // namespace exgramed
