"""The driver's stage 2 under torchrun (2 CPU ranks, gloo, DDP) with global-batch alignment switched on from the CLI."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from exgramed_train.make_demo import ASSETS


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_stage2_global_alignment(tmp_path, stage1_model, subset):
    data = subset("stage2.json", tmp_path / "s2.json", 16)  # 8 per rank: 2 micro-batches of 4 per rank
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "exgramed_train", "stage2", "--init-from", str(stage1_model), "--data", data,
           "--image-folder", str(ASSETS / "images"), "--out", str(out), "--micro-batch", "4",
           "--max-length", "192", "--epochs", "1", "--lr", "1e-3", "--align-k", "3", "--no-progress",
           "--align-option", "graph_scope=global", "--align-option", "restarts=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    spec = json.loads((out / "model" / "exgramed_model.json").read_text())  # the saved ModelSpec
    assert spec["align_options"]["graph_scope"] == "global"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    # 3 modalities of 8 global nodes; the loss is a Hamming fraction in (0, 2]
    assert all(0 < r["align_loss"] <= 2 and len(r["accuracy"]) == 3 for r in log)
    assert (out / "model" / "alignment.pt").exists()
