"""Bad inputs to every public op raise a Python exception whose message names the argument, eagerly and
through ``torch.compile(fullgraph=True)`` of a tiny wrapper, and never abort the process.

One table of cases per op. Each table runs in a child process (``python tests/test_bad_inputs.py <op>``), so
that an abort (a C++ exception or assertion escaping where it must not) fails the test with the case it died
in instead of taking pytest down.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import exgramed_kernels as ek
from exgramed_kernels.testing import has_kernel

NAN, INF = float("nan"), float("inf")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _set(t: torch.Tensor, value: float) -> torch.Tensor:
    """A copy of t with one entry set to value."""
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    return t


def _nbr(G, N, k, seed=0):
    g = _gen(seed)
    return torch.stack([torch.stack([(torch.randperm(N - 1, generator=g)[:k] + i + 1) % N for i in range(N)])
                        for _ in range(G)])


# A case: (name, function of the tensors, the tensors, regex the message must match). The tensors are the
# compiled wrapper's inputs (their values reach the kernels only at run time); everything else is a constant
# of the function.


def knn_graph_cases():
    x = torch.randn(2, 6, 3, generator=_gen())
    f = ek.knn_graph
    return [
        ("x 2-d", lambda x: f(x, 2), (x[0],), r"knn_graph: x must have shape \[G, N, d\]"),
        ("x int", lambda x: f(x, 2), (x.long(),), "knn_graph: x must be a floating-point"),
        ("k = 0", lambda x: f(x, 0), (x,), "knn_graph: k must satisfy 1 <= k < N"),
        ("k = N", lambda x: f(x, 6), (x,), "knn_graph: k must satisfy 1 <= k < N"),
        ("N = 1", lambda x: f(x, 1), (x[:, :1],), r"knn_graph: x must have at least 2 nodes"),
        ("d = 0", lambda x: f(x, 2), (x[..., :0],), r"knn_graph: x must have at least one feature"),
        ("metric", lambda x: f(x, 2, "manhattan"), (x,), "knn_graph: metric must be 'l2' or 'cosine'"),
        ("x NaN", lambda x: f(x, 2), (_set(x, NAN),), "knn_graph: x contains NaN or Inf"),
        ("x Inf cosine", lambda x: f(x, 2, "cosine"), (_set(x, -INF),), "knn_graph: x contains NaN or Inf"),
    ]


def graph_conv_cases():
    g = _gen(1)
    x, nbr = torch.randn(2, 6, 3, generator=g), _nbr(2, 6, 2)
    wr, wl, b = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(4, generator=g)

    def f(x, nbr, wr, wl, b, aggr="max"):
        return ek.graph_conv(x, nbr, wr, wl, b, aggr=aggr)

    return [
        ("x 2-d", f, (x[0], nbr, wr, wl, b), r"graph_conv: x must have shape \[G, N, d\]"),
        ("nbr int32", f, (x, nbr.int(), wr, wl, b), "graph_conv: nbr must be an int64"),
        ("nbr shape", f, (x, nbr[:1], wr, wl, b), r"graph_conv: nbr must have shape \[G, N, k\]"),
        ("nbr range", f, (x, nbr + 6, wr, wl, b), r"graph_conv: nbr entries must lie in \[0, N\)"),
        ("nbr negative", f, (x, nbr - 6, wr, wl, b), r"graph_conv: nbr entries must lie in \[0, N\)"),
        ("w_root shape", f, (x, nbr, wr[:2], wl, b), r"graph_conv: w_root must have shape \[d, h\]"),
        ("w_rel shape", f, (x, nbr, wr, wl[:, :3], b), "graph_conv: w_rel must have the shape of w_root"),
        ("w_rel dtype", f, (x, nbr, wr, wl.double(), b), "graph_conv: w_rel must have the dtype of x"),
        ("bias shape", f, (x, nbr, wr, wl, b[:3]), r"graph_conv: bias must have shape \[h\]"),
        ("aggr", lambda *t: f(*t, aggr="min"), (x, nbr, wr, wl, b), "graph_conv: aggr must be one of"),
        ("x NaN", f, (_set(x, NAN), nbr, wr, wl, b), "graph_conv: x contains NaN or Inf"),
    ]


def linear_assignment_cases():
    s = torch.randn(2, 5, 5, generator=_gen(2))
    f = ek.linear_assignment
    return [
        ("score 2-d", f, (s[0],), r"linear_assignment: score must have shape \[G, N, N\]"),
        ("score not square", f, (s[:, :4],), "linear_assignment: score must be square"),
        ("score int", f, (s.long(),), "linear_assignment: score must be a floating-point"),
        ("score NaN", f, (_set(s, NAN),), "linear_assignment: score contains NaN or Inf"),
        ("score Inf", f, (_set(s, INF),), "linear_assignment: score contains NaN or Inf"),
    ]


def _qap_problem(G=2, N=6, k=2, seed=3):
    g = _gen(seed)
    U = torch.randn(G, N, N, generator=g)
    Q = torch.randn(G, N * k, N * k, generator=g)
    return U, _nbr(G, N, k, seed), _nbr(G, N, k, seed + 1), Q


def qap_solve_cases():
    U, n1, n2, Q = _qap_problem()
    H = torch.randn(2, 6, 3, generator=_gen(4))

    def f(U, n1, n2, Q, **kw):
        return ek.qap_solve(U, n1, n2, Q, **{"restarts": 2, "max_iter": 5, **kw})

    def opt(**kw):
        return lambda *t: f(*t, **kw)

    args = (U, n1, n2, Q)
    return [
        ("U shape", f, (U[:, :5], n1, n2, Q), r"qap_solve: U must have shape \[G, N, N\]"),
        ("U int", f, (U.long(), n1, n2, Q), "qap_solve: U must be a floating-point"),
        ("nbr1 shape", f, (U, n1[:, :5], n2, Q), r"qap_solve: nbr1 must have shape \[G, N, k\]"),
        ("nbr2 int32", f, (U, n1, n2.int(), Q), "qap_solve: nbr2 must be an int64"),
        ("nbr1 range", f, (U, n1 + 6, n2, Q), r"qap_solve: nbr1 entries must lie in \[0, 6\)"),
        ("nbr2 range", f, (U, n1, n2 - 7, Q), r"qap_solve: nbr2 entries must lie in \[0, 6\)"),
        ("Q shape", f, (U, n1, n2, Q[:, :11]), r"qap_solve: Q must have shape \[G, N\*k, N\*k\]"),
        ("U NaN", f, (_set(U, NAN), n1, n2, Q), "qap_solve: U contains NaN or Inf"),
        ("Q Inf", f, (U, n1, n2, _set(Q, INF)), "qap_solve: Q contains NaN or Inf"),
        ("H1 Inf", lambda U, n1, n2, H1, H2: ek.qap_solve(U, n1, n2, None, H1, H2, restarts=2),
         (U, n1, n2, _set(H, INF), H), "qap_solve: H1 contains NaN or Inf"),
        ("H1 huge", lambda U, n1, n2, H1, H2: ek.qap_solve(U, n1, n2, None, H1, H2, restarts=2),
         (U, n1, n2, H * 1e20, H), "qap_solve: H1 has entries up to .*: scale H1 down"),
        ("H2 without H1", lambda U, n1, n2, H2: ek.qap_solve(U, n1, n2, None, None, H2),
         (U, n1, n2, H), "qap_solve: H1 and H2 must be given together"),
        ("method", opt(method="lpmp"), args, "qap_solve: method must be 'fw' or 'sinkhorn'"),
        ("estimator", opt(estimator="sfe"), args, "qap_solve: estimator must be"),
        ("lambda_ = 0", opt(lambda_=0.0), args, "qap_solve: lambda_ must be a positive finite number"),
        ("lambda_ = inf", opt(lambda_=INF), args, "qap_solve: lambda_ must be a positive finite number"),
        ("max_iter = 0", opt(max_iter=0), args, "qap_solve: max_iter must be >= 1"),
        ("tol < 0", opt(tol=-1.0), args, "qap_solve: tol must be >= 0"),
        ("restarts = 0", opt(restarts=0), args, r"qap_solve: restarts must be in \[1, 65536\]"),
        ("restarts = 2^40", opt(restarts=2**40), args, r"qap_solve: restarts must be in \[1, 65536\]"),
        ("init range", lambda U, n1, n2, Q, init: f(U, n1, n2, Q, init=init),
         (U, n1, n2, Q, torch.arange(6).repeat(2, 1) + 1), r"qap_solve: init entries must lie in \[0, 6\)"),
        ("init repeats", lambda U, n1, n2, Q, init: f(U, n1, n2, Q, init=init),
         (U, n1, n2, Q, torch.zeros(2, 6, dtype=torch.long)), "qap_solve: every row of init must be a"),
    ]


def qap_gradient_cases():
    U, n1, n2, Q = _qap_problem(seed=5)
    X = torch.softmax(U, -1)
    f = ek.qap_gradient
    return [
        ("X shape", f, (X[:, :5], n1, n2, Q), r"qap_gradient: X must have shape \[G, N, N\]"),
        ("nbr1 shape", f, (X, n1[:1], n2, Q), "qap_gradient: nbr1 must be int64"),
        ("nbr2 k", f, (X, n1, n2[..., :1], Q), "qap_gradient: nbr1 and nbr2 must have the same k"),
        ("nbr2 range", f, (X, n1, n2 + 6, Q), r"qap_gradient: nbr2 entries must lie in \[0, 6\)"),
        ("Q shape", f, (X, n1, n2, Q[:, 1:]), r"qap_gradient: Q must have shape \[G, N\*k, N\*k\]"),
        ("Q int", f, (X, n1, n2, Q.long()), "qap_gradient: Q must be a floating-point"),
    ]


def _pair_inputs(P=2, N=5, k=2, seed=6):
    g = _gen(seed)
    C = torch.randn(P, N, N, generator=g)
    w1, w2 = torch.rand(P, N * k, generator=g) + 0.1, torch.rand(P, N * k, generator=g) + 0.1
    return C, w1, w2, _nbr(P, N, k, seed), _nbr(P, N, k, seed + 1)


def pair_scores_cases():
    C, w1, w2, n1, n2 = _pair_inputs()
    noise = torch.randn(2, 10, 10, generator=_gen(7))
    args = (C, w1, w2, n1, n2)

    def f(C, w1, w2, n1, n2, noise=None, seed=None):
        return ek.pair_scores(C, w1, w2, n1, n2, 0.5, -0.25, noise, 0.3, seed)

    return [
        ("C shape", f, (C[:, :4], w1, w2, n1, n2), r"pair_scores: C must have shape \[P, N, N\]"),
        ("C int", f, (C.long(), w1, w2, n1, n2), "pair_scores: C must be a floating-point"),
        ("w1 shape", f, (C, w1[:, :3], w2, n1, n2), r"pair_scores: w1 must have shape \[P, N\*k\]"),
        ("w2 dtype", f, (C, w1, w2.double(), n1, n2), "pair_scores: w2 must have C's dtype"),
        ("nbr1 range", f, (C, w1, w2, n1 + 5, n2), r"pair_scores: nbr1 entries must lie in \[0, 5\)"),
        ("nbr2 int32", f, (C, w1, w2, n1, n2.int()), "pair_scores: nbr2 must be int64"),
        ("noise shape", f, (*args, noise[:, :9]), r"pair_scores: noise must have shape \[P, N\*k, N\*k\]"),
        ("noise_seed shape", lambda *t: f(*t[:5], None, t[5]), (*args, torch.tensor([1, 2, 3])),
         r"pair_scores: noise_seed must be an int64 tensor of shape \[P\]"),
        ("C NaN", f, (_set(C, NAN), w1, w2, n1, n2), "pair_scores: C contains NaN or Inf"),
        ("w1 Inf", f, (C, _set(w1, INF), w2, n1, n2), "pair_scores: w1 contains NaN or Inf"),
        ("w2 NaN", f, (C, w1, _set(w2, NAN), n1, n2), "pair_scores: w2 contains NaN or Inf"),
        ("noise NaN", f, (*args, _set(noise, NAN)), "pair_scores: noise contains NaN or Inf"),
    ]


def pair_scores_backward_sparse_cases():
    C, w1, w2, n1, n2 = _pair_inputs(seed=8)
    idx = torch.tensor([[0, 1, 1], [2, 3, 9], [4, 0, 9]])
    val = torch.tensor([1.0, -2.0, 0.5])

    def f(idx, val, C, w1, w2, n1, n2):
        return ek.pair_scores_backward_sparse(idx, val, C, w1, w2, n1, n2, 0.5)

    return [
        ("indices shape", f, (idx[:2], val, C, w1, w2, n1, n2), r"indices must be int64 \[3, nnz\]"),
        ("values shape", f, (idx, val[:2], C, w1, w2, n1, n2), r"values must .*shape \[nnz\]"),
        ("values NaN", f, (idx, _set(val, NAN), C, w1, w2, n1, n2), "values contains NaN or Inf"),
        ("indices range", f, (idx + 1, val, C, w1, w2, n1, n2), "pair_scores_backward_sparse: ind(ex|ices)"),
        ("w1 shape", f, (idx, val, C, w1[:, :3], w2, n1, n2), r"pair_scores_backward_sparse: w1 must have shape"),
    ]


def edge_sq_norms_cases():
    h, nbr = torch.randn(2, 6, 4, generator=_gen(9)), _nbr(2, 6, 3)
    f = ek.edge_sq_norms
    return [
        ("h 2-d", f, (h[0], nbr), r"edge_sq_norms: h must have shape \[G, N, h\]"),
        ("h int", f, (h.long(), nbr), "edge_sq_norms: h must be a floating-point"),
        ("nbr shape", f, (h, nbr[:1]), r"edge_sq_norms: nbr must be int64 \[G, N, k\]"),
        ("nbr range", f, (h, nbr + 6), r"edge_sq_norms: nbr entries must lie in \[0, 6\)"),
        ("h NaN", f, (_set(h, NAN), nbr), "edge_sq_norms: h contains NaN or Inf"),
        ("h Inf", f, (_set(h, -INF), nbr), "edge_sq_norms: h contains NaN or Inf"),
    ]


def align_cases():
    K, B, d, h, k = 3, 6, 5, 4, 2
    g = _gen(10)
    x = torch.randn(K, B, d, generator=g)
    ws = [torch.randn(*s, generator=g) / s[0] ** 0.5 for s in ((d, h), (d, h), (h,), (h, h), (h, h), (h,))]
    P = 2 * K
    un = torch.randn(1, P, B, B, generator=g)
    qn = torch.randn(1, P, B * k, B * k, generator=g)
    mask = torch.ones(2, K + 1, B, h)
    opts = dict(k=k, max_iter=5)

    def f(x, *ws, un=None, qn=None, mask=None, **kw):
        return ek.align(x, *ws, un, qn, mask, **{**opts, **kw})[0]

    def opt(**kw):
        return lambda *t: f(*t, **kw)

    def with_(i, t):  # the weights with weight i replaced
        return tuple(t if j == i else w for j, w in enumerate(ws))

    too_large = r"x or the GraphConv weights \(w_root1, w_rel1, bias1, w_root2, w_rel2, bias2\) are too large"
    return [
        ("x 2-d", f, (x[0], *ws), r"align: x must have shape \[K, B, d\]"),
        ("K = 1", f, (x[:1], *ws), r"align: x must hold at least 2 modalities"),
        ("k = B", opt(k=B), (x, *ws), "align: k must satisfy 1 <= k < B"),
        ("w_root1 shape", f, (x, *with_(0, ws[0][1:])), "align: w_root1 must have shape"),
        ("w_rel2 shape", f, (x, *with_(4, ws[4][:, 1:])), "align: w_rel2 must have shape"),
        ("bias2 shape", f, (x, *with_(5, ws[5][1:])), "align: bias2 must have shape"),
        ("unary_noise shape", lambda x, *t: f(x, *t[:6], un=t[6]), (x, *ws, un[:, :, 1:]),
         "align: unary_noise must have shape"),
        ("dropout_mask shape", lambda x, *t: f(x, *t[:6], mask=t[6]), (x, *ws, mask[:, 1:]),
         "align: dropout_mask must have shape"),
        ("lambda_ = inf", opt(lambda_=INF), (x, *ws), "alignment option lambda_ must be a positive finite number"),
        ("restarts = 2^40", opt(restarts=2**40), (x, *ws), r"alignment option restarts must be an int in \[1, 65536\]"),
        ("x NaN", f, (_set(x, NAN), *ws), "align: x contains NaN or Inf"),
        ("w_root1 NaN", f, (x, *with_(0, _set(ws[0], NAN))), "align: w_root1 contains NaN or Inf"),
        ("bias2 Inf", f, (x, *with_(5, _set(ws[5], INF))), "align: bias2 contains NaN or Inf"),
        ("unary_noise NaN", lambda x, *t: f(x, *t[:6], un=t[6]), (x, *ws, _set(un, NAN)),
         "align: unary_noise contains NaN or Inf"),
        ("quadratic_noise Inf", lambda x, *t: f(x, *t[:6], qn=t[6]), (x, *ws, _set(qn, INF)),
         "align: quadratic_noise contains NaN or Inf"),
        ("dropout_mask NaN", lambda x, *t: f(x, *t[:6], mask=t[6]), (x, *ws, _set(mask, NAN)),
         "align: dropout_mask contains NaN or Inf"),
        # Finite inputs whose features overflow inside the pipeline: named by the arguments that set their scale.
        ("x huge", f, (x * 1e20, *ws), "align: the node features reach .*" + too_large),
        ("w_root2 huge", f, (x, *with_(3, ws[3] * 1e25)), "align: the .*features.* overflow .*" + too_large),
        ("layer 1 overflows", f, (x * 1e30, *with_(0, ws[0] * 1e10)),
         "align: the features of GraphConv layer 1 overflow float32 .*" + too_large),
    ]


def module_cases():
    m = ek.MultiGraphAlignment(5, 4, k=2, max_iter=5)
    x = torch.randn(3, 6, 5, generator=_gen(11))
    return [
        ("x 2-d", lambda x: m(x).loss, (x[0],), r"MultiGraphAlignment: x must have shape \[K, B, 5\]"),
        ("x features", lambda x: m(x).loss, (x[..., :4],), r"MultiGraphAlignment: x must have shape \[K, B, 5\]"),
        ("x NaN", lambda x: m(x).loss, (_set(x, NAN),), "align: x contains NaN or Inf"),
    ]


TABLES = {
    "knn_graph": knn_graph_cases, "graph_conv": graph_conv_cases, "linear_assignment": linear_assignment_cases,
    "qap_solve": qap_solve_cases, "qap_gradient": qap_gradient_cases, "pair_scores": pair_scores_cases,
    "pair_scores_backward_sparse": pair_scores_backward_sparse_cases, "edge_sq_norms": edge_sq_norms_cases,
    "align": align_cases, "MultiGraphAlignment": module_cases,
}


class _CudaKernels(TorchDispatchMode):
    """Runs every exgramed op that has a CUDA kernel through that kernel, whatever the tensors' device: on
    CPU tensors the kernel's argument checks run (they come before its device guard and any CUDA work), so
    a machine without a GPU checks that the CUDA entry points reject bad input with the CPU's messages."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "exgramed" and torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CUDA"):
            return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def run_table(op: str, modes=("eager", "compile")) -> list[str]:
    """Every case of op's table in each mode (eager, compiled, or eager through the CUDA kernels'
    checks): the failures, as lines (empty: all raised as expected). Each case is announced on stderr
    first, so that an abort names the case it died in."""
    failures = []
    for name, fn, tensors, match in TABLES[op]():
        for mode in modes:
            print(f"{op} / {name} / {mode}", file=sys.stderr, flush=True)
            torch._dynamo.reset()
            f = torch.compile(fn, fullgraph=True) if mode == "compile" else fn
            try:
                if mode == "cuda checks":
                    with _CudaKernels():
                        f(*tensors)
                else:
                    f(*tensors)
            except Exception as e:  # noqa: BLE001 -- any Python exception; the message is what is checked
                if not re.search(match, str(e), re.DOTALL):
                    failures.append(f"{name} ({mode}): {type(e).__name__} does not match {match!r}: {str(e)[:800]}")
            else:
                failures.append(f"{name} ({mode}): no exception")
    return failures


