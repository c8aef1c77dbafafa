"""torch.ops.exgramed.align and MultiGraphAlignment: against the reference pipeline, determinism,
modes, options, errors, opcheck, torch.compile, autocast."""
import pytest
import torch

import exgramed_kernels as ek
from exgramed_kernels import reference as R
from exgramed_kernels.align import _cross_cosines, problem_graphs
from exgramed_kernels.module import sample_gumbel
from exgramed_kernels.testing import devices, rel_err

K, B, D, H, KNN = 3, 6, 7, 5, 2
# Few starts keep the (pure-Python) reference solver fast; both sides use the same starts.
FAST = dict(max_iter=20, restarts=2)
# align runs on CUDA when its solver's CUDA kernel was built (the other ops' kernels come with it).
DEVICES = devices("qap_solve")


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
    seed = torch.randint(0, 2**62, (1, P))  # the in-kernel quadratic noise's seeds, drawn after the unary noise
    ws = (m.w_root1, m.w_rel1, m.bias1, m.w_root2, m.w_rel2, m.bias2)
    opts = dict(k=KNN, lambda_=80.0, noise_scale=m.current_noise_scale(), max_iter=20, restarts=2)
    loss, Z = ek.align(x, *ws, un.double(), None, None, seed, **opts)
    assert torch.equal(out.Z, Z) and out.loss == loss
    # ... which is pair_scores' Gumbel sample of those seeds, given as a tensor.
    qn = R.gumbel_noise(seed.view(-1), B * KNN).view(1, P, B * KNN, B * KNN)
    loss2, Z2 = ek.align(x, *ws, un.double(), qn, None, **opts)
    assert torch.equal(Z2, Z) and torch.allclose(loss2, loss)
    # Per-modality accuracy: the diagonal fraction of problems k -> barycenter and barycenter -> k.
    diag = Z.diagonal(dim1=1, dim2=2).float().mean(-1)
    assert torch.allclose(out.accuracy, (diag[:K] + diag[K:]) / 2)
    assert not out.accuracy.requires_grad


