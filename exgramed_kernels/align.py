"""``align``: the differentiable multi-graph alignment loss, and the ``MultiGraphAlignment`` module.

The op is a composite of the other exgramed ops (``knn_graph``, ``graph_conv``, ``qap_solve``)
and plain torch ops, registered as ``CompositeImplicitAutograd``: autograd flows through
``graph_conv``'s and ``qap_solve``'s registered formulas (the latter is the IMLE / blackbox
estimator of ``estimators.py``), and ``torch.compile`` traces straight through it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .estimators import check_estimator

MODES = ("barycenter", "pairwise")
SOLVERS = ("fw", "sinkhorn")

# The official ExGra-Med code where it differs from the paper's wording, and its noise.
OFFICIAL = dict(
    metric="l2",  # L2 kNN
    copy_structure=True,  # graph 2 of each problem gets graph 1's edges
    reverse=True,  # PyG GraphConv on knn_graph edges aggregates over in-neighbours
    partial=True,  # LPMP solves partial matchings
    shared_noise=True,  # one unary Gumbel sample per step, shared by every problem
    noise_scale=0.05,
    lambda_=80.0,
    estimator="blackbox",  # BB-GM's GraphMatchingModule
    dropout=0.1,
    edge_floor=0.0,  # F.normalize(h_i - h_j)
)

# The noise scale is chosen by the learning experiment (benchmarks/results/align.md): with these
# settings 0.05 learns slowly, 0.5 and above fail on the harder planted problem, 0.3 does best overall.
DEFAULTS = dict(
    metric="cosine",
    copy_structure=False,
    reverse=False,
    partial=False,
    shared_noise=False,
    noise_scale=0.3,
    lambda_=80.0,
    estimator="imle",
    dropout=0.0,
    edge_floor=0.1,  # bounded gradients for nearly coincident node features (align's docstring)
)


def problem_graphs(K: int, mode: str) -> tuple[list[int], list[int]]:
    """``(src, dst)``: problem p matches graph ``src[p]`` (graph 1) to graph ``dst[p]`` (graph 2).

    ``barycenter`` (graphs 0..K-1 the modalities, K the barycenter): k -> K for each k, then K -> k.
    ``pairwise``: every pair k < l as k -> l, then the same pairs as l -> k.
    """
    if mode == "barycenter":
        return list(range(K)) + [K] * K, [K] * K + list(range(K))
    if mode == "pairwise":
        pairs = [(a, b) for a in range(K) for b in range(a + 1, K)]
        return [a for a, _ in pairs] + [b for _, b in pairs], [b for _, b in pairs] + [a for a, _ in pairs]
    raise RuntimeError(f"align: mode must be 'barycenter' or 'pairwise', got '{mode}'")


def _is_concrete(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return not torch.compiler.is_compiling() and not is_fake(t) and t.device.type != "meta"


def _check_align_args(x, w_root1, w_rel1, bias1, w_root2, w_rel2, bias2, unary_noise, quadratic_noise,
                      dropout_mask, k, lambda_, noise_scale, solver, estimator, mode, noise_seed=None,
                      edge_floor=0.0):
    if x.dim() != 3:
        raise RuntimeError(f"align: x must have shape [K, B, d] (3 dims), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise RuntimeError(f"align: x must be a floating-point tensor, got {x.dtype}")
    K, N, d = x.shape
    if K < 2:
        raise RuntimeError(f"align: x must hold at least 2 modalities (K >= 2), got K = {K}")
    if not 1 <= k < N:
        raise RuntimeError(f"align: k must satisfy 1 <= k < B (B = {N}), got k = {k}")
    if mode not in MODES:
        raise RuntimeError(f"align: mode must be 'barycenter' or 'pairwise', got '{mode}'")
    if solver not in SOLVERS:
        raise RuntimeError(f"align: solver must be 'fw' or 'sinkhorn', got '{solver}'")
    check_estimator(estimator, lambda_, "align")
    if not (noise_scale >= 0 and math.isfinite(noise_scale)):
        raise RuntimeError(f"align: noise_scale must be a finite number >= 0, got {noise_scale}")
    h = w_root1.shape[-1] if w_root1.dim() == 2 else -1
    for name, w, shape in (("w_root1", w_root1, (d, h)), ("w_rel1", w_rel1, (d, h)),
                           ("w_root2", w_root2, (h, h)), ("w_rel2", w_rel2, (h, h))):
        if tuple(w.shape) != shape:
            raise RuntimeError(f"align: {name} must have shape {list(shape)} ([d, h] then [h, h]), got {tuple(w.shape)}")
    for name, b in (("bias1", bias1), ("bias2", bias2)):
        if b is not None and tuple(b.shape) != (h,):
            raise RuntimeError(f"align: {name} must have shape [{h}], got {tuple(b.shape)}")
    for name, t in (("w_root1", w_root1), ("w_rel1", w_rel1), ("w_root2", w_root2), ("w_rel2", w_rel2),
                    ("bias1", bias1), ("bias2", bias2), ("unary_noise", unary_noise),
                    ("quadratic_noise", quadratic_noise), ("dropout_mask", dropout_mask)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"align: {name} must be on x's device {x.device}, got {t.device}")
        if t is not None and not t.dtype.is_floating_point:
            raise RuntimeError(f"align: {name} must be a floating-point tensor, got {t.dtype}")
    P = len(problem_graphs(K, mode)[0])
    G = K + 1 if mode == "barycenter" else K
    S = None
    for name, t, n in (("unary_noise", unary_noise, N), ("quadratic_noise", quadratic_noise, N * k)):
        if t is None:
            continue
        if t.dim() != 4 or t.shape[1] not in (1, P) or tuple(t.shape[2:]) != (n, n):
            raise RuntimeError(
                f"align: {name} must have shape [S, P, {n}, {n}] or [S, 1, {n}, {n}] (P = {P} problems), "
                f"got {tuple(t.shape)}")
        if S is not None and t.shape[0] != S:
            raise RuntimeError("align: unary_noise and quadratic_noise must have the same number of samples S")
        S = t.shape[0]
        if S < 1:
            raise RuntimeError(f"align: {name} must hold at least one sample (S >= 1)")
    if not (edge_floor >= 0 and math.isfinite(edge_floor)):
        raise RuntimeError(f"align: edge_floor must be a finite number >= 0, got {edge_floor}")
    if noise_seed is not None:
        if quadratic_noise is not None:
            raise RuntimeError("align: give either quadratic_noise or noise_seed, not both")
        if noise_seed.dtype != torch.long or noise_seed.numel() != 1 or noise_seed.device.type != "cpu":
            raise RuntimeError(f"align: noise_seed must be a CPU int64 tensor with one element, got {noise_seed.dtype} "
                               f"{tuple(noise_seed.shape)} on {noise_seed.device}")
    if dropout_mask is not None and tuple(dropout_mask.shape) != (2, G, N, h):
        raise RuntimeError(f"align: dropout_mask must have shape [2, {G}, {N}, {h}], got {tuple(dropout_mask.shape)}")
    if _is_concrete(x):
        for name, t in (("x", x), ("unary_noise", unary_noise), ("quadratic_noise", quadratic_noise)):
            if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
                raise RuntimeError(f"align: {name} contains NaN or Inf")


def _edge_features(h: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """``normalize(h_i - h_j)`` for edge ``(i, nbr[i, s])``, row ``i * k + s``: [P, N, h] -> [P, N k, h]."""
    P, N, k = nbr.shape
    tails = torch.gather(h, 1, nbr.reshape(P, N * k, 1).expand(P, N * k, h.shape[-1]))
    heads = h.repeat_interleave(k, dim=1)
    return F.normalize(heads - tails, dim=-1)


def _edge_cosines(h1: torch.Tensor, h2: torch.Tensor, nbr1: torch.Tensor, nbr2: torch.Tensor) -> torch.Tensor:
    """``<normalize(h1_i - h1_j), normalize(h2_a - h2_b)>`` for every edge pair: ``[P, N k, N k]``.

    Through the cross Gram ``C = h1 h2^T`` (one ``N x N x h`` GEMM per problem instead of the
    ``Nk x Nk x h`` one of the edge features): ``<h1_i - h1_j, h2_a - h2_b> = C_ia - C_ib - C_ja + C_jb``,
    times the inverse edge lengths (``pair_scores``). The four-term sum cancels where edges are short
    next to |h|: the absolute error is about ``4 eps |h|^2 / (|h1_i - h1_j| |h2_a - h2_b|)`` (fp32:
    ~1e-5 for edges a tenth of |h| long), far below the noise the scores carry.
    """
    C = torch.bmm(h1, h2.transpose(1, 2))
    w1 = _inverse_edge_lengths(h1, nbr1)
    w2 = _inverse_edge_lengths(h2, nbr2)
    return torch.ops.exgramed.pair_scores(C, w1, w2, nbr1, nbr2, 1.0, 0.0, None, 0.0, None)


def _inverse_edge_lengths(h: torch.Tensor, nbr: torch.Tensor, edge_floor: float = 0.0) -> torch.Tensor:
    """``1 / max(|h_i - h_j|, 1e-12)`` per kNN edge (F.normalize's convention): ``[G, N, h], [G, N, k] ->
    [G, N k]`` in h's dtype, the squared lengths from ``edge_sq_norms`` (the differences themselves, float64
    sums: no cancellation, O(N k h); the Gram form ``G_ii + G_jj - 2 G_ij`` needed a float64 ``N x N x h``
    GEMM per graph, forward and backward, for the same accuracy).

    ``edge_floor`` > 0: ``1 / sqrt(|h_i - h_j|^2 + (edge_floor * r)^2)`` with r the graph's RMS node
    norm (no gradient through r). Edges much shorter than ``edge_floor * r`` then have edge features
    shorter than 1 instead of unit directions amplified by ``1 / |h_i - h_j|``: the gradient through
    the edge normalisation is bounded by ``1 / (edge_floor r)``, whatever the batch's spread.
    """
    d2 = torch.ops.exgramed.edge_sq_norms(h, nbr)
    if edge_floor > 0:
        r2 = h.detach().square().sum(-1).mean(1, keepdim=True)
        return (d2 + edge_floor ** 2 * r2).clamp_min(1e-24).rsqrt()
    return d2.clamp_min(1e-24).rsqrt()


def _take(t: torch.Tensor, idx) -> torch.Tensor:
    """``t[idx]`` along dim 0 for a list of graph indices, as ``index_select``: its backward is one
    ``index_add_``, where advanced indexing's is an accumulating ``index_put_`` (2-9x slower here at
    align's sizes, most with two threads). Symbolic indices (dynamic shapes) keep plain indexing."""
    if all(type(v) is int for v in idx):
        return t.index_select(0, torch.tensor(idx, dtype=torch.long, device=t.device))
    return t[idx]


