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

// The least (value, index) of eight lanes -- values x, indices xi (-1: an empty lane, value +inf) --
// ties to the lower index: the minimum value, then the least index among the lanes holding it
// (-1 when every lane is empty).
inline void lanes_argmin(const quad x[2], const quadi xi[2], double* m, int64_t* k) {
  const quad x01 = x[0] < x[1] ? x[0] : x[1];
  const double best = std::min(std::min(x01[0], x01[1]), std::min(x01[2], x01[3]));
  const quad bq = {best, best, best, best};
  const quadi none = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};
  const quadi k0 = (x[0] == bq) & (xi[0] >= 0) ? xi[0] : none;
  const quadi k1 = (x[1] == bq) & (xi[1] >= 0) ? xi[1] : none;
  const quadi k01 = k0 < k1 ? k0 : k1;
  const int64_t first = std::min(std::min(k01[0], k01[1]), std::min(k01[2], k01[3]));
  *m = best;
  *k = first == INT64_MAX ? -1 : first;
}

// The minimum of c - v and its first index (-1 and +inf if every entry is +inf): the row reduction's
// u_i and its column. Each lane keeps its minimum and first index (strict <), then the lanes and the
// tail are merged in (value, index) order.
EXGRAMED_MULTIVERSION double reduced_min_first(const double* c, const double* v, int64_t n, int64_t* arg) {
  quad m[2] = {{kInf, kInf, kInf, kInf}, {kInf, kInf, kInf, kInf}};
  quadi mi[2] = {{-1, -1, -1, -1}, {-1, -1, -1, -1}};
  quadi jv[2] = {{0, 1, 2, 3}, {4, 5, 6, 7}};
  const quadi step = {kLanes, kLanes, kLanes, kLanes};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    quad hq[2];
    reduced8(c, v, j, hq[0], hq[1]);
    for (int q = 0; q < 2; ++q) {
      const auto lt = hq[q] < m[q];
      m[q] = lt ? hq[q] : m[q];
      mi[q] = lt ? jv[q] : mi[q];
      jv[q] += step;
    }
  }
  double best;
  int64_t k;
  lanes_argmin(m, mi, &best, &k);
  for (; j < n; ++j) {
    const double h = c[j] - v[j];
    if (h < best) {
      best = h;
      k = j;
    }
  }
  *arg = best < kInf ? k : -1;
  return best;
}

// The two smallest of h = c - v in one pass: (u1, j1) the minimum and its first index, (u2, j2) the
// minimum over j != j1 and its first index (u2 = +inf, j2 = -1 for n = 1). Each lane runs the
// sequential two-smallest scan (strict <: first indices) on its columns; the global first is the least
// (value, index) of the lanes' firsts, the global second the least of the other lanes' firsts and the
// winning lane's second (a lane's second comes after its first in that order).
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
  double m1, m2;
  int64_t k1, k2;
  lanes_argmin(a, ai, &m1, &k1);
  const quad mq = {m1, m1, m1, m1};
  const quadi kq = {k1, k1, k1, k1};
  quad rest[2];
  quadi resti[2];
  for (int q = 0; q < 2; ++q) {
    const auto won = (a[q] == mq) & (ai[q] == kq);
    rest[q] = won ? b[q] : a[q];
    resti[q] = won ? bi[q] : ai[q];
  }
  lanes_argmin(rest, resti, &m2, &k2);
  // The tail (n mod 8 columns), merged in (value, index) order.
  auto before = [](double x, int64_t ix, double y, int64_t iy) { return iy < 0 || x < y || (x == y && ix < iy); };
  for (; j < n; ++j) {
    const double x = c[j] - v[j];
    if (before(x, j, m1, k1)) {
      m2 = m1;
      k2 = k1;
      m1 = x;
      k1 = j;
    } else if (before(x, j, m2, k2)) {
      m2 = x;
      k2 = j;
    }
  }
  *u1 = m1;
  *j1 = k1;
  *u2 = m2;
  *j2 = k2;
}

