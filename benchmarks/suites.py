"""Every op against its peers, in one process, as plain records for the report (CPU).

Each suite returns a list of records ``{"op", "provider", "N", "d", "G", "median", "q20", "q80",
"n", ...}`` (times in seconds). Providers of one size run interleaved (one repetition of each in
turn), so load from other processes on a shared machine falls on all of them alike, and the
ratios of one size are measured in the same seconds. The peers' helpers are imported from the
per-op comparison scripts (``compare_<op>.py``), so the report and those scripts time the same code.

Sizes per mode: ``full`` (the report), ``quick`` (a few minutes), ``tiny`` (the smoke test).
"""
from __future__ import annotations

import statistics
import time
import warnings
from typing import Callable

import torch

import exgramed_kernels as ek

SIZES = {
    "knn_graph": {"full": [16, 64, 256, 1024], "quick": [16, 64, 256], "tiny": [16]},
    "graph_conv": {"full": [16, 64, 256, 1024], "quick": [16, 64, 256], "tiny": [16]},
    "linear_assignment": {"full": [16, 64, 256, 1024], "quick": [16, 64, 256], "tiny": [16]},
    "qap_solve": {"full": [16, 64, 256], "quick": [16, 64], "tiny": [8]},
    "align": {"full": [16, 64, 256, 1024], "quick": [16, 64], "tiny": [8]},
}
DIMS = {"full": 512, "quick": 512, "tiny": 32}
# The official-equivalent align pipeline loops over edges in Python and solves with scipy per
# problem: it is only run up to this B.
OFFICIAL_MAX_B = {"full": 256, "quick": 64, "tiny": 8}
PYGM_MAX_N = {"full": 16, "quick": 16, "tiny": 8}  # pygmtools' dense affinity is N^2 x N^2


# The clock of every suite: wall time, or the CPU time of this process ("process"), which on a shared,
# oversubscribed machine measures the work done rather than the other jobs (exact with one torch thread).
CLOCK = {"name": "wall", "fn": time.perf_counter}


def set_clock(name: str) -> None:
    if name not in ("wall", "process"):
        raise ValueError(f"clock must be 'wall' or 'process', got {name!r}")
    CLOCK.update(name=name, fn=time.perf_counter if name == "wall" else time.process_time)
    if name == "process":
        try:  # FAISS runs its own OpenMP pool: one thread, so CPU time equals its work
            import faiss

            faiss.omp_set_num_threads(1)
        except ImportError:
            pass


def interleaved(providers: dict[str, Callable[[], object]], reps: int, budget_s: float, warmup: int = 1) -> dict:
    """Median / 20 % / 80 % wall times of each provider, repetitions interleaved across providers.

    Stops after ``reps`` rounds, or after 3 rounds once ``budget_s`` seconds have passed.
    """
    for fn in providers.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in providers}
    clock = CLOCK["fn"]
    start = time.perf_counter()
    for r in range(reps):
        for name, fn in providers.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {name: _stats(t) for name, t in times.items()}


def _stats(t: list[float]) -> dict:
    s = sorted(t)
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
    return {"median": statistics.median(s), "q20": q(0.2), "q80": q(0.8), "n": len(s)}


def _records(op, stats, **size):
    return [dict(op=op, provider=p, **size, **v) for p, v in stats.items()]


def _reps(mode):
    return {"full": 7, "quick": 5, "tiny": 3}[mode]


def _budget(mode):
    return {"full": 20.0, "quick": 8.0, "tiny": 1.0}[mode]


# ----------------------------------------------------------------------------------------- knn_graph


