r"""``pair_scores``: the edge-pair (quadratic) scores of ``align`` in one pass, noise included.

    Q[p, e, f] = alpha * w1[p, e] * w2[p, f] * (C_ia - C_ib - C_ja + C_jb) + beta + noise_scale * n[p, e, f]

with edge ``e = i * k + s = (i, j = nbr1[p, i, s])`` of graph 1 and ``f = a * k + t = (a, b = nbr2[p, a, t])``
of graph 2. With the cross Gram ``C = H1 H2^T`` and the inverse edge lengths ``w``, the first term is
``alpha * <normalize(H1_i - H1_j), normalize(H2_a - H2_b)>``: the cosine of the two edge vectors,
through an ``N x N`` Gram matrix instead of ``N k x N k x h`` edge-feature products.

The noise n is either a given ``[P, Nk, Nk]`` tensor or, with ``noise_seed`` (a CPU int64 scalar
tensor), a standard Gumbel sample generated inside the kernel from a counter-based generator keyed
by ``(seed, p, e, f)`` (``reference.pair_scores.gumbel_noise``; float32 on every backend): the
largest tensor of a step is then written once, never sampled, stored and added separately.

Backward (``C``, ``w1``, ``w2``, and ``noise`` when given and requiring grad): the CPU kernel scans the
incoming gradient once and skips its zeros -- the solver estimators' gradient has at most 2 N k
non-zeros per problem -- accumulating in float64 in a fixed order (deterministic); CUDA uses
batched GEMMs with the signed incidence matrices.
"""
from __future__ import annotations

import torch

from . import reference
from ._backend import register_fallback


def _check(C, w1, w2, nbr1, nbr2, noise, noise_seed, op="pair_scores"):
    if C.dim() != 3 or C.shape[1] != C.shape[2]:
        raise RuntimeError(f"{op}: C must have shape [P, N, N], got {tuple(C.shape)}")
    if not C.dtype.is_floating_point:
        raise RuntimeError(f"{op}: C must be a floating-point tensor, got {C.dtype}")
    P, N = C.shape[0], C.shape[1]
    for name, t in (("nbr1", nbr1), ("nbr2", nbr2)):
        if t.dtype != torch.long or t.dim() != 3 or t.shape[0] != P or t.shape[1] != N:
            raise RuntimeError(f"{op}: {name} must be int64 [P, N, k] = [{P}, {N}, k], got {t.dtype} {tuple(t.shape)}")
        if t.device != C.device:
            raise RuntimeError(f"{op}: {name} and C must be on the same device, got {t.device} and {C.device}")
    if nbr1.shape[2] != nbr2.shape[2]:
        raise RuntimeError(f"{op}: nbr1 and nbr2 must have the same k, got {tuple(nbr1.shape)} and {tuple(nbr2.shape)}")
    Nk = N * nbr1.shape[2]
    for name, t in (("w1", w1), ("w2", w2)):
        if tuple(t.shape) != (P, Nk):
            raise RuntimeError(f"{op}: {name} must have shape [P, N*k] = [{P}, {Nk}], got {tuple(t.shape)}")
        if t.dtype != C.dtype:
            raise RuntimeError(f"{op}: {name} must have C's dtype {C.dtype}, got {t.dtype}")
        if t.device != C.device:
            raise RuntimeError(f"{op}: {name} and C must be on the same device, got {t.device} and {C.device}")
    if noise is not None and noise_seed is not None:
        raise RuntimeError(f"{op}: give either noise or noise_seed, not both")
    if noise is not None and tuple(noise.shape) != (P, Nk, Nk):
        raise RuntimeError(f"{op}: noise must have shape [P, N*k, N*k] = [{P}, {Nk}, {Nk}], got {tuple(noise.shape)}")
    if noise_seed is not None and (noise_seed.dtype != torch.long or noise_seed.numel() != 1
                                   or noise_seed.device.type != "cpu"):
        raise RuntimeError(f"{op}: noise_seed must be a CPU int64 tensor with one element, got {noise_seed.dtype} "
                           f"{tuple(noise_seed.shape)} on {noise_seed.device}")
    return P, Nk


@torch.library.register_fake("exgramed::pair_scores")
def _pair_scores_fake(C, w1, w2, nbr1, nbr2, alpha=1.0, beta=0.0, noise=None, noise_scale=0.0, noise_seed=None):
    P, Nk = _check(C, w1, w2, nbr1, nbr2, noise, noise_seed)
    return C.new_empty(P, Nk, Nk)


