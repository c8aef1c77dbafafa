"""Reference linear assignment: shortest augmenting paths with dual potentials, in float64.

For every problem g, the permutation sigma maximising (or minimising) sum_i score[g, i, sigma(i)].
Each augmentation is a Dijkstra search over reduced costs c_ij - u_i - v_j >= 0, one
vectorised column relaxation per step (O(N^2) torch ops per problem in all). Exact; slow in
Python, meant as the oracle for small N and the fallback without the compiled extension.
"""
from __future__ import annotations

import torch


def _lap_min(cost: torch.Tensor) -> torch.Tensor:
    """Column of each row of the minimum-cost assignment of one square float64 matrix."""
    n = cost.shape[0]
    inf = float("inf")
    u = torch.zeros(n, dtype=torch.float64)
    v = torch.zeros(n, dtype=torch.float64)
    col4row = torch.full((n,), -1, dtype=torch.long)
    row4col = torch.full((n,), -1, dtype=torch.long)
    for cur in range(n):
        spc = torch.full((n,), inf, dtype=torch.float64)  # shortest path cost to each column
        path = torch.full((n,), -1, dtype=torch.long)  # row preceding each column on its path
        done = torch.zeros(n, dtype=torch.bool)  # columns whose distance is final
        scanned_rows = []
        min_val = 0.0
        i, sink = cur, -1
        while sink < 0:
            scanned_rows.append(i)
            r = min_val + cost[i] - u[i] - v
            better = (~done) & (r < spc)
            path[better] = i
            spc = torch.where(better, r, spc)
            cand = torch.where(done, torch.full_like(spc, inf), spc)
            min_val = float(cand.min())
            if min_val == inf:
                raise RuntimeError("linear_assignment: no finite assignment exists")
            # Among equal minima: a free column first (ends the search), else the lowest index.
            ties = cand == min_val
            free_ties = ties & (row4col < 0)
            j = int(torch.nonzero(free_ties if bool(free_ties.any()) else ties)[0])
            done[j] = True
            if int(row4col[j]) < 0:
                sink = j
            else:
                i = int(row4col[j])
        # Dual update keeps reduced costs >= 0 and makes the new path tight.
        u[cur] += min_val
        for r_ in scanned_rows:
            if r_ != cur:
                u[r_] += min_val - spc[col4row[r_]]
        v[done] -= min_val - spc[done]
        j = sink
        while True:
            i = int(path[j])
            row4col[j] = i
            col4row[i], j = j, int(col4row[i])
            if i == cur:
                break
    return col4row


def linear_assignment(score: torch.Tensor, maximize: bool = True) -> torch.Tensor:
    """For each problem g of `score` [G, N, N], the column of each row of an optimal assignment.

    Maximises (``maximize=True``) or minimises sum_i score[g, i, sigma(i)] over permutations sigma.
    Computed in float64. Returns int64 [G, N] on score's device.
    """
    G, N, _ = score.shape
    c = score.detach().to(device="cpu", dtype=torch.float64)
    if maximize:
        c = -c
    out = torch.empty(G, N, dtype=torch.long)
    for g in range(G):
        out[g] = _lap_min(c[g]) if N else out[g]
    return out.to(score.device)
