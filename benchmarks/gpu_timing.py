"""GPU timing of every op and of align forward + backward, bf16 and fp32, against the peers present
and against the GEMM / bandwidth floor of each size (run by ``scripts/gpu_check.sh``).

    python -m benchmarks.gpu_timing --out $OUT [--budget 200]
    python -m benchmarks.gpu_timing --out /tmp/x --device cpu --tiny     # dry run of every code path

Times: CUDA events around each call, median over many calls after warm-up; for the small sizes
the call is captured once in a CUDA graph and the replays are timed (kernel time without launch
overhead), falling back to plain calls when an op cannot be captured (e.g. a host-side check).
On ``--device cpu`` the same code runs with ``time.perf_counter`` (no graphs; Triton through its
interpreter), which only checks that every path works.

Floor per size: max(the measured cuBLAS GEMMs the op cannot avoid, the bytes it must move /
HBM bandwidth). Sizes (the issue's): K = 3 modalities, d = 4096, B in {16, 64, 256, 1024}; the
per-graph ops on the G = K + 1 = 4 graphs of such a batch (k = 5); linear assignment in batches
of 12 up to N = 1024, against scipy's LAPJV on this machine's CPU.

Writes ``gpu_timing.json`` (records read by ``python -m benchmarks.report``) and
``gpu_timing.md`` under ``--out``; prints a short table last. Every case is guarded: an op that
fails is recorded with its error and the run goes on; cases beyond ``--budget`` seconds are
skipped and listed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback

HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def _setup_env(device: str) -> None:
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported


class Timer:
    """Median time of ``fn()`` on the device: CUDA events (optionally CUDA-graph replay) or perf_counter."""

    def __init__(self, device: str, min_reps: int, max_reps: int, seconds: float):
        import torch

        self.torch, self.device = torch, device
        self.min_reps, self.max_reps, self.seconds = min_reps, max_reps, seconds

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def __call__(self, fn, graph: bool = False) -> dict:
        torch = self.torch
        t0 = time.perf_counter()
        fn()  # first call: allocation, JIT compilation
        self._sync()
        first = time.perf_counter() - t0
        if self.max_reps > 3:  # a second timed call, without compilation
            t0 = time.perf_counter()
            fn()
            self._sync()
            first = time.perf_counter() - t0
        reps = int(max(self.min_reps, min(self.max_reps, self.seconds / max(first, 1e-6))))
        used_graph = False
        run = fn
        if graph and self.device == "cuda":
            try:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        fn()
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn()
                g.replay()
                torch.cuda.synchronize()
                run, used_graph = g.replay, True
            except Exception:  # noqa: BLE001 - not capturable (host sync, CPU work): plain calls
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001
                    pass
                run = fn
        for _ in range(3 if self.max_reps > 3 else 0):
            run()
        self._sync()
        times = []
        if self.device == "cuda":
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for a, b in ev:
                a.record()
                run()
                b.record()
            torch.cuda.synchronize()
            times = [a.elapsed_time(b) / 1e3 for a, b in ev]
        else:
            for _ in range(reps):
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
        times.sort()
        return {"median": statistics.median(times), "q20": times[round(0.2 * (len(times) - 1))],
                "q80": times[round(0.8 * (len(times) - 1))], "n": len(times), "graph": used_graph}


class Runner:
    def __init__(self, args):
        import torch

        self.torch, self.args = torch, args
        self.dev = args.device
        self.records, self.errors, self.skipped = [], [], []
        self.start = time.perf_counter()
        self.timer = Timer(self.dev, 5 if not args.tiny else 1, 200 if not args.tiny else 1,
                           0.3 if not args.tiny else 0.01)
        name = torch.cuda.get_device_name() if self.dev == "cuda" else platform.processor() or "cpu"
        self.bw = next((v for k, v in HBM_BYTES_PER_S.items() if k in name), 4.8e12)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.start > self.args.budget

    def case(self, op, dtype, N, d, providers: dict, floor: dict, graph: bool, **extra):
        """Time each provider; ``floor`` = {"gemm": fn or None, "bytes": int}."""
        torch = self.torch
        size = dict(op=op, dtype=str(dtype).replace("torch.", ""), N=N, d=d, **extra)
        if self.over_budget():
            self.skipped.append(size)
            return
        floor_s, gemm_s = None, None
        try:
            if floor.get("gemm") is not None:
                gemm_s = self.timer(floor["gemm"], graph)["median"]
            bw_s = floor.get("bytes", 0) / self.bw if self.dev == "cuda" else None
            floor_s = max(v for v in (gemm_s, bw_s, 0.0) if v is not None) or None
        except Exception as e:  # noqa: BLE001
            self.errors.append(dict(size, provider="floor", error=f"{type(e).__name__}: {e}"))
        for name, fn in providers.items():
            try:
                r = self.timer(fn, graph and not name.startswith("scipy"))
                self.records.append(dict(size, provider=name, **r, floor=floor_s, gemm_floor=gemm_s,
                                         bytes=floor.get("bytes")))
                print(f"  {op:17s} {size['dtype']:8s} N={N:5d} d={d:5d} {name:28s} {r['median'] * 1e3:9.3f} ms"
                      + (" (graph)" if r["graph"] else "")
                      + (f"  ours/floor {r['median'] / floor_s:.2f}" if floor_s and name.startswith("ours") else ""),
                      flush=True)
            except Exception as e:  # noqa: BLE001
                self.errors.append(dict(size, provider=name, error=f"{type(e).__name__}: {e}"))
                print(f"  {op} {size['dtype']} N={N} {name}: FAILED {type(e).__name__}: {e}", flush=True)
                if self.args.verbose:
                    traceback.print_exc()
        if self.dev == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- ops


def time_align(R: Runner, sizes, dtypes, d):
    import torch

    import exgramed_kernels as ek

    for dtype in dtypes:
        for B in sizes:
            torch.manual_seed(0)
            m = ek.MultiGraphAlignment(d).to(R.dev, dtype)
            x = torch.randn(3, B, d, device=R.dev, dtype=dtype)
            ws = [torch.empty(d, d, device=R.dev, dtype=dtype).uniform_(-d**-0.5, d**-0.5).requires_grad_()
                  for _ in range(4)]

            def ours():
                xx = x.detach().requires_grad_()
                m(xx).loss.backward()

            def floor():  # the GraphConv GEMMs on the K + 1 graphs, forward + backward
                g = torch.cat([x, x.mean(0, keepdim=True)]).detach().requires_grad_()
                h = torch.relu(g @ ws[0] + g @ ws[1])
                h = torch.relu(h @ ws[2] + h @ ws[3])
                h.sum().backward()

            R.case("align", dtype, B, d, {"ours": ours}, {"gemm": floor, "bytes": 4 * d * d * x.element_size() * 3},
                   graph=False, K=3, k=5)


def time_knn(R: Runner, sizes, dtypes, d, G=4, k=5):
    import torch

    import exgramed_kernels as ek

    try:
        import torch_cluster  # noqa: F401
        have_cluster = True
    except ImportError:
        have_cluster = False
    for dtype in dtypes:
        for N in sizes:
            x = torch.randn(G, N, d, device=R.dev, dtype=dtype)

            def addmm_topk():
                sq = (x * x).sum(-1)
                dd = torch.baddbmm(sq[:, :, None] + sq[:, None, :], x, x.transpose(1, 2), alpha=-2.0)
                dd.diagonal(dim1=1, dim2=2).fill_(float("inf"))
                return dd.topk(k, dim=-1, largest=False).indices

            providers = {"ours": lambda: ek.knn_graph(x, k), "ours (triton)": lambda: ek.knn_graph(x, k, backend="triton"),
                         "dense torch addmm+topk": addmm_topk}
            if R.args.tiny and (N, dtype) != (sizes[0], dtypes[0]):
                del providers["ours (triton)"]  # the interpreter is slow: one size exercises the path
            if have_cluster:
                import torch_cluster

                flat = x.reshape(G * N, d).float()
                batch = torch.arange(G, device=R.dev).repeat_interleave(N)
                providers["torch_cluster knn_graph"] = lambda: torch_cluster.knn_graph(flat, k, batch, loop=False)
            R.case("knn_graph", dtype, N, d, providers,
                   {"gemm": lambda: torch.bmm(x, x.transpose(1, 2)),
                    "bytes": G * N * d * x.element_size() + G * N * k * 8},
                   graph=N <= 256, G=G, k=k)


def time_graph_conv(R: Runner, sizes, dtypes, d, G=4, k=5):
    import torch

    import exgramed_kernels as ek

    try:
        from torch_geometric.nn import GraphConv
    except ImportError:
        GraphConv = None
    for dtype in dtypes:
        for N in sizes:
            torch.manual_seed(0)
            x = torch.randn(G, N, d, device=R.dev, dtype=dtype)
            nbr = ek.knn_graph(x, k)
            ws = [torch.empty(d, d, device=R.dev, dtype=dtype).uniform_(-d**-0.5, d**-0.5).requires_grad_()
                  for _ in range(4)]
            bs = [torch.zeros(d, device=R.dev, dtype=dtype, requires_grad=True) for _ in range(2)]

            def ours(backend="auto"):
                h = x.detach().requires_grad_()
                for layer in range(2):
                    h = ek.graph_conv(h, nbr, ws[2 * layer], ws[2 * layer + 1], bs[layer], "max", True, True,
                                      backend=backend)
                h.sum().backward()

            def floor():
                h = x.detach().requires_grad_()
                for layer in range(2):
                    h = torch.relu(h @ ws[2 * layer] + h @ ws[2 * layer + 1] + bs[layer])
                h.sum().backward()

            providers = {"ours": ours, "ours (triton)": lambda: ours("triton")}
            if R.args.tiny and (N, dtype) != (sizes[0], dtypes[0]):
                del providers["ours (triton)"]  # the interpreter is slow: one size exercises the path
            if GraphConv is not None:
                convs = [GraphConv(d, d, aggr="max").to(R.dev, dtype) for _ in range(2)]
                # one disjoint-union graph of the G graphs: PyG's usual batching
                src = torch.arange(G * N, device=R.dev).repeat_interleave(k)
                dst = (nbr + (torch.arange(G, device=R.dev) * N)[:, None, None]).reshape(-1)
                ei = torch.stack([src, dst])

                def pyg():
                    h = x.detach().reshape(G * N, d).requires_grad_()
                    for conv in convs:
                        h = torch.relu(conv(h, ei))
                    h.sum().backward()

                providers["PyG GraphConv (batched)"] = pyg
            el = x.element_size()
            # per layer: read x, k gathered rows, write agg and h; backward about twice that; weights 3x
            nbytes = 2 * (3 * G * N * d * el * (2 + 1) + G * N * k * 8) + 3 * 4 * d * d * el
            R.case("graph_conv", dtype, N, d, providers, {"gemm": floor, "bytes": nbytes}, graph=N <= 256,
                   G=G, k=k, layers=2, mode="fwd+bwd")


def time_lap(R: Runner, sizes, G=12):
    import numpy as np
    import torch
    from scipy.optimize import linear_sum_assignment

    import exgramed_kernels as ek

    for N in sizes:
        S = torch.rand(G, N, N, generator=torch.Generator().manual_seed(N), dtype=torch.float32)
        Sd = S.to(R.dev)
        Sn = S.numpy().astype(np.float64)
        R.case("linear_assignment", torch.float32, N, 0,
               {"ours": lambda: ek.linear_assignment(Sd),
                "scipy LAPJV (CPU, loop)": lambda: [linear_sum_assignment(s, maximize=True) for s in Sn]},
               {"gemm": None, "bytes": G * N * N * 4}, graph=N <= 256, G=G)


def time_qap(R: Runner, sizes, G=12, k=5, d=32):
    import torch

    import exgramed_kernels as ek

    for N in sizes:
        torch.manual_seed(N)
        H1 = torch.randn(G, N, d, device=R.dev)
        H2 = H1[:, torch.randperm(N, device=R.dev)] + 0.5 * torch.randn(G, N, d, device=R.dev)
        n1, n2 = ek.knn_graph(H1, k), ek.knn_graph(H2, k)
        h1 = torch.nn.functional.normalize(H1, dim=-1)
        h2 = torch.nn.functional.normalize(H2, dim=-1)
        U = h1 @ h2.transpose(1, 2)
        R.case("qap_solve", torch.float32, N, d,
               {"ours (features H)": lambda: ek.qap_solve(U, n1, n2, H1=H1, H2=H2)},
               {"gemm": None, "bytes": G * N * N * 4}, graph=False, G=G, k=k)


def check_align(R: Runner, B=24, d=32, k=5) -> dict:
    """align forward + backward on the device against the CPU kernels, float64, same inputs and noise."""
    import torch

    import exgramed_kernels as ek

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, B, d, generator=g, dtype=torch.float64)
    ws = [torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5 for _ in range(4)]
    bs = [torch.randn(d, generator=g, dtype=torch.float64) * 0.1 for _ in range(2)]
    un = -torch.log(-torch.log(torch.rand(1, 6, B, B, generator=g, dtype=torch.float64)))
    qn = -torch.log(-torch.log(torch.rand(1, 6, B * k, B * k, generator=g, dtype=torch.float64)))
    out = {}
    for key, dev in (("cpu", "cpu"), ("device", R.dev)):
        xx = x.to(dev).requires_grad_()
        loss, Z = ek.align(xx, ws[0].to(dev), ws[1].to(dev), bs[0].to(dev), ws[2].to(dev), ws[3].to(dev),
                           bs[1].to(dev), un.to(dev), qn.to(dev), None, k=k)
        loss.backward()
        out[key] = (loss.item(), Z.cpu(), xx.grad.cpu())
    (l0, z0, g0), (l1, z1, g1) = out["cpu"], out["device"]
    res = {"B": B, "d": d, "loss_cpu": l0, "loss_device": l1, "Z_agreement": float((z0 == z1).float().mean()),
           "grad_rel_err": float((g0 - g1).abs().max() / g0.abs().max().clamp_min(1e-300))}
    res["ok"] = res["Z_agreement"] == 1.0 and abs(l0 - l1) <= 1e-9 * max(1.0, abs(l0)) and res["grad_rel_err"] < 1e-8
    print(f"align {R.dev} vs cpu (float64, B={B}): loss {l1:.6f} vs {l0:.6f}, matchings agree "
          f"{100 * res['Z_agreement']:.2f} %, grad rel err {res['grad_rel_err']:.1e} -> {'OK' if res['ok'] else 'MISMATCH'}",
          flush=True)
    return res


# ------------------------------------------------------------------------------------------- output


def markdown(res: dict) -> str:
    L = ["| op | dtype | N | d | provider | median | [q20, q80] | reps | graph | floor | time / floor | vs ours |",
         "| --- | --- | ---: | ---: | --- | ---: | --- | ---: | --- | ---: | ---: | ---: |"]
    ours = {(r["op"], r["dtype"], r["N"]): r["median"] for r in res["records"] if r["provider"] == "ours"}
    for r in res["records"]:
        f = r.get("floor")
        o = ours.get((r["op"], r["dtype"], r["N"]))
        cells = [r["op"], r["dtype"], str(r["N"]), str(r["d"] or "-"), r["provider"], _t(r["median"]),
                 f"[{_t(r['q20'])}, {_t(r['q80'])}]", str(r["n"]), "yes" if r["graph"] else "no", _t(f),
                 f"{r['median'] / f:.2f}" if f else "-",
                 f"{r['median'] / o:.2f}x" if o and r["provider"] != "ours" else "-"]
        L.append("| " + " | ".join(cells) + " |")
    if res["errors"]:
        L += ["", "Failures:", ""] + [f"- {e['op']} {e['dtype']} N={e['N']} {e['provider']}: `{e['error'][:300]}`"
                                      for e in res["errors"]]
    if res["skipped"]:
        L += ["", "Skipped (over the time budget): " + "; ".join(f"{s['op']} {s['dtype']} N={s['N']}"
                                                                  for s in res["skipped"])]
    c = res.get("checks", {}).get("align_vs_cpu")
    if c:
        L += ["", f"align on the device vs the CPU kernels (float64, same inputs and noise): {c}"]
    L += ["", "Targets (issue 7, H200):", ""] + [f"- {t}" for t in targets(res)]
    return "\n".join(L) + "\n"


def _t(s):
    if s is None:
        return "-"
    return f"{s * 1e6:.1f} us" if s < 1e-3 else (f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s")


def targets(res: dict) -> list[str]:
    get = {(r["op"], r["dtype"], r["N"], r["provider"]): r for r in res["records"]}
    out = []
    for B, limit in ((64, 1e-3), (256, 3e-3)):
        r = get.get(("align", "bfloat16", B, "ours"))
        out.append(f"align fwd+bwd bf16 K=3 d=4096 B={B}: " + (f"{_t(r['median'])} (target < {_t(limit)}: "
                                                                 f"{'met' if r['median'] < limit else 'NOT met'})"
                                                                 if r else "not measured"))
    for op in ("knn_graph", "graph_conv"):
        rs = [r for r in res["records"] if r["op"] == op and r["provider"].startswith("ours") and r.get("floor")]
        if rs:
            worst = max(rs, key=lambda r: r["median"] / r["floor"])
            n_ok = sum(r["median"] <= 2 * r["floor"] for r in rs)
            out.append(f"{op}: within 2x of the floor in {n_ok}/{len(rs)} cases; worst {worst['median'] / worst['floor']:.2f}x "
                       f"({worst['provider']}, {worst['dtype']}, N={worst['N']})")
        else:
            out.append(f"{op}: not measured")
    lap = max((r for r in res["records"] if r["op"] == "linear_assignment" and r["provider"] == "ours"),
              key=lambda r: r["N"], default=None)
    sp = get.get(("linear_assignment", "float32", lap["N"], "scipy LAPJV (CPU, loop)")) if lap else None
    out.append(f"linear_assignment N={lap['N']} batch {lap.get('G')}: ours {_t(lap['median'])} vs scipy LAPJV "
               f"{_t(sp['median'])} ({'faster' if lap['median'] < sp['median'] else 'NOT faster'})"
               if lap and sp else "linear_assignment: not measured")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu (dry run)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU dry run)")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds; later cases are skipped")
    ap.add_argument("--ops", default="align,linear_assignment,knn_graph,graph_conv,qap_solve")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    _setup_env(args.device)
    import torch

    if args.device == "cpu":
        torch.set_num_threads(1)  # the dry run only checks the code paths; one thread avoids OpenMP stalls
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (peers and floors alike)
    os.makedirs(args.out, exist_ok=True)
    R = Runner(args)
    if args.tiny:
        B_sizes, d, lap_sizes, qap_sizes = [8, 16], 32, [8, 16], [8]
    else:
        B_sizes, d, lap_sizes, qap_sizes = [16, 64, 256, 1024], 4096, [64, 256, 1024], [16, 64, 256]
    dtypes = [torch.bfloat16, torch.float32]
    plan = {
        "align": lambda: time_align(R, B_sizes, dtypes, d),
        "linear_assignment": lambda: time_lap(R, lap_sizes),
        "knn_graph": lambda: time_knn(R, B_sizes, dtypes, d),
        "graph_conv": lambda: time_graph_conv(R, B_sizes, dtypes, d),
        "qap_solve": lambda: time_qap(R, qap_sizes),
    }
    checks = {}
    try:
        checks["align_vs_cpu"] = check_align(R)
    except Exception as e:  # noqa: BLE001
        checks["align_vs_cpu"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        traceback.print_exc()
    for op in args.ops.split(","):
        print(f"== {op}", flush=True)
        try:
            plan[op]()
        except Exception as e:  # noqa: BLE001 - set-up failure of a whole op: record, go on
            R.errors.append(dict(op=op, dtype="-", N=0, provider="set-up", error=f"{type(e).__name__}: {e}"))
            traceback.print_exc()
    import exgramed_kernels as ek

    vers = f"torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}"
    try:
        import triton

        vers += f", triton {triton.__version__}"
    except ImportError:
        pass
    res = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"CPU dry run ({platform.machine()})",
           "versions": vers, "compiled": ek.HAS_EXTENSION, "tiny": args.tiny,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "bandwidth_bytes_per_s": R.bw, "seconds": time.perf_counter() - R.start,
           "checks": checks, "records": R.records, "errors": R.errors, "skipped": R.skipped}
    res["markdown"] = markdown(res)
    with open(os.path.join(args.out, "gpu_timing.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "gpu_timing.md"), "w") as f:
        f.write(f"# GPU timing ({res['device']})\n\n{vers}; {res['date']}; {res['seconds']:.0f} s\n\n" + res["markdown"])
    # the short table, last
    print(f"\n== summary ({res['device']}, {res['seconds']:.0f} s)")
    for r in R.records:
        if r["provider"] == "ours":
            f = r.get("floor")
            print(f"{r['op']:17s} {r['dtype']:8s} N={r['N']:5d} {_t(r['median']):>10s}"
                  + (f"  floor {_t(f):>10s}  x{r['median'] / f:.2f}" if f else ""))
    for t in targets(res):
        print(t)
    c = checks.get("align_vs_cpu", {})
    print(f"align on {args.device} vs CPU kernels (float64): {'OK' if c.get('ok') else 'MISMATCH or failed: ' + str(c)}")
    if R.errors:
        print(f"{len(R.errors)} failures (see gpu_timing.md)")
    return res


if __name__ == "__main__":
    _res = main()
    sys.exit(0 if not _res["errors"] and _res["checks"].get("align_vs_cpu", {}).get("ok") else 1)
