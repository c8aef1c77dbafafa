"""graph_conv: align's two GraphConv(max) layers against PyG GraphConv and the bare linear layers."""
from __future__ import annotations

import warnings

import torch

import exgramed_kernels as ek
from exgramed_kernels import reference

from .harness import Bench, Case, Provider, feature_dim

G, K = 4, 5


def setup(N, scale, device):
    d = feature_dim(scale, device)
    gen = torch.Generator().manual_seed(N)
    x = torch.randn(G, N, d, generator=gen).to(device).requires_grad_()
    nbr = ek.knn_graph(x.detach(), K)
    # per layer: [W_root; W_rel] in one buffer (one GEMM over [x | agg]) and a bias
    layers = [((torch.rand(2 * d, d, generator=gen) * 2 - 1) / d**0.5, torch.zeros(d)) for _ in range(2)]
    layers = [(w.to(device).requires_grad_(), b.to(device).requires_grad_()) for w, b in layers]

    def ours(backend="auto", impl=None):
        h = x
        for w, b in layers:
            h = (impl or ek.graph_conv)(h, nbr, w[:d], w[d:], b, "max", True, True,
                                        **({} if impl else {"backend": backend}))
        return h

    def floor():  # the same GEMMs without the aggregation
        h = x.flatten(0, 1)
        for w, b in layers:
            h = torch.relu(torch.addmm(b, h, w[:d]) + h @ w[d:])
        return h

    fns = {"ours": ours, "ours (Triton)": lambda: ours("triton"),
           "reference (PyTorch)": lambda: ours(impl=reference.graph_conv), "floor: linear layers": floor}
    try:
        from torch_geometric.nn import GraphConv
    except ImportError:
        GraphConv = None
    if GraphConv is not None:
        convs = [GraphConv(d, d, aggr="max").to(device) for _ in range(2)]
        with torch.no_grad():  # the same weights as ours
            for conv, (w, b) in zip(convs, layers):
                conv.lin_root.weight.copy_(w[:d].T)
                conv.lin_rel.weight.copy_(w[d:].T)
                conv.lin_rel.bias.copy_(b)
        # PyG's batching: one disjoint union of the G graphs; edge (i -> nbr[i, s]) aggregates in-neighbours
        src = torch.arange(G * N, device=device).repeat_interleave(K)
        dst = (nbr + (torch.arange(G, device=device) * N)[:, None, None]).reshape(-1)
        ei = torch.stack([src, dst])

        def pyg():
            h = x.reshape(G * N, d)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for conv in convs:
                    h = torch.relu(conv(h, ei))
            return h

        fns["PyG GraphConv"] = pyg
    return Case(fns, info=dict(d=d, G=G, k=K))


BENCH = Bench(
    op="graph_conv",
    description=f"Two GraphConv(aggr=max) layers with ReLU, d = h, on G = {G} kNN graphs (k = {K}, in-neighbour "
                "direction, as align), fp32; backward: gradients for x and all weights. PyG: two "
                "`torch_geometric.nn.GraphConv` on the disjoint union of the G graphs (PyG's batching), the same "
                "weights. Floor: the same linear layers on all G N rows without the aggregation.",
    x="N",
    sizes={"full": [16, 64, 256, 1024], "quick": [16, 64, 256], "tiny": [16]},
    providers=[Provider("ours", "ours"), Provider("ours (Triton)", "ours", triton=True),
               Provider("PyG GraphConv", requires=("torch_geometric",)), Provider("reference (PyTorch)"),
               Provider("floor: linear layers", "floor")],
    setup=setup,
    modes=("forward", "backward", "full"),
    graph=True,
)
