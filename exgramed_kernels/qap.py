r"""`qap_solve`: batched graph matching (quadratic assignment), and its gradient/objective helpers.

Maximise over N x N permutation matrices X, for G problems at once,

    f(X) = sum_ia U_ia X_ia + sum_{e=(i,j) in E1} sum_{f=(a,b) in E2} Q[e, f] X_ia X_jb

with edge e = i*k + s of graph 1 being (i, nbr1[g, i, s]) and f = a*k + t of graph 2 being
(a, nbr2[g, a, t]). Q is dense ``[G, N*k, N*k]`` or implicit from node features H1, H2:
Q[e, f] = <normalize(H1_i - H1_j), normalize(H2_a - H2_b)> = w1_e w2_f (C_ia - C_ib - C_ja + C_jb)
with the cross Gram C = H1 H2^T and the inverse edge lengths w (0 for a zero-length edge).
"""
from __future__ import annotations

import torch

from . import reference
from ._backend import register_fallback
from .reference.qap import ESTIMATORS, METHODS


def _shape(t):
    return tuple(t.shape)


def check_qap_args(U, nbr1, nbr2, Q=None, H1=None, H2=None, method="fw", max_iter=30, tol=1e-6, restarts=-1,
                   partial=False, seed=0, estimator="imle", lambda_=80.0, init=None, check_values=True) -> None:
    """The argument checks of the compiled kernels, for the fake and reference paths."""
    p = "qap_solve: "
    if U.dim() != 3 or U.shape[1] != U.shape[2]:
        raise RuntimeError(f"{p}U must have shape [G, N, N], got {_shape(U)}")
    if not U.dtype.is_floating_point:
        raise RuntimeError(f"{p}U must be a floating-point tensor, got {U.dtype}")
    G, N = U.shape[0], U.shape[1]
    for name, nbr in (("nbr1", nbr1), ("nbr2", nbr2)):
        if nbr.dtype != torch.long:
            raise RuntimeError(f"{p}{name} must be an int64 tensor, got {nbr.dtype}")
        if nbr.dim() != 3 or nbr.shape[0] != G or nbr.shape[1] != N:
            raise RuntimeError(f"{p}{name} must have shape [G, N, k] = [{G}, {N}, k], got {_shape(nbr)}")
        if nbr.device != U.device:
            raise RuntimeError(f"{p}{name} and U must be on the same device, got {nbr.device} and {U.device}")
    if nbr1.shape != nbr2.shape:
        raise RuntimeError(f"{p}nbr1 and nbr2 must have the same shape [G, N, k], got {_shape(nbr1)} and {_shape(nbr2)}")
    k = nbr1.shape[2]
    if Q is not None and (H1 is not None or H2 is not None):
        raise RuntimeError(f"{p}give either Q or (H1, H2), not both")
    if (H1 is None) != (H2 is None):
        raise RuntimeError(f"{p}H1 and H2 must be given together")
    if Q is not None:
        if Q.dim() != 3 or _shape(Q) != (G, N * k, N * k):
            raise RuntimeError(f"{p}Q must have shape [G, N*k, N*k] = [{G}, {N * k}, {N * k}], got {_shape(Q)}")
        if not Q.dtype.is_floating_point:
            raise RuntimeError(f"{p}Q must be a floating-point tensor, got {Q.dtype}")
        if Q.device != U.device:
            raise RuntimeError(f"{p}Q and U must be on the same device, got {Q.device} and {U.device}")
    if H1 is not None:
        for name, H in (("H1", H1), ("H2", H2)):
            if H.dim() != 3 or H.shape[0] != G or H.shape[1] != N:
                raise RuntimeError(f"{p}{name} must have shape [G, N, h] = [{G}, {N}, h], got {_shape(H)}")
            if not H.dtype.is_floating_point:
                raise RuntimeError(f"{p}{name} must be a floating-point tensor, got {H.dtype}")
            if H.device != U.device:
                raise RuntimeError(f"{p}{name} and U must be on the same device, got {H.device} and {U.device}")
        if H1.shape[2] != H2.shape[2]:
            raise RuntimeError(f"{p}H1 and H2 must have the same feature size h, got {_shape(H1)} and {_shape(H2)}")
    if method not in METHODS:
        raise RuntimeError(f"{p}method must be 'fw' or 'sinkhorn', got '{method}'")
    if estimator not in ESTIMATORS:
        raise RuntimeError(f"{p}estimator must be 'imle', 'blackbox' or 'imle_symmetric', got '{estimator}'")
    if not lambda_ > 0:
        raise RuntimeError(f"{p}lambda_ must be > 0, got {lambda_}")
    if max_iter < 1:
        raise RuntimeError(f"{p}max_iter must be >= 1, got {max_iter}")
    if not tol >= 0:
        raise RuntimeError(f"{p}tol must be >= 0, got {tol}")
    if restarts == 0 or restarts < -1:
        raise RuntimeError(f"{p}restarts must be >= 1 (or -1 for the size-based default), got {restarts}")
    if init is not None:
        if init.dtype != torch.long:
            raise RuntimeError(f"{p}init must be an int64 tensor, got {init.dtype}")
        if _shape(init) != (G, N):
            raise RuntimeError(f"{p}init must have shape [G, N] = [{G}, {N}], got {_shape(init)}")
        if init.device != U.device:
            raise RuntimeError(f"{p}init and U must be on the same device, got {init.device} and {U.device}")
    if check_values and init is not None and init.numel():
        if int(init.min()) < (-1 if partial else 0) or int(init.max()) >= N:
            extra = " or be -1 (unmatched)" if partial else " (-1 = unmatched needs partial=True)"
            raise RuntimeError(f"{p}init entries must lie in [0, {N}){extra}")
        counts = torch.zeros(G, N + 1, dtype=torch.long, device=init.device).scatter_add_(1, init + 1,
                                                                                          torch.ones_like(init))
        if int(counts[:, 1:].max()) > 1:
            raise RuntimeError(f"{p}every row of init must be a (partial) permutation, but a column appears twice")
    if check_values:
        if nbr1.numel() and (int(nbr1.min()) < 0 or int(nbr1.max()) >= N):
            raise RuntimeError(f"{p}nbr1 entries must lie in [0, {N})")
        if nbr2.numel() and (int(nbr2.min()) < 0 or int(nbr2.max()) >= N):
            raise RuntimeError(f"{p}nbr2 entries must lie in [0, {N})")
        for name, t in (("U", U), ("Q", Q), ("H1", H1), ("H2", H2)):
            if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
                raise RuntimeError(f"{p}{name} contains NaN or Inf")


