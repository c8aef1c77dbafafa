"""Reference kNN graph: exact pairwise distances, stable sort, self excluded."""
from __future__ import annotations

import torch


def pairwise_distance(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Exact pairwise distances `[G, N, N]` in x's dtype (use float64 for an oracle).

    l2: squared Euclidean distance, computed from differences (no Gram-matrix cancellation).
    cosine: 1 - cos(x_i, x_j) = |u_i - u_j|^2 / 2 for the unit vectors u, also from differences; a zero
    vector has cosine 0 to every vector (distance 1).

    Each distance is computed from its two rows alone, so coinciding points are exactly equidistant
    (a GEMM's rounding depends on where a column falls in its tiles) and ties go to the lower index.
    """
    if metric == "l2":
        return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square()
    if metric == "cosine":
        norm = x.norm(dim=-1, keepdim=True)
        xn = torch.where(norm > 0, x / norm.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))
        half_sq = torch.cdist(xn, xn, compute_mode="donot_use_mm_for_euclid_dist").square() / 2
        zero = norm.squeeze(-1) == 0
        return torch.where(zero.unsqueeze(-1) | zero.unsqueeze(-2), torch.ones_like(half_sq), half_sq)
    raise ValueError(f"knn_graph: metric must be 'l2' or 'cosine', got {metric!r}")


def knn_graph(x: torch.Tensor, k: int, metric: str = "l2") -> torch.Tensor:
    """For each node of each graph, its k nearest other nodes, nearest first, ties by lower index.

    x: [G, N, d] float. Returns int64 [G, N, k].
    """
    G, N, _ = x.shape
    if G == 0:
        return torch.empty(0, N, k, dtype=torch.long, device=x.device)
    dist = pairwise_distance(x.double() if x.dtype in (torch.float16, torch.bfloat16) else x, metric)
    dist.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    # A stable sort keeps equal distances in index order: the lower index wins ties.
    return torch.sort(dist, dim=-1, stable=True).indices[..., :k].contiguous()
