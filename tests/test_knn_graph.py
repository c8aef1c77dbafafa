"""knn_graph: every backend against the float64 reference, ties, errors, opcheck, compile."""
import subprocess
import sys

import pytest
import torch

import exgramed_kernels as ek
from exgramed_kernels import reference
from exgramed_kernels import reverse_neighbors
from exgramed_kernels.testing import FLOAT_DTYPES, devices, triton_available

DEVICES = devices("knn_graph")


def assert_knn_matches_reference(nbr, x, k, metric):
    """Indices equal to the float64 reference, except where the reference itself has
    near-equal distances (then the chosen neighbours' exact distances must agree)."""
    ref = reference.knn_graph(x.double().cpu(), k, metric)
    assert nbr.shape == ref.shape and nbr.dtype == torch.long
    nbr = nbr.cpu()
    if torch.equal(nbr, ref):
        return
    # Distances of each graph scaled to its largest entry: the same neighbours, in range at any magnitude.
    xd = x.double().cpu()
    xd = xd / xd.abs().amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    dist = reference.pairwise_distance(xd, metric)
    got_d = torch.gather(dist, 2, nbr)
    ref_d = torch.gather(dist, 2, ref)
    # fp32 GEMM candidates: a swap is only allowed between (nearly) equidistant points.
    scale = dist.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    assert ((got_d - ref_d).abs() / scale).max() < 1e-5, (nbr, ref)
    self_idx = torch.arange(x.shape[1]).view(1, -1, 1)
    assert not (nbr == self_idx).any()
    assert all(len(set(row.tolist())) == k for row in nbr.reshape(-1, k))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize(
    "G,N,d,k", [(1, 2, 1, 1), (3, 7, 3, 3), (7, 33, 64, 5), (3, 129, 3, 8), (1, 1000, 4, 5), (2, 50, 4096, 5)]
)
def test_matches_reference(device, metric, G, N, d, k):
    torch.manual_seed(G * 1000 + N + d)
    x = torch.randn(G, N, d, device=device)
    assert_knn_matches_reference(ek.knn_graph(x, k, metric), x, k, metric)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes(device, dtype):
    torch.manual_seed(1)
    x = torch.randn(3, 40, 16, device=device).to(dtype)
    for metric in ("l2", "cosine"):
        # The reference sees the same rounded values the kernel sees.
        assert_knn_matches_reference(ek.knn_graph(x, 5, metric), x, 5, metric)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    torch.manual_seed(2)
    base = torch.randn(20, 3, 8, device=device)
    x = base.transpose(0, 1)[:, :, ::2]  # [3, 20, 4], strided
    assert not x.is_contiguous()
    assert torch.equal(ek.knn_graph(x, 4).cpu(), ek.knn_graph(x.contiguous(), 4).cpu())
    assert_knn_matches_reference(ek.knn_graph(x, 4), x, 4, "l2")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_exact_ties_broken_by_lower_index(device, metric):
    torch.manual_seed(3)
    pts = torch.randn(2, 9, 5, device=device)
    x = torch.cat([pts, pts, pts], dim=1)  # every point three times: node j, j+9, j+18 coincide
    nbr = ek.knn_graph(x, 4, metric).cpu()
    ref = reference.knn_graph(x.double(), 4, metric)
    assert torch.equal(nbr, ref)
    # Node 0's two duplicates are its nearest, in index order.
    assert nbr[0, 0, :2].tolist() == [9, 18]
    assert nbr[0, 18, :2].tolist() == [0, 9]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_reference_coinciding_points_are_equidistant(metric):
    # The oracle of the tie rule: the distances to copies of a point are bit-identical.
    torch.manual_seed(3)
    pts = torch.randn(2, 9, 5, dtype=torch.float64)
    dist = reference.pairwise_distance(torch.cat([pts, pts, pts], dim=1), metric)
    assert torch.equal(dist[..., :9], dist[..., 9:18]) and torch.equal(dist[..., :9], dist[..., 18:])
    cos = torch.nn.functional.cosine_similarity(pts.unsqueeze(2), pts.unsqueeze(1), dim=-1)
    expected = torch.cdist(pts, pts).square() if metric == "l2" else 1 - cos
    assert torch.allclose(dist[:, :9, :9], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_all_equal_points(device):
    x = torch.ones(2, 6, 3, device=device)
    nbr = ek.knn_graph(x, 3).cpu()
    assert nbr[0, 0].tolist() == [1, 2, 3]
    assert nbr[0, 4].tolist() == [0, 1, 2]


@pytest.mark.parametrize("device", DEVICES)
def test_cosine_zero_vectors(device):
    # A zero vector has cosine 0 to everything (distance 1): it ranks after positively
    # correlated points and before anti-correlated ones, and its own neighbours are
    # all at distance 1, so they come in index order.
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [0.0, 0.0]]], device=device)
    nbr = ek.knn_graph(x, 3, "cosine").cpu()
    assert nbr[0, 0].tolist() == [1, 2, 3]
    assert nbr[0, 1].tolist() == [2, 0, 4]
    assert nbr[0, 3].tolist() == [0, 4, 2]
    assert torch.equal(nbr, reference.knn_graph(x.double(), 3, "cosine"))


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_large_norm_does_not_overflow(device):
    torch.manual_seed(4)
    x = (torch.randn(1, 30, 4096, device=device) * 3000).half()
    assert torch.isinf(x.float().pow(2).sum(-1).half()).all()  # fp16 arithmetic would overflow
    assert_knn_matches_reference(ek.knn_graph(x, 5), x, 5, "l2")


