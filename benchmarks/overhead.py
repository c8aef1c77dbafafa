"""What the alignment costs in a LLaVA-Med training step, and its peak memory.

* The bench ``overhead``: ``MultiGraphAlignment(4096)`` (the defaults) forward + backward on
  LLaVA-Med-7B-shaped inputs (K = 3, d = 4096; fp32 on the CPU, bf16 on a GPU), against the step
  time of the official setup derived from the paper (:data:`OFFICIAL_STEP`: an estimate, with its
  source). The report divides the two.
* :func:`memory`: the peak memory of one align forward + backward (official settings, d = 512), ours
  and the official-equivalent pipeline. CPU: in a fresh process per point, the rise of the resident
  set (``VmHWM`` reset through ``/proc/self/clear_refs``, minus ``VmRSS`` before the call; inputs and
  weights already allocated): torch's CPU tensors are malloc/mmap memory, which the resident set
  sees. CUDA: ``torch.cuda.max_memory_allocated`` over the call.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import warnings

import torch

import exgramed_kernels as ek

from .harness import Bench, Case, Provider

OFFICIAL_STEP = {
    "gpus": "4x A100 80GB", "stage2_hours": 7.5, "epochs": 3, "samples": 60_000, "llava_med_stage2_hours": 7.0,
    "source": "ExGra-Med (NeurIPS 2025, arXiv 2410.02615), training configuration: LLaMA-7B + CLIP-ViT-L/14, "
              "4x A100 80GB, stage 2 = 3 epochs in 7.5 h, 0.5 h longer than LLaVA-Med's 7.0 h; stage 2 trains on "
              "LLaVA-Med's 60K-sample instruction-tuning set.",
}
# wall seconds per sample of the 4-GPU data-parallel step: 7.5 h * 3600 / (3 epochs * 60 000) = 0.15 s
SECONDS_PER_SAMPLE = OFFICIAL_STEP["stage2_hours"] * 3600 / (OFFICIAL_STEP["epochs"] * OFFICIAL_STEP["samples"])
MEM_B = {"full": [16, 64, 256, 1024], "quick": [16, 64, 256], "tiny": [8]}
MEM_OFFICIAL_MAX_B = {"full": 256, "quick": 64, "tiny": 8}


def setup(B, scale, device):
    d = 64 if scale == "tiny" else 4096
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m = ek.MultiGraphAlignment(d).to(device, dtype)
    x = torch.randn(3, B, d, device=device, dtype=dtype).requires_grad_()
    return Case({"ours": lambda: m(x).loss}, info=dict(d=d, dtype=str(dtype).replace("torch.", "")))


BENCH = Bench(
    op="overhead",
    description="`MultiGraphAlignment(d)` (the defaults) forward + backward, K = 3, d = 4096 (LLaVA-Med-7B's width).",
    x="B",
    sizes={"full": [16, 64, 256, 1024], "quick": [16, 64], "tiny": [8]},
    providers=[Provider("ours", "ours")],
    setup=setup,
    modes=("full",),
)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) * 1024


def peak(which: str, B: int, d: int, device: str) -> int:
    """Bytes the call adds at its peak (module docstring), measured in this process."""
    torch.manual_seed(0)
    x = torch.randn(3, B, d, device=device)
    if which == "ours":
        m = ek.MultiGraphAlignment(d, official=True, dropout=0.0).to(device)

        def call():
            m(x.clone().requires_grad_()).loss.backward()
    else:
        from torch_geometric.nn import GraphConv

        from .align import KNN, official_forward
        from exgramed_kernels.module import sample_gumbel

        convs = [GraphConv(d, d, aggr="max").to(device) for _ in range(2)]
        un, qn = sample_gumbel((6, B, B), device), sample_gumbel((6, B * KNN, B * KNN), device)

        def call():
            official_forward(x.clone().requires_grad_(), convs, un, qn).backward()
    warnings.simplefilter("ignore")
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        return torch.cuda.max_memory_allocated() - before
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    call()
    return _status("VmHWM") - before


def peak_in_fresh_process(which: str, B: int, d: int, threads: int) -> int:
    """:func:`peak` on the CPU in a fresh process (this module's command line), so that nothing this
    process already holds hides the rise."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "benchmarks.overhead", which, str(B), str(d), str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if p.returncode != 0:
        raise RuntimeError(f"memory of {which} at B={B} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def memory(scale: str, device: str, log=print) -> list[dict]:
    """Peak memory of ours and the official-equivalent against B (CPU: a fresh process per point)."""
    rows, d = [], 32 if scale == "tiny" else 512
    for B in MEM_B[scale]:
        for which in ("ours", "official-equivalent"):
            if which != "ours" and B > MEM_OFFICIAL_MAX_B[scale]:
                continue
            if device == "cuda":
                nbytes = peak(which, B, d, device)
            else:
                nbytes = peak_in_fresh_process(which, B, d, torch.get_num_threads())
            rows.append(dict(which=which, B=B, d=d, device=device, peak_bytes=nbytes))
            log(f"memory {which} B={B} d={d}: +{nbytes / 2**20:.1f} MiB")
    return rows


if __name__ == "__main__":  # one CPU memory point, in a fresh process: WHICH B D THREADS
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["ours", "official-equivalent"])
    ap.add_argument("B", type=int)
    ap.add_argument("d", type=int)
    ap.add_argument("threads", type=int)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(json.dumps(peak(a.which, a.B, a.d, "cpu")))
