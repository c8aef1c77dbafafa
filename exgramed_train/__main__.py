"""Command line: ``python -m exgramed_train {demo,stage1,stage2,evaluate,generate-extended,make-demo}``."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from exgramed_kernels.config import DEFAULTS


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="LLaVA-Med JSON file")
    p.add_argument("--image-folder", required=True)
    p.add_argument("--out", required=True, help="output directory (logs, checkpoints, model/)")
    p.add_argument("--lr", type=float, help="default: 2e-3 (stage1), 2e-5 (stage2)")
    p.add_argument("--epochs", type=int, help="default: 1 (stage1), 3 (stage2)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--max-response-length", type=int, default=256)
    p.add_argument("--on-overlength", choices=["error", "skip"], default="error")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (always at the end)")
    p.add_argument("--max-steps", type=int, help="stop (with a checkpoint) after N steps")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out (refused if an option differs from the "
                        "checkpoint's in a way that changes the run; the error lists what may change)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a non-empty --out: delete the log, checkpoints and model a run left there")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--grad-stats-every", type=int, default=10, metavar="N",
                   help="stage 2: every N steps log the AR and auxiliary gradient norms (one extra backward "
                        "through the auxiliary loss only); 0: off")


def _config(args, stage):
    from .training import TrainConfig
    return TrainConfig(stage=stage, data=args.data, image_folder=args.image_folder, out=args.out, lr=args.lr,
                       epochs=args.epochs, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
                       warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, max_length=args.max_length,
                       max_response_length=args.max_response_length, on_overlength=args.on_overlength,
                       bf16=args.bf16, grad_checkpointing=args.grad_checkpointing,
                       tune_vision=getattr(args, "tune_vision", False), seed=args.seed,
                       save_every=args.save_every, max_steps=args.max_steps, resume=args.resume,
                       overwrite=args.overwrite, device=args.device, num_workers=args.num_workers,
                       progress=not args.no_progress, grad_stats_every=args.grad_stats_every)


# The training extras (requirements-train.txt, the package's "train" extra): import name -> distribution.
TRAIN_EXTRAS = {"transformers": "transformers", "tokenizers": "tokenizers", "open_clip": "open_clip_torch",
                "torchvision": "torchvision", "skimage": "scikit-image", "pydicom": "pydicom",
                "matplotlib": "matplotlib", "PIL": "pillow", "tqdm": "tqdm", "numpy": "numpy"}


def main(argv=None) -> int:
    try:
        return _main(argv)
    except ModuleNotFoundError as e:
        dist = TRAIN_EXTRAS.get((e.name or "").split(".")[0])
        if dist is None:
            raise
        print(f"python -m exgramed_train needs the training extras, and {dist} is not installed: "
              "pip install 'exgramed[train]' (or, in a clone, pip install -r requirements-train.txt)", file=sys.stderr)
        return 2


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exgramed_train", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="stage 1 + stage 2 + evaluation on the embedded dataset (CPU, minutes)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--stage1-epochs", type=int)
    d.add_argument("--stage2-epochs", type=int)
    d.add_argument("--no-progress", action="store_true")

    s1 = sub.add_parser("stage1", help="projector (+ image-token rows) pre-training")
    s1.add_argument("--llm", required=True, help="local HF causal LM directory")
    s1.add_argument("--vision", required=True, help="HF CLIP directory, or open_clip checkpoint file")
    s1.add_argument("--vision-backend", choices=["hf", "open_clip"], default="hf")
    s1.add_argument("--vision-model-name", help="open_clip model name or model-config JSON")
    s1.add_argument("--tokenizer", help="default: the --llm directory")
    s1.add_argument("--projector", choices=["linear", "mlp2x_gelu"], default="mlp2x_gelu")
    s1.add_argument("--select-layer", type=int, default=-2)
    _train_args(s1)

    s2 = sub.add_parser("stage2", help="full instruction tuning with AR + alpha * alignment")
    s2.add_argument("--init-from", required=True, help="model directory written by stage1 (OUT/model)")
    s2.add_argument("--alpha", type=float, default=1.0)
    s2.add_argument("--align-k", type=int, default=DEFAULTS.k, help="kNN degree of the alignment graphs")
    s2.add_argument("--align-hidden", type=int)
    s2.add_argument("--align-text", choices=["embed", "after_de"], default="embed")
    s2.add_argument("--official-pooling", action="store_true", help="mean-pool over pads too (official code)")
    s2.add_argument("--align-option", action="append", metavar="KEY=VALUE",
                    help="an option of the auxiliary loss, repeatable: for the alignment any AlignConfig field "
                         "(exgramed_kernels/config.py) or official, graph_scope, bias, modalities, message_passing, "
                         "standardize")
    s2.add_argument("--aux-loss", choices=["alignment", "infonce", "siglip", "none"], default="alignment",
                    help="auxiliary loss added with weight --alpha (see exgramed_train/contrastive.py)")
    s2.add_argument("--tune-vision", action="store_true")
    _train_args(s2)

    e = sub.add_parser("evaluate", help="answer VQA questions and score them, or rescore an answers file",
                       description="With --model: answer every question greedily, write --answers, score it. "
                                   "Without: score an existing --answers file (e.g. a published one).")
    e.add_argument("--questions", "--gt", required=True,
                   help="ground-truth question JSON (LLaVA-Med's test.json format; the official script's --gt)")
    e.add_argument("--answers", required=True,
                   help="answer JSONL ({question_id, text} per line): written with --model, else read")
    e.add_argument("--model", help="model directory to answer with; without it, --answers is rescored")
    e.add_argument("--image-folder", help="images of the questions (required with --model)")
    e.add_argument("--rule", choices=["words", "official", "exgramed"], default="words",
                   help="closed-question test: 'words' (default): whole words, a yes/no truth decided by the "
                        "first yes/no word; 'official': LLaVA-Med v1.0.0 llava/eval/run_eval.py (prediction "
                        "contains yes or no and the truth, as substrings); 'exgramed': ExGra-Med "
                        "exgra_med/llava/eval/run_eval.py (the truth as a substring)")
    e.add_argument("--candidates", help="candidate answers JSON ({\"0\": [...]}, LLaVA-Med's "
                                        "train_open_answers.json) for the open accuracy")
    e.add_argument("--metrics", help="metrics JSON to write (also printed)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--device", default="cpu")

    g = sub.add_parser("generate-extended", help="write conversations_long with an LLM")
    from .extended import add_arguments
    add_arguments(g)

    md = sub.add_parser("make-demo", help="regenerate the embedded demo dataset, tokenizer and configs")
    md.add_argument("--out", help="target directory (default: the package's assets/demo)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "demo":
        from .demo import run_demo
        res = run_demo(args.out, seed=args.seed, stage1_epochs=args.stage1_epochs,
                       stage2_epochs=args.stage2_epochs, progress=not args.no_progress)
        print(json.dumps({"metrics": res["metrics"], "timings": res["timings"]}, indent=1))
        print(f"report: {args.out}/report.md, plot: {args.out}/losses.png")
    elif args.cmd in ("stage1", "stage2"):
        from .model import LlavaMed, ModelSpec
        from .training import train
        if args.cmd == "stage1":
            spec = ModelSpec(llm=args.llm, vision=args.vision, tokenizer=args.tokenizer,
                             vision_backend=args.vision_backend, vision_model_name=args.vision_model_name,
                             projector=args.projector, select_layer=args.select_layer)
            factory = lambda: LlavaMed(spec)  # noqa: E731
        else:
            from .contrastive import parse_aux_options
            try:
                align_options = parse_aux_options(args.aux_loss, args.align_option)
            except (TypeError, ValueError) as e:
                parser.error(str(e))
            overrides = dict(alpha=args.alpha, align_k=args.align_k, align_hidden=args.align_hidden,
                             align_text=args.align_text, official_pooling=args.official_pooling,
                             align_options=align_options, aux_loss=args.aux_loss)
            factory = lambda: LlavaMed.load(args.init_from, with_alignment=True, **overrides)  # noqa: E731
        print(json.dumps(train(_config(args, args.cmd), factory), indent=1))
    elif args.cmd == "evaluate":
        if args.model is None:
            from .evaluation import rescore
            metrics = rescore(args.questions, args.answers, args.rule, args.candidates)
        elif args.image_folder is None:
            e.error("--image-folder is required with --model")
        else:
            from .evaluation import evaluate
            from .model import LlavaMed
            metrics = evaluate(LlavaMed.load(args.model), args.questions, args.image_folder, args.answers,
                               args.batch_size, args.max_new_tokens, args.device, args.rule, args.candidates)
        text = json.dumps(metrics, indent=1)
        if args.metrics:
            from .demo import _write_atomic
            from pathlib import Path
            _write_atomic(Path(args.metrics), text)
        print(text)
    elif args.cmd == "generate-extended":
        from .extended import run_from_args
        run_from_args(args)
    elif args.cmd == "make-demo":
        from pathlib import Path
        from .make_demo import ASSETS, generate
        print(generate(Path(args.out) if args.out else ASSETS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
