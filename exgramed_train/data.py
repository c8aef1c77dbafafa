"""LLaVA-Med JSON data: validation, the v0 ``###`` template, tokenisation, batching.

A record is ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}...]}``
(the released LLaVA-Med files also spell the key ``conversatons``); stage-2
records add ``conversations_long`` with the extended responses.  The whole file
is validated up front (:func:`load_records`): problems are reported by record
id, either as one :class:`DataError` listing them all, or — for over-length
samples with ``on_overlength="skip"`` — as a counted warning naming the ids.
Nothing is silently replaced, truncated or masked.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
IM_START, IM_PATCH, IM_END = "<im_start>", "<im_patch>", "<im_end>"
V0_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the human's questions.")
ROLES = {"human": "Human", "gpt": "Assistant"}


class DataError(ValueError):
    """A data file failed validation; the message names every offending record id."""


def conversations_of(rec: dict) -> list | None:
    """The record's turns, accepting LLaVA-Med's released misspelling ``conversatons``."""
    return rec.get("conversations", rec.get("conversatons"))


def responses_text(turns: list) -> str:
    """All assistant (``gpt``) turns joined with a space: the response used for alignment."""
    return " ".join(t["value"].strip() for t in turns if t["from"] == "gpt")


def load_image(path: str | os.PathLike):
    """Open an image as RGB PIL image; DICOM files (``.dcm``) are min-max windowed."""
    from PIL import Image
    path = str(path)
    if path.lower().endswith(".dcm"):
        import numpy as np
        import pydicom
        a = pydicom.dcmread(path).pixel_array.astype(np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-9) * 255.0
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    with Image.open(path) as im:
        return im.convert("RGB")


def image_token_string(num_patches: int) -> str:
    """What ``<image>`` expands to: ``<im_start>`` + N x ``<im_patch>`` + ``<im_end>``."""
    return IM_START + IM_PATCH * num_patches + IM_END


def render_v0(turns: list, num_patches: int) -> list[tuple[str, str]]:
    """Render turns with the v0 template as ``(speaker, text)`` pieces; the first piece is the header."""
    pieces = [("header", V0_SYSTEM + "\n\n")]
    for t in turns:
        value = t["value"].replace(IMAGE_PLACEHOLDER, image_token_string(num_patches))
        pieces.append((t["from"], f"### {ROLES[t['from']]}: {value}\n"))
    return pieces


def tokenize_conversation(turns: list, tokenizer, num_patches: int):
    """Token ids and labels of a conversation; header and human turns are masked (``-100``).

    The tokens after the last assistant turn end with ``### `` (the generation
    prompt of the v0 template) followed by ``</s>`` as the learned stop.
    """
    ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    for speaker, text in render_v0(turns, num_patches):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += [IGNORE_INDEX] * len(piece) if speaker in ("header", "human") else piece
    ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id)
    return ids, labels


def prompt_ids(question: str, tokenizer, num_patches: int) -> list[int]:
    """Ids of a single-question prompt ending with ``### Assistant:`` for generation."""
    ids = [tokenizer.bos_token_id]
    pieces = [p for _, p in render_v0([{"from": "human", "value": question}], num_patches)]
    for text in pieces + ["### Assistant:"]:  # piecewise, exactly as in training
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


@dataclass
class Sample:
    """A validated, tokenised record."""
    id: str
    image: str
    input_ids: list
    labels: list
    raw_ids: list | None = None
    ext_ids: list | None = None