def _take_by_product(t: torch.Tensor, idx) -> torch.Tensor:
    """``t[idx]`` along dim 0 as the product of a one-hot ``[len(idx), G]`` selector with ``t``: exact for
    finite ``t`` (one term per output is non-zero), and its backward is the transposed product, a GEMM
    that takes a gradient of any layout, where ``index_select``'s is an ``index_add``."""
    rows = torch.arange(t.shape[0], device=t.device)
    sel = torch.stack([rows == v for v in idx]).to(t.dtype)
    return torch.mm(sel, t.flatten(1)).view(len(idx), *t.shape[1:])


def _cross_cosines(hn: torch.Tensor, src, dst) -> torch.Tensor:
    """``hn[src[p]] hn[dst[p]]^T`` for every problem p: ``[G, N, h] -> [P, N, N]``.

    One GEMM per unordered pair of graphs: a problem and its reverse (both directions in either mode)
    and the S noise samples of a problem share it, transposed or repeated -- half the GEMMs (and of
    their backward) of one per problem.

    The right operand is gathered by :func:`_take_by_product`, whose backward is a GEMM: the gradient
    of a gathered-then-transposed operand is a transposed tensor, and ``index_select``'s backward
    (an ``index_add`` of it) is what Inductor's C++ backend of torch 2.11 to 2.13 compiles wrongly
    on two or more threads (pytorch/pytorch#191837: a tiled transposed load feeding a vectorised
    atomic add that applies the inner loop offset twice, writing past the gradient buffer -- heap
    corruption, an abort, and wrong gradients).
    """
    if not all(type(v) is int for v in (*src, *dst)):  # symbolic K (dynamic shapes): one GEMM per problem
        return torch.bmm(_take(hn, src), _take_by_product(hn, dst).transpose(1, 2))
    first = {}
    for a, b in zip(src, dst):
        if (a, b) not in first and (b, a) not in first:
            first[(a, b)] = len(first)
    keys = list(first)
    base = torch.bmm(_take(hn, [a for a, _ in keys]), _take_by_product(hn, [b for _, b in keys]).transpose(1, 2))
    if len(keys) == len(src):
        return base
    return torch.stack([base[first[(a, b)]] if (a, b) in first else base[first[(b, a)]].transpose(0, 1)
                        for a, b in zip(src, dst)])