@torch.library.register_fake("exgramed::qap_solve")
def _qap_solve_fake(U, nbr1, nbr2, Q=None, H1=None, H2=None, method="fw", max_iter=30, tol=1e-6, restarts=-1,
                    partial=False, seed=0, estimator="imle", lambda_=80.0, init=None):
    check_qap_args(U, nbr1, nbr2, Q, H1, H2, method, max_iter, tol, restarts, partial, seed, estimator, lambda_,
                   init, check_values=False)
    return U.new_empty(U.shape), U.new_empty(U.shape[:1])


@register_fallback("qap_solve")
def _qap_solve_reference(U, nbr1, nbr2, Q=None, H1=None, H2=None, method="fw", max_iter=30, tol=1e-6,
                         restarts=-1, partial=False, seed=0, estimator="imle", lambda_=80.0, init=None):
    check_qap_args(U, nbr1, nbr2, Q, H1, H2, method, max_iter, tol, restarts, partial, seed, estimator, lambda_,
                   init)
    return reference.qap_solve(U, nbr1, nbr2, Q, H1, H2, method, max_iter, tol, restarts, partial, seed,
                               init=init)


@torch.library.register_fake("exgramed::qap_solve_batched")
def _qap_solve_batched_fake(U, nbr1, nbr2, Q=None, H1=None, H2=None, method="fw", max_iter=30, tol=1e-6,
                            restarts=-1, partial=False, seed=0, estimator="imle", lambda_=80.0, init=None):
    return _qap_solve_fake(U, nbr1, nbr2, Q, H1, H2, method, max_iter, tol, restarts, partial, seed, estimator,
                           lambda_, init)


