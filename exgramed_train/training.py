"""Stage-1 / stage-2 training loop: AdamW, cosine schedule with warmup, accumulation, DDP, exact resume.

* ``stage1``: only the projector and the new image-token embedding rows train
  (the other rows are restored after every step, as LLaVA does); defaults lr
  2e-3, 1 epoch.
* ``stage2``: the LM, the projector and the alignment module train (the vision
  tower stays frozen unless ``tune_vision``); loss AR + alpha * align; defaults
  lr 2e-5, 3 epochs.

Runs single-process or under ``torchrun`` (``gloo`` on CPU, ``nccl`` on GPU).
Every optimiser step is one line of ``log.jsonl``: losses, timings, the total
gradient norm and, in stage 2, the auxiliary loss's gradient (whether it was
exactly zero at the pooled embeddings, every step; its norm against the AR
loss's, every ``grad_stats_every`` steps, from one extra backward through the
auxiliary loss alone).  Checkpoints
(``checkpoint-<step>/``) are written to a temporary directory and renamed, so a
crash never leaves a half-written one: ``run.json`` (step, world size, the
run's options, the data file's SHA-256 and the model spec), ``state.pt``
(trainable weights, optimiser, scheduler) and ``rng-rank<r>.pt`` (every rank's
RNG states).  The ``.pt`` files hold only tensors and plain containers and are
read with ``torch.load(weights_only=True)``, so a crafted checkpoint cannot run
code.  ``resume=True`` continues from the latest checkpoint and reproduces the
uninterrupted run's losses; it refuses options that differ from the
checkpoint's except those in :data:`RESUME_MAY_CHANGE`.

A fresh run refuses an ``out`` directory that is not empty unless
``overwrite=True`` (which deletes the log, checkpoints and model a previous run
left there) or ``resume=True``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import pickle
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import jsonl
from .data import ImageTextDataset, collate, load_records
from .model import align_seconds

log = logging.getLogger(__name__)

STAGE_DEFAULTS = {"stage1": {"lr": 2e-3, "epochs": 1}, "stage2": {"lr": 2e-5, "epochs": 3}}

# Options a resumed run may change; every other option must equal the checkpoint's.  lr, epochs and
# warmup_ratio take effect from the checkpoint's step on (the cosine schedule is recomputed with the new
# peak lr and total); the others change where and how often work happens, not what is computed.
RESUME_MAY_CHANGE = ("lr", "epochs", "warmup_ratio", "max_steps", "save_every", "device", "num_workers",
                     "grad_checkpointing", "progress", "grad_stats_every")
_NOT_RECORDED = ("out", "resume", "overwrite")
_NO_FLAG = ("stage", "max_grad_norm")  # TrainConfig fields the command line does not set
_RUN_FILES = ("log.jsonl", "log.tmp", "model", "model.tmp", "model.old")  # and checkpoint-*


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or holds more than tensors and plain containers."""


