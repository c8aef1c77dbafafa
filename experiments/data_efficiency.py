"""Does the stage-2 alignment help when stage 1 sees 10 % of its data? A miniature of ExGra-Med's
data-efficiency study, on a CPU.

The miniature (every step cached under ``--out``; a rerun skips what is finished):

1. **data** (``make_demo.generate_study``): procedurally generated chest radiograph-like images with
   one to three planted nodules in one lung, small or large, in three disjoint pools: stage-1
   captions, stage-2 instructions (six questions per image with short answers, then "Describe the
   finding." answered with the caption, or with the extended description in
   ``conversations_long``), and held-out test questions. The facts are balanced within each pool,
   so the question alone cannot answer: only the image can.
2. **stage 0** (``lm/``): the demo's tiny LLaMA, random-initialised, is pretrained on image-free
   domain text (captions, questions and answers written from random facts). It stands in for
   Vicuna: it knows the language and the answer formats, and nothing about the images.
3. **stage 1** per seed and fraction: the projector (LM frozen) on a seeded random subset of the
   stage-1 captions, through the training driver.
4. **stage 2** per arm: the LM and the projector on all stage-2 records, ``AR + alpha * aux``, then
   evaluation on the test questions.

Arms (stage 2), all from the 10 % stage-1 model unless noted:

    ar            AR only (also from the 100 % stage-1 model: the reference of the premise check)
    align         AR + multi-graph alignment (MultiGraphAlignment defaults, alpha 1)
    infonce       AR + InfoNCE between the pooled image and the pooled raw response
    siglip        AR + SigLIP between the same two embeddings
    align_a0.1, align_a0.5           the alignment at alpha 0.1 / 0.5
    align_noext   without the extended responses (graphs of the image and the raw response only)
    align_nomp    without message passing (GraphConv keeps its root term only)
    align_pairwise                   pairwise matchings instead of matchings to the barycenter
    align_std, align_std_a0.1        not in the paper: each modality's pooled embeddings centred and
                                     scaled to unit RMS before the alignment (alpha 1 / 0.1), the
                                     diagnosis of why the default alignment does not learn here

Metrics per cell (test questions on held-out images): ``closed`` (greedy answers, closed
accuracy), ``open_recall`` (greedy, LLaVA-Med's open recall), ``fc`` (forced choice: every
candidate answer scored by its likelihood as the whole assistant answer, the best one counts;
closed yes/no, open the distinct answers of the same question), ``grounding`` (mean log-likelihood
gain of the reference answer from the question's own image over another test image's, in nats; 0
for a model that ignores the image). From the stage-2 log: the fraction of steps whose alignment
gradient was exactly zero, the median ratio of the auxiliary to the AR gradient norm, and the
final matching (or retrieval) accuracy.

The report (``--results``, markdown, with a plot next to it) gives per row the mean and the 95 %
t-interval over seeds, and the paired difference to AR only at 10 % (same seed, same stage-1
model) with its 95 % interval. ``--time-limit-min`` stops starting new cells; ``--jobs 2`` runs
the seeds in two processes.

    python experiments/data_efficiency.py --jobs 2 --results experiments/results/data_efficiency.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARMS = {
    "ar": dict(aux_loss="none", alpha=1.0, options={}, label="AR only"),
    "align": dict(aux_loss="alignment", alpha=1.0, options={}, label="AR + multi-graph alignment"),
    "infonce": dict(aux_loss="infonce", alpha=1.0, options={}, label="AR + InfoNCE"),
    "siglip": dict(aux_loss="siglip", alpha=1.0, options={}, label="AR + SigLIP"),
    "align_a0.1": dict(aux_loss="alignment", alpha=0.1, options={}, label="alignment, alpha 0.1"),
    "align_a0.5": dict(aux_loss="alignment", alpha=0.5, options={}, label="alignment, alpha 0.5"),
    "align_noext": dict(aux_loss="alignment", alpha=1.0, options={"modalities": [0, 1]},
                        label="alignment without the extended text"),
    "align_nomp": dict(aux_loss="alignment", alpha=1.0, options={"message_passing": False},
                       label="alignment without message passing"),
    "align_pairwise": dict(aux_loss="alignment", alpha=1.0, options={"mode": "pairwise"},
                           label="alignment, pairwise instead of barycenter"),
    "align_std": dict(aux_loss="alignment", alpha=1.0, options={"standardize": True},
                      label="alignment, standardised inputs"),
    "align_std_a0.1": dict(aux_loss="alignment", alpha=0.1, options={"standardize": True},
                           label="alignment, standardised inputs, alpha 0.1"),
}
MAIN = ("ar", "align", "infonce", "siglip")
ABLATIONS = ("align_a0.1", "align_a0.5", "align_noext", "align_nomp", "align_pairwise")
DIAGNOSTICS = ("align_std", "align_std_a0.1")
METRICS = {"closed": ("closed accuracy", True), "open_recall": ("open recall", True),
           "fc": ("forced-choice accuracy", True), "grounding": ("grounding (nats)", False)}
INSTRUMENTS = ("zero_grad", "grad_ratio", "match_acc")
# options that every cached step depends on: a rerun with other values needs another --out
STUDY_KEYS = ("n_stage1", "n_stage2", "n_test", "n_text", "report_share", "data_seed", "lm_steps", "lm_lr", "lm_batch",
              "stage1_epochs", "stage1_lr", "stage2_epochs", "stage2_lr", "micro_batch", "align_k",
              "align_options", "max_length", "max_new_tokens", "grad_stats_every", "warmup_ratio")


# ----------------------------------------------------------------------------------- helpers
def subsample(records: list, fraction: float, seed: int, minimum: int) -> list:
    """A seeded random subset of ``ceil(fraction * n)`` records (at least ``minimum``), file order kept."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fractions must lie in (0, 1], got {fraction}")
    n = len(records)
    m = min(n, max(math.ceil(fraction * n), minimum))
    keep = sorted(random.Random(seed * 1000003 + round(fraction * 1e6)).sample(range(n), m))
    return [records[i] for i in keep]


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _read_log(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def interval(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95 % t-interval (None for fewer than two values)."""
    from scipy import stats
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, float(stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


# ------------------------------------------------------------------------------------ scoring
def candidates(questions: list) -> dict:
    """Question id -> (candidate answers, index of the reference) for forced choice: closed
    questions yes/no, open ones the distinct reference answers of the questions with the same text
    (as written: LLaVA-Med's normalisation would turn "two" into "2", which the model never writes)."""
    from exgramed_train.evaluation import _gt, _question
    by_text = {}
    for q in questions:
        if q.get("answer_type", "").upper() == "OPEN":
            by_text.setdefault(_question(q), set()).add(_gt(q).strip())
    out = {}
    for q in questions:
        gt = _gt(q).strip()
        cands = ["yes", "no"] if q.get("answer_type", "").upper() == "CLOSED" else sorted(by_text[_question(q)])
        if gt in cands and len(cands) >= 2:
            out[q["id"]] = (cands, cands.index(gt))
    return out


@torch.no_grad()
def likelihood_metrics(model, questions: list, image_folder, chunk: int = 64) -> dict:
    """Forced-choice accuracy and grounding, from teacher-forced answer likelihoods.

    An answer's score is ``log p(" " + answer + "\\n" | image, question)`` after the generation prompt
    (the whole assistant answer, as the short answers are trained). Forced choice: the best-scoring
    candidate must be the reference. Grounding: the reference's score with the question's own image
    minus with another test image (the question half the file away whose image differs)."""
    from exgramed_train.data import load_image, prompt_ids
    from exgramed_train.evaluation import _gt, _question
    model.eval()
    tok = model.tokenizer
    cands = candidates(questions)
    n = len(questions)
    rows = []  # (question index, candidate index or -1: the reference with the wrong image, image, answer)
    for j, q in enumerate(questions):
        answers, ref = cands.get(q["id"], ([_gt(q).strip()], 0))
        wrong = next((questions[(j + n // 2 + t) % n]["image"] for t in range(n)
                      if questions[(j + n // 2 + t) % n]["image"] != q["image"]), q["image"])
        rows += [(j, c, q["image"], a) for c, a in enumerate(answers)] + [(j, -1, wrong, answers[ref])]
    names = sorted({r[2] for r in rows})
    emb = {}
    for i in range(0, len(names), chunk):
        part = names[i:i + chunk]
        pixels = torch.stack([model.vision.preprocess(load_image(Path(image_folder) / m)) for m in part])
        emb.update(zip(part, model.image_embeddings(pixels)))
    prompts = [prompt_ids(_question(q), tok, model.num_patches) for q in questions]
    scores = []
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        seqs = [(prompts[j], tok(" " + a + "\n", add_special_tokens=False)["input_ids"]) for j, _, _, a in part]
        width = max(len(p) + len(c) for p, c in seqs)
        ids = torch.full((len(part), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for r, (p, c) in enumerate(seqs):
            ids[r, :len(p) + len(c)] = torch.tensor(p + c)
            mask[r, :len(p) + len(c)] = 1
        img = torch.stack([emb[name] for _, _, name, _ in part])
        logits = model.lm(inputs_embeds=model.embed_with_image(ids, img), attention_mask=mask).logits.double()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        scores += [float(lp[r, len(p) - 1:len(p) + len(c) - 1].sum()) for r, (p, c) in enumerate(seqs)]
    by_q = {}
    for (j, c, _, _), s in zip(rows, scores):
        by_q.setdefault(j, {})[c] = s
    hits = {"CLOSED": [], "OPEN": []}
    gain = []
    for j, q in enumerate(questions):
        s = by_q[j]
        answers, ref = cands.get(q["id"], (None, 0))
        if answers is not None:
            best = max(range(len(answers)), key=lambda c: s[c])
            hits[q.get("answer_type", "OPEN").upper()].append(float(best == ref))
        gain.append(s[ref] - s[-1])
    mean = lambda v: statistics.fmean(v) if v else None  # noqa: E731
    return {"fc": mean(hits["CLOSED"] + hits["OPEN"]), "fc_closed": mean(hits["CLOSED"]),
            "fc_open": mean(hits["OPEN"]), "grounding": mean(gain), "n_fc": len(hits["CLOSED"] + hits["OPEN"])}


# ----------------------------------------------------------------------------------- pipeline
def _cpu() -> float:
    return time.process_time()


def prepare_data(args) -> Path:
    """The study's data (generated once per --out)."""
    from exgramed_train.make_demo import generate_study
    d = Path(args.out) / "data"
    if not (d / "test.json").exists():
        generate_study(d, n_stage1=args.n_stage1, n_stage2=args.n_stage2, n_test=args.n_test, n_text=args.n_text,
                       report_share=args.report_share, seed=args.data_seed)
    return d


def pretrain_lm(args) -> Path:
    """Stage 0: the demo's tiny random LLaMA trained on the image-free domain text (``text.json``),
    AdamW with a cosine schedule, the driver's template; saved with ``save_pretrained`` to ``lm/``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    from exgramed_train.data import IGNORE_INDEX, _pad, tokenize_conversation
    from exgramed_train.tiny import demo_models
    out = Path(args.out) / "lm"
    if (out / "stage0.json").exists():
        return out
    t0 = _cpu()
    paths = demo_models()
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    torch.manual_seed(args.data_seed)
    lm = AutoModelForCausalLM.from_pretrained(paths["llm"], dtype=torch.float32)
    records = json.loads((prepare_data(args) / "text.json").read_text())
    seqs = [tokenize_conversation(r["conversations"], tok, 0) for r in records]
    opt = torch.optim.AdamW(lm.parameters(), lr=args.lm_lr)
    sched = get_cosine_schedule_with_warmup(opt, max(1, args.lm_steps // 10), args.lm_steps)
    g = torch.Generator().manual_seed(args.data_seed)
    order, losses = [], []
    lm.train()
    for _ in range(args.lm_steps):
        if len(order) < args.lm_batch:
            order += torch.randperm(len(seqs), generator=g).tolist()
        idx, order = order[:args.lm_batch], order[args.lm_batch:]
        ids, mask = _pad([seqs[i][0] for i in idx], tok.pad_token_id)
        labels, _ = _pad([seqs[i][1] for i in idx], IGNORE_INDEX)
        loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    tmp = out.with_name("lm.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(str(tmp))
    k = max(1, len(losses) // 10)
    _write_json(tmp / "stage0.json", {"steps": args.lm_steps, "first_loss": losses[0],
                                      "final_loss": statistics.fmean(losses[-k:]), "cpu_s": _cpu() - t0})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _clean_checkpoints(d: Path) -> None:
    for c in d.glob("checkpoint-*"):
        shutil.rmtree(c, ignore_errors=True) if c.is_dir() else c.unlink()


def stage1(args, seed: int, fraction: float) -> Path:
    """Train (or reuse) the stage-1 model of ``(seed, fraction)``; returns its model directory."""
    from exgramed_train.model import LlavaMed, ModelSpec
    from exgramed_train.tiny import demo_models
    from exgramed_train.training import TrainConfig, train
    d = Path(args.out) / f"seed{seed}" / f"frac{fraction:g}" / "stage1"
    if (d / "stage1.json").exists():
        return d / "model"
    t0 = _cpu()
    data = prepare_data(args)
    subset = d.parent / "stage1_subset.json"
    _write_json(subset, subsample(json.loads((data / "stage1.json").read_text()), fraction, seed, args.micro_batch))
    paths = demo_models()
    spec = ModelSpec(llm=str(pretrain_lm(args)), vision=paths["vision"], tokenizer=paths["tokenizer"],
                     align_k=args.align_k)
    cfg = TrainConfig(stage="stage1", data=str(subset), image_folder=str(data / "images"), out=str(d),
                      lr=args.stage1_lr, epochs=args.stage1_epochs, micro_batch=args.micro_batch, seed=seed,
                      max_length=args.max_length, warmup_ratio=args.warmup_ratio, progress=False, device="cpu",
                      overwrite=True)  # no marker yet: an interrupted attempt, started over
    res = train(cfg, lambda: LlavaMed(spec))
    _clean_checkpoints(d)
    log = _read_log(res["log"])
    k = max(1, len(log) // 10)
    _write_json(d / "stage1.json", {"records": len(json.loads(subset.read_text())), "steps": len(log),
                                    "final_ar_loss": statistics.fmean(r["ar_loss"] for r in log[-k:]),
                                    "cpu_s": _cpu() - t0})
    return d / "model"


def run_cell(args, seed: int, fraction: float, arm: str) -> dict:
    """Stage 2 of one arm from the ``(seed, fraction)`` stage-1 model, then evaluation."""
    from exgramed_train.evaluation import evaluate
    from exgramed_train.model import LlavaMed
    from exgramed_train.training import TrainConfig, train
    a = ARMS[arm]
    s1 = stage1(args, seed, fraction)
    t0 = _cpu()
    data = prepare_data(args)
    d = Path(args.out) / f"seed{seed}" / f"frac{fraction:g}" / arm
    cfg = TrainConfig(stage="stage2", data=str(data / "stage2.json"), image_folder=str(data / "images"),
                      out=str(d / "stage2"), lr=args.stage2_lr, epochs=args.stage2_epochs,
                      micro_batch=args.micro_batch, seed=seed, max_length=args.max_length,
                      warmup_ratio=args.warmup_ratio, progress=False, device="cpu", overwrite=True,
                      grad_stats_every=args.grad_stats_every)
    options = {**args.align_options, **a["options"]} if a["aux_loss"] == "alignment" else dict(a["options"])
    res = train(cfg, lambda: LlavaMed.load(s1, with_alignment=True, alpha=a["alpha"], align_k=args.align_k,
                                           aux_loss=a["aux_loss"], align_options=options))
    _clean_checkpoints(d / "stage2")
    t1 = _cpu()
    log = _read_log(res["log"])
    model = LlavaMed.load(res["model"])
    questions = json.loads((data / "test.json").read_text())
    vqa = evaluate(model, data / "test.json", data / "images", d / "answers.jsonl",
                   max_new_tokens=args.max_new_tokens, device="cpu")
    lik = likelihood_metrics(model, questions, data / "images")
    k = max(1, len(log) // 10)
    zero = [r["align_grad_zero"] for r in log if r.get("align_grad_zero") is not None]
    ratio = [r["grad_ratio"] for r in log if r.get("grad_ratio") is not None]
    shared = [r["aux_grad_norm_shared"] / r["ar_grad_norm"] for r in log
              if r.get("aux_grad_norm_shared") is not None and r.get("ar_grad_norm")]
    result = {"seed": seed, "fraction": fraction, "arm": arm, "closed": vqa["closed_accuracy"],
              "open_recall": vqa["open_recall"], **lik, "vqa": vqa, "stage2_steps": len(log),
              "final_ar_loss": statistics.fmean(r["ar_loss"] for r in log[-k:]),
              "final_aux_loss": statistics.fmean(r["align_loss"] for r in log[-k:]),
              "match_acc": statistics.fmean(statistics.fmean(r["accuracy"]) for r in log[-k:]),
              "zero_grad": statistics.fmean(zero) if zero and a["aux_loss"] != "none" else None,
              "grad_ratio": statistics.median(ratio) if ratio and a["aux_loss"] != "none" else None,
              "grad_ratio_shared": statistics.median(shared) if shared and a["aux_loss"] != "none" else None,
              "stage2_cpu_s": t1 - t0, "eval_cpu_s": _cpu() - t1}
    if not args.keep_models:
        shutil.rmtree(d / "stage2" / "model", ignore_errors=True)  # the tiny models add up over cells
    return result


def cells(args) -> list[tuple[int, float, str]]:
    """Every cell: the main arms (and AR at the large fractions) for every seed first, then the
    ablations, so that a run cut short still has the main comparison over every seed."""
    small = min(args.fractions)
    main = [(s, f, "ar") for s in args.seeds for f in args.fractions if f != small and "ar" in args.arms]
    main = [(s, small, a) for s in args.seeds for a in args.arms if a in MAIN] + main
    main.sort(key=lambda c: args.seeds.index(c[0]))
    return main + [(s, small, a) for s in args.seeds for a in args.arms if a in ABLATIONS + DIAGNOSTICS]


def _cell_path(args, seed, fraction, arm) -> Path:
    return Path(args.out) / f"seed{seed}" / f"frac{fraction:g}" / arm / "result.json"


def _check_study(args) -> None:
    """Record the study's options in ``--out`` on the first run; refuse a rerun that changes them."""
    path = Path(args.out) / "study.json"
    mine = {k: getattr(args, k) for k in STUDY_KEYS}
    if path.exists():
        old = json.loads(path.read_text())
        diff = [f"{k}: {old.get(k)!r} there, {mine[k]!r} now" for k in STUDY_KEYS if old.get(k) != mine[k]]
        if diff:
            raise SystemExit(f"{args.out} holds a study run with other options ({'; '.join(diff)}): "
                             f"use another --out, or the same options")
    else:
        _write_json(path, mine)


def run_all(args) -> dict:
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    _check_study(args)
    prepare_data(args)
    pretrain_lm(args)
    if args.jobs > 1:
        return _run_jobs(args, start)
    done, skipped, longest = 0, [], 0.0
    for seed, fraction, arm in cells(args):
        path = _cell_path(args, seed, fraction, arm)
        if path.exists():
            continue
        elapsed = time.perf_counter() - start
        if args.time_limit_min and elapsed + longest > 60 * args.time_limit_min:
            skipped.append((seed, fraction, arm))
            continue
        t = time.perf_counter()
        print(f"[{elapsed:7.1f} s] seed {seed} fraction {fraction:g} arm {arm}", flush=True)
        result = run_cell(args, seed, fraction, arm)
        _write_json(path, result)
        longest = max(longest, time.perf_counter() - t)
        done += 1
        print(f"    closed {result['closed']:.3f} open {result['open_recall']:.3f} fc {result['fc']:.3f} "
              f"grounding {result['grounding']:.3f} ({time.perf_counter() - t:.1f} s)", flush=True)
    return {"ran": done, "skipped": skipped, "wall_s": time.perf_counter() - start}


def _run_jobs(args, start: float) -> dict:
    """Split the seeds over ``--jobs`` processes (each owns its seeds' stage-1 models)."""
    argv = [a for a in args.argv if a]
    base = []
    skip = False
    for a in argv:  # drop --seeds/--jobs and their values, keep everything else
        if a in ("--seeds", "--jobs"):
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        base.append(a)
    procs = []
    for j in range(args.jobs):
        seeds = args.seeds[j::args.jobs]
        if seeds:
            cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--jobs", "1", "--no-report",
                   "--seeds", *map(str, seeds)]
            procs.append(subprocess.Popen(cmd))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a job failed (exit codes {codes})")
    return {"ran": None, "skipped": [], "wall_s": time.perf_counter() - start}


# ------------------------------------------------------------------------------------- report
def load_results(args) -> list[dict]:
    return [json.loads(p.read_text()) for p in (_cell_path(args, *c) for c in cells(args)) if p.exists()]


def _groups(results):
    out = {}
    for r in results:
        out.setdefault((r["fraction"], r["arm"]), {})[r["seed"]] = r
    return out


def _fmt(v: tuple | None, pct: bool, signed: bool = False) -> str:
    if v is None or v[0] is None:
        return "n/a"
    mean, hw = v
    f, d = (100.0, 1) if pct else (1.0, 3)
    s = f"{f * mean:+.{d}f}" if signed else f"{f * mean:.{d}f}"
    return s + ("" if hw is None else f" ± {f * hw:.{d}f}")


def _stat(rows: dict, metric: str):
    v = [r[metric] for r in rows.values() if r.get(metric) is not None]
    return interval(v) if v else None


def _paired(rows: dict, ref: dict, metric: str):
    v = [rows[s][metric] - ref[s][metric] for s in rows if s in ref and rows[s].get(metric) is not None
         and ref[s].get(metric) is not None]
    return interval(v) if v else None


def table(args, results: list[dict]) -> str:
    """The markdown table: the premise check, the arms, the ablations and the diagnostic arms; every
    metric as mean ± 95 % half-width over seeds and, except for the reference row, the paired
    difference to AR only at the smallest fraction (Δ)."""
    groups = _groups(results)
    small = min(args.fractions)
    ref = groups.get((small, "ar"), {})
    head = ["stage-1 data", "arm", "seeds"] + [f"{name}{' %' if pct else ''}" for name, pct in METRICS.values()]
    head += ["aux gradient exactly 0 (% of steps)", "aux / AR gradient norm, all / shared parameters (median)",
             "final matching or retrieval accuracy %"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def row(fraction, arm):
        rows = groups.get((fraction, arm))
        if not rows:
            return None
        cols = [f"{100 * fraction:g} %", ARMS[arm]["label"], str(len(rows))]
        for m, (_, pct) in METRICS.items():
            cell = _fmt(_stat(rows, m), pct)
            if (fraction, arm) != (small, "ar") and ref:
                cell += f" (Δ {_fmt(_paired(rows, ref, m), pct, signed=True)})"
            cols.append(cell)
        aux = ARMS[arm]["aux_loss"] != "none"
        ratios = f"{_fmt(_stat(rows, 'grad_ratio'), False)} / {_fmt(_stat(rows, 'grad_ratio_shared'), False)}"
        cols += [_fmt(_stat(rows, "zero_grad"), True) if aux else "-", ratios if aux else "-",
                 _fmt(_stat(rows, "match_acc"), True) if aux else "-"]
        return "| " + " | ".join(cols) + " |"

    sections = [("**Premise check**: AR only", [(small, "ar")] + [(f, "ar") for f in sorted(args.fractions) if f != small]),
                (f"**Arms** at {100 * small:g} %", [(small, a) for a in MAIN if a != "ar"]),
                (f"**Ablations** of the alignment at {100 * small:g} %", [(small, a) for a in ABLATIONS]),
                (f"**Diagnostic** (not in the paper) at {100 * small:g} %", [(small, a) for a in DIAGNOSTICS])]
    for title, keys in sections:
        body = [r for r in (row(*k) for k in keys if k[1] in args.arms) if r]
        if body:
            lines.append("| " + title + " |" + " |" * (len(head) - 1))
            lines += body
    return "\n".join(lines)


def premise(args, results: list[dict]) -> list[str]:
    """One line per metric: AR only at the largest fraction minus at the smallest (paired by seed),
    its 95 % interval, the seed-to-seed standard deviation of both, and whether the difference is
    above zero with 95 % confidence and larger than both standard deviations."""
    groups = _groups(results)
    small, large = min(args.fractions), max(args.fractions)
    lo, hi = groups.get((small, "ar"), {}), groups.get((large, "ar"), {})
    if small == large or not lo or not hi:
        return []
    out = []
    for m, (name, pct) in METRICS.items():
        d = _paired(hi, lo, m)
        sds = [statistics.stdev([r[m] for r in g.values()]) if len(g) > 1 else None for g in (lo, hi)]
        if d is None or d[1] is None or None in sds:
            continue
        f = 100.0 if pct else 1.0
        unit = " pp" if pct else " nats"
        holds = d[0] - d[1] > 0 and d[0] > max(sds)
        out.append(f"- {name}: AR {100 * large:g} % − AR {100 * small:g} % = {f * d[0]:+.{1 if pct else 3}f}{unit} "
                   f"(95 % interval {f * (d[0] - d[1]):+.{1 if pct else 3}f} to {f * (d[0] + d[1]):+.{1 if pct else 3}f}); "
                   f"seed-to-seed SD {f * sds[0]:.{1 if pct else 3}f} at {100 * small:g} %, {f * sds[1]:.{1 if pct else 3}f} "
                   f"at {100 * large:g} %: {'holds' if holds else 'does not hold'}.")
    return out


def _series(logs: list[list[dict]], key: str, smooth: int = 0):
    """Mean over runs of a per-step log field (steps where it was logged), optionally a moving mean."""
    by_step = {}
    for log in logs:
        for r in log:
            v = r.get(key)
            if key == "accuracy" and v is not None:
                v = statistics.fmean(v)
            if v is not None:
                by_step.setdefault(r["step"], []).append(v)
    steps = sorted(by_step)
    ys = [statistics.fmean(by_step[s]) for s in steps]
    if smooth:
        ys = [statistics.fmean(ys[max(0, i - smooth + 1):i + 1]) for i in range(len(ys))]
    return steps, ys


def plot(args, results: list[dict], path: Path) -> None:
    """Top: each metric per arm, mean and 95 % interval over seeds. Bottom: the alignment arms'
    instrumentation over the stage-2 steps (mean over seeds): the fraction of steps whose
    alignment gradient is exactly zero, the auxiliary / AR gradient-norm ratio, matching accuracy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = _groups(results)
    small = min(args.fractions)
    keys = [(f, "ar") for f in sorted(args.fractions, reverse=True) if (f, "ar") in groups]
    keys += [(small, a) for a in list(MAIN[1:]) + list(ABLATIONS) + list(DIAGNOSTICS) if (small, a) in groups]
    labels = [f"{'AR' if a == 'ar' else a} {100 * f:g} %" for f, a in keys]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8.5))
    for ax, (m, (name, pct)) in zip(axes[0], METRICS.items()):
        stats_ = [_stat(groups[k], m) for k in keys]
        f = 100.0 if pct else 1.0
        ys = [f * s[0] if s else 0.0 for s in stats_]
        es = [f * (s[1] or 0.0) if s else 0.0 for s in stats_]
        colors = ["C0" if a == "ar" else "C1" if a in MAIN else "C2" if a in ABLATIONS else "C3" for _, a in keys]
        ax.bar(range(len(keys)), ys, yerr=es, capsize=3, color=colors)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(name + (" (%)" if pct else "") + ", mean ± 95 % CI", fontsize=9)
        if (small, "ar") in groups and stats_[keys.index((small, "ar"))]:
            ax.axhline(ys[keys.index((small, "ar"))], color="C0", lw=0.7, ls="--")
    align_arms = [a for a in ("align",) + ABLATIONS + DIAGNOSTICS + ("infonce", "siglip") if (small, a) in groups]
    for ax, (key, title, smooth) in zip(axes[1], [("align_grad_zero", "aux gradient exactly zero (fraction, moving)", 20),
                                                  ("grad_ratio", "|aux grad| / |AR grad| (moving)", 10),
                                                  ("accuracy", "matching / retrieval accuracy (moving)", 20),
                                                  ("grad_norm", "total grad norm before clipping (moving)", 20)]):
        for i, arm in enumerate(align_arms):
            logs = [_read_log(p) for s in args.seeds
                    if (p := Path(args.out) / f"seed{s}" / f"frac{small:g}" / arm / "stage2" / "log.jsonl").exists()]
            xs, ys = _series(logs, key, smooth)
            if xs:
                ax.plot(xs, ys, label=arm, color=f"C{i % 10}", lw=1, ls="-" if i < 10 else "--")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("stage-2 step")
        if key in ("grad_ratio", "grad_norm"):
            ax.set_yscale("log")
    if align_arms:
        axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def cpu_seconds(args) -> dict:
    """CPU seconds recorded by every finished step of the study (stage 0, stage 1, each cell)."""
    out = Path(args.out)
    s0 = json.loads((out / "lm" / "stage0.json").read_text())["cpu_s"] if (out / "lm" / "stage0.json").exists() else 0
    s1 = sum(json.loads(p.read_text())["cpu_s"] for p in out.glob("seed*/frac*/stage1/stage1.json"))
    cell = [json.loads(p.read_text()) for p in (_cell_path(args, *c) for c in cells(args)) if p.exists()]
    s2 = sum(r["stage2_cpu_s"] + r["eval_cpu_s"] for r in cell)
    return {"stage0": s0, "stage1": s1, "cells": s2, "total": s0 + s1 + s2}


def write_report(args, run: dict | None, command: str) -> str:
    results = load_results(args)
    res_path = Path(args.results)
    png = res_path.with_suffix(".png")
    if results:
        plot(args, results, png)
    missing = [c for c in cells(args) if not _cell_path(args, *c).exists()]
    cpu = cpu_seconds(args)
    out = Path(args.out)
    s0 = json.loads((out / "lm" / "stage0.json").read_text()) if (out / "lm" / "stage0.json").exists() else None
    s1 = {p.parent.parent.name: json.loads(p.read_text()) for p in sorted(out.glob(f"seed{args.seeds[0]}/frac*/stage1/stage1.json"))}
    steps2 = [r["stage2_steps"] for r in results]
    small = min(args.fractions)
    text = "\n".join([
        "## Data-efficiency miniature (generated by experiments/data_efficiency.py)", "",
        f"Command: `{command}`", "",
        f"Data: {args.n_stage1} stage-1 captions, {args.n_stage2} stage-2 images x 6 questions, "
        f"{args.n_test} test images x 6 questions, {args.n_text} image-free texts (data seed {args.data_seed}). "
        f"Stage 0: {args.lm_steps} steps at lr {args.lm_lr}, batch {args.lm_batch}"
        + (f" (text loss {s0['first_loss']:.2f} -> {s0['final_loss']:.3f})" if s0 else "") + ". "
        f"Stage 1: {args.stage1_epochs} epoch(s) at lr {args.stage1_lr}"
        + "".join(f"; {k[4:]}: {v['records']} captions, {v['steps']} steps, final AR loss {v['final_ar_loss']:.3f}"
                  for k, v in s1.items()) + ". "
        f"Stage 2: {args.stage2_epochs} epoch(s) at lr {args.stage2_lr} ({steps2[0] if steps2 else '?'} steps), "
        f"micro-batch {args.micro_batch}, alignment k {args.align_k}, alignment options "
        f"{args.align_options or 'MultiGraphAlignment defaults'}; gradient norms measured every "
        f"{args.grad_stats_every} step(s). Seeds {args.seeds}.", "",
        f"CPU time recorded by the finished steps: {cpu['total'] / 60:.1f} min (stage 0 {cpu['stage0'] / 60:.1f}, "
        f"stage 1 {cpu['stage1'] / 60:.1f}, stage 2 and evaluation {cpu['cells'] / 60:.1f})"
        + (f"; wall time of this invocation {run['wall_s'] / 60:.1f} min." if run else "."), "",
        f"Mean ± half-width of the 95 % t-interval over seeds; Δ: the paired difference to AR only at "
        f"{100 * small:g} % (same seed, same stage-1 model), mean ± 95 % interval. Forced choice and "
        f"grounding score teacher-forced answer likelihoods (see the script's docstring); closed accuracy "
        f"and open recall are on greedy answers. Gradient columns: from the stage-2 logs (the auxiliary "
        f"loss's gradient w.r.t. its input exactly zero; the auxiliary and AR gradient norms over all "
        f"trainable parameters and over those both losses train), medians over steps, then mean over seeds.", "",
        table(args, results), "",
        *(["Premise check (AR only):", "", *premise(args, results), ""] if premise(args, results) else []),
        f"![data efficiency]({png.name})" if results else "", "",
        ("Cells not run: " + ", ".join(f"seed {s} / {100 * f:g} % / {a}" for s, f, a in missing))
        if missing else "All cells ran.", ""])
    return text


# ----------------------------------------------------------------------------------------- cli
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--n-stage1", type=int, default=1000, help="stage-1 captions (images) generated")
    p.add_argument("--n-stage2", type=int, default=96, help="stage-2 images (six questions each)")
    p.add_argument("--n-test", type=int, default=96, help="test images (six questions each)")
    p.add_argument("--n-text", type=int, default=2000, help="image-free texts for stage 0")
    p.add_argument("--report-share", type=float, default=0.5,
                   help="share of the image-free texts that state the facts in the prompt")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--lm-steps", type=int, default=300, help="stage 0 steps")
    p.add_argument("--lm-lr", type=float, default=3e-3)
    p.add_argument("--lm-batch", type=int, default=32)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0],
                   help="stage-1 data fractions: every arm at the smallest, AR only at the others")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--stage1-epochs", type=int, default=10)
    p.add_argument("--stage1-lr", type=float, default=1e-2)
    p.add_argument("--stage2-epochs", type=int, default=4)
    p.add_argument("--stage2-lr", type=float, default=3e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--align-k", type=int, default=5)
    p.add_argument("--align-option", action="append", default=[], metavar="KEY=VALUE",
                   help="MultiGraphAlignment option for every alignment arm, repeatable")
    p.add_argument("--grad-stats-every", type=int, default=1, help="stage 2: log the gradient norms every N steps")
    p.add_argument("--max-length", type=int, default=256, help="tokens per sample")
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="processes (the seeds are split between them)")
    p.add_argument("--time-limit-min", type=float, default=0.0, help="start no new cell after this (0: no limit)")
    p.add_argument("--out", default="runs/data_efficiency", help="working directory (cached steps, per-cell results)")
    p.add_argument("--results", default="runs/data_efficiency/report.md",
                   help="markdown report to write (the plot goes next to it as .png)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from --out")
    p.add_argument("--keep-models", action="store_true", help="keep every cell's stage-2 model (about 1 MB each)")
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from exgramed_train.contrastive import parse_aux_options
    try:
        args.align_options = parse_aux_options("alignment", args.align_option)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python experiments/data_efficiency.py " + " ".join(args.argv)
    run = None if args.report_only else run_all(args)
    if args.no_report:
        return 0
    text = write_report(args, run, command)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
