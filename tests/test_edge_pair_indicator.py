"""Edge-pair indicators of matchings: the dense helpers and the sparse op edge_pair_indicator_sparse, against
the reference (incidence matrices) and hand-computed values."""
import importlib

import pytest
import torch

import exgramed_kernels  # noqa: F401
from exgramed_kernels import edge_pair_indicator as edge_pair_indicator_dense
from exgramed_kernels.reference import edge_pair_indicator as edge_pair_indicator_ref
from qap_problems import I3, NBR1, NBR2, P_SIGMA, SIGMA

indicator_module = importlib.import_module("exgramed_kernels.edge_pair_indicator")


def test_edge_pair_indicator_by_hand():
    for impl in (edge_pair_indicator_dense, edge_pair_indicator_ref):
        # The identity maps no edge of graph 1 onto an edge of graph 2 (the cycles run opposite ways).
        assert torch.equal(impl(I3, NBR1, NBR2), torch.zeros(1, 3, 3, dtype=torch.float64))
        assert torch.equal(impl(SIGMA, NBR1, NBR2), P_SIGMA)


def test_edge_pair_indicator_matches_reference_random():
    g = torch.Generator().manual_seed(0)
    G, N, k = 3, 7, 3
    Z = torch.rand(G, N, N, generator=g, dtype=torch.float64)
    nbr1 = torch.randint(0, N, (G, N, k), generator=g)
    nbr2 = torch.randint(0, N, (G, N, k), generator=g)
    got = edge_pair_indicator_dense(Z, nbr1, nbr2)
    want = edge_pair_indicator_ref(Z, nbr1, nbr2)
    assert torch.allclose(got, want, rtol=1e-14, atol=0)
    # One entry by its definition: e = (i, nbr1[i, s]), f = (a, nbr2[a, t]).
    i, s, a, t = 4, 2, 1, 0
    want_one = Z[1, i, a] * Z[1, nbr1[1, i, s], nbr2[1, a, t]]
    assert got[1, i * k + s, a * k + t] == want_one


def _random_matchings(G, N, gen, empty_rows=0.0):
    Z = torch.zeros(G, N, N, dtype=torch.float64)
    for g in range(G):
        perm = torch.randperm(N, generator=gen)
        keep = torch.rand(N, generator=gen) >= empty_rows
        Z[g, torch.arange(N)[keep], perm[keep]] = 1.0
    return Z


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("G, N, k", [(3, 9, 3), (1, 1, 1), (2, 6, 5)])
def test_edge_pair_indicator_sparse_matches_reference(dtype, G, N, k):
    """edge_pair_indicator_sparse (the CPU kernel) against the dense combination of the float64 reference
    indicators: partial matchings, random tables (self loops, repeated neighbours), a term that cancels
    another on most entries, per-problem weights; coalesced (sorted, no duplicates, no zeros)."""
    gen = torch.Generator().manual_seed(G * 100 + N * 10 + k)
    nbr1 = torch.randint(0, N, (G, N, k), generator=gen)
    nbr2 = torch.randint(0, N, (G, N, k), generator=gen)
    Z0 = _random_matchings(G, N, gen)
    Z1 = Z0.clone()
    Z1[:, 0] = 0.0  # Z1 = Z0 but row 0 unmatched: their difference cancels everywhere else
    Z2 = _random_matchings(G, N, gen, empty_rows=0.3)
    W = torch.randn(3, G, generator=gen, dtype=torch.float64)
    W[1] = -W[0]
    Zs = [Z0.to(dtype), Z1.to(dtype), Z2.to(dtype)]
    idx, vals = torch.ops.exgramed.edge_pair_indicator_sparse(Zs, W.to(dtype), nbr1, nbr2)
    want = sum(w.view(G, 1, 1) * edge_pair_indicator_ref(z, nbr1, nbr2) for z, w in zip((Z0, Z1, Z2), W))
    got = torch.sparse_coo_tensor(idx, vals.double(), want.shape, check_invariants=True).coalesce()
    assert got._nnz() == idx.shape[1]  # no duplicates
    assert bool((vals != 0).all())
    flat = (idx[0] * want.shape[1] + idx[1]) * want.shape[2] + idx[2]
    assert bool((flat[1:] > flat[:-1]).all())  # sorted
    assert torch.equal(got.to_dense() != 0, want != 0)
    torch.testing.assert_close(got.to_dense(), want, rtol=1e-6 if dtype == torch.float32 else 1e-15, atol=0)
    ref_idx, ref_vals = indicator_module._edge_pair_indicator_sparse_reference(Zs, W.to(dtype), nbr1, nbr2)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(vals, ref_vals)


def test_edge_pair_indicator_sparse_by_hand_errors_and_opcheck():
    # The hand-built cycle problem: sigma hits three edge pairs, the identity none.
    idx, vals = torch.ops.exgramed.edge_pair_indicator_sparse(
        [SIGMA, I3], torch.tensor([[2.0], [5.0]], dtype=torch.float64), NBR1, NBR2)
    assert torch.equal(torch.sparse_coo_tensor(idx, vals, (1, 3, 3), check_invariants=True).to_dense(), 2.0 * P_SIGMA)
    torch.library.opcheck(torch.ops.exgramed.edge_pair_indicator_sparse.default,
                          ([SIGMA, I3], torch.tensor([[2.0], [5.0]], dtype=torch.float64), NBR1, NBR2))
    w = torch.ones(1, 1, dtype=torch.float64)
    cases = [
        (([SIGMA], torch.ones(2, 1, dtype=torch.float64), NBR1, NBR2), "weights must have shape"),
        (([SIGMA], w.long(), NBR1, NBR2), "weights must be a floating-point"),
        (([SIGMA], w * float("inf"), NBR1, NBR2), "NaN or Inf"),
        (([SIGMA[:, :2]], w, NBR1, NBR2), "must have shape \\[G, N, N\\]"),
        (([SIGMA.long()], w, NBR1, NBR2), "Z must be a floating-point"),
        (([SIGMA], w, NBR1.int(), NBR2), "nbr1 must be int64"),
        (([SIGMA], w, NBR1, NBR2[..., :0]), "same shape"),
        (([SIGMA], w, NBR1 + 3, NBR2), "must lie in"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.exgramed.edge_pair_indicator_sparse(*args)
