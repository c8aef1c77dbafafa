"""pytest-benchmark suite for graph_conv (not timed assertions; run with `pytest benchmarks/bench_graph_conv.py`).

2-layer GraphConvNet forward+backward on G = 4 kNN graphs (k = 5), against the pure-PyTorch
reference of the same computation. The peer comparison (PyG, linear floor) is
benchmarks/compare_graph_conv.py.
"""
import pytest
import torch

import exgramed_kernels as ek
from exgramed_kernels import reference

G, K = 4, 5


def _problem(N, d):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(G, N, d, generator=gen)
    return x, ek.knn_graph(x, K)


@pytest.mark.parametrize("aggr", ["max", "mean"])
@pytest.mark.parametrize("N,d", [(64, 512), (256, 512)])
@pytest.mark.parametrize("impl", ["ours", "reference"])
def test_graph_conv_net_fwd_bwd(benchmark, impl, N, d, aggr):
    x, nbr = _problem(N, d)
    net = ek.GraphConvNet(d, d, aggr=aggr, dropout=0.0, reverse=True)

    def ours():
        xg = x.detach().requires_grad_(True)
        net(xg, nbr).sum().backward()

    def ref():
        xg = x.detach().requires_grad_(True)
        h = xg
        for l in range(2):
            w, b = getattr(net, f"weight{l}"), getattr(net, f"bias{l}")
            h = reference.graph_conv(h, nbr, w[:d], w[d:], b, aggr, True, True)
        h.sum().backward()

    benchmark(ours if impl == "ours" else ref)
