"""linear_assignment: exact optimum against scipy, ties, degenerate sizes, errors, opcheck, compile."""
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import exgramed_kernels as ek
from exgramed_kernels import reference
from exgramed_kernels.testing import devices

DEVICES = devices("linear_assignment")


def _check_optimal(score, cols, maximize):
    """cols is a permutation per problem and reaches scipy's optimal objective (float64)."""
    s = score.detach().double().cpu().numpy()
    cols = cols.cpu().numpy()
    for g in range(s.shape[0]):
        n = s.shape[1]
        assert sorted(cols[g].tolist()) == list(range(n))
        r, c = linear_sum_assignment(s[g], maximize=maximize)
        best = s[g][r, c].sum()
        ours = s[g][np.arange(n), cols[g]].sum()
        assert abs(ours - best) <= 1e-9 * max(1.0, abs(best)), (g, ours, best)


def _scores(kind, G, N, gen):
    if kind == "rand":
        return torch.rand(G, N, N, dtype=torch.float64, generator=gen) * 10 - 5
    if kind == "int":  # many ties
        return torch.randint(0, 3, (G, N, N), generator=gen).double()
    if kind == "equal":
        return torch.full((G, N, N), 0.5, dtype=torch.float64)
    if kind == "lowrank":  # structured ties: s_ij = a_i b_j
        return torch.randint(0, 3, (G, N, 1), generator=gen).double() * torch.randint(0, 3, (G, 1, N), generator=gen)
    raise ValueError(kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["rand", "int", "equal", "lowrank"])
@pytest.mark.parametrize("N", [1, 2, 3, 7, 33, 100])
@pytest.mark.parametrize("maximize", [True, False])
def test_optimal_vs_scipy(device, kind, N, maximize):
    gen = torch.Generator().manual_seed(1000 * N + len(kind))
    score = _scores(kind, 5, N, gen)
    cols = ek.linear_assignment(score.to(device), maximize)
    assert cols.dtype == torch.long and cols.shape == (5, N) and cols.device.type == device
    _check_optimal(score, cols, maximize)


@pytest.mark.parametrize("device", DEVICES)
def test_large_n_1024(device):
    gen = torch.Generator().manual_seed(7)
    score = torch.rand(1, 1024, 1024, dtype=torch.float64, generator=gen)
    _check_optimal(score, ek.linear_assignment(score.to(device), True), True)
    ints = torch.randint(0, 10, (1, 1024, 1024), generator=gen).double()
    _check_optimal(ints, ek.linear_assignment(ints.to(device), False), False)


@pytest.mark.parametrize("kind", ["rand", "int", "equal", "lowrank", "shared"])
@pytest.mark.parametrize("N", [511, 512, 600])
def test_candidate_solve_vs_scipy(kind, N):
    """From N = 512 on the CPU solves on a few candidate columns per row (the others bounded, expanded on
    demand): exact on ties and when every row prefers the same columns ("shared": s_ij = a_j + small noise,
    long augmenting paths that expand many rows), and independent of the batch and the thread count."""
    gen = torch.Generator().manual_seed(N + len(kind))
    if kind == "shared":
        score = torch.rand(2, 1, N, dtype=torch.float64, generator=gen) * 100 + torch.rand(2, N, N, dtype=torch.float64,
                                                                                           generator=gen)
    else:
        score = _scores(kind, 2, N, gen)
    for maximize in (True, False):
        cols = ek.linear_assignment(score, maximize)
        _check_optimal(score, cols, maximize)
        assert torch.equal(ek.linear_assignment(score[1:].contiguous(), maximize)[0], cols[1])
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert torch.equal(ek.linear_assignment(score, maximize), cols)
        finally:
            torch.set_num_threads(n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(device, dtype):
    """The solve is exact for the values as given (converted to float64)."""
    gen = torch.Generator().manual_seed(3)
    score = torch.randn(4, 20, 20, generator=gen).to(dtype)
    _check_optimal(score, ek.linear_assignment(score.to(device)), True)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_and_batch_independent(device):
    gen = torch.Generator().manual_seed(5)
    base = torch.rand(6, 24, 24, dtype=torch.float64, generator=gen).to(device)
    s = base.transpose(1, 2)  # non-contiguous view
    cols = ek.linear_assignment(s)
    _check_optimal(s, cols, True)
    for g in range(6):  # a problem's answer does not depend on the rest of the batch
        assert torch.equal(ek.linear_assignment(s[g : g + 1].contiguous())[0], cols[g])
    assert torch.equal(ek.linear_assignment(s), cols)  # deterministic


def test_ties_deterministic_and_threads():
    score = torch.randint(0, 2, (16, 40, 40), generator=torch.Generator().manual_seed(0)).double()
    a = ek.linear_assignment(score)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b = ek.linear_assignment(score)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b)
    # all-equal: every permutation is optimal; the result is still a valid permutation.
    eq = ek.linear_assignment(torch.zeros(2, 9, 9))
    assert all(sorted(r.tolist()) == list(range(9)) for r in eq)


@pytest.mark.parametrize("N", [1, 4, 9, 25])
def test_reference_vs_scipy(N):
    gen = torch.Generator().manual_seed(N)
    for kind in ("rand", "int", "equal"):
        score = _scores(kind, 3, N, gen)
        for maximize in (True, False):
            _check_optimal(score, reference.linear_assignment(score, maximize), maximize)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    assert ek.linear_assignment(torch.zeros(0, 5, 5, device=device)).shape == (0, 5)
    assert ek.linear_assignment(torch.zeros(3, 0, 0, device=device)).shape == (3, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_errors(device):
    with pytest.raises(RuntimeError, match="score must be square"):
        ek.linear_assignment(torch.zeros(2, 3, 4, device=device))
    with pytest.raises(RuntimeError, match=r"score must have shape \[G, N, N\]"):
        ek.linear_assignment(torch.zeros(3, 3, device=device))
    with pytest.raises(RuntimeError, match="score must be a floating-point"):
        ek.linear_assignment(torch.zeros(2, 3, 3, dtype=torch.long, device=device))
    for bad in (float("nan"), float("inf"), -float("inf")):
        s = torch.zeros(2, 3, 3, device=device)
        s[1, 2, 0] = bad
        with pytest.raises(RuntimeError, match="score contains NaN or Inf"):
            ek.linear_assignment(s)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    gen = torch.Generator().manual_seed(11)
    for score in (torch.rand(3, 6, 6, generator=gen), torch.rand(2, 1, 1, generator=gen).double()):
        torch.library.opcheck(torch.ops.exgramed.linear_assignment.default, (score.to(device), True))
        torch.library.opcheck(torch.ops.exgramed.linear_assignment.default, (score.to(device), False))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    @torch.compile(fullgraph=True)
    def f(s):
        cols = ek.linear_assignment(s * 2.0, True)
        return torch.gather(s, 2, cols.unsqueeze(2)).sum((1, 2))

    s = torch.rand(4, 12, 12, generator=torch.Generator().manual_seed(2)).to(device)
    cols = ek.linear_assignment(s)
    torch.testing.assert_close(f(s), torch.gather(s, 2, cols.unsqueeze(2)).sum((1, 2)))
