"""Cases of tests/test_distributed_align.py: ``run_case`` on one rank of a gloo group, or in one process.

Run as a script (by the test, one process per rank): ``python distributed_align_worker.py OUT_DIR``
with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set; every case's results go to
``OUT_DIR/<case>_rank<r>.pt``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import exgramed_kernels as ek  # noqa: E402

D = 5
# A problem's solve depends on its own inputs only (its random starts are keyed by the seed and the start),
# so the sharded solve is the single-process solve with any number of starts: the cases use several.
BASE = dict(k=2, hidden=4, max_iter=20)

# name -> (module options, batch sizes per world size, K, wrapper: None, or "ddp"/"fsdp" around an encoder + the module)
CASES = {
    # uneven batches; in the 3-rank group rank 1 has no rows at all
    "uneven": (dict(aggr="sum", restarts=4), {1: [8], 2: [5, 3], 3: [5, 0, 3]}, 3, None),
    # the official settings: dropout masks (training), shared unary noise, partial matchings,
    # blackbox, L2 kNN, reverse aggregation, copied structure; 2 noise samples, max aggregation
    "official": (dict(official=True, samples=2, restarts=3), {1: [8], 2: [4, 4], 3: [3, 3, 2]}, 3, None),
    # K = 2 pairwise: 2 problems, so in the 3-rank group rank 2 solves none
    "empty_shard": (dict(mode="pairwise", aggr="sum", restarts=6), {1: [7], 2: [3, 4], 3: [2, 3, 2]}, 2, None),
    # an encoder in front of the module, both wrapped in DDP: the averaged gradients are the
    # single-process gradients of the concatenated batch
    "ddp": (dict(aggr="sum"), {1: [9], 2: [5, 4], 3: [4, 0, 5]}, 3, "ddp"),
    # the same under FSDP2 (fully_shard): the sharded gradients, gathered, are the single-process ones
    "fsdp": (dict(aggr="sum"), {1: [9], 2: [4, 5], 3: [3, 3, 3]}, 3, "fsdp"),
    # qap_solve's size-based starts (32 below 9 nodes) and, past 64 nodes, the module's defaults
    "size_based_restarts": (dict(restarts=-1), {1: [8], 2: [4, 4], 3: [2, 3, 3]}, 3, None),
    "module_defaults": (dict(k=3), {1: [66], 2: [40, 26], 3: [30, 6, 30]}, 3, None),
}


class Encoded(torch.nn.Module):
    """A trainable per-feature affine encoder in front of the alignment module.

    Elementwise on purpose: a GEMM's rounding depends on how many rows it gets (a rank's rows vs
    the whole batch), and the edge-feature normalisation of near-duplicate ReLU features
    amplifies those last bits to ~1e-7; an elementwise map computes every row identically.
    """

    def __init__(self, align: torch.nn.Module):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.scale = torch.nn.Parameter(1 + 0.3 * torch.randn(D, generator=g, dtype=torch.float64))
        self.shift = torch.nn.Parameter(0.3 * torch.randn(D, generator=g, dtype=torch.float64))
        self.align = align

    def forward(self, x):
        return self.align(x * self.scale + self.shift)


def global_inputs(name: str) -> torch.Tensor:
    _, sizes, K, _ = CASES[name]
    B = sum(sizes[1])
    assert all(sum(s) == B for s in sizes.values()), f"{name}: every split must cover the same batch"
    g = torch.Generator().manual_seed(len(name))
    return torch.randn(K, B, D, generator=g, dtype=torch.float64)


def run_case(name: str, world: int, rank: int) -> dict:
    """One rank's (or, world = 1 and no group, the single process's) loss, Z, accuracy and gradients."""
    opts, sizes, K, wrapper = CASES[name]
    x_all = global_inputs(name)
    lo = sum(sizes[world][:rank])
    x = x_all[:, lo:lo + sizes[world][rank]].clone().requires_grad_()
    scope = "global" if dist.is_initialized() else "local"
    torch.manual_seed(0)  # identical module initialisation everywhere
    align = ek.MultiGraphAlignment(D, graph_scope=scope, **{**BASE, **opts}).double()
    model = Encoded(align) if wrapper else align
    if scope == "global" and wrapper == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    if scope == "global" and wrapper == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    # Only rank 0's generator matters for the noise; the others are seeded differently on purpose.
    torch.manual_seed(100 + 7 * rank)
    out = model(x)
    out.loss.backward()
    # FSDP's gradients are DTensor shards: gather them (a collective, same order on every rank)
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
             for n, p in model.named_parameters()}
    grads = {n.removeprefix("module."): g for n, g in grads.items()}
    return dict(loss=out.loss.detach(), Z=out.Z.detach(), accuracy=out.accuracy, problems=out.problems,
                x_grad=x.grad.detach(), grads=grads, lo=lo, world=world)


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir = Path(sys.argv[1])
    for case in CASES:
        torch.save(run_case(case, world, rank), out_dir / f"{case}_rank{rank}.pt")
    # ranks disagreeing on K: every rank must raise (no rank left waiting in a collective)
    try:
        ek.MultiGraphAlignment(D, k=2, graph_scope="global")(torch.randn(3 if rank == 0 else 2, 4, D))
        message = "no error"
    except RuntimeError as e:
        message = str(e)
    (out_dir / f"mismatch_rank{rank}.txt").write_text(message)
    dist.barrier()
    dist.destroy_process_group()