def node_features(graphs, weights, dropout_masks, k, metric, aggr, reverse, dtype):
    """kNN graphs and the two GraphConv layers (ReLU, optional dropout masks) of ``align``.

    graphs: ``[G, N, d]``; weights: ``(w_root1, w_rel1, bias1, w_root2, w_rel2, bias2)``;
    dropout_masks: ``None`` or the two layers' masks ``[G, N, h]``. Returns ``(h [G, N, h], nbr)``.
    Graphs are independent through both stages, so any subset gives those graphs' features.
    """
    w_root1, w_rel1, bias1, w_root2, w_rel2, bias2 = weights
    nbr = torch.ops.exgramed.knn_graph(graphs.detach(), k, metric)
    h = graphs
    for layer, (w_root, w_rel, bias) in enumerate(((w_root1, w_rel1, bias1), (w_root2, w_rel2, bias2))):
        h = torch.ops.exgramed.graph_conv(h, nbr, w_root.to(dtype), w_rel.to(dtype),
                                          None if bias is None else bias.to(dtype), aggr, reverse, True)
        if dropout_masks is not None:
            h = h * dropout_masks[layer].to(dtype)
    return h, nbr


def problem_scores(h, nbr, src, dst, copy_structure, quadratic_noise=None, noise_scale=0.0, noise_seed=None,
                   edge_floor=0.0):
    """Scores of the problems graph ``src[p]`` -> graph ``dst[p]``:
    unary ``cos(h1_i, h2_a) - 0.5`` ``[P, N, N]`` (noise-free) and quadratic
    ``0.5 (<e1, e2> + s g' - 0.5)`` ``[P, Nk, Nk]`` (``pair_scores``; ``g'`` the given
    ``quadratic_noise [P, Nk, Nk]``, or the in-kernel Gumbel sample of ``noise_seed``, or none),
    with the problems' neighbour tables ``(U, Q, nbr1, nbr2)``. ``edge_floor``: see :func:`_inverse_edge_lengths`."""
    norms = h.norm(dim=-1)  # [G, N]
    hn = h / norms.clamp_min(1e-12).unsqueeze(-1)  # F.normalize
    nbr1 = _take(nbr, src)
    nbr2 = nbr1 if copy_structure else _take(nbr, dst)
    cos = _cross_cosines(hn, src, dst)
    U = cos - 0.5
    # Edge lengths once per graph (each graph sits in several problems); with copied structure,
    # graph 2's edges follow graph 1's table, so its lengths are per problem.
    w = _inverse_edge_lengths(h, nbr, edge_floor)
    w2 = _inverse_edge_lengths(_take(h, dst), nbr2, edge_floor) if copy_structure else _take(w, dst)
    # The cross Gram h1 h2^T from the cosines and the norms: no second [P, N, N, h] GEMM (nor its
    # two in the backward); the same float32 rounding class as the direct product.
    C = cos * _take(norms, src).unsqueeze(2) * _take(norms, dst).unsqueeze(1)
    Q = torch.ops.exgramed.pair_scores(C, _take(w, src), w2, nbr1, nbr2, 0.5, -0.25,
                                       quadratic_noise, 0.5 * noise_scale, noise_seed)
    return U, Q, nbr1, nbr2


