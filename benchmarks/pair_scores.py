"""pair_scores (align's edge-pair scores with in-kernel Gumbel noise) against the edge-feature GEMM of the
official code and the memory floor."""
from __future__ import annotations

import torch

import exgramed_kernels as ek
from exgramed_kernels.align import inverse_edge_lengths
from exgramed_kernels.module import sample_gumbel

from .harness import Bench, Case, Provider, feature_dim

P, K, NOISE = 6, 5, 0.3  # align's 2K problems at K = 3, kNN k, Gumbel scale
DENSE_MAX_N = 256


class _Floor(torch.autograd.Function):
    """Forward: write the [P, Nk, Nk] table once (into memory already mapped); backward: read its gradient once."""

    @staticmethod
    def forward(ctx, C, buf):
        ctx.shape = C.shape
        ctx.mark_dirty(buf)
        return buf.fill_(0.25)

    @staticmethod
    def backward(ctx, g):
        return g.sum((1, 2))[:, None, None].expand(ctx.shape), None


def edge_features(h, nbr):
    """Official build_graph without its Python loop: normalize(h_i - h_j) per kNN edge, [P, N k, d]."""
    j = nbr.reshape(nbr.shape[0], -1)
    i = torch.arange(h.shape[1], device=h.device).repeat_interleave(nbr.shape[2])
    return torch.nn.functional.normalize(h[:, i] - torch.gather(h, 1, j[:, :, None].expand(-1, -1, h.shape[2])), dim=-1)


def setup(N, scale, device):
    d = feature_dim(scale, device)
    gen = torch.Generator().manual_seed(N)
    h1, h2 = (torch.randn(P, N, d, generator=gen).to(device) for _ in range(2))
    nbr1, nbr2 = ek.knn_graph(h1, K), ek.knn_graph(h2, K)
    C = (h1 @ h2.transpose(1, 2)).requires_grad_()
    w1 = inverse_edge_lengths(h1, nbr1).requires_grad_()
    w2 = inverse_edge_lengths(h2, nbr2).requires_grad_()
    seeds = torch.randint(0, 2**62, (P,), generator=gen).to(device)
    h1.requires_grad_(), h2.requires_grad_()
    buf = torch.empty(P, N * K, N * K, device=device)

    def dense():  # the noise is sampled and stored, as the official code does
        e1, e2 = edge_features(h1, nbr1), edge_features(h2, nbr2)
        return 0.5 * torch.bmm(e1, e2.transpose(1, 2)) - 0.25 + 0.5 * NOISE * sample_gumbel((P, N * K, N * K), device)

    fns = {"ours": lambda: ek.pair_scores(C, w1, w2, nbr1, nbr2, 0.5, -0.25, None, 0.5 * NOISE, seeds),
           "PyTorch edge-feature GEMM": dense, "floor: write Q once": lambda: _Floor.apply(C, buf.detach())}
    skip = {} if N <= DENSE_MAX_N else {"PyTorch edge-feature GEMM": f"N <= {DENSE_MAX_N} only (memory)"}
    return Case(fns, info=dict(d=d, P=P, k=K), skip=skip)


BENCH = Bench(
    op="pair_scores",
    description=f"The quadratic scores of align's P = {P} problems (K = 3), N nodes, k = {K}, h = d, fp32: "
                "`0.5 (<e1, e2> + s g - 0.5)` for every pair of kNN edges, `[P, N k, N k]`, Gumbel noise g at scale "
                f"s = {NOISE}. Ours: `pair_scores` from the cross Gram, the inverse edge lengths and one seed per "
                "problem (noise generated in the kernel); backward: gradients for C and both edge weights. Peer: "
                "the official code's computation in PyTorch, edge features `normalize(h_i - h_j)`, their batched "
                "GEMM and a sampled noise tensor; backward: gradients for the node features. Floor: writing the "
                "table once (forward), reading its gradient once (backward).",
    x="N",
    sizes={"full": [16, 64, 256, 1024], "quick": [16, 64, 256], "tiny": [8]},
    providers=[Provider("ours", "ours"), Provider("PyTorch edge-feature GEMM"), Provider("floor: write Q once", "floor")],
    setup=setup,
    modes=("forward", "backward", "full"),
    graph=True,
)