// One step of the shortest-path search from row i (base = the distance to i minus u_i): relax every
// live column, spc[j] = min(spc[j], base + c_ij - v_j) (path[j] = i where it improves), and return the
// live column of least distance -- ties to a free column (row4col < 0), then to the lowest index --
// with that distance in *lowest; -1 if no live column is reachable. A reached column has spc = NaN:
// it compares false, so it is never relaxed, never the minimum, never equal to it. The relaxing pass
// keeps each lane's minimum and first index (as reduced_min_first), so the first column at the least
// distance needs no second pass; only when it is assigned are the free columns after it (free_cols:
// the nfree free columns, ascending) checked for a tie.
EXGRAMED_MULTIVERSION int64_t relax_and_pick(const double* ci, const double* v, const int64_t* row4col,
                                             const int64_t* free_cols, int64_t nfree, double base, int64_t i,
                                             int64_t n, double* spc, int64_t* path, double* lowest) {
  const quad bq = {base, base, base, base};
  const quadi iq = {i, i, i, i};
  quad m[2] = {{kInf, kInf, kInf, kInf}, {kInf, kInf, kInf, kInf}};
  quadi mi[2] = {{-1, -1, -1, -1}, {-1, -1, -1, -1}};
  quadi jv[2] = {{0, 1, 2, 3}, {4, 5, 6, 7}};
  const quadi step = {kLanes, kLanes, kLanes, kLanes};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int q = 0; q < 2; ++q) {
      const int64_t jq = j + 4 * q;
      quad c, vq, s;
      quadi p;
      std::memcpy(&c, ci + jq, sizeof(c));
      std::memcpy(&vq, v + jq, sizeof(vq));
      std::memcpy(&s, spc + jq, sizeof(s));
      std::memcpy(&p, path + jq, sizeof(p));
      const quad r = bq + c - vq;
      const auto l = r < s;
      s = l ? r : s;
      p = l ? iq : p;
      std::memcpy(spc + jq, &s, sizeof(s));
      std::memcpy(path + jq, &p, sizeof(p));
      const auto lt = s < m[q];
      m[q] = lt ? s : m[q];
      mi[q] = lt ? jv[q] : mi[q];
      jv[q] += step;
    }
  }
  double best;
  int64_t first;
  lanes_argmin(m, mi, &best, &first);
  for (; j < n; ++j) {
    const double r = base + ci[j] - v[j];
    if (r < spc[j]) {
      spc[j] = r;
      path[j] = i;
    }
    if (spc[j] < best) {
      best = spc[j];
      first = j;
    }
  }
  *lowest = best;
  if (!(best < kInf)) return -1;
  // The tie rule: a free column at distance best after an assigned first one wins.
  if (row4col[first] < 0) return first;
  for (const int64_t* f = std::upper_bound(free_cols, free_cols + nfree, first); f != free_cols + nfree; ++f) {
    if (spc[*f] == best) return *f;
  }
  return first;
}

// After a search that reached the columns with spc[j] = NaN, at distance dist[j] (sink at min_val):
// v_j -= min_val - dist_j on those columns (keeps reduced costs >= 0 and the new path tight).
EXGRAMED_MULTIVERSION void update_column_duals(const double* spc, const double* dist, double min_val, int64_t n,
                                               double* v) {
  for (int64_t j = 0; j < n; ++j) v[j] = spc[j] != spc[j] ? v[j] - (min_val - dist[j]) : v[j];
}

// After the search from free row `cur` reached the free column `sink` at distance min_val: the row
// duals of the rows it scanned (each keeps its assigned pair tight), then the flip of the alternating
// path sink <- ... <- cur (path[j]: the row a column was reached from), which assigns cur.
inline void update_row_duals(LapWorkspace& ws, int64_t cur, double min_val, double* u, const double* dist) {
  u[cur] += min_val;
  for (const int64_t r : ws.scanned_rows) {
    if (r != cur) u[r] += min_val - dist[ws.col4row[r]];
  }
}

inline void augment(LapWorkspace& ws, int64_t cur, int64_t sink) {
  for (int64_t j = sink;;) {
    const int64_t r = ws.path[j];
    ws.row4col[j] = r;
    const int64_t prev = ws.col4row[r];
    ws.col4row[r] = j;
    j = prev;
    if (r == cur) break;
  }
}

