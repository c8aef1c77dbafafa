"""qap_solve's backward (the IMLE / blackbox estimators) against hand-computed values on tiny problems."""
import importlib
from types import SimpleNamespace

import pytest
import torch

import exgramed_kernels  # noqa: F401
from exgramed_kernels.checks import check_estimator
from exgramed_kernels.reference import edge_pair_indicator as edge_pair_indicator_ref
from qap_problems import I3, NBR1, NBR2, P_SIGMA, SIGMA

qap_solve_module = importlib.import_module("exgramed_kernels.qap_solve")


def _tiny_problem():
    # U favours the identity by 0.5 per node; dL/dZ = I - sigma makes the target favour sigma.
    U = (0.5 * I3).clone().requires_grad_()
    Q = torch.zeros(1, 3, 3, dtype=torch.float64, requires_grad=True)
    dLdZ = I3 - SIGMA
    return U, Q, dLdZ


@pytest.mark.parametrize("estimator", ["imle", "blackbox"])
@pytest.mark.parametrize("lam", [1.0, 4.0])
def test_one_sided_estimators_by_hand(estimator, lam):
    U, Q, dLdZ = _tiny_problem()
    Z, obj = torch.ops.exgramed.qap_solve(U, NBR1, NBR2, Q, None, None, "fw", 50, 1e-6, -1, False, 0,
                                          estimator, lam)
    assert torch.equal(Z, I3)
    gU, gQ = torch.autograd.grad((Z * dLdZ).sum(), (U, Q))
    # Target U - lam dL/dZ: sigma scores 0.5 + 2 lam, the identity 0.5 - 2 lam -> Z' = sigma.
    assert torch.equal(gU, (I3 - SIGMA) / lam)
    # Edge pairs: P(I) = 0 and P(sigma) = P_SIGMA.
    assert torch.equal(gQ, (torch.zeros_like(P_SIGMA) - P_SIGMA) / lam)


def test_zero_gradient_when_resolve_keeps_the_matching():
    # lambda too small to overturn the margin of 0.5: Z' = Z, the estimate is exactly zero.
    U, Q, dLdZ = _tiny_problem()
    Z, _ = torch.ops.exgramed.qap_solve(U, NBR1, NBR2, Q, None, None, "fw", 50, 1e-6, -1, False, 0, "imle", 0.1)
    gU, gQ = torch.autograd.grad((Z * dLdZ).sum(), (U, Q))
    assert torch.equal(gU, torch.zeros_like(gU)) and torch.equal(gQ, torch.zeros_like(gQ))


def test_objective_gradient_is_the_matching():
    U, Q, _ = _tiny_problem()
    Z, obj = torch.ops.exgramed.qap_solve(U, NBR1, NBR2, Q, None, None, "fw", 50, 1e-6, -1, False, 0, "imle", 1.0)
    gU, gQ = torch.autograd.grad(3.0 * obj.sum(), (U, Q))
    assert torch.equal(gU, 3.0 * I3)
    assert torch.equal(gQ, torch.zeros_like(gQ))  # the identity maps no edge pair


def test_symmetric_imle_by_hand():
    U, Q, dLdZ = _tiny_problem()
    lam = 2.0
    Z, _ = torch.ops.exgramed.qap_solve(U.detach(), NBR1, NBR2, Q.detach())
    ctx = SimpleNamespace(
        saved_tensors=(U.detach(), NBR1, NBR2, Q.detach(), None, None, Z),
        needs_input_grad=(True, False, False, True, False, False) + (False,) * 10,
        method="fw", max_iter=50, tol=1e-6, restarts=-1, partial=False, seed=0,
        estimator="imle_symmetric", lambda_=lam, has_Q=True, has_H=False, sparse_q=False,
    )
    out = qap_solve_module._backward(ctx, dLdZ, None)
    # Z(U + lam g) = I (margin grows), Z(U - lam g) = sigma: central difference over 2 lam.
    assert torch.equal(out[0], (I3 - SIGMA) / (2 * lam))
    assert torch.equal(out[3], -P_SIGMA / (2 * lam))


def test_quadratic_scores_steer_the_resolve():
    # Here the target's unary part is flat between I and sigma; only Q decides, and the gradient of Q
    # is the difference of the two edge-pair indicators.
    U = torch.zeros(1, 3, 3, dtype=torch.float64, requires_grad=True)
    Q = torch.full((1, 3, 3), -0.1, dtype=torch.float64, requires_grad=True)  # every mapped edge costs 0.1
    Z, _ = torch.ops.exgramed.qap_solve(U, NBR1, NBR2, Q, None, None, "fw", 50, 1e-6, -1, False, 0, "imle", 1.0)
    P = edge_pair_indicator_ref(Z.detach(), NBR1, NBR2)
    assert P.sum() == 0  # the best matchings map no edge pair (e.g. the identity)
    gZ = torch.zeros(1, 3, 3, dtype=torch.float64)
    gZ[0] = -5.0 * SIGMA[0]  # the loss wants sigma strongly: the target is sigma despite the edge cost
    gU, gQ = torch.autograd.grad((Z * gZ).sum(), (U, Q))
    assert torch.equal(gU, Z.detach() - SIGMA)
    assert torch.equal(gQ, -P_SIGMA)


