"""One command for every benchmark: each op against its peers, the alignment's overhead in a training
step, its peak memory, and the H200 figures when the GPU check has produced them.

    python -m benchmarks.report            # full run (about 10-15 minutes on the 2-core dev machine)
    python -m benchmarks.report --quick    # smaller sizes, a few minutes
    python -m benchmarks.report --render   # rewrite RESULTS.md and the plots from results/report.json

Writes ``benchmarks/RESULTS.md`` (the results file the README links to), the raw records
``benchmarks/results/report.json`` and log-log plots ``benchmarks/results/<op>.png`` (time against
N for every provider) and ``benchmarks/results/memory.png``. When
``benchmarks/results/gpu_timing.json`` exists (copy it from the GPU check's ``$OUT``), its tables
and the H200 column of the overhead table are filled from it. Everything in one run is measured in
the same process (memory: in fresh subprocesses) on the same machine, so the ratios are comparable
even when the absolute times are noisy.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OPS = ["knn_graph", "graph_conv", "linear_assignment", "qap_solve", "align"]
# What each op's table and plot show, and which provider the ratios compare against.
DESCRIPTION = {
    "knn_graph": "G = 4 graphs, k = 5, l2, fp32. Ours ranks by exact fp64 distances (ties to the lower index); "
                 "the dense peers rank fp32 Gram-form distances. Floor: the Gram GEMM `bmm(x, x^T)` alone.",
    "graph_conv": "2 GraphConv(aggr=max) layers with ReLU, d = h, G = 4 kNN graphs (k = 5, in-neighbour direction), "
                  "forward + backward (gradients for x and all weights), fp32, dropout off. PyG: "
                  "`torch_geometric.nn.GraphConv` graph by graph. Floor: the bare linear layers on all G*N rows.",
    "linear_assignment": "Batch of G = 12 dense float64 problems (uniform scores), maximise. Peer: "
                         "`scipy.optimize.linear_sum_assignment` (LAPJV-style) in a loop over the batch.",
    "qap_solve": "Batch of G = 12 problems, kNN k = 5, method fw (defaults). `ours`: node-feature instances "
                 "(dense Q); pygmtools RRWM on the same instances (dense N^2 x N^2 affinity, so small N only). "
                 "`KB instances`: Koopmans-Beckmann (U = 0, Q = A (x) B), the problem scipy FAQ solves; "
                 "ratio column for scipy FAQ is against `ours (KB instances)`. Objective ratio: peer / ours, "
                 "mean over the batch (> 1: the peer found better matchings).",
    "align": "Forward + backward of the whole alignment, K = 3 modalities, k = 5, h = d, official settings "
             "(`MultiGraphAlignment(d, official=True, dropout=0)`: L2 kNN, copied structure, partial matchings, "
             "edge-pair scores and their noise in `pair_scores`, one Frank-Wolfe start + 2-opt, blackbox "
             "backward). Official-equivalent: `compare_align.official_pipeline` "
             "(dense kNN, PyG GraphConv per problem, per-edge Python loop, scipy-LAP Frank-Wolfe per problem, "
             "blackbox re-solve), only up to the B its cost allows. Floor: the GraphConv GEMMs alone. N = B.",
}
BASELINE = {"qap_solve": {"scipy FAQ (KB instances)": "ours (KB instances)", "ours (KB instances)": "ours (KB instances)"}}


# ------------------------------------------------------------------------------------------- running


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("numpy", "scipy", "torch_geometric", "faiss", "pygmtools", "triton", "matplotlib"):
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception:  # noqa: BLE001 - any import failure means "not available here"
            out[name] = None
    import exgramed_kernels as ek

    out["exgramed_kernels"] = ek.__version__ + (" (compiled)" if ek.HAS_EXTENSION else " (reference fallback)")
    return out


def machine_info() -> dict:
    from .common import machine

    from .suites import CLOCK

    return {"machine": machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "clock": CLOCK["name"],
            "load_start": os.getloadavg()[0]}


def run(mode: str, ops: list[str], overhead: bool, demo: bool, log=print, save=None) -> dict:
    from . import overhead as ov
    from .suites import SUITES

    t0 = time.perf_counter()
    res = {"mode": mode, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python -m benchmarks.report" + {"full": "", "quick": " --quick", "tiny": " --tiny"}[mode],
           "info": machine_info(), "versions": versions(), "records": [], "op_seconds": {}}
    for op in ops:
        t = time.perf_counter()
        res["records"] += SUITES[op](mode, log)
        res["op_seconds"][op] = time.perf_counter() - t
        if save is not None:  # a killed run still leaves every finished op (render with --render)
            save(dict(res, seconds=time.perf_counter() - t0, partial=True))
    if overhead:
        t = time.perf_counter()
        res["overhead"] = ov.run_all(mode, log, demo=demo)
        res["op_seconds"]["overhead"] = time.perf_counter() - t
    res["command"] += f" --threads {torch.get_num_threads()}" if torch.get_num_threads() != 1 else ""
    res["command"] += f" --clock {res['info']['clock']}" if res["info"]["clock"] != (
        "process" if torch.get_num_threads() == 1 else "wall") else ""
    res["info"]["load_end"] = os.getloadavg()[0]
    res["seconds"] = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------------------------------ rendering


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e6:.0f} us" if s < 1e-3 else (f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s")


def fmt_bytes(b: float) -> str:
    if b < 2**20:
        return f"{b / 2**10:.0f} KiB"
    return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def _by_op(records):
    ops: dict[str, dict] = {}
    for r in records:
        ops.setdefault(r["op"], {}).setdefault(r["N"], {})[r["provider"]] = r
    return ops


def op_table(op: str, sizes: dict) -> list[str]:
    providers = []
    for row in sizes.values():
        providers += [p for p in row if p not in providers]
    header = ["N", "d"] + [p if p == "ours" else f"{p} (vs ours)" for p in providers]
    lines = ["| " + " | ".join(header) + " |", "|" + " ---: |" * len(header)]
    for N in sorted(sizes):
        row = sizes[N]
        d = next(iter(row.values()))["d"]
        cells = [str(N), str(d) if d else "-"]
        for p in providers:
            r = row.get(p)
            if r is None:
                cells.append("-")
                continue
            c = fmt_time(r["median"])
            if r["n"] > 1:
                c += f" [{fmt_time(r['q20'])}, {fmt_time(r['q80'])}]"
            base = row.get(BASELINE.get(op, {}).get(p, "ours"))
            if p != "ours" and base is not None and base is not r:
                c += f" ({r['median'] / base['median']:.2f}x)"
            if "objective_ratio" in r and p not in ("ours",):
                c += f", obj {r['objective_ratio']:.3f}"
            cells.append(c)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_op(op: str, sizes: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    providers = []
    for row in sizes.values():
        providers += [p for p in row if p not in providers]
    for i, p in enumerate(providers):
        Ns = sorted(N for N in sizes if p in sizes[N])
        med = [sizes[N][p]["median"] for N in Ns]
        lo = [m - sizes[N][p]["q20"] for N, m in zip(Ns, med)]
        hi = [sizes[N][p]["q80"] - m for N, m in zip(Ns, med)]
        style = dict(lw=2.5, color="k") if p == "ours" else dict(ls="--" if p.startswith("floor") else "-")
        ax.errorbar(Ns, med, yerr=[lo, hi], marker="o", ms=4, capsize=2, label=p, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (nodes per graph; B for align)")
    ax.set_ylabel("median time per call (s)")
    ax.set_title(title, fontsize=10)
    _finish(fig, ax, path)


def _finish(fig, ax, path: str) -> None:
    """Grid, legend and layout, then an atomic write of the PNG."""
    import matplotlib.pyplot as plt

    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def plot_memory(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for which in ("ours", "official-equivalent"):
        rr = sorted((r for r in rows if r["which"] == which), key=lambda r: r["B"])
        if rr:
            ax.plot([r["B"] for r in rr], [max(r["peak_rise_bytes"], 1) / 2**20 for r in rr], marker="o",
                    label=which, **({"lw": 2.5, "color": "k"} if which == "ours" else {}))
    rr = sorted((r for r in rows if r["which"] == "ours"), key=lambda r: r["B"])
    ax.plot([r["B"] for r in rr], [r["dense_q_bytes"] / 2**20 for r in rr], ls=":", label="dense Q alone (6 (Bk)^2 fp32)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("B")
    ax.set_ylabel("peak resident-set rise (MiB)")
    ax.set_title("align forward + backward: peak memory", fontsize=10)
    _finish(fig, ax, path)


def overhead_lines(ov: dict, gpu: dict | None, threads: int = 1) -> list[str]:
    from .overhead import OFFICIAL_STEP

    L = ["## The alignment's overhead in a training step", ""]
    demo = ov.get("demo")
    if demo:
        L += ["**(a) The embedded demo's stage-2 step, measured on this CPU.** `exgramed_train`'s stage-2 "
              f"configuration (tiny random LLaMA + CLIP, micro-batch B = {demo['micro_batch']}, K = 3, "
              f"d = {demo['d']}, k = {demo['k']}, default `MultiGraphAlignment`), {demo['steps']} steps after one "
              "warm-up step; the driver times the alignment's forward and backward inside each step "
              "(autograd hooks on its input and loss, `exgramed_train.model.align_seconds`).", "",
              "| median step | median alignment (fwd + bwd) | alignment share of the step time |",
              "| ---: | ---: | ---: |",
              f"| {fmt_time(demo['median_step_s'])} | {fmt_time(demo['median_align_s'])} | "
              f"{100 * demo['share']:.1f} % |", ""]
    s = OFFICIAL_STEP
    per = ov["seconds_per_sample"]
    d_llava = ov["llava"][0]["d"] if ov["llava"] else 4096
    L += [f"**(b) LLaVA-Med-7B-shaped inputs (K = 3, d = {d_llava}) against the official setup's step.** "
          "The official step time is an **estimate**, derived from the paper, not measured: "
          f"{s['source']} Stage 2 therefore processes {s['epochs']} x {s['samples']:,} samples in "
          f"{s['stage2_hours']} h x 3600 s = {s['stage2_hours'] * 3600:,.0f} s, i.e. {per:.2f} s of wall time per "
          f"sample on the {s['gpus']} data-parallel setup ({4 * per:.1f} A100-seconds per sample). A step over a "
          f"global batch of B samples thus takes about {per:.2f} x B s, and the comparison assumes the alignment "
          "of the whole batch runs serially inside that step (the conservative placement). The paper's own "
          f"figure for its alignment: 0.5 h of 7.0 h, a {100 * ov['official_align_share']:.1f} % longer stage 2.",
          "", f"Alignment: default `MultiGraphAlignment({d_llava})` forward + backward, fp32, on this CPU, {threads} torch thread(s) (an upper "
          "bound for a GPU); the H200 column (bf16) comes from `scripts/gpu_check.sh` when it has been run.", "",
          "| B | official step (estimate) | align fwd+bwd, this CPU | share (CPU) | align fwd+bwd, H200 bf16 | share (H200) |",
          "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    gpu_align = {}
    if gpu:
        for r in gpu.get("records", []):
            if r.get("op") == "align" and r.get("dtype") == "bfloat16" and r.get("provider") == "ours":
                gpu_align[r["N"]] = r["median"]
    for r in ov["llava"]:
        step = ov["seconds_per_sample"] * r["B"]
        if "skipped" in r:
            cpu_cells = [f"not run ({r['skipped']})", "-"]
        else:
            cpu_cells = [fmt_time(r["align_cpu_s"]), f"{100 * r['align_cpu_s'] / step:.2f} %"]
        g = gpu_align.get(r["B"])
        gcells = [fmt_time(g), f"{100 * g / step:.4f} %"] if g is not None else ["not measured (no GPU lent)", "-"]
        L.append(f"| {r['B']} | {step:.1f} s | " + " | ".join(cpu_cells + gcells) + " |")
    L.append("")
    mem = ov.get("memory") or []
    if mem:
        d = mem[0]["d"]
        L += ["## Peak memory of align", "",
              f"One forward + backward at K = 3, d = h = {d}, k = 5, official settings, fp32, on the CPU. Measured "
              "in a fresh subprocess per point as the rise of the resident set during the call (`VmHWM` reset "
              "through `/proc/self/clear_refs`, minus `VmRSS` before the call; inputs and weights excluded). "
              "torch's CPU tensors are malloc/mmap memory, so the resident set sees them. The dense "
              "quadratic scores Q dominate at large B: P = 6 problems of (Bk)^2 fp32, plus their Gumbel noise.", "",
              "| B | ours | official-equivalent | dense Q alone (6 (Bk)^2 fp32) |", "| ---: | ---: | ---: | ---: |"]
        for B in sorted({r["B"] for r in mem}):
            ours = next((r for r in mem if r["B"] == B and r["which"] == "ours"), None)
            off = next((r for r in mem if r["B"] == B and r["which"] != "ours"), None)
            L.append(f"| {B} | {fmt_bytes(ours['peak_rise_bytes']) if ours else '-'} | "
                     f"{fmt_bytes(off['peak_rise_bytes']) if off else 'not run (too slow)'} | "
                     f"{fmt_bytes(6 * (B * 5) ** 2 * 4)} |")
        L += ["", "![memory](results/memory.png)", ""]
    return L


def gpu_lines(gpu: dict | None) -> list[str]:
    L = ["## H200 (scripts/gpu_check.sh)", ""]
    if not gpu:
        return L + ["Not run: no GPU was lent to the task that wrote this report. On a machine with a GPU, "
                    "`OUT=/tmp/out bash scripts/gpu_check.sh` builds for sm_90, runs the CUDA and Triton tests "
                    "and writes `$OUT/gpu_timing.json`; copy that file to `benchmarks/results/` and run "
                    "`python -m benchmarks.report --render` to put its tables here.", ""]
    L += [f"Device: {gpu.get('device')}; {gpu.get('versions')}; {gpu.get('date')}. CUDA-event medians after "
          "warm-up (CUDA-graph replay where marked). Floor: max(measured cuBLAS GEMM of the same shapes, "
          "bytes that must move / HBM bandwidth).", ""]
    L += gpu.get("markdown", "").splitlines()
    return L + [""]


def render(res: dict, out_dir: str, gpu: dict | None = None) -> str:
    results = os.path.join(out_dir, "results")
    os.makedirs(results, exist_ok=True)
    ops = _by_op(res["records"])
    v = res["versions"]
    info = res["info"]
    L = ["# exgramed benchmark results", "",
         f"Generated by `{res['command']}` on {res['date']} in {res['seconds'] / 60:.1f} min "
         f"(mode `{res['mode']}`; regenerate with `python -m benchmarks.report`, or `--quick`)."
         + (" **Partial run**: it was stopped before every part finished." if res.get("partial") else ""), "",
         f"Machine: {info['machine']}. Load average {info['load_start']:.1f} at the start, "
         f"{info.get('load_end', float('nan')):.1f} at the end (a shared machine: absolute times are noisy; "
         "every ratio compares providers measured interleaved in the same seconds). "
         f"torch threads: {info['threads']}" + (" (the default here: on this oversubscribed machine an OpenMP region "
                                                "of 2 threads can stall for tens of milliseconds, which swamps the small "
                                                "sizes; `--threads N` to change)" if info["threads"] == 1 else "") + ".",
         "",
         "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) +
         ("; not installed: " + ", ".join(k for k, val in v.items() if not val) if any(not x for x in v.values()) else "")
         + ".", "",
         ("Clock: CPU time of this process (`time.process_time`; one torch thread, FAISS one OpenMP thread), so the "
          "figures measure the work done, not the other jobs on the machine; the demo's step shares (a) are wall "
          "times logged by the driver. " if info.get("clock") == "process" else "Clock: wall time. ") +
         "Times: median of interleaved repetitions, [20 %, 80 %] quantiles in brackets; (Nx) = that provider's "
         "time / ours (> 1: ours faster; for floors, < 1 is expected and 1/x is how far ours is from the floor).", ""]
    if "overhead" in res:
        L += overhead_lines(res["overhead"], gpu, info["threads"])
    L += gpu_lines(gpu)
    L += ["## Ops against their peers (CPU)", ""]
    for op in OPS:
        if op not in ops:
            continue
        png = os.path.join(results, f"{op}.png")
        plot_op(op, ops[op], png, f"{op} (CPU, median)")
        L += [f"### {op}", "", DESCRIPTION[op], ""] + op_table(op, ops[op]) + ["", f"![{op}](results/{op}.png)", ""]
    if "overhead" in res and res["overhead"].get("memory"):
        plot_memory(res["overhead"]["memory"], os.path.join(results, "memory.png"))
    L += ["Per-op scripts with more detail (learning tables, solver quality, stage breakdowns): "
          "`benchmarks/compare_<op>.py`, tables under `benchmarks/results/<op>.md`.", "",
          "Run time of this report per part: " +
          ", ".join(f"{k} {s:.0f} s" for k, s in res.get("op_seconds", {}).items()) + ".", ""]
    text = "\n".join(L)
    path = os.path.join(out_dir, "RESULTS.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return text


def load_gpu(out_dir: str, path: str | None) -> dict | None:
    path = path or os.path.join(out_dir, "results", "gpu_timing.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    g.add_argument("--tiny", action="store_true", help="tiny sizes (seconds; the smoke test)")
    g.add_argument("--render", action="store_true", help="only rewrite RESULTS.md and plots from results/report.json")
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    ap.add_argument("--no-overhead", action="store_true", help="skip the overhead and memory part")
    ap.add_argument("--no-demo", action="store_true", help="skip (a), the demo's stage-2 steps")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared, oversubscribed machine every OpenMP region of "
                         "2+ threads can stall for tens of ms, which would swamp small sizes; 0 = torch's default)")
    ap.add_argument("--clock", choices=["auto", "wall", "process"], default="auto",
                    help="auto: CPU time of the process with one thread (robust to other jobs on a shared machine), "
                         "wall time otherwise")
    ap.add_argument("--out", default=HERE, help="directory for RESULTS.md and results/ (default: benchmarks/)")
    ap.add_argument("--gpu-json", help="gpu_timing.json from scripts/gpu_check.sh (default: <out>/results/gpu_timing.json)")
    a = ap.parse_args(argv)
    raw = os.path.join(a.out, "results", "report.json")
    if a.render:
        with open(raw) as f:
            res = json.load(f)
    else:
        ops = [o for o in a.ops.split(",") if o]
        unknown = set(ops) - set(OPS)
        if unknown:
            ap.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")
        mode = "tiny" if a.tiny else "quick" if a.quick else "full"
        if a.threads > 0:
            torch.set_num_threads(a.threads)
        from .suites import set_clock

        set_clock(a.clock if a.clock != "auto" else ("process" if torch.get_num_threads() == 1 else "wall"))
        os.makedirs(os.path.dirname(raw), exist_ok=True)

        def save(r):
            with open(raw + ".tmp", "w") as f:
                json.dump(r, f, indent=1)
            os.replace(raw + ".tmp", raw)

        res = run(mode, ops, overhead=not a.no_overhead, demo=not a.no_demo, save=save)
        save(res)
    text = render(res, a.out, load_gpu(a.out, a.gpu_json))
    print(text)
    print(f"wrote {os.path.join(a.out, 'RESULTS.md')} ({res['seconds']:.0f} s)", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