// Jonker-Volgenant's augmenting row reduction (two passes) on the free rows left by the greedy row
// reduction: a free row takes its cheapest column, lowering that column's potential by the gap to
// its second cheapest (so the displaced owner, no longer tight there, is free and retried). Keeps
// every reduced cost >= 0 and assigned pairs tight; afterwards u is recomputed from v. Cheap per
// row (a few O(n) passes), it leaves few rows for the O(n^2) shortest-path augmentations.
// The cheapest column j1 is the first minimum of h = c_i - v; the second (j2, u2) the first minimum
// over the other columns -- what a one-pass scan keeping the two smallest in order finds.
// On any access to the costs: row_min2(i, &u1, &j1, &u2, &j2) gives the two smallest reduced costs of
// row i in that order (j2 = -1 when n = 1), row_min(i, &j) the first minimum, cost(i, j) one entry.
template <typename RowMin2, typename RowMin, typename Cost>
void augmenting_row_reduction_on(int64_t n, LapWorkspace& ws, RowMin2 row_min2, RowMin row_min, Cost cost) {
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
      row_min2(i, &u1, &j1, &u2, &j2);
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
    if (ws.col4row[i] >= 0) {
      ws.u[i] = cost(i, ws.col4row[i]) - v[ws.col4row[i]];
    } else {
      int64_t j = -1;
      ws.u[i] = row_min(i, &j);
    }
  }
}

void augmenting_row_reduction(const double* c, int64_t n, LapWorkspace& ws) {
  const double* v = ws.v.data();
  augmenting_row_reduction_on(
      n, ws,
      [&](int64_t i, double* u1, int64_t* j1, double* u2, int64_t* j2) {
        reduced_min2(c + i * n, v, n, u1, j1, u2, j2);
      },
      [&](int64_t i, int64_t* j) { return reduced_min_first(c + i * n, v, n, j); },
      [&](int64_t i, int64_t j) { return c[i * n + j]; });
}

// ------------------------------------------------------------------------------ the candidate solve
//
// The same shortest-augmenting-path solve, on a few candidate columns per row. One pass over each row
// (its costs formed into a buffer, then reduced by the warm column potentials) keeps the m cheapest
// columns by reduced cost h_ij = c_ij - v_j and theta_i, the (m+1)-th smallest: every other column of
// the row has h_ij >= theta_i. The potentials v only decrease during a solve (the augmenting row
// reduction and the dual update after each search lower them), so that bound stays valid to the end.
// Every step of the dense solve then runs on the candidates, with the bound standing in for the rest:
//   - row minima (row reduction, augmenting row reduction, u of free rows): a candidate minimum
//     <= theta_i is the row's; otherwise the row is re-selected against the current v;
//   - shortest paths: a scanned row i offers its non-candidate columns at distance >= base_i + theta_i;
//     while that is below the nearest tentative column, the row is relaxed over all its columns
//     (lazy expansion), so every column leaves the search at its exact distance.
// Hence the duals satisfy c_ij - u_i - v_j >= 0 on all n^2 pairs, tight on the assignment: the result
// is an optimal assignment (among equally good ones it may pick another than the dense solve), and
// the n x n cost matrix is never formed. The search's frontier is a heap over the touched columns, so
// a scan costs O(m log) instead of the dense solve's O(n) pass: the gain when the augmenting paths
// are short (uniform random scores: few scanned rows, rare expansions); long paths expand many rows.

constexpr int64_t kCandidates = 16;

// costs of row i into out (form_costs on one row: the same rounding as the dense matrix).
inline void cost_row(const LapWorkspace& ws, int64_t i, double* out) {
  const int64_t n = ws.n;
  form_costs(ws.score + i * n, ws.score2 == nullptr ? nullptr : ws.score2 + i * n, ws.scale2, n, ws.sign, ws.clamp,
             out);
}

