"""Learning through the solver: the Gumbel noise scale and lambda that MultiGraphAlignment's defaults come from.

    python -m experiments.noise_lambda [--quick]

Trains on the planted problems of ``exgramed_kernels.planted_align.run_planted`` (three modalities
``x_k = z A_k + 0.1 eps`` of shared 8-dim latents, input 16, a trainable linear layer per modality,
the alignment loss alone, Adam lr 1e-2, a fresh batch per step, 400 steps, seeds 0 and 1, one torch
thread) with ``MultiGraphAlignment(k=3, max_iter=20, restarts=4)`` and the options of each row. Metrics
on 4 held-out batches: cross-modal matching accuracy (the linear assignment of the projections' cosine
similarities, per pair of modalities; chance 1/B) and top-1 retrieval. Writes
``experiments/results/noise_lambda.md``.
"""
from __future__ import annotations

import argparse

import torch

from exgramed_kernels.planted_align import run_planted
from benchmarks.harness import markdown_table

from . import write_results

BASE = dict(max_iter=20, restarts=4)
SCALES = [dict(noise_scale=s, lambda_=80.0, **BASE) for s in (0.05, 0.2, 0.3, 0.5, 1.0)]
OFFICIAL = [dict(official=True, **BASE), dict(official=True, noise_scale=0.5, **BASE)]
SETTINGS = [  # (title, run_planted's problem, rows)
    ("the planted problem of the learning test (B = 16, width 32)", dict(B=16, dim=32),
     SCALES + [dict(noise_scale=0.5, lambda_=5.0, **BASE), dict(noise_scale=0.5, lambda_=1000.0, **BASE),
               dict(noise_scale=0.5, lambda_=80.0, estimator="blackbox", **BASE)] + OFFICIAL),
    ("a harder setting (B = 32, width 16)", dict(B=32, dim=16), SCALES + OFFICIAL),
]


def row(cfg, problem, steps, seeds):
    runs = [run_planted(steps=steps, seed=s, eval_every=100, **problem, **cfg) for s in seeds]
    c = dict(cfg)
    official = c.get("official", False)
    cells = [str(c.pop("noise_scale", 0.05 if official else 0.3)), str(c.pop("lambda_", 80.0)),
             c.pop("estimator", "blackbox" if official else "imle"), ", ".join(f"{k}={v}" for k, v in c.items())]
    return cells + [" / ".join(f"{a:.2f}" for a in runs[0].accuracy),
                    ", ".join(f"{r.final:.2f}" for r in runs), ", ".join(f"{r.retrieval[-1]:.2f}" for r in runs)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two rows of the first setting, 100 steps, one seed")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    steps, seeds = (100, (0,)) if a.quick else (400, (0, 1))
    lines = []
    for title, problem, cfgs in SETTINGS[:1] if a.quick else SETTINGS:
        rows = [row(cfg, problem, steps, seeds) for cfg in (cfgs[:2] if a.quick else cfgs)]
        evals = " / ".join(str(s) for s in range(0, steps + 1, 100))
        lines += [f"## {title}", ""] + markdown_table(
            ["noise scale", "lambda", "estimator", "other options", f"matching accuracy at {evals} steps (seed 0)",
             "final matching accuracy, each seed", "final top-1 retrieval, each seed"], rows) + [""]
    return write_results("noise_lambda", "Learning through the solver: noise scale and lambda",
                         "python -m experiments.noise_lambda" + (" --quick" if a.quick else ""), lines)


if __name__ == "__main__":
    print("wrote", main())