def load_records(path, image_folder, tokenizer, num_patches: int, max_length: int,
                 need_long: bool = False, max_response_length: int = 256,
                 on_overlength: str = "error", check_images: bool = True) -> list[Sample]:
    """Read and validate a LLaVA-Med JSON file; return tokenised samples in file order.

    Errors (all collected, then raised together as :class:`DataError`): records
    that are not objects, missing ``id``/``image``/conversations, empty or
    malformed turns, missing ``conversations_long`` when ``need_long``, duplicate
    ids, unreadable images.  Over-length samples (more than ``max_length``
    tokens, or responses over ``max_response_length``) are errors unless
    ``on_overlength="skip"``, which drops them with one counted warning naming
    them.
    """
    if on_overlength not in ("error", "skip"):
        raise ValueError(f"on_overlength must be 'error' or 'skip', got {on_overlength!r}")
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read data file {path}: {e}") from e
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    errors, over, samples, seen = [], [], [], set()
    problems = [_check_record(rec, need_long) for rec in records]
    if check_images:  # decode every image once, in threads (decoders release the GIL)
        names = sorted({rec["image"] for rec, p in zip(records, problems) if p is None})
        with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
            unreadable = dict(zip(names, pool.map(lambda name: _image_problem(Path(image_folder), name), names)))
        problems = [p if p is not None else unreadable[rec["image"]] for rec, p in zip(records, problems)]
    for n, (rec, problem) in enumerate(zip(records, problems)):
        rid = rec.get("id", f"<record #{n}>") if isinstance(rec, dict) else f"<record #{n}>"
        if problem is None and rid in seen:
            problem = "duplicate id"
        if problem is not None:
            errors.append(f"{rid}: {problem}")
            continue
        seen.add(rid)
        turns = conversations_of(rec)
        ids, labels = tokenize_conversation(turns, tokenizer, num_patches)
        raw_ids = ext_ids = None
        if need_long:
            raw_ids = tokenizer(responses_text(turns), add_special_tokens=False)["input_ids"]
            ext_ids = tokenizer(responses_text(rec["conversations_long"]), add_special_tokens=False)["input_ids"]
        lengths = [len(ids)] + ([len(raw_ids), len(ext_ids)] if need_long else [])
        limits = [max_length] + ([max_response_length] * 2 if need_long else [])
        if any(a > b for a, b in zip(lengths, limits)):
            over.append(f"{rid} ({'/'.join(map(str, lengths))} tokens > {'/'.join(map(str, limits))})")
            continue
        samples.append(Sample(str(rid), rec["image"], ids, labels, raw_ids, ext_ids))
    if errors:
        raise DataError(f"{path}: {len(errors)} invalid record(s):\n  " + "\n  ".join(errors))
    if over:
        shown = ", ".join(over[:20]) + (f", ... and {len(over) - 20} more" if len(over) > 20 else "")
        msg = f"{path}: {len(over)} over-length sample(s): {shown}"
        if on_overlength == "error":
            raise DataError(msg + " (raise --max-length or pass --on-overlength skip)")
        log.warning("skipping %s", msg)
    if not samples:
        raise DataError(f"{path}: no usable records")
    return samples


def _image_problem(folder: Path, name: str) -> str | None:
    try:
        load_image(folder / name)
    except Exception as e:  # noqa: BLE001 - any decoder failure means unreadable
        return f"unreadable image {name!r}: {type(e).__name__}: {e}"
    return None


def _check_record(rec, need_long: bool) -> str | None:
    if not isinstance(rec, dict):
        return "record is not a JSON object"
    for key in ("id", "image"):
        if not isinstance(rec.get(key), str) or not rec[key]:
            return f"missing or empty field {key!r}"
    keys = [("conversations", conversations_of(rec))]
    if need_long:
        keys.append(("conversations_long", rec.get("conversations_long")))
    for name, turns in keys:
        if not isinstance(turns, list) or not turns:
            return f"missing or empty field {name!r}"
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or t.get("from") not in ROLES or not isinstance(t.get("value"), str):
                return f"{name}[{i}] must be {{'from': 'human'|'gpt', 'value': str}}"
        if not any(t["from"] == "gpt" for t in turns):
            return f"{name} has no 'gpt' turn"
    if IMAGE_PLACEHOLDER not in conversations_of(rec)[0]["value"]:
        return f"first turn lacks the {IMAGE_PLACEHOLDER} placeholder"
    return None


class ImageTextDataset(torch.utils.data.Dataset):
    """Samples plus their pixel values, produced by the vision tower's preprocessing."""

    def __init__(self, samples: list[Sample], image_folder, preprocess):
        self.samples, self.image_folder, self.preprocess = samples, Path(image_folder), preprocess

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        return s, self.preprocess(load_image(self.image_folder / s.image))


def _pad(seqs, value):
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)
    mask = torch.zeros_like(out)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return out, mask


def collate(items, pad_id: int) -> dict:
    """Right-pad a list of ``(Sample, pixels)`` into a batch dict."""
    samples = [s for s, _ in items]
    ids, mask = _pad([s.input_ids for s in samples], pad_id)
    labels, _ = _pad([s.labels for s in samples], IGNORE_INDEX)
    batch = {"ids": [s.id for s in samples], "input_ids": ids, "attention_mask": mask,
             "labels": labels, "pixel_values": torch.stack([p for _, p in items])}
    if samples[0].raw_ids is not None:
        batch["raw_ids"], batch["raw_mask"] = _pad([s.raw_ids for s in samples], pad_id)
        batch["ext_ids"], batch["ext_mask"] = _pad([s.ext_ids for s in samples], pad_id)
    return batch
