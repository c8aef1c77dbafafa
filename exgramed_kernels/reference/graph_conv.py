"""Reference GraphConv / GCN over fixed-degree kNN tables: gathers, scatters, one matmul.

The edges are walked in the kernels' order (per target node, sources in table order), so the max
aggregation reports the kernels' winner of a tie (the lowest source index, then the first table
slot) besides the value. Autograd through :func:`graph_conv` splits a max tie's gradient evenly
among the tied neighbours; :func:`graph_conv_backward` is the kernels' rule (all of it to the
winner). fp16/bf16 aggregate in fp32, fp64 in fp64.
"""
from __future__ import annotations

import torch

from ..checks import compute_dtype


def aggregation_edges(nbr: torch.Tensor, aggr: str, reverse: bool, acc_dtype: torch.dtype):
    """The messages ``x[src] -> node tgt`` of every graph, ``[G, N k]`` each, in the kernels' order, with
    their weights ``w`` (mean: ``1 / in-degree``; gcn: ``D^-1/2 A D^-1/2``) and gcn's self weight ``selfw``
    ``[G, N]`` (``1 / deg``), both None where the aggregation has none.

    Edge ``(i, nbr[g, i, s])``. ``reverse=False``: node i aggregates its table row; ``reverse=True``: node
    ``j = nbr[g, i, s]`` aggregates i (PyG's ``source_to_target`` flow), edges sorted by target, sources in
    increasing order. For gcn, D is the in-degree counting one self loop per node; table entries
    ``nbr[g, i, s] == i`` are that self loop (PyG ``add_remaining_self_loops``), not extra edges.
    """
    G, N, k = nbr.shape
    E = N * k
    flat = nbr.reshape(G, E)
    rows = torch.arange(N, device=nbr.device).repeat_interleave(k).expand(G, E)
    if reverse:
        tgt, perm = torch.sort(flat, dim=1, stable=True)
        src = torch.div(perm, k, rounding_mode="floor")
    else:
        src, tgt = flat, rows
    w = selfw = None
    if aggr == "mean":
        cnt = torch.zeros(G, N, dtype=acc_dtype, device=nbr.device).scatter_add_(
            1, tgt, torch.ones_like(tgt, dtype=acc_dtype))
        w = torch.gather(cnt.reciprocal(), 1, tgt)
    elif aggr == "gcn":
        keep = (src != tgt).to(acc_dtype)
        deg = torch.ones(G, N, dtype=acc_dtype, device=nbr.device).scatter_add_(1, tgt, keep)
        dis = deg.rsqrt()
        w = torch.gather(dis, 1, src) * torch.gather(dis, 1, tgt) * keep
        selfw = deg.reciprocal()
    return src, tgt, w, selfw


