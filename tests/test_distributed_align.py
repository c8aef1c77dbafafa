"""graph_scope="global": 2 and 3 CPU ranks on gloo (started here) against one process on the same global batch.

Every case (tests/distributed_align_worker.py) runs once per world size in one launch; each rank
saves its loss, matchings, accuracy and gradients. The single-process run (graph_scope="local",
the concatenated batch, rank 0's seed) is the oracle:
- the loss and the per-modality accuracy are the single-process values on every rank;
- each rank's Z rows are the single-process rows of its problems, and the ranks' problems
  partition the S*P problems (no rank solves all of them);
- x.grad of rank r is W times the single-process gradient of its rows (DDP's convention), and
  the module's (and, under DDP, the encoder's) parameter gradients averaged over ranks are the
  single-process gradients.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_align_worker as W  # noqa: E402

import exgramed_kernels as ek  # noqa: E402
from exgramed_kernels import distributed as D  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, out: Path) -> None:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(Path(W.__file__)), str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"world{request.param}")
    _launch(request.param, out)
    return request.param, out


@pytest.fixture(scope="module")
def single():
    return {case: W.run_case(case, 1, 0) for case in W.CASES}


@pytest.mark.parametrize("case", list(W.CASES))
def test_global_matches_single_process(ranks, single, case):
    world, out = ranks
    ref = single[case]
    res = [torch.load(out / f"{case}_rank{r}.pt", weights_only=False) for r in range(world)]
    S_P = ref["Z"].shape[0]
    solved = sorted(j for r in res for j in r["problems"])
    assert solved == list(range(S_P))  # a partition of the problems ...
    assert all(len(r["problems"]) < S_P for r in res)  # ... and no rank solves all of them
    if world == 3 and case == "empty_shard":
        assert res[2]["problems"] == [] and res[2]["Z"].shape[0] == 0  # a rank with nothing to solve
    if world == 3 and case in ("uneven", "ddp"):
        assert res[1]["x_grad"].shape[1] == 0  # a rank with an empty batch
    for r in res:
        assert torch.allclose(r["loss"], ref["loss"], rtol=1e-12, atol=0), (r["loss"], ref["loss"])
        assert torch.equal(r["accuracy"], ref["accuracy"].to(r["accuracy"].dtype))
        assert torch.equal(r["Z"], ref["Z"][r["problems"]])
        rows = ref["x_grad"][:, r["lo"]:r["lo"] + r["x_grad"].shape[1]]
        assert torch.allclose(r["x_grad"] / world, rows, rtol=1e-9, atol=1e-12)
    assert any(float(g.abs().max()) > 0 for g in ref["grads"].values())  # the check is not vacuous
    assert float(ref["x_grad"].abs().max()) > 0
    for name, g in ref["grads"].items():
        mean = sum(r["grads"][name] for r in res) / world
        assert torch.allclose(mean, g, rtol=1e-9, atol=1e-12), name
    if case in ("ddp", "fsdp"):  # DDP/FSDP already averaged: every rank holds the single-process gradients
        for r in res:
            for name, g in ref["grads"].items():
                assert torch.allclose(r["grads"][name], g, rtol=1e-9, atol=1e-12), name


def test_ranks_disagreeing_on_k_all_raise(ranks):
    world, out = ranks
    for r in range(world):
        assert "must have the same K and d on every rank" in (out / f"mismatch_rank{r}.txt").read_text()


def test_shard_partition():
    for n in (1, 2, 5, 6, 12):
        for world in (1, 2, 3, 8):
            parts = [D.shard(n, world, r) for r in range(world)]
            assert sorted(j for p in parts for j in p) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_errors_without_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    m = ek.MultiGraphAlignment(5, k=2, graph_scope="global")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        m(torch.randn(3, 6, 5))
    with pytest.raises(ValueError, match="graph_scope must be 'local' or 'global'"):
        ek.MultiGraphAlignment(5, graph_scope="world")
