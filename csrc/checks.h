// Argument checks shared by every kernel: each error names the argument.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "cpu/row_reductions.h"

namespace exgramed {

// The dtype every kernel computes in: float64 stays float64; float32, float16 and bfloat16 compute in
// float32 (float16's range overflows in squared differences and Gram entries, bfloat16 keeps three
// significant digits). Results return in the input's dtype.
inline at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

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
// CPU: one parallel pass over the bit patterns -- a value is NaN or Inf exactly when its exponent
// bits are all ones -- an integer OR-reduction that vectorises at memory speed (at::isfinite(t).all()
// materialises temporaries; a floating-point sum is one dependent add per element). CUDA: one
// device->host sync.
template <typename bits_t>
inline bool all_finite_bits(const void* data, int64_t n, bits_t exponent) {
  std::atomic<bool> finite{true};
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
    if (!finite_bits(static_cast<const bits_t*>(data) + b, e - b, exponent)) finite = false;
  });
  return finite;
}

inline bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (!t.device().is_cpu()) return at::isfinite(t).all().item<bool>();
  const at::Tensor c = t.contiguous();
  switch (c.scalar_type()) {
    case at::kDouble:
      return all_finite_bits<uint64_t>(c.data_ptr(), c.numel(), 0x7ff0000000000000ull);
    case at::kFloat:
      return all_finite_bits<uint32_t>(c.data_ptr(), c.numel(), 0x7f800000u);
    case at::kHalf:
      return all_finite_bits<uint16_t>(c.data_ptr(), c.numel(), 0x7c00u);
    case at::kBFloat16:
      return all_finite_bits<uint16_t>(c.data_ptr(), c.numel(), 0x7f80u);
    default:
      return true;  // integer tensors hold no NaN or Inf
  }
}

inline void check_finite(const at::Tensor& t, const char* name) {
  TORCH_CHECK(all_finite(t), name, " contains NaN or Inf");
}

// The NaN/Inf check of several tensors of op `op` ("<op>: <name> contains NaN or Inf" for the first
// offender; undefined tensors are skipped): on CUDA one device->host sync for all of them together.
inline void check_finite(const char* op, std::initializer_list<std::pair<const char*, at::Tensor>> named) {
  at::Tensor device_ok;  // all-finite flag of the tensors not on the CPU
  for (const auto& [name, t] : named) {
    if (!t.defined() || t.numel() == 0) continue;
    if (t.device().is_cpu()) {
      TORCH_CHECK(all_finite(t), op, ": ", name, " contains NaN or Inf");
    } else {
      const at::Tensor ok = at::isfinite(t).all();
      device_ok = device_ok.defined() ? device_ok.logical_and(ok) : ok;
    }
  }
  if (!device_ok.defined() || device_ok.item<bool>()) return;
  for (const auto& [name, t] : named) {
    if (t.defined() && !t.device().is_cpu()) TORCH_CHECK(all_finite(t), op, ": ", name, " contains NaN or Inf");
  }
}

}  // namespace exgramed
