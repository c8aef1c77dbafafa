"""Global-batch alignment (graph_scope="global") against per-device graphs ("local") as ranks grow.

Simulated on CPU: W processes on gloo, one thread each, every rank holding B_local samples.
``local``: each rank aligns graphs of its own B_local nodes (all 2K problems on every rank).
``global``: graphs of W * B_local nodes, the 2K problems dealt round-robin over the ranks.
Per mode and W: the median over steps of one forward + backward (wall time, and CPU time of the
slowest rank: the machine may have fewer cores than ranks, so CPU time is the per-rank cost
a dedicated device would see), and the bytes the step moves.

    python benchmarks/compare_distributed.py [--worlds 1 2 4] [--b-local 16] [--dim 64] [--steps 5]

Writes ``benchmarks/results/distributed.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    import exgramed_kernels as ek

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    K, B, d = 3, args.b_local, args.dim
    out = {}
    for scope in ("local", "global"):
        torch.manual_seed(0)
        m = ek.MultiGraphAlignment(d, k=args.k, graph_scope=scope)
        g = torch.Generator().manual_seed(rank)
        walls, cpus = [], []
        for step in range(args.steps + 1):
            x = torch.randn(K, B, d, generator=g, requires_grad=True)
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            o = m(x)
            o.loss.backward()
            c1 = time.process_time() - c0
            dist.barrier()
            t1 = time.perf_counter() - t0
            cpu = torch.tensor([c1], dtype=torch.float64)
            dist.all_reduce(cpu, op=dist.ReduceOp.MAX)
            if step > 0:  # the first step warms up
                walls.append(t1)
                cpus.append(float(cpu))
        out[scope] = dict(wall=statistics.median(walls), cpu=statistics.median(cpus),
                          problems=len(o.problems) if o.problems is not None else o.Z.shape[0])
    if rank == 0:
        Path(args.out).write_text(json.dumps(out))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "r.json"
        port = _free_port()
        procs = []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS="1")
            cmd = [sys.executable, __file__, "--worker", "--out", str(res), "--b-local", str(args.b_local),
                   "--dim", str(args.dim), "--k", str(args.k), "--steps", str(args.steps)]
            procs.append(subprocess.Popen(cmd, env=env))
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"world {world}: a rank failed")
        return json.loads(res.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--b-local", type=int, default=16)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import torch

    K, b, d, k = 3, args.b_local, args.dim, args.k
    rows = []
    for world in args.worlds:
        r = launch(world, args)
        N = world * b
        gather = K * N * d * 4  # fp32 bytes every rank receives (forward), the same again in backward
        rows.append((world, N, r, gather))
        print(world, r, flush=True)
    lines = [
        "# Global-batch alignment vs per-device graphs (CPU, gloo)", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared); "
        f"torch {torch.__version__}; one thread per rank. K = 3 modalities, B_local = {b} samples per rank, "
        f"d = h = {d}, kNN k = {k}, Frank-Wolfe, default restarts (-1) and max_iter (30). "
        f"Median of {args.steps} steps (forward + backward) after one warm-up step.", "",
        "`cpu`: CPU seconds of the slowest rank (what a device per rank would take; the ranks outnumber "
        "the cores at W >= 4). `wall`: the step's wall time here. `problems`: QAP problems rank 0 solves (global: "
        "ranks >= 6 solve none). Gathered bytes: the `[K, N, d]` fp32 tensor each rank ends up with.", "",
        "| W | local N | global N | local cpu (s) | global cpu (s) | global / local | local wall (s) | "
        "global wall (s) | problems on rank 0 (local / global) | gathered bytes per rank |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for world, N, r, gather in rows:
        lo, gl = r["local"], r["global"]
        lines.append(f"| {world} | {b} | {N} | {lo['cpu']:.3f} | {gl['cpu']:.3f} | {gl['cpu'] / lo['cpu']:.2f} | "
                     f"{lo['wall']:.3f} | {gl['wall']:.3f} | {lo['problems']} / {gl['problems']} | {gather:,} |")
    out = ROOT / "benchmarks" / "results" / "distributed.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
