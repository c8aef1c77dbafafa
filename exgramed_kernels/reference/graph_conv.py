"""Reference GraphConv / GCN over fixed-degree kNN tables: gather, scatter, two matmuls.

Written to mirror PyG's message passing literally (edge list, scatter per target), so it can
be compared against PyG and against the fused kernels. Low-precision inputs are computed in
float32 and rounded once at the end.
"""
from __future__ import annotations

import torch

AGGRS = ("max", "mean", "sum", "gcn")


def graph_edges(nbr: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-graph edge lists ``(src, tgt)``, int64 ``[G, N*k]``, message ``x[src] -> node tgt``.

    Edge ``e = i*k + s`` joins node i and ``nbr[g, i, s]``. ``reverse=False``: node i aggregates its
    table row (``src = nbr[g, i, s]``, ``tgt = i``); ``reverse=True``: node ``j = nbr[g, i, s]``
    aggregates i (PyG's ``source_to_target`` flow on ``edge_index = [i, nbr[i, s]]``).
    """
    G, N, k = nbr.shape
    rows = torch.arange(N, device=nbr.device).repeat_interleave(k).expand(G, N * k)
    cols = nbr.reshape(G, N * k)
    return (rows, cols) if reverse else (cols, rows)


def aggregate(x: torch.Tensor, nbr: torch.Tensor, aggr: str, reverse: bool) -> torch.Tensor:
    """``AGG_{j in N(i)} x_j`` per node, ``[G, N, d]``; an empty neighbourhood gives 0.

    For ``aggr="gcn"`` this is the whole propagation ``D^-1/2 (A + I) D^-1/2 x`` of PyG's
    ``gcn_norm``: D is the in-degree (in the aggregation direction) counting one self loop per
    node; table entries ``nbr[g, i, s] == i`` are that self loop (PyG ``add_remaining_self_loops``),
    not extra edges. ``max`` sends the gradient of a tie to every tied neighbour evenly.
    """
    G, N, d = x.shape
    src, tgt = graph_edges(nbr, reverse)
    msg = torch.gather(x, 1, src.unsqueeze(-1).expand(G, src.shape[1], d))
    idx = tgt.unsqueeze(-1).expand_as(msg)
    zeros = x.new_zeros(G, N, d)
    if aggr == "max":
        return zeros.scatter_reduce(1, idx, msg, reduce="amax", include_self=False)
    if aggr == "sum":
        return zeros.scatter_add(1, idx, msg)
    if aggr == "mean":
        cnt = torch.zeros(G, N, dtype=x.dtype, device=x.device).scatter_add(1, tgt, torch.ones_like(tgt, dtype=x.dtype))
        return zeros.scatter_add(1, idx, msg) / cnt.clamp_min(1).unsqueeze(-1)
    if aggr == "gcn":
        keep = (src != tgt).to(x.dtype)
        deg = torch.ones(G, N, dtype=x.dtype, device=x.device).scatter_add(1, tgt, keep)
        dis = deg.rsqrt()
        norm = torch.gather(dis, 1, src) * torch.gather(dis, 1, tgt) * keep
        return zeros.scatter_add(1, idx, msg * norm.unsqueeze(-1)) + x / deg.unsqueeze(-1)
    raise ValueError(f"graph_conv: aggr must be one of {AGGRS}, got {aggr!r}")


def graph_conv(
    x: torch.Tensor,
    nbr: torch.Tensor,
    w_root: torch.Tensor,
    w_rel: torch.Tensor,
    bias: torch.Tensor | None = None,
    aggr: str = "max",
    reverse: bool = False,
    relu: bool = False,
) -> torch.Tensor:
    """PyG ``GraphConv`` / ``GCNConv`` on G graphs: ``[G, N, d] -> [G, N, h]``.

    ``aggr in {max, mean, sum}``: ``out_i = x_i @ w_root + AGG_{j in N(i)} x_j @ w_rel + bias``.
    ``aggr="gcn"``: ``out = D^-1/2 (A + I) D^-1/2 x @ w_rel + bias`` (``w_root`` is not used).
    Then ``relu`` if asked. See :func:`aggregate` for the neighbourhoods.
    """
    dt = x.dtype
    ct = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
    x, w_root, w_rel = x.to(ct), w_root.to(ct), w_rel.to(ct)
    agg = aggregate(x, nbr, aggr, reverse)
    out = agg @ w_rel if aggr == "gcn" else x @ w_root + agg @ w_rel
    if bias is not None:
        out = out + bias.to(ct)
    if relu:
        out = torch.relu(out)
    return out.to(dt)
