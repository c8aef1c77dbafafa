"""Run every benchmark through the harness and render ``benchmarks/RESULTS.md``.

    python -m benchmarks.report                  # every op, full sizes, on the CPU
    python -m benchmarks.report --quick          # smaller sizes (a few minutes)
    python -m benchmarks.report --render         # only rewrite RESULTS.md and the plots from the saved JSON
    python -m benchmarks.report --device cuda    # on a GPU (scripts/gpu_check.sh)

A run writes ``results/<device>.json`` (every record, the machine's facts) under ``--out`` (default
``benchmarks/``); RESULTS.md and the plots ``results/<op>_<device>.png`` are rendered from every
``results/<device>.json`` there, so a GPU run's JSON copied next to the CPU one shows both. The
training-step share measured by ``experiments/align_step_share.py`` is read from its JSON when present.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import time

import torch

from .harness import fmt_time, machine, markdown_table, run_bench

HERE = os.path.dirname(os.path.abspath(__file__))
STEP_SHARE = os.path.join(os.path.dirname(HERE), "experiments", "results", "align_step_share.json")
OPS = ["overhead", "knn_graph", "graph_conv", "linear_assignment", "qap_solve", "pair_scores", "align", "global_align"]
DEVICES = ("cpu", "cuda")


def run(scale: str, device: str, ops: list[str], memory: bool, budget: float | None, save, log=print) -> dict:
    from . import overhead

    t0 = time.perf_counter()
    flags = {"full": "", "quick": " --quick", "tiny": " --tiny"}[scale] + (" --device cuda" if device == "cuda" else "")
    flags += f" --threads {torch.get_num_threads()}" if device == "cpu" and torch.get_num_threads() != 1 else ""
    flags += (f" --ops {','.join(ops)}" if ops != OPS else "") + (f" --budget {budget:g}" if budget else "")
    flags += "" if memory else " --no-memory"
    res = dict(command="python -m benchmarks.report" + flags, scale=scale, device=device,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               machine=machine(device), benches={}, records=[], seconds={})
    deadline = t0 + budget if budget else None
    for op in ops:
        t = time.perf_counter()
        bench = importlib.import_module(f"benchmarks.{op}").BENCH
        res["benches"][op] = bench.meta(device)
        res["records"] += run_bench(bench, scale, device, log, deadline)
        res["seconds"][op] = time.perf_counter() - t
        save(dict(res, partial=True))  # a killed run keeps every finished op (render it with --render)
    if memory and (deadline is None or time.perf_counter() < deadline):
        t = time.perf_counter()
        res["memory"] = overhead.memory(scale, device, log)
        res["seconds"]["memory"] = time.perf_counter() - t
    res["machine"]["load_end"] = os.getloadavg()[0]
    res["seconds"]["total"] = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------------------------------- rendering


def fmt_bytes(b: float) -> str:
    return f"{b / 2**10:.0f} KiB" if b < 2**20 else f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def device_name(res: dict) -> str:
    return res["machine"]["gpu"] or "CPU"


def cell(r: dict | None, ref: dict | None) -> str:
    if r is None:
        return "-"
    if "median" not in r:
        return "error" if "error" in r else "-"
    c = fmt_time(r["median"]) + (f" [{fmt_time(r['q20'])}, {fmt_time(r['q80'])}]" if r["n"] > 2 else "")
    c += " (graph)" if r.get("graph") else ""
    if ref is not None and ref is not r and "median" in ref:
        c += f" ({r['median'] / ref['median']:.2f}x)"
    q = r.get("quality")
    if q:
        c += f", obj {100 * q['mean']:+.2f} % (ours >= on {q['vs_ge']}/{q['n']})"
    return c


def op_section(op: str, res: dict, out_dir: str) -> list[str]:
    meta = res["benches"][op]
    recs = [r for r in res["records"] if r["op"] == op]
    names = [p["name"] for p in meta["providers"] if p["device"]]
    label = {p["name"]: p["label"] for p in meta["providers"]}
    vs = {p["name"]: p["vs"] for p in meta["providers"]}
    dev = device_name(res)
    L = [f"### {op} ({dev})", "", meta["description"], ""]
    skip_keys = {"op", "device", "x", "mode", "provider", "run_on", "graph", "median", "q20", "q80", "n", "quality",
                 "skipped", "error"}
    for mode in meta["modes"]:
        rows = [r for r in recs if r["mode"] == mode and "skipped" not in r]
        if not rows:
            continue
        xs = sorted({r["x"] for r in rows})
        info = [k for k in (rows[0] if rows else {}) if k not in skip_keys]
        header = [meta["x"]] + info + [label[n] for n in names]
        table = []
        for x in xs:
            by = {r["provider"]: r for r in rows if r["x"] == x}
            first = next(iter(by.values()))
            table.append([str(x)] + [str(first.get(k, "-")) for k in info] +
                         [cell(by.get(n), by.get(vs[n])) for n in names])
        L += [f"{mode}:", ""] + markdown_table(header, table) + [""]
        slopes = growth_exponents(rows, names)
        if slopes:
            L += [f"Growth with {meta['x']} (least-squares slope of log time on log {meta['x']}, over the sizes above "
                  "with a time): " + ", ".join(f"{label[n]} {e:.2f}" for n, e in slopes.items()) + ".", ""]
    why: dict[str, set] = {}
    for reason, name in [(r["skipped"], r["provider"]) for r in recs if "skipped" in r] + \
            [(p["unavailable"], p["name"]) for p in meta["providers"] if p["unavailable"]]:
        why.setdefault(reason, set()).add(name)
    notes = [f"{', '.join(sorted(ps))}: {reason}" for reason, ps in sorted(why.items())]
    notes += sorted({f"{r['provider']} failed at {meta['x']} = {r['x']} ({r['mode']}): {r['error'][:200]}"
                     for r in recs if "error" in r})
    if notes:
        L += ["Not run everywhere: " + "; ".join(notes) + ".", ""]
    if not any("median" in r for r in recs):
        return L
    png = f"{op}_{res['device']}.png"
    plot(recs, meta, names, os.path.join(out_dir, "results", png), f"{op} ({dev})")
    return L + [f"![{op}](results/{png})", ""]


def growth_exponents(rows: list[dict], names: list[str]) -> dict[str, float]:
    """Per provider with times at three sizes or more: the slope of log(median time) against log(size)."""
    import numpy as np

    out = {}
    for n in names:
        pts = sorted((r["x"], r["median"]) for r in rows if r["provider"] == n and "median" in r and r["median"] > 0)
        if len(pts) >= 3:
            x, t = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            out[n] = float(np.polyfit(x, t, 1)[0])
    return out


def plot(recs: list[dict], meta: dict, names: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes, label = meta["modes"], {p["name"]: p["label"] for p in meta["providers"]}
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.8), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for n in names:
            rr = sorted((r for r in recs if r["mode"] == mode and r["provider"] == n and "median" in r),
                        key=lambda r: r["x"])
            if not rr:
                continue
            med = [r["median"] for r in rr]
            err = [[m - r["q20"] for m, r in zip(med, rr)], [r["q80"] - m for m, r in zip(med, rr)]]
            style = dict(lw=2.5, color="k") if n == "ours" else dict(ls="--" if n.startswith("floor") else "-")
            ax.errorbar([r["x"] for r in rr], med, yerr=err, marker="o", ms=4, capsize=2, label=label[n], **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(meta["x"])
        ax.set_ylabel("median time per call (s)")
        ax.set_title(f"{title}: {mode}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path + ".tmp.png", dpi=80)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def overhead_section(runs: dict[str, dict]) -> list[str]:
    from .overhead import OFFICIAL_STEP as s, SECONDS_PER_SAMPLE as per

    times = {dev: {r["x"]: r for r in res["records"] if r["op"] == "overhead" and "median" in r}
             for dev, res in runs.items()}
    L = ["## The alignment's overhead in a LLaVA-Med training step", "",
         "The official step time is an **estimate** derived from the paper, not a measurement: "
         f"{s['source']} Stage 2 processes {s['epochs']} x {s['samples']:,} samples in {s['stage2_hours']} h, "
         f"{per:.2f} s of wall time per sample on {s['gpus']}, so a step over a global batch of B samples takes "
         f"about {per:.2f} x B s. The share assumes the alignment of the whole batch runs serially inside that step. "
         f"The paper's own figure: stage 2 takes {s['stage2_hours'] - s['llava_med_stage2_hours']:.1f} h "
         f"({100 * (s['stage2_hours'] / s['llava_med_stage2_hours'] - 1):.1f} %) longer than LLaVA-Med's.", ""]
    header, cols = ["B", "official step (estimate)"], []
    for dev, res in runs.items():
        if times[dev]:
            r0 = next(iter(times[dev].values()))
            header += [f"align fwd + bwd, {device_name(res)} {r0['dtype']}, d = {r0['d']}", "share"]
            cols.append(dev)
    rows = []
    for B in sorted({B for t in times.values() for B in t}):
        row = [str(B), f"{per * B:.1f} s"]
        for dev in cols:
            r = times[dev].get(B)
            row += [fmt_time(r["median"]), f"{100 * r['median'] / (per * B):.2f} %"] if r else ["-", "-"]
        rows.append(row)
    L += markdown_table(header, rows) + [""]
    if "cuda" not in runs:
        L += ["No GPU run is saved here: `scripts/gpu_check.sh` writes one (`results/cuda.json`).", ""]
    if os.path.exists(STEP_SHARE):
        with open(STEP_SHARE) as f:
            d = json.load(f)
        L += [f"Measured inside a training step ({d['description']}; `{d['command']}`, {d['date']}):", ""]
        L += markdown_table(["median step", "median alignment (fwd + bwd)", "alignment share of the step time"],
                            [[fmt_time(d["median_step_s"]), fmt_time(d["median_align_s"]), f"{100 * d['share']:.1f} %"]])
        L.append("")
    return L


def memory_section(runs: dict[str, dict], out_dir: str) -> list[str]:
    L = []
    for dev, res in runs.items():
        mem = res.get("memory")
        if not mem:
            continue
        how = ("rise of the resident set in a fresh process per point" if dev == "cpu"
               else "`torch.cuda.max_memory_allocated` over the call")
        L += [f"## Peak memory of align ({device_name(res)})", "",
              f"One forward + backward, K = 3, d = h = {mem[0]['d']}, k = 5, official settings, fp32; {how} "
              "(inputs and weights excluded). The dense quadratic scores are P = 6 tables of (Bk)^2 fp32.", ""]
        rows = []
        for B in sorted({r["B"] for r in mem}):
            get = {r["which"]: fmt_bytes(r["peak_bytes"]) for r in mem if r["B"] == B}
            rows.append([str(B), get.get("ours", "-"), get.get("official-equivalent", "-"), fmt_bytes(6 * (5 * B) ** 2 * 4)])
        L += markdown_table(["B", "ours", "official-equivalent", "one dense Q, 6 (Bk)^2 fp32"], rows) + [""]
    return L


def gpu_targets_section(out_dir: str) -> list[str]:
    """The GPU targets beside their measured figures (``results/cuda_targets.json``, ``benchmarks.gpu_targets``)."""
    path = os.path.join(out_dir, "results", "cuda_targets.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        d = json.load(f)
    m, v = d["machine"], d["machine"]["versions"]
    L = ["## GPU targets", "",
         f"`python -m benchmarks.gpu_targets` (run by `scripts/gpu_check.sh`) on {m['gpu']}, driver {v.get('driver')}, "
         f"CUDA {v.get('cuda')}, torch {v.get('torch')}, triton {v.get('triton')}; medians of CUDA events "
         "(the CPU peer: its process clock).", ""]

    def fig(t):
        x = t["figure"]
        if x is None:
            return "-"
        return fmt_time(x) if t["unit"] == "s" else f"{x:.2f}x"

    def limit(t):
        if t["unit"] == "s":
            return f"< {fmt_time(t['limit'])}"
        return f"<= {t['limit']:g}x" if t["unit"] == "x" else f"> {t['limit']:g}x (faster than the peer)"

    rows = [[t["target"], limit(t), fig(t), {True: "met", False: "missed", None: "-"}[t["met"]]] for t in d["targets"]]
    L += markdown_table(["target", "limit", "measured", ""], rows) + [""]
    for part, err in d.get("errors", {}).items():
        L += [f"Part `{part}` failed: `{err}`", ""]
    g = d.get("cuda_graph")
    if g:
        L += [f"CUDA-graph capture of one align training step (`MultiGraphAlignment({g['d']})`, B = {g['B']}, "
              "forward + backward): " + ("captured; a replay " + ("matches" if g["replay_matches"] else "does not match")
                                         + " the eager step" if g["captured"] else f"not capturable: `{g['error']}`")
              + ".", ""]
    return L


def render(out_dir: str) -> str:
    runs = {}
    for dev in DEVICES:
        path = os.path.join(out_dir, "results", f"{dev}.json")
        if os.path.exists(path):
            with open(path) as f:
                runs[dev] = json.load(f)
    L = ["# exgramed benchmark results", "",
         "Generated by `python -m benchmarks.report` from `results/<device>.json`; do not edit (interpretation: "
         "`docs/`). Every table shows ours beside its peers and its floor measured in the same run.", ""]
    for dev, res in runs.items():
        m = res["machine"]
        v = m["versions"]
        L += [f"**{device_name(res)} run**: `{res['command']}`, {res['date']}, "
              f"{res['seconds'].get('total', 0) / 60:.1f} min" + (" (stopped before the end)" if res.get("partial") else "")
              + f". {m['cpu']}, {m['cores']} cores, {m['threads']} torch thread(s)"
              + (f", {m['gpu']}" if m["gpu"] else "") + f"; clock: {m['clock']}; load average {m['load']:.1f} at the "
              f"start, {m.get('load_end', float('nan')):.1f} at the end. Versions: "
              + ", ".join(f"{k} {x}" for k, x in v.items() if x)
              + "; not installed: " + (", ".join(k for k, x in v.items() if not x) or "none") + ".", ""]
    L += ["Times: median per call, [20 %, 80 %] quantiles of the calls; (Nx): the time over the time of ours (or "
          "of the provider named in the op's description) at the same size, in the same run: > 1 means ours is "
          "faster, a floor's is below 1. Quality: the provider's objective relative to ours on the same instances "
          "(mean), and on how many of them ours is at least as good.", ""]
    if any(r["op"] == "overhead" for res in runs.values() for r in res["records"]):
        L += overhead_section(runs)
    L += gpu_targets_section(out_dir)
    L += memory_section(runs, out_dir)
    for dev, res in runs.items():
        L += [f"## Ops against their peers ({device_name(res)})", ""]
        for op in OPS:
            if op in res["benches"] and op != "overhead":
                L += op_section(op, res, out_dir)
        L += ["Seconds per part of this run: " + ", ".join(f"{k} {s:.0f}" for k, s in res["seconds"].items()) + ".", ""]
    text = "\n".join(L)
    with open(os.path.join(out_dir, "RESULTS.md.tmp"), "w") as f:
        f.write(text)
    os.replace(os.path.join(out_dir, "RESULTS.md.tmp"), os.path.join(out_dir, "RESULTS.md"))
    return text


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smaller sizes")
    g.add_argument("--tiny", action="store_true", help="tiny sizes (the smoke test)")
    g.add_argument("--render", action="store_true", help="only render RESULTS.md from the saved JSON")
    ap.add_argument("--device", choices=DEVICES, default="cpu")
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory table")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads on the CPU (default 1: the CPU time of the process is then the work done, "
                         "whatever else runs on a shared machine; 0 = torch's default)")
    ap.add_argument("--budget", type=float, help="seconds: later sizes are skipped (and listed) once it is spent")
    ap.add_argument("--out", default=HERE, help="directory of RESULTS.md and results/ (default: benchmarks/)")
    a = ap.parse_args(argv)
    res = None
    if not a.render:
        ops = [o for o in a.ops.split(",") if o]
        if set(ops) - set(OPS):
            ap.error(f"unknown ops {sorted(set(ops) - set(OPS))}; choose from {OPS}")
        if a.device == "cuda" and not torch.cuda.is_available():
            ap.error("--device cuda: no GPU here")
        if a.device == "cpu" and a.threads > 0:
            torch.set_num_threads(a.threads)
        try:
            import faiss  # its own OpenMP pool: one thread, so CPU time is its work as well

            faiss.omp_set_num_threads(1)
        except ImportError:
            pass
        path = os.path.join(a.out, "results", f"{a.device}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)

        def save(r):
            with open(path + ".tmp", "w") as f:
                json.dump(r, f, indent=1)
            os.replace(path + ".tmp", path)

        scale = "tiny" if a.tiny else "quick" if a.quick else "full"
        res = run(scale, a.device, ops, not a.no_memory, a.budget, save)
        save(res)
    render(a.out)
    if res is not None:
        errors = [r for r in res["records"] if "error" in r]
        print(f"wrote {os.path.join(a.out, 'RESULTS.md')} ({res['seconds']['total']:.0f} s, {len(errors)} failures)",
              file=sys.stderr)
    return res


if __name__ == "__main__":
    _res = main()
    sys.exit(1 if _res and any("error" in r for r in _res["records"]) else 0)