// The m (<= kCandidates) cheapest columns of a row (costs c) by h_j = c_j - v_j (ties: the lower index),
// ascending, into cols / costs; *theta = the next smallest (+inf when every column is a candidate).
// A block of eight is skipped when none of it is below the (m+1)-th smallest so far.
EXGRAMED_MULTIVERSION void select_row(const double* c, const double* v, int64_t n, int64_t m, int32_t* cols,
                                      double* costs, double* theta) {
  const int64_t keep = std::min(n, m + 1);  // the m candidates and the bound
  double hv[kCandidates + 1];
  int64_t hj[kCandidates + 1];
  int64_t cnt = 0;
  double thr = kInf;  // h of the keep-th smallest so far (+inf until keep are held)
  auto insert = [&](double h, int64_t j) {
    if (cnt == keep && !(h < thr)) return;  // ties keep the earlier (lower) index
    int64_t pos = cnt < keep ? cnt++ : keep - 1;
    while (pos > 0 && h < hv[pos - 1]) {
      hv[pos] = hv[pos - 1];
      hj[pos] = hj[pos - 1];
      --pos;
    }
    hv[pos] = h;
    hj[pos] = j;
    if (cnt == keep) thr = hv[keep - 1];
  };
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    quad h0, h1;
    reduced8(c, v, j, h0, h1);
    const quad tq = {thr, thr, thr, thr};
    const auto lt = (h0 < tq) | (h1 < tq);
    if ((lt[0] | lt[1] | lt[2] | lt[3]) == 0) continue;
    for (int l = 0; l < 4; ++l) insert(h0[l], j + l);
    for (int l = 0; l < 4; ++l) insert(h1[l], j + 4 + l);
  }
  for (; j < n; ++j) insert(c[j] - v[j], j);
  const int64_t mm = std::min(n, m);
  for (int64_t s = 0; s < mm; ++s) {
    cols[s] = static_cast<int32_t>(hj[s]);
    costs[s] = c[hj[s]];
  }
  *theta = n > m ? hv[m] : kInf;
}

struct CandidateSolve {
  LapWorkspace& ws;
  int64_t n, m;

  int64_t ncand() const { return std::min(n, m); }

  void select(int64_t i) {
    cost_row(ws, i, ws.rowbuf.data());
    select_row(ws.rowbuf.data(), ws.v.data(), n, m, ws.cand.data() + i * m, ws.cand_cost.data() + i * m,
               ws.theta.data() + i);
  }

  // The two smallest reduced costs of row i and their first columns, as reduced_min2 over the whole row.
  void row_min2(int64_t i, double* u1, int64_t* j1, double* u2, int64_t* j2) {
    for (int attempt = 0;; ++attempt) {
      const int32_t* cl = ws.cand.data() + i * m;
      const double* cc = ws.cand_cost.data() + i * m;
      double a = kInf, b = kInf;
      int64_t ja = -1, jb = -1;
      for (int64_t s = 0; s < ncand(); ++s) {
        const int64_t j = cl[s];
        const double h = cc[s] - ws.v[j];
        if (ja < 0 || h < a || (h == a && j < ja)) {
          b = a;
          jb = ja;
          a = h;
          ja = j;
        } else if (jb < 0 || h < b || (h == b && j < jb)) {
          b = h;
          jb = j;
        }
      }
      // Exact when both lie strictly below the bound (or the row has no other columns); a tie with
      // the bound could hide a lower index among the others.
      const double th = ws.theta[i];
      if (th == kInf || (a < th && b < th) || attempt > 0) {
        if (attempt > 0 && !(th == kInf || (a < th && b < th))) {  // re-selected and still unsure: whole row
          cost_row(ws, i, ws.rowbuf.data());
          reduced_min2(ws.rowbuf.data(), ws.v.data(), n, u1, j1, u2, j2);
          return;
        }
        *u1 = a;
        *j1 = ja;
        *u2 = b;
        *j2 = jb;
        return;
      }
      select(i);
    }
  }

  // min_j h_ij of row i (its first column in *arg).
  double row_min(int64_t i, int64_t* arg) {
    for (int attempt = 0;; ++attempt) {
      const int32_t* cl = ws.cand.data() + i * m;
      const double* cc = ws.cand_cost.data() + i * m;
      double a = kInf;
      int64_t ja = -1;
      for (int64_t s = 0; s < ncand(); ++s) {
        const int64_t j = cl[s];
        const double h = cc[s] - ws.v[j];
        if (ja < 0 || h < a || (h == a && j < ja)) {
          a = h;
          ja = j;
        }
      }
      if (a <= ws.theta[i] || attempt > 0) {
        if (!(a <= ws.theta[i])) {
          cost_row(ws, i, ws.rowbuf.data());
          return reduced_min_first(ws.rowbuf.data(), ws.v.data(), n, arg);
        }
        *arg = ja;
        return a;
      }
      select(i);
    }
  }

  // The augmenting row reduction of the dense solve, on the candidates.
  void augmenting_row_reduction() {
    augmenting_row_reduction_on(
        n, ws, [&](int64_t i, double* u1, int64_t* j1, double* u2, int64_t* j2) { row_min2(i, u1, j1, u2, j2); },
        [&](int64_t i, int64_t* j) { return row_min(i, j); }, [&](int64_t i, int64_t j) { return ws.cost_at(i, j); });
  }

