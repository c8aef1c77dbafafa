// Linear assignment on the CPU (assignment.h): the shortest-augmenting-path solver shared by the
// linear_assignment kernel and the graph-matching solver's oracle.
//
// The scans are written as dense, branch-free passes over the n columns so that they vectorise
// (EXGRAMED_MULTIVERSION: AVX-512 / AVX2 clones): a column's state is a number, not a list
// membership -- its tentative distance becomes NaN once the current shortest-path search has reached
// it (the final distance moves to dist[j]): every comparison with NaN is false, so the column is never
// relaxed again nor taken as the minimum. Minima are taken in 8 independent lanes, each keeping its
// first index (and its tie rule), then merged: every result -- minimum, first index, tie rule -- is
// exactly the one of a plain sequential scan, in one pass.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "assignment.h"
#include "multiversion.h"

namespace exgramed {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int kLanes = 8;
// Four doubles (GCC/Clang vector extension): AVX2's width; two of them make the eight lanes.
typedef double quad __attribute__((vector_size(4 * sizeof(double))));
typedef int64_t quadi __attribute__((vector_size(4 * sizeof(int64_t))));  // lanes of indices / masks

// The cost matrix c = sign * s, s = a (+ scale_b * b) (max(s, 0) with clamp): formed once, the scans read it
// many times.
EXGRAMED_MULTIVERSION void form_costs(const double* a, const double* b, double scale_b, int64_t nn, double sign,
                                      bool clamp, double* out) {
  if (b == nullptr) {
    for (int64_t x = 0; x < nn; ++x) {
      const double s = a[x];
      out[x] = sign * (clamp && s < 0 ? 0.0 : s);
    }
  } else if (scale_b == 1.0) {
    for (int64_t x = 0; x < nn; ++x) {
      const double s = a[x] + b[x];
      out[x] = sign * (clamp && s < 0 ? 0.0 : s);
    }
  } else {
    for (int64_t x = 0; x < nn; ++x) {
      const double s = a[x] + scale_b * b[x];
      out[x] = sign * (clamp && s < 0 ? 0.0 : s);
    }
  }
}

// h = c - v on the eight columns j .. j + 7, as two quads.
inline void reduced8(const double* c, const double* v, int64_t j, quad& h0, quad& h1) {
  quad c0, c1, v0, v1;
  std::memcpy(&c0, c + j, sizeof(c0));
  std::memcpy(&c1, c + j + 4, sizeof(c1));
  std::memcpy(&v0, v + j, sizeof(v0));
  std::memcpy(&v1, v + j + 4, sizeof(v1));
  h0 = c0 - v0;
  h1 = c1 - v1;
}

// The first j >= from with c_j - v_j == value (-1 if none), a block of eight at a time.
EXGRAMED_MULTIVERSION int64_t first_reduced_equal(const double* c, const double* v, int64_t n, int64_t from,
                                                  double value) {
  int64_t j = from;
  for (; j < n && (j & (kLanes - 1)) != 0; ++j) {
    if (c[j] - v[j] == value) return j;
  }
  const quad bq = {value, value, value, value};
  for (; j + kLanes <= n; j += kLanes) {
    quad h0, h1;
    reduced8(c, v, j, h0, h1);
    const auto hit = (h0 == bq) | (h1 == bq);
    if ((hit[0] | hit[1] | hit[2] | hit[3]) != 0) break;
  }
  for (; j < n; ++j) {
    if (c[j] - v[j] == value) return j;
  }
  return -1;
}

// The minimum of c - v and its first index (-1 and +inf if every entry is +inf): the row reduction's
// u_i and its column. The minimum in lanes, then a scan for its first occurrence.
EXGRAMED_MULTIVERSION double reduced_min_first(const double* c, const double* v, int64_t n, int64_t* arg) {
  quad m0 = {kInf, kInf, kInf, kInf}, m1 = m0;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    quad h0, h1;
    reduced8(c, v, j, h0, h1);
    m0 = h0 < m0 ? h0 : m0;
    m1 = h1 < m1 ? h1 : m1;
  }
  double best = kInf;
  for (; j < n; ++j) best = c[j] - v[j] < best ? c[j] - v[j] : best;
  for (int l = 0; l < 4; ++l) best = std::min({best, m0[l], m1[l]});
  *arg = best < kInf ? first_reduced_equal(c, v, n, 0, best) : -1;
  return best;
}

