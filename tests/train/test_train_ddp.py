"""Both stages under torchrun with 2 CPU processes (gloo): ranks stay identical, logs and models are written."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path



def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_ranks(tmp_path, tiny, subset):
    s1 = subset("stage1.json", tmp_path / "s1.json", 16)  # 8 per rank: 2 steps of 4
    s2 = subset("stage2.json", tmp_path / "s2.json", 16)  # 8 per rank: 1 step (2 x 4) per epoch
    env = dict(os.environ, TINY_PATHS=json.dumps(tiny), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(Path(__file__).with_name("ddp_worker.py")), str(tmp_path / "out"), s1, s2]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["s1"] == r1["s1"] and r0["s2"] == r1["s2"]  # gradients were all-reduced
    assert r0["r1"]["steps"] == 2 and r0["r2"]["steps"] == 3  # stage 2: 3 epochs of 1 step
    log = [json.loads(l) for l in (tmp_path / "out" / "s2" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["align_loss"] > 0 and len(r["accuracy"]) == 3 for r in log)
    assert (tmp_path / "out" / "s2" / "model" / "alignment.pt").exists()
    assert log[0]["grad_ratio"] > 0 and log[1]["grad_ratio"] is None  # measured every 10 steps by default
    assert r0["s2b"] == r1["s2b"]
    log = [json.loads(l) for l in (tmp_path / "out" / "s2b" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["grad_ratio"] > 0 and r["aux_grad_norm_shared"] <= r["aux_grad_norm"] for r in log)