def knn_suite(mode: str, log=print) -> list[dict]:
    """knn_graph (exact fp64 ranking) vs dense torch (cdist / addmm + topk), FAISS flat, and the Gram GEMM."""
    from .compare_knn_graph import dense_addmm_topk, dense_cdist_topk, faiss_flat

    G, k, d = 4, 5, DIMS[mode]
    out = []
    for N in SIZES["knn_graph"][mode]:
        x = torch.randn(G, N, d, generator=torch.Generator().manual_seed(N))
        providers = {
            "ours": lambda: ek.knn_graph(x, k),
            "addmm+topk": lambda: dense_addmm_topk(x, k),
            "cdist+topk": lambda: dense_cdist_topk(x, k),
            "floor (Gram GEMM)": lambda: torch.bmm(x, x.transpose(1, 2)),
        }
        try:
            import faiss  # noqa: F401

            providers["faiss flat"] = lambda: faiss_flat(x, k)
        except ImportError:
            pass
        st = interleaved(providers, _reps(mode), _budget(mode))
        out += _records("knn_graph", st, N=N, d=d, G=G, k=k)
        log(f"knn_graph N={N}: " + _line(st))
    return out


# ---------------------------------------------------------------------------------------- graph_conv


def graph_conv_suite(mode: str, log=print) -> list[dict]:
    """2-layer GraphConv(max) fwd+bwd: ours (GraphConvNet) vs PyG GraphConv per graph vs the bare linear layers."""
    from .compare_graph_conv import floor_step, make_problem, ours_step, pyg_step

    try:
        from torch_geometric.nn import GraphConv
    except ImportError:
        GraphConv = None
    G, k, d = 4, 5, DIMS[mode]
    out = []
    for N in SIZES["graph_conv"][mode]:
        torch.manual_seed(0)
        x, nbr = make_problem(G, N, k, d)
        net = ek.GraphConvNet(d, d, num_layers=2, aggr="max", dropout=0.0, reverse=True)
        layers = [((torch.randn(d, d) / d**0.5).requires_grad_(), (torch.randn(d, d) / d**0.5).requires_grad_(),
                   torch.zeros(d, requires_grad=True)) for _ in range(2)]
        providers = {"ours": lambda: ours_step(net, x, nbr), "floor (linear layers)": lambda: floor_step(layers, x)}
        if GraphConv is not None:
            convs = [GraphConv(d, d, aggr="max") for _ in range(2)]
            i = torch.arange(N).repeat_interleave(k)
            edges = [torch.stack([i, nbr[g].reshape(-1)]) for g in range(G)]
            providers["PyG GraphConv"] = lambda: pyg_step(convs, x, edges)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            st = interleaved(providers, _reps(mode), _budget(mode))
        out += _records("graph_conv", st, N=N, d=d, G=G, k=k)
        log(f"graph_conv N={N}: " + _line(st))
    return out


# --------------------------------------------------------------------------------- linear_assignment


def linear_assignment_suite(mode: str, log=print) -> list[dict]:
    """Batched exact LAP (float64, maximise) vs scipy.optimize.linear_sum_assignment in a loop (same batch)."""
    from scipy.optimize import linear_sum_assignment

    G = 12
    out = []
    for N in SIZES["linear_assignment"][mode]:
        S = torch.rand(G, N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(N))
        Sn = S.numpy()
        providers = {
            "ours": lambda: ek.linear_assignment(S),
            "scipy LAPJV (loop)": lambda: [linear_sum_assignment(s, maximize=True) for s in Sn],
        }
        st = interleaved(providers, _reps(mode), _budget(mode))
        out += _records("linear_assignment", st, N=N, d=0, G=G)
        log(f"linear_assignment N={N}: " + _line(st))
    return out


# ----------------------------------------------------------------------------------------- qap_solve


