"""The one timing harness of every benchmark (``benchmarks/<op>.py``), on the CPU and on a GPU.

An op file declares a :class:`Bench`: its providers (ours, the peers, the floor), its modes
(``forward``; ``backward`` and ``full`` where there is a gradient), its sizes per scale (``tiny`` for
the smoke test, ``quick``, ``full``) and ``setup(x, scale, device)``, which builds the inputs of one
size and returns a :class:`Case`: one forward callable per provider and, for solvers, the objective
every provider reaches on the same instances. :func:`run_bench` times every case:

* modes from the forward callable: ``forward`` times it; ``full`` times it and ``out.backward(dy)``;
  ``backward`` times ``out.backward(dy, retain_graph=True)`` of one forward output;
* CPU: the CPU time of this process (``time.process_time``; the wall clock when torch runs more than
  one thread), providers interleaved round by round so that load from other processes falls on all
  of them alike; medians and 20 % / 80 % quantiles of the calls;
* CUDA: CUDA events around every call after warm-up, a round's calls queued back to back; in
  ``forward`` mode a bench marked ``graph`` is captured once in a CUDA graph and the replays are
  timed (an op with host-side work cannot be captured: its plain calls are timed instead).

A provider that runs only on the CPU (scipy, FAISS, lap) is timed on the CPU in a CUDA run too.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import statistics
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

SCALES = ("tiny", "quick", "full")
# Per (size, mode): at most ROUNDS rounds, fewer when the warm-up says a round takes long (at least one).
ROUNDS = {"tiny": 3, "quick": 5, "full": 9}
BUDGET_S = {"tiny": 0.2, "quick": 2.5, "full": 8.0}
CALL_S = 0.02  # a cheap provider is called several times per round, up to about this long (at most 10 calls)


def feature_dim(scale: str, device: str) -> int:
    """d of the benchmarks' node features: small for the smoke test, LLaVA-Med's 4096 on a GPU."""
    return 32 if scale == "tiny" else 4096 if device == "cuda" else 512


@dataclass(frozen=True)
class Provider:
    """One implementation in an op's table. ``vs``: the provider its time ratio and quality are taken against."""

    name: str
    kind: str = "peer"  # "ours", "peer" or "floor"
    devices: tuple[str, ...] = ("cpu", "cuda")
    requires: tuple[str, ...] = ()  # modules it imports
    triton: bool = False  # a Triton kernel: on a GPU, or on the CPU under TRITON_INTERPRET=1
    vs: str = "ours"

    def device(self, run_device: str) -> tuple[str | None, str]:
        """(the device it runs on in a run on ``run_device``, or None; why not)."""
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            return None, "not installed: " + ", ".join(missing)
        if self.triton:
            from exgramed_kernels.testing import triton_available

            return (run_device, "") if triton_available() else (None, "Triton needs a GPU (or TRITON_INTERPRET=1)")
        if run_device in self.devices:
            return run_device, ""
        return ("cpu", "") if "cpu" in self.devices else (None, f"runs on {'/'.join(self.devices)} only")


@dataclass
class Case:
    """One size of a bench: ``fns[provider]()`` runs the provider's forward once (returning a tensor that
    requires grad when the bench has gradient modes); ``skip[provider]`` says why one is not run at this
    size; ``info`` holds the size's parameters; ``objectives(outputs)`` (solvers) returns the objective per
    instance ``[n]`` of each solver among the providers that ran, all on the same instances, from
    ``outputs``: each provider's last forward output in the timing."""

    fns: dict[str, Callable]
    info: dict = field(default_factory=dict)
    skip: dict[str, str] = field(default_factory=dict)
    objectives: Callable[[dict], dict[str, torch.Tensor]] | None = None


