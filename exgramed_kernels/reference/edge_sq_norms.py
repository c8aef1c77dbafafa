"""Reference ``edge_sq_norms``: the squared lengths of the kNN edges, pure PyTorch."""
from __future__ import annotations

import torch


def edge_sq_norms(h: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """Squared kNN edge lengths ``|h_i - h_j|^2`` for edge ``(i, j = nbr[g, i, s])`` at ``i * k + s``:
    ``[G, N, h], [G, N, k] -> [G, N k]`` (differentiable; the reference of ``edge_sq_norms``)."""
    G, N, k = nbr.shape
    tails = torch.gather(h, 1, nbr.reshape(G, N * k, 1).expand(G, N * k, h.shape[-1]))
    return (h.repeat_interleave(k, 1) - tails).square().sum(-1)
