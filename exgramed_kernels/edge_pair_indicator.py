"""Edge-pair indicators of matchings: ``P(Z)[g, e, f] = Z[g, i, a] Z[g, j, b]``, the derivative of the quadratic
term ``sum_{e, f} Q[e, f] X_ia X_jb`` with respect to ``Q`` at ``X = Z`` (edge ``e = (i, j)`` of graph 1,
``f = (a, b)`` of graph 2). ``qap_solve``'s backward builds ``dL/dQ`` from them: dense, or as the sparse op
``edge_pair_indicator_sparse`` (CPU), whose consumer is ``pair_scores_backward_sparse``.
"""
from __future__ import annotations

import torch

from . import reference
from ._backend import register_fallback, register_no_gradient
from .checks import check_indicator_args


def matching_of(Z: torch.Tensor) -> torch.Tensor:
    """The column of each row of 0/1 matchings ``Z [G, N, N]``, -1 for an empty row: int64 ``[G, N]``."""
    cols = Z.argmax(-1)
    return torch.where(Z.sum(-1) > 0, cols, torch.full_like(cols, -1))


def edge_pair_indicator(Z: torch.Tensor, nbr1: torch.Tensor, nbr2: torch.Tensor) -> torch.Tensor:
    """``P[g, e, f] = Z[g, i, a] * Z[g, j, b]`` for edge ``e = (i, j)`` of graph 1 and ``f = (a, b)`` of graph 2.

    Args:
        Z: ``[G, N, N]`` float (0/1 matchings, or any real matrix).
        nbr1, nbr2: int64 ``[G, N, k]`` neighbour tables of the two graphs.

    Returns:
        ``[G, N*k, N*k]`` in Z's dtype: the quadratic "matching" of BB-GM, the derivative of
        ``sum_{e, f} Q[e, f] X_ia X_jb`` with respect to ``Q`` at ``X = Z``.
    """
    G, N, k = nbr1.shape
    Nk = N * k
    # Z[i, a] for every (e, f): rows repeated by the head of e, columns by the head of f.
    za = Z[:, :, None, :, None].expand(G, N, k, N, k).reshape(G, Nk, Nk)
    # Z[j, b]: rows by the tail of e (nbr1), columns by the tail of f (nbr2).
    zj = torch.gather(Z, 1, nbr1.reshape(G, Nk, 1).expand(G, Nk, N))
    zb = torch.gather(zj, 2, nbr2.reshape(G, 1, Nk).expand(G, Nk, Nk))
    return za * zb


def _indicator_candidates(Z, weight, nbr1, nbr2, dtype):
    """The candidate entries of ``weight * edge_pair_indicator(Z)`` for a 0/1 matching ``Z [G, N, N]``: edge
    ``e = (i, j)`` pairs with the out-edge ``t`` of ``a = Z(i)``, hit when it ends at ``b = Z(j)``.
    Returns ``(cols, vals, hit)``, each ``[G, N k, k]``: column ``a k + t``, ``weight`` where hit (else 0)."""
    G, N, k = nbr1.shape
    Nk = N * k
    perm = matching_of(Z)
    a = perm.repeat_interleave(k, dim=1)  # [G, Nk]: the column of the head i of each edge e
    b = torch.gather(perm, 1, nbr1.reshape(G, Nk))  # the column of its tail j
    a0 = a.clamp_min(0)
    ends = torch.gather(nbr2, 1, a0.unsqueeze(2).expand(G, Nk, k))  # [G, Nk, k]: out-neighbours of a
    hit = (ends == b.unsqueeze(2)) & (a >= 0).unsqueeze(2) & (b >= 0).unsqueeze(2)
    w = torch.as_tensor(weight, dtype=dtype, device=nbr1.device).reshape(-1, 1, 1)
    cols = a0.unsqueeze(2) * k + torch.arange(k, device=nbr1.device)
    return cols, hit.to(dtype) * w, hit