def test_implicit_q_gradient_matches_dense():
    # H1/H2 form: the gradient reaching H is dL/dQ pushed through Q = <normalize(dH1), normalize(dH2)>.
    g = torch.Generator().manual_seed(1)
    G, N, k, h = 2, 5, 2, 4
    U = torch.randn(G, N, N, generator=g, dtype=torch.float64)
    H1 = torch.randn(G, N, h, generator=g, dtype=torch.float64, requires_grad=True)
    H2 = torch.randn(G, N, h, generator=g, dtype=torch.float64, requires_grad=True)
    nbr1 = torch.stack([torch.stack([(torch.arange(k) + i + 1) % N for i in range(N)])] * G)
    nbr2 = nbr1.flip(-1).contiguous()
    Q = exgramed_kernels.reference.implicit_q(H1, H2, nbr1, nbr2)
    Qd = Q.detach().requires_grad_()
    gZ = torch.randn(G, N, N, generator=g, dtype=torch.float64)
    Z1, _ = torch.ops.exgramed.qap_solve(U, nbr1, nbr2, None, H1, H2, "fw", 50, 1e-6, -1, False, 0, "imle", 3.0)
    Z2, _ = torch.ops.exgramed.qap_solve(U, nbr1, nbr2, Qd, None, None, "fw", 50, 1e-6, -1, False, 0, "imle", 3.0)
    assert torch.equal(Z1, Z2)
    gH = torch.autograd.grad((Z1 * gZ).sum(), (H1, H2))
    (gQ,) = torch.autograd.grad((Z2 * gZ).sum(), (Qd,))
    want = torch.autograd.grad(Q, (H1, H2), gQ)
    for a, b in zip(gH, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_bad_estimator_arguments():
    U, Q, _ = _tiny_problem()
    with pytest.raises(RuntimeError, match="lambda_"):
        check_estimator("imle", 0.0)
    with pytest.raises(RuntimeError, match="estimator"):
        check_estimator("reinforce", 1.0)


def test_sparse_quadratic_gradient_into_pair_scores():
    """With sparse_q_grad=True (align's call: Q comes from pair_scores), the backward hands Q a sparse COO
    dL/dQ (the matched edge pairs only); every gradient equals the dense path's. Without the flag Q gets
    a dense gradient, whatever produced it."""
    g = torch.Generator().manual_seed(3)
    P, N, k = 4, 9, 3
    h = torch.randn(P, N, 6, generator=g, dtype=torch.float64)
    nbr = torch.stack([torch.stack([torch.randperm(N - 1, generator=g)[:k] for _ in range(N)]) for _ in range(P)])
    nbr = nbr + (nbr >= torch.arange(N).view(1, N, 1)).long()
    U0 = torch.randn(P, N, N, generator=g, dtype=torch.float64)
    C0 = torch.bmm(h, h.roll(1, 0).transpose(1, 2))
    w0 = torch.rand(P, N * k, generator=g, dtype=torch.float64) + 0.5

    def grads(sparse, layout):
        U, C, w = (t.clone().requires_grad_() for t in (U0, C0, w0))
        Q = torch.ops.exgramed.pair_scores(C, w, w, nbr, nbr, 0.5, -0.25, None, 0.0, None)
        seen = []
        Q.register_hook(lambda gq: seen.append(gq.layout))
        Z, obj = exgramed_kernels.qap_solve(U, nbr, nbr, Q, restarts=1, estimator="imle", lambda_=5.0,
                                            sparse_q_grad=sparse)
        ((Z * torch.randn(Z.shape, generator=torch.Generator().manual_seed(0), dtype=Z.dtype)).sum()
         + obj.sum()).backward()
        assert seen == [layout]
        return U.grad, C.grad, w.grad

    got = grads(True, torch.sparse_coo)
    want = grads(False, torch.strided)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)




def test_resolve_reuses_the_barycenter_gradient_exactly():
    """The CPU re-solve takes the forward's grad q(J/N) (same Q tensor, same neighbour tables): its gradient is
    bit-identical to a cold re-solve's computed by hand, and a Q changed in place after the forward (its version
    moves) or another Q with equal values is solved from its own values."""
    from qap_problems import problem

    gen = torch.Generator().manual_seed(11)
    U0, n1, n2, Q0 = problem(3, 40, 3, gen)
    U0, Q0 = U0.float(), Q0.float()
    dLdZ = torch.randn(3, 40, 40, generator=gen)
    lam = 3.0
    for partial in (False, True):
        U, Q = U0.clone().requires_grad_(), Q0.clone().requires_grad_()
        Z, _ = exgramed_kernels.qap_solve(U, n1, n2, Q, restarts=1, partial=partial, lambda_=lam)
        gU, = torch.autograd.grad((Z * dLdZ).sum(), U)
        with torch.no_grad():
            Zc, _ = exgramed_kernels.qap_solve(U0, n1, n2, Q0, restarts=1, partial=partial)
            Zp, _ = exgramed_kernels.qap_solve(U0 - lam * dLdZ, n1, n2, Q0.clone(), restarts=1, partial=partial)
        assert torch.equal(Z, Zc)
        assert torch.equal(gU, (Zc - Zp) / lam)
    # A forward that leaves grad q(J/N) behind, then Q changed in place: the next solve must not use it.
    U, Q = U0.clone().requires_grad_(), Q0.clone().requires_grad_()
    exgramed_kernels.qap_solve(U, n1, n2, Q, restarts=1)
    with torch.no_grad():
        Q.mul_(-1.0)
        got = exgramed_kernels.qap_solve(U0, n1, n2, Q, restarts=1)
        want = exgramed_kernels.qap_solve(U0, n1, n2, -Q0, restarts=1)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