// The two smallest of h = c - v in one pass: (u1, j1) the minimum and its first index, (u2, j2) the
// minimum over j != j1 and its first index (u2 = +inf, j2 = -1 for n = 1). Each lane runs the
// sequential two-smallest scan (strict <: first indices) on its columns; the global pair is the best
// lane minimum, then the best of the other lanes' minima and the winning lane's second.
EXGRAMED_MULTIVERSION void reduced_min2(const double* c, const double* v, int64_t n, double* u1, int64_t* j1,
                                        double* u2, int64_t* j2) {
  quad a[2] = {{kInf, kInf, kInf, kInf}, {kInf, kInf, kInf, kInf}}, b[2] = {a[0], a[0]};
  quadi ai[2] = {{-1, -1, -1, -1}, {-1, -1, -1, -1}}, bi[2] = {ai[0], ai[0]};
  quadi jv[2] = {{0, 1, 2, 3}, {4, 5, 6, 7}};
  const quadi step = {kLanes, kLanes, kLanes, kLanes};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    quad hq[2];
    reduced8(c, v, j, hq[0], hq[1]);
    for (int q = 0; q < 2; ++q) {
      const quad h = hq[q];
      const auto la = h < a[q], lb = h < b[q];
      b[q] = la ? a[q] : (lb ? h : b[q]);
      bi[q] = la ? ai[q] : (lb ? jv[q] : bi[q]);
      a[q] = la ? h : a[q];
      ai[q] = la ? jv[q] : ai[q];
      jv[q] += step;
    }
  }
  // (value, index) candidates: the lanes' two smallest and the tail, ordered by (value, index).
  double m1 = kInf, m2 = kInf;
  int64_t k1 = -1, k2 = -1;
  auto before = [](double x, int64_t ix, double y, int64_t iy) { return iy < 0 || x < y || (x == y && ix < iy); };
  auto add = [&](double x, int64_t ix) {
    if (ix < 0) return;
    if (before(x, ix, m1, k1)) {
      m2 = m1;
      k2 = k1;
      m1 = x;
      k1 = ix;
    } else if (before(x, ix, m2, k2)) {
      m2 = x;
      k2 = ix;
    }
  };
  for (int q = 0; q < 2; ++q) {
    for (int l = 0; l < 4; ++l) {
      add(a[q][l], ai[q][l]);
      add(b[q][l], bi[q][l]);
    }
  }
  for (; j < n; ++j) add(c[j] - v[j], j);
  *u1 = m1;
  *j1 = k1;
  *u2 = m2;
  *j2 = k2;
}

