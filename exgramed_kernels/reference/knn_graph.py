"""Reference kNN graph: exact pairwise distances, stable sort, self excluded."""
from __future__ import annotations

import torch


def pairwise_distance(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Exact pairwise distances `[G, N, N]` in x's dtype (use float64 for an oracle).

    l2: squared Euclidean distance, computed from differences (no Gram-matrix cancellation).
    cosine: 1 - cos(x_i, x_j); a zero vector has cosine 0 to every vector (distance 1).
    Every pair is computed by the same operations in the same order, so equal pairs give equal
    distances (exact ties).
    """
    if metric == "l2":
        return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square()
    if metric == "cosine":
        norm = x.norm(dim=-1, keepdim=True)
        xn = torch.where(norm > 0, x / norm.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))
        # Each dot product summed elementwise in one fixed order, not by a GEMM, whose blocking can round
        # equal columns differently: duplicated points then tie exactly, as the kernels' ranking needs.
        G, N, d = xn.shape
        rows = max(1, (1 << 24) // max(1, N * d))
        dots = torch.cat([(xn[:, i:i + rows, None, :] * xn[:, None, :, :]).sum(-1) for i in range(0, N, rows)], 1) \
            if N else xn.new_zeros(G, 0, 0)
        return 1 - dots
    raise ValueError(f"knn_graph: metric must be 'l2' or 'cosine', got {metric!r}")


def knn_graph(x: torch.Tensor, k: int, metric: str = "l2") -> torch.Tensor:
    """For each node of each graph, its k nearest other nodes, nearest first, ties by lower index.

    x: [G, N, d] float. Returns int64 [G, N, k]. Computed in float64 (whatever x's dtype), on each graph
    scaled by the power of two that brings its largest |x| into [1/2, 1): exact, and it scales all of the
    graph's distances alike (l2) or not at all (cosine), but no square overflows or underflows, however
    large or small x is.
    """
    G, N, _ = x.shape
    if G == 0:
        return torch.empty(0, N, k, dtype=torch.long, device=x.device)
    x = x.double()
    exponent = torch.frexp(x.abs().amax(dim=(1, 2), keepdim=True)).exponent.clamp(-1022, 1022)
    dist = pairwise_distance(torch.ldexp(x, -exponent), metric)
    dist.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    # A stable sort keeps equal distances in index order: the lower index wins ties.
    return torch.sort(dist, dim=-1, stable=True).indices[..., :k].contiguous()
