"""What a cheaper solve buys and costs: qap_solve's budget (max_iter, tol, starts) against solve time and
matching quality, on align's own problems (official settings, K = 3, k = 5, d = h = 512).

    python -m experiments.solver_budget [--sizes 16:16,64:16,256:4] [--threads 1]

Each size runs several random batches (``B:batches``); every batch gives align's 2K = 6 noisy forward
problems. Per budget: the median time of one batched ``qap_solve`` call (6 problems; the budgets timed
interleaved by the benchmark harness), the mean objective relative to align's default budget (the first
row) and to the official-equivalent's solver (``benchmarks.align.fw_scipy``: scipy-LAP Frank-Wolfe, 50
iterations from the barycenter), and on how many problems ours is at least as good as that peer.
Writes ``experiments/results/solver_budget.md``.
"""
from __future__ import annotations

import argparse

import torch

import exgramed_kernels as ek
from benchmarks.align import KNN, K, forward_problems, peer_objectives
from benchmarks.harness import markdown_table, measure

from . import write_results

# (max_iter, tol, restarts): align's default first, then qap_solve's max_iter, cheaper stops, and more starts
BUDGETS = [(50, 1e-6, 1), (30, 1e-6, 1), (50, 1e-8, 1), (30, 1e-4, 1), (30, 1e-3, 1), (30, 1e-2, 1), (10, 1e-6, 1),
           (5, 1e-6, 1), (3, 1e-6, 1), (50, 1e-6, 4)]


def problems(B, seed, d=512):
    """align's forward problems for one random batch, official settings: (U, Q, nbr1, nbr2, partial)."""
    torch.manual_seed(seed)
    x = torch.randn(K, B, d)
    m = ek.MultiGraphAlignment(d, d, k=KNN, official=True, dropout=0.0)
    return (*forward_problems(m, x, seed + 1 + torch.arange(2 * K)), m.config.partial)


def run(sizes, scale="quick", log=print):
    rows = []
    for B, batches in sizes:
        times, obj, peers = {b: [] for b in BUDGETS}, {b: [] for b in BUDGETS}, []
        for seed in range(batches):
            U, Q, n1, n2, partial = problems(B, seed)
            peers.append(peer_objectives(U, Q, n1, n2, partial))
            solve = {b: (lambda b=b: ek.qap_solve(U, n1, n2, Q, max_iter=b[0], tol=b[1], restarts=b[2],
                                                  partial=partial)[0]) for b in BUDGETS}
            for b, st in measure({b: (f, "cpu") for b, f in solve.items()}, scale).items():
                times[b].append(st["median"])
                obj[b].append(ek.qap_objective(solve[b]().double(), U.double(), n1, n2, Q.double()))
        peer, base = torch.cat(peers), torch.cat(obj[BUDGETS[0]])
        t_base = torch.tensor(times[BUDGETS[0]]).median()
        for b in BUDGETS:
            o, t = torch.cat(obj[b]), torch.tensor(times[b]).median()
            rel = (o - peer) / peer.abs()
            rows.append(dict(B=B, budget=b, ms=float(t) * 1e3, speedup=float(t_base / t),
                             vs_default=float(((o - base) / base.abs()).mean()), vs_peer=float(rel.mean()),
                             worst_vs_peer=float(rel.min()), at_least_peer=int((o >= peer - 1e-9 * peer.abs()).sum()),
                             n=len(o)))
            log(rows[-1])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="16:16,64:16,256:4", help="B:batches, comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = run([tuple(int(v) for v in s.split(":")) for s in a.sizes.split(",")])
    table = [[str(r["B"]), str(r["budget"][0]), f"{r['budget'][1]:g}", str(r["budget"][2]), f"{r['ms']:.1f}",
              f"{r['speedup']:.2f}x", f"{100 * r['vs_default']:+.2f} %",
              f"{100 * r['vs_peer']:+.2f} % / {100 * r['worst_vs_peer']:+.2f} %", f"{r['at_least_peer']}/{r['n']}"]
             for r in rows]
    return write_results(
        "solver_budget", "The solver's budget against its quality",
        f"python -m experiments.solver_budget --sizes {a.sizes} --threads {a.threads}",
        ["align's forward problems (official settings, K = 3, k = 5, d = h = 512), one batched `qap_solve` of the 6 "
         "problems of a batch per budget, Frank-Wolfe from the barycenter (further starts random) plus 2-opt. "
         "Objectives relative to the first row (align's default) and to the official-equivalent's solver on the "
         "same problems; the last column counts the problems where ours is at least as good as that peer.", ""]
        + markdown_table(["B", "max_iter", "tol", "starts", "solve (ms, 6 problems)", "speed-up vs default",
                          "objective vs default", "vs peer: mean / worst", "ours >= peer"], table))


if __name__ == "__main__":
    print("wrote", main())