  // Column j (not yet reached) at tentative distance r through row i.
  inline void relax(int64_t i, int64_t j, double r) {
    double& s = ws.spc[j];
    if (r < s) {
      if (s == kInf) ws.todo.push_back(j);  // touched: reset after the search
      s = r;
      ws.path[j] = i;
      heap_push(r, j);
    }
  }

  // The search's frontier: a binary min-heap of (distance, busy, column) -- busy = the column is
  // assigned, so at equal distance a free column comes first, then the lowest index (the dense
  // solve's rule). A column whose distance dropped has stale entries, skipped when popped.
  struct HeapEntry {
    double d;
    int64_t key;  // busy * 2^32 + j
  };
  std::vector<HeapEntry> heap;
  static bool later(const HeapEntry& a, const HeapEntry& b) { return a.d > b.d || (a.d == b.d && a.key > b.key); }
  void heap_push(double d, int64_t j) {
    heap.push_back({d, (ws.row4col[j] >= 0 ? (int64_t(1) << 32) : 0) + j});
    std::push_heap(heap.begin(), heap.end(), later);
  }
  // The nearest live column (-1 if none), without removing it.
  int64_t heap_top(double* d) {
    while (!heap.empty()) {
      const HeapEntry& t = heap.front();
      const int64_t j = t.key & 0xffffffffll;
      if (ws.spc[j] == t.d) {
        *d = t.d;
        return j;
      }
      std::pop_heap(heap.begin(), heap.end(), later);  // stale (reached, or improved since)
      heap.pop_back();
    }
    *d = kInf;
    return -1;
  }

  // All columns of row i (the lazy expansion, or a row whose candidates are all of its columns).
  void relax_row_dense(int64_t i, double base) {
    cost_row(ws, i, ws.rowbuf.data());
    const double* c = ws.rowbuf.data();
    const double* v = ws.v.data();
    for (int64_t j = 0; j < n; ++j) {
      const double s = ws.spc[j];
      if (s != s) continue;  // reached
      relax(i, j, base + c[j] - v[j]);
    }
  }

  // One shortest-path search from the free row cur and its augmentation (lap_impl's loop body).
  void augment_from(int64_t cur) {
    double* spc = ws.spc.data();
    double* dist = ws.dist.data();
    double* u = ws.u.data();
    double* v = ws.v.data();
    const double nan = std::numeric_limits<double>::quiet_NaN();
    ws.todo.clear();
    heap.clear();
    ws.reached.clear();
    ws.scanned_rows.clear();
    ws.pending_lb.clear();
    ws.pending_base.clear();
    ws.pending_row.clear();
    double pend_min = kInf;  // min over pending rows of their bound
    int64_t pend_arg = -1;   // its slot in the pending lists
    double min_val = 0.0;
    int64_t i = cur, sink = -1;
    while (sink < 0) {
      ws.scanned_rows.push_back(i);
      const double base = min_val - u[i];
      if (ws.theta[i] == kInf) {
        relax_row_dense(i, base);  // every column is a candidate
      } else {
        const int32_t* cl = ws.cand.data() + i * m;
        const double* cc = ws.cand_cost.data() + i * m;
        for (int64_t s = 0; s < ncand(); ++s) {
          const int64_t j = cl[s];
          if (spc[j] != spc[j]) continue;
          relax(i, j, base + cc[s] - v[j]);
        }
        const double lb = base + ws.theta[i];
        ws.pending_lb.push_back(lb);
        ws.pending_base.push_back(base);
        ws.pending_row.push_back(i);
        if (lb < pend_min) {
          pend_min = lb;
          pend_arg = static_cast<int64_t>(ws.pending_lb.size()) - 1;
        }
      }
      // The nearest tentative column (ties: a free one, then the lowest index); rows whose other
      // columns could be nearer are expanded first.
      double best = kInf;
      int64_t j = heap_top(&best);
      while (pend_arg >= 0 && pend_min < best) {
        ws.pending_lb[pend_arg] = kInf;
        relax_row_dense(ws.pending_row[pend_arg], ws.pending_base[pend_arg]);
        pend_min = kInf;
        pend_arg = -1;
        for (size_t t = 0; t < ws.pending_lb.size(); ++t) {
          if (ws.pending_lb[t] < pend_min) {
            pend_min = ws.pending_lb[t];
            pend_arg = static_cast<int64_t>(t);
          }
        }
        j = heap_top(&best);
      }
      TORCH_CHECK(j >= 0 && best < kInf, "linear_assignment: no finite assignment exists");
      std::pop_heap(heap.begin(), heap.end(), later);
      heap.pop_back();
      min_val = best;
      dist[j] = best;
      spc[j] = nan;  // reached
      ws.reached.push_back(j);
      if (ws.row4col[j] < 0) {
        sink = j;
      } else {
        i = ws.row4col[j];
      }
    }
    update_row_duals(ws, cur, min_val, u, dist);
    for (const int64_t j : ws.reached) v[j] -= min_val - dist[j];
    for (const int64_t j : ws.todo) spc[j] = kInf;  // every touched column (the reached ones too)
    augment(ws, cur, sink);
  }