@dataclass
class Bench:
    op: str
    description: str
    x: str  # the size's name in the tables ("N", "B", "W")
    sizes: dict[str, list[int]]
    providers: list[Provider]
    setup: Callable[[int, str, str], Case]
    modes: tuple[str, ...] = ("forward",)
    graph: bool = False  # forward calls can be captured in a CUDA graph

    def meta(self, device: str) -> dict:
        provs = []
        for p in self.providers:
            dev, why = p.device(device)
            label = p.name + (" (CPU)" if dev == "cpu" != device else " (interpreted)" if p.triton and dev == "cpu" else "")
            provs.append(dict(name=p.name, label=label, kind=p.kind, vs=p.vs, device=dev, unavailable=why or None))
        return dict(description=self.description, x=self.x, modes=list(self.modes), providers=provs)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _clock() -> Callable[[], float]:
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def _calls(fn: Callable, n: int, device: str) -> list[float]:
    """Seconds of each of n calls: CUDA events queued back to back, or the CPU clock around each call."""
    if device == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for a, b in ev:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in ev]
    clock, out = _clock(), []
    for _ in range(n):
        t = clock()
        fn()
        out.append(clock() - t)
    return out


def capture_cuda_graph(fn: Callable) -> tuple[torch.cuda.CUDAGraph, object]:
    """fn captured in a CUDA graph, after two calls on a side stream: the graph, and the captured call's
    output (its tensors are the ones each replay rewrites)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    torch.cuda.synchronize()
    return g, out


def _cuda_graph(fn: Callable) -> Callable:
    """fn captured in a CUDA graph: its replay."""
    return capture_cuda_graph(fn)[0].replay


def _in_mode(fn: Callable, mode: str) -> Callable:
    """The callable timed in ``mode``, from a forward callable."""
    if mode == "forward":
        return fn
    out = fn()
    g = torch.Generator().manual_seed(0)
    dy = torch.ones_like(out) if out.dim() == 0 else torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    if mode == "full":
        return lambda: fn().backward(dy)
    return lambda: out.backward(dy, retain_graph=True)


def _stats(t: list[float]) -> dict:
    s = sorted(t)
    q = lambda p: s[round(p * (len(s) - 1))]  # noqa: E731
    return dict(median=statistics.median(s), q20=q(0.2), q80=q(0.8), n=len(s))


def measure(fns: dict[str, tuple[Callable, str]], scale: str) -> dict[str, dict]:
    """Interleaved timing of ``{name: (callable, device)}``: one warm-up call each (two on CUDA), then
    rounds of every provider in turn; stats per provider."""
    first = {}
    for name, (fn, dev) in fns.items():
        for _ in range(2 if dev == "cuda" else 1):
            t = time.perf_counter()
            fn()
            _sync(dev)
            first[name] = time.perf_counter() - t
    per_round = sum(first.values())
    rounds = int(min(ROUNDS[scale], max(1, BUDGET_S[scale] / max(per_round, 1e-9))))
    inner = {n: int(min(10, max(1, CALL_S / max(t, 1e-9)))) if scale != "tiny" else 1 for n, t in first.items()}
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, (fn, dev) in fns.items():
            times[name] += _calls(fn, inner[name], dev)
    return {n: _stats(t) for n, t in times.items()}


def quality(obj: dict[str, torch.Tensor], vs: dict[str, str]) -> dict[str, dict]:
    """Each provider's objective relative to its ``vs`` provider's on the same instances:
    ``mean``/``min``/``max`` of ``(f - f_vs) / |f_vs|`` and ``vs_ge``, the instances where the ``vs``
    provider is at least as good."""
    out = {}
    for name, f in obj.items():
        ref = obj.get(vs.get(name, "ours"))
        if ref is None or ref is f:
            continue
        f, ref = f.double().cpu(), ref.double().cpu()
        rel = (f - ref) / ref.abs().clamp_min(1e-12)
        out[name] = dict(vs=vs.get(name, "ours"), mean=float(rel.mean()), min=float(rel.min()), max=float(rel.max()),
                         vs_ge=int((ref >= f - 1e-9 * f.abs()).sum()), n=len(f))
    return out


def run_bench(bench: Bench, scale: str, device: str, log=print, deadline: float | None = None) -> list[dict]:
    """Every size and mode of ``bench``: one record per (size, mode, provider) that ran or was skipped there."""
    where = {p.name: p.device(device)[0] for p in bench.providers}
    vs = {p.name: p.vs for p in bench.providers}
    records = []
    for x in bench.sizes[scale]:
        base = dict(op=bench.op, device=device, x=x)
        if deadline is not None and time.perf_counter() > deadline:
            records += [dict(base, mode=m, provider=p, skipped="over the run's time budget")
                        for m in bench.modes for p, d in where.items() if d]
            log(f"{bench.op} {bench.x}={x}: skipped (time budget)")
            continue
        torch.manual_seed(x)
        case = bench.setup(x, scale, device)
        base.update(case.info)
        outputs = {}
        for mode in bench.modes:
            fns = {}
            for name, dev in where.items():
                if dev is None:
                    continue
                if name in case.skip or name not in case.fns:
                    records.append(dict(base, mode=mode, provider=name, skipped=case.skip.get(name, "not at this size")))
                    continue
                try:
                    fn, graphed = _in_mode(case.fns[name], mode), False
                    if mode == "forward" and case.objectives is not None:  # keep the output for the quality
                        fn = (lambda f, n: lambda: outputs.__setitem__(n, f()))(fn, name)
                    if mode == "forward" and bench.graph and dev == "cuda":
                        try:
                            fn, graphed = _cuda_graph(fn), True
                        except Exception:  # noqa: BLE001 - not capturable: time the plain calls
                            torch.cuda.synchronize()
                    fns[name] = (fn, dev, graphed)
                except Exception as e:  # noqa: BLE001 - one provider's failure is recorded, the run goes on
                    records.append(dict(base, mode=mode, provider=name, error=f"{type(e).__name__}: {e}"))
                    log(traceback.format_exc())
            try:
                stats = measure({n: (f, d) for n, (f, d, _) in fns.items()}, scale)
            except Exception:  # noqa: BLE001 - find the provider that fails, time the others
                stats = {}
                for n, (f, d, _) in list(fns.items()):
                    try:
                        stats[n] = measure({n: (f, d)}, scale)[n]
                    except Exception as e:  # noqa: BLE001
                        records.append(dict(base, mode=mode, provider=n, error=f"{type(e).__name__}: {e}"))
                        log(traceback.format_exc())
            for n, st in stats.items():
                records.append(dict(base, mode=mode, provider=n, run_on=fns[n][1], graph=fns[n][2], **st))
            log(f"{bench.op} {mode} {bench.x}={x}: " +
                ", ".join(f"{n} {fmt_time(st['median'])}" for n, st in stats.items()))
        if case.objectives is not None:
            try:
                q = quality(case.objectives(outputs), vs)
            except Exception as e:  # noqa: BLE001 - recorded like a provider's failure
                q = {}
                records.append(dict(base, mode=bench.modes[0], provider="quality", error=f"{type(e).__name__}: {e}"))
                log(traceback.format_exc())
            for r in records:
                if r.get("x") == x and r["mode"] == bench.modes[0] and r["provider"] in q and "median" in r:
                    r["quality"] = q[r["provider"]]
        del case
        if device == "cuda":
            torch.cuda.empty_cache()
    return records


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def machine(device: str) -> dict:
    """The facts stored with every run: CPU, cores, torch threads, clock, GPU, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    if device == "cuda":
        versions["cuda"] = torch.version.cuda
        try:
            versions["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                                capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            versions["driver"] = None
    for name in ("numpy", "scipy", "torch_geometric", "faiss", "lap", "pygmtools", "torch_linear_assignment",
                 "triton", "matplotlib"):
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception:  # noqa: BLE001 - any import failure means "not available here"
            versions[name] = None
    import exgramed_kernels as ek

    versions["exgramed_kernels"] = ek.__version__ + (" (compiled)" if ek.HAS_EXTENSION else " (reference fallback)")
    return dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(),
                clock="CUDA events" if device == "cuda" else
                "process CPU time" if torch.get_num_threads() == 1 else "wall time",
                gpu=torch.cuda.get_device_name() if device == "cuda" else None,
                triton_interpret=os.environ.get("TRITON_INTERPRET") == "1", load=os.getloadavg()[0], versions=versions)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