def hamming_to_identity(Z, dtype):
    """Per-problem Hamming loss against the identity T: ``sum(Z (1 - T) + (1 - Z) T) / N``
    ``= (sum Z - 2 tr Z + N) / N``; Z ``[P, N, N]`` -> ``[P]``."""
    N = Z.shape[-1]
    Zf = Z.to(dtype)
    return (Zf.sum((1, 2)) - 2 * Zf.diagonal(dim1=1, dim2=2).sum(1) + N) / N


def _align_impl(x, w_root1, w_rel1, bias1, w_root2, w_rel2, bias2, unary_noise=None, quadratic_noise=None,
                dropout_mask=None, k=5, lambda_=80.0, noise_scale=0.3, solver="fw", estimator="imle",
                mode="barycenter", metric="cosine", aggr="max", reverse=False, copy_structure=False,
                partial=False, max_iter=50, tol=1e-6, restarts=1, seed=0, noise_seed=None, edge_floor=0.1):
    _check_align_args(x, w_root1, w_rel1, bias1, w_root2, w_rel2, bias2, unary_noise, quadratic_noise,
                      dropout_mask, k, lambda_, noise_scale, solver, estimator, mode, noise_seed, edge_floor)
    # Scores and the solver in fp32 (fp64 stays fp64), whatever autocast would pick.
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(dtype)
        K, N, _ = x.shape
        graphs = torch.cat([x, x.mean(0, keepdim=True)]) if mode == "barycenter" else x
        h, nbr = node_features(graphs, (w_root1, w_rel1, bias1, w_root2, w_rel2, bias2),
                               None if dropout_mask is None else (dropout_mask[0], dropout_mask[1]),
                               k, metric, aggr, reverse, dtype)
        src, dst = problem_graphs(K, mode)
        P = len(src)
        S = 1
        for noise in (unary_noise, quadratic_noise):
            if noise is not None:
                S = noise.shape[0]
        Nk = N * k
        # The S * P problems (sample s, problem p at row s * P + p), the quadratic noise in pair_scores.
        qn = None
        if quadratic_noise is not None:
            qn = quadratic_noise.to(dtype).expand(S, P, Nk, Nk).reshape(S * P, Nk, Nk)
        U, Q, nbr1, nbr2 = problem_scores(h, nbr, src * S, dst * S, copy_structure, qn, noise_scale,
                                          noise_seed if qn is None else None, edge_floor)
        if unary_noise is not None:
            U = torch.add(U, unary_noise.to(dtype).expand(S, P, N, N).reshape(S * P, N, N), alpha=noise_scale)
        Z, _ = torch.ops.exgramed.qap_solve(U, nbr1, nbr2, Q, None, None, solver, max_iter, tol, restarts,
                                            partial, seed, estimator, lambda_)
        loss = hamming_to_identity(Z, dtype).mean()
    return loss, Z


