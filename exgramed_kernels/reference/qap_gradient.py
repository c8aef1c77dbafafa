"""Reference gradient of the quadratic term of graph matching (``qap_gradient``), pure PyTorch.

    q(X) = sum_{e in E1} sum_{f in E2} Q[e, f] X[s1(e), s2(f)] X[t1(e), t2(f)]
    dq/dX[x, y] = sum_{s1(e)=x, s2(f)=y} Q[e,f] X[t1(e), t2(f)] + sum_{t1(e)=x, t2(f)=y} Q[e,f] X[s1(e), s2(f)]

Edge e = i*k + s of graph 1 is (s1, t1) = (i, nbr1[i, s]); edge f = a*k + t of graph 2 is (a, nbr2[a, t]).
"""
from __future__ import annotations

import torch


def pair_gather(X: torch.Tensor, idx1: torch.Tensor, idx2: torch.Tensor) -> torch.Tensor:
    """out[g, e, f] = X[g, idx1[g, e], idx2[g, f]]."""
    G, N, _ = X.shape
    rows = torch.gather(X, 1, idx1.unsqueeze(2).expand(G, idx1.shape[1], N))
    return torch.gather(rows, 2, idx2.unsqueeze(1).expand(G, idx1.shape[1], idx2.shape[1]))


def edge_ends(nbr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)``, int64 ``[G, N k]``: the head and the tail of every edge ``e = i k + s = (i, nbr[i, s])``."""
    G, N, k = nbr.shape
    src = torch.arange(N, device=nbr.device).repeat_interleave(k).expand(G, N * k)
    return src, nbr.reshape(G, N * k)


def qap_gradient(X: torch.Tensor, nbr1: torch.Tensor, nbr2: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Gradient of the quadratic term q at X ``[G, N, N]`` for dense Q ``[G, N*k, N*k]``: ``[G, N, N]``."""
    G, N, k = nbr1.shape
    if k == 0 or N == 0:
        return torch.zeros_like(X)
    s1, t1 = edge_ends(nbr1)
    s2, t2 = edge_ends(nbr2)
    Q = Q.to(X.dtype)
    from_src = (Q * pair_gather(X, t1, t2)).view(G, N, k, N, k).sum((2, 4))
    # The target term scatters Q[e, f] X[s1(e), s2(f)] to (t1(e), t2(f)): 0/1 incidence products.
    S1 = torch.nn.functional.one_hot(t1, N).to(X.dtype)
    S2 = torch.nn.functional.one_hot(t2, N).to(X.dtype)
    from_tgt = S1.transpose(1, 2) @ (Q * pair_gather(X, s1, s2)) @ S2
    return from_src + from_tgt


