// Linear assignment on the CPU: shortest augmenting paths with dual potentials
// (Jonker-Volgenant / Crouse 2016), in float64. Shared by the linear_assignment CPU kernel
// and the CPU graph-matching solver (which calls it once per Frank-Wolfe iteration).
//
// Minimises sum_i c[i, col4row[i]], c = sign * score (sign = -1 to maximise). Invariants:
// reduced costs c_ij - u_i - v_j >= 0 everywhere and = 0 on assigned pairs. Start: with
// column potentials v (0, or the previous solve's for a warm start), u_i = min_j (c_ij - v_j)
// and each row takes its argmin column if still free (a tight edge). Every remaining free row
// is then joined by Dijkstra over reduced costs; the dual update keeps the invariants, so the
// result is optimal (up to float64 rounding of the sums). Ties: among columns at the same
// distance a free one first, then the lowest index -- deterministic.
#pragma once
#include <cstdint>
#include <vector>

namespace exgramed {

struct LapWorkspace {
  int64_t n = -1;
  std::vector<double> u, v, spc, dist, cost;
  // free_rows / next_rows: the augmenting row reduction's lists; free_cols: the columns still free
  // during one shortest-path search.
  std::vector<int64_t> col4row, row4col, path, scanned_rows, free_rows, next_rows, free_cols;
  // The candidate solve (assignment_cpu.cpp): per row its m cheapest columns by
  // reduced cost and their costs, the bound theta on the reduced costs of the others, a row buffer, and
  // the shortest-path search's lists of touched columns, reached columns and rows to expand.
  std::vector<int32_t> cand;
  std::vector<double> cand_cost, theta, rowbuf, pending_lb, pending_base;
  std::vector<int64_t> todo, reached, pending_row;
  // How the last solve's costs were made from its scores (cost_at reads them, on either path).
  const double* score = nullptr;
  const double* score2 = nullptr;
  double scale2 = 1.0, sign = 1.0;
  bool clamp = false, dense = true;

  void resize(int64_t n_) {
    if (n_ == n) return;
    n = n_;
    u.assign(n, 0.0);
    v.assign(n, 0.0);
    spc.assign(n, 0.0);
    dist.assign(n, 0.0);
    col4row.assign(n, -1);
    row4col.assign(n, -1);
    path.assign(n, -1);
    scanned_rows.clear();
    scanned_rows.reserve(n);
    cost.clear();  // the dense path's n x n matrix, allocated when that path runs
  }

  // c_ij of the last solve, bit-identical to the matrix the solve used.
  double cost_at(int64_t i, int64_t j) const {
    if (dense) return cost[i * n + j];
    const double s = score2 == nullptr ? score[i * n + j]
                     : scale2 == 1.0   ? score[i * n + j] + score2[i * n + j]
                                       : score[i * n + j] + scale2 * score2[i * n + j];
    return sign * (clamp && s < 0 ? 0.0 : s);
  }
};

// From this size on, linear_assignment solves on candidate columns (lap_solve's candidates). On
// uniform random scores that is ~2.5x faster than the dense solve at n = 1024 and slower at n = 256;
// on Frank-Wolfe's oracle problems (warm potentials, long augmenting paths) it is slower at every n
// measured (experiments/solver_scaling.md), so the oracle stays dense.
constexpr int64_t kLapCandidatesMinN = 512;

// score: n x n row-major. maximize: minimise -score. clamp_positive: use max(score, 0) (the
// oracle over partial permutations; see qap.h). warm: keep ws.v from the previous call.
// row_reduction: run Jonker-Volgenant's augmenting row reduction before the shortest paths
// (faster; among equally good assignments it may pick another one than without it).
// candidates: solve on the few cheapest columns of each row by reduced cost, with a per-row bound
// standing in for the others (expanded when a shortest path could use them): the same optimum
// without forming the n x n cost matrix, faster when augmenting paths are short.
// Result in ws.col4row. (csrc/cpu/assignment_cpu.cpp)
void lap_solve(const double* score, int64_t n, bool maximize, bool clamp_positive, LapWorkspace& ws, bool warm,
               bool row_reduction = false, bool candidates = false);

// The same on the elementwise sum score + scale2 * score2 (both n x n): the Frank-Wolfe oracle's
// U + grad q(X) (grad q kept scaled) without a separate pass to form it. ws.cost_at(i, j) gives the
// solve's cost c_ij afterwards (c = -max(s, 0) for maximize with clamp_positive).
void lap_solve_sum(const double* score, const double* score2, int64_t n, bool maximize, bool clamp_positive,
                   LapWorkspace& ws, bool warm, bool row_reduction = false, double scale2 = 1.0);

}  // namespace exgramed