def test_module_official_preset():
    m = _module(official=True)
    c = m.config
    assert c.metric == "l2" and c.partial and c.copy_structure and c.reverse
    assert c.noise_scale == 0.05 and c.estimator == "blackbox" and c.shared_noise and c.k == KNN
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", [dict(), dict(official=True, mode="pairwise")], ids=["defaults", "official-pairwise"])
def test_compile_fullgraph_matches_eager(opts, device):
    m = _module(**opts).to(device)
    x = make_inputs()[0].to(device)
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


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_align(device):
    x, ws, un, qn = make_inputs(B=5, d=4, h=3)
    x, un, qn = x.to(device).requires_grad_(), un.to(device), qn.to(device)
    ws = [w.to(device).requires_grad_() for w in ws]
    opts = dict(k=KNN, lambda_=20.0, noise_scale=0.5, max_iter=10)
    torch.library.opcheck(torch.ops.exgramed.align.default, (x, *ws, un, qn, None), opts)
    # the in-kernel quadratic noise (noise_seed) and the edge-length floor
    seeds = torch.tensor([[7, 8, 9, 10, 11, 12]], device=device)
    torch.library.opcheck(torch.ops.exgramed.align.default, (x, *ws, un, None, None, seeds), {**opts, "edge_floor": 0.2})


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
        (dict(mode="triangle"), "option mode must be one of"),
        (dict(solver="gurobi"), "option solver must be one of"),
        (dict(estimator="reinforce"), "option estimator must be one of"),
        (dict(lambda_=-1.0), "option lambda_ must be a positive finite number"),
        (dict(noise_scale=-0.1), "option noise_scale must be a finite number >= 0"),
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
    # Option values are ValueErrors (config.AlignConfig), tensor arguments RuntimeErrors.
    error = ValueError if match.startswith("option") else RuntimeError
    with pytest.raises(error, match=match):
        ek.align(x, *ws, change.get("un", un), change.get("qn", qn), change.get("mask"), **opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_inputs_name_the_arguments(dtype):
    """Finite inputs whose features overflow inside the pipeline are reported in terms of x and the weights
    (they were "qap_solve: Q contains NaN or Inf"); large inputs that fit give the loss of the unscaled ones."""
    x, ws, un, qn = make_inputs(dtype=dtype)
    # big: squares overflow dtype; (x * big2) * (w_root1 * big3): the first layer itself overflows
    big, big2, big3 = (1e20, 1e30, 1e10) if dtype == torch.float32 else (1e160, 1e160, 1e160)
    opts = dict(k=KNN, **FAST)
    nobias = [None if i in (2, 5) else w for i, w in enumerate(ws)]
    features = "x or the GraphConv weights \\(w_root1, w_rel1, bias1, w_root2, w_rel2, bias2\\) are too large"
    for xx, ww in ((x * big, ws), (x * big, nobias), (x, [w * big if i == 3 else w for i, w in enumerate(ws)]),
                   (x * big2, [w * big3 if i == 0 else w for i, w in enumerate(ws)])):
        with pytest.raises(RuntimeError, match="align: the (node features|features of GraphConv layer [12]) .*"
                                               + features):
            ek.align(xx, *ww, un, qn, None, **opts)
    # Without biases the loss does not depend on the scale of x (above the normalisations' 1e-12 floor): a power
    # of two changes no rounding either.
    loss, Z = ek.align(x, *nobias, un, qn, None, **opts)
    for scale in (2.0 ** 50, 2.0 ** -20):
        loss_s, Z_s = ek.align(x * scale, *nobias, un, qn, None, **opts)
        assert torch.equal(Z_s, Z) and torch.equal(loss_s, loss)


def test_meta_device():
    """align and MultiGraphAlignment on the meta device give their outputs' shapes and dtypes, forward and
    backward (torch.autocast raised "unsupported scalarType" there)."""
    x, ws, un, qn = make_inputs(dtype=torch.float32, S=2)
    meta = [t.to("meta") for t in (x, *ws, un, qn)]
    xm = meta[0].requires_grad_()
    loss, Z = ek.align(xm, *meta[1:7], meta[7], meta[8], None, k=KNN)
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32
    assert Z.device.type == "meta" and Z.shape == (2 * 2 * K, B, B)
    loss.backward()
    assert xm.grad.shape == x.shape and xm.grad.device.type == "meta"
    m = ek.MultiGraphAlignment(D, H, k=KNN).to("meta")
    out = m(torch.randn(K, B, D, device="meta"))
    assert out.loss.device.type == "meta" and out.Z.shape == (2 * K, B, B)


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
        with pytest.raises(ValueError, match="edge_floor must be a finite number >= 0"):
            ek.align(x, *ws, un, None, None, k=KNN, edge_floor=bad)
    seeds = torch.arange(2 * K).view(1, 2 * K)
    with pytest.raises(RuntimeError, match="either quadratic_noise or noise_seed"):
        ek.align(x, *ws, un, qn, None, seeds, k=KNN)
    with pytest.raises(RuntimeError, match="noise_seed must be an int64 tensor"):
        ek.align(x, *ws, un, None, None, seeds.double(), k=KNN)
    with pytest.raises(RuntimeError, match=r"noise_seed must have shape \[S, P\]"):
        ek.align(x, *ws, un, None, None, seeds.view(-1), k=KNN)


def test_inverse_edge_lengths_match_definition():
    """align's edge weights 1 / |h_i - h_j| from edge_sq_norms: short edges next to large norms stay exact."""
    from exgramed_kernels.align import inverse_edge_lengths

    gen = torch.Generator().manual_seed(7)
    h = torch.randn(3, 11, 16, generator=gen) * 100  # large norms next to a short edge
    h[0, 3] = h[0, 5] + 1e-3  # an edge 1e-5 |h| long
    nbr = torch.randint(0, 11, (3, 11, 3), generator=gen)
    nbr[0, 3, 0] = 5
    want = 1.0 / (h.double().repeat_interleave(3, 1) - torch.gather(
        h.double(), 1, nbr.reshape(3, 33, 1).expand(3, 33, 16))).norm(dim=-1).clamp_min(1e-12)
    got = inverse_edge_lengths(h, nbr)
    assert got.dtype == torch.float32
    assert rel_err(got[want < 1e11], want[want < 1e11]) < 1e-6
    assert abs(float(got[0, 9]) / float(want[0, 9]) - 1) < 1e-5  # the short edge
    r2 = h.double().square().sum(-1).mean(1, keepdim=True)  # the floor: (floor r)^2 added, r the RMS norm
    assert rel_err(inverse_edge_lengths(h, nbr, 0.1), (want.pow(-2) + 0.01 * r2).rsqrt()) < 1e-6
