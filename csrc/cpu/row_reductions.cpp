// Row reductions (row_reductions.h): exact-order float64 sums of two rows. target_clones compiles
// AVX-512 and AVX2/FMA copies next to the baseline one and picks at load time, so the float64 loop
// vectorises where the CPU allows.
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

}  // namespace exgramed