// One step of the shortest-path search from row i (base = the distance to i minus u_i): relax every
// live column, spc[j] = min(spc[j], base + c_ij - v_j) (path[j] = i where it improves), and return the
// live column of least distance -- ties to a free column (row4col < 0), then to the lowest index --
// with that distance in *lowest; -1 if no live column is reachable. A reached column has spc = NaN:
// it compares false, so it is never relaxed, never the minimum, never equal to it.
EXGRAMED_MULTIVERSION int64_t relax_and_pick(const double* ci, const double* v, const int64_t* row4col, double base,
                                             int64_t i, int64_t n, double* spc, int64_t* path, double* lowest) {
  const quad bq = {base, base, base, base};
  const quadi iq = {i, i, i, i};
  quad m0 = {kInf, kInf, kInf, kInf}, m1 = m0;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    quad c0, c1, v0, v1, s0, s1;
    quadi p0, p1;
    std::memcpy(&c0, ci + j, sizeof(c0));
    std::memcpy(&c1, ci + j + 4, sizeof(c1));
    std::memcpy(&v0, v + j, sizeof(v0));
    std::memcpy(&v1, v + j + 4, sizeof(v1));
    std::memcpy(&s0, spc + j, sizeof(s0));
    std::memcpy(&s1, spc + j + 4, sizeof(s1));
    std::memcpy(&p0, path + j, sizeof(p0));
    std::memcpy(&p1, path + j + 4, sizeof(p1));
    const quad r0 = bq + c0 - v0, r1 = bq + c1 - v1;
    const auto l0 = r0 < s0, l1 = r1 < s1;
    s0 = l0 ? r0 : s0;
    s1 = l1 ? r1 : s1;
    p0 = l0 ? iq : p0;
    p1 = l1 ? iq : p1;
    std::memcpy(spc + j, &s0, sizeof(s0));
    std::memcpy(spc + j + 4, &s1, sizeof(s1));
    std::memcpy(path + j, &p0, sizeof(p0));
    std::memcpy(path + j + 4, &p1, sizeof(p1));
    m0 = s0 < m0 ? s0 : m0;
    m1 = s1 < m1 ? s1 : m1;
  }
  double best = kInf;
  for (; j < n; ++j) {
    const double r = base + ci[j] - v[j];
    if (r < spc[j]) {
      spc[j] = r;
      path[j] = i;
    }
    best = spc[j] < best ? spc[j] : best;
  }
  for (int l = 0; l < 4; ++l) best = std::min({best, m0[l], m1[l]});
  *lowest = best;
  if (!(best < kInf)) return -1;
  // The live columns at distance best, a block of eight at a time (usually one in all).
  const quad eq = {best, best, best, best};
  int64_t first = -1;
  auto visit = [&](int64_t jj) {
    if (spc[jj] == best) {
      if (row4col[jj] < 0) return true;
      if (first < 0) first = jj;
    }
    return false;
  };
  for (j = 0; j + kLanes <= n; j += kLanes) {
    quad s0, s1;
    std::memcpy(&s0, spc + j, sizeof(s0));
    std::memcpy(&s1, spc + j + 4, sizeof(s1));
    const auto hit = (s0 == eq) | (s1 == eq);
    if ((hit[0] | hit[1] | hit[2] | hit[3]) == 0) continue;
    for (int l = 0; l < kLanes; ++l) {
      if (visit(j + l)) return j + l;
    }
  }
  for (; j < n; ++j) {
    if (visit(j)) return j;
  }
  return first;
}

// After a search that reached the columns with spc[j] = NaN, at distance dist[j] (sink at min_val):
// v_j -= min_val - dist_j on those columns (keeps reduced costs >= 0 and the new path tight).
EXGRAMED_MULTIVERSION void update_column_duals(const double* spc, const double* dist, double min_val, int64_t n,
                                               double* v) {
  for (int64_t j = 0; j < n; ++j) v[j] = spc[j] != spc[j] ? v[j] - (min_val - dist[j]) : v[j];
}

