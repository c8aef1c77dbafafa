"""`knn_graph`: batched k-nearest-neighbour graphs, and their reverse (in-neighbour) form."""
from __future__ import annotations

import torch

from . import reference
from ._backend import register_fallback
from .checks import check_knn_args


@torch.library.register_fake("exgramed::knn_graph")
def _knn_graph_fake(x, k, metric="l2"):
    check_knn_args(x, k, metric, check_values=False)
    return x.new_empty((x.shape[0], x.shape[1], k), dtype=torch.long)


@register_fallback("knn_graph")
def _knn_graph_reference(x, k, metric="l2"):
    check_knn_args(x, k, metric)
    return reference.knn_graph(x, k, metric)


def knn_graph(x: torch.Tensor, k: int, metric: str = "l2", backend: str = "auto") -> torch.Tensor:
    r"""k nearest other nodes of every node, for G graphs at once.

    For graph g and node i, returns the k indices j != i with the smallest distance

    * ``metric="l2"`` (the official ExGra-Med code): :math:`D_{ij} = \lVert x_i - x_j \rVert_2^2`
    * ``metric="cosine"`` (the paper's wording): :math:`D_{ij} = 1 - \cos(x_i, x_j)`, where a
      zero vector has cosine 0 to every vector (distance 1),

    nearest first; equal distances are broken by the lower index, so the result is
    deterministic. Edge ``(i, nbr[g, i, s])`` is the s-th out-edge of node i: every node has
    out-degree k, ``|E| = N k`` per graph.

    Numerics: the input is first scaled by a power of two per graph (l2) or per row (cosine),
    which changes no neighbour but keeps every square in range, so inputs of any finite
    magnitude work (fp32 squares alone overflow above ``|x| ~ 1.8e19``); candidates come from a
    GEMM in fp32 (fp64 for fp64 input; fp16/bf16 are upcast); the final ranking uses exact fp64
    distances of the best ``k + 8`` candidates.

    Args:
        x: ``[G, N, d]`` float16, bfloat16, float32 or float64; any strides. Finite.
        k: neighbours per node, ``1 <= k < N``.
        metric: ``"l2"`` or ``"cosine"``.
        backend: ``"auto"`` (the compiled CPU/CUDA kernel of ``torch.ops.exgramed.knn_graph``)
            or ``"triton"`` (the Triton kernel; GPU, or CPU under ``TRITON_INTERPRET=1``).

    Returns:
        ``nbr``: int64 ``[G, N, k]`` on x's device. ``G = 0`` gives an empty result.
    """
    if backend == "auto":
        return torch.ops.exgramed.knn_graph(x, k, metric)
    if backend == "triton":
        from .triton.knn_graph import knn_graph_triton

        return knn_graph_triton(x, k, metric)
    raise ValueError(f"knn_graph: backend must be 'auto' or 'triton', got {backend!r}")


def reverse_neighbors(nbr: torch.Tensor, num_nodes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-neighbour (reverse) structure of fixed-degree neighbour tables, in CSR form.

    Node j's in-neighbours are the nodes i with j in ``nbr[g, i, :]``; a node may have none.
    PyG's default ``source_to_target`` flow on ``knn_graph`` edges aggregates over exactly these.

    Args:
        nbr: int64 ``[G, N, k]``, entries in ``[0, N)``.
        num_nodes: N (defaults to ``nbr.shape[1]``).

    Returns:
        ``(ptr, src)``: ``ptr`` int64 ``[G, N + 1]`` offsets and ``src`` int64 ``[G, N * k]``, so that the
        in-neighbours of node j of graph g are ``src[g, ptr[g, j]:ptr[g, j + 1]]``, in increasing order.
    """
    G, N, k = nbr.shape
    n = N if num_nodes is None else num_nodes
    if nbr.numel() and (int(nbr.min()) < 0 or int(nbr.max()) >= n):
        raise RuntimeError(f"reverse_neighbors: nbr entries must lie in [0, {n})")
    dst = nbr.reshape(G, N * k)
    src = torch.arange(N, device=nbr.device).repeat_interleave(k).expand(G, N * k)
    # Sort edges by target, then source (a stable sort of source-ordered edges keeps that order).
    order = torch.sort(dst, dim=1, stable=True).indices
    counts = torch.zeros(G, n, dtype=torch.long, device=nbr.device).scatter_add_(1, dst, torch.ones_like(dst))
    ptr = torch.cat([counts.new_zeros(G, 1), counts.cumsum(1)], dim=1)
    return ptr, torch.gather(src, 1, order)