torch.library.impl("exgramed::align", "CompositeImplicitAutograd")(_align_impl)


def align(x: torch.Tensor, w_root1: torch.Tensor, w_rel1: torch.Tensor, bias1: torch.Tensor | None,
          w_root2: torch.Tensor, w_rel2: torch.Tensor, bias2: torch.Tensor | None,
          unary_noise: torch.Tensor | None = None, quadratic_noise: torch.Tensor | None = None,
          dropout_mask: torch.Tensor | None = None, k: int = 5, lambda_: float = 80.0,
          noise_scale: float = 0.3, solver: str = "fw", estimator: str = "imle", mode: str = "barycenter",
          metric: str = "cosine", aggr: str = "max", reverse: bool = False, copy_structure: bool = False,
          partial: bool = False, max_iter: int = 50, tol: float = 1e-6, restarts: int = 1,
          seed: int = 0, noise_seed: torch.Tensor | None = None,
          edge_floor: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Multi-graph alignment loss of K modality embeddings of the same B samples (ExGra-Med).

    Computation (``torch.ops.exgramed.align``; deterministic given its inputs and noise tensors):

    1. graphs: the K modalities ``x[k]`` plus, in ``mode="barycenter"``, the barycenter
       ``mean_k x[k]`` (G = K + 1 graphs; G = K in ``mode="pairwise"``);
    2. ``nbr = knn_graph(graphs, k, metric)`` (no gradient through the graph structure);
    3. two GraphConv layers with ReLU on all G graphs in one batched call each,
       ``h' = relu(h W_root + AGG_{j in nbr(i)} h_j W_rel + b)`` (``reverse=True``: over in-neighbours),
       each followed by ``* dropout_mask[layer]`` when given;
    4. problems ``src[p] -> dst[p]`` (:func:`problem_graphs`): all k -> barycenter and barycenter -> k
       (P = 2K), or all pairs in both directions (P = K(K-1));
       unary ``U_ia = cos(h1_i, h2_a) + s g_ia - 0.5``,
       quadratic ``Q_ef = 0.5 (<e1_e, e2_f> + s g'_ef - 0.5)`` (``pair_scores``) with ``e_ij = normalize(h_i - h_j)``
       on the kNN edges of each graph (``copy_structure=True``: graph 2 uses graph 1's edge list),
       ``s = noise_scale``, ``g, g'`` the given standard Gumbel samples;
    5. ``Z = qap_solve(U, nbr1, nbr2, Q, ...)`` for the ``S * P`` problems in one batched call
       (maximisation; ``partial=True`` allows unmatched nodes); its backward is the estimator
       (``imle``, ``blackbox``, ``imle_symmetric``, step ``lambda_``; see ``estimators.py``);
    6. ``loss`` = mean over problems of the Hamming loss ``sum(Z (1 - I) + (1 - Z) I) / B``.

    Args:
        x: ``[K, B, d]`` float (K >= 2; bf16/fp16 are computed in fp32); may require grad.
        w_root1, w_rel1: ``[d, h]``; w_root2, w_rel2: ``[h, h]``; bias1, bias2: ``[h]`` or None.
        unary_noise: ``[S, P, B, B]`` or ``[S, 1, B, B]`` (shared by the problems) standard Gumbel,
            or None (no unary noise). S samples are solved as S perturbed copies of each problem.
        quadratic_noise: ``[S, P, Bk, Bk]`` or ``[S, 1, Bk, Bk]``, or None.
        noise_seed: instead of ``quadratic_noise``, a CPU int64 one-element tensor: the quadratic
            noise is then the standard Gumbel sample generated inside ``pair_scores`` (counter-based,
            keyed by (seed, problem row s * P + p, e, f)); the ``[S P, Bk, Bk]`` noise tensor is never
            sampled or stored. What :class:`MultiGraphAlignment` uses (its seed drawn from torch's generator).
        dropout_mask: ``[2, G, B, h]`` multipliers after each layer (already scaled by 1/(1-p)), or None.
        k, metric: kNN degree and metric ("l2" or "cosine"). aggr: "max", "mean" or "sum".
        edge_floor: edge lengths are ``sqrt(|h_i - h_j|^2 + (edge_floor r)^2)`` with r the graph's RMS
            node norm (0: F.normalize's, as the official code). The default 0.1 bounds the gradient
            through the edge normalisation when a batch's node features nearly coincide (small,
            untrained embeddings), leaving kNN edges of ordinary length (>= 0.3 r) within 6 %.
        solver, max_iter, tol, restarts, seed: passed to ``qap_solve`` (method = solver). ``restarts``
            defaults to 1 here (``qap_solve``'s -1 picks 2-32 by size): one Frank-Wolfe start from the
            barycenter plus 2-opt, within 0.6-1 % of four starts' objective on align's problems at a
            quarter to half of the time (benchmarks/results/align.md), and the same start the
            official-equivalent's solver uses. ``max_iter`` defaults to 50 here (``qap_solve``'s
            30), the official-equivalent solver's budget: at 30 ours fell below it on 1 problem in
            96 at B = 16 and at B = 64 (by 0.24-0.77 %), at 50 on none, for ~4 % more solver work
            at B = 64 (benchmarks/results/solver_budget.md).

    Returns:
        ``(loss, Z)``: scalar loss (fp32, fp64 for fp64 x) and the matchings ``[S * P, B, B]``
        (problem ``p`` of sample ``s`` at row ``s * P + p``).
    """
    return torch.ops.exgramed.align(x, w_root1, w_rel1, bias1, w_root2, w_rel2, bias2, unary_noise,
                                    quadratic_noise, dropout_mask, k, lambda_, noise_scale, solver, estimator,
                                    mode, metric, aggr, reverse, copy_structure, partial, max_iter, tol,
                                    restarts, seed, noise_seed, edge_floor)


def sample_gumbel(shape, device=None, dtype=torch.float32, generator=None) -> torch.Tensor:
    """Standard Gumbel(0, 1) samples from torch's generator: ``-log(-log(u))``, ``u ~ U(0, 1)``.

    u is clamped to ``[tiny, 1)`` so a drawn 0 gives a finite sample (fp32: the range is about
    [-4.5, 16.6]). Uniform draws are several times cheaper than ``exponential_`` on the CPU.
    """
    u = torch.rand(shape, device=device, dtype=dtype, generator=generator)
    return -torch.log(-torch.log(u.clamp_min_(torch.finfo(dtype).tiny)))


@dataclass
class AlignmentOutput:
    """What :class:`MultiGraphAlignment` returns.

    loss: scalar, differentiable w.r.t. x and the module's parameters.
    accuracy: ``[K]`` (no grad) per modality, the fraction of nodes matched to themselves,
        averaged over the problems that involve the modality (and the S samples).
    Z: ``[S * P, B, B]`` the matchings (see :func:`align`).
    noise_scale: the Gumbel scale used for this step.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    Z: torch.Tensor
    noise_scale: float
    problems: list[int] | None = None  # graph_scope="global": the flat problems (rows of the global Z) in Z


class MultiGraphAlignment(nn.Module):
    r"""ExGra-Med's multi-graph alignment loss as a module: owns the two GraphConv layers, samples
    the noise, calls ``torch.ops.exgramed.align``.

    ``out = MultiGraphAlignment(dim)(x)`` with ``x: [K, B, d]``; ``out.loss`` is the alignment loss
    (add it to the task loss, ExGra-Med uses weight 1.0), ``out.accuracy`` per-modality matching
    accuracy, ``out.Z`` the matchings.

    Args:
        dim: d, the embedding size. hidden: GraphConv width h (default d, as the official code).
        k: kNN degree (5).
        official: start from the official code's settings (:data:`OFFICIAL`: L2 kNN, graph 2 gets
            graph 1's edges, reverse-kNN aggregation, partial matchings, one unary noise sample
            shared by all problems of a step, Gumbel scale 0.05, blackbox lambda 80, dropout 0.1,
            plain edge normalisation) instead of :data:`DEFAULTS` (cosine kNN, own edges,
            permutations, independent noise, scale 0.3, IMLE lambda 80, no dropout, edge-length
            floor 0.1). Any option below overrides either.
        noise_scale: Gumbel scale s of the perturbations (the margin the matching must beat;
            see ``docs/align.md`` and benchmarks/results/align.md for the measurements behind 0.3).
        noise_schedule: optional ``step -> scale`` callable (``step``: training-mode calls so far,
            a Python int, settable); overrides ``noise_scale``. Under ``torch.compile`` each new
            scale value is a recompile: prefer schedules that change the scale rarely.
        lambda_, estimator ("imle", "blackbox", "imle_symmetric"), samples (S noise samples
            averaged), mode ("barycenter" or "pairwise"), solver ("fw", "sinkhorn"), max_iter,
            tol, restarts, metric, aggr, reverse, copy_structure, partial, shared_noise,
            quadratic_noise (perturb Q as well, with noise generated inside ``pair_scores`` from a
            seed drawn from torch's generator; default True), dropout, bias, edge_floor (edge
            lengths ``sqrt(|h_i - h_j|^2 + (edge_floor r)^2)``; bounds the gradient when node
            features nearly coincide, see :func:`align`). restarts defaults to 1 (one
            Frank-Wolfe start + 2-opt; -1: ``qap_solve``'s size-based starts), max_iter to 50
            (see :func:`align`).
        graph_scope: ``"local"`` (default, the official behaviour: graphs over this process's batch)
            or ``"global"``: graphs over the batch of all ranks of ``process_group`` (default: the
            whole world), problems sharded across ranks, gradients in DDP's convention
            (``exgramed_kernels.distributed``, ``docs/distributed.md``).

    In eval mode there is no dropout; the noise is still sampled (the loss is defined with it)
    unless ``noise_scale`` is 0. Randomness comes from torch's generator, so ``torch.manual_seed``
    reproduces a step (under ``torch.compile`` with inductor, whose RNG differs from eager's, set
    ``torch._inductor.config.fallback_random = True`` to draw exactly eager's noise).
    """

    def __init__(self, dim: int, hidden: int | None = None, k: int = 5, *, official: bool = False,
                 noise_schedule: Callable[[int], float] | None = None, samples: int = 1,
                 mode: str = "barycenter", solver: str = "fw", max_iter: int = 50, tol: float = 1e-6,
                 restarts: int = 1, aggr: str = "max", quadratic_noise: bool = True, bias: bool = True,
                 graph_scope: str = "local", process_group=None, **options):
        super().__init__()
        from .distributed import check_graph_scope

        check_graph_scope(graph_scope)  # "global": graphs over the data-parallel batch (distributed.py)
        self.graph_scope, self.process_group = graph_scope, process_group
        opts = dict(OFFICIAL if official else DEFAULTS)
        unknown = set(options) - set(opts)
        if unknown:
            raise TypeError(f"MultiGraphAlignment: unknown options {sorted(unknown)}")
        opts.update(options)
        if samples < 1:
            raise ValueError(f"MultiGraphAlignment: samples must be >= 1, got {samples}")
        if not 0 <= opts["dropout"] < 1:
            raise ValueError(f"MultiGraphAlignment: dropout must lie in [0, 1), got {opts['dropout']}")
        check_estimator(opts["estimator"], opts["lambda_"], "MultiGraphAlignment")
        if mode not in MODES:
            raise ValueError(f"MultiGraphAlignment: mode must be 'barycenter' or 'pairwise', got {mode!r}")
        hidden = dim if hidden is None else hidden
        self.dim, self.hidden, self.k = dim, hidden, k
        self.official, self.opts = official, opts
        self.noise_schedule, self.samples, self.mode = noise_schedule, samples, mode
        self.solver, self.max_iter, self.tol, self.restarts, self.aggr = solver, max_iter, tol, restarts, aggr
        self.quadratic_noise = quadratic_noise
        self.w_root1 = nn.Parameter(torch.empty(dim, hidden))
        self.w_rel1 = nn.Parameter(torch.empty(dim, hidden))
        self.w_root2 = nn.Parameter(torch.empty(hidden, hidden))
        self.w_rel2 = nn.Parameter(torch.empty(hidden, hidden))
        self.bias1 = nn.Parameter(torch.empty(hidden)) if bias else None
        self.bias2 = nn.Parameter(torch.empty(hidden)) if bias else None
        self.step = 0  # training-mode calls so far; advanced only when a noise schedule is set
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch.nn.Linear's initialisation (as PyG GraphConv's two Linear layers): U(-1/sqrt(in), 1/sqrt(in))."""
        for w in (self.w_root1, self.w_rel1, self.w_root2, self.w_rel2):
            bound = 1.0 / math.sqrt(w.shape[0])
            nn.init.uniform_(w, -bound, bound)
        for b, fan_in in ((self.bias1, self.dim), (self.bias2, self.hidden)):
            if b is not None:
                nn.init.uniform_(b, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def current_noise_scale(self) -> float:
        """The Gumbel scale of the next step (the schedule at the current step, else ``noise_scale``)."""
        if self.noise_schedule is not None:
            return float(self.noise_schedule(self.step))
        return float(self.opts["noise_scale"])

    def forward(self, x: torch.Tensor) -> AlignmentOutput:
        if self.graph_scope == "global":
            from .distributed import global_forward

            return global_forward(self, x)
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise RuntimeError(f"MultiGraphAlignment: x must have shape [K, B, {self.dim}], got {tuple(x.shape)}")
        K, N, _ = x.shape
        o = self.opts
        scale = self.current_noise_scale()
        src, dst = problem_graphs(K, self.mode)
        P, G, S = len(src), (K + 1 if self.mode == "barycenter" else K), self.samples
        dev = x.device
        un = qn = dm = noise_seed = None
        if scale > 0:
            un = sample_gumbel((S, 1 if o["shared_noise"] else P, N, N), dev)
            if self.quadratic_noise:  # generated inside pair_scores from a seed of torch's generator
                noise_seed = torch.randint(0, 2**62, (1,), dtype=torch.long)
        if self.training and o["dropout"] > 0:
            keep = 1.0 - o["dropout"]
            dm = torch.empty(2, G, N, self.hidden, device=dev).bernoulli_(keep) / keep
        if self.training and self.noise_schedule is not None:
            self.step += 1
        loss, Z = torch.ops.exgramed.align(
            x, self.w_root1, self.w_rel1, self.bias1, self.w_root2, self.w_rel2, self.bias2, un, qn, dm,
            self.k, o["lambda_"], scale, self.solver, o["estimator"], self.mode, o["metric"], self.aggr,
            o["reverse"], o["copy_structure"], o["partial"], self.max_iter, self.tol, self.restarts, 0, noise_seed,
            o["edge_floor"])
        with torch.no_grad():
            diag = Z.diagonal(dim1=1, dim2=2).to(torch.float32).mean(-1).reshape(S, P).mean(0)  # [P]
            member = torch.tensor([[float(g in (src[p], dst[p])) for g in range(K)] for p in range(P)], device=dev)
            accuracy = (diag[:, None] * member).sum(0) / member.sum(0)
        return AlignmentOutput(loss=loss, accuracy=accuracy, Z=Z, noise_scale=scale)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, k={self.k}, official={self.official}, mode={self.mode}, "
                f"graph_scope={self.graph_scope}, "
                f"solver={self.solver}, samples={self.samples}, {self.opts}")
