"""pytest-benchmark: linear_assignment and qap_solve on the official batch (12 problems, k = 5).

    python -m pytest benchmarks/bench_qap_solve.py --benchmark-only
"""
import pytest
import torch

import exgramed_kernels as ek
from exgramed_kernels.testing import devices

from .compare_qap_solve import G, features_instance

DEVICES = devices("qap_solve")


def _sync(fn):
    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [64, 256, 1024])
def test_linear_assignment(benchmark, device, N):
    S = torch.rand(G if N < 1024 else 2, N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(N)).to(device)
    cols = benchmark(_sync(ek.linear_assignment), S)
    assert cols.shape == S.shape[:2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [16, 64, 256])
@pytest.mark.parametrize("form", ["dense", "features"])
@pytest.mark.parametrize("method", ["fw", "sinkhorn"])
def test_qap_solve(benchmark, device, N, form, method):
    if method == "sinkhorn" and N > 64 and device == "cpu":
        pytest.skip("sinkhorn at N = 256 takes tens of seconds on this CPU")
    U, n1, n2, Q, H1, H2 = (t.to(device) for t in features_instance(N, seed=0))
    kw = {"Q": Q} if form == "dense" else {"H1": H1, "H2": H2}
    Z, _ = benchmark.pedantic(_sync(ek.qap_solve), args=(U, n1, n2), kwargs=dict(kw, method=method), rounds=3,
                              iterations=1)
    assert Z.shape == (G, N, N)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [64, 256])
def test_qap_gradient(benchmark, device, N):
    U, n1, n2, Q, H1, H2 = (t.to(device) for t in features_instance(N, seed=0))
    X = torch.rand(G, 2, N, N, device=device)
    out = benchmark(_sync(ek.qap_gradient), X, n1, n2, Q)
    assert out.shape == X.shape