# Magnitudes whose squares overflow (huge) or underflow (tiny) the compute dtype fp32, for fp32 and
# bf16 (fp32's range); fp16's own extremes; fp64's. fp32 on the CPU gave every row the lowest indices.
EXTREMES = [(torch.float32, 1e20), (torch.float32, 3e37), (torch.float32, 1e-30), (torch.bfloat16, 1e20),
            (torch.bfloat16, 1e-30), (torch.float16, 8e3), (torch.float16, 1e-4), (torch.float64, 1e200),
            (torch.float64, 1e-200)]


def extreme_input(dtype, magnitude, device, G=3, N=40, d=6):
    torch.manual_seed(8)
    x = torch.randn(G, N, d, dtype=torch.float64) * magnitude
    x[1] *= 1e-3  # graphs of different magnitudes in one batch
    return x.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype, magnitude", EXTREMES)
def test_huge_and_tiny_inputs(device, metric, dtype, magnitude):
    x = extreme_input(dtype, magnitude, device)
    assert torch.isfinite(x).all() and (x != 0).float().mean() > 0.9
    nbr = ek.knn_graph(x, 5, metric)
    assert torch.equal(nbr.cpu(), reference.knn_graph(x.double().cpu(), 5, metric))


def test_reference_is_exact_at_any_magnitude():
    """The oracle itself: the float64 neighbours of x, of x scaled by a power of two, and of the
    huge and tiny x are the same."""
    torch.manual_seed(9)
    x = torch.randn(2, 30, 5, dtype=torch.float64)
    for metric in ("l2", "cosine"):
        want = reference.knn_graph(x, 4, metric)
        for scale in (2.0 ** 700, 2.0 ** -700, 2.0 ** 1000, 2.0 ** -1050):
            assert torch.equal(reference.knn_graph(x * scale, 4, metric), want), (metric, scale)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    out = ek.knn_graph(torch.randn(0, 10, 3, device=device), 4)
    assert out.shape == (0, 10, 4) and out.dtype == torch.long


@pytest.mark.parametrize(
    "x,k,metric,match",
    [
        (torch.randn(10, 3), 2, "l2", "shape"),
        (torch.randn(2, 5, 3), 5, "l2", "k must satisfy"),
        (torch.randn(2, 5, 3), 0, "l2", "k must satisfy"),
        (torch.randn(2, 1, 3), 1, "l2", "N >= 2"),
        (torch.randint(0, 5, (2, 5, 3)), 2, "l2", "floating"),
        (torch.randn(2, 5, 3, dtype=torch.complex64), 2, "l2", "floating"),
        (torch.tensor([[[0.0], [float("nan")], [1.0]]]), 1, "l2", "NaN or Inf"),
        (torch.tensor([[[0.0], [float("inf")], [1.0]]]), 1, "l2", "NaN or Inf"),
        (torch.randn(2, 5, 3), 2, "manhattan", "metric"),
        (torch.randn(2, 5, 0), 2, "l2", "d >= 1"),
    ],
)
def test_bad_input(x, k, metric, match):
    with pytest.raises(RuntimeError, match=match):
        ek.knn_graph(x, k, metric)


def test_opcheck():
    torch.manual_seed(5)
    for x in (torch.randn(2, 12, 5), torch.randn(1, 7, 3, dtype=torch.float64)):
        torch.library.opcheck(torch.ops.exgramed.knn_graph.default, (x, 3, "cosine"))
        torch.library.opcheck(torch.ops.exgramed.knn_graph.default, (x, 4))


