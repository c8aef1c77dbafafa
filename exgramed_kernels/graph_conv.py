"""`graph_conv`: batched PyG GraphConv / GCNConv over kNN tables, and the 2-layer `GraphConvNet`.

Op structure (schemas in schemas.def):

* ``graph_conv`` (public) is the first output of ``graph_conv_forward`` (CompositeImplicitAutograd).
* ``graph_conv_forward -> (out, xa, argmax)``: CPU/CUDA kernels; ``xa = [x | agg]`` (``agg`` alone
  for gcn) is the GEMM input, ``argmax`` int32 ``[G, N, d]`` the winning aggregation position of
  max (``-1`` for an empty neighbourhood; ``[0, N, d]`` for the other aggregations). Autograd is
  registered here, saving ``xa`` and ``argmax``.
* ``graph_conv_stacked(x, nbr, weight, ...)``: the same with ``weight = [w_root; w_rel]`` as one
  ``[2d, h]`` tensor (``[d, h]``, i.e. ``w_rel``, for gcn), whose gradient is then the backward's one
  GEMM output as is (no slice backward). :class:`GraphConvNet` calls this.
* ``graph_conv_backward -> (grad_x, grad_w, grad_bias)``: ``grad_w`` is ``[2d, h]`` (``[w_root;
  w_rel]``; ``[d, h]`` = grad of ``w_rel`` for gcn).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import reference
from ._backend import HAS_EXTENSION, _LIB, register_fallback, register_no_gradient
from .checks import AGGRS, check_graph_conv_args, split_stacked_weight

# ---- fake kernels ------------------------------------------------------------------------


@torch.library.register_fake("exgramed::graph_conv_forward")
def _graph_conv_forward_fake(x, nbr, w_root, w_rel, bias=None, aggr="max", reverse=False, relu=False):
    check_graph_conv_args(x, nbr, w_root, w_rel, bias, aggr, check_values=False)
    G, N, d = x.shape
    out = x.new_empty((G, N, w_root.shape[1]))
    xa = x.new_empty((G, N, d if aggr == "gcn" else 2 * d))
    argmax = x.new_empty((G if aggr == "max" else 0, N, d), dtype=torch.int32)
    return out, xa, argmax


@torch.library.register_fake("exgramed::graph_conv_stacked")
def _graph_conv_stacked_fake(x, nbr, weight, bias=None, aggr="max", reverse=False, relu=False):
    return _graph_conv_forward_fake(x, nbr, *split_stacked_weight(x, weight, aggr), bias, aggr, reverse, relu)


@torch.library.register_fake("exgramed::graph_conv_backward")
def _graph_conv_backward_fake(grad_out, out, xa, argmax, nbr, w_root, w_rel, aggr, reverse, relu):
    G, N = nbr.shape[:2]
    d, h = w_root.shape
    return (
        xa.new_empty((G, N, d)),
        xa.new_empty((d if aggr == "gcn" else 2 * d, h)),
        xa.new_empty((h,)),
    )


# ---- autograd ----------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    x, nbr, w_root, w_rel, bias, aggr, reverse, relu = inputs
    out, xa, argmax = output
    ctx.save_for_backward(out, xa, argmax, nbr, w_root, w_rel)
    ctx.aggr, ctx.reverse, ctx.relu, ctx.has_bias = aggr, reverse, relu, bias is not None
    ctx.mark_non_differentiable(xa, argmax)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for xa and argmax


def _backward(ctx, grad_out, _grad_xa, _grad_argmax):
    out, xa, argmax, nbr, w_root, w_rel = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None, None, None
    gx, gw, gb = torch.ops.exgramed.graph_conv_backward(
        grad_out, out, xa, argmax, nbr, w_root, w_rel, ctx.aggr, ctx.reverse, ctx.relu
    )
    d = w_root.shape[0]
    g_root, g_rel = (None, gw) if ctx.aggr == "gcn" else (gw[:d], gw[d:])
    return gx, None, g_root, g_rel, (gb if ctx.has_bias else None), None, None, None


torch.library.register_autograd("exgramed::graph_conv_forward", _backward, setup_context=_setup_context)


def _setup_context_stacked(ctx, inputs, output):
    x, nbr, weight, bias, aggr, reverse, relu = inputs
    out, xa, argmax = output
    ctx.save_for_backward(out, xa, argmax, nbr, weight)
    ctx.aggr, ctx.reverse, ctx.relu, ctx.has_bias = aggr, reverse, relu, bias is not None
    ctx.mark_non_differentiable(xa, argmax)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for xa and argmax


def _backward_stacked(ctx, grad_out, _grad_xa, _grad_argmax):
    out, xa, argmax, nbr, weight = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None, None
    d = weight.shape[0] if ctx.aggr == "gcn" else weight.shape[0] // 2
    w_root, w_rel = (weight, weight) if ctx.aggr == "gcn" else (weight[:d], weight[d:])
    gx, gw, gb = torch.ops.exgramed.graph_conv_backward(
        grad_out, out, xa, argmax, nbr, w_root, w_rel, ctx.aggr, ctx.reverse, ctx.relu
    )
    return gx, None, gw, (gb if ctx.has_bias else None), None, None, None


torch.library.register_autograd("exgramed::graph_conv_stacked", _backward_stacked, setup_context=_setup_context_stacked)
register_no_gradient("graph_conv_backward", "graph_conv's backward (a double backward of graph_conv)")


# ---- no extension: the reference serves the kernels ----------------------------------------


@register_fallback("graph_conv_forward")
def _graph_conv_forward_reference(x, nbr, w_root, w_rel, bias=None, aggr="max", reverse=False, relu=False):
    check_graph_conv_args(x, nbr, w_root, w_rel, bias, aggr)
    return reference.graph_conv_forward(x, nbr, w_root, w_rel, bias, aggr, reverse, relu)


@register_fallback("graph_conv_stacked")
def _graph_conv_stacked_reference(x, nbr, weight, bias=None, aggr="max", reverse=False, relu=False):
    return _graph_conv_forward_reference(x, nbr, *split_stacked_weight(x, weight, aggr), bias, aggr, reverse, relu)


register_fallback("graph_conv_backward")(reference.graph_conv_backward)

if not HAS_EXTENSION:

    def _graph_conv_composite(x, nbr, w_root, w_rel, bias=None, aggr="max", reverse=False, relu=False):
        return torch.ops.exgramed.graph_conv_forward(x, nbr, w_root, w_rel, bias, aggr, reverse, relu)[0]

    _LIB.impl("graph_conv", _graph_conv_composite, "CompositeImplicitAutograd")


# ---- public API ----------------------------------------------------------------------------


def graph_conv(
    x: torch.Tensor,
    nbr: torch.Tensor,
    w_root: torch.Tensor,
    w_rel: torch.Tensor,
    bias: torch.Tensor | None = None,
    aggr: str = "max",
    reverse: bool = False,
    relu: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    r"""PyG ``GraphConv`` (or ``GCNConv``) on G graphs at once, with weights shared by all graphs.

    For ``aggr in {"max", "mean", "sum"}`` (PyG ``GraphConv(aggr=...)``):

    .. math:: out_i = x_i W_{root} + \big(\mathrm{AGG}_{j \in N(i)} x_j\big) W_{rel} + b

    computed as one GEMM ``[x | agg] @ [W_root; W_rel]`` (a single matrix when ``w_root`` and
    ``w_rel`` are the two halves of one buffer, as :class:`GraphConvNet` stores them). An empty
    neighbourhood aggregates to 0 (PyG semantics).

    For ``aggr="gcn"`` (PyG ``GCNConv``, ``add_self_loops=True, normalize=True``):

    .. math:: out = D^{-1/2} (A + I) D^{-1/2} x W_{rel} + b

    with D the in-degree plus one self loop, ``norm_{ij} = (deg_i + 1)^{-1/2} (deg_j + 1)^{-1/2}``
    exactly as PyG's ``gcn_norm``; table entries ``nbr[g, i, s] == i`` are that self loop, not
    extra edges. ``w_root`` is not used by gcn (pass any ``[d, h]`` tensor, e.g. ``w_rel``; it gets
    no gradient).

    Then ``relu`` (fused into the GEMM epilogue where the backend allows) if asked.

    Neighbourhoods N(i): ``reverse=False``: the table row ``nbr[g, i, :]`` (PyG
    ``edge_index = [nbr[i, s], i]``); ``reverse=True``: the nodes that chose i, ``{j : i in
    nbr[g, j, :]}`` (PyG's default ``source_to_target`` flow on ``edge_index = [i, nbr[i, s]]``,
    the official ExGra-Med pipeline). Duplicate table entries are counted as duplicate edges.

    Backward (x, w_root, w_rel, bias) is deterministic and atomic-free. Max sends the gradient of
    a tie to one neighbour: the one with the lowest node index (then the first table slot). PyG on
    CPU splits it evenly among ties; torch_scatter on CUDA sends it to one arbitrary neighbour.
    Ties have probability zero on continuous inputs.

    Numerics: fp16/bf16 aggregation accumulates in fp32 (fp64 for fp64); the GEMMs are the
    platform's (MKL/oneDNN, cuBLAS) in the input dtype with fp32 accumulation.

    Args:
        x: ``[G, N, d]`` float16, bfloat16, float32 or float64, finite.
        nbr: int64 ``[G, N, k]``, entries in ``[0, N)`` (e.g. from :func:`knn_graph`); ``k = 0`` allowed.
        w_root, w_rel: ``[d, h]``, x's dtype and device (applied as ``x @ W``).
        bias: ``[h]`` or None.
        aggr: ``"max"``, ``"mean"``, ``"sum"`` or ``"gcn"``.
        reverse: aggregate in-neighbours instead of table rows.
        relu: apply ReLU to the output.
        backend: ``"auto"`` (the compiled CPU/CUDA op ``torch.ops.exgramed.graph_conv``) or
            ``"triton"`` (Triton aggregation kernels + torch GEMMs; GPU, or CPU under
            ``TRITON_INTERPRET=1``).

    Returns:
        ``[G, N, h]`` in x's dtype.
    """
    if backend == "auto":
        return torch.ops.exgramed.graph_conv(x, nbr, w_root, w_rel, bias, aggr, reverse, relu)
    if backend == "triton":
        from .triton.graph_conv import graph_conv_triton

        return graph_conv_triton(x, nbr, w_root, w_rel, bias, aggr, reverse, relu)
    raise ValueError(f"graph_conv: backend must be 'auto' or 'triton', got {backend!r}")


class GraphConvNet(nn.Module):
    r"""ExGra-Med's message-passing stack: ``num_layers`` x (GraphConv -> ReLU -> dropout), weights
    shared by all graphs, one batched :func:`graph_conv` call per layer for all G graphs.

    As the official code (PyG ``GraphConv(aggr="max")``, 4096 -> 4096, ReLU, dropout 0.1), every
    layer, the last included, is followed by ReLU (fused into the op) and dropout.

    Parameters per layer l (in ``d_l``, out ``h_l``): ``weight{l}`` ``[2 d_l, h_l]`` holding
    ``[W_root; W_rel]`` in one buffer (so the op runs one GEMM) and ``bias{l}`` ``[h_l]``. Initialised
    like PyG: ``GraphConv``'s ``Linear`` layers (weights and bias ``U(-1/sqrt(d_l), 1/sqrt(d_l))``);
    for ``aggr="gcn"`` ``weight{l}`` is ``[d_l, h_l]`` (``GCNConv``: Glorot weight, zero bias).

    Args:
        in_dim, hidden_dim: input and hidden widths; out_dim: last layer's width (default hidden_dim).
        num_layers: number of GraphConv layers (>= 1).
        aggr, reverse: as :func:`graph_conv`.
        dropout: dropout probability after every layer (training mode only).
        bias: whether the layers have a bias.

    ``forward(x [G, N, in_dim], nbr [G, N, k]) -> [G, N, out_dim]``.
    """

    def __init__(self, in_dim, hidden_dim, out_dim=None, num_layers=2, aggr="max", dropout=0.1, reverse=False, bias=True):
        super().__init__()
        if aggr not in AGGRS:
            raise ValueError(f"GraphConvNet: aggr must be one of {AGGRS}, got {aggr!r}")
        if num_layers < 1:
            raise ValueError(f"GraphConvNet: num_layers must be >= 1, got {num_layers}")
        out_dim = hidden_dim if out_dim is None else out_dim
        self.dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.aggr, self.reverse, self.dropout, self.num_layers = aggr, reverse, dropout, num_layers
        for l in range(num_layers):
            d, h = self.dims[l], self.dims[l + 1]
            self.register_parameter(f"weight{l}", nn.Parameter(torch.empty(d if aggr == "gcn" else 2 * d, h)))
            self.register_parameter(f"bias{l}", nn.Parameter(torch.empty(h)) if bias else None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for l in range(self.num_layers):
            d, h = self.dims[l], self.dims[l + 1]
            w, b = getattr(self, f"weight{l}"), getattr(self, f"bias{l}")
            if self.aggr == "gcn":
                bound = math.sqrt(6.0 / (d + h))
                w.uniform_(-bound, bound)
                if b is not None:
                    b.zero_()
            else:
                bound = 1.0 / math.sqrt(d)
                w.uniform_(-bound, bound)
                if b is not None:
                    b.uniform_(-bound, bound)

    def layer_weights(self, l):
        """``(w_root, w_rel, bias)`` of layer l as the op takes them (views of the parameters)."""
        d = self.dims[l]
        w = getattr(self, f"weight{l}")
        if self.aggr == "gcn":
            return w, w, getattr(self, f"bias{l}")
        return w[:d], w[d:], getattr(self, f"bias{l}")

    def forward(self, x, nbr):
        for l in range(self.num_layers):
            w, b = getattr(self, f"weight{l}"), getattr(self, f"bias{l}")
            x = torch.ops.exgramed.graph_conv_stacked(x, nbr, w, b, self.aggr, self.reverse, True)[0]
            x = nn.functional.dropout(x, self.dropout, self.training)
        return x
