r"""``qap_gradient``: the gradient of graph matching's quadratic term, the Frank-Wolfe direction of ``qap_solve``.

    q(X) = sum_{e=(i,j) in E1} sum_{f=(a,b) in E2} Q[e, f] X_ia X_jb

with edge e = i*k + s of graph 1 being (i, nbr1[g, i, s]) and f = a*k + t of graph 2 being (a, nbr2[g, a, t]).
"""
from __future__ import annotations

import torch

from . import reference
from ._backend import register_fallback
from .checks import check_gradient_args


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


def _setup_context(ctx, inputs, output):
    X, nbr1, nbr2, Q = inputs
    ctx.save_for_backward(X, nbr1, nbr2, Q)


def _backward(ctx, grad):
    """grad q is linear in X with a symmetric Hessian H (grad q(X) = H X): dL/dX = H grad = qap_gradient(grad).
    dL/dQ[e, f] = grad[s1(e), s2(f)] X[t1(e), t2(f)] + grad[t1(e), t2(f)] X[s1(e), s2(f)], summed over iterates."""
    X, nbr1, nbr2, Q = ctx.saved_tensors
    need_X, need_Q = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    gX = torch.ops.exgramed.qap_gradient(grad.to(X.dtype), nbr1, nbr2, Q) if need_X else None
    gQ = None
    if need_Q:
        G, N, k = nbr1.shape
        s1, t1 = reference.edge_ends(nbr1)
        s2, t2 = reference.edge_ends(nbr2)
        R = X.shape[1] if X.dim() == 4 else 1
        Xs, gs = X.reshape(G * R, N, N), grad.to(X.dtype).reshape(G * R, N, N)
        rep = lambda t: t.repeat_interleave(R, 0)  # noqa: E731
        s1, t1, s2, t2 = rep(s1), rep(t1), rep(s2), rep(t2)
        pg = reference.pair_gather
        gQ = pg(gs, s1, s2) * pg(Xs, t1, t2) + pg(gs, t1, t2) * pg(Xs, s1, s2)
        gQ = gQ.view(G, R, N * k, N * k).sum(1).to(Q.dtype)
    return gX, None, None, gQ


torch.library.register_autograd("exgramed::qap_gradient", _backward, setup_context=_setup_context)