def indicator_combination(terms, nbr1: torch.Tensor, nbr2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``sum_t weight_t * edge_pair_indicator(Z_t)`` for 0/1 matchings ``Z_t [G, N, N]``, weights scalars or ``[G]``.

    A matching's indicator has at most ``N k`` non-zeros per problem (:func:`_indicator_candidates`), so it
    is scattered from a fixed-shape ``[G, N k, k]`` candidate table (zero where there is no such edge) into
    zeros: one write of the ``[G, N k, N k]`` result instead of several dense products. Deterministic on
    the CPU.
    """
    G, N, k = nbr1.shape
    cands = [_indicator_candidates(Z, weight, nbr1, nbr2, dtype) for Z, weight in terms]
    out = torch.zeros(G, N * k, N * k, dtype=dtype, device=nbr1.device)
    return out.scatter_add_(2, torch.cat([c for c, _, _ in cands], 2), torch.cat([v for _, v, _ in cands], 2))


def indicator_combination_sparse(terms, nbr1: torch.Tensor, nbr2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`indicator_combination` as a coalesced sparse COO tensor ``[G, N k, N k]``: its non-zero
    entries only (``edge_pair_indicator_sparse``), no dense ``[G, N k, N k]`` zeros to write and scan. For
    consumers that take sparse gradients (``pair_scores``' backward)."""
    G, N, k = nbr1.shape
    Nk = N * k
    weights = torch.stack([torch.as_tensor(w, dtype=dtype, device=nbr1.device).expand(G) for _, w in terms])
    idx, vals = torch.ops.exgramed.edge_pair_indicator_sparse([Z for Z, _ in terms], weights, nbr1, nbr2)
    return torch.sparse_coo_tensor(idx, vals, (G, Nk, Nk), dtype=dtype, device=nbr1.device,
                                   check_invariants=False, is_coalesced=True)  # sorted and in range by construction


@torch.library.register_fake("exgramed::edge_pair_indicator_sparse")
def _edge_pair_indicator_sparse_fake(Z, weights, nbr1, nbr2):
    check_indicator_args(Z, weights, nbr1, nbr2)
    nnz = torch.library.get_ctx().new_dynamic_size()
    return nbr1.new_empty(3, nnz), weights.new_empty(nnz)


@register_fallback("edge_pair_indicator_sparse")
def _edge_pair_indicator_sparse_reference(Z, weights, nbr1, nbr2):
    """The definition: the non-zero entries of ``sum_t weights[t, g] edge_pair_indicator(Z_t)``, coalesced. Each
    ``Z_t`` is read as a 0/1 matching: row i's column is the first index of its maximum if that is > 0."""
    check_indicator_args(Z, weights, nbr1, nbr2)
    if not bool(torch.isfinite(weights).all()):
        raise RuntimeError("edge_pair_indicator_sparse: weights contains NaN or Inf")
    G, N, k = nbr1.shape
    if nbr1.numel() and not (0 <= int(torch.minimum(nbr1.min(), nbr2.min()))
                             and int(torch.maximum(nbr1.max(), nbr2.max())) < N):
        raise RuntimeError(f"edge_pair_indicator_sparse: nbr1 and nbr2 entries must lie in [0, {N})")
    dense = torch.zeros(G, N * k, N * k, dtype=torch.float64, device=nbr1.device)
    for z, w in zip(Z, weights):
        onehot = torch.zeros(G, N, N, dtype=torch.float64, device=z.device)
        top, col = z.max(-1)
        perm = torch.where(top > 0, col, torch.full_like(col, -1))
        onehot.scatter_(2, perm.clamp_min(0).unsqueeze(2), (perm >= 0).to(torch.float64).unsqueeze(2))
        dense += w.to(torch.float64).view(G, 1, 1) * reference.edge_pair_indicator(onehot, nbr1, nbr2)
    idx = dense.nonzero().T.contiguous()
    return idx, dense[tuple(idx)].to(weights.dtype)


register_no_gradient("edge_pair_indicator_sparse", "edge_pair_indicator_sparse (part of qap_solve's backward)")
