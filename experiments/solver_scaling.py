"""The solver at scale (issue 18): align's stages against B with the GEMM floor, the solver's quality
contract, linear_assignment against the ``lap`` package's ``lapjv``, and align's peak memory.

    python experiments/solver_scaling.py --part lap|stages|quality|memory|all [--threads 1,2]
    python experiments/solver_scaling.py --part objectives --objectives-out base.json   # at the base commit

Parts (each writes experiments/results/solver_scaling_<part>.json, and experiments/results/solver_scaling.md is rendered
from all of them, so parts can be rerun one at a time):

``lap``: ``ek.linear_assignment`` on a batch of 12 uniform random float64 problems (maximise) against
``lap.lapjv`` in a loop over the same batch (on the negated scores), interleaved repetitions of ~20 ms
each, medians;
at one thread the clock is this process's CPU time (the work, whatever else runs on a shared machine),
at more threads wall time (ours only: lapjv is single-threaded).

``stages``: one forward + backward of ``MultiGraphAlignment(512, official=True, dropout=0)`` (the
setting of benchmarks/RESULTS.md) and of the default module at K = 3, k = 5, against the GEMM floor
(``benchmarks.align.floor_gemms``, the GraphConv linear layers' forward + backward) in the same rounds. The
stages are the op's calls run one by one: knn (``knn_graph``), graph_conv (both layers, forward), scores
(``problem_scores`` with the in-kernel quadratic noise, and the unary noise), solve fwd (the batched
``qap_solve``), solve bwd (the estimator's re-solve at ``U - lambda dL/dZ``, the Hamming loss's gradient,
on the forward's Q tensor as in the step);
"backward rest" is the whole step minus those. Exponents: least-squares slopes of log time on log B over
all B measured.

``quality``: align's forward problems (``benchmarks.align.forward_problems``: the 2K = 6 noisy problems of a
batch, x ~ N(0, 1), d = h = 512) at the default and the official settings, ``qap_solve`` with the
module's solver options; objectives in float64 against the official-equivalent solver
(``benchmarks.align.peer_objectives``: scipy-LAP Frank-Wolfe, 50 iterations) and against the objectives of
the base commit's solver on the same problems (``--part objectives`` run there with ``--root`` pointing at
its build, written to experiments/results/solver_scaling_base_objectives.json).

``memory``: the resident-set rise of one forward + backward at B = 1024 in a fresh process
(``benchmarks.overhead.peak_in_fresh_process``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
MD_PATH = os.path.join(RESULTS, "solver_scaling.md")
PARTS = ("lap", "stages", "quality", "memory")


JSON_DIR = [RESULTS]


def json_path(part):
    return os.path.join(JSON_DIR[0], f"solver_scaling_{part}.json")


def _root_from_argv():
    """``--root DIR``: import exgramed_kernels from another checkout (the base commit's build)."""
    if "--root" in sys.argv:
        return sys.argv[sys.argv.index("--root") + 1]
    return ROOT


sys.path.insert(0, ROOT)
sys.path.insert(0, _root_from_argv())

import numpy as np  # noqa: E402
import torch  # noqa: E402

import exgramed_kernels as ek  # noqa: E402

K, KNN, D = 3, 5, 512
SETTINGS = ("default", "official")
TARGETS = {64: 2.0, 256: 2.5, 1024: 4.0}  # issue 18's align / floor targets


def module(setting, B_unused=None):
    return ek.MultiGraphAlignment(D, D, k=KNN, official=setting == "official", dropout=0.0)


# ------------------------------------------------------------------------------------------------ lap


def part_lap(threads_list, sizes=(64, 256, 1024), G=12, reps=7):
    import lap

    out = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        clock = time.process_time if threads == 1 else time.perf_counter
        for N in sizes:
            S = torch.rand(G, N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(N))
            C = [np.ascontiguousarray(-s.numpy()) for s in S]
            providers = {"ours": lambda: ek.linear_assignment(S, True)}
            if threads == 1:
                providers["lapjv"] = lambda: [lap.lapjv(c) for c in C]
            times = {p: [] for p in providers}
            t0 = clock()
            for fn in providers.values():
                fn()
            # a sample repeats the call so that it lasts ~20 ms (clock and scheduler noise)
            inner = max(1, int(0.02 / max(clock() - t0, 1e-6)))
            for _ in range(reps if N < 1024 else max(3, reps // 2)):
                for p, fn in providers.items():
                    t0 = clock()
                    for _ in range(inner):
                        fn()
                    times[p].append((clock() - t0) / inner)
            # the same optimum (float64 objective) as lapjv
            cols = ek.linear_assignment(S, True)
            ours_obj = S.gather(2, cols.unsqueeze(2)).sum((1, 2))
            peer_obj = torch.tensor([-lap.lapjv(c)[0] for c in C], dtype=torch.float64)
            rec = dict(threads=threads, N=N, G=G, clock="cpu" if threads == 1 else "wall",
                       ours=statistics.median(times["ours"]),
                       lapjv=statistics.median(times["lapjv"]) if "lapjv" in times else None,
                       max_objective_gap=float((ours_obj - peer_obj).abs().max()))
            out.append(rec)
            print(f"lap threads={threads} N={N}: ours {rec['ours'] * 1e3:.2f} ms"
                  + (f", lapjv {rec['lapjv'] * 1e3:.2f} ms ({rec['lapjv'] / rec['ours']:.2f}x)" if rec["lapjv"] else ""),
                  flush=True)
    torch.set_num_threads(1)
    return out


# --------------------------------------------------------------------------------------------- stages


def _stage_times(m, x, clock):
    """The op's stages one by one (no autograd), as the composite runs them: seconds per stage."""
    from exgramed_kernels.align import hamming_to_identity, problem_graphs, problem_scores
    from exgramed_kernels.module import sample_gumbel

    o = m.config
    T = {}
    t0 = clock()

    def lap(name):
        nonlocal t0
        now = clock()
        T[name] = now - t0
        t0 = now

    Kx, B, _ = x.shape
    with torch.no_grad():
        graphs = torch.cat([x, x.mean(0, keepdim=True)])
        nbr = torch.ops.exgramed.knn_graph(graphs, o.k, o.metric)
        lap("knn")
        h = torch.ops.exgramed.graph_conv(graphs, nbr, m.w_root1, m.w_rel1, m.bias1, o.aggr, o.reverse, True)
        h = torch.ops.exgramed.graph_conv(h, nbr, m.w_root2, m.w_rel2, m.bias2, o.aggr, o.reverse, True)
        lap("graph_conv")
        src, dst = problem_graphs(Kx, o.mode)
        P = len(src)
        U, Q, nbr1, nbr2 = problem_scores(h, nbr, src, dst, o.copy_structure, None, o.noise_scale,
                                          torch.randint(0, 2**62, (P,)), o.edge_floor)
        un = sample_gumbel((1 if o.shared_noise else P, B, B))
        U = U + o.noise_scale * un
        lap("scores")
        Q.requires_grad_()  # as in the step: the forward solve keeps grad q(J/N) for the re-solve (CPU)
        Z, _ = torch.ops.exgramed.qap_solve(U, nbr1, nbr2, Q, None, None, o.solver, o.max_iter, o.tol, o.restarts,
                                            o.partial, o.seed, o.estimator, o.lambda_, None, True)
        lap("solve fwd")
        Zr = Z.detach().requires_grad_()
        with torch.enable_grad():
            g, = torch.autograd.grad(hamming_to_identity(Zr, Z.dtype).sum() / P, Zr)
        t0 = clock()
        torch.ops.exgramed.qap_solve(U - o.lambda_ * g, nbr1, nbr2, Q, None, None, o.solver, o.max_iter, o.tol,
                                     o.restarts, o.partial, o.seed, "imle", o.lambda_)
        lap("solve bwd")
    return T


def part_stages(threads_list, sizes=(16, 64, 256, 1024), rounds=None):
    from benchmarks.align import floor_gemms

    def floor_step(x, ws):  # forward + backward, the input's gradient included
        floor_gemms(x.detach().requires_grad_(), ws).sum().backward()

    out = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        clock = time.process_time if threads == 1 else time.perf_counter
        for setting in SETTINGS:
            for B in sizes:
                torch.manual_seed(0)
                x = torch.randn(K, B, D)
                m = module(setting)
                ws = [p.detach().clone().requires_grad_() for p in (m.w_root1, m.w_rel1, m.w_root2, m.w_rel2)]

                def step():
                    m(x.clone().requires_grad_()).loss.backward()

                n = rounds or (7 if B <= 64 else 3 if B <= 256 else 2)
                step()
                floor_step(x, ws)
                tot, flo, st = [], [], []
                for _ in range(n):
                    t0 = clock()
                    step()
                    tot.append(clock() - t0)
                    t0 = clock()
                    floor_step(x, ws)
                    flo.append(clock() - t0)
                    st.append(_stage_times(m, x, clock))
                stages = {k: statistics.median(s[k] for s in st) for k in st[0]}
                rec = dict(threads=threads, setting=setting, B=B, clock="cpu" if threads == 1 else "wall",
                           total=statistics.median(tot), floor=statistics.median(flo), stages=stages, rounds=n,
                           dense_q_entries=2 * K * (B * KNN) ** 2)
                rec["stages"]["backward rest"] = max(0.0, rec["total"] - sum(stages.values()))
                out.append(rec)
                print(f"stages threads={threads} {setting} B={B}: total {rec['total'] * 1e3:.1f} ms, floor "
                      f"{rec['floor'] * 1e3:.1f} ms ({rec['total'] / rec['floor']:.2f}x); "
                      + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in rec["stages"].items()), flush=True)
    torch.set_num_threads(1)
    return out


def exponents(recs, key, min_b=0):
    """Least-squares slope of log(time) on log(B) per (threads, setting) for stage ``key`` (or total/floor),
    over the sizes B >= min_b."""
    res = {}
    groups = {}
    for r in recs:
        if r["B"] >= min_b:
            groups.setdefault((r["threads"], r["setting"]), []).append(r)
    for g, rs in groups.items():
        xs = [math.log(r["B"]) for r in rs]
        ys = [math.log(max(1e-9, r[key] if key in ("total", "floor") else r["stages"][key])) for r in rs]
        if len(xs) < 2:
            continue
        mx, my = statistics.mean(xs), statistics.mean(ys)
        res[g] = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return res


# -------------------------------------------------------------------------------------------- quality


def problems(setting, B, batch):
    """align's forward problems of one random batch: (U, Q, nbr1, nbr2, config)."""
    from benchmarks.align import forward_problems

    torch.manual_seed(1000 * B + batch)
    x = torch.randn(K, B, D)
    m = module(setting)
    U, Q, n1, n2 = forward_problems(m, x, 7919 * batch + B + torch.arange(2 * K))
    return U, Q, n1, n2, m.config


def our_objectives(U, Q, n1, n2, o):
    with torch.no_grad():
        Z, _ = ek.qap_solve(U, n1, n2, Q, method=o.solver, max_iter=o.max_iter, tol=o.tol, restarts=o.restarts,
                            partial=o.partial, seed=o.seed)
        return ek.qap_objective(Z.double(), U.double(), n1, n2, Q.double())


def part_objectives(batches):
    """Our objectives only (run at the base commit with --root for the baseline)."""
    out = {}
    for setting in SETTINGS:
        for B, nb in batches.items():
            objs = []
            for b in range(nb):
                U, Q, n1, n2, o = problems(setting, B, b)
                objs += our_objectives(U, Q, n1, n2, o).tolist()
            out[f"{setting}/{B}"] = objs
            print(f"objectives {setting} B={B}: {len(objs)} problems", flush=True)
    return out


BASELINE_PATH = os.path.join(RESULTS, "solver_scaling_base_objectives.json")


def compare_baseline(rec, baseline):
    """Add the comparison with the base commit's objectives of the same problems (when known) to ``rec``."""
    base = (baseline or {}).get(f"{rec['setting']}/{rec['B']}")
    ours = torch.tensor(rec["objectives"], dtype=torch.float64)
    if base is not None and len(base) >= len(ours):  # the batches are numbered: a prefix is the same problems
        base = torch.tensor(base[:len(ours)], dtype=torch.float64)
        rec.update(mean_baseline=float(base.mean()),
                   mean_vs_baseline=float(((ours - base) / base.abs().clamp_min(1e-9)).mean()),
                   worst_vs_baseline=float(((ours - base) / base.abs().clamp_min(1e-9)).min()),
                   identical_to_baseline=int((ours == base).sum()))


def part_quality(batches, baseline):
    from benchmarks.align import peer_objectives

    out = []
    for setting in SETTINGS:
        for B, nb in batches.items():
            ours, peer = [], []
            for b in range(nb):
                U, Q, n1, n2, o = problems(setting, B, b)
                ours.append(our_objectives(U, Q, n1, n2, o))
                peer.append(peer_objectives(U, Q, n1, n2, o.partial))
            ours, peer = torch.cat(ours), torch.cat(peer)
            rel = (ours - peer) / peer.abs().clamp_min(1e-9)
            rec = dict(setting=setting, B=B, problems=len(ours), mean_objective=float(ours.mean()),
                       mean_vs_peer=float(rel.mean()), worst_vs_peer=float(rel.min()),
                       below_peer_by_more_than_half_percent=int((rel < -0.005).sum()),
                       at_least_peer=int((ours >= peer - 1e-9 * peer.abs()).sum()))
            rec["objectives"] = ours.tolist()
            compare_baseline(rec, baseline)
            out.append(rec)
            print(f"quality {setting} B={B}: {rec['problems']} problems, vs peer mean {rec['mean_vs_peer'] * 100:+.3f}% "
                  f"worst {rec['worst_vs_peer'] * 100:+.3f}%"
                  + (f", vs base commit {rec['mean_vs_baseline'] * 100:+.4f}% (identical on "
                     f"{rec['identical_to_baseline']})" if "mean_vs_baseline" in rec else ""), flush=True)
    return out


# --------------------------------------------------------------------------------------------- memory


def part_memory(B=1024):
    from benchmarks.overhead import peak_in_fresh_process

    r = dict(B=B, d=D, peak_rise_bytes=peak_in_fresh_process("ours", B, D, 1),
             dense_q_bytes=2 * K * (B * KNN) ** 2 * 4)
    print(f"memory B={B}: +{r['peak_rise_bytes'] / 2**30:.3f} GiB", flush=True)
    return r


# --------------------------------------------------------------------------------------------- report


def render(res):
    def ms(s):
        return f"{s * 1e3:.1f}"

    L = ["# The solver at scale: measurements", "",
         "Generated by `python experiments/solver_scaling.py` (the script's docstring says what each part "
         "measures). " + res.get("machine", ""), ""]
    if res.get("lap"):
        L += ["## linear_assignment against lap.lapjv", "",
              "Batch of 12 uniform random float64 problems; one thread: CPU time, ratio = lapjv / ours (> 1: ours "
              "faster); more threads: wall time of ours (on the shared machine: see the note below the stage "
              "table). Objective gap: the largest |ours - lapjv| over the batch.", "",
              "| threads | N | ours (ms) | lapjv (ms) | lapjv / ours | objective gap |",
              "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in res["lap"]:
            L.append(f"| {r['threads']} | {r['N']} | {r['ours'] * 1e3:.2f} | "
                     + (f"{r['lapjv'] * 1e3:.2f} | {r['lapjv'] / r['ours']:.2f}x" if r["lapjv"] else "- | -")
                     + f" | {r['max_objective_gap']:.1e} |")
        L.append("")
    if res.get("stages"):
        st = res["stages"]
        names = list(st[0]["stages"])
        L += ["## align: stages against B, with the GEMM floor", "",
              "K = 3, k = 5, d = h = 512, forward + backward. One thread: CPU time of the process; two threads: "
              "wall time (a shared machine: noisy). Medians over the rounds; times in ms.", "",
              "| threads | setting | B | align | floor | align / floor | " + " | ".join(names) +
              " | dense Q entries |", "|" + " ---: |" * (7 + len(names))]
        for r in st:
            L.append(f"| {r['threads']} | {r['setting']} | {r['B']} | {ms(r['total'])} | {ms(r['floor'])} | "
                     f"{r['total'] / r['floor']:.2f}x | " + " | ".join(ms(r['stages'][n]) for n in names) +
                     f" | {r['dense_q_entries'] / 1e6:.1f} M |")
        L += ["", "Exponents: the least-squares slope of log time against log B, over all the sizes measured and "
              "over B >= 256 (where the fixed costs of the small sizes no longer count):", "",
              "| threads | setting | B | align | floor | " + " | ".join(names) + " |", "|" + " ---: |" * (5 + len(names))]
        for min_b, label in ((0, "all"), (256, ">= 256")):
            ex = {key: exponents(st, key, min_b) for key in ["total", "floor"] + names}
            for g in ex["total"]:
                L.append(f"| {g[0]} | {g[1]} | {label} | " + " | ".join(
                    f"{ex[key].get(g, float('nan')):.2f}" for key in ["total", "floor"] + names) + " |")
        L += ["", "What the targets leave the solver (one thread): the align / floor target times the floor, less "
              "everything but the solver (the step minus solve fwd and solve bwd), against the solver's time.", "",
              "| setting | B | target | allowed (ms) | all but the solver (ms) | solver fwd + bwd (ms) | solver "
              "speed-up needed |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in st:
            if r["threads"] != 1 or r["B"] not in TARGETS:
                continue
            allowed = TARGETS[r["B"]] * r["floor"]
            solver = r["stages"]["solve fwd"] + r["stages"]["solve bwd"]
            rest = r["total"] - solver
            need = ("unreachable (the rest alone exceeds it)" if rest >= allowed
                    else "none (met)" if rest + solver <= allowed else f"{solver / (allowed - rest):.1f}x")
            L.append(f"| {r['setting']} | {r['B']} | {TARGETS[r['B']]:.1f}x | {ms(allowed)} | {ms(rest)} | "
                     f"{ms(solver)} | {need} |")
        load = res.get("stages_load")
        L += ["", "Two threads: wall time, which on a shared machine includes the other jobs' interference"
              + (f" (load average {load[0]:.1f} at the start of this part, {load[1]:.1f} at its end)" if load else "")
              + "; the one-thread rows (CPU time) are the figures to compare.", ""]
    if res.get("quality"):
        baseline = None
        if os.path.exists(BASELINE_PATH):
            with open(BASELINE_PATH) as f:
                baseline = json.load(f)
        for r in res["quality"]:
            compare_baseline(r, baseline)
        L += ["## Quality contract", "",
              "Objectives (float64) of `qap_solve` with align's options on align's forward problems; peer: the "
              "official-equivalent solver (scipy-LAP Frank-Wolfe, 50 iterations); base commit: this script's "
              "`--part objectives` at the commit before this work, on the same problems.", "",
              "| setting | B | problems | mean objective | vs base commit: mean (identical) | vs peer: mean | "
              "vs peer: worst | > 0.5 % below peer | >= peer |", "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
        for r in res["quality"]:
            base = (f"{r['mean_vs_baseline'] * 100:+.4f}% ({r['identical_to_baseline']}/{r['problems']})"
                    if "mean_vs_baseline" in r else "-")
            L.append(f"| {r['setting']} | {r['B']} | {r['problems']} | {r['mean_objective']:.3f} | {base} | "
                     f"{r['mean_vs_peer'] * 100:+.3f}% | {r['worst_vs_peer'] * 100:+.3f}% | "
                     f"{r['below_peer_by_more_than_half_percent']} | {r['at_least_peer']}/{r['problems']} |")
        L.append("")
    if res.get("memory"):
        r = res["memory"]
        L += ["## Peak memory", "",
              f"align forward + backward at B = {r['B']} (official settings, one thread), resident-set rise: "
              f"{r['peak_rise_bytes'] / 2**30:.2f} GiB; the dense quadratic scores alone: "
              f"{r['dense_q_bytes'] / 2**20:.0f} MiB.", ""]
    return "\n".join(L)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="all", choices=["lap", "stages", "quality", "memory", "objectives", "all",
                                                      "render"])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--sizes", default="16,64,256,1024", help="stages: B")
    ap.add_argument("--lap-sizes", default="64,256,1024", help="lap: N")
    ap.add_argument("--memory-b", type=int, default=1024, help="memory: B")
    ap.add_argument("--batches", default="16:17,64:17,256:17,1024:2",
                    help="quality: B:batches (6 problems per batch)")
    ap.add_argument("--objectives-out", help="--part objectives: where to write")
    ap.add_argument("--root", help="import exgramed_kernels from this checkout (the base commit's build)")
    ap.add_argument("--json-dir", help="write the parts' JSON (and read them for the markdown) here instead")
    a = ap.parse_args(argv)
    if a.json_dir:
        JSON_DIR[0] = a.json_dir
    threads = [int(t) for t in a.threads.split(",")]
    sizes = tuple(int(s) for s in a.sizes.split(","))
    batches = {int(b.split(":")[0]): int(b.split(":")[1]) for b in a.batches.split(",")}
    torch.set_num_threads(1)
    if a.part == "objectives":
        with open(a.objectives_out, "w") as f:
            json.dump(part_objectives(batches), f)
        return
    machine = (f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs (shared), torch {torch.__version__}, "
               f"Python {platform.python_version()}.")
    todo = PARTS if a.part == "all" else () if a.part == "render" else (a.part,)
    for part in todo:
        load_start = os.getloadavg()[0]
        if part == "lap":
            r = part_lap(threads, tuple(int(n) for n in a.lap_sizes.split(",")))
        elif part == "stages":
            r = part_stages(threads, sizes)
        elif part == "quality":
            baseline = None
            if os.path.exists(BASELINE_PATH):
                with open(BASELINE_PATH) as f:
                    baseline = json.load(f)
            r = part_quality(batches, baseline)
        else:
            r = part_memory(a.memory_b)
        with open(json_path(part), "w") as f:
            json.dump({"machine": machine, part: r, "load": [load_start, os.getloadavg()[0]]}, f, indent=1)
    res = {}
    for part in PARTS:
        if os.path.exists(json_path(part)):
            with open(json_path(part)) as f:
                d = json.load(f)
            res[part] = d[part]
            res["machine"] = d["machine"]
            res[f"{part}_load"] = d.get("load")
    md = MD_PATH if not a.json_dir else os.path.join(a.json_dir, "solver_scaling.md")
    with open(md, "w") as f:
        f.write(render(res) + "\n")
    print("wrote", md)
    return md


if __name__ == "__main__":
    main()