@register_fallback("pair_scores")
def _pair_scores_reference(C, w1, w2, nbr1, nbr2, alpha=1.0, beta=0.0, noise=None, noise_scale=0.0,
                           noise_seed=None):
    _check(C, w1, w2, nbr1, nbr2, noise, noise_seed)
    return reference.pair_scores(C, w1, w2, nbr1, nbr2, alpha, beta, noise, noise_scale,
                                 None if noise_seed is None else int(noise_seed))


@torch.library.register_fake("exgramed::pair_scores_backward")
def _pair_scores_backward_fake(grad, C, w1, w2, nbr1, nbr2, alpha):
    _check(C, w1, w2, nbr1, nbr2, None, None, "pair_scores_backward")
    return C.new_empty(C.shape), w1.new_empty(w1.shape), w2.new_empty(w2.shape)


@register_fallback("pair_scores_backward")
def _pair_scores_backward_reference(grad, C, w1, w2, nbr1, nbr2, alpha):
    _check(C, w1, w2, nbr1, nbr2, None, None, "pair_scores_backward")
    with torch.enable_grad():
        ins = [t.detach().requires_grad_() for t in (C, w1, w2)]
        Q = reference.pair_scores(*ins, nbr1, nbr2, alpha)
        return tuple(torch.autograd.grad(Q, ins, grad.to(Q.dtype)))


def _setup_context(ctx, inputs, output):
    inputs = tuple(inputs) + (None,) * (10 - len(inputs))
    C, w1, w2, nbr1, nbr2, alpha, _beta, noise, noise_scale, _seed = inputs
    ctx.alpha, ctx.noise_scale = 1.0 if alpha is None else alpha, 0.0 if noise_scale is None else noise_scale
    ctx.save_for_backward(C, w1, w2, nbr1, nbr2)


def _check_sparse_grad(indices, values, C, op="pair_scores_backward_sparse"):
    if indices.dtype != torch.long or indices.dim() != 2 or indices.shape[0] != 3:
        raise RuntimeError(f"{op}: indices must be int64 [3, nnz] (problem, row e, column f), got {indices.dtype} "
                           f"{tuple(indices.shape)}")
    if not values.dtype.is_floating_point or values.dim() != 1 or values.shape[0] != indices.shape[1]:
        raise RuntimeError(f"{op}: values must be a floating-point tensor of shape [nnz] = [{indices.shape[1]}], got "
                           f"{values.dtype} {tuple(values.shape)}")
    for name, t in (("indices", indices), ("values", values)):
        if t.device != C.device:
            raise RuntimeError(f"{op}: {name} and C must be on the same device, got {t.device} and {C.device}")


@torch.library.register_fake("exgramed::pair_scores_backward_sparse")
def _pair_scores_backward_sparse_fake(indices, values, C, w1, w2, nbr1, nbr2, alpha):
    _check(C, w1, w2, nbr1, nbr2, None, None, "pair_scores_backward_sparse")
    _check_sparse_grad(indices, values, C)
    return C.new_empty(C.shape), w1.new_empty(w1.shape), w2.new_empty(w2.shape)


@register_fallback("pair_scores_backward_sparse")
def _pair_scores_backward_sparse_reference(indices, values, C, w1, w2, nbr1, nbr2, alpha):
    """The definition: ``pair_scores_backward`` of the dense gradient the entries make (duplicates summed)."""
    P, Nk = _check(C, w1, w2, nbr1, nbr2, None, None, "pair_scores_backward_sparse")
    _check_sparse_grad(indices, values, C)
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


# ----------------------------------------------------------------------------- edge_sq_norms


def _check_edge(h, nbr, op="edge_sq_norms"):
    if h.dim() != 3:
        raise RuntimeError(f"{op}: h must have shape [G, N, h], got {tuple(h.shape)}")
    if not h.dtype.is_floating_point:
        raise RuntimeError(f"{op}: h must be a floating-point tensor, got {h.dtype}")
    if nbr.dtype != torch.long or nbr.dim() != 3 or nbr.shape[0] != h.shape[0] or nbr.shape[1] != h.shape[1]:
        raise RuntimeError(f"{op}: nbr must be int64 [G, N, k] = [{h.shape[0]}, {h.shape[1]}, k], got {nbr.dtype} "
                           f"{tuple(nbr.shape)}")
    if nbr.device != h.device:
        raise RuntimeError(f"{op}: nbr and h must be on the same device, got {nbr.device} and {h.device}")
    return h.shape[0], h.shape[1] * nbr.shape[2]


