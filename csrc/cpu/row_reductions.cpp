// Row reductions (row_reductions.h): exact-order float64 sums of two rows, and the finiteness test of
// a buffer. EXGRAMED_MULTIVERSION compiles AVX-512 and x86-64-v3 copies next to the baseline one and picks
// at load time, so the loops vectorise where the CPU allows (baseline x86-64 has no 64-bit compare).
#include "row_reductions.h"

#include "multiversion.h"

namespace exgramed {
namespace {

// Eight independent partial sums let the fp64 reduction vectorise without -ffast-math
// (a fixed order, so results stay deterministic).
template <typename T, bool kDiff>
inline double reduce8(const T* a, const T* b, int64_t d) {
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t t = 0;
  for (; t + 8 <= d; t += 8) {
    for (int u = 0; u < 8; ++u) {
      const double x = static_cast<double>(a[t + u]), y = static_cast<double>(b[t + u]);
      part[u] += kDiff ? (x - y) * (x - y) : x * y;
    }
  }
  for (; t < d; ++t) {
    const double x = static_cast<double>(a[t]), y = static_cast<double>(b[t]);
    part[0] += kDiff ? (x - y) * (x - y) : x * y;
  }
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

}  // namespace

EXGRAMED_MULTIVERSION double sq_dist_f32(const float* a, const float* b, int64_t d) {
  return reduce8<float, true>(a, b, d);
}
EXGRAMED_MULTIVERSION double dot_f32(const float* a, const float* b, int64_t d) {
  return reduce8<float, false>(a, b, d);
}
EXGRAMED_MULTIVERSION double sq_dist_f64(const double* a, const double* b, int64_t d) {
  return reduce8<double, true>(a, b, d);
}
EXGRAMED_MULTIVERSION double dot_f64(const double* a, const double* b, int64_t d) {
  return reduce8<double, false>(a, b, d);
}

// A value is NaN or Inf exactly when its exponent bits are all ones: an integer OR-reduction.
template <typename bits_t>
inline bool no_full_exponent(const bits_t* p, int64_t n, bits_t exponent) {
  bits_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<bits_t>((p[i] & exponent) == exponent);
  return bad == 0;
}

EXGRAMED_MULTIVERSION bool finite_bits64(const uint64_t* p, int64_t n, uint64_t exponent) {
  return no_full_exponent(p, n, exponent);
}
EXGRAMED_MULTIVERSION bool finite_bits32(const uint32_t* p, int64_t n, uint32_t exponent) {
  return no_full_exponent(p, n, exponent);
}
EXGRAMED_MULTIVERSION bool finite_bits16(const uint16_t* p, int64_t n, uint16_t exponent) {
  return no_full_exponent(p, n, exponent);
}

}  // namespace exgramed
