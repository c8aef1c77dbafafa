"""Global-batch alignment (``graph_scope="global"``): one rank's step at W ranks against per-device graphs.

``distributed.global_align`` runs, on every rank, ``align.align_problems`` on the rank's share of the
``S P`` problems of the global batch (``j % W == rank``), between an all-gather of the embeddings and an
all-reduce of the loss; the op ``align`` (local mode, the official code's) runs it on all ``S P``
problems of the rank's own ``b`` samples. Timed here in one process, forward + backward, both through
``align_problems`` with their noise drawn beforehand: rank 0's share (the largest, ``ceil(S P / W)``
problems) on the global batch of ``W b`` samples, and local mode on ``b`` samples. The collectives are
not timed; the bytes each rank receives are listed.
"""
from __future__ import annotations

import torch

import exgramed_kernels as ek
from exgramed_kernels.align import align_problems, problem_graphs
from exgramed_kernels.distributed import shard
from exgramed_kernels.module import sample_gumbel

from .harness import Bench, Case, Provider, feature_dim

K, B_LOCAL = 3, 16


def setup(W, scale, device):
    d = feature_dim(scale, device)
    b = 8 if scale == "tiny" else B_LOCAL
    N = W * b
    m = ek.MultiGraphAlignment(d).to(device)  # its weights and default options
    cfg = m.config
    src, dst = problem_graphs(K, cfg.mode)
    P = len(src)
    mine = shard(cfg.samples * P, W, 0)
    weights = (m.w_root1, m.w_rel1, m.bias1, m.w_root2, m.w_rel2, m.bias2)
    xg = torch.randn(K, N, d, device=device).requires_grad_()
    x_local = xg[:, :b].detach().clone().requires_grad_()
    unary = sample_gumbel((cfg.samples, 1 if cfg.shared_noise else P, N, N), device)
    unary_local = unary[:, :, :b, :b].contiguous()
    seeds = torch.randint(0, 2**62, (cfg.samples, P), device=device)
    graphs = sorted({g for j in mine for g in (src[j % P], dst[j % P])})
    ws = [w.detach().clone().requires_grad_() for w in weights if w is not None and w.dim() == 2]

    def floor():  # rank 0's GraphConv GEMMs: the graphs its problems touch
        g = torch.cat([xg, xg.mean(0, keepdim=True)])[graphs]
        h = torch.relu(g @ ws[0] + g @ ws[1])
        return torch.relu(h @ ws[2] + h @ ws[3])

    fns = {"ours, global: rank 0 of W": lambda: align_problems(xg, weights, unary, None, None, seeds, cfg,
                                                                problems=mine, grad_scale=float(W))[0],
           "local: per-device graphs": lambda: align_problems(x_local, weights, unary_local, None, None, seeds,
                                                              cfg)[0],
           "floor: rank 0's GraphConv GEMMs": floor}
    return Case(fns, info={"d": d, "b per rank": b, "global N": N, "problems on rank 0 (global / local)":
                           f"{len(mine)} / {cfg.samples * P}", "gathered per rank": f"{K * N * d * 4 / 2**20:.2f} MiB"})


BENCH = Bench(
    op="global_align",
    description="K = 3 modalities, b samples per rank, W ranks, d = h, fp32, `MultiGraphAlignment`'s defaults, "
                "forward + backward of `align.align_problems`, the pipeline both modes run (module docstring of "
                "`benchmarks/global_align.py`). Ours: rank 0's share of the problems on graphs of N = W b nodes; the "
                "all-gather and the loss all-reduce are not timed, the gathered fp32 embeddings per rank are listed "
                "(the same again in the backward). Local: the official per-device graphs of b nodes, all 2K problems "
                "on every rank. Floor: rank 0's GraphConv GEMMs. Ratios against local mode.",
    x="W",
    sizes={"full": [1, 2, 4, 8, 16, 32], "quick": [1, 2, 4, 8], "tiny": [1, 2]},
    providers=[Provider("local: per-device graphs", "peer", vs="local: per-device graphs"),
               Provider("ours, global: rank 0 of W", "ours", vs="local: per-device graphs"),
               Provider("floor: rank 0's GraphConv GEMMs", "floor", vs="local: per-device graphs")],
    setup=setup,
    modes=("full",),
)