def _check_edge_values(h, nbr, op="edge_sq_norms"):
    if nbr.numel() and (int(nbr.min()) < 0 or int(nbr.max()) >= h.shape[1]):
        raise RuntimeError(f"{op}: nbr entries must lie in [0, {h.shape[1]})")


@torch.library.register_fake("exgramed::edge_sq_norms")
def _edge_sq_norms_fake(h, nbr):
    G, Nk = _check_edge(h, nbr)
    return h.new_empty(G, Nk)


@register_fallback("edge_sq_norms")
def _edge_sq_norms_reference(h, nbr):
    _check_edge(h, nbr)
    _check_edge_values(h, nbr)
    return reference.edge_sq_norms(h, nbr)


@torch.library.register_fake("exgramed::edge_sq_norms_backward")
def _edge_sq_norms_backward_fake(grad, h, nbr):
    _check_edge(h, nbr, "edge_sq_norms_backward")
    return h.new_empty(h.shape)


@register_fallback("edge_sq_norms_backward")
def _edge_sq_norms_backward_reference(grad, h, nbr):
    _check_edge(h, nbr, "edge_sq_norms_backward")
    _check_edge_values(h, nbr, "edge_sq_norms_backward")
    with torch.enable_grad():
        hh = h.detach().requires_grad_()
        return torch.autograd.grad(reference.edge_sq_norms(hh, nbr), hh, grad.to(h.dtype))[0]


def _edge_setup_context(ctx, inputs, output):
    h, nbr = inputs
    ctx.save_for_backward(h, nbr)


def _edge_backward(ctx, grad):
    h, nbr = ctx.saved_tensors
    return torch.ops.exgramed.edge_sq_norms_backward(grad, h, nbr), None


torch.library.register_autograd("exgramed::edge_sq_norms", _edge_backward, setup_context=_edge_setup_context)


def edge_sq_norms(h: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    r"""Squared lengths of the kNN edges: ``d2[g, i k + s] = sum_c (h[g, i, c] - h[g, nbr[g, i, s], c])^2``.

    From the differences themselves (no cancellation, unlike ``|h_i|^2 + |h_j|^2 - 2 <h_i, h_j>``), in
    O(G N k h) without materialising the ``[G, N k, h]`` edge vectors on the CPU (float64 sums in a fixed
    order; half and bfloat16 computed in float32). ``align``'s edge normalisation.

    Args:
        h: ``[G, N, h]`` float node features. nbr: int64 ``[G, N, k]``, entries in ``[0, N)``.

    Returns:
        ``[G, N k]`` in h's dtype; differentiable w.r.t. h (``dh_i = 2 sum_j g_ij (h_i - h_j)``, both ends).
    """
    return torch.ops.exgramed.edge_sq_norms(h, nbr)


def pair_scores(C: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, nbr1: torch.Tensor, nbr2: torch.Tensor,
                alpha: float = 1.0, beta: float = 0.0, noise: torch.Tensor | None = None, noise_scale: float = 0.0,
                noise_seed: torch.Tensor | None = None) -> torch.Tensor:
    """Edge-pair scores (module docstring).

    Args:
        C: ``[P, N, N]`` float (the cross Gram of the two graphs of each problem).
        w1, w2: ``[P, N*k]`` in C's dtype (per-edge weights: the inverse edge lengths).
        nbr1, nbr2: int64 ``[P, N, k]`` neighbour tables, entries in ``[0, N)``.
        alpha, beta: scale and offset. noise_scale: the noise's scale.
        noise: optional ``[P, N*k, N*k]`` noise, or
        noise_seed: optional CPU int64 one-element tensor: in-kernel standard Gumbel noise.

    Returns:
        ``[P, N*k, N*k]`` in C's dtype; differentiable w.r.t. C, w1, w2 (and noise).
    """
    return torch.ops.exgramed.pair_scores(C, w1, w2, nbr1, nbr2, alpha, beta, noise, noise_scale, noise_seed)


def seeded_gumbel(noise_seed: torch.Tensor, P: int, N: int, k: int, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The noise ``pair_scores`` generates for ``noise_seed`` as a tensor ``[P, N k, N k]`` (standard
    Gumbel, float32 values): for callers that must slice it (the sharded global alignment)."""
    zeros_c = torch.zeros(P, N, N, device=device, dtype=dtype)
    zeros_w = torch.zeros(P, N * k, device=device, dtype=dtype)
    nbr = torch.zeros(P, N, k, device=device, dtype=torch.long)
    return torch.ops.exgramed.pair_scores(zeros_c, zeros_w, zeros_w, nbr, nbr, 0.0, 0.0, None, 1.0, noise_seed)
