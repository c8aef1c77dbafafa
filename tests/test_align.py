"""torch.ops.exgramed.align and MultiGraphAlignment: against the reference pipeline, determinism,
modes, options, errors, opcheck, torch.compile, autocast."""
import pytest
import torch

import exgramed_kernels as ek
from exgramed_kernels import reference as R
from exgramed_kernels.align import _cross_cosines, problem_graphs, sample_gumbel

K, B, D, H, KNN = 3, 6, 7, 5, 2
# Few starts keep the (pure-Python) reference solver fast; both sides use the same starts.
FAST = dict(max_iter=20, restarts=2)


def make_inputs(dtype=torch.float64, seed=0, K=K, B=B, d=D, h=H, k=KNN, S=1, mode="barycenter", shared=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(K, B, d, generator=g, dtype=dtype)
    ws = [torch.randn(*s, generator=g, dtype=dtype) / s[0] ** 0.5 for s in ((d, h), (d, h), (h,), (h, h), (h, h), (h,))]
    P = len(problem_graphs(K, mode)[0])
    un = -torch.empty(S, 1 if shared else P, B, B, dtype=dtype).exponential_(generator=g).log()
    qn = -torch.empty(S, 1 if shared else P, B * k, B * k, dtype=dtype).exponential_(generator=g).log()
    return x, ws, un, qn


def _grads(fn, x, ws):
    x = x.clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in ws]
    loss, Z = fn(x, *ws)
    grads = torch.autograd.grad(loss, [x] + ws)
    return loss.detach(), Z.detach(), grads