@register_fallback("qap_solve_batched")
def _qap_solve_batched_reference(U, nbr1, nbr2, Q=None, H1=None, H2=None, method="fw", max_iter=30, tol=1e-6,
                                 restarts=-1, partial=False, seed=0, estimator="imle", lambda_=80.0, init=None):
    return _qap_solve_reference(U, nbr1, nbr2, Q, H1, H2, method, max_iter, tol, restarts, partial, seed,
                                estimator, lambda_, init)


def check_gradient_args(X, nbr1, nbr2, Q, check_values=True) -> None:
    p = "qap_gradient: "
    if X.dim() not in (3, 4) or X.shape[-1] != X.shape[-2]:
        raise RuntimeError(f"{p}X must have shape [G, N, N] or [G, R, N, N], got {_shape(X)}")
    if not X.dtype.is_floating_point:
        raise RuntimeError(f"{p}X must be a floating-point tensor, got {X.dtype}")
    G, N = X.shape[0], X.shape[-1]
    for name, nbr in (("nbr1", nbr1), ("nbr2", nbr2)):
        if nbr.dtype != torch.long or nbr.dim() != 3 or nbr.shape[0] != G or nbr.shape[1] != N:
            raise RuntimeError(f"{p}{name} must be int64 [G, N, k] = [{G}, {N}, k], got {nbr.dtype} {_shape(nbr)}")
    k = nbr1.shape[2]
    if nbr2.shape[2] != k:
        raise RuntimeError(f"{p}nbr1 and nbr2 must have the same k, got {_shape(nbr1)} and {_shape(nbr2)}")
    if _shape(Q) != (G, N * k, N * k) or not Q.dtype.is_floating_point:
        raise RuntimeError(f"{p}Q must be a floating-point [G, N*k, N*k] = [{G}, {N * k}, {N * k}], got {_shape(Q)}")
    for name, t in (("nbr1", nbr1), ("nbr2", nbr2), ("Q", Q)):
        if t.device != X.device:
            raise RuntimeError(f"{p}{name} and X must be on the same device, got {t.device} and {X.device}")
    if check_values:
        for name, nbr in (("nbr1", nbr1), ("nbr2", nbr2)):
            if nbr.numel() and (int(nbr.min()) < 0 or int(nbr.max()) >= N):
                raise RuntimeError(f"{p}{name} entries must lie in [0, {N})")


@torch.library.register_fake("exgramed::qap_gradient")
def _qap_gradient_fake(X, nbr1, nbr2, Q):
    check_gradient_args(X, nbr1, nbr2, Q, check_values=False)
    return X.new_empty(X.shape)


@register_fallback("qap_gradient")
def _qap_gradient_reference(X, nbr1, nbr2, Q):
    check_gradient_args(X, nbr1, nbr2, Q)
    if X.dim() == 3:
        return reference.qap_gradient(X, nbr1, nbr2, Q)
    G, R, N, _ = X.shape
    rep = lambda t: t.repeat_interleave(R, 0)  # noqa: E731
    return reference.qap_gradient(X.reshape(G * R, N, N), rep(nbr1), rep(nbr2), rep(Q)).view(G, R, N, N)


