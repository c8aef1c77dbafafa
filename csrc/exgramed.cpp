// Schemas of every exgramed op, defined once. Kernels register per backend in
// csrc/cpu/*_cpu.cpp and csrc/cuda/*_cuda.cu; fake kernels and autograd in Python.
#include <torch/library.h>

TORCH_LIBRARY(exgramed, m) {
#define EXGRAMED_OP(schema) m.def(schema);
#include "schemas.def"
#undef EXGRAMED_OP
}