  void run(bool row_reduction) {
    ws.cand.resize(n * m);
    ws.cand_cost.resize(n * m);
    ws.theta.resize(n);
    ws.rowbuf.resize(n);
    // Row reduction against v on the fresh candidates (their first is the row's minimum), with greedy
    // tight assignments.
    for (int64_t i = 0; i < n; ++i) {
      select(i);
      const int64_t bj = ws.cand[i * m];
      ws.u[i] = ws.cand_cost[i * m] - ws.v[bj];
      if (ws.row4col[bj] < 0) {
        ws.row4col[bj] = i;
        ws.col4row[i] = bj;
      }
    }
    if (row_reduction) augmenting_row_reduction();
    std::fill(ws.spc.begin(), ws.spc.end(), kInf);
    for (int64_t cur = 0; cur < n; ++cur) {
      if (ws.col4row[cur] < 0) augment_from(cur);
    }
  }
};

void lap_impl(const double* score, const double* score2, double scale2, int64_t n, bool maximize,
              bool clamp_positive, LapWorkspace& ws, bool warm, bool row_reduction, bool candidates) {
  ws.resize(n);
  ws.score = score;
  ws.score2 = score2;
  ws.scale2 = scale2;
  ws.sign = maximize ? -1.0 : 1.0;
  ws.clamp = clamp_positive;
  if (!warm) std::fill(ws.v.begin(), ws.v.end(), 0.0);
  std::fill(ws.col4row.begin(), ws.col4row.end(), -1);
  std::fill(ws.row4col.begin(), ws.row4col.end(), -1);
  ws.dense = !candidates;
  if (candidates) {
    CandidateSolve{ws, n, kCandidates}.run(row_reduction);
    return;
  }
  ws.cost.resize(n * n);
  double* cm = ws.cost.data();
  form_costs(score, score2, scale2, n * n, ws.sign, clamp_positive, cm);
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
    ws.free_cols.clear();
    for (int64_t j = 0; j < n; ++j) {
      if (ws.row4col[j] < 0) ws.free_cols.push_back(j);
    }
    double min_val = 0.0;
    int64_t i = cur, sink = -1;
    while (sink < 0) {
      ws.scanned_rows.push_back(i);
      double lowest = kInf;
      const int64_t j =
          relax_and_pick(cm + i * n, v, ws.row4col.data(), ws.free_cols.data(), static_cast<int64_t>(ws.free_cols.size()),
                         min_val - u[i], i, n, spc, ws.path.data(), &lowest);
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
    update_row_duals(ws, cur, min_val, u, dist);
    update_column_duals(spc, dist, min_val, n, v);
    augment(ws, cur, sink);
  }
}

}  // namespace

void lap_solve(const double* score, int64_t n, bool maximize, bool clamp_positive, LapWorkspace& ws, bool warm,
               bool row_reduction, bool candidates) {
  lap_impl(score, nullptr, 1.0, n, maximize, clamp_positive, ws, warm, row_reduction, candidates);
}

void lap_solve_sum(const double* score, const double* score2, int64_t n, bool maximize, bool clamp_positive,
                   LapWorkspace& ws, bool warm, bool row_reduction, double scale2) {
  lap_impl(score, score2, scale2, n, maximize, clamp_positive, ws, warm, row_reduction, false);
}

}  // namespace exgramed
