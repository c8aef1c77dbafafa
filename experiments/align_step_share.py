"""The alignment's share of a real training step: the embedded demo's stage 2 (``exgramed_train``).

    python -m experiments.align_step_share [--steps 24]

Runs the demo's stage-2 configuration (tiny random LLaMA + CLIP, the default ``MultiGraphAlignment``)
for a few steps on this CPU; the driver logs, per step, the wall time of the step and of the
alignment's forward + backward (autograd hooks on its input and loss). The share is their ratio summed
over the steps after the first (which warms up allocators and kernels). Writes
``experiments/results/align_step_share.json``, which ``python -m benchmarks.report`` puts under its
overhead table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile

import torch

from . import RESULTS


def measure(steps: int) -> dict:
    from exgramed_train.demo import DEMO
    from exgramed_train.make_demo import ASSETS
    from exgramed_train.model import LlavaMed, ModelSpec
    from exgramed_train.tiny import demo_models
    from exgramed_train.training import TrainConfig, train

    paths = demo_models()
    spec = ModelSpec(llm=paths["llm"], vision=paths["vision"], tokenizer=paths["tokenizer"])
    with tempfile.TemporaryDirectory() as tmp:
        r = train(TrainConfig(stage="stage2", data=str(ASSETS / "stage2.json"), image_folder=str(ASSETS / "images"),
                              out=tmp, lr=DEMO["stage2"]["lr"], epochs=1, micro_batch=DEMO["micro_batch"],
                              max_length=DEMO["max_length"], max_steps=steps, progress=False, seed=0),
                  lambda: LlavaMed(spec, with_alignment=True))
        with open(r["log"]) as f:
            recs = [json.loads(line) for line in f if line.strip()][1:]
    with open(ASSETS / "llm_config.json") as f:
        d = json.load(f)["hidden_size"]
    step, align = sorted(r["step_time"] for r in recs), sorted(r["align_time"] for r in recs)
    return dict(description=f"the embedded demo's stage 2: tiny random LLaMA + CLIP, micro-batch "
                            f"{DEMO['micro_batch']}, K = 3, d = {d}, k = {spec.align_k}, {len(recs)} steps after a "
                            f"warm-up step, {torch.get_num_threads()} torch thread(s), wall times logged by the driver",
                median_step_s=step[len(step) // 2], median_align_s=align[len(align) // 2],
                share=sum(r["align_time"] for r in recs) / sum(r["step_time"] for r in recs))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (as the benchmarks)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "align_step_share.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = measure(a.steps)
    flags = (f" --steps {a.steps}" if a.steps != 24 else "") + (f" --threads {a.threads}" if a.threads != 1 else "")
    res.update(command="python -m experiments.align_step_share" + flags,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    print(main())
