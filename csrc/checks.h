// Argument checks shared by every kernel: each error names the argument.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <type_traits>

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
// CPU: one parallel pass with early exit per chunk (at::isfinite(t).all() materialises
// four temporaries and costs as much as the whole kNN GEMM). CUDA: one device->host sync.
inline bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (!t.device().is_cpu()) return at::isfinite(t).all().item<bool>();
  const at::Tensor c = t.contiguous();
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "all_finite", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    std::atomic<bool> finite{true};
    at::parallel_for(0, c.numel(), 1 << 16, [&](int64_t b, int64_t e) {
      using check_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      check_t acc = 0;  // x - x is 0 for finite x and NaN otherwise; the sum flags any.
      for (int64_t i = b; i < e; ++i) {
        const check_t v = static_cast<check_t>(p[i]);
        acc += v - v;
      }
      if (acc != 0) finite = false;
    });
    ok = finite;
  });
  return ok;
}

inline void check_finite(const at::Tensor& t, const char* name) {
  TORCH_CHECK(all_finite(t), name, " contains NaN or Inf");
}

}  // namespace exgramed
