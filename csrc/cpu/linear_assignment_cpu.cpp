// linear_assignment, CPU kernel: one shortest-augmenting-path solve (assignment.h) per
// problem, problems in parallel: Jonker-Volgenant's augmenting row reduction first, and from
// kLapCandidatesMinN on the solve on candidate columns.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "assignment.h"
#include "checks.h"

namespace exgramed {
namespace {

at::Tensor linear_assignment_cpu(const at::Tensor& score, bool maximize) {
  TORCH_CHECK(score.device().is_cpu(), "linear_assignment: score must be a CPU tensor for the CPU kernel");
  check_dim(score, 3, "linear_assignment: score", "[G, N, N]");
  TORCH_CHECK(score.size(1) == score.size(2), "linear_assignment: score must be square per problem ([G, N, N]), got ",
              score.sizes());
  check_float(score, "linear_assignment: score");
  check_finite(score, "linear_assignment: score");
  const int64_t G = score.size(0), N = score.size(1);
  at::Tensor out = at::empty({G, N}, score.options().dtype(at::kLong));
  if (G == 0 || N == 0) return out;
  const at::Tensor s = score.to(at::kDouble).contiguous();
  const double* sp = s.data_ptr<double>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    LapWorkspace ws;
    for (int64_t g = g0; g < g1; ++g) {
      lap_solve(sp + g * N * N, N, maximize, /*clamp_positive=*/false, ws, /*warm=*/false, /*row_reduction=*/true,
                /*candidates=*/N >= kLapCandidatesMinN);
      std::copy(ws.col4row.begin(), ws.col4row.end(), op + g * N);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(exgramed, CPU, m) { m.impl("linear_assignment", &linear_assignment_cpu); }

}  // namespace exgramed
