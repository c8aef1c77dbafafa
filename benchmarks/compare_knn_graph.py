"""knn_graph against dense PyTorch (cdist / addmm + topk) and FAISS flat search, same run.

    python -m benchmarks.compare_knn_graph [--quick]

Writes benchmarks/results/knn_graph.md. G = 4 graphs, k = 5, fp32, l2.
"""
from __future__ import annotations

import argparse

import torch

import exgramed_kernels as ek

from .common import fmt_time, measure, write_markdown


def dense_cdist_topk(x, k):
    d = torch.cdist(x, x).square()
    d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    return d.topk(k, dim=-1, largest=False).indices


def dense_addmm_topk(x, k):
    sq = (x * x).sum(-1)
    d = torch.baddbmm(sq[:, :, None] + sq[:, None, :], x, x.transpose(1, 2), alpha=-2.0)
    d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    return d.topk(k, dim=-1, largest=False).indices


def faiss_flat(x, k):
    import faiss

    out = []
    for xg in x.numpy():
        index = faiss.IndexFlatL2(xg.shape[1])
        index.add(xg)
        _, idx = index.search(xg, k + 1)
        out.append(idx[:, 1:])  # drop self (first at distance 0 for distinct points)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="N in {16, 64} only")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    Ns = [16, 64] if args.quick else [16, 64, 256, 1024]
    G, k = 4, 5
    rows = []
    for d in (512, 4096):
        for N in Ns:
            x = torch.randn(G, N, d)
            ours = measure(lambda: ek.knn_graph(x, k))
            peers = {
                "cdist+topk": measure(lambda: dense_cdist_topk(x, k)),
                "addmm+topk": measure(lambda: dense_addmm_topk(x, k)),
            }
            try:
                peers["faiss flat"] = measure(lambda: faiss_flat(x, k))
            except ImportError:
                pass
            best = min(peers, key=lambda p: peers[p]["median"])
            rows.append(
                [str(N), str(d), fmt_time(ours["median"])]
                + [f"{fmt_time(v['median'])} ({v['median'] / ours['median']:.2f}x)" for v in peers.values()]
                + [f"{peers[best]['median'] / ours['median']:.2f}x vs {best}"]
            )
            print(rows[-1], flush=True)
    header = ["N", "d", "exgramed knn_graph"] + [f"{p} (ours faster by)" for p in peers] + ["vs best peer"]
    text = write_markdown(
        "knn_graph",
        "knn_graph vs dense PyTorch and FAISS (CPU)",
        f"G = {G} graphs, k = {k}, fp32, l2; median wall time; ratio = peer time / ours (>1: ours faster). "
        "Ours ranks by exact fp64 distances; the peers rank by fp32 Gram-form distances and break ties arbitrarily.",
        header,
        rows,
    )
    print(text)


if __name__ == "__main__":
    main()
