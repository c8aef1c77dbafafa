r"""``pair_scores``: the edge-pair (quadratic) scores of ``align`` in one pass, noise included.

    Q[p, e, f] = alpha * w1[p, e] * w2[p, f] * (C_ia - C_ib - C_ja + C_jb) + beta + noise_scale * n[p, e, f]

with edge ``e = i * k + s = (i, j = nbr1[p, i, s])`` of graph 1 and ``f = a * k + t = (a, b = nbr2[p, a, t])``
of graph 2. With the cross Gram ``C = H1 H2^T`` and the inverse edge lengths ``w``, the first term is
``alpha * <normalize(H1_i - H1_j), normalize(H2_a - H2_b)>``: the cosine of the two edge vectors,
through an ``N x N`` Gram matrix instead of ``N k x N k x h`` edge-feature products.

The noise n is either a given ``[P, Nk, Nk]`` tensor or, with ``noise_seed`` (int64 ``[P]``, one seed
per problem), a standard Gumbel sample generated inside the kernel from a counter-based generator keyed
by ``(noise_seed[p], e, f)`` (``reference.pair_scores.gumbel_noise``; float32 on every backend): the
largest tensor of a step is then written once, never sampled, stored and added separately, and a
problem's noise travels with its seed (a subset of the problems gets the same noise as the whole batch).

Backward (``C``, ``w1``, ``w2``, and ``noise`` when given and requiring grad): the CPU kernel scans the
incoming gradient once and skips its zeros -- the solver estimators' gradient has at most 2 N k
non-zeros per problem -- accumulating in float64 in a fixed order (deterministic); CUDA uses
batched GEMMs with the signed incidence matrices.
"""
from __future__ import annotations

import torch

from . import reference
from ._backend import register_fallback, register_no_gradient
from .checks import check_finite, check_index_range, check_pair_scores_args, check_sparse_grad_args, compute_dtype


@torch.library.register_fake("exgramed::pair_scores")
def _pair_scores_fake(C, w1, w2, nbr1, nbr2, alpha=1.0, beta=0.0, noise=None, noise_scale=0.0, noise_seed=None):
    P, Nk = check_pair_scores_args(C, w1, w2, nbr1, nbr2, noise, noise_seed)
    return C.new_empty(P, Nk, Nk)


@register_fallback("pair_scores")
def _pair_scores_reference(C, w1, w2, nbr1, nbr2, alpha=1.0, beta=0.0, noise=None, noise_scale=0.0,
                           noise_seed=None):
    check_pair_scores_args(C, w1, w2, nbr1, nbr2, noise, noise_seed)
    check_index_range("pair_scores", C.shape[1], nbr1=nbr1, nbr2=nbr2)
    check_finite("pair_scores", C=C, w1=w1, w2=w2, noise=noise)
    ct = compute_dtype(C.dtype)
    return reference.pair_scores(C.to(ct), w1.to(ct), w2.to(ct), nbr1, nbr2, alpha, beta,
                                 None if noise is None else noise.to(ct), noise_scale, noise_seed).to(C.dtype)


@torch.library.register_fake("exgramed::pair_scores_backward")
def _pair_scores_backward_fake(grad, C, w1, w2, nbr1, nbr2, alpha):
    check_pair_scores_args(C, w1, w2, nbr1, nbr2, None, None, "pair_scores_backward")
    return C.new_empty(C.shape), w1.new_empty(w1.shape), w2.new_empty(w2.shape)


@register_fallback("pair_scores_backward")
def _pair_scores_backward_reference(grad, C, w1, w2, nbr1, nbr2, alpha):
    check_pair_scores_args(C, w1, w2, nbr1, nbr2, None, None, "pair_scores_backward")
    ct = compute_dtype(C.dtype)
    with torch.enable_grad():
        ins = [t.detach().to(ct).requires_grad_() for t in (C, w1, w2)]
        Q = reference.pair_scores(*ins, nbr1, nbr2, alpha)
        return tuple(g.to(C.dtype) for g in torch.autograd.grad(Q, ins, grad.to(Q.dtype)))


def _setup_context(ctx, inputs, output):
    inputs = tuple(inputs) + (None,) * (10 - len(inputs))
    C, w1, w2, nbr1, nbr2, alpha, _beta, noise, noise_scale, _seed = inputs
    ctx.alpha, ctx.noise_scale = 1.0 if alpha is None else alpha, 0.0 if noise_scale is None else noise_scale
    ctx.save_for_backward(C, w1, w2, nbr1, nbr2)


@torch.library.register_fake("exgramed::pair_scores_backward_sparse")
def _pair_scores_backward_sparse_fake(indices, values, C, w1, w2, nbr1, nbr2, alpha):
    check_pair_scores_args(C, w1, w2, nbr1, nbr2, None, None, "pair_scores_backward_sparse")
    check_sparse_grad_args(indices, values, C)
    return C.new_empty(C.shape), w1.new_empty(w1.shape), w2.new_empty(w2.shape)


