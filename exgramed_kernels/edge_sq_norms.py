"""``edge_sq_norms``: the squared lengths of the kNN edges, ``align``'s edge normalisation."""
from __future__ import annotations

import torch

from . import reference
from ._backend import register_fallback, register_no_gradient
from .checks import check_edge_sq_norms_args, check_finite, check_index_range


@torch.library.register_fake("exgramed::edge_sq_norms")
def _edge_sq_norms_fake(h, nbr):
    G, Nk = check_edge_sq_norms_args(h, nbr)
    return h.new_empty(G, Nk)


@register_fallback("edge_sq_norms")
def _edge_sq_norms_reference(h, nbr):
    check_edge_sq_norms_args(h, nbr)
    check_index_range("edge_sq_norms", h.shape[1], nbr=nbr)
    check_finite("edge_sq_norms", h=h)
    return reference.edge_sq_norms(h, nbr)


@torch.library.register_fake("exgramed::edge_sq_norms_backward")
def _edge_sq_norms_backward_fake(grad, h, nbr):
    check_edge_sq_norms_args(h, nbr, "edge_sq_norms_backward")
    return h.new_empty(h.shape)


@register_fallback("edge_sq_norms_backward")
def _edge_sq_norms_backward_reference(grad, h, nbr):
    check_edge_sq_norms_args(h, nbr, "edge_sq_norms_backward")
    check_index_range("edge_sq_norms_backward", h.shape[1], nbr=nbr)
    with torch.enable_grad():
        hh = h.detach().requires_grad_()
        return torch.autograd.grad(reference.edge_sq_norms(hh, nbr), hh, grad.to(h.dtype))[0]


def _setup_context(ctx, inputs, output):
    h, nbr = inputs
    ctx.save_for_backward(h, nbr)


def _backward(ctx, grad):
    h, nbr = ctx.saved_tensors
    return torch.ops.exgramed.edge_sq_norms_backward(grad, h, nbr), None


torch.library.register_autograd("exgramed::edge_sq_norms", _backward, setup_context=_setup_context)


def edge_sq_norms(h: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    r"""Squared lengths of the kNN edges: ``d2[g, i k + s] = sum_c (h[g, i, c] - h[g, nbr[g, i, s], c])^2``.

    From the differences themselves (no cancellation, unlike ``|h_i|^2 + |h_j|^2 - 2 <h_i, h_j>``), in
    O(G N k h) without materialising the ``[G, N k, h]`` edge vectors on the CPU (float64 sums in a fixed
    order; half and bfloat16 computed in float32). ``align``'s edge normalisation.

    Args:
        h: ``[G, N, h]`` float node features, finite. nbr: int64 ``[G, N, k]``, entries in ``[0, N)``.

    Returns:
        ``[G, N k]`` in h's dtype; differentiable w.r.t. h (``dh_i = 2 sum_j g_ij (h_i - h_j)``, both ends).
    """
    return torch.ops.exgramed.edge_sq_norms(h, nbr)
register_no_gradient("edge_sq_norms_backward", "edge_sq_norms' backward (a double backward of edge_sq_norms)")
