"""knn_graph as one fused Triton kernel: distance tile by `tl.dot`, k rounds of row arg-min.

Each program owns BLOCK_M rows of one graph and keeps their whole distance rows in
registers, so the distance matrix never touches memory. Distances are fp32 Gram-form of the
input scaled by a power of two (per graph for l2, per row for cosine; ``scaled_input``), so no
square overflows or underflows whatever the input's magnitude; no fp64 refinement, unlike the
C++ kernels: neighbours closer than fp32 GEMM rounding may swap. Exact duplicates tie exactly
and resolve to the lower index. N <= 2048.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import launchable
from ..checks import check_knn_args, is_concrete

MAX_N = 2048  # one program holds BLOCK_M whole distance rows in registers


@triton.jit
def _knn_kernel(
    x_ptr, sq_ptr, out_ptr, N, D, K,
    stride_xg, stride_xn,
    IS_L2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    g = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dk = tl.arange(0, BLOCK_D)
    xg = x_ptr + g * stride_xg
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        a = tl.load(xg + rows[:, None] * stride_xn + d0 + dk[None, :],
                    mask=(rows[:, None] < N) & (d0 + dk[None, :] < D), other=0.0)
        b = tl.load(xg + cols[:, None] * stride_xn + d0 + dk[None, :],
                    mask=(cols[:, None] < N) & (d0 + dk[None, :] < D), other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision="ieee")
    if IS_L2:
        sq_r = tl.load(sq_ptr + g * N + rows, mask=rows < N, other=0.0)
        sq_c = tl.load(sq_ptr + g * N + cols, mask=cols < N, other=0.0)
        dist = sq_r[:, None] + sq_c[None, :] - 2.0 * acc
    else:
        dist = 1.0 - acc
    invalid = (cols[None, :] >= N) | (cols[None, :] == rows[:, None])
    dist = tl.where(invalid, float("inf"), dist)
    colmat = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32) + cols[None, :]
    for s in range(0, K):
        best = tl.min(dist, axis=1)
        j = tl.min(tl.where(dist == best[:, None], colmat, BLOCK_N), axis=1)
        tl.store(out_ptr + (g * N + rows) * K + s, j.to(tl.int64), mask=rows < N)
        dist = tl.where(colmat == j[:, None], float("inf"), dist)


def scaled_input(x: torch.Tensor, metric: str) -> torch.Tensor:
    """``x * 2^-e`` in float64, ``e`` the exponent of the largest ``|x|`` of each graph (l2: a graph's distances
    all scale by ``2^-2e``) or of each row (cosine: scale-free), so that each such largest entry lies in
    ``[1/2, 1)``; exact, as the C++ kernels' ``knn_scaled_input`` (csrc/knn_graph.h). Raises for NaN or Inf
    in x, found by the same reduction, when x holds values."""
    amax = x.abs().amax(dim=(1, 2) if metric == "l2" else 2, keepdim=True).double()
    if is_concrete(x) and not bool(torch.isfinite(amax).all()):
        raise RuntimeError("knn_graph: x contains NaN or Inf")
    # amax = m 2^e, m in [1/2, 1); 2^-e built from its float64 bits (biased exponent 1023 - e, zero mantissa).
    e = torch.frexp(amax).exponent.long().clamp(-1023, 1022)
    return x.double() * ((1023 - e) * (1 << 52)).view(torch.float64)


@triton_op("exgramed_triton::knn_graph", mutates_args=())
def knn_graph_triton(x: torch.Tensor, k: int, metric: str = "l2") -> torch.Tensor:
    """Triton kernel of :func:`exgramed_kernels.knn_graph` (same contract; N <= 2048)."""
    check_knn_args(x, k, metric, check_values=False)
    G, N, _ = x.shape
    if N > MAX_N:
        raise RuntimeError(f"knn_graph (triton): N <= {MAX_N} supported, got N = {N}; use backend='auto'")
    out = torch.empty((G, N, k), dtype=torch.long, device=x.device)
    if G == 0:
        return out
    xs = scaled_input(x, metric)
    if metric == "cosine":
        norm = xs.norm(dim=-1, keepdim=True)  # >= 1/2, or 0 for a zero row
        xs = torch.where(norm > 0, xs / norm.clamp_min(0.5), torch.zeros_like(xs))
    xc = xs.float().contiguous()
    sq = (xc * xc).sum(-1).contiguous()
    block_n = max(16, triton.next_power_of_2(N))
    # tl.dot needs tiles of at least 16; a pipeline stage holds (BLOCK_M + BLOCK_N) x BLOCK_D fp32 in shared
    # memory (at most 227 KiB on Hopper): one stage of 16-wide feature chunks past 512 columns (132 KiB at 2048).
    block_m, block_d = 16, 32 if block_n <= 512 else 16
    big = block_n >= 1024
    grid = (G, triton.cdiv(N, block_m))
    launchable(_knn_kernel)[grid](
        xc, sq, out, N, xc.shape[2], k, xc.stride(0), xc.stride(1),
        IS_L2=metric == "l2", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_stages=1 if big else 2, num_warps=8 if big else 4,
    )
    return out


@knn_graph_triton.register_fake
def _(x, k, metric="l2"):
    # Explicit, so fake tracing never runs the kernel (the CPU interpreter would).
    check_knn_args(x, k, metric, check_values=False)
    return x.new_empty((x.shape[0], x.shape[1], k), dtype=torch.long)
