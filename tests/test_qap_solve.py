"""qap_solve / qap_objective: the reference against the definition, quality (brute force, planted, scipy FAQ),
partial matching, degenerate inputs, determinism and batch independence, errors, opcheck, compile, and the
lock-step driver of the CUDA kernel (qap_solve_lockstep)."""
import itertools

import numpy as np
import pytest
import torch

import exgramed_kernels as ek
from exgramed_kernels import reference
from exgramed_kernels.edge_pair_indicator import matching_of
from exgramed_kernels.testing import RTOL, devices, rel_err
from qap_problems import naive_objective, problem, rand_nbr

DEVICES = devices("qap_solve")


def all_perm_matrices(N):
    perms = torch.tensor(list(itertools.permutations(range(N))))
    P = torch.zeros(len(perms), N, N, dtype=torch.float64)
    P[torch.arange(len(perms))[:, None], torch.arange(N)[None], perms] = 1.0
    return P


def brute_force(U, n1, n2, Q=None, H1=None, H2=None):
    """max_P f(P) per problem over all N! permutations."""
    P = all_perm_matrices(U.shape[1])
    out = []
    for g in range(U.shape[0]):
        def rep(t):
            if t is None:
                return None
            t = t[g : g + 1]
            return (t.double() if t.is_floating_point() else t).expand(len(P), *t.shape[1:])

        vals = reference.qap_objective(P, rep(U), rep(n1), rep(n2), rep(Q), rep(H1), rep(H2))
        out.append(vals.max())
    return torch.stack(out)


def is_perm(Z, partial=False):
    z = Z.double()
    ok01 = bool(((z == 0) | (z == 1)).all())
    rs, cs = z.sum(-1), z.sum(-2)
    if partial:
        return ok01 and bool((rs <= 1).all() and (cs <= 1).all())
    return ok01 and bool((rs == 1).all() and (cs == 1).all())


# ---------------------------------------------------------------- oracle checks


def test_reference_objective_and_gradient_match_definition():
    gen = torch.Generator().manual_seed(0)
    U, n1, n2, Q = problem(2, 5, 2, gen, self_loops=True)
    X = torch.rand(2, 5, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    torch.testing.assert_close(reference.qap_objective(X.detach(), U, n1, n2, Q), naive_objective(X.detach(), U, n1, n2, Q))
    from exgramed_kernels.reference.qap_solve import quadratic_term

    quadratic_term(X, n1, n2, Q).sum().backward()
    torch.testing.assert_close(reference.qap_gradient(X.detach(), n1, n2, Q), X.grad)
    # implicit Q: <normalize(h_i - h_j), normalize(h_a - h_b)>, a zero edge vector normalising to 0
    H1 = torch.randn(2, 5, 3, dtype=torch.float64, generator=gen)
    H2 = torch.randn(2, 5, 3, dtype=torch.float64, generator=gen)
    H1[0, 1] = H1[0, int(n1[0, 1, 0])]  # a zero-length edge
    Qi = reference.implicit_q(H1, H2, n1, n2)
    g, i, s, a, t = 0, 3, 1, 2, 0
    v1 = H1[g, i] - H1[g, n1[g, i, s]]
    v2 = H2[g, a] - H2[g, n2[g, a, t]]
    expect = torch.dot(v1 / v1.norm(), v2 / v2.norm()) if v1.norm() > 0 and v2.norm() > 0 else 0.0
    torch.testing.assert_close(Qi[g, i * 2 + s, a * 2 + t], torch.as_tensor(expect, dtype=torch.float64))
    torch.testing.assert_close(Qi[0, 2], torch.zeros(10, dtype=torch.float64))  # edge 1*2+0 has length 0


# ---------------------------------------------------------------- quality


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["dense", "features"])
@pytest.mark.parametrize("method", ["fw", "sinkhorn"])
def test_brute_force_quality(device, form, method):
    """N <= 7: mean objective >= 0.99 of the optimum, never below 0.95 (U ~ N(0,1), Q dense
    Gaussian or from Gaussian features -- objectives of either sign, so ratios use f - f_min)."""
    ratios = []
    for N, k, seed in ((5, 2, 0), (6, 3, 1), (7, 3, 2), (7, 4, 3)):
        gen = torch.Generator().manual_seed(seed)
        U, n1, n2, Q = problem(6, N, k, gen)
        kw = {"Q": Q}
        if form == "features":
            kw = {"H1": torch.randn(6, N, 4, generator=gen, dtype=torch.float64),
                  "H2": torch.randn(6, N, 4, generator=gen, dtype=torch.float64)}
        best = brute_force(U, n1, n2, **kw)
        worst = -brute_force(-U, n1, n2, **{k_: (-v if k_ == "Q" else v) for k_, v in kw.items()}) if form == "dense" else None
        dev = {k_: v.to(device) for k_, v in kw.items()}
        Z, obj = ek.qap_solve(U.to(device), n1.to(device), n2.to(device), **dev, method=method)
        assert is_perm(Z)
        torch.testing.assert_close(obj.cpu(), reference.qap_objective(Z.cpu(), U, n1, n2, **kw), rtol=1e-12, atol=1e-12)
        assert bool((obj.cpu() <= best + 1e-9).all())
        if worst is None:  # features: the minimum is the brute-force minimum of f
            P = all_perm_matrices(N)
            worst = torch.stack([
                reference.qap_objective(P, U[g : g + 1].expand(len(P), N, N), n1[g : g + 1].expand(len(P), N, k),
                                        n2[g : g + 1].expand(len(P), N, k), None,
                                        kw["H1"][g : g + 1].expand(len(P), N, 4), kw["H2"][g : g + 1].expand(len(P), N, 4)).min()
                for g in range(6)])
        ratios.append((obj.cpu() - worst) / (best - worst))
    r = torch.cat(ratios)
    assert float(r.mean()) >= 0.99 and float(r.min()) >= 0.95, r


