"""Gradient of the QAP quadratic term as one Triton kernel (gathers only: deterministic).

    dq/dX[x, y] = sum_{s,t} Q[x*k+s, y*k+t] X[nbr1[x,s], nbr2[y,t]]                (out-edges of x, y)
                + sum_{e into x} sum_{f into y} Q[e, f] X[e // k, f // k]              (in-edges of x, y)

Each program owns a BLOCK_X x BLOCK_Y tile of one iterate's gradient and loops over the k x k
out-edge pairs, then over the padded in-edge lists (built here by a stable sort of the edges by
target, -1 padded to the largest in-degree), accumulating in fp32 -- no atomics, no scatter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import launchable
from ..checks import check_gradient_args


@triton.jit
def _qap_grad_kernel(x_ptr, q_ptr, n1_ptr, n2_ptr, in1_ptr, in2_ptr, out_ptr, N, K, R, D1, D2,
                     BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    g = b // R
    xs = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
    ys = tl.program_id(2) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    mx = xs < N
    my = ys < N
    m2 = mx[:, None] & my[None, :]
    NK = N * K
    xb = x_ptr + b * N * N
    qb = q_ptr + g * NK * NK
    acc = tl.zeros((BLOCK_X, BLOCK_Y), dtype=tl.float32)
    for s in range(0, K):
        j = tl.load(n1_ptr + g * NK + xs * K + s, mask=mx, other=0)
        e = xs * K + s
        for t in range(0, K):
            bb = tl.load(n2_ptr + g * NK + ys * K + t, mask=my, other=0)
            f = ys * K + t
            qv = tl.load(qb + e[:, None] * NK + f[None, :], mask=m2, other=0.0)
            xv = tl.load(xb + j[:, None] * N + bb[None, :], mask=m2, other=0.0)
            acc += qv * xv
    for p in range(0, D1):
        e = tl.load(in1_ptr + (g * N + xs) * D1 + p, mask=mx, other=-1)
        ve = e >= 0
        e0 = tl.where(ve, e, 0)
        for q in range(0, D2):
            f = tl.load(in2_ptr + (g * N + ys) * D2 + q, mask=my, other=-1)
            vf = f >= 0
            f0 = tl.where(vf, f, 0)
            mm = m2 & ve[:, None] & vf[None, :]
            qv = tl.load(qb + e0[:, None] * NK + f0[None, :], mask=mm, other=0.0)
            xv = tl.load(xb + (e0 // K)[:, None] * N + (f0 // K)[None, :], mask=mm, other=0.0)
            acc += qv * xv
    tl.store(out_ptr + b * N * N + xs[:, None] * N + ys[None, :], acc, mask=m2)


def _in_edges(nbr: torch.Tensor) -> torch.Tensor:
    """[G, N, D] ids of the edges into each node (increasing), -1 padded; D = max in-degree (>= 1)."""
    G, N, k = nbr.shape
    tgt = nbr.reshape(G, N * k)
    order = torch.sort(tgt, dim=1, stable=True).indices
    counts = torch.zeros(G, N, dtype=torch.long, device=nbr.device).scatter_add_(1, tgt, torch.ones_like(tgt))
    D = max(1, int(counts.max())) if counts.numel() else 1
    ptr = counts.cumsum(1) - counts
    ts = torch.gather(tgt, 1, order)
    rank = torch.arange(N * k, device=nbr.device).expand(G, N * k) - torch.gather(ptr, 1, ts)
    out = torch.full((G, N, D), -1, dtype=torch.long, device=nbr.device)
    gi = torch.arange(G, device=nbr.device)[:, None].expand(G, N * k)
    out[gi, ts, rank] = order
    return out


@triton_op("exgramed_triton::qap_gradient", mutates_args=())
def qap_gradient_triton(X: torch.Tensor, nbr1: torch.Tensor, nbr2: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Triton kernel of :func:`exgramed_kernels.qap_gradient` (same contract; fp32 accumulation)."""
    check_gradient_args(X, nbr1, nbr2, Q, check_values=False)
    G, N, k = nbr1.shape
    R = X.shape[1] if X.dim() == 4 else 1
    Xf = X.float().contiguous()
    out = torch.zeros(X.shape, dtype=torch.float32, device=X.device)
    if G * R == 0 or N == 0 or k == 0:
        return out.to(X.dtype)
    in1, in2 = _in_edges(nbr1), _in_edges(nbr2)
    BX = BY = 16
    grid = (G * R, triton.cdiv(N, BX), triton.cdiv(N, BY))
    launchable(_qap_grad_kernel)[grid](Xf, Q.float().contiguous(), nbr1.contiguous(), nbr2.contiguous(), in1, in2,
                                       out, N, k, R, in1.shape[2], in2.shape[2], BLOCK_X=BX, BLOCK_Y=BY)
    return out.to(X.dtype)
