"""pytest-benchmark suite for align (not timed assertions; run with `pytest benchmarks/bench_align.py`).

MultiGraphAlignment forward+backward at K = 3, k = 5, official and default settings. The peer
comparison (official-equivalent pipeline, GEMM floor, stage breakdown) and the learning table are
benchmarks/compare_align.py.
"""
import pytest
import torch

import exgramed_kernels as ek


@pytest.mark.parametrize("official", [True, False])
@pytest.mark.parametrize("B,d", [(16, 512), (64, 512), (64, 4096)])
def test_align_fwd_bwd(benchmark, B, d, official):
    torch.manual_seed(0)
    x = torch.randn(3, B, d)
    m = ek.MultiGraphAlignment(d, d, k=5, official=official, dropout=0.0)

    def step():
        xx = x.clone().requires_grad_()
        m(xx).loss.backward()

    benchmark(step)
