"""Gradients through the QAP solver: the autograd formula of ``exgramed::qap_solve``.

The solver returns a hard 0/1 matching ``Z = argmax_X f(X)`` with

    f(X) = <U, X> + sum_{e=(i,j) in E1, f=(a,b) in E2} Q[e, f] X_ia X_jb,

a piecewise-constant function of the scores ``theta = (U, Q)``. Its gradient is replaced by a
finite-difference estimate that needs one (or two) more batched solves:

``imle`` (Niepert et al. 2021, perturb-and-MAP; the paper) and ``blackbox`` (Vlastelica et al.
2020, what the official code runs through BB-GM): the caller adds its noise to the scores before
the forward solve, so ``U`` already holds ``theta + eps``. The backward solves again at the
target ``theta + eps - lambda * dL/dZ`` (same noise, same solver seed) for ``Z'`` and returns

    dL/dU[i, a] = (Z_ia - Z'_ia) / lambda
    dL/dQ[e, f] = (Z_ia Z_jb - Z'_ia Z'_jb) / lambda         for e = (i, j), f = (a, b).

For one sample with the noise folded into the scores the two estimators are the same formula
(BB-GM's ``-(y(w) - y(w + lambda dL/dy)) / lambda`` on costs ``w = -theta``); they are kept
as two names because they are two documented methods with their own defaults elsewhere.

``imle_symmetric``: the central difference ``(Z(theta + lambda g) - Z(theta - lambda g)) / (2 lambda)``
with ``g = dL/dZ``, two solves per backward.

Averaging over S noise samples is done by the caller (``align``'s ``samples``): S perturbed
copies of each problem are solved in one batch and each gets its own estimate.

The objective output ``obj = f(Z)`` gets its exact gradient at the returned Z (Danskin):
``d obj / dU = Z`` and ``d obj / dQ[e, f] = Z_ia Z_jb``.

Edge numbering (the ``qap_solve`` contract): edge ``e = i * k + s`` of graph 1 is
``(i, nbr1[i, s])``, edge ``f = a * k + t`` of graph 2 is ``(a, nbr2[a, t])``.
"""
from __future__ import annotations

import torch

from ._backend import register_fallback

ESTIMATORS = ("imle", "blackbox", "imle_symmetric")


def check_estimator(estimator: str, lambda_: float, op: str = "qap_solve") -> None:
    """The estimator arguments shared by ``qap_solve`` and ``align``."""
    if estimator not in ESTIMATORS:
        raise RuntimeError(f"{op}: estimator must be one of {ESTIMATORS}, got '{estimator}'")
    if not (lambda_ > 0 and lambda_ < float("inf")):
        raise RuntimeError(f"{op}: lambda_ must be a positive finite number, got {lambda_}")


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


def _check_indicator_args(Z, weights, nbr1, nbr2, op="edge_pair_indicator_sparse"):
    for name, t in (("nbr1", nbr1), ("nbr2", nbr2)):
        if t.dtype != torch.long or t.dim() != 3:
            raise RuntimeError(f"{op}: {name} must be int64 [G, N, k], got {t.dtype} {tuple(t.shape)}")
    if nbr1.shape != nbr2.shape:
        raise RuntimeError(f"{op}: nbr1 and nbr2 must have the same shape, got {tuple(nbr1.shape)} and "
                           f"{tuple(nbr2.shape)}")
    G, N, _ = nbr1.shape
    if not weights.dtype.is_floating_point:
        raise RuntimeError(f"{op}: weights must be a floating-point tensor, got {weights.dtype}")
    if tuple(weights.shape) != (len(Z), G):
        raise RuntimeError(f"{op}: weights must have shape [T, G] = [{len(Z)}, {G}] (one row per matching), got "
                           f"{tuple(weights.shape)}")
    for t, z in enumerate(Z):
        if not z.dtype.is_floating_point:
            raise RuntimeError(f"{op}: Z must be a floating-point tensor, got {z.dtype}")
        if tuple(z.shape) != (G, N, N):
            raise RuntimeError(f"{op}: Z[{t}] must have shape [G, N, N] = [{G}, {N}, {N}], got {tuple(z.shape)}")