def test_compile_fullgraph():
    torch.manual_seed(6)

    def f(x):
        y = x * 2.0 + 1.0
        return ek.knn_graph(y, 3, "l2"), ek.knn_graph(y, 2, "cosine")

    x = torch.randn(3, 16, 8)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    want = f(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_reverse_neighbors():
    torch.manual_seed(7)
    x = torch.randn(3, 25, 4)
    nbr = ek.knn_graph(x, 4)
    ptr, src = reverse_neighbors(nbr)
    assert ptr.shape == (3, 26) and src.shape == (3, 100)
    for g in range(3):
        for j in range(25):
            ins = src[g, ptr[g, j] : ptr[g, j + 1]].tolist()
            want = [i for i in range(25) if j in nbr[g, i].tolist()]
            assert ins == want
    # Some node of a kNN graph usually has no in-neighbour; the structure must allow it.
    nbr0 = torch.tensor([[[1], [0], [0]]])
    ptr0, src0 = reverse_neighbors(nbr0)
    assert ptr0.tolist() == [[0, 2, 3, 3]] and src0.tolist() == [[1, 2, 0]]
    with pytest.raises(RuntimeError, match=r"\[0, 3\)"):
        reverse_neighbors(torch.tensor([[[1], [3], [0]]]))


def test_schemas_match_the_extension():
    """schemas.def (parsed by the fallback) and the compiled ops agree."""
    if not ek.HAS_EXTENSION:
        pytest.fail("the compiled extension is not built; CI must build it")
    from torch._C import parse_schema

    for name, schema in ek._backend.schemas().items():
        got = getattr(torch.ops.exgramed, name).default._schema
        assert got == parse_schema("exgramed::" + schema), name


def test_fallback_without_extension():
    """EXGRAMED_NO_EXTENSION=1: the package imports, warns once, and serves the reference."""
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import exgramed_kernels as ek\n"
        "assert not ek.HAS_EXTENSION\n"
        "msgs = [str(x.message) for x in w if 'compiled extension' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "x = torch.randn(2, 30, 6)\n"
        "assert torch.equal(ek.knn_graph(x, 4), ek.reference.knn_graph(x.double(), 4))\n"
        "try:\n"
        "    ek.knn_graph(x, 30)\n"
        "    raise SystemExit('no error for k >= N')\n"
        "except RuntimeError as e:\n"
        "    assert 'k must satisfy' in str(e)\n"
        "print('fallback ok')\n"
    )
    env = {**__import__("os").environ, "EXGRAMED_NO_EXTENSION": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "fallback ok" in r.stdout


@pytest.mark.skipif(not triton_available(), reason="triton not importable")
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("G,N,d,k", [(1, 5, 3, 2), (2, 37, 20, 5), (3, 16, 64, 15), (1, 1000, 40, 5), (1, 2048, 20, 3)])
def test_triton(metric, G, N, d, k):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(N + d)
    x = torch.randn(G, N, d, device=device)
    assert_knn_matches_reference(ek.knn_graph(x, k, metric, backend="triton"), x, k, metric)


@pytest.mark.skipif(not triton_available(), reason="triton not importable")
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype, magnitude", [(torch.float32, 1e20), (torch.float32, 1e-30),
                                              (torch.bfloat16, 1e20), (torch.float64, 1e200)])
def test_triton_huge_and_tiny_inputs(metric, dtype, magnitude):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = extreme_input(dtype, magnitude, device, N=24)
    assert_knn_matches_reference(ek.knn_graph(x, 5, metric, backend="triton"), x, 5, metric)
    with pytest.raises(RuntimeError, match="x contains NaN or Inf"):
        ek.knn_graph(x.clone().index_fill_(1, torch.tensor([3], device=device), float("nan")), 5, metric,
                     backend="triton")


@pytest.mark.skipif(not triton_available(), reason="triton not importable")
def test_triton_ties_and_opcheck():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pts = torch.randn(1, 6, 4, device=device)
    x = torch.cat([pts, pts], dim=1)
    from exgramed_kernels.triton.knn_graph import knn_graph_triton

    assert torch.equal(knn_graph_triton(x, 3, "l2").cpu(), reference.knn_graph(x.double(), 3, "l2"))
    # The CPU interpreter cannot run a kernel on the fake tensors that AOT tracing of a
    # triton_op feeds it, so that one check needs a GPU.
    utils = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if torch.cuda.is_available():
        utils.append("test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.exgramed_triton.knn_graph.default, (x, 3, "l2"), test_utils=utils)
