"""Timing and reporting shared by every comparison script: median with 20/80 quantiles,
the machine and library versions, and markdown tables written under benchmarks/results/."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def measure(fn: Callable[[], object], warmup: int = 2, reps: int = 10, max_seconds: float = 20.0) -> dict:
    """Wall time of fn() in seconds: median, 20% and 80% quantiles over up to `reps` runs."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < max_seconds):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return {"median": statistics.median(times), "q20": q(0.2), "q80": q(0.8), "n": len(times)}


def fmt_time(s: float) -> str:
    return f"{s * 1e6:.0f} us" if s < 1e-3 else (f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s")


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def machine() -> str:
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch.get_num_threads()={torch.get_num_threads()}, {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def write_markdown(name: str, title: str, preamble: str, header: list[str], rows: list[list[str]]) -> str:
    """Write benchmarks/results/<name>.md and return its text."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    lines = [f"# {title}", "", f"Machine: {machine()}", "", preamble, "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    path = os.path.join(RESULTS_DIR, f"{name}.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return text