@dataclass
class TrainConfig:
    """Options of one training stage (``lr``/``epochs`` default to the stage's paper values)."""
    stage: str
    data: str
    image_folder: str
    out: str
    lr: float | None = None
    epochs: int | None = None
    micro_batch: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 2048
    max_response_length: int = 256
    on_overlength: str = "error"
    bf16: bool = False
    grad_checkpointing: bool = False
    tune_vision: bool = False
    seed: int = 0
    save_every: int = 0
    max_steps: int | None = None
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    num_workers: int = 0
    progress: bool = True
    grad_stats_every: int = 10

    def __post_init__(self):
        if self.stage not in STAGE_DEFAULTS:
            raise ValueError(f"stage must be one of {sorted(STAGE_DEFAULTS)}, got {self.stage!r}")
        for k, v in STAGE_DEFAULTS[self.stage].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        for k in ("micro_batch", "grad_accum", "epochs"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.grad_stats_every < 0:
            raise ValueError(f"grad_stats_every must be >= 0 (0: off), got {self.grad_stats_every}")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite deletes it: pass one of them")


def _dist_info():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _device(cfg, local_rank):
    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as tensors, ints, floats and tuples only."""
    np_state = np.random.get_state(legacy=False)
    s = {"python": random.getstate(),
         "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                   "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                   "gauss": float(np_state["gauss"])},
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    n = s["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32),
                                                               "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_rng_state(path) -> None:
    """Write this process's RNG states to ``path``."""
    torch.save(_rng_state(), path)


def load_rng_state(path) -> None:
    """Restore the RNG states :func:`save_rng_state` wrote (read with ``weights_only=True``)."""
    _set_rng_state(_load_tensors(path))


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_trainable(model, stage: str, tune_vision: bool = False) -> list:
    """Set ``requires_grad`` for the stage and return the trainable parameters."""
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    if stage == "stage1":
        model.lm.get_input_embeddings().requires_grad_(True)
    else:
        model.lm.requires_grad_(True)
        if model.align is not None:
            model.align.requires_grad_(True)
        if tune_vision:
            model.vision.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def epoch_batches(n: int, epoch: int, cfg: TrainConfig, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches of an epoch: a seeded permutation, sharded, cut to whole steps."""
    g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    per_rank = n // world
    mine = order[rank * per_rank:(rank + 1) * per_rank]
    n_micro = (len(mine) // cfg.micro_batch) // cfg.grad_accum * cfg.grad_accum
    return [mine[i * cfg.micro_batch:(i + 1) * cfg.micro_batch] for i in range(n_micro)]


def train(cfg: TrainConfig, model_factory) -> dict:
    """Run one stage; ``model_factory()`` builds the :class:`~exgramed_train.model.LlavaMed` model."""
    world, rank, local_rank = _dist_info()
    distributed = world > 1
    device = _device(cfg, local_rank)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(cfg.out)
    _check_out(out, cfg)
    if distributed:  # every rank has looked at --out before rank 0 changes it
        dist.barrier()
    if cfg.overwrite and rank == 0:
        _delete_run(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_all(cfg.seed)  # identical initialisation on every rank
    model = model_factory()
    run = _run_record(cfg, model)
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        meta = _check_resume(ckpt, run, world)
    elif cfg.resume:
        log.info("--resume: no checkpoint in %s yet; starting at step 0", out)
    align = cfg.stage == "stage2"
    if align and cfg.micro_batch <= model.spec.align_k:
        raise ValueError(f"micro_batch ({cfg.micro_batch}) must exceed the alignment's k "
                         f"({model.spec.align_k}): k nearest neighbours among micro_batch nodes")
    params = configure_trainable(model, cfg.stage, cfg.tune_vision)
    own = {id(p) for p in model.align.parameters()} if model.align is not None else set()  # the aux loss's own
    if cfg.grad_checkpointing:
        if hasattr(model.lm, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.lm.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.tune_vision:
            model.vision.gradient_checkpointing_enable()
    model.to(device)
    emb = model.lm.get_input_embeddings().weight
    n_base = getattr(model, "n_base_tokens", None)
    frozen_rows = emb[:n_base].detach().clone() if cfg.stage == "stage1" and n_base else None
    samples = load_records(cfg.data, cfg.image_folder, model.tokenizer, model.num_patches, cfg.max_length,
                           need_long=align, max_response_length=cfg.max_response_length,
                           on_overlength=cfg.on_overlength,
                           official_text=bool(model.spec.align_options.get("official", False)))
    dataset = ImageTextDataset(samples, cfg.image_folder, model.vision.preprocess)
    steps_per_epoch = len(epoch_batches(len(dataset), 0, cfg, rank, world)) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.data}: {len(dataset)} samples make no full step of "
                         f"micro_batch={cfg.micro_batch} x grad_accum={cfg.grad_accum} x world={world}")
    total = steps_per_epoch * cfg.epochs
    from transformers import get_cosine_schedule_with_warmup
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, int(round(cfg.warmup_ratio * total)), total)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if distributed else model
    step = 0
    seed_all(cfg.seed + 1 + rank)
    if ckpt is not None:
        step = meta["step"]
        if step > total:
            raise ValueError(f"--epochs {cfg.epochs}: {total} steps in all, but the checkpoint {ckpt} is at "
                             f"step {step}")
        _load_checkpoint(ckpt, meta, model, opt, sched, rank)
        _continue_schedule(opt, sched, cfg.lr)
    log_path = out / "log.jsonl"
    if rank == 0:
        _truncate_log(log_path, step)
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=step, desc=cfg.stage, disable=not cfg.progress or rank != 0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    pad = model.tokenizer.pad_token_id
    interrupted = False
    ddp.train()
    while step < total and not interrupted:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        batches = epoch_batches(len(dataset), epoch, cfg, rank, world)[in_epoch * cfg.grad_accum:]
        # an own generator: a DataLoader iterator otherwise draws its base seed from the global RNG,
        # and a resumed run (one extra iterator) would then see different dropout/alignment noise
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                                             collate_fn=functools.partial(collate, pad_id=pad),
                                             generator=torch.Generator().manual_seed(cfg.seed + epoch))
        it = iter(loader)
        for _ in range(len(batches) // cfg.grad_accum):
            t0 = time.perf_counter()
            acc = {"loss": 0.0, "ar_loss": 0.0, "align_loss": 0.0, "align_timing": [], "align_grad": [],
                   "accuracy": None, "split": None, "stats_time": 0.0}
            measure = align and cfg.grad_stats_every > 0 and step % cfg.grad_stats_every == 0
            for j in range(cfg.grad_accum):
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(it).items()}
                synced = distributed and j == cfg.grad_accum - 1
                sync = contextlib.nullcontext() if synced or not distributed else ddp.no_sync()
                with sync:
                    with autocast:
                        r = ddp(batch, align=align)
                    aux_grads = None
                    if measure and j == 0 and r["align_loss"].requires_grad:
                        ts = _clock(device)
                        aux_grads = torch.autograd.grad(r["align_loss"] * (model.spec.alpha / cfg.grad_accum),
                                                        params, retain_graph=True, allow_unused=True)
                        acc["stats_time"] += _clock(device) - ts
                    (r["loss"] / cfg.grad_accum).backward()
                if aux_grads is not None:
                    ts = _clock(device)
                    acc["split"] = _split_grad_norms(params, aux_grads, cfg.grad_accum, synced, own)
                    acc["stats_time"] += _clock(device) - ts
                acc["loss"] += r["loss"].item() / cfg.grad_accum
                acc["ar_loss"] += r["ar_loss"].item() / cfg.grad_accum
                if align:
                    acc["align_loss"] += r["align_loss"].item() / cfg.grad_accum
                    acc["align_timing"].append(r["align_timing"])
                    acc["align_grad"].append(r["align_grad"])
                    a = r["accuracy"].float().cpu() / cfg.grad_accum
                    acc["accuracy"] = a if acc["accuracy"] is None else acc["accuracy"] + a
            acc["align_time"] = sum(align_seconds(t) for t in acc.pop("align_timing"))  # backward hooks done
            acc["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if frozen_rows is not None:
                with torch.no_grad():
                    emb[:n_base] = frozen_rows
            step += 1
            # the step's own time: the gradient statistics' extra backward is logged apart (grad_stats_time)
            rec = _step_record(cfg, step, epoch, sched, acc, time.perf_counter() - t0 - acc["stats_time"],
                               distributed, device)
            if rank == 0:
                _append_jsonl(log_path, rec)
                bar.update(1)
                bar.set_postfix(ar=f"{rec['ar_loss']:.3f}", align=f"{rec['align_loss']:.3f}",
                                acc=f"{np.mean(rec['accuracy'] or [0]):.2f}", step_s=f"{rec['step_time']:.2f}",
                                align_share=f"{rec['align_share']:.0%}")
            interrupted = cfg.max_steps is not None and cfg.max_steps <= step < total
            if interrupted or step == total or (cfg.save_every and step % cfg.save_every == 0):
                save_checkpoint(out, step, model, opt, sched, rank, world, run)
            if interrupted:
                break
    bar.close()
    if not interrupted and rank == 0:
        _atomic_dir(out / "model", model.save)
    if distributed:
        dist.barrier()
    return {"steps": step, "total_steps": total, "interrupted": interrupted, "log": str(log_path),
            "model": None if interrupted else str(out / "model")}


def _clock(device) -> float:
    """``time.perf_counter()`` after the device finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _split_grad_norms(params, aux_grads, grad_accum: int, synced: bool, own: set) -> tuple[float, float, float]:
    """Norms of the AR loss's and the auxiliary loss's (alpha-weighted) gradients over ``params``, and of
    the auxiliary gradient over the parameters the AR loss trains too (all but the ids in ``own``, the
    auxiliary module's).

    Called after the backward of a step's first micro-batch, whose gradients are then in ``p.grad``
    (the step starts from zero); ``aux_grads`` are the auxiliary term's alone (``autograd.grad`` on the
    same graph), so the AR term's are ``p.grad - aux_grads``.  When that backward synchronised the
    data-parallel ranks, ``p.grad`` is their mean and ``aux_grads`` is averaged likewise first.
    Returned per micro-batch (the trainer's ``1 / grad_accum`` scale undone)."""
    ar_sq, aux_sq, shared_sq = (torch.zeros((), dtype=torch.float64) for _ in range(3))
    for p, g_aux in zip(params, aux_grads):
        g = p.grad
        if g_aux is not None and synced:
            dist.all_reduce(g_aux)
            g_aux = g_aux / dist.get_world_size()
        if g_aux is not None:
            sq = g_aux.double().pow(2).sum().cpu()
            aux_sq += sq
            if id(p) not in own:
                shared_sq += sq
            g = None if g is None else g - g_aux
        if g is not None:
            ar_sq += g.double().pow(2).sum().cpu()
    return tuple(grad_accum * float(v.sqrt()) for v in (ar_sq, aux_sq, shared_sq))


def _step_record(cfg, step, epoch, sched, acc, step_time, distributed, device) -> dict:
    probes = [g for g in acc["align_grad"] if g]  # filled by the x hook when the backward reached x
    zero = sum(float(g["zero"]) for g in probes) / len(probes) if probes else math.nan
    x_norm = cfg.grad_accum * sum(float(g["sq_norm"].sqrt()) for g in probes) / len(probes) if probes else math.nan
    split = acc["split"] or (math.nan, math.nan, math.nan)
    vals = torch.tensor([acc["loss"], acc["ar_loss"], acc["align_loss"], step_time, acc["align_time"], zero, x_norm,
                         *split], dtype=torch.float64)
    accuracy = acc["accuracy"]
    if distributed:  # report the mean over ranks
        vals = vals.to(device)
        dist.all_reduce(vals)
        vals = (vals / dist.get_world_size()).cpu()
        if accuracy is not None:
            a = accuracy.to(device, torch.float64)
            dist.all_reduce(a)
            accuracy = (a / dist.get_world_size()).cpu()
    loss, ar, al, st, at, zero, x_norm, ar_norm, aux_norm, shared_norm = vals.tolist()
    opt = lambda v: None if math.isnan(v) else v  # noqa: E731
    return {"stage": cfg.stage, "step": step, "epoch": epoch, "lr": sched.get_last_lr()[0],
            "loss": loss, "ar_loss": ar, "align_loss": al,
            "accuracy": None if accuracy is None else [round(x, 6) for x in accuracy.tolist()],
            "step_time": st, "align_time": at, "align_share": at / st if st > 0 else 0.0,
            "grad_stats_time": acc["stats_time"], "grad_norm": acc["grad_norm"], "align_grad_zero": opt(zero), "align_grad_x": opt(x_norm),
            "ar_grad_norm": opt(ar_norm), "aux_grad_norm": opt(aux_norm), "aux_grad_norm_shared": opt(shared_norm),
            "grad_ratio": opt(aux_norm / ar_norm) if ar_norm > 0 else None}


def _append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        jsonl.append(f, rec)


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps ``<= step`` (all of them dropped for a fresh run)."""
    if not path.exists():
        return
    jsonl.repair_tail(path)  # a kill while a line was written leaves it torn
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def _atomic_dir(final: Path, write) -> None:
    """Call ``write(tmp_dir)`` then swap the directory into place."""
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if final.exists():
        final.replace(old)
    tmp.replace(final)
    shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    ptr = Path(out) / "checkpoint-latest"
    return Path(out) / ptr.read_text().strip() if ptr.exists() else None


def _check_out(out: Path, cfg: TrainConfig) -> None:
    """A fresh run needs an empty (or new) ``--out``; see the module docstring."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not (cfg.resume or cfg.overwrite):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(f"--out {out} is not empty ({shown}): pass --resume to continue the run in it, or "
                         f"--overwrite to delete its log, checkpoints and model and start over")


def _delete_run(out: Path) -> None:
    """Remove what a previous run wrote to ``out`` (other files stay)."""
    for p in [out / name for name in _RUN_FILES] + sorted(out.glob("checkpoint-*")):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run_record(cfg: TrainConfig, model) -> dict:
    """What a resume must agree with: the options, the data file's content and the model spec (JSON values)."""
    config = {k: v for k, v in asdict(cfg).items() if k not in _NOT_RECORDED}
    config["data"] = str(Path(cfg.data).resolve())
    config["image_folder"] = str(Path(cfg.image_folder).resolve())
    spec = asdict(model.spec)
    for k in ("llm", "vision", "tokenizer"):
        if spec.get(k):
            spec[k] = str(Path(spec[k]).resolve())
    return json.loads(json.dumps({"config": config, "data_sha256": _sha256(cfg.data), "model": spec}))


def _flag(key: str, stage: str) -> str:
    if key in _NO_FLAG:
        return key
    if key == "align_options":
        return "--align-option"
    if stage == "stage2" and key in ("llm", "vision", "tokenizer", "vision_backend", "vision_model_name",
                                     "projector", "select_layer"):
        return f"--init-from ({key})"  # stage 2 takes these from the stage-1 model directory
    return "--" + key.replace("_", "-")


def _check_resume(ckpt: Path, run: dict, world: int) -> dict:
    """Read ``ckpt/run.json`` and refuse a resume whose options would change the run; returns the record."""
    path = ckpt / "run.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"--resume: {ckpt} has no run.json (an incomplete checkpoint, or one written by "
                              f"an older version of this driver); it cannot be resumed") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--resume: {path} is unreadable ({e})") from None
    if meta["world"] != world:
        raise ValueError(f"--resume: checkpoint {ckpt} was written by {meta['world']} process(es); resuming it "
                         f"with {world} would change the data order (run with the same number of processes)")
    stage, old, new = run["config"]["stage"], meta["config"], run["config"]
    changes = [f"{_flag(k, stage)}: {old[k]!r} in the checkpoint, {new.get(k)!r} now"
               for k in old if k not in RESUME_MAY_CHANGE and k != "data" and new.get(k) != old[k]]
    if meta["data_sha256"] != run["data_sha256"]:
        changes.append(f"--data: the content of {new['data']} differs from the data the checkpoint trained on "
                       f"({old['data']}, SHA-256 {meta['data_sha256'][:12]}...)")
    changes += [f"{_flag(k, stage)}: {v!r} in the checkpoint, {run['model'].get(k)!r} now"
                for k, v in meta["model"].items() if run["model"].get(k) != v]
    if changes:
        may = ", ".join("--no-progress" if k == "progress" else "--" + k.replace("_", "-")
                        for k in RESUME_MAY_CHANGE)
        raise ValueError(f"--resume: these options differ from those checkpoint {ckpt} was trained with:\n  "
                         + "\n  ".join(changes)
                         + f"\nA resume may change only {may} (a new --lr, --epochs or --warmup-ratio "
                           f"applies from the checkpoint's step on). To change the others, start a new run "
                           f"(another --out, or --overwrite).")
    return meta


def save_checkpoint(out: Path, step, model, opt, sched, rank, world, run: dict) -> None:
    """Write ``checkpoint-<step>/`` atomically and point ``checkpoint-latest`` at it."""
    final = out / f"checkpoint-{step}"
    tmp = out / f"checkpoint-{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if world > 1:
        dist.barrier()
    save_rng_state(tmp / f"rng-rank{rank}.pt")
    if world > 1:
        dist.barrier()
    if rank == 0:
        trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        torch.save({"model": trainable, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                   tmp / "state.pt")
        # the alignment module's call counter drives its noise schedule (a plain int attribute)
        meta = {"step": step, "world": world, "align_calls": getattr(model.align, "step", None), **run}
        (tmp / "run.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        ptr = out / "checkpoint-latest.tmp"
        ptr.write_text(final.name + "\n")
        ptr.replace(out / "checkpoint-latest")
        for old in out.glob("checkpoint-*"):
            if old.is_dir() and old.name != final.name and not old.name.endswith(".tmp"):
                shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()


def _load_tensors(path: Path):
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message names the offending global, then explains how to allow it: keep the first part
        why = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line), "")
        why = why.split(" Please use")[0]
        raise CheckpointError(f"--resume: refusing to load {path}: it holds Python objects, not just tensors "
                              f"and plain containers, so this driver did not write it (unpickling it could run "
                              f"code). {why}") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"--resume: {path} is missing or unreadable ({e})") from None


def _load_checkpoint(ckpt: Path, meta: dict, model, opt, sched, rank) -> None:
    state = _load_tensors(ckpt / "state.pt")
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state["model"]]
    if missing:
        raise ValueError(f"checkpoint {ckpt} lacks trainable parameters {missing[:5]} (different stage/options?)")
    model.load_state_dict(state["model"], strict=False)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if meta.get("align_calls") is not None and model.align is not None:
        model.align.step = meta["align_calls"]
    load_rng_state(ckpt / f"rng-rank{rank}.pt")


def _continue_schedule(opt, sched, lr: float) -> None:
    """Set the lr of the loaded step from this run's peak ``lr`` and schedule.

    The loaded scheduler state holds the step and the checkpoint's peak lr; the lr function was built
    for this run's total and warmup.  With unchanged options this reproduces the saved lr exactly.
    """
    sched.base_lrs = [lr] * len(opt.param_groups)
    for g, fn in zip(opt.param_groups, sched.lr_lambdas):
        g["initial_lr"] = lr
        g["lr"] = lr * fn(sched.last_epoch)