# Gradients are compared with aggr="sum": with "max", the ReLU zeros of layer 1 make ties whose
# subgradient the kernel gives to one neighbour and the reference splits evenly (both valid).
@pytest.mark.parametrize("mode", ["barycenter", "pairwise"])
@pytest.mark.parametrize("estimator", ["imle", "blackbox"])
@pytest.mark.parametrize("aggr", ["sum", "max"])
def test_matches_reference_pipeline(mode, estimator, aggr):
    x, ws, un, qn = make_inputs(mode=mode, seed=3)
    opts = dict(k=KNN, lambda_=20.0, noise_scale=0.5, estimator=estimator, mode=mode, aggr=aggr, **FAST)
    loss, Z, grads = _grads(lambda x, *w: ek.align(x, *w, un, qn, None, **opts), x, ws)
    rloss, rZ, rgrads = _grads(lambda x, *w: R.align(x, *w, un, qn, None, **opts), x, ws)
    assert torch.equal(Z, rZ)
    assert loss == rloss
    assert torch.allclose(loss, R.hamming_loss(Z).mean(), rtol=0, atol=1e-15)
    assert any(float(g.abs().max()) > 0 for g in grads)  # the estimate is not trivially zero here
    if aggr == "sum":
        for a, b in zip(grads, rgrads):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def assert_matches_reference(x, ws, un, qn, mask, **opts):
    """Same Z and loss as the reference pipeline, and the same gradients (aggr="sum")."""
    loss, Z, grads = _grads(lambda x, *w: ek.align(x, *w, un, qn, mask, **opts), x, ws)
    rloss, rZ, rgrads = _grads(lambda x, *w: R.align(x, *w, un, qn, mask, **opts), x, ws)
    assert torch.equal(Z, rZ) and loss == rloss
    for a, b in zip(grads, rgrads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_official_options_match_reference():
    # L2 kNN, copied structure, reverse aggregation, partial matchings, shared unary noise, dropout.
    x, ws, un, qn = make_inputs(seed=5, shared=True)
    mask = (torch.rand(2, K + 1, B, H, generator=torch.Generator().manual_seed(9)) > 0.1).double() / 0.9
    assert_matches_reference(x, ws, un, qn, mask, k=KNN, lambda_=80.0, noise_scale=0.05, estimator="blackbox",
                             metric="l2", reverse=True, copy_structure=True, partial=True, aggr="sum", **FAST)


def test_samples_are_perturbed_copies():
    x, ws, un, qn = make_inputs(seed=4, S=2)
    opts = dict(k=KNN, **FAST)
    loss, Z = ek.align(x, *ws, un, qn, None, **opts)
    P = 2 * K
    assert Z.shape == (2 * P, B, B)
    per = [ek.align(x, *ws, un[s:s + 1], qn[s:s + 1], None, **opts) for s in range(2)]
    assert torch.equal(Z, torch.cat([z for _, z in per]))
    assert torch.allclose(loss, (per[0][0] + per[1][0]) / 2, rtol=0, atol=1e-15)


def test_hamming_loss_by_hand():
    Z = torch.zeros(2, 4, 4, dtype=torch.float64)
    Z[0] = torch.eye(4)
    Z[1, 0, 1] = Z[1, 1, 0] = Z[1, 2, 2] = 1  # two nodes swapped, node 3 unmatched (partial)
    # Problem 1: 2 off-diagonal ones + 3 missed diagonal entries = 5, over N = 4.
    assert torch.equal(R.hamming_loss(Z), torch.tensor([0.0, 5 / 4], dtype=torch.float64))


def test_barycenter_and_pairwise_agree_on_identical_modalities():
    # Dyadic values: the barycenter (3x)/3 of identical modalities is exactly x, so every problem of
    # either mode is the same problem and the two losses agree.
    g = torch.Generator().manual_seed(2)
    x1 = torch.randint(-8, 9, (B, D), generator=g).double() / 4
    x = x1.expand(K, B, D).clone()
    _, ws, un, qn = make_inputs(seed=2, shared=True)
    opts = dict(k=KNN, **FAST)
    lb, Zb = ek.align(x, *ws, un, qn, None, mode="barycenter", **opts)
    lp, Zp = ek.align(x, *ws, un, qn, None, mode="pairwise", **opts)
    assert torch.equal(Zb, Zp) and lb == lp
    # With different modalities the two modes solve different problems.
    x2, *_ = make_inputs(seed=8)
    assert not torch.equal(ek.align(x2, *ws, un, qn, None, mode="barycenter", **opts)[1],
                           ek.align(x2, *ws, un, qn, None, mode="pairwise", **opts)[1])


def _module(**kw):
    torch.manual_seed(0)
    return ek.MultiGraphAlignment(D, H, k=KNN, max_iter=20, restarts=2, **kw).double()


def test_module_is_deterministic_for_a_seed():
    m = _module()
    x = make_inputs()[0]
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        xx = x.clone().requires_grad_()
        out = m(xx)
        out.loss.backward()
        outs.append((out.loss.detach(), out.Z, xx.grad, m.w_rel1.grad.clone()))
        m.zero_grad()
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    torch.manual_seed(11)  # another seed draws other noise
    n1 = sample_gumbel((3,))
    torch.manual_seed(12)
    assert not torch.equal(n1, sample_gumbel((3,)))


def test_module_matches_op_with_its_noise():
    m = _module()
    x = make_inputs()[0]
    torch.manual_seed(5)
    out = m(x)
    torch.manual_seed(5)
    P = 2 * K
    un = sample_gumbel((1, P, B, B))
    seed = torch.randint(0, 2**62, (1,))  # the in-kernel quadratic noise's seed, drawn after the unary noise
    loss, Z = ek.align(x, m.w_root1, m.w_rel1, m.bias1, m.w_root2, m.w_rel2, m.bias2, un.double(), None,
                       None, KNN, 80.0, m.current_noise_scale(), "fw", "imle", "barycenter", max_iter=20, restarts=2,
                       noise_seed=seed)
    assert torch.equal(out.Z, Z) and out.loss == loss
    # ... which is pair_scores' Gumbel sample of that seed, given as a tensor.
    qn = R.gumbel_noise(int(seed), P, B * KNN).view(1, P, B * KNN, B * KNN)
    loss2, Z2 = ek.align(x, m.w_root1, m.w_rel1, m.bias1, m.w_root2, m.w_rel2, m.bias2, un.double(), qn,
                         None, KNN, 80.0, m.current_noise_scale(), "fw", "imle", "barycenter", max_iter=20,
                         restarts=2)
    assert torch.equal(Z2, Z) and torch.allclose(loss2, loss)
    # Per-modality accuracy: the diagonal fraction of problems k -> barycenter and barycenter -> k.
    diag = Z.diagonal(dim1=1, dim2=2).float().mean(-1)
    assert torch.allclose(out.accuracy, (diag[:K] + diag[K:]) / 2)
    assert not out.accuracy.requires_grad


def test_module_official_preset():
    m = _module(official=True)
    assert m.opts["metric"] == "l2" and m.opts["partial"] and m.opts["copy_structure"] and m.opts["reverse"]
    assert m.opts["noise_scale"] == 0.05 and m.opts["estimator"] == "blackbox" and m.opts["shared_noise"]
    x = make_inputs()[0].requires_grad_()
    torch.manual_seed(0)
    out = m(x)
    out.loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # The override wins over the preset.
    assert _module(official=True, noise_scale=0.5).current_noise_scale() == 0.5


def test_noise_schedule_and_zero_noise():
    m = _module(noise_schedule=lambda step: 0.5 / (1 + step))
    x = make_inputs()[0]
    scales = [m(x).noise_scale for _ in range(3)]
    assert scales == [0.5, 0.25, 0.5 / 3] and int(m.step) == 3
    m0 = _module(noise_scale=0.0)
    torch.manual_seed(1)
    a = m0(x)
    torch.manual_seed(2)
    b = m0(x)
    assert torch.equal(a.Z, b.Z)  # no noise: the result does not depend on the generator


def test_upstream_and_mixed_precision():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, D)
    m = ek.MultiGraphAlignment(D, H, k=KNN, max_iter=20, restarts=2)
    inp = torch.randn(K, B, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(inp)
        assert y.dtype == torch.bfloat16
        out = m(y)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    assert m.w_root1.grad is not None


# Inductor's C++ code on two threads: its parallel (atomic-add) scatter kernels, whatever this machine's
# core count.
TWO_INDUCTOR_THREADS = {"cpp.threads": 2}


@pytest.mark.parametrize("opts", [dict(), dict(official=True, mode="pairwise")], ids=["defaults", "official-pairwise"])
def test_compile_fullgraph_matches_eager(opts):
    m = _module(**opts)
    x = make_inputs()[0]
    cm = torch.compile(m, fullgraph=True)
    res = []
    # Inductor's own RNG differs from eager's; fallback_random draws the same noise as eager.
    with torch._inductor.config.patch(fallback_random=True, **TWO_INDUCTOR_THREADS):
        for fn in (m, cm):
            torch.manual_seed(3)
            xx = x.clone().requires_grad_()
            out = fn(xx)
            out.loss.backward()
            res.append((out.loss.detach(), out.Z, xx.grad.clone()))
    for a, b in zip(*res):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["barycenter", "pairwise"])
