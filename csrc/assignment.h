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
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace exgramed {

struct LapWorkspace {
  int64_t n = -1;
  std::vector<double> u, v, spc, cost;
  std::vector<int64_t> col4row, row4col, path, remaining, scanned_rows, free_rows, next_rows;
  std::vector<char> col_done;

  void resize(int64_t n_) {
    if (n_ == n) return;
    n = n_;
    u.assign(n, 0.0);
    v.assign(n, 0.0);
    spc.assign(n, 0.0);
    col4row.assign(n, -1);
    row4col.assign(n, -1);
    path.assign(n, -1);
    remaining.assign(n, 0);
    scanned_rows.clear();
    scanned_rows.reserve(n);
    col_done.assign(n, 0);
    cost.assign(n * n, 0.0);
  }
};

// Jonker-Volgenant's augmenting row reduction (two passes) on the free rows left by the greedy row
// reduction: a free row takes its cheapest column, lowering that column's potential by the gap to
// its second cheapest (so the displaced owner, no longer tight there, is free and retried). Keeps
// every reduced cost >= 0 and assigned pairs tight; afterwards u is recomputed from v. Cheap per
// row (one O(n) scan), it leaves few rows for the O(n^2) shortest-path augmentations.
inline void augmenting_row_reduction(const double* c, int64_t n, LapWorkspace& ws) {
  double* v = ws.v.data();
  // The workspace's lists: this runs once per Frank-Wolfe iteration, so no allocation per call.
  std::vector<int64_t>& free_rows = ws.free_rows;
  std::vector<int64_t>& next = ws.next_rows;
  free_rows.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (ws.col4row[i] < 0) free_rows.push_back(i);
  }
  const double inf = std::numeric_limits<double>::infinity();
  for (int pass = 0; pass < 2 && !free_rows.empty(); ++pass) {
    next.clear();
    size_t k = 0;
    int64_t budget = n;  // retries of displaced rows in place, at most (float ties can cycle)
    while (k < free_rows.size()) {
      const int64_t i = free_rows[k++];
      const double* ci = c + i * n;
      double u1 = inf, u2 = inf;
      int64_t j1 = -1, j2 = -1;
      for (int64_t j = 0; j < n; ++j) {
        const double h = ci[j] - v[j];
        if (h < u2) {
          if (h < u1) {
            u2 = u1;
            j2 = j1;
            u1 = h;
            j1 = j;
          } else {
            u2 = h;
            j2 = j;
          }
        }
      }
      int64_t i0 = ws.row4col[j1];
      const bool gap = u1 < u2 && j2 >= 0;  // (n = 1 has no second column)
      if (gap) {
        v[j1] -= (u2 - u1);
      } else if (i0 >= 0 && j2 >= 0) {
        j1 = j2;
        i0 = ws.row4col[j2];
      }
      ws.row4col[j1] = i;
      ws.col4row[i] = j1;
      if (i0 >= 0) {
        ws.col4row[i0] = -1;
        if (gap && budget-- > 0) {
          free_rows[--k] = i0;  // retry the displaced row at once
        } else {
          next.push_back(i0);
        }
      }
    }
    free_rows.swap(next);
  }
  for (int64_t i = 0; i < n; ++i) {
    const double* ci = c + i * n;
    if (ws.col4row[i] >= 0) {
      ws.u[i] = ci[ws.col4row[i]] - v[ws.col4row[i]];
    } else {
      double m = inf;
      for (int64_t j = 0; j < n; ++j) m = std::min(m, ci[j] - v[j]);
      ws.u[i] = m;
    }
  }
}

// score: n x n row-major. maximize: minimise -score. clamp_positive: use max(score, 0) (the
// oracle over partial permutations; see qap.h). warm: keep ws.v from the previous call.
// row_reduction: run Jonker-Volgenant's augmenting row reduction before the shortest paths
// (faster; among equally good assignments it may pick another one than without it).
// Result in ws.col4row.
inline void lap_solve(const double* score, int64_t n, bool maximize, bool clamp_positive, LapWorkspace& ws,
                      bool warm, bool row_reduction = false) {
  ws.resize(n);
  const double sign = maximize ? -1.0 : 1.0;
  double* cm = ws.cost.data();  // the cost matrix, once: the scans below read it many times
  for (int64_t x = 0; x < n * n; ++x) {
    const double s = score[x];
    cm[x] = sign * (clamp_positive && s < 0 ? 0.0 : s);
  }
  auto cost = [cm, n](int64_t i, int64_t j) { return cm[i * n + j]; };
  if (!warm) std::fill(ws.v.begin(), ws.v.end(), 0.0);
  std::fill(ws.col4row.begin(), ws.col4row.end(), -1);
  std::fill(ws.row4col.begin(), ws.row4col.end(), -1);
  double* u = ws.u.data();
  double* v = ws.v.data();
  // Row reduction against v, with greedy tight assignments.
  for (int64_t i = 0; i < n; ++i) {
    double best = std::numeric_limits<double>::infinity();
    int64_t bj = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double r = cost(i, j) - v[j];
      if (r < best) {
        best = r;
        bj = j;
      }
    }
    u[i] = best;
    if (ws.row4col[bj] < 0) {
      ws.row4col[bj] = i;
      ws.col4row[i] = bj;
    }
  }
  if (row_reduction) augmenting_row_reduction(cm, n, ws);
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t cur = 0; cur < n; ++cur) {
    if (ws.col4row[cur] >= 0) continue;
    int64_t num_remaining = n;
    for (int64_t j = 0; j < n; ++j) {
      ws.remaining[j] = j;
      ws.spc[j] = inf;
      ws.col_done[j] = 0;
    }
    ws.scanned_rows.clear();
    double min_val = 0.0;
    int64_t i = cur, sink = -1;
    while (sink < 0) {
      ws.scanned_rows.push_back(i);
      double lowest = inf;
      int64_t index = -1, lowest_j = -1;
      bool lowest_free = false;
      const double base = min_val - u[i];
      for (int64_t it = 0; it < num_remaining; ++it) {
        const int64_t j = ws.remaining[it];
        const double r = base + cost(i, j) - v[j];
        if (r < ws.spc[j]) {
          ws.path[j] = i;
          ws.spc[j] = r;
        }
        const double d = ws.spc[j];
        const bool fr = ws.row4col[j] < 0;
        if (d < lowest || (d == lowest && ((fr && !lowest_free) || (fr == lowest_free && j < lowest_j)))) {
          lowest = d;
          index = it;
          lowest_j = j;
          lowest_free = fr;
        }
      }
      TORCH_CHECK(index >= 0 && lowest < inf, "linear_assignment: no finite assignment exists");
      min_val = lowest;
      const int64_t j = lowest_j;
      ws.col_done[j] = 1;
      ws.remaining[index] = ws.remaining[--num_remaining];
      if (ws.row4col[j] < 0) {
        sink = j;
      } else {
        i = ws.row4col[j];
      }
    }
    u[cur] += min_val;
    for (const int64_t r : ws.scanned_rows) {
      if (r != cur) u[r] += min_val - ws.spc[ws.col4row[r]];
    }
    for (int64_t j = 0; j < n; ++j) {
      if (ws.col_done[j]) v[j] -= min_val - ws.spc[j];
    }
    int64_t j = sink;
    while (true) {
      const int64_t r = ws.path[j];
      ws.row4col[j] = r;
      const int64_t prev = ws.col4row[r];
      ws.col4row[r] = j;
      j = prev;
      if (r == cur) break;
    }
  }
}

}  // namespace exgramed
