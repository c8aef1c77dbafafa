r"""``qap_solve``: batched graph matching (quadratic assignment), and its gradient through the solver.

Maximise over N x N permutation matrices X, for G problems at once,

    f(X) = sum_ia U_ia X_ia + sum_{e=(i,j) in E1} sum_{f=(a,b) in E2} Q[e, f] X_ia X_jb

with edge e = i*k + s of graph 1 being (i, nbr1[g, i, s]) and f = a*k + t of graph 2 being
(a, nbr2[g, a, t]). Q is dense ``[G, N*k, N*k]`` or implicit from node features H1, H2:
Q[e, f] = <normalize(H1_i - H1_j), normalize(H2_a - H2_b)> = w1_e w2_f (C_ia - C_ib - C_ja + C_jb)
with the cross Gram C = H1 H2^T and the inverse edge lengths w (0 for a zero-length edge).

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
copies of each problem are solved in one batch and each gets its own estimate. ``dL/dQ`` is built from
the matchings' edge-pair indicators (``edge_pair_indicator.py``), sparse when ``sparse_q_grad``.

The objective output ``obj = f(Z)`` gets its exact gradient at the returned Z (Danskin):
``d obj / dU = Z`` and ``d obj / dQ[e, f] = Z_ia Z_jb``.

Edge numbering (the ``qap_solve`` contract): edge ``e = i * k + s`` of graph 1 is
``(i, nbr1[i, s])``, edge ``f = a * k + t`` of graph 2 is ``(a, nbr2[a, t])``.
"""
from __future__ import annotations

import torch

from . import reference
from ._backend import register_fallback, register_no_gradient
from .checks import is_concrete, check_estimator, check_qap_args
from .edge_pair_indicator import indicator_combination, indicator_combination_sparse


@torch.library.register_fake("exgramed::qap_solve")
def _qap_solve_fake(U, nbr1, nbr2, Q=None, H1=None, H2=None, method="fw", max_iter=30, tol=1e-6, restarts=-1,
                    partial=False, seed=0, estimator="imle", lambda_=80.0, init=None, sparse_q_grad=False):
    check_qap_args(U, nbr1, nbr2, Q, H1, H2, method, max_iter, tol, restarts, partial, seed, estimator, lambda_,
                   init, check_values=False)
    return U.new_empty(U.shape), U.new_empty(U.shape[:1])


@register_fallback("qap_solve")
def _qap_solve_reference(U, nbr1, nbr2, Q=None, H1=None, H2=None, method="fw", max_iter=30, tol=1e-6,
                         restarts=-1, partial=False, seed=0, estimator="imle", lambda_=80.0, init=None,
                         sparse_q_grad=False):
    check_qap_args(U, nbr1, nbr2, Q, H1, H2, method, max_iter, tol, restarts, partial, seed, estimator, lambda_,
                   init)
    return reference.qap_solve(U, nbr1, nbr2, Q, H1, H2, method, max_iter, tol, restarts, partial, seed,
                               init=init)


# qap_solve_lockstep: the CUDA kernel's algorithm (every start of every problem in lock-step; csrc/
# qap_solve_lockstep.h) registered on the CPU, so that machines without a GPU test it. Same schema and
# contract as qap_solve; not a public op.


@torch.library.register_fake("exgramed::qap_solve_lockstep")
def _qap_solve_lockstep_fake(*args, **kwargs):
    return _qap_solve_fake(*args, **kwargs)


@register_fallback("qap_solve_lockstep")
def _qap_solve_lockstep_reference(*args, **kwargs):
    return _qap_solve_reference(*args, **kwargs)


def qap_objective(Z, U, nbr1, nbr2, Q=None, H1=None, H2=None) -> torch.Tensor:
    """f(Z) per problem ``[G]`` in U's dtype (computed in float64); Z may be any real ``[G, N, N]``."""
    return reference.qap_objective(Z, U, nbr1, nbr2, Q, H1, H2)