def test_cross_cosines_compiled_backward_matches_eager(mode):
    # The gradient of the gathered graph features, compiled by Inductor on two threads: a gather whose
    # backward scatters a transposed gradient is compiled into out-of-bounds writes by torch 2.11-2.13.
    src, dst = problem_graphs(K, mode)
    G = K + 1 if mode == "barycenter" else K
    g = torch.Generator().manual_seed(5)
    hn = torch.randn(G, B, H, generator=g, dtype=torch.float64)
    weight = torch.randn(len(src), B, B, generator=g, dtype=torch.float64)

    def grad_of(fn):
        h = hn.clone().requires_grad_()
        (fn(h, src, dst) * weight).sum().backward()
        return h.grad

    with torch._inductor.config.patch(TWO_INDUCTOR_THREADS):
        compiled = grad_of(torch.compile(_cross_cosines, fullgraph=True))
    assert torch.allclose(compiled, grad_of(_cross_cosines), rtol=1e-12, atol=1e-14)


def test_opcheck_align():
    x, ws, un, qn = make_inputs(B=5, d=4, h=3)
    x.requires_grad_()
    ws = [w.requires_grad_() for w in ws]
    args = (x, *ws, un, qn, None, KNN, 20.0, 0.5, "fw", "imle", "barycenter", "cosine", "max", False, False,
            False, 10, 1e-6, 1, 0)
    torch.library.opcheck(torch.ops.exgramed.align.default, args)
    # the in-kernel quadratic noise (noise_seed) and the edge-length floor
    args = (x, *ws, un, None, None, KNN, 20.0, 0.5, "fw", "imle", "barycenter", "cosine", "max", False, False,
            False, 10, 1e-6, 1, 0, torch.tensor([7]), 0.2)
    torch.library.opcheck(torch.ops.exgramed.align.default, args)