def qap_gradient(X: torch.Tensor, nbr1: torch.Tensor, nbr2: torch.Tensor, Q: torch.Tensor,
                 backend: str = "auto") -> torch.Tensor:
    r"""Gradient of the quadratic term q(X) = sum_{e,f} Q[e,f] X[s1(e), s2(f)] X[t1(e), t2(f)]:

        dq/dX[x, y] = sum_{s1(e)=x, s2(f)=y} Q[e,f] X[t1(e), t2(f)] + sum_{t1(e)=x, t2(f)=y} Q[e,f] X[s1(e), s2(f)]

    Args:
        X: ``[G, N, N]`` or ``[G, R, N, N]`` (R iterates per problem sharing its Q), floating point.
        nbr1, nbr2: int64 ``[G, N, k]`` neighbour tables (edge e = i*k + s is (i, nbr[i, s])).
        Q: ``[G, N*k, N*k]`` floating point.
        backend: ``"auto"`` (compiled CPU/CUDA kernel) or ``"triton"``.

    Returns:
        X's shape and dtype. The CPU and CUDA kernels accumulate in float64 (one thread per output on
        CUDA, gathers only: deterministic); the Triton kernel in float32.
    """
    if backend == "auto":
        return torch.ops.exgramed.qap_gradient(X, nbr1, nbr2, Q)
    if backend == "triton":
        from .triton.qap_gradient import qap_gradient_triton

        return qap_gradient_triton(X, nbr1, nbr2, Q)
    raise ValueError(f"qap_gradient: backend must be 'auto' or 'triton', got {backend!r}")


def qap_objective(Z, U, nbr1, nbr2, Q=None, H1=None, H2=None) -> torch.Tensor:
    """f(Z) per problem ``[G]`` in U's dtype (computed in float64); Z may be any real ``[G, N, N]``."""
    return reference.qap_objective(Z, U, nbr1, nbr2, Q, H1, H2)


def qap_solve(U, nbr1, nbr2, Q=None, H1=None, H2=None, method="fw", max_iter=30, tol=1e-6, restarts=-1,
              partial=False, seed=0, estimator="imle", lambda_=80.0, init=None):
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
    generator keyed by (seed, g, r): deterministic for given inputs, independent of threading.
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
        restarts: number of starts (>= 1), or -1: 32 for N <= 8, 16 for N <= 16, 8 for N <= 32,
            4 for N <= 64, else 2.
        partial: maximise over partial permutations (a node may stay unmatched at score 0, as
            LPMP): the oracle is the linear assignment of max(grad, 0) with non-positive pairs dropped.
        seed: the random starts' seed.
        estimator, lambda_: used by the backward only (``"imle"``, ``"blackbox"`` or ``"imle_symmetric"``, lambda_ > 0).
        init: optional int64 ``[G, N]`` start (the column of each row; distinct columns, -1 = unmatched
            with ``partial`` only), replacing start 0: a warm start. With ``restarts=1`` the solve is a
            local improvement of ``init`` (Frank-Wolfe from it, then 2-opt), never worse than ``init``.

    Returns:
        ``(Z, obj)``: Z ``[G, N, N]`` 0/1 in U's dtype (a permutation matrix, or a partial one), obj ``[G]``
        = f(Z) in U's dtype (computed in float64).

    Backends: CPU runs one task per (problem, start) in parallel, single-threaded Frank-Wolfe in float64
    with a warm-started linear assignment and the gradient updated by linearity
    (grad q(X + t (P - X)) = (1 - t) grad q(X) + t grad q(P), O(N k^2) per vertex). CUDA runs all
    starts of all problems in lock-step on the device (``qap_solve_batched`` is that driver, also
    registered on the CPU). The implicit Q is expanded once per call to the dense ``[G, N*k, N*k]``
    table from the N x N cross Gram matrix (H1, H2 in float32, or float64 if either is float64).
    Both backends are deterministic; they may return different (equally valid) answers.
    """
    return torch.ops.exgramed.qap_solve(U, nbr1, nbr2, Q, H1, H2, method, max_iter, tol, restarts, partial, seed,
                                        estimator, lambda_, init)