def qap_suite(mode: str, log=print) -> list[dict]:
    """qap_solve (fw) vs pygmtools RRWM (dense affinity; small N) and scipy FAQ (Koopmans-Beckmann instances).

    Objective ratios (peer / ours on the same instances, mean over the batch) go into ``objective_ratio``.
    """
    import numpy as np
    from scipy.optimize import quadratic_assignment

    from .compare_qap_solve import G, K, features_instance, kb_instance, lawler, objective

    out = []
    for N in SIZES["qap_solve"][mode]:
        U, n1, n2, Q, H1, H2 = features_instance(N, N)
        U0, m1, m2, Qk, w1, w2 = kb_instance(N, N + 1)

        def faq():
            res = []
            for g in range(G):
                A, B = np.zeros((N, N)), np.zeros((N, N))
                A[np.repeat(np.arange(N), K), m1[g].reshape(-1).numpy()] = w1[g].numpy()
                B[np.repeat(np.arange(N), K), m2[g].reshape(-1).numpy()] = w2[g].numpy()
                res.append(quadratic_assignment(A, B, method="faq",
                                                options={"maximize": True, "rng": np.random.default_rng(0)}))
            return res

        providers = {
            "ours": lambda: ek.qap_solve(U, n1, n2, Q),
            "ours (KB instances)": lambda: ek.qap_solve(U0, m1, m2, Qk),
            "scipy FAQ (KB instances)": faq,
        }
        Kd = None
        if N <= PYGM_MAX_N[mode]:
            try:
                import pygmtools as pygm

                pygm.set_backend("pytorch")
                Kd = lawler(U, n1, n2, Q)
                nn_ = torch.full((G,), N)
                providers["pygmtools RRWM"] = lambda: pygm.hungarian(pygm.rrwm(Kd, nn_, nn_))
            except ImportError:
                pass
        st = interleaved(providers, {"full": 3, "quick": 3, "tiny": 2}[mode], _budget(mode), warmup=0)
        # Quality on the same instances (one more solve each, outside the timing).
        f_ours = objective(ek.qap_solve(U, n1, n2, Q)[0], U, n1, n2, Q)
        f_kb = objective(ek.qap_solve(U0, m1, m2, Qk)[0], U0, m1, m2, Qk)
        ratios = {"ours": 1.0, "ours (KB instances)": 1.0,
                  "scipy FAQ (KB instances)": float((torch.tensor([r.fun for r in faq()], dtype=torch.float64)
                                                     / f_kb).mean())}
        if Kd is not None:
            ratios["pygmtools RRWM"] = float((objective(pygm.hungarian(pygm.rrwm(Kd, nn_, nn_)), U, n1, n2, Q)
                                              / f_ours).mean())
        recs = _records("qap_solve", st, N=N, d=0, G=G, k=K)
        for r in recs:
            r["objective_ratio"] = ratios[r["provider"]]
        out += recs
        log(f"qap_solve N={N}: " + _line(st))
    return out


# --------------------------------------------------------------------------------------------- align


def align_suite(mode: str, log=print) -> list[dict]:
    """align fwd+bwd (MultiGraphAlignment, official settings) vs the official-equivalent pipeline and the GEMM floor."""
    from .compare_align import K, KNN, floor_gemms, official_pipeline
    from exgramed_kernels.module import sample_gumbel

    d = DIMS[mode]
    out = []
    for B in SIZES["align"][mode]:
        torch.manual_seed(0)
        x = torch.randn(K, B, d)
        m = ek.MultiGraphAlignment(d, d, k=KNN, official=True, dropout=0.0)

        def ours():
            m(x.clone().requires_grad_()).loss.backward()

        ws = [p.detach().clone().requires_grad_() for p in (m.w_root1, m.w_rel1, m.w_root2, m.w_rel2)]
        providers = {"ours": ours, "floor (GraphConv GEMMs)": lambda: floor_gemms(x, ws)}
        if B <= OFFICIAL_MAX_B[mode]:
            try:
                from torch_geometric.nn import GraphConv

                convs = (GraphConv(d, d, aggr="max"), GraphConv(d, d, aggr="max"))
                un, qn = sample_gumbel((2 * K, B, B)), sample_gumbel((2 * K, B * KNN, B * KNN))
                providers["official-equivalent"] = lambda: official_pipeline(x.clone().requires_grad_(), convs,
                                                                             un, qn, {})
            except ImportError:
                pass
        big = B >= 256
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            st = interleaved(providers, 1 if (big and mode == "full") else _reps(mode), _budget(mode),
                             warmup=0 if big else 1)
        out += _records("align", st, N=B, d=d, G=K + 1, k=KNN)
        log(f"align B={B}: " + _line(st))
    return out


SUITES = {
    "knn_graph": knn_suite,
    "graph_conv": graph_conv_suite,
    "linear_assignment": linear_assignment_suite,
    "qap_solve": qap_suite,
    "align": align_suite,
}


def _line(st: dict) -> str:
    return ", ".join(f"{p} {v['median'] * 1e3:.2f} ms" for p, v in st.items())
