"""Reference multi-graph alignment: the pure-PyTorch oracle of ``torch.ops.exgramed.align``.

Same computation as the op (see ``exgramed_kernels.align``), written plainly: reference kNN,
reference GraphConv, reference QAP solver, and an ``autograd.Function`` for the IMLE/blackbox
estimator whose edge-pair indicators are built from one-hot incidence matrices (a different
route from the op's gathers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..align import problem_graphs
from ..config import DEFAULTS
from .edge_pair_indicator import edge_pair_indicator
from .graph_conv import graph_conv as _graph_conv
from .knn_graph import knn_graph as _knn_graph
from .pair_scores import gumbel_noise
from .qap_solve import qap_solve as _qap_solve


def hamming_loss(Z: torch.Tensor) -> torch.Tensor:
    """``sum(Z (1 - T) + (1 - Z) T) / N`` per problem against the identity T. Z: [P, N, N] -> [P]."""
    N = Z.shape[-1]
    T = torch.eye(N, dtype=Z.dtype, device=Z.device)
    return (Z * (1 - T) + (1 - Z) * T).sum((-2, -1)) / N


class _QAPEstimator(torch.autograd.Function):
    """Z = qap_solve(U, Q); backward: the IMLE / blackbox / symmetric-IMLE estimates."""

    @staticmethod
    def forward(ctx, U, Q, nbr1, nbr2, opts):
        Z = _qap_solve(U.detach(), nbr1, nbr2, Q.detach(), **opts["solver"])[0].to(U.dtype)
        ctx.save_for_backward(U, Q, nbr1, nbr2, Z)
        ctx.opts = opts
        return Z

    @staticmethod
    def backward(ctx, gZ):
        U, Q, nbr1, nbr2, Z = ctx.saved_tensors
        lam, est = ctx.opts["lambda_"], ctx.opts["estimator"]

        def solve(u):
            return _qap_solve(u, nbr1, nbr2, Q.detach(), **ctx.opts["solver"])[0].to(U.dtype)

        if est == "imle_symmetric":
            zp, zm, c = solve(U + lam * gZ), solve(U - lam * gZ), 1 / (2 * lam)
        else:
            zp, zm, c = Z, solve(U - lam * gZ), 1 / lam
        dP = (edge_pair_indicator(zp, nbr1, nbr2) - edge_pair_indicator(zm, nbr1, nbr2)) * c
        return (zp - zm) * c, dP, None, None, None


def align(x, w_root1, w_rel1, bias1, w_root2, w_rel2, bias2, unary_noise=None, quadratic_noise=None,
          dropout_mask=None, noise_seed=None, *, config=None, **options):
    """Reference of ``torch.ops.exgramed.align`` (same arguments, options and results; see the op's docs)."""
    cfg = (DEFAULTS if config is None else config).replace(**options)
    k, mode, metric, aggr, reverse = cfg.k, cfg.mode, cfg.metric, cfg.aggr, cfg.reverse
    copy_structure, edge_floor, noise_scale = cfg.copy_structure, cfg.edge_floor, cfg.noise_scale
    K, N, _ = x.shape
    graphs = torch.cat([x, x.mean(0, keepdim=True)]) if mode == "barycenter" else x
    nbr = _knn_graph(graphs.detach(), k, metric)
    h = _graph_conv(graphs, nbr, w_root1, w_rel1, bias1, aggr, reverse, True)
    if dropout_mask is not None:
        h = h * dropout_mask[0]
    h = _graph_conv(h, nbr, w_root2, w_rel2, bias2, aggr, reverse, True)
    if dropout_mask is not None:
        h = h * dropout_mask[1]
    src, dst = problem_graphs(K, mode)
    hn = F.normalize(h, dim=-1)
    nbr1 = nbr[src]
    nbr2 = nbr1 if copy_structure else nbr[dst]

    def edges(hg, nb):  # normalize(h_i - h_j) for edge (i, nb[i, s]), row i * k + s
        P = hg.shape[0]
        tails = hg[torch.arange(P)[:, None, None], nb]  # [P, N, k, h]
        diff = hg[:, :, None, :] - tails
        if edge_floor > 0:  # length sqrt(|d|^2 + (edge_floor r)^2), r the graph's RMS node norm (detached)
            r2 = hg.detach().pow(2).sum(-1).mean(1).view(P, 1, 1, 1)
            return (diff / (diff.pow(2).sum(-1, keepdim=True) + edge_floor ** 2 * r2).sqrt()).reshape(P, N * k, -1)
        return F.normalize(diff, dim=-1).reshape(P, N * k, -1)

    U = hn[src] @ hn[dst].transpose(1, 2) - 0.5
    Q = 0.5 * (edges(h[src], nbr1) @ edges(h[dst], nbr2).transpose(1, 2) - 0.5)
    S = 1
    for noise in (unary_noise, quadratic_noise, noise_seed):
        if noise is not None:
            S = noise.shape[0]
    P = len(src)
    U = U.unsqueeze(0).expand(S, P, N, N)
    Q = Q.unsqueeze(0).expand(S, P, N * k, N * k)
    if unary_noise is not None:
        U = U + noise_scale * unary_noise.expand(S, P, N, N)
    if quadratic_noise is not None:
        Q = Q + 0.5 * noise_scale * quadratic_noise.expand(S, P, N * k, N * k)
    elif noise_seed is not None:  # pair_scores' in-kernel noise: problem p of sample s from seed [s, p]
        g = gumbel_noise(noise_seed.expand(S, P).reshape(-1), N * k).to(Q.dtype).view(S, P, N * k, N * k)
        Q = Q + 0.5 * noise_scale * g
    opts = {
        "lambda_": cfg.lambda_,
        "estimator": cfg.estimator,
        "solver": dict(method=cfg.solver, max_iter=cfg.max_iter, tol=cfg.tol, restarts=cfg.restarts,
                       partial=cfg.partial, seed=cfg.seed),
    }
    nb1 = nbr1.repeat(S, 1, 1)
    nb2 = nbr2.repeat(S, 1, 1)
    Z = _QAPEstimator.apply(U.reshape(S * P, N, N), Q.reshape(S * P, N * k, N * k), nb1, nb2, opts)
    return hamming_loss(Z).sum() / (S * P), Z
