"""The embedded demo: stage 1, stage 2 and evaluation on the shipped dataset, on a CPU in minutes.

The LLaMA and CLIP models are tiny and random-initialised (see
:mod:`exgramed_train.tiny`), so the demo uses larger learning rates and more
stage-2 epochs than the paper's protocol (which assumes pretrained Vicuna/CLIP);
everything else — data validation, the template, the image tokens, the
alignment loss, checkpoints, evaluation metrics — is the real code path.
Outputs: ``losses.png``, ``report.md``, ``metrics.json``, the answer JSONL and
both stages' logs, checkpoints and models under ``out``; a rerun replaces them.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .evaluation import evaluate
from .make_demo import ASSETS
from .model import LlavaMed, ModelSpec
from .tiny import demo_models
from .training import TrainConfig, train

DEMO = {"stage1": {"lr": 2e-3, "epochs": 2}, "stage2": {"lr": 1e-3, "epochs": 8},
        "micro_batch": 8, "max_length": 192}


def run_demo(out="runs/demo", seed: int = 0, stage1_epochs: int | None = None, stage2_epochs: int | None = None,
             progress: bool = True, align_options: dict | None = None) -> dict:
    """Run the whole demo and return the metrics and timings (also written to ``out``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = demo_models()
    timings = {}
    common = dict(image_folder=str(ASSETS / "images"), micro_batch=DEMO["micro_batch"], seed=seed,
                  max_length=DEMO["max_length"], progress=progress, warmup_ratio=0.1,
                  overwrite=True)  # the stage folders belong to the demo: a rerun replaces them
    spec = ModelSpec(llm=paths["llm"], vision=paths["vision"], tokenizer=paths["tokenizer"],
                     align_options=align_options or {})
    t = time.perf_counter()
    s1 = train(TrainConfig(stage="stage1", data=str(ASSETS / "stage1.json"), out=str(out / "stage1"),
                           lr=DEMO["stage1"]["lr"], epochs=stage1_epochs or DEMO["stage1"]["epochs"], **common),
               lambda: LlavaMed(spec))
    timings["stage1_s"] = time.perf_counter() - t
    t = time.perf_counter()
    s2 = train(TrainConfig(stage="stage2", data=str(ASSETS / "stage2.json"), out=str(out / "stage2"),
                           lr=DEMO["stage2"]["lr"], epochs=stage2_epochs or DEMO["stage2"]["epochs"], **common),
               lambda: LlavaMed.load(s1["model"], with_alignment=True,
                                     align_options=align_options or {}))
    timings["stage2_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model = LlavaMed.load(s2["model"])
    metrics = evaluate(model, ASSETS / "test.json", ASSETS / "images", out / "answers.jsonl", max_new_tokens=24)
    timings["evaluate_s"] = time.perf_counter() - t
    logs = [_read_log(s1["log"]), _read_log(s2["log"])]
    plot_losses(logs, out / "losses.png")
    result = {"metrics": metrics, "timings": timings, "stage1": s1, "stage2": s2}
    _write_atomic(out / "metrics.json", json.dumps(result, indent=1))
    _write_atomic(out / "report.md", _report(result, logs, out))
    return result


def _read_log(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_losses(logs: list[list[dict]], path: Path) -> None:
    """AR loss over both stages; alignment loss and mean matching accuracy over stage 2; the alignment's
    gradient: its norm over the AR gradient's (the steps where they were measured) and the fraction of
    steps whose alignment gradient is exactly zero (moving mean)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s1, s2 = logs
    fig, (a, b, d) = plt.subplots(1, 3, figsize=(15, 3.6))
    a.plot([r["step"] for r in s1], [r["ar_loss"] for r in s1], label="stage 1 AR")
    a.plot([len(s1) + r["step"] for r in s2], [r["ar_loss"] for r in s2], label="stage 2 AR")
    a.set_xlabel("optimiser step")
    a.set_ylabel("loss")
    a.legend()
    a.set_title("autoregressive loss")
    steps = [r["step"] for r in s2]
    align = [r["align_loss"] for r in s2]
    acc = [sum(r["accuracy"]) / len(r["accuracy"]) for r in s2]
    b.plot(steps, align, color="C2", alpha=0.25)
    b.plot(steps, _smooth(align), color="C2", label="alignment loss (moving mean)")
    b.set_xlabel("stage-2 step")
    b.set_ylabel("alignment loss")
    c = b.twinx()
    c.plot(steps, acc, color="C3", alpha=0.25)
    c.plot(steps, _smooth(acc), color="C3", label="matching accuracy (moving mean)")
    c.set_ylabel("matching accuracy")
    c.set_ylim(0, 1.05)
    b.set_title("stage-2 alignment")
    measured = [r for r in s2 if r.get("grad_ratio") is not None]
    d.semilogy([r["step"] for r in measured], [r["grad_ratio"] for r in measured], "o-", ms=2, color="C4",
               label="|alignment grad| / |AR grad|")
    d.axhline(1.0, color="gray", lw=0.5)
    d.set_xlabel("stage-2 step")
    d.set_ylabel("gradient-norm ratio")
    e = d.twinx()
    zero = [r["align_grad_zero"] for r in s2 if r.get("align_grad_zero") is not None]
    e.plot([r["step"] for r in s2 if r.get("align_grad_zero") is not None], _smooth(zero), color="C5",
           label="alignment gradient exactly zero (moving fraction)")
    e.set_ylim(-0.02, 1.02)
    e.set_ylabel("zero-gradient fraction")
    d.set_title("stage-2 alignment gradient")
    fig.legend(loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _smooth(values: list, window: int = 25) -> list:
    """Trailing moving mean (shorter window at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def gradient_summary(log: list[dict]) -> dict:
    """The alignment-gradient instrumentation of a stage-2 log: the fraction of steps whose alignment
    gradient was exactly zero, the alignment/AR gradient-norm ratio (median, first, last measured step;
    and its median over the parameters both losses train), and the median total gradient norm before
    clipping."""
    import statistics
    zero = [r["align_grad_zero"] for r in log if r.get("align_grad_zero") is not None]
    ratio = [r["grad_ratio"] for r in log if r.get("grad_ratio") is not None]
    shared = [r["aux_grad_norm_shared"] / r["ar_grad_norm"] for r in log
              if r.get("aux_grad_norm_shared") is not None and r.get("ar_grad_norm")]
    norms = [r["grad_norm"] for r in log if r.get("grad_norm") is not None]
    return {"zero_fraction": statistics.fmean(zero) if zero else None,
            "ratio_median": statistics.median(ratio) if ratio else None,
            "ratio_first": ratio[0] if ratio else None, "ratio_last": ratio[-1] if ratio else None,
            "ratio_n": len(ratio), "shared_ratio_median": statistics.median(shared) if shared else None,
            "grad_norm_median": statistics.median(norms) if norms else None}


def _report(result: dict, logs, out: Path) -> str:
    s1, s2 = logs
    m, t = result["metrics"], result["timings"]
    share = sum(r["align_time"] for r in s2) / max(sum(r["step_time"] for r in s2), 1e-9)
    g = gradient_summary(s2)
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    return "\n".join([
        "# exgramed_train demo report", "",
        "Tiny random-initialised LLaMA + CLIP on the embedded dataset (CPU).", "",
        "| stage | steps | first AR loss | last AR loss | last alignment loss | last matching accuracy | time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| stage 1 | {len(s1)} | {s1[0]['ar_loss']:.3f} | {s1[-1]['ar_loss']:.3f} | - | - | {t['stage1_s']:.1f} |",
        f"| stage 2 | {len(s2)} | {s2[0]['ar_loss']:.3f} | {s2[-1]['ar_loss']:.3f} | {s2[-1]['align_loss']:.3f} | "
        f"{', '.join(f'{a:.2f}' for a in s2[-1]['accuracy'])} | {t['stage2_s']:.1f} |", "",
        f"Alignment share (forward + backward) of the stage-2 step time: {100 * share:.1f} %.", "",
        f"Alignment gradient (stage 2): exactly zero in {_pct(g['zero_fraction'])} of the steps; "
        f"its norm over the AR gradient's: median {_num(g['ratio_median'])} "
        f"(first {_num(g['ratio_first'])}, last {_num(g['ratio_last'])}; {g['ratio_n']} measured steps), "
        f"median {_num(g['shared_ratio_median'])} over the parameters both losses train; "
        f"total gradient norm before clipping at 1.0: median {_num(g['grad_norm_median'])}.", "",
        f"Evaluation ({m['n_closed']} closed, {m['n_open']} open questions, {t['evaluate_s']:.1f} s): "
        f"closed accuracy {fmt(m['closed_accuracy'])} %, open recall {fmt(m['open_recall'])} %, "
        f"open F1 {fmt(m['open_f1'])} %.", "",
        "![losses](losses.png)", "",
        f"Answers: `{out / 'answers.jsonl'}`; logs: `stage1/log.jsonl`, `stage2/log.jsonl`.", ""])
