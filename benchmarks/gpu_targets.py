"""The GPU's targets, each measured directly (``python -m benchmarks.gpu_targets``, run by
``scripts/gpu_check.sh``), and whether one align training step captures in a CUDA graph.

* align forward + backward (``MultiGraphAlignment(4096)``, the defaults, K = 3, bf16): < 1 ms at
  B = 64, < 3 ms at B = 256;
* ``knn_graph`` and ``graph_conv`` forward within 2x of their floors (the benches' floors: the Gram
  GEMM, the linear layers) at every size of their benches;
* ``linear_assignment`` of 1024 problems at N = 64 (float32, uniform scores) in <= 0.5 ms;
* one N = 1024 ``linear_assignment`` (float64) faster than ``lap.lapjv`` on this machine's CPU.

Times are medians of the harness's :func:`~benchmarks.harness.measure` (CUDA events after warm-up;
the CPU peer by its process clock). Writes ``<out>/results/cuda_targets.json``, which
``python -m benchmarks.report --render`` turns into the targets table of RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import exgramed_kernels as ek

from . import graph_conv, knn_graph, overhead
from .harness import _in_mode, capture_cuda_graph, machine, measure

HERE = os.path.dirname(os.path.abspath(__file__))
SCALE = "quick"  # the harness's rounds and budget per measurement


def _median(fn, device="cuda") -> float:
    return measure({"x": (fn, device)}, SCALE)["x"]["median"]


def align_targets(device="cuda", sizes=(64, 256)) -> list[dict]:
    out = []
    for B, limit in zip(sizes, (1e-3, 3e-3)):
        case = overhead.setup(B, "full", device)
        t = _median(_in_mode(case.fns["ours"], "full"), device)
        out.append(dict(target=f"align fwd + bwd, K = 3, d = 4096, bf16, B = {B}", figure=t, unit="s",
                        limit=limit, met=t < limit))
    return out


def floor_targets(device="cuda", scale="full") -> list[dict]:
    out = []
    for bench in (knn_graph.BENCH, graph_conv.BENCH):
        floor = next(p.name for p in bench.providers if p.kind == "floor")
        for N in bench.sizes[scale]:
            torch.manual_seed(N)
            case = bench.setup(N, scale, device)
            st = measure({n: (case.fns[n], device) for n in ("ours", floor)}, SCALE)
            r = st["ours"]["median"] / st[floor]["median"]
            out.append(dict(target=f"{bench.op} forward / {floor}, {bench.x} = {N}", figure=r, unit="x",
                            limit=2.0, met=r <= 2.0, ours=st["ours"]["median"], floor=st[floor]["median"]))
    return out


def lap_targets(device="cuda") -> list[dict]:
    g = torch.Generator().manual_seed(0)
    S = torch.rand(1024, 64, 64, generator=g).to(device)
    t = _median(lambda: ek.linear_assignment(S), device)
    out = [dict(target="linear_assignment, 1024 problems, N = 64, float32", figure=t, unit="s", limit=5e-4,
                met=t <= 5e-4)]
    S1 = torch.rand(1, 1024, 1024, dtype=torch.float64, generator=g)
    S1c = S1.to(device)
    ours = _median(lambda: ek.linear_assignment(S1c), device)
    try:
        import lap

        neg = -S1[0].numpy()
        peer = _median(lambda: lap.lapjv(neg, extend_cost=False), "cpu")
    except ImportError:
        peer = None
    out.append(dict(target="linear_assignment, one N = 1024 problem, float64, vs lap.lapjv on the CPU",
                    figure=None if peer is None else peer / ours, unit="x (lapjv time / ours)", limit=1.0,
                    met=None if peer is None else ours < peer, ours=ours, peer=peer))
    return out


def cuda_graph_capture(B: int = 64, d: int = 512) -> dict:
    """Whether one align training step (the module's forward + backward, defaults, fp32) captures in a
    CUDA graph, and whether a replay gives the eager step's loss and gradient for the same noise."""
    torch.manual_seed(0)
    m = ek.MultiGraphAlignment(d).cuda()
    x = torch.randn(3, B, d, device="cuda", requires_grad=True)

    def step():
        x.grad = None
        loss = m(x).loss
        loss.backward()
        return loss

    out = dict(B=B, d=d, captured=False, replay_matches=None, error=None)
    try:
        graph, loss_g = capture_cuda_graph(step)
        out["captured"] = True
    except Exception as e:  # noqa: BLE001 - the answer is whether it captures, and why not
        torch.cuda.synchronize()
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}"
        return out
    state = torch.cuda.get_rng_state()
    graph.replay()
    torch.cuda.synchronize()
    replayed = (loss_g.detach().clone(), x.grad.detach().clone())
    torch.cuda.set_rng_state(state)  # the eager step draws the noise the replay drew
    loss = step()
    out["replay_matches"] = bool(torch.allclose(replayed[0], loss.detach()) and torch.allclose(replayed[1], x.grad))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=HERE, help="directory of results/ (default: benchmarks/)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("no GPU here")
    res = dict(machine=machine("cuda"), targets=[], errors={})
    path = os.path.join(a.out, "results", "cuda_targets.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for name, fn in (("cuda_graph", cuda_graph_capture), ("align", align_targets), ("lap", lap_targets),
                     ("floors", floor_targets)):
        try:
            r = fn()
            if name == "cuda_graph":
                res["cuda_graph"] = r
            else:
                res["targets"] += r
            print(name, json.dumps(r, default=str), flush=True)
        except Exception as e:  # noqa: BLE001 - a failing part is recorded, the others still run
            torch.cuda.synchronize()
            res["errors"][name] = f"{type(e).__name__}: {e}"
            print(name, "failed:", res["errors"][name], flush=True)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