def _run_child(op: str, modes: tuple[str, ...], tmp_path) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # A fresh compile cache: Inductor's caches key align's graph by the op call, not by its Python decomposition,
    # so a cache filled by another version of align.py would run that version's compiled code.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    r = subprocess.run([sys.executable, os.path.abspath(__file__), op, *modes], capture_output=True, text=True,
                       env=env, cwd=root, timeout=1800)
    cases = [line for line in r.stderr.splitlines() if line.startswith(f"{op} / ")]
    assert r.returncode == 0, (f"the process died (exit {r.returncode}) in case {cases[-1] if cases else '?'}:\n"
                               + r.stderr[-4000:])
    failures = json.loads(r.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)
    assert len(cases) == len(modes) * len(TABLES[op]())


@pytest.mark.parametrize("op", list(TABLES))
def test_bad_inputs_raise_a_python_exception_naming_the_argument(op, tmp_path):
    _run_child(op, ("eager", "compile"), tmp_path)


# Not here: the kNN and GraphConv CUDA kernels first require a CUDA x (their own message), and align's late
# checks need its whole pipeline to run on a GPU.
CUDA_CHECK_TABLES = [op for op in TABLES if op not in ("knn_graph", "graph_conv", "align", "MultiGraphAlignment")]


@pytest.mark.skipif(not has_kernel("qap_solve", "CUDA"), reason="the CUDA kernels are not built")
@pytest.mark.parametrize("op", CUDA_CHECK_TABLES)
def test_cuda_kernels_reject_bad_inputs_like_the_cpu(op, tmp_path):
    """The same tables through the CUDA kernels' argument checks (no GPU needed: _CudaKernels)."""
    _run_child(op, ("cuda checks",), tmp_path)


if __name__ == "__main__":
    print(json.dumps(run_table(sys.argv[1], tuple(sys.argv[2:]) or ("eager", "compile"))))
