"""pytest-benchmark suite for knn_graph and its dense peer: `pytest benchmarks/bench_knn_graph.py`."""
import pytest
import torch

import exgramed_kernels as ek

from .compare_knn_graph import dense_addmm_topk

SIZES = [(16, 512), (64, 512), (256, 512), (64, 4096)]


@pytest.mark.parametrize("N,d", SIZES)
@pytest.mark.parametrize("provider", ["exgramed", "addmm+topk"])
def test_knn_graph(benchmark, provider, N, d):
    torch.manual_seed(0)
    x = torch.randn(4, N, d)
    fn = (lambda: ek.knn_graph(x, 5)) if provider == "exgramed" else (lambda: dense_addmm_topk(x, 5))
    benchmark.group = f"knn_graph G=4 N={N} d={d}"
    out = benchmark(fn)
    assert out.shape == (4, N, 5)
