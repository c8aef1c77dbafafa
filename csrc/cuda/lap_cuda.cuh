// The CUDA linear-assignment solve shared by linear_assignment and the graph-matching driver.
#pragma once
#include <ATen/ATen.h>

namespace exgramed {

// Maximising (or minimising) assignment of every S[b] ([B, n, n] float64, contiguous, on the
// current CUDA device), of max(S, 0) when clamp_positive. v: [B, n] float64 column potentials,
// read when warm and written back. Returns int64 [B, n] (column of each row). One thread block
// per problem; no host synchronisation.
at::Tensor lap_cuda(const at::Tensor& S, at::Tensor& v, bool maximize, bool clamp_positive, bool warm);

}  // namespace exgramed
