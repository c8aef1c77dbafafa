"""Graph-matching problems for the qap_* and edge_pair_indicator tests: random ones, the objective by its
definition, and a tiny hand-built one."""
import itertools

import torch

# N = 3, k = 1. Graph 1 is the cycle 0 -> 1 -> 2 -> 0, graph 2 the reverse cycle 0 -> 2 -> 1 -> 0.
NBR1 = torch.tensor([[[1], [2], [0]]])
NBR2 = torch.tensor([[[2], [0], [1]]])
I3 = torch.eye(3, dtype=torch.float64)[None]
# sigma = (0 -> 0, 1 -> 2, 2 -> 1) maps every edge of graph 1 onto an edge of graph 2:
# (0,1) -> (0,2) = f0, (1,2) -> (2,1) = f2, (2,0) -> (1,0) = f1.
SIGMA = torch.tensor([[[1.0, 0, 0], [0, 0, 1], [0, 1, 0]]], dtype=torch.float64)
P_SIGMA = torch.zeros(1, 3, 3, dtype=torch.float64)
P_SIGMA[0, 0, 0] = P_SIGMA[0, 1, 2] = P_SIGMA[0, 2, 1] = 1.0


def rand_nbr(G, N, k, gen, self_loops=False):
    """Random fixed-degree neighbour tables (distinct neighbours, self excluded unless asked)."""
    out = torch.empty(G, N, k, dtype=torch.long)
    for g in range(G):
        for i in range(N):
            if self_loops:
                out[g, i] = torch.randint(0, N, (k,), generator=gen)
            else:
                p = torch.randperm(N - 1, generator=gen)[:k]
                out[g, i] = p + (p >= i).long()
    return out


def problem(G, N, k, gen, dtype=torch.float64, self_loops=False):
    U = torch.randn(G, N, N, generator=gen, dtype=torch.float64).to(dtype)
    n1, n2 = rand_nbr(G, N, k, gen, self_loops), rand_nbr(G, N, k, gen, self_loops)
    Q = torch.randn(G, N * k, N * k, generator=gen, dtype=torch.float64).to(dtype)
    return U, n1, n2, Q


def naive_objective(Z, U, n1, n2, Q):
    """f(Z) by the definition, edge pair by edge pair (the oracle of the oracle)."""
    G, N, k = n1.shape
    out = []
    for g in range(G):
        v = float((U[g].double() * Z[g].double()).sum())
        for i, s, a, t in itertools.product(range(N), range(k), range(N), range(k)):
            j, b = int(n1[g, i, s]), int(n2[g, a, t])
            v += float(Q[g, i * k + s, a * k + t]) * float(Z[g, i, a]) * float(Z[g, j, b])
        out.append(v)
    return torch.tensor(out, dtype=torch.float64)
