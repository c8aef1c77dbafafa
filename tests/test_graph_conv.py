import importlib
import warnings

import pytest
import torch

import exgramed_kernels as ek
from exgramed_kernels import reference
from exgramed_kernels.testing import FLOAT_DTYPES, RTOL, devices, rel_err, triton_available

AGGRS = ("max", "mean", "sum", "gcn")
DEVICES = devices("graph_conv_forward")


def random_table(G, N, k, device="cpu", self_loops=False, seed=0):
    """Random fixed-degree tables without repeats; self entries only if asked."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(G * N):
        rows.append(torch.randperm(N, generator=gen)[:k])
    nbr = torch.stack(rows).view(G, N, k)
    if not self_loops:
        i = torch.arange(N).view(1, N, 1)
        nbr = torch.where(nbr == i, (nbr + 1) % N, nbr)
        # Re-draw rows that became repeats until none remain (rare).
        for g in range(G):
            for n in range(N):
                while len(set(nbr[g, n].tolist())) < k:
                    nbr[g, n] = torch.randperm(N - 1, generator=gen)[:k]
                    nbr[g, n] += (nbr[g, n] >= n).long()
    return nbr.to(device)


def make_inputs(G, N, k, d, h, dtype=torch.float64, device="cpu", seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(G, N, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    w = (torch.randn(2 * d, h, generator=gen, dtype=torch.float64) / d**0.5).to(device=device, dtype=dtype)
    b = torch.randn(h, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) if bias else None
    return x, random_table(G, N, k, device, seed=seed), w, b


def pyg_graph_conv(x, nbr, w_root, w_rel, bias, aggr, reverse):
    from torch_geometric.nn import GCNConv, GraphConv

    G, N, d = x.shape
    h = w_root.shape[1]
    if aggr == "gcn":
        conv = GCNConv(d, h, bias=bias is not None).double()
        conv.lin.weight.data = w_rel.t().clone()
    else:
        conv = GraphConv(d, h, aggr=aggr, bias=bias is not None).double()
        conv.lin_root.weight.data = w_root.t().clone()
        conv.lin_rel.weight.data = w_rel.t().clone()
    if bias is not None:
        (conv.bias if aggr == "gcn" else conv.lin_rel.bias).data = bias.clone()
    k = nbr.shape[2]
    outs = []
    for g in range(G):
        i = torch.arange(N).repeat_interleave(k)
        j = nbr[g].reshape(-1)
        edge_index = torch.stack([i, j]) if reverse else torch.stack([j, i])
        outs.append(conv(x[g], edge_index))
    return torch.stack(outs)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("aggr", AGGRS)
def test_matches_pyg(aggr, reverse):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch_geometric  # noqa: F401
    x, nbr, w, b = make_inputs(3, 11, 3, 6, 5, seed=1)
    d = x.shape[2]
    # Node 0 of graph 0 is nobody's neighbour: its reverse neighbourhood is empty.
    nbr[0] = torch.where(nbr[0] == 0, (nbr[0] % 10) + 1, nbr[0])
    nbr[0, 3] = torch.tensor([1, 2, 4])
    xg = x.clone().requires_grad_(True)
    ours = ek.graph_conv(xg, nbr, w[:d], w[d:], b, aggr, reverse)
    xp = x.clone().requires_grad_(True)
    ref = pyg_graph_conv(xp, nbr, w[:d], w[d:], b, aggr, reverse)
    assert rel_err(ours, ref) < 1e-12
    go = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(ours, xg, go)
    (gp,) = torch.autograd.grad(ref, xp, go)
    assert rel_err(gx, gp) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("aggr", AGGRS)
def test_forward_backward_vs_reference(aggr, reverse, dtype, device):
    G, N, k, d, h = 2, 13, 4, 7, 5  # awkward sizes
    torch.manual_seed(2)
    x, nbr, w, b = make_inputs(G, N, k, d, h, dtype, device, seed=2)
    # Distinct values (exact in bf16) so low-precision rounding makes no max ties: the
    # reference splits a tie's gradient, the kernels give it to one neighbour (tested below).
    grid = (torch.randperm(G * N * d, generator=torch.Generator().manual_seed(2)).double() - G * N * d / 2) / 64
    x = grid.view(G, N, d).to(device=device, dtype=dtype)
    x.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    for relu in (False, True):
        out = ek.graph_conv(x, nbr, w[:d], w[d:], b, aggr, reverse, relu)
        assert out.dtype == dtype and out.shape == (G, N, h)
        x64, w64, b64 = (t.detach().double().cpu().requires_grad_(True) for t in (x, w, b))
        ref = reference.graph_conv(x64, nbr.cpu(), w64[:d], w64[d:], b64, aggr, reverse, False)
        if relu:
            # The ReLU mask of the kernel's output: a pre-activation within rounding of 0 may
            # fall on either side in low precision.
            ref = torch.where(out.detach().cpu() > 0, ref, torch.zeros_like(ref))
        assert rel_err(out.cpu(), ref) < RTOL[dtype]
        go = torch.randn(out.shape, dtype=torch.float64)
        grads = torch.autograd.grad(out, (x, w, b), go.to(device, dtype))
        refs = torch.autograd.grad(ref, (x64, w64, b64), go)
        for name, g, r in zip(("x", "w", "b"), grads, refs):
            if aggr == "gcn" and name == "w":
                assert torch.equal(g[:d], torch.zeros_like(g[:d]))  # w_root unused by gcn
            assert rel_err(g.cpu(), r) < 4 * RTOL[dtype], name


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("aggr", AGGRS)
def test_gradcheck(aggr, reverse):
    x, nbr, w, b = make_inputs(2, 6, 2, 3, 2, seed=3)
    d = 3
    x.requires_grad_(True)
    wr, wl = w[:d].clone().requires_grad_(True), w[d:].clone().requires_grad_(True)
    b.requires_grad_(True)

    def f(x, wr, wl, b):
        return ek.graph_conv(x, nbr, wr, wl, b, aggr, reverse, True)

    inputs = (x, wr, wl, b) if aggr != "gcn" else (x, wl, wl, b)
    assert torch.autograd.gradcheck(f, inputs)


def test_separate_weight_buffers_match_stacked():
    # Weights that are not halves of one buffer take the two-GEMM path: same numbers.
    x, nbr, w, b = make_inputs(2, 9, 3, 5, 4, seed=4)
    d = 5
    for aggr in ("max", "sum"):
        for reverse in (False, True):
            a = ek.graph_conv(x, nbr, w[:d], w[d:], b, aggr, reverse, True)
            wr, wl = w[:d].clone(), w[d:].clone()
            wr.requires_grad_(True)
            wl.requires_grad_(True)
            c = ek.graph_conv(x, nbr, wr, wl, b, aggr, reverse, True)
            assert rel_err(c, a) < 1e-13
            ref = reference.graph_conv(x, nbr, w[:d], w[d:], b, aggr, reverse, True)
            assert rel_err(c, ref) < 1e-13
            c.sum().backward()
            wr2, wl2 = w[:d].clone().requires_grad_(True), w[d:].clone().requires_grad_(True)
            reference.graph_conv(x, nbr, wr2, wl2, b, aggr, reverse, True).sum().backward()
            assert rel_err(wr.grad, wr2.grad) < 1e-13 and rel_err(wl.grad, wl2.grad) < 1e-13


@pytest.mark.parametrize("aggr", AGGRS)
def test_stacked_weight_op(aggr):
    # graph_conv_stacked(weight = [w_root; w_rel]) == graph_conv(w_root, w_rel), gradients included.
    x, nbr, w, b = make_inputs(2, 9, 3, 5, 4, seed=14)
    d = 5
    wst = (w[d:] if aggr == "gcn" else w).clone().requires_grad_(True)
    out = torch.ops.exgramed.graph_conv_stacked(x, nbr, wst, b, aggr, True, True)[0]
    wr, wl = w[:d].clone().requires_grad_(True), w[d:].clone().requires_grad_(True)
    ref = reference.graph_conv(x, nbr, wr, wl, b, aggr, True, True)
    assert rel_err(out, ref) < 1e-13
    out.sum().backward()
    ref.sum().backward()
    expect = wl.grad if aggr == "gcn" else torch.cat([wr.grad, wl.grad])
    assert rel_err(wst.grad, expect) < 1e-13
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.exgramed.graph_conv_stacked(x, nbr, w[1:], b, aggr)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True])
def test_max_tie_rule_lowest_index(reverse, device):
    # Integer features make every neighbourhood full of ties: the gradient of each (node,
    # feature) goes to exactly one neighbour, the lowest-index maximiser.
    G, N, k, d = 2, 8, 3, 4
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(0, 2, (G, N, d), generator=gen).double()
    nbr = random_table(G, N, k, seed=5)
    eye = torch.eye(d, dtype=torch.float64, device=device)
    zero = torch.zeros(d, d, dtype=torch.float64, device=device)
    xd = x.to(device).requires_grad_(True)
    out = ek.graph_conv(xd, nbr.to(device), zero, eye, None, "max", reverse)
    go = torch.randint(1, 64, (G, N, d), generator=gen).double() / 64  # sums of these are exact
    (gx,) = torch.autograd.grad(out, xd, go.to(device))
    out, gx = out.detach().cpu(), gx.cpu()
    expect = torch.zeros_like(gx)
    for g in range(G):
        for i in range(N):
            if reverse:
                hood = sorted(n for n in range(N) if i in nbr[g, n].tolist())
            else:
                hood = nbr[g, i].tolist()
            for f in range(d):
                if not hood:
                    assert out[g, i, f] == 0
                    continue
                vals = [float(x[g, j, f]) for j in hood]
                m = max(vals)
                assert out[g, i, f] == m
                winner = min(j for j, v in zip(hood, vals) if v == m)
                expect[g, winner, f] += go[g, i, f]
    assert torch.equal(gx, expect)


def test_empty_neighbourhoods_and_batches():
    x, _, w, b = make_inputs(2, 5, 1, 3, 4, seed=6)
    d = 3
    nbr = torch.empty(2, 5, 0, dtype=torch.long)  # k = 0: every neighbourhood is empty
    xg = x.clone().requires_grad_(True)
    for aggr in AGGRS:
        out = ek.graph_conv(xg, nbr, w[:d], w[d:], b, aggr)
        ref = reference.graph_conv(x, nbr, w[:d], w[d:], b, aggr)
        assert rel_err(out, ref) < 1e-13
        (gx,) = torch.autograd.grad(out.sum(), xg)
        (gr,) = torch.autograd.grad(reference.graph_conv(xg, nbr, w[:d], w[d:], b, aggr).sum(), xg)
        assert rel_err(gx, gr) < 1e-13
    x0 = torch.empty(0, 5, d, dtype=torch.float64, requires_grad=True)
    out = ek.graph_conv(x0, torch.empty(0, 5, 2, dtype=torch.long), w[:d], w[d:], b)
    assert out.shape == (0, 5, 4)
    out.sum().backward()
    assert x0.grad.shape == (0, 5, d)


def test_deterministic():
    x, nbr, w, b = make_inputs(3, 40, 5, 33, 17, torch.float32, seed=7)
    d = 33
    res = []
    for _ in range(2):
        xg = x.clone().requires_grad_(True)
        out = ek.graph_conv(xg, nbr, w[:d], w[d:], b, "sum", True, True)
        out.backward(torch.ones_like(out))
        res.append((out, xg.grad))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("aggr", AGGRS)
def test_fallback_matches_kernel(aggr, reverse):
    # The reference (the no-extension path) implements the same algorithm, tie rule included.
    if not ek.HAS_EXTENSION:
        pytest.skip("the fallback is what serves the op here")
    gen = torch.Generator().manual_seed(8)
    x = torch.randint(-2, 3, (2, 9, 4), generator=gen).double()  # ties
    nbr = random_table(2, 9, 3, seed=8, self_loops=True)
    w = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    k_out = torch.ops.exgramed.graph_conv_forward(x, nbr, w[:4], w[4:], b, aggr, reverse, True)
    f_out = reference.graph_conv_forward(x, nbr, w[:4], w[4:], b, aggr, reverse, True)
    for a, c in zip(k_out, f_out):
        assert a.shape == c.shape and rel_err(a.double(), c.double()) < 1e-13
    go = torch.randn(2, 9, 3, generator=gen, dtype=torch.float64)
    k_b = torch.ops.exgramed.graph_conv_backward(go, *k_out, nbr, w[:4], w[4:], aggr, reverse, True)
    f_b = reference.graph_conv_backward(go, *k_out, nbr, w[:4], w[4:], aggr, reverse, True)
    for a, c in zip(k_b, f_b):
        assert rel_err(a, c) < 1e-13


def test_gcn_self_entries_are_the_self_loop():
    # PyG's add_remaining_self_loops: an explicit self entry does not add a second loop.
    x, nbr, w, b = make_inputs(1, 7, 3, 4, 3, seed=9)
    nbr[0, 2, 1] = 2
    for reverse in (False, True):
        out = ek.graph_conv(x, nbr, w[:4], w[4:], b, "gcn", reverse)
        assert rel_err(out, pyg_graph_conv(x, nbr, w[:4], w[4:], b, "gcn", reverse)) < 1e-12


def test_errors_name_the_argument():
    x, nbr, w, b = make_inputs(2, 6, 2, 3, 4)
    d = 3
    f = torch.ops.exgramed.graph_conv
    with pytest.raises(RuntimeError, match="aggr must be one of"):
        f(x, nbr, w[:d], w[d:], b, "min")
    with pytest.raises(RuntimeError, match="x must have shape"):
        f(x[0], nbr, w[:d], w[d:], b)
    with pytest.raises(RuntimeError, match="nbr must have shape"):
        f(x, nbr[:1], w[:d], w[d:], b)
    with pytest.raises(RuntimeError, match="nbr must be an int64"):
        f(x, nbr.int(), w[:d], w[d:], b)
    with pytest.raises(RuntimeError, match="nbr entries must lie in"):
        f(x, torch.where(nbr == 0, 6, nbr), w[:d], w[d:], b)
    with pytest.raises(RuntimeError, match="nbr entries must lie in"):
        f(x, nbr - 1, w[:d], w[d:], b)
    with pytest.raises(RuntimeError, match="w_root must have shape"):
        f(x, nbr, w[: d + 1], w[d:], b)
    with pytest.raises(RuntimeError, match="w_rel must have the shape"):
        f(x, nbr, w[:d], w[d:, :3], b)
    with pytest.raises(RuntimeError, match="w_rel must have the dtype"):
        f(x, nbr, w[:d], w[d:].float(), b)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        f(x, nbr, w[:d], w[d:], b[:3])
    with pytest.raises(RuntimeError, match="x contains NaN"):
        f(x.index_fill(1, torch.tensor([2]), float("nan")), nbr, w[:d], w[d:], b)
    with pytest.raises(RuntimeError, match="x must be a floating-point"):
        f(x.long(), nbr, w[:d].long(), w[d:].long(), None)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, nbr, w, b = make_inputs(2, 7, 3, 4, 3, torch.float32, device, seed=10)
    d = 4
    for aggr in AGGRS:
        for reverse in (False, True):
            args = (x.clone().requires_grad_(True), nbr, w[:d].clone().requires_grad_(True), w[d:].clone(), b, aggr, reverse, True)
            torch.library.opcheck(torch.ops.exgramed.graph_conv_forward, args)
            torch.library.opcheck(torch.ops.exgramed.graph_conv, args)
            wst = (w[:d] if aggr == "gcn" else w).clone().requires_grad_(True)
            torch.library.opcheck(torch.ops.exgramed.graph_conv_stacked, (args[0], nbr, wst, b, aggr, reverse, True))
            out = torch.ops.exgramed.graph_conv_forward(*[a.detach() if torch.is_tensor(a) else a for a in args])
            go = torch.randn_like(out[0])
            torch.library.opcheck(
                torch.ops.exgramed.graph_conv_backward, (go, *out, nbr, w[:d], w[d:], aggr, reverse, True)
            )


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    torch._dynamo.reset()
    x, nbr, w, b = make_inputs(2, 9, 3, 6, 6, torch.float32, device, seed=11)
    d = 6

    def f(x, nbr, w, b):
        return ek.graph_conv(x, nbr, w[:d], w[d:], b, "max", True, True).square().sum()

    xg = x.clone().requires_grad_(True)
    out = torch.compile(f, fullgraph=True)(xg, nbr, w, b)
    out.backward()
    xr = x.clone().requires_grad_(True)
    ref = f(xr, nbr, w, b)
    ref.backward()
    assert rel_err(out, ref) < 1e-5 and rel_err(xg.grad, xr.grad) < 1e-5

    net = ek.GraphConvNet(6, 8, num_layers=2).to(device).eval()
    cnet = torch.compile(net, fullgraph=True)
    y = cnet(x, nbr)
    assert rel_err(y, net(x, nbr)) < 1e-5
    y.sum().backward()
    assert net.weight0.grad is not None and net.weight0.grad.abs().sum() > 0


def test_module_matches_pyg_stack():
    torch.manual_seed(12)
    net = ek.GraphConvNet(6, 8, out_dim=5, num_layers=2, aggr="max", dropout=0.1, reverse=True).double()
    assert net.weight0.shape == (12, 8) and net.weight1.shape == (16, 5) and net.bias1.shape == (5,)
    assert net.weight0.abs().max() <= 1 / 6**0.5 and net.bias0.abs().max() <= 1 / 6**0.5
    x, nbr, _, _ = make_inputs(3, 10, 3, 6, 1, seed=12)
    net.eval()
    h = x
    for l, dim in enumerate((6, 8)):
        w, b = getattr(net, f"weight{l}"), getattr(net, f"bias{l}")
        h = torch.relu(pyg_graph_conv(h, nbr, w[:dim].detach(), w[dim:].detach(), b.detach(), "max", True))
    assert rel_err(net(x, nbr), h) < 1e-12
    net.train()
    torch.manual_seed(0)
    y = net(x, nbr)
    assert ((y == 0).double().mean() > (h == 0).double().mean())  # dropout zeroes more entries
    y.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    gnet = ek.GraphConvNet(6, 8, aggr="gcn").double()
    assert gnet.weight0.shape == (6, 8) and torch.equal(gnet.bias0, torch.zeros(8, dtype=torch.float64))
    assert gnet(x, nbr).shape == (3, 10, 8)


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("aggr", AGGRS)
def test_triton_matches_reference(aggr, reverse):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(13)
    x = torch.randint(-2, 3, (2, 7, 5), generator=gen).float().to(device)  # ties included
    x.requires_grad_(True)
    nbr = random_table(2, 7, 3, device, seed=13)
    w = torch.randn(10, 4, generator=gen).to(device).requires_grad_(True)
    b = torch.randn(4, generator=gen).to(device)
    out = ek.graph_conv(x, nbr, w[:5], w[5:], b, aggr, reverse, True, backend="triton")
    ref = ek.graph_conv(x, nbr, w[:5], w[5:], b, aggr, reverse, True)
    assert rel_err(out, ref) < 1e-5
    go = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (x, w), go)
    g2 = torch.autograd.grad(ref, (x, w), go)
    for a, c in zip(g1, g2):
        assert rel_err(a, c) < 1e-5


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_opcheck():
    from exgramed_kernels.triton.graph_conv import graph_conv_forward_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, nbr, w, b = make_inputs(2, 5, 2, 3, 2, torch.float32, device, seed=15)
    args = (x.requires_grad_(True), nbr, w[:3].clone().requires_grad_(True), w[3:].clone(), b, "max", True, True)
    # The CPU interpreter cannot run a kernel on the fake tensors that AOT tracing of a
    # triton_op feeds it, so that one check needs a GPU.
    utils = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if torch.cuda.is_available():
        utils.append("test_aot_dispatch_dynamic")
    torch.library.opcheck(graph_conv_forward_triton, args, test_utils=utils)


@pytest.mark.parametrize("op", ["graph_conv", "graph_conv_stacked"])
def test_double_backward_raises(op):
    x, nbr, w, b = make_inputs(2, 7, 3, 4, 3, seed=3)
    x.requires_grad_()
    if op == "graph_conv":
        out = ek.graph_conv(x, nbr, w[:4], w[4:], b, "max")
    else:
        out = torch.ops.exgramed.graph_conv_stacked(x, nbr, w, b, "max", False, True)[0]
    (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="graph_conv_backward: .* is not differentiable"):
        g.sum().backward()