@register_fallback("pair_scores_backward_sparse")
def _pair_scores_backward_sparse_reference(indices, values, C, w1, w2, nbr1, nbr2, alpha):
    """The definition: ``pair_scores_backward`` of the dense gradient the entries make (duplicates summed)."""
    P, Nk = check_pair_scores_args(C, w1, w2, nbr1, nbr2, None, None, "pair_scores_backward_sparse")
    check_sparse_grad_args(indices, values, C)
    if not bool(torch.isfinite(values).all()):
        raise RuntimeError("pair_scores_backward_sparse: values contains NaN or Inf")
    bounds = torch.tensor([P, Nk, Nk], device=indices.device)
    if indices.numel() and not (bool((indices.min(1).values >= 0).all())
                                and bool((indices.max(1).values < bounds).all())):
        raise RuntimeError(f"pair_scores_backward_sparse: indices must lie in [0, {P}) x [0, {Nk}) x [0, {Nk})")
    dense = torch.sparse_coo_tensor(indices, values, (P, Nk, Nk)).to_dense()
    return _pair_scores_backward_reference(dense, C, w1, w2, nbr1, nbr2, alpha)


def pair_scores_backward_sparse(indices: torch.Tensor, values: torch.Tensor, C: torch.Tensor, w1: torch.Tensor,
                                w2: torch.Tensor, nbr1: torch.Tensor, nbr2: torch.Tensor, alpha: float = 1.0):
    """``pair_scores``' backward for a gradient given by its entries (a COO tensor's indices and values).

    The same formula as ``pair_scores_backward`` (module docstring) over the listed entries only, duplicates
    summed: O(nnz) instead of a scan of the ``[P, N k, N k]`` gradient. What ``align``'s CPU backward runs,
    as the solver estimators' gradient has at most ``2 N k`` entries per problem (a CPU kernel; float64
    accumulation in the entries' order, deterministic).

    Args:
        indices: int64 ``[3, nnz]``: problem ``p``, row ``e`` and column ``f`` of each entry.
        values: ``[nnz]`` float (finite). C, w1, w2, nbr1, nbr2, alpha: as in :func:`pair_scores`.

    Returns:
        ``(grad_C [P, N, N], grad_w1 [P, N k], grad_w2 [P, N k])`` in C's dtype.
    """
    return torch.ops.exgramed.pair_scores_backward_sparse(indices, values, C, w1, w2, nbr1, nbr2, alpha)


def _backward(ctx, grad):
    C, w1, w2, nbr1, nbr2 = ctx.saved_tensors
    n = ctx.needs_input_grad
    gC = gw1 = gw2 = None
    if any(n[:3]):
        if grad.is_sparse:  # from qap_solve's estimators (align): only the matched edge pairs
            gC, gw1, gw2 = torch.ops.exgramed.pair_scores_backward_sparse(
                grad._indices(), grad._values(), C, w1, w2, nbr1, nbr2, ctx.alpha)
        else:
            gC, gw1, gw2 = torch.ops.exgramed.pair_scores_backward(grad, C, w1, w2, nbr1, nbr2, ctx.alpha)
    if grad.is_sparse and len(n) > 7 and n[7]:
        grad = grad.to_dense()
    g_noise = grad * ctx.noise_scale if len(n) > 7 and n[7] else None
    return (gC if n[0] else None, gw1 if n[1] else None, gw2 if n[2] else None, None, None, None, None, g_noise,
            None, None)


torch.library.register_autograd("exgramed::pair_scores", _backward, setup_context=_setup_context)
register_no_gradient("pair_scores_backward", "pair_scores' backward (a double backward of pair_scores)")
register_no_gradient("pair_scores_backward_sparse", "pair_scores' sparse backward")


def pair_scores(C: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, nbr1: torch.Tensor, nbr2: torch.Tensor,
                alpha: float = 1.0, beta: float = 0.0, noise: torch.Tensor | None = None, noise_scale: float = 0.0,
                noise_seed: torch.Tensor | None = None) -> torch.Tensor:
    """Edge-pair scores (module docstring).

    Args:
        C: ``[P, N, N]`` float (the cross Gram of the two graphs of each problem), finite; float16 and bfloat16
            are computed in float32.
        w1, w2: ``[P, N*k]`` in C's dtype (per-edge weights: the inverse edge lengths), finite.
        nbr1, nbr2: int64 ``[P, N, k]`` neighbour tables, entries in ``[0, N)``.
        alpha, beta: scale and offset. noise_scale: the noise's scale.
        noise: optional ``[P, N*k, N*k]`` noise (finite), or
        noise_seed: optional int64 ``[P]`` on C's device, one seed per problem: in-kernel standard Gumbel noise.

    Returns:
        ``[P, N*k, N*k]`` in C's dtype; differentiable w.r.t. C, w1, w2 (and noise).
    """
    return torch.ops.exgramed.pair_scores(C, w1, w2, nbr1, nbr2, alpha, beta, noise, noise_scale, noise_seed)
