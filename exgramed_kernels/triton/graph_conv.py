"""graph_conv with Triton aggregation kernels and torch GEMMs.

Same contract and numerics as the compiled op (``torch.ops.exgramed.graph_conv``): the
neighbourhood aggregation (one program per node and feature block, the CSR walked in its fixed
order, max ties to the lowest node index) and its transpose for the backward (a gather over the
transposed CSR: deterministic, no atomics) are Triton kernels; ``out = x @ w_root + agg @ w_rel
+ b`` (``agg @ w_rel + b`` for gcn) and the weight gradients are torch GEMMs. fp16/bf16/fp32
accumulate in fp32, fp64 in fp64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import launchable
from ..checks import check_graph_conv_args, compute_dtype
from ..reference.graph_conv import aggregation_edges

BLOCK_D = 64


@triton.jit
def _gc_aggregate_kernel(
    x_ptr, ptr_ptr, col_ptr, w_ptr, selfw_ptr, out_ptr, argmax_ptr, N, D, E,
    IS_MAX: tl.constexpr, HAS_W: tl.constexpr, HAS_SELF: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    gn = tl.program_id(0)
    g = gn // N
    n = gn % N
    f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    fm = f < D
    acc_t = tl.float64 if ACC_FP64 else tl.float32
    b = tl.load(ptr_ptr + g * (N + 1) + n)
    e = tl.load(ptr_ptr + g * (N + 1) + n + 1)
    if IS_MAX:
        best = tl.full([BLOCK], float("-inf"), acc_t)
        bp = tl.full([BLOCK], -1, tl.int64)
        bc = tl.full([BLOCK], N, tl.int64)
        for p in range(b, e):
            c = tl.load(col_ptr + g * E + p)
            v = tl.load(x_ptr + (g * N + c) * D + f, mask=fm, other=0.0).to(acc_t)
            take = (v > best) | ((v == best) & (c < bc))
            best = tl.where(take, v, best)
            bp = tl.where(take, p, bp)
            bc = tl.where(take, c, bc)
        best = tl.where(bp < 0, 0.0, best)
        tl.store(out_ptr + gn * D + f, best.to(out_ptr.dtype.element_ty), mask=fm)
        tl.store(argmax_ptr + gn * D + f, bp.to(tl.int32), mask=fm)
    else:
        acc = tl.zeros([BLOCK], acc_t)
        if HAS_SELF:
            s = tl.load(selfw_ptr + gn).to(acc_t)
            acc += s * tl.load(x_ptr + gn * D + f, mask=fm, other=0.0).to(acc_t)
        for p in range(b, e):
            c = tl.load(col_ptr + g * E + p)
            v = tl.load(x_ptr + (g * N + c) * D + f, mask=fm, other=0.0).to(acc_t)
            if HAS_W:
                v = v * tl.load(w_ptr + g * E + p).to(acc_t)
            acc += v
        tl.store(out_ptr + gn * D + f, acc.to(out_ptr.dtype.element_ty), mask=fm)


@triton.jit
def _gc_aggregate_backward_kernel(
    gagg_ptr, tptr_ptr, tcol_ptr, tpos_ptr, w_ptr, selfw_ptr, argmax_ptr, gx_ptr, N, D, E,
    IS_MAX: tl.constexpr, HAS_W: tl.constexpr, HAS_SELF: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    gn = tl.program_id(0)
    g = gn // N
    f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    fm = f < D
    acc_t = tl.float64 if ACC_FP64 else tl.float32
    j = gn % N
    b = tl.load(tptr_ptr + g * (N + 1) + j)
    e = tl.load(tptr_ptr + g * (N + 1) + j + 1)
    acc = tl.zeros([BLOCK], acc_t)
    if HAS_SELF:
        s = tl.load(selfw_ptr + gn).to(acc_t)
        acc += s * tl.load(gagg_ptr + gn * D + f, mask=fm, other=0.0).to(acc_t)
    for q in range(b, e):
        n = g * N + tl.load(tcol_ptr + g * E + q)
        p = tl.load(tpos_ptr + g * E + q)
        gv = tl.load(gagg_ptr + n * D + f, mask=fm, other=0.0).to(acc_t)
        if IS_MAX:
            am = tl.load(argmax_ptr + n * D + f, mask=fm, other=-1)
            gv = tl.where(am == p.to(tl.int32), gv, 0.0)
        elif HAS_W:
            gv = gv * tl.load(w_ptr + g * E + p).to(acc_t)
        acc += gv
    tl.store(gx_ptr + gn * D + f, acc.to(gx_ptr.dtype.element_ty), mask=fm)


def _csr(nbr, aggr, reverse, acc_dtype):
    """Aggregation CSR (ptr, col, w, selfw) and its transpose (tptr, tcol, tpos), per graph."""
    G, N, k = nbr.shape
    src, tgt, w, selfw = aggregation_edges(nbr, aggr, reverse, acc_dtype)
    nodes = torch.arange(N + 1, device=nbr.device).expand(G, N + 1).contiguous()
    ptr = torch.searchsorted(tgt.contiguous(), nodes)
    ssrc, order = torch.sort(src, dim=1, stable=True)
    tptr = torch.searchsorted(ssrc.contiguous(), nodes)
    tcol = torch.gather(tgt, 1, order)
    return ptr, src.contiguous(), w, selfw, tptr, tcol.contiguous(), order.contiguous()


def _flags(x, aggr, w, selfw):
    return dict(IS_MAX=aggr == "max", HAS_W=w is not None, HAS_SELF=selfw is not None, ACC_FP64=x.dtype == torch.float64)


@triton_op("exgramed_triton::graph_conv_forward", mutates_args=())
def graph_conv_forward_triton(
    x: torch.Tensor, nbr: torch.Tensor, w_root: torch.Tensor, w_rel: torch.Tensor, bias: torch.Tensor | None = None,
    aggr: str = "max", reverse: bool = False, relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, agg, argmax) of graph_conv; argmax is int32 [G, N, d] for max, [0, N, d] otherwise."""
    check_graph_conv_args(x, nbr, w_root, w_rel, bias, aggr, check_values=False)
    G, N, d = x.shape
    xc = x.contiguous()
    agg = torch.empty_like(xc)
    argmax = torch.empty((G if aggr == "max" else 0, N, d), dtype=torch.int32, device=x.device)
    if G * N > 0 and d > 0:
        acc = compute_dtype(x.dtype)
        ptr, col, w, selfw, _, _, _ = _csr(nbr, aggr, reverse, acc)
        dummy = ptr
        grid = (G * N, triton.cdiv(d, BLOCK_D))
        launchable(_gc_aggregate_kernel)[grid](
            xc, ptr, col, w if w is not None else dummy, selfw if selfw is not None else dummy, agg,
            argmax if aggr == "max" else dummy, N, d, col.shape[1], BLOCK=BLOCK_D, **_flags(x, aggr, w, selfw),
        )
    else:
        agg.zero_()
    a2 = agg.reshape(G * N, d)
    if aggr == "gcn":
        out = a2 @ w_rel if bias is None else torch.addmm(bias, a2, w_rel)
    else:
        x2 = xc.reshape(G * N, d)
        out = x2 @ w_root if bias is None else torch.addmm(bias, x2, w_root)
        out = out + a2 @ w_rel
    if relu:
        out = torch.relu(out)
    return out.reshape(G, N, w_root.shape[1]), agg, argmax


