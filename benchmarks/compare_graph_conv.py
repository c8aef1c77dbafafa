"""graph_conv vs PyG GraphConv(aggr="max") and vs the bare-linear floor, measured in the same run.

Workload (ExGra-Med's message passing): 2 layers, d = h, ReLU after each, G kNN graphs of N
nodes and k = 5 (in-neighbour direction, as the official pipeline), forward + backward
(gradients for x and all weights). Providers:

* ours:  exgramed_kernels.GraphConvNet (one batched op per layer, one GEMM over [x | agg]).
* pyg:   two torch_geometric.nn.GraphConv(aggr="max") layers applied graph by graph.
* floor: the bare linear layers of the same computation, relu(x @ W_root + x @ W_rel + b) per
         layer on all G*N rows (no aggregation): the GEMM work any implementation must do.

Dropout is off (p = 0) in every provider. Times are medians over interleaved repetitions.

    python benchmarks/compare_graph_conv.py [--threads 2] [--out benchmarks/results/graph_conv.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import exgramed_kernels as ek  # noqa: E402
from benchmarks.common import cpu_name  # noqa: E402


def make_problem(G, N, k, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(G, N, d, generator=gen)
    nbr = ek.knn_graph(x, k)
    return x, nbr


def ours_step(net, x, nbr):
    xg = x.detach().requires_grad_(True)
    net(xg, nbr).sum().backward()


def pyg_step(convs, x, edge_indices):
    xg = x.detach().requires_grad_(True)
    total = 0
    for g in range(x.shape[0]):
        h = xg[g]
        for conv in convs:
            h = torch.relu(conv(h, edge_indices[g]))
        total = total + h.sum()
    total.backward()


def floor_step(layers, x):
    xg = x.detach().requires_grad_(True)
    h = xg.flatten(0, 1)
    for w_root, w_rel, b in layers:
        h = torch.relu(torch.addmm(b, h, w_root) + h @ w_rel)
    h.sum().backward()


def run_case(G, N, k, d, reps, budget_s, clock=time.perf_counter):
    from torch_geometric.nn import GraphConv

    torch.manual_seed(0)
    x, nbr = make_problem(G, N, k, d)
    net = ek.GraphConvNet(d, d, num_layers=2, aggr="max", dropout=0.0, reverse=True)
    convs = [GraphConv(d, d, aggr="max") for _ in range(2)]
    edge_indices = []
    for g in range(G):
        i = torch.arange(N).repeat_interleave(k)
        edge_indices.append(torch.stack([i, nbr[g].reshape(-1)]))  # source_to_target: j aggregates i
    layers = []
    for _ in range(2):
        w_root = (torch.randn(d, d) / d**0.5).requires_grad_(True)
        w_rel = (torch.randn(d, d) / d**0.5).requires_grad_(True)
        layers.append((w_root, w_rel, torch.zeros(d, requires_grad=True)))
    providers = {
        "ours": lambda: ours_step(net, x, nbr),
        "pyg": lambda: pyg_step(convs, x, edge_indices),
        "floor": lambda: floor_step(layers, x),
    }
    times = {name: [] for name in providers}
    for fn in providers.values():
        fn()  # warm-up
    t_start = time.perf_counter()
    for r in range(reps):
        for name, fn in providers.items():  # interleaved, so load from other processes hits all alike
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
        if r >= 2 and time.perf_counter() - t_start > budget_s:
            break
    return {name: statistics.median(t) for name, t in times.items()}, len(times["ours"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "graph_conv.md"))
    ap.add_argument("--sizes", default="16,64,256,1024")
    ap.add_argument("--dims", default="512,4096")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--budget", type=float, default=60.0, help="skip a case whose estimated total exceeds this (s)")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="process: CPU time of this process (with --threads 1, robust to other load on a shared machine)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import torch_geometric

    G, k = 4, 5
    rows, skipped = [], []
    print(f"threads={args.threads} clock={args.clock}", flush=True)
    for d in [int(v) for v in args.dims.split(",")]:
        for N in [int(v) for v in args.sizes.split(",")]:
            # Estimate from the GEMM work (2 layers x 3 GEMMs of 2*G*N*2d*d FLOPs) at ~100 GFLOP/s.
            est = 2 * 3 * 2 * G * N * 2 * d * d / 100e9 * 3 * (args.reps + 1)
            if est > args.budget:
                skipped.append(f"N={N}, d={d} (estimated {est:.0f} s for the three providers)")
                continue
            clock = time.perf_counter if args.clock == "wall" else time.process_time
            med, n = run_case(G, N, k, d, args.reps, args.budget, clock)
            rows.append((N, d, med["ours"], med["pyg"], med["floor"], n))
            print(f"N={N:5d} d={d:5d}  ours {med['ours']*1e3:9.2f} ms  pyg {med['pyg']*1e3:9.2f} ms  "
                  f"floor {med['floor']*1e3:9.2f} ms  pyg/ours {med['pyg']/med['ours']:.2f}  ours/floor {med['ours']/med['floor']:.2f}",
                  flush=True)
    cpu = cpu_name()
    lines = [
        "# graph_conv: 2-layer GraphConv(aggr=\"max\"), forward + backward",
        "",
        f"Machine: {cpu}, {os.cpu_count()} logical CPUs, `torch.set_num_threads({args.threads})`; torch {torch.__version__}, "
        f"torch_geometric {torch_geometric.__version__}, Python {platform.python_version()}.",
        f"Workload: G = {G} kNN graphs (k = {k}, in-neighbour direction as the official pipeline), d = h, 2 layers with ReLU, "
        "dropout off, fp32, gradients for x and all weights. Medians of interleaved repetitions, "
        + ("wall-clock time." if args.clock == "wall" else
           "CPU time of the process (`time.process_time`): the machine is shared by several jobs, so wall-clock "
           "times there measure the other jobs; with one thread the CPU time is the work done."),
        "",
        "* ours: `exgramed_kernels.GraphConvNet` (one `torch.ops.exgramed.graph_conv_stacked` per layer for all graphs, "
        "one GEMM over `[x | agg]` with the stacked `[W_root; W_rel]`)",
        "* pyg: two `torch_geometric.nn.GraphConv(aggr=\"max\")` applied graph by graph",
        "* floor: the bare linear layers `relu(x @ W_root + x @ W_rel + b)` on all G*N rows (no aggregation)",
        "",
        "| N | d = h | ours (ms) | PyG (ms) | floor (ms) | PyG / ours | ours / floor | reps |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for N, d, o, p, f, n in rows:
        lines.append(f"| {N} | {d} | {o*1e3:.2f} | {p*1e3:.2f} | {f*1e3:.2f} | {p/o:.2f}x | {o/f:.2f} | {n} |")
    if skipped:
        lines += ["", "Skipped (over the time budget of this run): " + "; ".join(skipped) + "."]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
