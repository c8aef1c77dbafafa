"""A miniature of ExGra-Med's data-efficiency study: does the stage-2 auxiliary loss help when
stage 1 sees less data?

For every seed and every stage-1 data fraction (default 10 % and 100 %, a seeded random subset
of the stage-1 records) the runner trains stage 1 once, then stage 2 from that model with each
arm, and evaluates on the test questions:

    ar         (a) AR loss only
    align      (b) AR + multi-graph alignment (alpha 1.0)
    infonce    (c) AR + InfoNCE   between the pooled image and the pooled raw response
    siglip     (d) AR + SigLIP    between the same two embeddings

and the paper's ablations (by default at the smallest fraction only): ``align_a0.1``,
``align_a0.5`` (alpha), ``align_noext`` (image and raw response only: no extended context),
``align_nomp`` (GraphConv without the neighbour term: no message passing), ``align_pairwise``
(the three pairwise matchings instead of matchings to the barycenter).

Metrics per cell:

* ``closed`` / ``open_recall`` / ``open_f1``: the driver's VQA metrics on greedy answers
  (LLaVA-Med's run_eval: closed accuracy, open token recall), ``vqa_avg`` = mean of closed
  and open recall (the paper's "Avg");
* ``fc_closed`` / ``fc_open``: forced-choice accuracy: every candidate answer (closed: yes/no;
  open: the distinct answers of the test questions with the same question text) is scored by
  its teacher-forced log-likelihood as the assistant turn (log-sum-exp over the answer as
  written and capitalised), the best one counts. Sensitive where greedy generation of a small
  model is still degenerate;
* ``nll`` and ``grounding``: the mean negative log-likelihood of the reference answers with the
  question's own image, and how much it rises with another question's image
  (``nll_wrong_image - nll``; > 0 means the model uses the image).

Every cell's result is a JSON file under ``--out``; a rerun skips finished cells, and
``--time-limit-min`` stops starting new cells so the run ends in budget (missing cells are
listed in the table). The table goes to ``--results`` (markdown) with a plot next to it.

    python experiments/data_efficiency.py --seeds 0 1 2 --out runs/data_efficiency \\
        --results experiments/results/data_efficiency.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MAIN_ARMS = {
    "ar": dict(aux_loss="none", alpha=1.0, options={}, label="(a) AR only"),
    "align": dict(aux_loss="alignment", alpha=1.0, options={}, label="(b) AR + multi-graph alignment"),
    "infonce": dict(aux_loss="infonce", alpha=1.0, options={}, label="(c) AR + InfoNCE"),
    "siglip": dict(aux_loss="siglip", alpha=1.0, options={}, label="(d) AR + SigLIP"),
}
ABLATION_ARMS = {
    "align_a0.1": dict(aux_loss="alignment", alpha=0.1, options={}, label="alignment, alpha 0.1"),
    "align_a0.5": dict(aux_loss="alignment", alpha=0.5, options={}, label="alignment, alpha 0.5"),
    "align_noext": dict(aux_loss="alignment", alpha=1.0, options={"modalities": [0, 1]},
                        label="alignment without extended context"),
    "align_nomp": dict(aux_loss="alignment", alpha=1.0, options={"message_passing": False},
                       label="alignment without message passing"),
    "align_pairwise": dict(aux_loss="alignment", alpha=1.0, options={"mode": "pairwise"},
                           label="alignment, pairwise instead of barycenter"),
}
ARMS = {**MAIN_ARMS, **ABLATION_ARMS}
METRICS = ("closed", "open_recall", "open_f1", "vqa_avg", "fc_closed", "fc_open", "nll", "grounding")


# ----------------------------------------------------------------------------------- data
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


# ------------------------------------------------------------------------------ scoring
def _candidates(questions: list) -> dict:
    """Question id -> (candidate answers, index of the reference) for forced choice."""
    from exgramed_train.evaluation import _gt, _question, normalize_answer
    by_text = {}
    for q in questions:
        if q.get("answer_type", "").upper() == "OPEN":
            by_text.setdefault(_question(q), set()).add(normalize_answer(_gt(q)))
    out = {}
    for q in questions:
        gt = normalize_answer(_gt(q))
        if q.get("answer_type", "").upper() == "CLOSED":
            cands = ["yes", "no"]
        else:
            cands = sorted(by_text[_question(q)])
        if gt in cands and len(cands) >= 2:
            out[q["id"]] = (cands, cands.index(gt))
    return out


@torch.no_grad()
def _answer_logprob(model, pixels: torch.Tensor, question: str, answers: list[str]) -> torch.Tensor:
    """log p(answer | image, question) of each answer as the start of the assistant turn: the
    generation prompt (``### Assistant:``, as greedy evaluation uses) followed by ``" " + answer``,
    no terminator (short reference answers such as "yes" begin longer trained responses).
    Log-sum-exp over the answer as written and with a capital first letter."""
    from exgramed_train.data import prompt_ids
    tok = model.tokenizer
    prompt = prompt_ids(question, tok, model.num_patches)
    variants = [(i, v) for i, a in enumerate(answers) for v in sorted({a, a[:1].upper() + a[1:]})]
    conts = [tok(" " + v, add_special_tokens=False)["input_ids"] for _, v in variants]
    width = len(prompt) + max(len(c) for c in conts)
    pad = tok.pad_token_id
    ids = torch.tensor([prompt + c + [pad] * (width - len(prompt) - len(c)) for c in conts])
    mask = torch.tensor([[1] * (len(prompt) + len(c)) + [0] * (width - len(prompt) - len(c)) for c in conts])
    img = model.image_embeddings(pixels.unsqueeze(0).expand(len(conts), *pixels.shape))
    logits = model.lm(inputs_embeds=model.embed_with_image(ids, img), attention_mask=mask).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    scores = torch.full((len(answers),), -math.inf, dtype=torch.float64)
    for r, ((i, _), c) in enumerate(zip(variants, conts)):
        scores[i] = torch.logaddexp(scores[i], lp[r, len(prompt) - 1:len(prompt) - 1 + len(c)].sum())
    return scores


@torch.no_grad()
def likelihood_metrics(model, questions: list, image_folder) -> dict:
    """Forced-choice accuracies and the reference answers' NLL with the right and a wrong image."""
    from exgramed_train.data import load_image
    from exgramed_train.evaluation import _gt, _question, normalize_answer
    model.eval()
    cands = _candidates(questions)
    n = len(questions)
    cache = {}

    def pix(name):
        if name not in cache:
            cache[name] = model.vision.preprocess(load_image(Path(image_folder) / name))
        return cache[name]

    hits = {"CLOSED": [], "OPEN": []}
    nll, nll_wrong = [], []
    for j, q in enumerate(questions):
        question = _question(q)
        # a wrong image: the question half the file away whose image differs
        wrong = next((questions[(j + n // 2 + t) % n]["image"] for t in range(n)
                      if questions[(j + n // 2 + t) % n]["image"] != q["image"]), q["image"])
        gt = normalize_answer(_gt(q))
        if q["id"] in cands:
            answers, ref = cands[q["id"]]
            s = _answer_logprob(model, pix(q["image"]), question, answers)
            hits[q.get("answer_type", "OPEN").upper()].append(float(int(s.argmax()) == ref))
            right = float(s[ref])
        else:
            right = float(_answer_logprob(model, pix(q["image"]), question, [gt])[0])
        nll.append(-right)
        nll_wrong.append(-float(_answer_logprob(model, pix(wrong), question, [gt])[0]))
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    return {"fc_closed": mean(hits["CLOSED"]), "fc_open": mean(hits["OPEN"]), "nll": mean(nll),
            "nll_wrong_image": mean(nll_wrong), "grounding": mean([w - r for w, r in zip(nll_wrong, nll)]),
            "n_fc_closed": len(hits["CLOSED"]), "n_fc_open": len(hits["OPEN"])}


# ------------------------------------------------------------------------------- training
def _models(args) -> dict:
    if args.llm:
        return {"llm": args.llm, "vision": args.vision, "tokenizer": args.tokenizer}
    from exgramed_train.tiny import demo_models
    return demo_models()


def _stage1(args, seed: int, fraction: float) -> Path:
    """Train (or reuse) the stage-1 model of ``(seed, fraction)``; returns its model directory."""
    from exgramed_train.model import LlavaMed, ModelSpec
    from exgramed_train.training import TrainConfig, train
    d = Path(args.out) / f"seed{seed}" / f"frac{fraction:g}" / "stage1"
    if (d / "model" / "exgramed_model.json").exists():
        return d / "model"
    records = json.loads(Path(args.stage1).read_text())
    data = d.parent / "stage1_subset.json"
    _write_json(data, subsample(records, fraction, seed, args.micro_batch))
    paths = _models(args)
    spec = ModelSpec(llm=paths["llm"], vision=paths["vision"], tokenizer=paths["tokenizer"],
                     vision_backend=args.vision_backend, align_k=args.align_k)
    cfg = TrainConfig(stage="stage1", data=str(data), image_folder=args.image_folder, out=str(d),
                      lr=args.stage1_lr, epochs=args.stage1_epochs, micro_batch=args.micro_batch, seed=seed,
                      max_length=args.max_length, warmup_ratio=0.1, progress=False, device=args.device,
                      overwrite=True)  # no model yet: an interrupted attempt, started over
    res = train(cfg, lambda: LlavaMed(spec))
    _clean_checkpoints(d)
    return Path(res["model"])


def _clean_checkpoints(d: Path) -> None:
    for c in d.glob("checkpoint-*"):
        shutil.rmtree(c, ignore_errors=True) if c.is_dir() else c.unlink()


def run_cell(args, seed: int, fraction: float, arm: str) -> dict:
    """Stage 2 of one arm from the ``(seed, fraction)`` stage-1 model, then evaluation."""
    from exgramed_train.evaluation import evaluate
    from exgramed_train.model import LlavaMed
    from exgramed_train.training import TrainConfig, train
    cfg_arm = ARMS[arm]
    t0 = time.perf_counter()
    s1 = _stage1(args, seed, fraction)
    t1 = time.perf_counter()
    d = Path(args.out) / f"seed{seed}" / f"frac{fraction:g}" / arm
    stage2_data = args.stage2
    if args.fraction_applies == "both":
        stage2_data = str(d.parent / "stage2_subset.json")
        if not Path(stage2_data).exists():
            _write_json(Path(stage2_data), subsample(json.loads(Path(args.stage2).read_text()), fraction, seed + 7919,
                                                     args.micro_batch))
    cfg = TrainConfig(stage="stage2", data=stage2_data, image_folder=args.image_folder, out=str(d / "stage2"),
                      lr=args.stage2_lr, epochs=args.stage2_epochs, micro_batch=args.micro_batch, seed=seed,
                      max_length=args.max_length, warmup_ratio=0.1, progress=False, device=args.device,
                      overwrite=True)  # a cell without its result file is started over
    overrides = dict(alpha=cfg_arm["alpha"], align_k=args.align_k, aux_loss=cfg_arm["aux_loss"],
                     align_options={**args.align_options, **cfg_arm["options"]}
                     if cfg_arm["aux_loss"] == "alignment" else dict(cfg_arm["options"]))
    res = train(cfg, lambda: LlavaMed.load(s1, with_alignment=True, **overrides))
    _clean_checkpoints(d / "stage2")
    t2 = time.perf_counter()
    log = [json.loads(line) for line in Path(res["log"]).read_text().splitlines() if line.strip()]
    model = LlavaMed.load(res["model"])
    questions = json.loads(Path(args.test).read_text())
    vqa = evaluate(model, args.test, args.image_folder, d / "answers.jsonl", max_new_tokens=args.max_new_tokens,
                   device=args.device)
    lik = likelihood_metrics(model, questions, args.image_folder)
    t3 = time.perf_counter()
    closed, recall = vqa["closed_accuracy"], vqa["open_recall"]
    avg = None if closed is None or recall is None else (closed + recall) / 2
    k = max(1, len(log) // 10)
    result = {"seed": seed, "fraction": fraction, "arm": arm, "closed": closed, "open_recall": recall,
              "open_f1": vqa["open_f1"], "vqa_avg": avg, **lik, "vqa": vqa,
              "stage2_steps": len(log), "final_ar_loss": sum(r["ar_loss"] for r in log[-k:]) / k,
              "final_aux_loss": sum(r["align_loss"] for r in log[-k:]) / k,
              "final_aux_accuracy": [sum(x) / k for x in zip(*[r["accuracy"] for r in log[-k:]])],
              "stage1_s": t1 - t0, "stage2_s": t2 - t1, "eval_s": t3 - t2}
    shutil.rmtree(d / "stage2" / "model", ignore_errors=True)  # the tiny models add up over cells
    return result


def cells(args) -> list[tuple[int, float, str]]:
    """All cells, main arms for every seed first, then the ablations (so a cut-short run still
    has the main comparison over every seed)."""
    out = [(s, f, a) for s in args.seeds for f in args.fractions for a in args.arms if a in MAIN_ARMS]
    abl_fracs = args.ablation_fractions if args.ablation_fractions is not None else [min(args.fractions)]
    out += [(s, f, a) for s in args.seeds for f in args.fractions if f in abl_fracs
            for a in args.arms if a in ABLATION_ARMS]
    return out


def _cell_path(args, seed, fraction, arm) -> Path:
    return Path(args.out) / f"seed{seed}" / f"frac{fraction:g}" / arm / "result.json"


def run_all(args) -> dict:
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    todo = cells(args)
    done, skipped, longest = 0, [], 0.0
    for seed, fraction, arm in todo:
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
        print(f"    closed {result['closed']} open {result['open_recall']} fc_closed {result['fc_closed']} "
              f"fc_open {result['fc_open']} nll {result['nll']:.3f} grounding {result['grounding']:.3f} "
              f"({time.perf_counter() - t:.1f} s)", flush=True)
    return {"ran": done, "skipped": skipped, "wall_s": time.perf_counter() - start}


def grad_norms(args, seed: int, fraction: float, batches: int = 4) -> str:
    """Markdown table: norms of the AR loss's and the auxiliary loss's gradients over the stage-2
    trainable parameters (and over the parameters outside the auxiliary module), at the
    ``(seed, fraction)`` stage-1 model on the first ``batches`` stage-2 micro-batches. The trainer
    clips the global norm of their sum (alpha-weighted) at 1.0."""
    from exgramed_train.data import ImageTextDataset, collate, load_records
    from exgramed_train.model import LlavaMed
    from exgramed_train.training import configure_trainable, epoch_batches, TrainConfig
    s1 = _stage1(args, seed, fraction)
    norm = lambda gs: float(torch.sqrt(sum((g.double() ** 2).sum() for g in gs if g is not None)))  # noqa: E731
    lines = ["| aux loss | AR grad norm | aux grad norm | aux grad norm outside the aux module | largest aux grads |",
             "| --- | --- | --- | --- | --- |"]
    for kind in ("alignment", "infonce", "siglip"):
        torch.manual_seed(seed)
        model = LlavaMed.load(s1, with_alignment=True, align_k=args.align_k, aux_loss=kind,
                              align_options=args.align_options if kind == "alignment" else {})
        params = configure_trainable(model, "stage2")
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        samples = load_records(args.stage2, args.image_folder, model.tokenizer, model.num_patches, args.max_length,
                               need_long=True)
        ds = ImageTextDataset(samples, args.image_folder, model.vision.preprocess)
        cfg = TrainConfig(stage="stage2", data=args.stage2, image_folder=args.image_folder, out="-", seed=seed,
                          micro_batch=args.micro_batch)
        rows = []
        for idx in epoch_batches(len(ds), 0, cfg, 0, 1)[:batches]:
            r = model(collate([ds[i] for i in idx], model.tokenizer.pad_token_id), align=True)
            ar = torch.autograd.grad(r["ar_loss"], params, allow_unused=True, retain_graph=True)
            aux = torch.autograd.grad(r["align_loss"], params, allow_unused=True)
            top = sorted(((float(g.norm()), n) for g, n in zip(aux, names) if g is not None), reverse=True)[:3]
            rows.append((norm(ar), norm(aux), norm([g for g, n in zip(aux, names) if not n.startswith("align.")]), top))
        med = lambda v: statistics.median(v)  # noqa: E731
        lines.append(f"| {kind} | {med([r[0] for r in rows]):.3g} | {med([r[1] for r in rows]):.3g} | "
                     f"{med([r[2] for r in rows]):.3g} | "
                     + ", ".join(f"{n} {v:.3g}" for v, n in rows[0][3]) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- report
def load_results(args) -> list[dict]:
    out = []
    for seed, fraction, arm in cells(args):
        p = _cell_path(args, seed, fraction, arm)
        if p.exists():
            out.append(json.loads(p.read_text()))
    return out


def summarize(results: list[dict]) -> dict:
    """``(fraction, arm) -> {metric: (mean, sample std or None, n)}``."""
    groups = {}
    for r in results:
        groups.setdefault((r["fraction"], r["arm"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        out[key] = {}
        for m in METRICS + ("stage2_s", "final_ar_loss"):
            v = [r[m] for r in rs if r.get(m) is not None]
            out[key][m] = (statistics.fmean(v) if v else None, statistics.stdev(v) if len(v) > 1 else None, len(v))
    return out


def _fmt(mean, std, pct):
    if mean is None:
        return "n/a"
    f = 100.0 if pct else 1.0
    s = f"{f * mean:.1f}" if pct else f"{mean:.3f}"
    if std is not None:
        s += f" ± {f * std:.1f}" if pct else f" ± {std:.3f}"
    return s


def table(args, results: list[dict]) -> str:
    summ = summarize(results)
    head = ("| stage-1 data | arm | n | VQA closed % | open recall % | open F1 % | VQA avg % | forced-choice closed % "
            "| forced-choice open % | answer NLL | grounding (NLL gain from the right image) | final stage-2 AR loss "
            "| stage-2 s |")
    lines = [head, "|" + " --- |" * 13]
    for fraction in args.fractions:
        for arm in args.arms:
            s = summ.get((fraction, arm))
            if s is None:
                continue
            pct = lambda m: _fmt(s[m][0], s[m][1], True)  # noqa: E731
            num = lambda m: _fmt(s[m][0], s[m][1], False)  # noqa: E731
            lines.append(f"| {100 * fraction:g} % | {ARMS[arm]['label']} | {s['closed'][2]} | {pct('closed')} | "
                         f"{pct('open_recall')} | {pct('open_f1')} | {pct('vqa_avg')} | {pct('fc_closed')} | "
                         f"{pct('fc_open')} | {num('nll')} | {num('grounding')} | {num('final_ar_loss')} | "
                         f"{s['stage2_s'][0]:.0f} |")
    return "\n".join(lines)


def plot(args, results: list[dict], path: Path) -> None:
    """Per arm: forced-choice accuracy (closed, open), VQA avg and grounding, mean ± std over seeds, per fraction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    summ = summarize(results)
    panels = [("fc_closed", "forced-choice closed acc."), ("fc_open", "forced-choice open acc."),
              ("vqa_avg", "VQA avg (greedy; closed + open recall)"), ("grounding", "grounding: NLL(wrong img) - NLL")]
    arms = [a for a in args.arms if any((f, a) in summ for f in args.fractions)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    width = 0.8 / max(1, len(args.fractions))
    for ax, (m, title) in zip(axes, panels):
        for j, f in enumerate(args.fractions):
            xs, ys, es = [], [], []
            for i, a in enumerate(arms):
                s = summ.get((f, a))
                if s is None or s[m][0] is None:
                    continue
                xs.append(i + (j - (len(args.fractions) - 1) / 2) * width)
                ys.append(s[m][0])
                es.append(s[m][1] or 0.0)
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=f"stage-1 data {100 * f:g} %")
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(arms, rotation=60, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(args, run: dict | None, command: str) -> str:
    results = load_results(args)
    res_path = Path(args.results)
    png = res_path.with_suffix(".png")
    if results:
        plot(args, results, png)
    missing = [c for c in cells(args) if not _cell_path(args, *c).exists()]
    text = "\n".join([
        "## Results (generated by experiments/data_efficiency.py)", "",
        f"Command: `{command}`", "",
        f"Seeds {args.seeds}; stage-1 fractions {args.fractions} of `{args.stage1}`"
        f" ({'stage 1 only' if args.fraction_applies == 'stage1' else 'stage 1 and stage 2'});"
        f" stage 1 {args.stage1_epochs} epoch(s) at lr {args.stage1_lr}, stage 2 {args.stage2_epochs} epoch(s) at lr"
        f" {args.stage2_lr}, micro-batch {args.micro_batch}, alignment k {args.align_k}, alignment options"
        f" {args.align_options or 'MultiGraphAlignment defaults'}; {args.threads} thread(s).", "",
        (f"Wall time of this invocation: {run['wall_s'] / 60:.1f} min ({run['ran']} cells run)." if run else ""),
        "Mean ± sample standard deviation over seeds (n = seeds present).", "",
        table(args, results), "",
        f"![data efficiency]({png.name})" if results else "",
        "", ("Cells not run (time limit): " + ", ".join(f"seed {s} / {100 * f:g} % / {a}" for s, f, a in missing))
        if missing else "All cells ran.", ""])
    return text


def parse_args(argv=None):
    from exgramed_train.make_demo import ASSETS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--stage1", default=str(ASSETS / "stage1.json"), help="stage-1 data (default: embedded demo)")
    p.add_argument("--stage2", default=str(ASSETS / "stage2.json"), help="stage-2 data with conversations_long")
    p.add_argument("--test", default=str(ASSETS / "test.json"), help="VQA questions (LLaVA-Med test.json format)")
    p.add_argument("--image-folder", default=str(ASSETS / "images"))
    p.add_argument("--llm", help="HF causal LM directory (default: the demo's tiny LLaMA)")
    p.add_argument("--vision", help="vision tower (with --llm)")
    p.add_argument("--tokenizer", help="tokenizer directory (with --llm; default the --llm directory)")
    p.add_argument("--vision-backend", default="hf", choices=["hf", "open_clip"])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--fraction-applies", choices=["stage1", "both"], default="stage1",
                   help="subsample stage 1 only (default) or stage 2 as well (the paper's 'pre-training data')")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--ablation-fractions", type=float, nargs="*",
                   help="fractions at which the ablation arms run (default: the smallest fraction)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--stage1-epochs", type=int, default=2)
    p.add_argument("--stage1-lr", type=float, default=2e-3)
    p.add_argument("--stage2-epochs", type=int, default=2)
    p.add_argument("--stage2-lr", type=float, default=1e-3)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--align-k", type=int, default=5)
    p.add_argument("--align-option", action="append", default=[], metavar="KEY=VALUE",
                   help="MultiGraphAlignment option for every alignment arm (JSON value), repeatable")
    from exgramed_train.demo import DEMO

    p.add_argument("--max-length", type=int, default=DEMO["max_length"], help="tokens per sample (the demo's)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time-limit-min", type=float, default=0.0, help="start no new cell after this (0: no limit)")
    p.add_argument("--out", default="runs/data_efficiency", help="working directory (per-cell results)")
    p.add_argument("--results", default="runs/data_efficiency/report.md",
                   help="markdown table to write (the plot goes next to it as .png)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plot from --out")
    p.add_argument("--grad-norms", action="store_true",
                   help="only print AR vs auxiliary gradient norms at the first seed's smallest-fraction stage-1 model")
    args = p.parse_args(argv)
    if args.llm and not args.vision:
        p.error("--llm needs --vision")
    from exgramed_train.contrastive import parse_aux_options
    try:
        args.align_options = parse_aux_options("alignment", args.align_option)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python experiments/data_efficiency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.grad_norms:
        torch.set_num_threads(args.threads)
        print(grad_norms(args, args.seeds[0], min(args.fractions)))
        return 0
    run = None if args.report_only else run_all(args)
    text = write_report(args, run, command)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