// Jonker-Volgenant's augmenting row reduction (two passes) on the free rows left by the greedy row
// reduction: a free row takes its cheapest column, lowering that column's potential by the gap to
// its second cheapest (so the displaced owner, no longer tight there, is free and retried). Keeps
// every reduced cost >= 0 and assigned pairs tight; afterwards u is recomputed from v. Cheap per
// row (a few O(n) passes), it leaves few rows for the O(n^2) shortest-path augmentations.
// The cheapest column j1 is the first minimum of h = c_i - v; the second (j2, u2) the first minimum
// over the other columns -- what a one-pass scan keeping the two smallest in order finds.
void augmenting_row_reduction(const double* c, int64_t n, LapWorkspace& ws) {
  double* v = ws.v.data();
  // The workspace's lists: this runs once per Frank-Wolfe iteration, so no allocation per call.
  std::vector<int64_t>& free_rows = ws.free_rows;
  std::vector<int64_t>& next = ws.next_rows;
  free_rows.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (ws.col4row[i] < 0) free_rows.push_back(i);
  }
  for (int pass = 0; pass < 2 && !free_rows.empty(); ++pass) {
    next.clear();
    size_t k = 0;
    int64_t budget = n;  // retries of displaced rows in place, at most (float ties can cycle)
    while (k < free_rows.size()) {
      const int64_t i = free_rows[k++];
      int64_t j1 = -1, j2 = -1;
      double u1, u2;
      reduced_min2(c + i * n, v, n, &u1, &j1, &u2, &j2);  // (n = 1: no second column, j2 = -1)
      int64_t i0 = ws.row4col[j1];
      const bool gap = u1 < u2 && j2 >= 0;
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
      int64_t j = -1;
      ws.u[i] = reduced_min_first(ci, v, n, &j);
    }
  }
}

void lap_impl(const double* score, const double* score2, double scale2, int64_t n, bool maximize,
              bool clamp_positive, LapWorkspace& ws, bool warm, bool row_reduction) {
  ws.resize(n);
  double* cm = ws.cost.data();
  form_costs(score, score2, scale2, n * n, maximize ? -1.0 : 1.0, clamp_positive, cm);
  if (!warm) std::fill(ws.v.begin(), ws.v.end(), 0.0);
  std::fill(ws.col4row.begin(), ws.col4row.end(), -1);
  std::fill(ws.row4col.begin(), ws.row4col.end(), -1);
  double* u = ws.u.data();
  double* v = ws.v.data();
  double* spc = ws.spc.data();
  double* dist = ws.dist.data();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  // Row reduction against v, with greedy tight assignments.
  for (int64_t i = 0; i < n; ++i) {
    int64_t bj = -1;
    u[i] = reduced_min_first(cm + i * n, v, n, &bj);
    if (bj < 0) bj = 0;
    if (ws.row4col[bj] < 0) {
      ws.row4col[bj] = i;
      ws.col4row[i] = bj;
    }
  }
  if (row_reduction) augmenting_row_reduction(cm, n, ws);
  for (int64_t cur = 0; cur < n; ++cur) {
    if (ws.col4row[cur] >= 0) continue;
    std::fill(spc, spc + n, kInf);
    ws.scanned_rows.clear();
    double min_val = 0.0;
    int64_t i = cur, sink = -1;
    while (sink < 0) {
      ws.scanned_rows.push_back(i);
      double lowest = kInf;
      const int64_t j =
          relax_and_pick(cm + i * n, v, ws.row4col.data(), min_val - u[i], i, n, spc, ws.path.data(), &lowest);
      TORCH_CHECK(j >= 0, "linear_assignment: no finite assignment exists");
      min_val = lowest;
      dist[j] = lowest;
      spc[j] = nan;  // reached
      if (ws.row4col[j] < 0) {
        sink = j;
      } else {
        i = ws.row4col[j];
      }
    }
    u[cur] += min_val;
    for (const int64_t r : ws.scanned_rows) {
      if (r != cur) u[r] += min_val - dist[ws.col4row[r]];
    }
    update_column_duals(spc, dist, min_val, n, v);
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

}  // namespace

void lap_solve(const double* score, int64_t n, bool maximize, bool clamp_positive, LapWorkspace& ws, bool warm,
               bool row_reduction) {
  lap_impl(score, nullptr, 1.0, n, maximize, clamp_positive, ws, warm, row_reduction);
}

void lap_solve_sum(const double* score, const double* score2, int64_t n, bool maximize, bool clamp_positive,
                   LapWorkspace& ws, bool warm, bool row_reduction, double scale2) {
  lap_impl(score, score2, scale2, n, maximize, clamp_positive, ws, warm, row_reduction);
}

}  // namespace exgramed