@pytest.mark.parametrize("device", DEVICES)
def test_brute_force_quality_positive_scores(device):
    """The same bar as a plain objective ratio, on positive scores (as the official costs)."""
    gen = torch.Generator().manual_seed(42)
    N, k, G = 7, 3, 8
    U = torch.rand(G, N, N, dtype=torch.float64, generator=gen)
    n1, n2 = rand_nbr(G, N, k, gen), rand_nbr(G, N, k, gen)
    Q = torch.rand(G, N * k, N * k, dtype=torch.float64, generator=gen)
    best = brute_force(U, n1, n2, Q)
    _, obj = ek.qap_solve(U.to(device), n1.to(device), n2.to(device), Q.to(device))
    r = obj.cpu() / best
    assert float(r.mean()) >= 0.99 and float(r.min()) >= 0.95, r


def planted(N, k, seed, noise=0.05, d=16):
    """Graph 2 is a relabelled noisy copy of graph 1: H2[pi(i)] = H1[i] + noise; kNN graphs of each."""
    gen = torch.Generator().manual_seed(seed)
    H1 = torch.randn(2, N, d, dtype=torch.float64, generator=gen)
    pi = torch.stack([torch.randperm(N, generator=gen) for _ in range(2)])
    H2 = torch.empty_like(H1)
    for g in range(2):
        H2[g, pi[g]] = H1[g] + noise * torch.randn(N, d, dtype=torch.float64, generator=gen)
    n1, n2 = ek.knn_graph(H1, k), ek.knn_graph(H2, k)
    h1, h2 = torch.nn.functional.normalize(H1, dim=-1), torch.nn.functional.normalize(H2, dim=-1)
    U = h1 @ h2.transpose(1, 2)
    T = torch.zeros(2, N, N, dtype=torch.float64)
    T[torch.arange(2)[:, None], torch.arange(N)[None], pi] = 1.0
    return U, n1, n2, H1, H2, T


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [16, 64, 256])
def test_planted_recovered(device, N):
    U, n1, n2, H1, H2, T = planted(N, 5, N)
    d = lambda t: t.to(device)  # noqa: E731
    # Unaries alone do not identify the matching (heavily noised); the edges do.
    Un = U + 0.6 * torch.randn(U.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(reference.linear_assignment(Un).cpu(), T.argmax(-1))
    Z, obj = ek.qap_solve(d(Un), d(n1), d(n2), H1=d(H1), H2=d(H2))
    assert torch.equal(Z.cpu(), T)
    if N <= 64:  # the same through an explicit dense Q
        Q = reference.implicit_q(H1, H2, n1, n2)
        Zq, _ = ek.qap_solve(d(Un), d(n1), d(n2), d(Q))
        assert torch.equal(Zq.cpu(), T)


@pytest.mark.parametrize("N", [16, 32, 64])
def test_koopmans_beckmann_vs_scipy_faq(N):
    """U = 0, Q[e, f] = A_e B_f: f(P) = trace(A^T P B P^T); ours >= 0.99 of scipy FAQ."""
    from scipy.optimize import quadratic_assignment

    gen = torch.Generator().manual_seed(N)
    G, k = 3, 5
    pts1, pts2 = torch.randn(G, N, 2, generator=gen, dtype=torch.float64), torch.randn(G, N, 2, generator=gen, dtype=torch.float64)
    n1, n2 = ek.knn_graph(pts1, k), ek.knn_graph(pts2, k)
    w1 = torch.rand(G, N * k, dtype=torch.float64, generator=gen)
    w2 = torch.rand(G, N * k, dtype=torch.float64, generator=gen)
    Q = w1[:, :, None] * w2[:, None, :]
    _, obj = ek.qap_solve(torch.zeros(G, N, N, dtype=torch.float64), n1, n2, Q)
    for g in range(G):
        A = np.zeros((N, N))
        B = np.zeros((N, N))
        A[np.repeat(np.arange(N), k), n1[g].reshape(-1).numpy()] = w1[g].numpy()
        B[np.repeat(np.arange(N), k), n2[g].reshape(-1).numpy()] = w2[g].numpy()
        faq = quadratic_assignment(A, B, method="faq", options={"maximize": True, "rng": np.random.default_rng(0)})
        assert float(obj[g]) >= 0.99 * faq.fun, (float(obj[g]), faq.fun)


def test_reference_solver_brute_force():
    gen = torch.Generator().manual_seed(9)
    U, n1, n2, Q = problem(2, 5, 2, gen)
    Z, obj = reference.qap_solve(U, n1, n2, Q, restarts=6)
    assert is_perm(Z)
    torch.testing.assert_close(obj, brute_force(U, n1, n2, Q))
    Zs, objs = reference.qap_solve(U, n1, n2, Q, method="sinkhorn", restarts=6)
    assert is_perm(Zs) and float((objs / brute_force(U, n1, n2, Q)).min()) >= 0.95


# ---------------------------------------------------------------- partial matching


def brute_force_partial(U, n1, n2, Q):
    """max over partial permutations (N <= 4): every injective partial map."""
    G, N, _ = U.shape
    mats = []
    for cols in itertools.product(range(-1, N), repeat=N):
        used = [c for c in cols if c >= 0]
        if len(used) != len(set(used)):
            continue
        P = torch.zeros(N, N, dtype=torch.float64)
        for i, c in enumerate(cols):
            if c >= 0:
                P[i, c] = 1
        mats.append(P)
    P = torch.stack(mats)
    return torch.stack([reference.qap_objective(P, U[g : g + 1].expand(len(P), N, N), n1[g : g + 1].expand(len(P), *n1.shape[1:]),
                                                n2[g : g + 1].expand(len(P), *n2.shape[1:]), Q[g : g + 1].expand(len(P), *Q.shape[1:])).max()
                        for g in range(G)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["fw", "sinkhorn"])
def test_partial(device, method):
    gen = torch.Generator().manual_seed(4)
    U, n1, n2, Q = problem(6, 4, 2, gen)
    U = U - 0.8  # many pairs are better left unmatched
    d = lambda t: t.to(device)  # noqa: E731
    Z, obj = ek.qap_solve(d(U), d(n1), d(n2), d(Q), partial=True, method=method)
    assert is_perm(Z, partial=True) and not is_perm(Z)
    torch.testing.assert_close(obj.cpu(), reference.qap_objective(Z.cpu(), U, n1, n2, Q))
    best = brute_force_partial(U, n1, n2, Q)
    assert bool((obj.cpu() <= best + 1e-9).all())
    assert float((obj.cpu() / best).min()) >= 0.95
    # partial can only be at least as good as full matching; all-negative scores leave everything unmatched
    _, full = ek.qap_solve(d(U), d(n1), d(n2), d(Q), method=method)
    assert bool((obj >= full - 1e-9).all())
    Zn, objn = ek.qap_solve(d(-U.abs() - 1), d(n1), d(n2), d(-Q.abs()), partial=True, method=method)
    assert float(Zn.abs().sum()) == 0 and float(objn.abs().sum()) == 0


def two_opt_neighbours(perm, N, partial):
    """Every matching one 2-opt move from ``perm`` ([N] columns, -1 unmatched): two rows swap their columns
    (an unmatched row takes the other's); with ``partial`` also a row left unmatched or moved to a free column."""
    out = []
    for i in range(N):
        for j in range(i + 1, N):
            if perm[i] != perm[j]:
                q = list(perm)
                q[i], q[j] = q[j], q[i]
                out.append(q)
    if partial:
        free = sorted(set(range(N)) - set(perm))
        for i in range(N):
            if perm[i] >= 0:
                out.append(perm[:i] + [-1] + perm[i + 1:])
            out += [perm[:i] + [a] + perm[i + 1:] for a in free]
    return out


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_result_is_two_opt_optimal(partial, ties):
    """The CPU solver ends in 2-opt: no single swap of two rows' columns (nor, with partial, unmatching a row or
    moving it to a free column) improves the objective of what it returns."""
    gen = torch.Generator().manual_seed(11)
    for N, k in ((6, 2), (13, 3), (24, 4)):
        U, n1, n2, Q = problem(3, N, k, gen)
        if ties:  # few distinct values: many equal deltas
            U, Q = (U * 2).round() / 2, (Q * 2).round() / 4
        if partial:
            U = U - 0.5
        Z, obj = ek.qap_solve(U, n1, n2, Q, partial=partial, restarts=1, max_iter=3)
        for g in range(3):
            perm = [int(c) if Z[g, i].any() else -1 for i, c in enumerate(Z[g].argmax(-1))]
            nb = two_opt_neighbours(perm, N, partial)
            Zs = torch.zeros(len(nb), N, N, dtype=torch.float64)
            for r, q in enumerate(nb):
                for i, c in enumerate(q):
                    if c >= 0:
                        Zs[r, i, c] = 1.0
            rep = lambda t: t[g:g + 1].expand(len(nb), *t.shape[1:])  # noqa: E731
            f = reference.qap_objective(Zs, rep(U), rep(n1), rep(n2), rep(Q))
            assert float(f.max()) <= float(obj[g]) + 1e-9 * max(1.0, abs(float(obj[g]))), (N, g)


# ---------------------------------------------------------------- degenerate inputs, determinism


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [1, 2, 3])
def test_degenerate(device, N):
    d = lambda t: t.to(device)  # noqa: E731
    k = min(1, N - 1)
    gen = torch.Generator().manual_seed(N)
    n = rand_nbr(2, N, k, gen) if k else torch.zeros(2, N, 0, dtype=torch.long)
    # all-equal scores
    Z, obj = ek.qap_solve(d(torch.ones(2, N, N)), d(n), d(n), d(torch.ones(2, N * k, N * k)))
    assert is_perm(Z)
    # zero edges (k = 0), Q given as an empty table: the linear assignment of U
    U = torch.rand(2, N, N, dtype=torch.float64, generator=gen)
    e = torch.zeros(2, N, 0, dtype=torch.long)
    Z0, obj0 = ek.qap_solve(d(U), d(e), d(e), d(torch.zeros(2, 0, 0, dtype=torch.float64)))
    cols = ek.linear_assignment(U)
    assert torch.equal(Z0.argmax(-1).cpu(), cols) and is_perm(Z0)
    torch.testing.assert_close(obj0.cpu(), torch.gather(U, 2, cols[..., None]).sum((1, 2)))
    # no quadratic term at all
    Z1, _ = ek.qap_solve(d(U), d(n), d(n))
    assert torch.equal(Z1.argmax(-1).cpu(), cols)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    z = torch.zeros(0, 4, 4, device=device)
    n = torch.zeros(0, 4, 2, dtype=torch.long, device=device)
    Z, obj = ek.qap_solve(z, n, n, torch.zeros(0, 8, 8, device=device))
    assert Z.shape == (0, 4, 4) and obj.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(device, dtype):
    gen = torch.Generator().manual_seed(8)
    U, n1, n2, Q = problem(3, 9, 3, gen)
    Z, obj = ek.qap_solve(U.to(device, dtype), n1.to(device), n2.to(device), Q.to(device, dtype))
    assert Z.dtype == dtype and obj.dtype == dtype and is_perm(Z)
    expect = reference.qap_objective(Z.cpu().double(), U.to(dtype).double(), n1, n2, Q.to(dtype).double())
    torch.testing.assert_close(obj.cpu().double(), expect, rtol=RTOL[dtype], atol=0)


def test_deterministic_and_seeded():
    gen = torch.Generator().manual_seed(12)
    U, n1, n2, Q = problem(5, 12, 3, gen)
    a = ek.qap_solve(U, n1, n2, Q, restarts=6)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b = ek.qap_solve(U, n1, n2, Q, restarts=6)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for g in range(5):  # independent of the rest of the batch
        c = ek.qap_solve(U[g : g + 1], n1[g : g + 1], n2[g : g + 1], Q[g : g + 1], restarts=6)
        assert torch.equal(c[0][0], a[0][g])
    # more restarts never hurt (the starts of fewer are a prefix)
    more = ek.qap_solve(U, n1, n2, Q, restarts=12)
    assert bool((more[1] >= a[1]).all())


@pytest.mark.parametrize("op", ["qap_solve", "qap_solve_lockstep"])
@pytest.mark.parametrize("method", ["fw", "sinkhorn"])
@pytest.mark.parametrize("form", ["dense", "features"])
def test_answer_depends_on_the_problem_only(op, method, form):
    """A problem solved alone and as the middle of [B, A, C] gives bit-identical matchings and objectives, at 1 and
    at 2 threads: the random starts are keyed by (seed, start), not by the problem's position in the batch."""
    gen = torch.Generator().manual_seed(21)
    U, n1, n2, Q = problem(3, 10, 3, gen)
    H = torch.randn(3, 10, 4, generator=gen, dtype=torch.float64)
    kw = dict(Q=Q) if form == "dense" else dict(H1=H, H2=H.roll(1, 0))
    solve = getattr(torch.ops.exgramed, op)
    order = [1, 0, 2]  # A = problem 0 in the middle

    def run(rows, threads):
        n = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            sub = {key: v[rows] for key, v in kw.items()}
            return solve(U[rows], n1[rows], n2[rows], **sub, method=method, restarts=6, seed=5)
        finally:
            torch.set_num_threads(n)

    alone = run([0], 1)
    for threads in (1, 2):
        Z, obj = run(order, threads)
        assert torch.equal(Z[1], alone[0][0]) and torch.equal(obj[1], alone[1][0])
    assert not torch.equal(run([0], 1)[0], run([1], 1)[0])  # the problems differ


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("device", DEVICES)
def test_errors(device):
    gen = torch.Generator().manual_seed(0)
    U, n1, n2, Q = (t.to(device) for t in problem(2, 5, 2, gen))
    H = torch.randn(2, 5, 3, device=device)
    cases = [
        (dict(U=U[:, :, :4]), r"U must have shape \[G, N, N\]"),
        (dict(U=U.long()), "U must be a floating-point"),
        (dict(nbr1=n1[:, :4]), r"nbr1 must have shape \[G, N, k\]"),
        (dict(nbr2=n2.int()), "nbr2 must be an int64"),
        (dict(nbr2=n2[:, :, :1]), "nbr1 and nbr2 must have the same shape"),
        (dict(nbr1=n1 + 5), r"nbr1 entries must lie in \[0, 5\)"),
        (dict(nbr2=n2 - 9), r"nbr2 entries must lie in \[0, 5\)"),
        (dict(Q=Q[:, :9]), r"Q must have shape \[G, N\*k, N\*k\]"),
        (dict(H1=H, H2=H), "either Q or"),
        (dict(Q=None, H1=H), "H1 and H2 must be given together"),
        (dict(Q=None, H1=H, H2=H[..., :2]), "same feature size"),
        (dict(method="lpmp"), "method must be 'fw' or 'sinkhorn'"),
        (dict(estimator="sfe"), "estimator must be 'imle', 'blackbox' or 'imle_symmetric'"),
        (dict(lambda_=0.0), "lambda_ must be a positive finite number"),
        (dict(lambda_=float("inf")), "lambda_ must be a positive finite number"),
        (dict(lambda_=float("nan")), "lambda_ must be a positive finite number"),
        (dict(max_iter=0), "max_iter must be >= 1"),
        (dict(restarts=0), r"restarts must be in \[1, 65536\]"),
        (dict(restarts=-2), r"restarts must be in \[1, 65536\]"),
        (dict(restarts=2**40), r"restarts must be in \[1, 65536\]"),  # was std::bad_alloc
        (dict(tol=-1.0), "tol must be >= 0"),
    ]
    for bad in ("U", "Q"):
        t = dict(U=U, Q=Q)[bad].clone()
        t.view(-1)[3] = float("nan")
        cases.append(({bad: t}, f"{bad} contains NaN or Inf"))
    Hi = H.clone()
    Hi[0, 0, 0] = float("inf")
    cases.append((dict(Q=None, H1=Hi, H2=H), "H1 contains NaN or Inf"))
    # Finite features whose implicit Q overflows float32 (a silently wrong matching before): named.
    cases.append((dict(Q=None, H1=H, H2=H * 1e20), "H2 has entries up to .* the implicit Q's squared norms overflow "
                                                    "float32: scale H2 down"))
    cases.append((dict(Q=None, H1=H.double() * 1e160, H2=H), "H1 has entries up to .* overflow float64"))
    for over, msg in cases:
        kw = dict(U=U, nbr1=n1, nbr2=n2, Q=Q)
        kw.update(over)
        with pytest.raises(RuntimeError, match=msg):
            ek.qap_solve(**kw)


# ---------------------------------------------------------------- opcheck, compile


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    gen = torch.Generator().manual_seed(1)
    U, n1, n2, Q = (t.to(device) for t in problem(2, 6, 2, gen, dtype=torch.float32))
    H = torch.randn(2, 6, 3, device=device)
    op = torch.ops.exgramed.qap_solve.default
    torch.library.opcheck(op, (U, n1, n2, Q), {"restarts": 3})
    torch.library.opcheck(op, (U, n1, n2), {"H1": H, "H2": H + 1, "method": "sinkhorn", "partial": True, "restarts": 2})


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    gen = torch.Generator().manual_seed(2)
    U, n1, n2, Q = (t.to(device) for t in problem(3, 8, 2, gen, dtype=torch.float32))

    @torch.compile(fullgraph=True)
    def f(U, Q):
        Z, obj = ek.qap_solve(U * 1.0, n1, n2, Q, restarts=4)
        return (Z * U).sum((1, 2)), obj * 2

    lin, obj2 = f(U, Q)
    Z, obj = ek.qap_solve(U, n1, n2, Q, restarts=4)
    torch.testing.assert_close(lin, (Z * U).sum((1, 2)))
    torch.testing.assert_close(obj2, obj * 2)


# ---------------------------------------------------------------- the batched (CUDA) driver on the CPU


@pytest.mark.parametrize("method", ["fw", "sinkhorn"])
@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("form", ["dense", "features"])
def test_batched_driver_matches_per_start_solver(method, partial, form):
    """qap_solve_lockstep runs every start in lock-step with masks (the CUDA kernel's driver); with the
    CPU hooks Frank-Wolfe must reach the same objective as the per-start CPU solver."""
    for N, k, seed in ((5, 2, 0), (7, 3, 1), (12, 3, 2)):
        gen = torch.Generator().manual_seed(seed)
        U, n1, n2, Q = problem(4, N, k, gen)
        kw = {"Q": Q} if form == "dense" else {"H1": torch.randn(4, N, 3, generator=gen, dtype=torch.float64),
                                              "H2": torch.randn(4, N, 3, generator=gen, dtype=torch.float64)}
        Zb, objb = torch.ops.exgramed.qap_solve_lockstep(U, n1, n2, **kw, method=method, partial=partial, restarts=5)
        _, obj = ek.qap_solve(U, n1, n2, **kw, method=method, partial=partial, restarts=5)
        assert is_perm(Zb, partial)
        torch.testing.assert_close(objb, reference.qap_objective(Zb, U, n1, n2, **kw))
        if method == "fw":
            torch.testing.assert_close(objb, obj, rtol=1e-9, atol=1e-9)
        else:  # annealing at low temperature amplifies summation-order differences; compare quality
            assert float(((objb - obj).abs() / obj.abs().clamp_min(1)).max()) <= 0.05


def test_batched_driver_planted_and_degenerate():
    U, n1, n2, H1, H2, T = planted(64, 5, 64)
    Un = U + 0.6 * torch.randn(U.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    Z, _ = torch.ops.exgramed.qap_solve_lockstep(Un, n1, n2, H1=H1, H2=H2)
    assert torch.equal(Z, T)
    e = torch.zeros(2, 3, 0, dtype=torch.long)
    U3 = torch.rand(2, 3, 3, dtype=torch.float64)
    Z0, _ = torch.ops.exgramed.qap_solve_lockstep(U3, e, e)
    assert torch.equal(Z0.argmax(-1), ek.linear_assignment(U3))
    one = torch.zeros(1, 1, 1)
    assert float(torch.ops.exgramed.qap_solve_lockstep(one, torch.zeros(1, 1, 0, dtype=torch.long),
                                                      torch.zeros(1, 1, 0, dtype=torch.long))[0]) == 1.0
    torch.library.opcheck(torch.ops.exgramed.qap_solve_lockstep.default,
                          (U3.float(), n1[:, :3, :0], n1[:, :3, :0]), {"restarts": 2})


def test_reference_fallback_without_extension():
    """With EXGRAMED_NO_EXTENSION=1 the ops are served by the references (same contract, same checks)."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, warnings; warnings.simplefilter('ignore');"
        "import exgramed_kernels as ek; assert not ek.HAS_EXTENSION;"
        "g = torch.Generator().manual_seed(0);"
        "U = torch.rand(2, 4, 4, dtype=torch.float64, generator=g);"
        "n = torch.tensor([[[1], [2], [3], [0]]] * 2);"
        "Q = torch.rand(2, 4, 4, dtype=torch.float64, generator=g);"
        "Z, obj = ek.qap_solve(U, n, n, Q, restarts=3);"
        "assert Z.sum().item() == 8 and torch.allclose(obj, ek.qap_objective(Z, U, n, n, Q));"
        "c = ek.linear_assignment(U); assert sorted(c[0].tolist()) == [0, 1, 2, 3];"
        "g2 = ek.qap_gradient(U, n, n, Q); assert g2.shape == U.shape;"
        "bad = U.clone(); bad[0, 0, 0] = float('nan');\n"
        "try:\n    ek.qap_solve(bad, n, n, Q)\nexcept RuntimeError as e:\n    assert 'U contains NaN or Inf' in str(e)\n"
        "else:\n    raise SystemExit('no error')\n"
    )
    env = dict(os.environ, EXGRAMED_NO_EXTENSION="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------- warm starts (init)


def random_matching(G, N, gen, partial):
    out = torch.stack([torch.randperm(N, generator=gen) for _ in range(G)])
    if partial:  # leave a few rows unmatched
        out[:, ::3] = -1
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("partial", [False, True])
def test_init_warm_start(device, partial):
    """init replaces start 0: the result is never worse than init, on every solver (kernel, batched
    driver, reference), and a start at a good solution keeps it."""
    for N, k, seed in ((6, 2, 0), (11, 3, 1), (24, 4, 2)):
        gen = torch.Generator().manual_seed(seed)
        U, n1, n2, Q = problem(3, N, k, gen)
        init = random_matching(3, N, gen, partial)
        Z_init = torch.zeros(3, N, N, dtype=torch.float64).scatter_(2, init.clamp_min(0).unsqueeze(2),
                                                                    (init >= 0).double().unsqueeze(2))
        f_init = reference.qap_objective(Z_init, U, n1, n2, Q)
        d = lambda t: t.to(device)  # noqa: E731
        for restarts in (1, 3):
            Z, obj = ek.qap_solve(d(U), d(n1), d(n2), d(Q), restarts=restarts, partial=partial, init=d(init))
            assert is_perm(Z.cpu(), partial)
            assert bool((obj.cpu() >= f_init - 1e-9).all())
            # The reference follows the same rules (its gradients are recomputed, not updated by
            # linearity, so paths may part): never worse than init, and close in quality.
            Zr, objr = reference.qap_solve(U, n1, n2, Q, restarts=restarts, partial=partial, init=init)
            assert is_perm(Zr, partial) and bool((objr >= f_init - 1e-9).all())
            assert float(((obj.cpu() - objr) / objr.abs().clamp_min(1)).min()) > -0.1
            # The batched (CUDA) driver runs the same Frank-Wolfe: the same objective.
            Zb, objb = torch.ops.exgramed.qap_solve_lockstep(U, n1, n2, Q, restarts=restarts, partial=partial,
                                                            init=init)
            if device == "cpu":
                torch.testing.assert_close(objb, obj, rtol=1e-9, atol=1e-9)
        # A start at the optimum stays there.
        Zs, objs = ek.qap_solve(d(U), d(n1), d(n2), d(Q), restarts=4, partial=partial)
        again, obj_again = ek.qap_solve(d(U), d(n1), d(n2), d(Q), restarts=1, partial=partial,
                                        init=matching_of(Zs))
        assert bool((obj_again >= objs - 1e-9).all())


@pytest.mark.parametrize("device", DEVICES)
def test_implicit_q_at_large_scale(device):
    """Q does not depend on the features' scale: up to the float32 limit of the check above, the same matching."""
    gen = torch.Generator().manual_seed(7)
    U, n1, n2, _ = (t.to(device) for t in problem(2, 7, 2, gen, dtype=torch.float32))
    H1, H2 = torch.randn(2, 7, 4, generator=gen).to(device), torch.randn(2, 7, 4, generator=gen).to(device)
    Z, _ = ek.qap_solve(U, n1, n2, None, H1, H2, restarts=2)
    Zs, _ = ek.qap_solve(U, n1, n2, None, H1 * 2.0 ** 60, H2 * 2.0 ** -40, restarts=2)
    assert torch.equal(Z, Zs)


def test_init_errors():
    gen = torch.Generator().manual_seed(3)
    U, n1, n2, Q = problem(2, 5, 2, gen)
    good = torch.stack([torch.randperm(5, generator=gen) for _ in range(2)])
    dup = good.clone()
    dup[0, 1] = dup[0, 0]
    unmatched = good.clone()
    unmatched[1, 2] = -1
    cases = [
        (good.int(), False, "init must be an int64"),
        (good[:, :4], False, r"init must have shape \[G, N\]"),
        (good + 1, False, r"init entries must lie in \[0, 5\)"),
        (unmatched, False, "needs partial=True"),
        (unmatched - 1, True, r"init entries must lie in \[0, 5\) or be -1"),
        (dup, False, "a column appears twice"),
    ]
    for init, partial, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            ek.qap_solve(U, n1, n2, Q, partial=partial, init=init)
    ek.qap_solve(U, n1, n2, Q, partial=True, init=unmatched)  # -1 is fine with partial
    torch.library.opcheck(torch.ops.exgramed.qap_solve.default, (U.float(), n1, n2, Q.float()),
                          {"restarts": 2, "init": good})