@torch.library.register_fake("exgramed::edge_pair_indicator_sparse")
def _edge_pair_indicator_sparse_fake(Z, weights, nbr1, nbr2):
    _check_indicator_args(Z, weights, nbr1, nbr2)
    nnz = torch.library.get_ctx().new_dynamic_size()
    return nbr1.new_empty(3, nnz), weights.new_empty(nnz)


@register_fallback("edge_pair_indicator_sparse")
def _edge_pair_indicator_sparse_reference(Z, weights, nbr1, nbr2):
    """The definition: the non-zero entries of ``sum_t weights[t, g] edge_pair_indicator(Z_t)``, coalesced. Each
    ``Z_t`` is read as a 0/1 matching: row i's column is the first index of its maximum if that is > 0."""
    _check_indicator_args(Z, weights, nbr1, nbr2)
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
        dense += w.to(torch.float64).view(G, 1, 1) * edge_pair_indicator(onehot, nbr1, nbr2)
    idx = dense.nonzero().T.contiguous()
    return idx, dense[tuple(idx)].to(weights.dtype)


def _sparse_grad_q_ok(Q: torch.Tensor | None) -> bool:
    """Whether the backward may hand ``Q`` a sparse COO gradient: only when ``Q`` comes straight from
    ``pair_scores`` (whose backward takes sparse gradients; align's case), on the CPU, outside tracing.
    Any other producer gets the dense gradient it expects (a second consumer of ``Q`` is fine: autograd
    sums a dense and a sparse gradient into a dense one)."""
    if Q is None or not Q.requires_grad or Q.grad_fn is None or Q.device.type != "cpu":
        return False
    from torch._subclasses.fake_tensor import is_fake

    if torch.compiler.is_compiling() or is_fake(Q):
        return False
    return Q.grad_fn.name() == "GeneratedBackwardFor_exgramed_pair_scores_defaultBackward"


def matching_of(Z: torch.Tensor) -> torch.Tensor:
    """The column of each row of 0/1 matchings ``Z [G, N, N]``, -1 for an empty row: int64 ``[G, N]``."""
    cols = Z.argmax(-1)
    return torch.where(Z.sum(-1) > 0, cols, torch.full_like(cols, -1))


def _resolve(U, nbr1, nbr2, Q, H1, H2, ctx):
    """The backward's re-solve at perturbed unary scores U, with the forward's solver settings (same
    starts and seed). A warm start from the forward matching (``init``) was measured and rejected: the
    perturbation -lambda dL/dZ pulls towards the identity, and a local re-solve from Z stays near Z
    (objective 1-3 % below a cold single start on align's problems at B = 64-256), shrinking the
    gradient for no saving over a cold single start."""
    # The forward ignores the estimator; "imle" is the value every solver build accepts.
    return torch.ops.exgramed.qap_solve(
        U, nbr1, nbr2, Q, H1, H2, ctx.method, ctx.max_iter, ctx.tol, ctx.restarts, ctx.partial,
        ctx.seed, "imle", ctx.lambda_,
    )[0]


def _setup_context(ctx, inputs, output):
    inputs = tuple(inputs) + (None,) * (15 - len(inputs))
    (U, nbr1, nbr2, Q, H1, H2, method, max_iter, tol, restarts, partial, seed, estimator, lambda_, _init) = inputs
    check_estimator(estimator, lambda_)
    ctx.method, ctx.max_iter, ctx.tol, ctx.restarts = method, max_iter, tol, restarts
    ctx.partial, ctx.seed, ctx.estimator, ctx.lambda_ = partial, seed, estimator, lambda_
    ctx.has_Q, ctx.has_H = Q is not None, H1 is not None
    ctx.sparse_q = _sparse_grad_q_ok(Q)
    Z, _ = output
    ctx.save_for_backward(U, nbr1, nbr2, Q, H1, H2, Z)


