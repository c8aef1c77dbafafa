"""knn_graph against dense PyTorch (addmm / cdist + topk), FAISS flat search and the Gram GEMM floor."""
from __future__ import annotations

import torch

import exgramed_kernels as ek
from exgramed_kernels import reference

from .harness import Bench, Case, Provider, feature_dim

G, K = 4, 5


def addmm_topk(x, k):
    sq = (x * x).sum(-1)
    d = torch.baddbmm(sq[:, :, None] + sq[:, None, :], x, x.transpose(1, 2), alpha=-2.0)
    d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    return d.topk(k, dim=-1, largest=False).indices


def cdist_topk(x, k):
    d = torch.cdist(x, x).square()
    d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    return d.topk(k, dim=-1, largest=False).indices


def faiss_flat(xs, k):
    import faiss

    out = []
    for xg in xs:
        index = faiss.IndexFlatL2(xg.shape[1])
        index.add(xg)
        out.append(index.search(xg, k + 1)[1][:, 1:])  # the first hit is the point itself
    return out


def setup(N, scale, device):
    d = feature_dim(scale, device)
    x = torch.randn(G, N, d, generator=torch.Generator().manual_seed(N)).to(device)
    xs = x.cpu().numpy()
    return Case({
        "ours": lambda: ek.knn_graph(x, K),
        "ours (Triton)": lambda: ek.knn_graph(x, K, backend="triton"),
        "addmm+topk": lambda: addmm_topk(x, K),
        "cdist+topk": lambda: cdist_topk(x, K),
        "FAISS flat": lambda: faiss_flat(xs, K),
        "reference (PyTorch)": lambda: reference.knn_graph(x, K),
        "floor: Gram GEMM": lambda: torch.bmm(x, x.transpose(1, 2)),
    }, info=dict(d=d, G=G, k=K))


BENCH = Bench(
    op="knn_graph",
    description=f"G = {G} graphs of N nodes, k = {K}, l2, fp32. Ours ranks by exact fp64 distances (ties to the "
                "lower index); the dense peers rank fp32 Gram-form distances. FAISS: `IndexFlatL2` per graph, one "
                "OpenMP thread. Floor: the Gram GEMM `bmm(x, x^T)` alone.",
    x="N",
    sizes={"full": [16, 64, 256, 1024], "quick": [16, 64, 256], "tiny": [16]},
    providers=[Provider("ours", "ours"), Provider("ours (Triton)", "ours", triton=True), Provider("addmm+topk"),
               Provider("cdist+topk"), Provider("FAISS flat", devices=("cpu",), requires=("faiss",)),
               Provider("reference (PyTorch)"), Provider("floor: Gram GEMM", "floor")],
    setup=setup,
    graph=True,
)