def qap_solve(U, nbr1, nbr2, Q=None, H1=None, H2=None, method="fw", max_iter=30, tol=1e-6, restarts=-1,
              partial=False, seed=0, estimator="imle", lambda_=80.0, init=None, sparse_q_grad=False):
    r"""Batched graph matching: maximise f(X) (module docstring) over permutation matrices.

    ``method="fw"``: Frank-Wolfe on the doubly-stochastic relaxation (FAQ): the linear oracle is
    the exact linear assignment of the gradient U + grad q(X), the step an exact line search
    (f is quadratic on the segment), the best vertex visited is kept, and the rounding of the last
    iterate. ``method="sinkhorn"``: graduated assignment -- X = Sinkhorn(exp(grad f(X) / T)) with
    T annealed geometrically from the gradient's range to 1e-3 of it, each iterate rounded by a
    linear assignment. Every start's best vertex is then improved by 2-opt (swap the columns of
    two rows while f increases); the best over starts is returned (ties: the lowest start).

    Starts: 0 the barycenter J/N (or the vertex ``init`` when given: a warm start); 1 the vertex
    LAP(U); r >= 2 the midpoint of J/N and a random permutation drawn from a counter-based
    generator keyed by (seed, r). A problem's answer depends only on its own inputs and the options:
    not on its position in the batch, the batch's other problems, or the number of threads.
    A start at a vertex begins with its O(N k^2) gradient instead of a dense pass over Q.

    Args:
        U: ``[G, N, N]`` unary scores, floating point, finite.
        nbr1, nbr2: int64 ``[G, N, k]`` neighbour tables with entries in ``[0, N)``; k = 0 means no edges.
        Q: optional dense ``[G, N*k, N*k]`` edge-pair scores.
        H1, H2: optional ``[G, N, h]`` node features for the implicit Q (instead of Q).
            Neither Q nor H: f is linear and the answer is the linear assignment of U.
        method: ``"fw"`` or ``"sinkhorn"``.
        max_iter: iterations per start (>= 1). tol: stop a start when the Frank-Wolfe gap
            <grad f(X), P - X> <= tol * max(1, |f(X)|) (sinkhorn: when X moves by <= tol).
        restarts: number of starts (1 to 65536), or -1: 32 for N <= 8, 16 for N <= 16, 8 for N <= 32,
            4 for N <= 64, else 2.
        partial: maximise over partial permutations (a node may stay unmatched at score 0, as
            LPMP): the oracle is the linear assignment of max(grad, 0) with non-positive pairs dropped.
        seed: the random starts' seed.
        estimator, lambda_: used by the backward only (``"imle"``, ``"blackbox"`` or ``"imle_symmetric"``; lambda_
            positive and finite, checked in the forward; module docstring).
        sparse_q_grad: the caller's promise that Q's producer accepts a sparse COO gradient (``pair_scores``
            does): Q's gradient is then returned sparse on the CPU, its O(N k) non-zeros per
            problem (``edge_pair_indicator_sparse``) instead of a dense ``[G, N k, N k]`` tensor. Dense on
            other devices and under ``torch.compile``. Used by the backward only.
        init: optional int64 ``[G, N]`` start (the column of each row; distinct columns, -1 = unmatched
            with ``partial`` only), replacing start 0: a warm start. With ``restarts=1`` the solve is a
            local improvement of ``init`` (Frank-Wolfe from it, then 2-opt), never worse than ``init``.

    Returns:
        ``(Z, obj)``: Z ``[G, N, N]`` 0/1 in U's dtype (a permutation matrix, or a partial one), obj ``[G]``
        = f(Z) in U's dtype (computed in float64).

    Backends: CPU runs one task per (problem, start) in parallel, single-threaded Frank-Wolfe in float64
    with a warm-started linear assignment and the gradient updated by linearity
    (grad q(X + t (P - X)) = (1 - t) grad q(X) + t grad q(P), O(N k^2) per vertex). CUDA runs all
    starts of all problems in lock-step on the device (the testing op ``qap_solve_lockstep`` runs that
    driver on the CPU). The implicit Q is expanded once per call to the dense ``[G, N*k, N*k]``
    table from the N x N cross Gram matrix (H1, H2 in float32, or float64 if either is float64).
    Both backends are deterministic; they may return different (equally valid) answers.
    """
    return torch.ops.exgramed.qap_solve(U, nbr1, nbr2, Q, H1, H2, method, max_iter, tol, restarts, partial, seed,
                                        estimator, lambda_, init, sparse_q_grad)


