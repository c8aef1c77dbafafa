"""pair_scores: against the float64 reference (seeded and given noise, awkward shapes), the Gram form against
explicit edge features, the noise's distribution and determinism, the sparse-aware backward (gradcheck, the
estimators' sparse gradient), errors, opcheck, compile."""
import math
import os

import pytest
import torch

import exgramed_kernels as ek
from exgramed_kernels import reference
from exgramed_kernels.testing import RTOL, devices, rel_err

DEVICES = devices("pair_scores")


def inputs(P, N, k, gen, dtype=torch.float64, device="cpu"):
    C = torch.randn(P, N, N, generator=gen, dtype=torch.float64)
    w1 = torch.rand(P, N * k, generator=gen, dtype=torch.float64) + 0.1
    w2 = torch.rand(P, N * k, generator=gen, dtype=torch.float64) + 0.1
    n1 = torch.randint(0, N, (P, N, k), generator=gen)
    n2 = torch.randint(0, N, (P, N, k), generator=gen)  # self loops and repeats included
    return [t.to(device, dtype) for t in (C, w1, w2)] + [n1.to(device), n2.to(device)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("P, N, k", [(1, 1, 1), (3, 7, 2), (2, 13, 5), (4, 5, 4)])
@pytest.mark.parametrize("noise", ["none", "tensor", "seed"])
def test_matches_reference(device, dtype, P, N, k, noise):
    gen = torch.Generator().manual_seed(P * 100 + N * 10 + k)
    C, w1, w2, n1, n2 = inputs(P, N, k, gen, dtype, device)
    kw = {}
    if noise == "tensor":
        kw = dict(noise=torch.randn(P, N * k, N * k, generator=gen, dtype=torch.float64).to(device, dtype))
    elif noise == "seed":
        kw = dict(noise_seed=(12345 + N + torch.arange(P) * 2**40).to(device))  # seeds above 2^32 too
    got = ek.pair_scores(C, w1, w2, n1, n2, 0.5, -0.25, noise_scale=0.7, **kw)
    ref_kw = {k_: v.cpu() if k_ == "noise_seed" else v.double().cpu() for k_, v in kw.items()}
    want = reference.pair_scores(*(t.double().cpu() for t in (C, w1, w2)), n1.cpu(), n2.cpu(), 0.5, -0.25,
                                 noise_scale=0.7, **ref_kw)
    assert got.dtype == dtype and got.shape == (P, N * k, N * k)
    # The seeded noise is float32 on every backend: its own rounding sets the tolerance there.
    tol = max(RTOL[dtype], 1e-6 if noise == "seed" else 0.0)
    assert rel_err(got.cpu(), want) < tol


@pytest.mark.parametrize("P, N, k", [(2, 13, 5), (2, 29, 2), (1, 31, 1), (3, 40, 3)])
def test_float32_cpu_rounds_every_operation_as_written(P, N, k):
    """The float32 CPU kernel equals its formula evaluated one rounded operation at a time, in its order
    (``((alpha w1) w2) (D_a - D_b) + beta + noise_scale n``, D = C_i. - C_j.), bit for bit at every entry:
    no multiply-add is fused, so no entry's bits depend on the CPU or on where it falls in a vectorised
    loop (N k = 65, 58, 31, 120: loop bodies, 256-bit epilogues and scalar tails)."""
    gen = torch.Generator().manual_seed(N * k)
    C, w1, w2, n1, n2 = inputs(P, N, k, gen, torch.float32)
    noise = torch.randn(P, N * k, N * k, generator=gen)
    alpha, beta, scale = 0.7, -0.3, 0.45
    got = ek.pair_scores(C, w1, w2, n1, n2, alpha, beta, noise, scale)
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    Nk = N * k
    heads = torch.arange(Nk) // k
    D = C[:, heads] - torch.gather(C, 1, n1.reshape(P, Nk, 1).expand(P, Nk, N))  # [P, Nk, N]: D of edge e
    diff = D[:, :, heads] - torch.gather(D, 2, n2.reshape(P, 1, Nk).expand(P, Nk, Nk))
    want = ((f32(alpha) * w1).unsqueeze(2) * w2.unsqueeze(1)) * diff + f32(beta)
    want = want + f32(scale) * noise
    assert torch.equal(got, want)


@pytest.mark.skipif(os.environ.get("EXGRAMED_BUFFER_POOL") == "0", reason="the buffer pool is turned off")
def test_large_output_reuses_its_buffer_and_rewrites_all_of_it():
    """Tables of >= 4 MiB come from a pool of reused CPU blocks (csrc/cpu/buffer_pool.h): a freed table's
    block is handed to the next one of the same size, whose every entry must be freshly written."""
    gen = torch.Generator().manual_seed(5)
    P, N, k = 1, 320, 4  # 1280 x 1280 float32: 6.25 MiB
    first = ek.pair_scores(*inputs(P, N, k, gen, torch.float32), 0.5, -0.25)
    ptr = first.data_ptr()
    first.fill_(float("nan"))  # what the next table must not see
    del first
    C, w1, w2, n1, n2 = inputs(P, N, k, gen, torch.float32)
    got = ek.pair_scores(C, w1, w2, n1, n2, 0.5, -0.25, noise_scale=0.3, noise_seed=torch.tensor([11]))
    assert got.data_ptr() == ptr
    want = reference.pair_scores(*(t.double() for t in (C, w1, w2)), n1, n2, 0.5, -0.25, noise_scale=0.3,
                                 noise_seed=torch.tensor([11]))
    assert bool(torch.isfinite(got).all())
    assert rel_err(got, want) < 1e-6
    other = ek.pair_scores(*inputs(P, N + 1, k, gen, torch.float32), 0.5, -0.25)  # another size: its own block
    assert other.data_ptr() != got.data_ptr()


def test_noise_is_standard_gumbel_and_keyed_by_the_problems_seed():
    seed = torch.tensor([7, 8, 9, 10])
    zeros = lambda P, N, k: (torch.zeros(P, N, N), torch.zeros(P, N * k), torch.zeros(P, N * k),  # noqa: E731
                             torch.zeros(P, N, k, dtype=torch.long), torch.zeros(P, N, k, dtype=torch.long))
    g = ek.pair_scores(*zeros(4, 64, 4), 0.0, 0.0, None, 1.0, seed).double().flatten()
    # Gumbel(0, 1): mean = Euler's gamma, variance = pi^2 / 6; CDF exp(-exp(-x)) at a few points.
    assert abs(float(g.mean()) - 0.5772157) < 0.01
    assert abs(float(g.var()) - math.pi ** 2 / 6) < 0.03
    for x in (-1.0, 0.0, 1.0, 3.0):
        assert abs(float((g <= x).double().mean()) - math.exp(-math.exp(-x))) < 0.005
    assert float(g.min()) > -2.83 and float(g.max()) < 16.7  # u never 0 or 1
    again = ek.pair_scores(*zeros(4, 64, 4), 0.0, 0.0, None, 1.0, seed.clone()).double().flatten()
    assert torch.equal(g, again)
    other = ek.pair_scores(*zeros(4, 64, 4), 0.0, 0.0, None, 1.0, seed + 100).double().flatten()
    assert float((g - other).abs().mean()) > 0.5
    # A problem's noise depends on its own seed only, not on its row: problems 2 and 0, alone or reordered.
    per = g.view(4, -1)
    alone = ek.pair_scores(*zeros(1, 64, 4), 0.0, 0.0, None, 1.0, seed[2:3]).double().flatten()
    assert torch.equal(alone, per[2])
    swapped = ek.pair_scores(*zeros(2, 64, 4), 0.0, 0.0, None, 1.0, seed[[2, 0]]).double().view(2, -1)
    assert torch.equal(swapped[0], per[2]) and torch.equal(swapped[1], per[0])
    # Neighbouring columns and rows are uncorrelated.
    m = g.view(4 * 256, 256)
    for a, b in ((m[:, :-1], m[:, 1:]), (m[:-1], m[1:])):
        assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.01


@pytest.mark.parametrize("device", DEVICES)
def test_backward_gradcheck_and_reference(device):
    gen = torch.Generator().manual_seed(3)
    C, w1, w2, n1, n2 = inputs(2, 6, 3, gen, torch.float64, device)
    nz = torch.randn(2, 18, 18, generator=gen, dtype=torch.float64).to(device)
    ins = [t.clone().requires_grad_() for t in (C, w1, w2, nz)]
    f = lambda C, w1, w2, nz: ek.pair_scores(C, w1, w2, n1, n2, 0.5, -0.25, nz, 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(f, ins)
    # Against autograd of the reference, with a sparse incoming gradient (what the estimators send).
    g = torch.zeros(2, 18, 18, dtype=torch.float64, device=device)
    g.view(-1)[torch.randperm(g.numel(), generator=gen)[:20].to(device)] = torch.randn(20, generator=gen,
                                                                                       dtype=torch.float64).to(device)
    got = torch.autograd.grad(f(*ins), ins, g)
    ref_ins = [t.detach().cpu().clone().requires_grad_() for t in ins]
    want = torch.autograd.grad(reference.pair_scores(*ref_ins[:3], n1.cpu(), n2.cpu(), 0.5, -0.25, ref_ins[3], 0.7),
                               ref_ins, g.cpu())
    for a, b in zip(got, want):
        assert rel_err(a.cpu(), b) < 1e-12


def test_backward_is_deterministic_and_skips_nothing():
    gen = torch.Generator().manual_seed(4)
    C, w1, w2, n1, n2 = inputs(3, 9, 2, gen, torch.float32)
    g = torch.randn(3, 18, 18, generator=gen)
    a = torch.ops.exgramed.pair_scores_backward(g, C, w1, w2, n1, n2, 0.5)
    b = torch.ops.exgramed.pair_scores_backward(g, C, w1, w2, n1, n2, 0.5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    want = torch.ops.exgramed.pair_scores_backward(g.double(), C.double(), w1.double(), w2.double(), n1, n2, 0.5)
    for x, y in zip(a, want):
        assert rel_err(x, y) < 1e-5


def test_errors():
    gen = torch.Generator().manual_seed(5)
    C, w1, w2, n1, n2 = inputs(2, 5, 2, gen, torch.float32)
    cases = [
        (dict(C=C[:, :4]), "C must have shape"),
        (dict(C=C.long()), "floating-point"),
        (dict(w1=w1[:, :3]), "w1 must have shape"),
        (dict(w2=w2.double()), "w2 must have C's dtype"),
        (dict(n1=n1 + 5), "nbr1 entries must lie in"),
        (dict(n2=n2[..., :1]), "nbr1 and nbr2 must have the same k"),
        (dict(n1=n1.int()), "nbr1 must be int64"),
        (dict(noise=torch.zeros(2, 10, 9)), "noise must have shape"),
        (dict(noise=torch.zeros(2, 10, 10), noise_seed=torch.tensor([1, 2])), "either noise or noise_seed"),
        (dict(noise_seed=torch.tensor([1, 2, 3])), r"noise_seed must be an int64 tensor of shape \[P\] = \[2\]"),
        (dict(noise_seed=torch.tensor([1.0, 2.0])), "noise_seed must be an int64 tensor"),
    ]
    # NaN and Inf in the values are named, as every other op does (they passed through silently).
    for name, t in (("C", C), ("w1", w1), ("w2", w2), ("noise", torch.zeros(2, 10, 10))):
        for bad in (float("nan"), float("inf")):
            t = t.clone()
            t.view(-1)[t.numel() // 2] = bad
            cases.append(({name: t}, f"pair_scores: {name} contains NaN or Inf"))
    for change, match in cases:
        a = dict(C=C, w1=w1, w2=w2, n1=n1, n2=n2, noise=None, noise_seed=None)
        a.update(change)
        with pytest.raises(RuntimeError, match=match):
            ek.pair_scores(a["C"], a["w1"], a["w2"], a["n1"], a["n2"], 1.0, 0.0, a["noise"], 1.0, a["noise_seed"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("noise", ["none", "tensor", "seed"])
def test_half_precision_computed_in_float32(device, dtype, noise):
    """float16 and bfloat16 inputs (NotImplementedError before) are computed in float32: the result and the
    gradients are the float32 ones rounded to the input's dtype."""
    gen = torch.Generator().manual_seed(9)
    C, w1, w2, n1, n2 = inputs(3, 6, 2, gen, dtype, device)
    kw = {}
    if noise == "tensor":
        kw = dict(noise=torch.randn(3, 12, 12, generator=gen).to(device, dtype))
    elif noise == "seed":
        kw = dict(noise_seed=torch.tensor([5, 6, 7], device=device))
    ins = [t.clone().requires_grad_() for t in (C, w1, w2)]
    got = ek.pair_scores(*ins, n1, n2, 0.5, -0.25, noise_scale=0.7, **kw)
    g = torch.randn(got.shape, generator=gen).to(device, dtype)
    grads = torch.autograd.grad(got, ins, g)
    ins32 = [t.float().requires_grad_() for t in (C, w1, w2)]
    kw32 = {k_: v.float() if v.is_floating_point() else v for k_, v in kw.items()}
    want = ek.pair_scores(*ins32, n1, n2, 0.5, -0.25, noise_scale=0.7, **kw32)
    want_grads = torch.autograd.grad(want, ins32, g.float())
    assert got.dtype == dtype and all(t.dtype == dtype for t in grads)
    assert torch.equal(got, want.to(dtype))
    for a, b in zip(grads, want_grads):  # float64 accumulations rounded to dtype, or through float32
        torch.testing.assert_close(a, b.to(dtype))


def test_opcheck():
    gen = torch.Generator().manual_seed(6)
    C, w1, w2, n1, n2 = inputs(2, 5, 2, gen, torch.float32)
    nz = torch.randn(2, 10, 10, generator=gen)
    for args in ((C, w1, w2, n1, n2, 0.5, -0.25, None, 0.3, torch.tensor([3, 4])),
                 (C.requires_grad_(), w1.requires_grad_(), w2, n1, n2, 0.5, -0.25, nz, 0.3, None)):
        torch.library.opcheck(torch.ops.exgramed.pair_scores.default, args)
    torch.library.opcheck(torch.ops.exgramed.pair_scores_backward.default,
                          (torch.randn(2, 10, 10), C.detach(), w1.detach(), w2, n1, n2, 0.5))


def test_compile_fullgraph():
    gen = torch.Generator().manual_seed(8)
    C, w1, w2, n1, n2 = inputs(2, 6, 3, gen, torch.float32)
    seed = torch.tensor([21, 22])

    @torch.compile(fullgraph=True)
    def f(C, w1, w2):
        Q = ek.pair_scores(C * 1.0, w1, w2, n1, n2, 0.5, -0.25, None, 0.3, seed)
        return (Q * Q).sum()

    Ci, w1i, w2i = (t.clone().requires_grad_() for t in (C, w1, w2))
    got = f(Ci, w1i, w2i)
    g_got = torch.autograd.grad(got, (Ci, w1i, w2i))
    Ce, w1e, w2e = (t.clone().requires_grad_() for t in (C, w1, w2))
    want = (ek.pair_scores(Ce, w1e, w2e, n1, n2, 0.5, -0.25, None, 0.3, seed) ** 2).sum()
    g_want = torch.autograd.grad(want, (Ce, w1e, w2e))
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_gradient_matches_dense(dtype):
    """pair_scores' backward takes a sparse COO gradient (what qap_solve's estimators hand it inside
    align): the same gradients as the dense kernel, duplicate (uncoalesced) entries summed."""
    gen = torch.Generator().manual_seed(9)
    P, N, k = 3, 7, 3
    C, w1, w2, n1, n2 = inputs(P, N, k, gen, dtype)
    nnz = 40
    idx = torch.stack([torch.randint(0, P, (nnz,), generator=gen), torch.randint(0, N * k, (nnz,), generator=gen),
                       torch.randint(0, N * k, (nnz,), generator=gen)])
    idx = torch.cat([idx, idx[:, :5]], 1)  # repeated entries
    vals = torch.randn(nnz + 5, generator=gen, dtype=dtype)
    sparse = torch.sparse_coo_tensor(idx, vals, (P, N * k, N * k), check_invariants=True)
    noise = torch.randn(P, N * k, N * k, generator=gen, dtype=dtype)
    grads = []
    for g in (sparse, sparse.to_dense()):
        ins = [t.clone().requires_grad_() for t in (C, w1, w2, noise)]
        Q = ek.pair_scores(ins[0], ins[1], ins[2], n1, n2, 0.5, -0.25, ins[3], 0.3)
        Q.backward(g)
        grads.append([t.grad for t in ins])
    for got, want in zip(*grads):
        assert not got.is_sparse
        assert rel_err(got, want) < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("P, N, k, nnz", [(3, 7, 3, 40), (1, 1, 1, 1), (2, 5, 2, 0)])
def test_backward_sparse_op_matches_reference(dtype, P, N, k, nnz):
    """pair_scores_backward_sparse (the CPU kernel) against its definition -- the float64 reference backward of
    the dense gradient its entries make -- with repeated entries, self loops and an empty list."""
    gen = torch.Generator().manual_seed(P * 100 + N * 10 + nnz)
    C, w1, w2, n1, n2 = inputs(P, N, k, gen, dtype)
    idx = torch.stack([torch.randint(0, P, (nnz,), generator=gen), torch.randint(0, N * k, (nnz,), generator=gen),
                       torch.randint(0, N * k, (nnz,), generator=gen)])
    idx = torch.cat([idx, idx[:, : min(nnz, 5)]], 1)  # repeated entries: summed
    vals = torch.randn(idx.shape[1], generator=gen, dtype=dtype)
    got = ek.pair_scores_backward_sparse(idx, vals, C, w1, w2, n1, n2, 0.5)
    dense = torch.sparse_coo_tensor(idx, vals.double(), (P, N * k, N * k), check_invariants=True).to_dense()
    with torch.enable_grad():
        ins = [t.double().requires_grad_() for t in (C, w1, w2)]
        want = torch.autograd.grad(reference.pair_scores(*ins, n1, n2, 0.5), ins, dense)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        assert rel_err(a.double(), b) < (1e-12 if dtype == torch.float64 else 1e-5)
    again = ek.pair_scores_backward_sparse(idx, vals, C, w1, w2, n1, n2, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # deterministic


def test_backward_sparse_op_errors_and_opcheck():
    gen = torch.Generator().manual_seed(12)
    C, w1, w2, n1, n2 = inputs(2, 5, 2, gen, torch.float32)
    idx = torch.tensor([[0, 1], [3, 9], [2, 0]])
    vals = torch.tensor([1.0, -2.0])
    torch.library.opcheck(torch.ops.exgramed.pair_scores_backward_sparse.default, (idx, vals, C, w1, w2, n1, n2, 0.5))
    cases = [
        (dict(idx=idx[:2]), "indices must be int64 \\[3, nnz\\]"),
        (dict(idx=idx.int()), "indices must be int64"),
        (dict(vals=vals[:1]), "values must have shape|values must be a floating-point tensor of shape"),
        (dict(vals=torch.tensor([1.0, float("nan")])), "NaN or Inf"),
        (dict(idx=torch.tensor([[0, 2], [3, 9], [2, 0]])), "outside|must lie in"),
        (dict(idx=torch.tensor([[0, 1], [3, 10], [2, 0]])), "outside|must lie in"),
        (dict(C=C[:, :4]), "C must have shape"),
        (dict(n1=n1 + 5), "nbr1 entries must lie in"),
    ]
    for change, match in cases:
        a = dict(idx=idx, vals=vals, C=C, n1=n1)
        a.update(change)
        with pytest.raises(RuntimeError, match=match):
            ek.pair_scores_backward_sparse(a["idx"], a["vals"], a["C"], w1, w2, a["n1"], n2, 0.5)


def _edge_features(h, nbr):
    """``normalize(h_i - h_j)`` for edge ``(i, nbr[i, s])``, row ``i * k + s``: [P, N, h] -> [P, N k, h]."""
    P, N, k = nbr.shape
    tails = torch.gather(h, 1, nbr.reshape(P, N * k, 1).expand(P, N * k, h.shape[-1]))
    return torch.nn.functional.normalize(h.repeat_interleave(k, dim=1) - tails, dim=-1)


def _edge_cosines(h1, h2, nbr1, nbr2):
    """<normalize(h1_i - h1_j), normalize(h2_a - h2_b)> through pair_scores' Gram form."""
    from exgramed_kernels.align import inverse_edge_lengths

    C = torch.bmm(h1, h2.transpose(1, 2))
    return ek.pair_scores(C, inverse_edge_lengths(h1, nbr1), inverse_edge_lengths(h2, nbr2), nbr1, nbr2)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_gram_form_matches_edge_features(dtype, tol):
    """align's edge cosines: pair_scores on the cross Gram ``C = h1 h2^T`` and the inverse edge lengths equals
    the product of explicit edge features, forward and backward."""
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


def test_gradient_through_the_backward_raises():
    gen = torch.Generator().manual_seed(9)
    C, w1, w2, n1, n2 = inputs(2, 5, 2, gen, torch.float64)
    C.requires_grad_()
    Q = ek.pair_scores(C, w1, w2, n1, n2, 0.5, -0.25)
    (g,) = torch.autograd.grad((Q * Q).sum(), C, create_graph=True)
    with pytest.raises(RuntimeError, match="pair_scores_backward: .* is not differentiable"):
        g.sum().backward()
    grad = torch.randn(2, 10, 10, dtype=torch.float64, requires_grad=True)
    out = torch.ops.exgramed.pair_scores_backward(grad, C.detach(), w1, w2, n1, n2, 0.5)
    with pytest.raises(RuntimeError, match="is not differentiable"):
        out[0].sum().backward()
