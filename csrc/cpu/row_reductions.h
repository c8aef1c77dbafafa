// Row reductions shared by the CPU kernels: the squared distance and the dot product of two rows,
// accumulated in float64, and whether n floating-point bit patterns are all finite (no element has all
// of `exponent`'s bits set) (csrc/cpu/row_reductions.cpp; multiversioned there).
#pragma once
#include <cstdint>

namespace exgramed {

double sq_dist_f32(const float* a, const float* b, int64_t d);
double dot_f32(const float* a, const float* b, int64_t d);
double sq_dist_f64(const double* a, const double* b, int64_t d);
double dot_f64(const double* a, const double* b, int64_t d);
bool finite_bits64(const uint64_t* p, int64_t n, uint64_t exponent);
bool finite_bits32(const uint32_t* p, int64_t n, uint32_t exponent);
bool finite_bits16(const uint16_t* p, int64_t n, uint16_t exponent);

// The overloads kernels templated on the element type call.
inline bool finite_bits(const uint64_t* p, int64_t n, uint64_t exponent) { return finite_bits64(p, n, exponent); }
inline bool finite_bits(const uint32_t* p, int64_t n, uint32_t exponent) { return finite_bits32(p, n, exponent); }
inline bool finite_bits(const uint16_t* p, int64_t n, uint16_t exponent) { return finite_bits16(p, n, exponent); }
inline double sq_dist(const float* a, const float* b, int64_t d) { return sq_dist_f32(a, b, d); }
inline double sq_dist(const double* a, const double* b, int64_t d) { return sq_dist_f64(a, b, d); }

}  // namespace exgramed
