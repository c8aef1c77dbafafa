"""Reference edge-pair indicator of matchings, from one-hot incidence matrices (a different route from the
package's gathers)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def edge_pair_indicator(Z: torch.Tensor, nbr1: torch.Tensor, nbr2: torch.Tensor) -> torch.Tensor:
    """``P[e, f] = Z[i, a] Z[j, b]`` via incidence matrices: heads ``S`` and tails ``T`` of the edges."""
    G, N, k = nbr1.shape
    eye = torch.eye(N, dtype=Z.dtype, device=Z.device)
    S = eye.repeat_interleave(k, dim=0).expand(G, N * k, N)  # S[e, i] = 1 iff e leaves i
    T1 = F.one_hot(nbr1.reshape(G, N * k), N).to(Z.dtype)  # T1[e, j] = 1 iff e enters j
    T2 = F.one_hot(nbr2.reshape(G, N * k), N).to(Z.dtype)
    return (S @ Z @ S.transpose(1, 2)) * (T1 @ Z @ T2.transpose(1, 2))