def aggregate(x: torch.Tensor, nbr: torch.Tensor, aggr: str, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(agg, argmax)``: ``AGG_{j in N(i)} x_j`` per node ``[G, N, d]`` in x's dtype (an empty neighbourhood
    gives 0; gcn: the whole propagation ``D^-1/2 (A + I) D^-1/2 x``), and for max the winning message
    position int32 ``[G, N, d]`` (-1 for an empty neighbourhood; ``[0, N, d]`` for the other aggregations)."""
    G, N, d = x.shape
    acc = compute_dtype(x.dtype)
    src, tgt, w, selfw = aggregation_edges(nbr, aggr, reverse, acc)
    E = src.shape[1]
    xs = x.to(acc)
    msg = torch.gather(xs, 1, src.unsqueeze(-1).expand(G, E, d))
    idx = tgt.unsqueeze(-1).expand(G, E, d)
    if aggr == "max":
        agg = xs.new_zeros(G, N, d).scatter_reduce(1, idx, msg, reduce="amax", include_self=False)
        # Winner per (node, feature): the lowest source index among the maxima, then the first position.
        pos = torch.arange(E, device=x.device).expand(G, E)
        key = torch.where(msg == torch.gather(agg, 1, idx), (src * E + pos).unsqueeze(-1).expand(G, E, d), N * E)
        win = torch.full((G, N, d), N * E, dtype=torch.long, device=x.device).scatter_reduce(1, idx, key, reduce="amin")
        argmax = torch.where(win == N * E, -1, win % max(E, 1)).to(torch.int32)
        return agg.to(x.dtype), argmax
    agg = xs.new_zeros(G, N, d).scatter_add(1, idx, msg if w is None else msg * w.unsqueeze(-1))
    if selfw is not None:
        agg = agg + xs * selfw.unsqueeze(-1)
    return agg.to(x.dtype), x.new_empty((0, N, d), dtype=torch.int32)


def graph_conv_forward(x, nbr, w_root, w_rel, bias=None, aggr="max", reverse=False, relu=False):
    """``(out, xa, argmax)`` of ``graph_conv_forward``: ``xa = [x | agg]`` (``agg`` for gcn), ``out = xa @
    [w_root; w_rel] + bias`` (``agg @ w_rel + bias`` for gcn), then ReLU if asked; argmax from :func:`aggregate`."""
    agg, argmax = aggregate(x, nbr, aggr, reverse)
    xa = agg if aggr == "gcn" else torch.cat([x, agg], dim=-1)
    w = w_rel if aggr == "gcn" else torch.cat([w_root, w_rel], dim=0)
    out = xa @ w if bias is None else torch.addmm(bias, xa.flatten(0, 1), w).view(*x.shape[:2], w.shape[1])
    return (torch.relu(out) if relu else out).contiguous(), xa.contiguous(), argmax


def graph_conv(x, nbr, w_root, w_rel, bias=None, aggr="max", reverse=False, relu=False) -> torch.Tensor:
    """PyG ``GraphConv`` / ``GCNConv`` on G graphs: ``[G, N, d] -> [G, N, h]`` (differentiable).

    ``aggr in {max, mean, sum}``: ``out_i = x_i @ w_root + AGG_{j in N(i)} x_j @ w_rel + bias``.
    ``aggr="gcn"``: ``out = D^-1/2 (A + I) D^-1/2 x @ w_rel + bias`` (``w_root`` is not used).
    Then ``relu`` if asked. See :func:`aggregation_edges` for the neighbourhoods.
    """
    return graph_conv_forward(x, nbr, w_root, w_rel, bias, aggr, reverse, relu)[0]


def graph_conv_backward(grad_out, out, xa, argmax, nbr, w_root, w_rel, aggr, reverse, relu):
    """``(grad_x, grad_w, grad_bias)`` of ``graph_conv_forward`` (``grad_w = [grad_w_root; grad_w_rel]``, ``[2d, h]``;
    ``[d, h]`` for gcn); a max tie's gradient goes to the winner in ``argmax``."""
    G, N, k = nbr.shape
    d, h = w_root.shape
    gp = grad_out.to(xa.dtype)
    if relu:
        gp = torch.where(out > 0, gp, torch.zeros_like(gp))
    gw = xa.flatten(0, 1).t() @ gp.flatten(0, 1)
    gb = gp.sum((0, 1))
    acc = compute_dtype(xa.dtype)
    gagg = (gp @ w_rel.t()).to(acc)
    gx = torch.zeros(G, N, d, dtype=acc, device=xa.device) if aggr == "gcn" else (gp @ w_root.t()).to(acc)
    src, tgt, w, selfw = aggregation_edges(nbr, aggr, reverse, acc)
    E = src.shape[1]
    back = torch.gather(gagg, 1, tgt.unsqueeze(-1).expand(G, E, d))
    if aggr == "max":
        pos = torch.arange(E, device=xa.device).view(1, E, 1)
        back = back * (torch.gather(argmax.long(), 1, tgt.unsqueeze(-1).expand(G, E, d)) == pos)
    elif w is not None:
        back = back * w.unsqueeze(-1)
    gx = gx.scatter_add(1, src.unsqueeze(-1).expand(G, E, d), back)
    if selfw is not None:
        gx = gx + gagg * selfw.unsqueeze(-1)
    return gx.to(xa.dtype), gw.contiguous(), gb