# ----------------------------------------------------------------------------- autograd (module docstring)


def _resolve(U, nbr1, nbr2, Q, H1, H2, ctx):
    """The backward's re-solve at perturbed unary scores U, with the forward's solver settings (same starts
    and seed), cold: a re-solve warm-started from the forward matching stays near it and shrinks the
    gradient (docs/align.md). Q is the forward's tensor itself: the CPU kernel then reuses the forward's
    gradient at the barycenter (it depends on Q alone) instead of another dense pass over Q."""
    # The forward ignores the estimator; "imle" is the value every solver build accepts.
    return torch.ops.exgramed.qap_solve(
        U, nbr1, nbr2, Q, H1, H2, ctx.method, ctx.max_iter, ctx.tol, ctx.restarts, ctx.partial,
        ctx.seed, "imle", ctx.lambda_,
    )[0]


def _setup_context(ctx, inputs, output):
    inputs = tuple(inputs) + (None,) * (16 - len(inputs))
    (U, nbr1, nbr2, Q, H1, H2, method, max_iter, tol, restarts, partial, seed, estimator, lambda_, _init,
     sparse_q_grad) = inputs
    check_estimator(estimator, lambda_)
    ctx.method, ctx.max_iter, ctx.tol, ctx.restarts = method, max_iter, tol, restarts
    ctx.partial, ctx.seed, ctx.estimator, ctx.lambda_ = partial, seed, estimator, lambda_
    ctx.has_Q, ctx.has_H = Q is not None, H1 is not None
    ctx.sparse_q = bool(sparse_q_grad) and Q is not None and Q.device.type == "cpu" and is_concrete(Q)
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
            return grad_U, None, None, grad_Q, None, None, None, None, None, None, None, None, None, None, None, None
        dP = indicator_combination(terms, nbr1, nbr2, U.dtype)
        if need_Q and ctx.has_Q:
            grad_Q = dP.to(Q.dtype)
        if need_H and ctx.has_H:
            grad_H1, grad_H2 = _implicit_q_backward(dP, H1, H2, nbr1, nbr2)
    return grad_U, None, None, grad_Q, grad_H1, grad_H2, None, None, None, None, None, None, None, None, None, None


def _implicit_q_backward(dP, H1, H2, nbr1, nbr2):
    """Push dL/dQ through the implicit scores ``Q[e, f] = <normalize(H1_i - H1_j), normalize(H2_a - H2_b)>``.

    Autograd of the dense reference construction: O(G (Nk)^2 D); ``align`` passes a dense Q instead.
    """
    with torch.enable_grad():
        h1 = H1.detach().requires_grad_(H1.requires_grad)
        h2 = H2.detach().requires_grad_(H2.requires_grad)
        Q = reference.implicit_q(h1, h2, nbr1, nbr2)
        inputs = [t for t in (h1, h2) if t.requires_grad]
        grads = torch.autograd.grad(Q, inputs, dP.to(Q.dtype), allow_unused=True)
    it = iter(grads)
    return (next(it) if h1.requires_grad else None), (next(it) if h2.requires_grad else None)


torch.library.register_autograd("exgramed::qap_solve", _backward, setup_context=_setup_context)
register_no_gradient("qap_solve_lockstep", "qap_solve_lockstep (a testing op; use qap_solve)")