@graph_conv_forward_triton.register_fake
def _(x, nbr, w_root, w_rel, bias=None, aggr="max", reverse=False, relu=False):
    # Explicit, so fake tracing never runs the kernel (the CPU interpreter would).
    check_graph_conv_args(x, nbr, w_root, w_rel, bias, aggr, check_values=False)
    G, N, d = x.shape
    return (
        x.new_empty((G, N, w_root.shape[1])),
        x.new_empty((G, N, d)),
        x.new_empty((G if aggr == "max" else 0, N, d), dtype=torch.int32),
    )


@triton_op("exgramed_triton::graph_conv_backward", mutates_args=())
def graph_conv_backward_triton(
    grad_out: torch.Tensor, out: torch.Tensor, x: torch.Tensor, agg: torch.Tensor, argmax: torch.Tensor,
    nbr: torch.Tensor, w_root: torch.Tensor, w_rel: torch.Tensor, aggr: str, reverse: bool, relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_w_root, grad_w_rel, grad_bias); grad_w_root is all zeros for gcn (unused weight)."""
    G, N, d = x.shape
    h = w_root.shape[1]
    gp = grad_out.to(x.dtype).reshape(G * N, h)
    if relu:
        gp = torch.where(out.reshape(G * N, h) > 0, gp, torch.zeros_like(gp))
    x2, a2 = x.reshape(G * N, d), agg.reshape(G * N, d)
    g_rel = a2.t() @ gp
    g_root = torch.zeros_like(w_root) if aggr == "gcn" else x2.t() @ gp
    gb = gp.sum(0)
    gagg = (gp @ w_rel.t()).reshape(G, N, d).contiguous()
    gx = torch.zeros_like(x) if aggr == "gcn" else (gp @ w_root.t()).reshape(G, N, d)
    if G * N > 0 and d > 0:
        acc = compute_dtype(x.dtype)
        _, _, w, selfw, tptr, tcol, tpos = _csr(nbr, aggr, reverse, acc)
        back = torch.empty_like(gagg)
        dummy = tptr
        grid = (G * N, triton.cdiv(d, BLOCK_D))
        launchable(_gc_aggregate_backward_kernel)[grid](
            gagg, tptr, tcol, tpos, w if w is not None else dummy, selfw if selfw is not None else dummy,
            argmax if aggr == "max" else dummy, back, N, d, tcol.shape[1], BLOCK=BLOCK_D,
            **_flags(x, aggr, w, selfw),
        )
        gx = gx + back
    return gx, g_root, g_rel, gb


@graph_conv_backward_triton.register_fake
def _(grad_out, out, x, agg, argmax, nbr, w_root, w_rel, aggr, reverse, relu):
    return x.new_empty(x.shape), w_root.new_empty(w_root.shape), w_rel.new_empty(w_rel.shape), w_root.new_empty((w_root.shape[1],))


def _setup_context(ctx, inputs, output):
    x, nbr, w_root, w_rel, bias, aggr, reverse, relu = inputs
    out, agg, argmax = output
    ctx.save_for_backward(out, x, agg, argmax, nbr, w_root, w_rel)
    ctx.aggr, ctx.reverse, ctx.relu, ctx.has_bias = aggr, reverse, relu, bias is not None
    ctx.mark_non_differentiable(agg, argmax)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_agg, _grad_argmax):
    out, x, agg, argmax, nbr, w_root, w_rel = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None, None, None
    gx, g_root, g_rel, gb = graph_conv_backward_triton(
        grad_out, out, x, agg, argmax, nbr, w_root, w_rel, ctx.aggr, ctx.reverse, ctx.relu
    )
    return gx, None, (None if ctx.aggr == "gcn" else g_root), g_rel, (gb if ctx.has_bias else None), None, None, None


graph_conv_forward_triton.register_autograd(_backward, setup_context=_setup_context)


def graph_conv_triton(x, nbr, w_root, w_rel, bias=None, aggr="max", reverse=False, relu=False):
    """:func:`exgramed_kernels.graph_conv` with the Triton kernels (GPU, or CPU under TRITON_INTERPRET=1)."""
    check_graph_conv_args(x, nbr, w_root, w_rel, bias, aggr)
    return graph_conv_forward_triton(x, nbr, w_root, w_rel, bias, aggr, reverse, relu)[0]