def test_opcheck_qap_solve_autograd():
    g = torch.Generator().manual_seed(0)
    G, N, k = 2, 5, 2
    U = torch.randn(G, N, N, generator=g, dtype=torch.float64, requires_grad=True)
    Q = torch.randn(G, N * k, N * k, generator=g, dtype=torch.float64, requires_grad=True)
    nbr = torch.stack([torch.stack([(torch.arange(k) + i + 1) % N for i in range(N)])] * G)
    for est in ("imle", "blackbox"):
        torch.library.opcheck(torch.ops.exgramed.qap_solve.default,
                              (U, nbr, nbr.flip(-1).contiguous(), Q, None, None, "fw", 10, 1e-6, 2, False, 0, est, 5.0))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.randn(B, D)), "x must have shape"),
        (dict(x=torch.randn(1, B, D)), "K >= 2"),
        (dict(k=B), "k must satisfy"),
        (dict(mode="triangle"), "mode"),
        (dict(solver="gurobi"), "solver"),
        (dict(estimator="reinforce"), "estimator"),
        (dict(lambda_=-1.0), "lambda_"),
        (dict(noise_scale=-0.1), "noise_scale"),
        (dict(un=torch.zeros(1, 4, B, B)), "unary_noise must have shape"),
        (dict(qn=torch.zeros(1, 1, B, B)), "quadratic_noise must have shape"),
        (dict(w0=torch.zeros(D + 1, H)), "w_root1 must have shape"),
        (dict(w3=torch.zeros(H, H + 1)), "w_root2 must have shape"),
        (dict(b=torch.zeros(H + 1)), "bias1 must have shape"),
        (dict(nan=True), "x contains NaN"),
        (dict(mask=torch.ones(2, K, B, H)), "dropout_mask must have shape"),
    ],
)
def test_errors_name_the_argument(change, match):
    x, ws, un, qn = make_inputs(dtype=torch.float32)
    x = change.get("x", x)
    if change.get("nan"):
        x = x.clone()
        x[0, 0, 0] = float("nan")
    ws[0] = change.get("w0", ws[0])
    ws[3] = change.get("w3", ws[3])
    ws[2] = change.get("b", ws[2])
    opts = dict(k=change.get("k", KNN), mode=change.get("mode", "barycenter"), solver=change.get("solver", "fw"),
                estimator=change.get("estimator", "imle"), lambda_=change.get("lambda_", 80.0),
                noise_scale=change.get("noise_scale", 0.5))
    with pytest.raises(RuntimeError, match=match):
        ek.align(x, *ws, change.get("un", un), change.get("qn", qn), change.get("mask"), **opts)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_edge_cosines_gram_form_matches_edge_features(dtype, tol):
    from exgramed_kernels.align import _edge_cosines, _edge_features

    g = torch.Generator().manual_seed(0)
    P, N, k, h = 3, 9, 3, 16
    h1 = torch.randn(P, N, h, generator=g, dtype=torch.float64)
    h2 = torch.randn(P, N, h, generator=g, dtype=torch.float64)
    h1[0, 4] = h1[0, 2]  # a zero-length edge when 4 -> 2: F.normalize's zero vector, cosine 0
    rows = torch.arange(N).view(1, N, 1)
    nbr1 = (rows + torch.randint(1, N, (P, N, k), generator=g)) % N  # no self loops, as kNN
    nbr1[0, 4, 0] = 2
    nbr2 = (rows + torch.randint(1, N, (P, N, k), generator=g)) % N
    want = torch.bmm(_edge_features(h1, nbr1), _edge_features(h2, nbr2).transpose(1, 2))
    got = _edge_cosines(h1.to(dtype), h2.to(dtype), nbr1, nbr2)
    assert (got.double() - want).abs().max() < tol
    assert got[0, 4 * k].abs().max() < tol
    # The gradient of the Gram form equals the edge features' one (fp64; edges of nonzero length,
    # a zero-length edge has no derivative: both forms divide by 1e-12 there).
    a = torch.randn(P, N, h, generator=g, dtype=torch.float64, requires_grad=True)
    b = h2.clone().requires_grad_()
    w = torch.randn(P, N * k, N * k, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((_edge_cosines(a, b, nbr1, nbr2) * w).sum(), (a, b))
    gb = torch.autograd.grad((torch.bmm(_edge_features(a, nbr1), _edge_features(b, nbr2).transpose(1, 2)) * w).sum(),
                             (a, b))
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-12)


