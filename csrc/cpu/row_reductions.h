// Row reductions shared by the CPU kernels: the squared distance and the dot product of two rows,
// accumulated in float64 (csrc/cpu/row_reductions.cpp; multiversioned there).
#pragma once
#include <cstdint>

namespace exgramed {

double sq_dist_f32(const float* a, const float* b, int64_t d);
double dot_f32(const float* a, const float* b, int64_t d);
double sq_dist_f64(const double* a, const double* b, int64_t d);
double dot_f64(const double* a, const double* b, int64_t d);

// The overloads kernels templated on the element type call.
inline double sq_dist(const float* a, const float* b, int64_t d) { return sq_dist_f32(a, b, d); }
inline double sq_dist(const double* a, const double* b, int64_t d) { return sq_dist_f64(a, b, d); }

}  // namespace exgramed
