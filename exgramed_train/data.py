"""LLaVA-Med JSON data: validation, the v0 ``###`` template, tokenisation, batching.

A record is ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}...]}``;
stage-2 records add ``conversations_long`` with the extended responses.  The
released LLaVA-Med and ExGra-Med files are read as they are: integer ids,
numeric values (read with ``str()``, as the official code does) and the
misspelled keys ``conversatons`` / ``conversatons_long``.  The whole file is
validated up front (:func:`load_records`): problems are reported by record id,
either as one :class:`DataError` listing them all, or — for over-length samples
with ``on_overlength="skip"`` — as a counted warning naming the ids.  Nothing is
silently replaced, truncated or masked.
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


# each field under its own name first, then under the released files' misspelling
_SPELLINGS = {"conversations": ("conversations", "conversatons"),
              "conversations_long": ("conversations_long", "conversatons_long")}


def _field(rec: dict, name: str) -> tuple[str, object]:
    """``(key as spelled in rec, value)`` of ``name``; ``(name, None)`` when absent."""
    for key in _SPELLINGS[name]:
        if key in rec:
            return key, rec[key]
    return name, None


def conversations_of(rec: dict) -> list | None:
    """The record's turns (``conversations``, or the released misspelling ``conversatons``)."""
    return _field(rec, "conversations")[1]


def long_conversations_of(rec: dict) -> list | None:
    """The extended turns (``conversations_long``, or ExGra-Med's ``conversatons_long``)."""
    return _field(rec, "conversations_long")[1]


def _text_turns(turns: list) -> list[dict]:
    """Validated turns with every value as text (numbers read with ``str()``)."""
    return [{"from": t["from"], "value": str(t["value"])} for t in turns]


def responses_text(turns: list, official: bool = False) -> str:
    """The assistant (``gpt``) turns as one text, the response node of the alignment.

    Default: each stripped, joined with a space.  ``official``: as ExGra-Med's
    code builds it: newlines removed, joined with ``". "``.
    """
    answers = [str(t["value"]) for t in turns if t["from"] == "gpt"]
    if official:
        return ". ".join(a.replace("\n", "") for a in answers)
    return " ".join(a.strip() for a in answers)


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
    """Token ids and labels of a conversation in the v0 template.

    ``<s>``, the header, then each turn as ``### Human: ...\n`` or
    ``### Assistant: ...\n``, each piece tokenised on its own so that the mask
    boundaries are exact; then ``</s>``.  ``<s>``, the header and the human turns
    are masked (``-100``); every assistant turn, ``###`` included, and the final
    ``</s>`` (the learned stop) are trained.
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
                 on_overlength: str = "error", check_images: bool = True,
                 official_text: bool = False) -> list[Sample]:
    """Read and validate a LLaVA-Med JSON file; return tokenised samples in file order.

    Errors (all collected, then raised together as :class:`DataError`): records
    that are not objects, a missing ``id`` (string or integer) or ``image``,
    missing, empty or malformed turns, empty or whitespace-only answers,
    ``<image>`` anywhere but once in the first turn, the literal text of an image
    token (``<im_start>``, ``<im_patch>``, ``<im_end>``), missing
    ``conversations_long`` when ``need_long`` (and ``<image>`` in its answers),
    duplicate ids, unreadable images.  Over-length samples (more than
    ``max_length`` tokens, or responses over ``max_response_length``) are errors
    unless ``on_overlength="skip"``, which drops them with one counted warning
    naming them.  ``official_text`` builds the alignment texts as ExGra-Med's
    code does (:func:`responses_text`).
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
        if problem is None and str(rid) in seen:  # 7 and "7" would be one id in the outputs
            problem = "duplicate id"
        if problem is not None:
            errors.append(f"{rid}: {problem}")
            continue
        seen.add(str(rid))
        turns = _text_turns(conversations_of(rec))
        ids, labels = tokenize_conversation(turns, tokenizer, num_patches)
        raw_ids = ext_ids = None
        if need_long:
            raw_ids = tokenizer(responses_text(turns, official_text), add_special_tokens=False)["input_ids"]
            ext_ids = tokenizer(responses_text(long_conversations_of(rec), official_text),
                                add_special_tokens=False)["input_ids"]
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


def _is_id(value) -> bool:
    """A record id: a non-empty string or an integer (the released VQA files use integers)."""
    return (isinstance(value, str) and value != "") or (isinstance(value, int) and not isinstance(value, bool))


def _is_value(value) -> bool:
    """A turn value: text, or a number (the released files hold answers such as 12)."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _check_record(rec, need_long: bool) -> str | None:
    if not isinstance(rec, dict):
        return "record is not a JSON object"
    if not _is_id(rec.get("id")):
        return "missing or empty field 'id' (a string or an integer)"
    if not isinstance(rec.get("image"), str) or not rec["image"]:
        return "missing or empty field 'image'"
    for name in ("conversations", "conversations_long") if need_long else ("conversations",):
        key, turns = _field(rec, name)
        if not isinstance(turns, list) or not turns:
            return f"missing or empty field {name!r}"
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or t.get("from") not in ROLES or not _is_value(t.get("value")):
                return f"{key}[{i}] must be {{'from': 'human'|'gpt', 'value': str or number}}"
            problem = _turn_problem(str(t["value"]), t["from"], i, main=name == "conversations")
            if problem is not None:
                return f"{key}[{i}] {problem}"
        if not any(t["from"] == "gpt" for t in turns):
            return f"{key} has no 'gpt' turn"
    return None


def _turn_problem(text: str, speaker: str, i: int, main: bool) -> str | None:
    """What is wrong with turn ``i`` of the main (``main``) or the extended conversation.

    The training sequence must hold exactly ``num_patches`` ``<im_patch>``
    tokens: one ``<image>``, in the first turn; no image token typed as text.
    """
    for token in (IM_START, IM_PATCH, IM_END):
        if token in text:
            return f"contains the literal text {token!r} (reserved for the image tokens)"
    if speaker == "gpt" and not text.strip():
        return "is an empty answer"
    n = text.count(IMAGE_PLACEHOLDER)
    if speaker == "gpt" and n:
        return f"is a gpt turn with {IMAGE_PLACEHOLDER}"
    if main and i == 0 and n == 0:
        return f"lacks the {IMAGE_PLACEHOLDER} placeholder (the first turn needs it)"
    if main and i == 0 and n > 1:
        return f"has {n} {IMAGE_PLACEHOLDER} placeholders (one image per record)"
    if main and i > 0 and n:
        return f"has an {IMAGE_PLACEHOLDER} placeholder outside the first turn"
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