def test_gumbel_samples():
    torch.manual_seed(0)
    s = sample_gumbel((200000,), dtype=torch.float64)
    # Gumbel(0, 1): mean = Euler's gamma, variance = pi^2 / 6.
    assert abs(float(s.mean()) - 0.5772156649) < 0.01
    assert abs(float(s.var()) - 3.14159265 ** 2 / 6) < 0.03
    assert torch.isfinite(sample_gumbel((1000,), dtype=torch.float32)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_matches_cpu():
    x, ws, un, qn = make_inputs(dtype=torch.float32, seed=6)
    opts = dict(k=KNN, aggr="sum", **FAST)
    cpu = _grads(lambda x, *w: ek.align(x, *w, un, qn, None, **opts), x, ws)
    cuda = _grads(lambda x, *w: ek.align(x, *w, un.cuda(), qn.cuda(), None, **opts), x.cuda(), [w.cuda() for w in ws])
    assert torch.equal(cuda[1].cpu(), cpu[1]) and torch.allclose(cuda[0].cpu(), cpu[0])
    for a, b in zip(cuda[2], cpu[2]):
        assert torch.allclose(a.cpu(), b, rtol=1e-3, atol=1e-5)


def test_module_symmetric_estimator_end_to_end():
    """estimator='imle_symmetric' passes qap_solve's checks and runs its own backward:
    same forward as one-sided IMLE, a different (central-difference) gradient."""
    x = make_inputs()[0]
    grads, losses = {}, {}
    for est in ("imle", "imle_symmetric"):
        m = _module(estimator=est, noise_scale=1.0, lambda_=5.0)
        torch.manual_seed(3)
        xx = x.clone().requires_grad_()
        out = m(xx)
        out.loss.backward()
        grads[est], losses[est] = xx.grad, out.loss.detach()
    assert torch.equal(losses["imle"], losses["imle_symmetric"])
    assert torch.isfinite(grads["imle_symmetric"]).all()
    assert grads["imle_symmetric"].abs().sum() > 0
    assert not torch.equal(grads["imle"], grads["imle_symmetric"])


@pytest.mark.parametrize("edge_floor", [0.0, 0.1, 0.5])
def test_edge_floor_matches_reference(edge_floor):
    x, ws, un, qn = make_inputs(seed=11)
    assert_matches_reference(x, ws, un, qn, None, k=KNN, lambda_=20.0, noise_scale=0.5, aggr="sum",
                             edge_floor=edge_floor, **FAST)


def test_edge_floor_bounds_the_gradient_of_coincident_features():
    """Node features that nearly coincide (a common vector plus a tiny spread): through F.normalize
    the edge scores' gradient grows as 1 / spread; with the floor it stays of order 1 / (floor r)."""
    from exgramed_kernels.align import problem_scores

    g = torch.Generator().manual_seed(0)
    G, N, h, k = 2, 12, 8, 3
    common = torch.randn(h, generator=g, dtype=torch.float64)
    noise = torch.randn(G, N, h, generator=g, dtype=torch.float64)
    nbr = torch.stack([torch.stack([torch.randperm(N - 1, generator=g)[:k] for _ in range(N)]) for _ in range(G)])
    nbr = nbr + (nbr >= torch.arange(N).view(1, N, 1)).long()  # no self loops
    W = torch.randn(2, N * k, N * k, generator=g, dtype=torch.float64)

    def grad_norm(spread, floor):
        hh = (common + spread * noise).requires_grad_()
        _, Q, _, _ = problem_scores(hh, nbr, [0, 1], [1, 0], False, edge_floor=floor)
        return float(torch.autograd.grad((Q * W).sum(), hh)[0].norm())

    free = [grad_norm(s, 0.0) for s in (1e-1, 1e-3)]
    floored = [grad_norm(s, 0.1) for s in (1e-1, 1e-3)]
    assert free[1] > 30 * free[0]  # ~1 / spread
    assert floored[1] < 2 * floored[0] and floored[1] < free[1] / 30
    # Ordinary edges (spread of the order of the norm) barely notice the floor.
    assert abs(grad_norm(3.0, 0.1) / grad_norm(3.0, 0.0) - 1) < 0.2


def test_edge_floor_and_noise_seed_errors():
    x, ws, un, qn = make_inputs(seed=12)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="edge_floor must be a finite number >= 0"):
            ek.align(x, *ws, un, None, None, k=KNN, edge_floor=bad)
    with pytest.raises(RuntimeError, match="either quadratic_noise or noise_seed"):
        ek.align(x, *ws, un, qn, None, k=KNN, noise_seed=torch.tensor([1]))
    with pytest.raises(RuntimeError, match="noise_seed must be a CPU int64 tensor"):
        ek.align(x, *ws, un, None, None, k=KNN, noise_seed=torch.tensor([1.0]))
