"""What torch.compile relies on, for every op: the real kernel's outputs have the fake kernel's shapes,
strides and aliasing, and inputs are not mutated (the schemas declare no mutation). Bad arguments of the
internal ops raise a Python exception eagerly and from Inductor's compiled code; the public ops' bad inputs
are tests/test_bad_inputs.py's (this file checks that the two tables together cover every op)."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils import _pytree as pytree

import exgramed_kernels  # noqa: F401  (loads the ops)
from exgramed_kernels._backend import schemas
from exgramed_kernels.align import problem_graphs

import test_bad_inputs  # the public ops' bad-input tables

G, N, K, D, H = 2, 6, 2, 4, 3
NK = N * K
OPS = torch.ops.exgramed


def _gen():
    return torch.Generator().manual_seed(0)


def _nbr(g):
    return torch.stack([torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(N)]) for _ in range(G)])


def _onehot(g):
    perm = torch.stack([torch.randperm(N, generator=g) for _ in range(G)])
    return torch.zeros(G, N, N, dtype=torch.float64).scatter_(2, perm.unsqueeze(2), 1.0)


def samples() -> dict[str, list[tuple]]:
    """Small CPU arguments for every op, float64."""
    g = _gen()
    f = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, nbr1, nbr2 = f(G, N, D), _nbr(g), _nbr(g)
    w_root, w_rel, bias = f(D, H), f(D, H), f(H)
    out, xa, argmax = OPS.graph_conv_forward(x, nbr1, w_root, w_rel, bias, "max", False, True)
    U, Q = f(G, N, N), f(G, NK, NK)
    C, w1, w2 = f(G, N, N), f(G, NK), f(G, NK)
    Z1, Z2 = _onehot(g), _onehot(g)
    weights = torch.tensor([[1.0, 0.5], [-1.0, -0.5]], dtype=torch.float64)
    idx, vals = OPS.edge_pair_indicator_sparse([Z1, Z2], weights, nbr1, nbr2)
    ax = f(3, 5, D)
    P = len(problem_graphs(3, "barycenter")[0])
    align_ws = (f(D, H), f(D, H), f(H), f(H, H), f(H, H), f(H))
    un = f(1, P, 5, 5)
    seeds = torch.arange(P).view(1, P) + 7
    # noise, then the options in the schema's order: k, metric, mode, aggr, reverse, copy_structure, edge_floor,
    # noise_scale, solver, max_iter, tol, restarts, seed, partial, estimator, lambda_
    qn_args = (un, None, None, seeds, K, "cosine", "barycenter", "max", False, False, 0.1, 0.5, "fw", 10, 1e-6, 1, 0,
               False, "imle", 20.0)
    return {
        "knn_graph": [(x, K, "cosine"), (x, 3, "l2")],
        "align": [(ax, *align_ws, *qn_args)],
        "linear_assignment": [(U, True), (U, False)],
        "qap_solve": [(U, nbr1, nbr2, Q, None, None, "fw", 10, 1e-6, 2, False, 0, "imle", 5.0, None),
                      (U, nbr1, nbr2, None, f(G, N, H), f(G, N, H), "sinkhorn", 5, 1e-6, 1, True, 3, "blackbox", 5.0,
                       None)],
        "qap_solve_lockstep": [(U, nbr1, nbr2, Q, None, None, "fw", 10, 1e-6, 2, False, 0, "imle", 5.0, None)],
        "qap_gradient": [(Z1, nbr1, nbr2, Q)],
        "graph_conv": [(x, nbr1, w_root, w_rel, bias, "max", False, True)],
        "graph_conv_forward": [(x, nbr1, w_root, w_rel, bias, "max", False, True),
                               (x, nbr1, w_root, w_rel, None, "gcn", True, False)],
        "graph_conv_backward": [(f(G, N, H), out, xa, argmax, nbr1, w_root, w_rel, "max", False, True)],
        "graph_conv_stacked": [(x, nbr1, f(2 * D, H), bias, "mean", True, False)],
        "pair_scores": [(C, w1, w2, nbr1, nbr2, 0.5, -0.25, f(G, NK, NK), 0.3, None),
                        (C, w1, w2, nbr1, nbr2, 1.0, 0.0, None, 0.5, torch.tensor([3, 4]))],
        "pair_scores_backward": [(f(G, NK, NK), C, w1, w2, nbr1, nbr2, 0.5)],
        "edge_sq_norms": [(f(G, N, H), nbr1)],
        "edge_sq_norms_backward": [(f(G, NK), f(G, N, H), nbr1)],
        "edge_pair_indicator_sparse": [([Z1, Z2], weights, nbr1, nbr2)],
        "pair_scores_backward_sparse": [(idx, vals, C, w1, w2, nbr1, nbr2, 0.5)],
    }


def _strided(t):
    """The same values with other strides: the last two dims stored transposed, or every other element of a
    1-d tensor."""
    if not isinstance(t, torch.Tensor) or t.numel() < 2:
        return t
    if t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return torch.stack([t, torch.zeros_like(t)], 1)[:, 0]


def _cases():
    return [(op, i) for op, args in samples().items() for i in range(len(args))]


def test_every_op_has_samples():
    assert set(samples()) == set(schemas()) | {"align"}


def check_against_fake(op, args):
    """Runs op on args, then on fake copies: the real outputs must have the fake outputs' dtypes, shapes and
    strides (where the fake's are concrete), share no storage with an input or with each other, and leave
    the inputs unchanged. Returns the number of outputs whose shapes and strides were compared."""
    flat_in = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    before = [t.clone() for t in flat_in]
    real = pytree.tree_leaves(op(*args))
    for t, b in zip(flat_in, before):
        assert torch.equal(t, b), f"{op}: an input was modified"
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fake_args = pytree.tree_map_only(torch.Tensor, lambda t: mode.from_tensor(t, static_shapes=True), args)
        fake = pytree.tree_leaves(op(*fake_args))
    assert len(real) == len(fake)
    storages = [t.untyped_storage().data_ptr() for t in flat_in if t.numel()]
    compared = 0
    for i, (r, f) in enumerate(zip(real, fake)):
        assert r.dtype == f.dtype, f"{op} output {i}: dtype {r.dtype}, fake {f.dtype}"
        if not any(isinstance(v, torch.SymInt) for v in (*f.shape, *f.stride())):
            assert r.shape == f.shape, f"{op} output {i}: shape {tuple(r.shape)}, fake {tuple(f.shape)}"
            assert r.stride() == f.stride(), f"{op} output {i}: strides {r.stride()}, fake {f.stride()}"
            compared += 1
        if r.numel():
            assert r.untyped_storage().data_ptr() not in storages, f"{op} output {i} shares storage with an input"
            storages.append(r.untyped_storage().data_ptr())
    return compared


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("op, i", _cases())
def test_real_kernel_matches_fake_and_schema(op, i, layout):
    args = samples()[op][i]
    if layout == "strided":
        args = tuple([_strided(a) for a in t] if isinstance(t, list) else _strided(t) for t in args)
        assert any(isinstance(a, torch.Tensor) and not a.is_contiguous() for a in args if a is not None)
    compared = check_against_fake(getattr(OPS, op).default, args)
    # edge_pair_indicator_sparse's output size depends on its input values: symbolic in the fake kernel
    assert compared == (0 if op == "edge_pair_indicator_sparse" else len(getattr(OPS, op).default._schema.returns))
    torch.library.opcheck(getattr(OPS, op).default, args, test_utils=("test_schema",))


@pytest.fixture(scope="module")
def probe_ops():
    """Two ops that break the contract: a fake kernel with other strides, and an output that is the input."""
    lib = torch.library.Library("exgramed_contract_probe", "FRAGMENT")
    lib.define("transpose_copy(Tensor x) -> Tensor")
    lib.impl("transpose_copy", lambda x: x.t().contiguous(), "CPU")
    torch.library.register_fake("exgramed_contract_probe::transpose_copy", lambda x: x.new_empty(x.shape).t(), lib=lib)
    lib.define("identity(Tensor x) -> Tensor")
    lib.impl("identity", lambda x: x, "CPU")
    torch.library.register_fake("exgramed_contract_probe::identity", lambda x: x.new_empty(x.shape), lib=lib)
    yield torch.ops.exgramed_contract_probe
    lib._destroy()


def test_contract_check_catches_broken_ops(probe_ops):
    with pytest.raises(AssertionError, match="strides"):
        check_against_fake(probe_ops.transpose_copy.default, (torch.randn(3, 4),))
    with pytest.raises(AssertionError, match="shares storage with an input"):
        check_against_fake(probe_ops.identity.default, (torch.randn(3, 4),))


# ---- bad arguments of the internal ops: a Python exception eagerly and from compiled code


def _error_cases():
    """(op, args, message) per internal op: shape and type errors (raised by the fake kernels while tracing) and
    value errors (NaN, indices out of range: raised by the real kernels inside the compiled code)."""
    s = samples()

    def bad_nbr(t):  # one entry out of [0, N)
        t = t.clone()
        t.view(-1)[0] = N
        return t

    def change(op, **at):
        a = list(s[op][0])
        for k, v in at.items():
            a[int(k[1:])] = v(a[int(k[1:])]) if callable(v) else v
        return tuple(a)

    return [
        ("qap_solve_lockstep", change("qap_solve_lockstep", a9=0), "restarts"),
        ("qap_solve_lockstep", change("qap_solve_lockstep", a2=bad_nbr), "nbr2 entries must lie in"),
        ("graph_conv_forward", change("graph_conv_forward", a2=lambda t: t[:-1]), "w_root must have shape"),
        ("graph_conv_stacked", change("graph_conv_stacked", a2=lambda t: t[:-1]), "weight must have shape"),
        ("graph_conv_backward", change("graph_conv_backward", a4=bad_nbr), "nbr entries must lie in"),
        ("pair_scores_backward", change("pair_scores_backward", a5=bad_nbr), "nbr2 entries must lie in"),
        ("edge_sq_norms_backward", change("edge_sq_norms_backward", a2=bad_nbr), "nbr entries must lie in"),
        ("edge_pair_indicator_sparse", change("edge_pair_indicator_sparse", a1=lambda t: t[:1]), "weights must"),
        ("edge_pair_indicator_sparse", change("edge_pair_indicator_sparse", a2=bad_nbr), "entries must lie in"),
    ]


PUBLIC_TABLES = set(test_bad_inputs.TABLES)
ERROR_CASES = _error_cases()


def test_error_cases_cover_every_op():
    assert {op for op, _, _ in ERROR_CASES} | PUBLIC_TABLES == set(schemas()) | {"align", "MultiGraphAlignment"}


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("op, args, match", ERROR_CASES, ids=[f"{op}-{m}" for op, _, m in ERROR_CASES])
def test_bad_arguments_raise(op, args, match, mode):
    fn = getattr(OPS, op).default
    if mode == "compiled":
        torch._dynamo.reset()  # a fresh compile per case, never the eager fallback of a recompile limit
        fn = torch.compile(lambda *a: getattr(OPS, op).default(*a), fullgraph=True, backend="inductor")
    # edge_pair_indicator_sparse's output size depends on its input values
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), pytest.raises(RuntimeError, match=match):
        fn(*args)