def _backward(ctx, grad_Z, grad_obj):
    U, nbr1, nbr2, Q, H1, H2, Z = ctx.saved_tensors
    # needs_input_grad covers the arguments the caller passed (trailing defaults may be absent).
    n = ctx.needs_input_grad
    need_U, need_Q = n[0], len(n) > 3 and n[3]
    need_H = (len(n) > 4 and n[4]) or (len(n) > 5 and n[5])
    lam = ctx.lambda_
    Z = Z.to(U.dtype)
    # Unary-score gradient D and the two matchings whose edge-pair indicators give the quadratic one.
    plus = minus = None
    if grad_Z is not None:
        g = grad_Z.to(U.dtype)
        if ctx.estimator == "imle_symmetric":
            plus = _resolve(U + lam * g, nbr1, nbr2, Q, H1, H2, ctx).to(U.dtype)
            minus = _resolve(U - lam * g, nbr1, nbr2, Q, H1, H2, ctx).to(U.dtype)
            scale = 1.0 / (2.0 * lam)
        else:  # imle, blackbox: forward matching vs the matching at the target scores
            plus = Z
            minus = _resolve(U - lam * g, nbr1, nbr2, Q, H1, H2, ctx).to(U.dtype)
            scale = 1.0 / lam
    w_obj = None if grad_obj is None else grad_obj.to(U.dtype).reshape(-1, 1, 1)

    def combine(f):  # scale (f(plus) - f(minus)) + w_obj f(Z), the terms that are present
        out = None
        if plus is not None:
            out = (f(plus) - f(minus)) * scale
        if w_obj is not None:
            out = w_obj * f(Z) if out is None else out + w_obj * f(Z)
        return out

    grad_U = None
    if need_U:
        grad_U = combine(lambda z: z)
        grad_U = torch.zeros_like(U) if grad_U is None else grad_U

    grad_Q = grad_H1 = grad_H2 = None
    if (need_Q and ctx.has_Q) or (need_H and ctx.has_H):
        terms = []  # the terms of combine(edge_pair_indicator), scattered sparsely
        if plus is not None:
            terms += [(plus, scale), (minus, -scale)]
        if w_obj is not None:
            terms.append((Z, w_obj.reshape(-1)))
        if ctx.sparse_q and not (need_H and ctx.has_H):
            grad_Q = indicator_combination_sparse(terms, nbr1, nbr2, Q.dtype)
            return grad_U, None, None, grad_Q, None, None, None, None, None, None, None, None, None, None, None
        dP = indicator_combination(terms, nbr1, nbr2, U.dtype)
        if need_Q and ctx.has_Q:
            grad_Q = dP.to(Q.dtype)
        if need_H and ctx.has_H:
            grad_H1, grad_H2 = _implicit_q_backward(dP, H1, H2, nbr1, nbr2)
    return grad_U, None, None, grad_Q, grad_H1, grad_H2, None, None, None, None, None, None, None, None, None


def _implicit_q_backward(dP, H1, H2, nbr1, nbr2):
    """Push dL/dQ through the implicit scores ``Q[e, f] = <normalize(H1_i - H1_j), normalize(H2_a - H2_b)>``.

    Autograd of the dense reference construction: O(G (Nk)^2 D); ``align`` passes a dense Q instead.
    """
    with torch.enable_grad():
        h1 = H1.detach().requires_grad_(H1.requires_grad)
        h2 = H2.detach().requires_grad_(H2.requires_grad)
        Q = _implicit_q(h1, h2, nbr1, nbr2)
        inputs = [t for t in (h1, h2) if t.requires_grad]
        grads = torch.autograd.grad(Q, inputs, dP.to(Q.dtype), allow_unused=True)
    it = iter(grads)
    return (next(it) if h1.requires_grad else None), (next(it) if h2.requires_grad else None)


def _implicit_q(H1, H2, nbr1, nbr2):
    from .reference.qap import implicit_q  # the definition of the implicit Q lives with the solver

    return implicit_q(H1, H2, nbr1, nbr2)


torch.library.register_autograd("exgramed::qap_solve", _backward, setup_context=_setup_context)
