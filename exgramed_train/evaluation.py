"""Medical VQA evaluation (VQA-RAD / SLAKE / PathVQA in LLaVA-Med's format) and its metrics.

Question file: a JSON list of ``{"id", "image", "conversations": [human, gpt],
"answer_type": "CLOSED"|"OPEN"}`` (``conversatons`` accepted).  Answers are
generated greedily and written as JSONL ``{"question_id", "prompt", "text"}``.

Metrics follow LLaVA-Med's ``run_eval``: both strings lower-cased and passed
through the VQA answer normalisation (:func:`normalize_answer`);
*closed*: a hit when the prediction mentions yes/no and contains the ground
truth — by default on whole words (the official substring test counts
"nodules" as a "no"; ``closed_rule="official"`` reproduces it), and
predictions without yes/no count as misses (the official script drops them
from the denominator);
*open*: token recall (the reported number), precision and F1 over word counts.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch

from .data import _image_problem, conversations_of, load_image, prompt_ids

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "wasnt": "wasn't", "werent": "weren't", "didnt": "didn't", "hasnt": "hasn't",
                 "havent": "haven't", "shouldnt": "shouldn't", "wouldnt": "wouldn't", "couldnt": "couldn't"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
          "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")


def normalize_answer(text: str) -> str:
    """VQA answer normalisation: punctuation, periods, number words to digits, articles, contractions."""
    text = str(text).lower()
    for p in _PUNCT:  # drop punctuation glued to words, split on punctuation between words
        if (p + " " in text or " " + p in text) or _COMMA_DIGITS.search(text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBERS.get(w, w) for w in text.split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")


def token_prf(pred: str, gt: str) -> tuple[float, float, float]:
    """``(f1, precision, recall)`` of normalised word counts; zeros when either side is empty."""
    p, g = Counter(normalize_answer(pred).split()), Counter(normalize_answer(gt).split())
    if not p or not g:
        return 0.0, 0.0, 0.0
    tp = sum(n for w, n in p.items() if w in g)
    fp = sum(n for w, n in p.items() if w not in g)
    fn = sum(n for w, n in g.items() if w not in p)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def closed_hit(pred: str, gt: str, rule: str = "words") -> bool:
    """Closed-question hit after normalisation.

    ``rule="official"``: LLaVA-Med's substring test (the prediction contains
    "yes" or "no" anywhere, e.g. inside "nodule", and contains the ground truth).
    ``rule="words"`` (default): the same test on whole words, and for a yes/no
    ground truth the first yes/no word of the prediction decides.
    """
    pred, gt = normalize_answer(pred), normalize_answer(gt)
    if rule == "official":
        return ("yes" in pred or "no" in pred) and gt in pred
    if rule != "words":
        raise ValueError(f"rule must be 'words' or 'official', got {rule!r}")
    words = pred.split()
    if gt in ("yes", "no"):
        first = next((w for w in words if w in ("yes", "no")), None)
        return first == gt
    g = gt.split()
    return any(words[i:i + len(g)] == g for i in range(len(words) - len(g) + 1))


def score(questions: list[dict], answers: list[dict], closed_rule: str = "words") -> dict:
    """Metrics of ``answers`` (``question_id``, ``text``) against ``questions``; ids must match 1:1."""
    by_id = {}
    for a in answers:
        if a["question_id"] in by_id:
            raise ValueError(f"duplicate answer for question id {a['question_id']!r}")
        by_id[a["question_id"]] = a["text"]
    missing = [q["id"] for q in questions if q["id"] not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} question(s) have no answer, e.g. {missing[:5]}")
    closed, opened = [], []
    for q in questions:
        gt = _gt(q)
        kind = str(q.get("answer_type", "")).upper()
        if kind.startswith("CLOSE"):
            closed.append(float(closed_hit(by_id[q["id"]], gt, closed_rule)))
        elif kind == "OPEN":
            opened.append(token_prf(by_id[q["id"]], gt))
        else:
            raise ValueError(f"question {q['id']!r}: answer_type must be CLOSED or OPEN, got {kind!r}")
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"closed_accuracy": mean(closed), "open_recall": mean([r for _, _, r in opened]),
            "open_precision": mean([p for _, p, _ in opened]), "open_f1": mean([f for f, _, _ in opened]),
            "n_closed": len(closed), "n_open": len(opened)}


def _gt(q: dict) -> str:
    turns = conversations_of(q)
    gpt = [t["value"] for t in (turns or []) if t.get("from") == "gpt"]
    if not gpt or not isinstance(q.get("id"), str) or not q.get("image"):
        raise ValueError(f"question {q.get('id', q)!r}: needs 'id', 'image' and a gpt turn with the answer")
    return gpt[0]


def _question(q: dict) -> str:
    text = conversations_of(q)[0]["value"]
    return text if "<image>" in text else "<image>\n" + text


def evaluate(model, questions_path, image_folder, answers_path, batch_size: int = 16,
             max_new_tokens: int = 32, device: str = "cpu", closed_rule: str = "words") -> dict:
    """Answer every question greedily, write the answer JSONL atomically, and return the metrics."""
    questions = json.loads(Path(questions_path).read_text())
    for q in questions:
        _gt(q)  # validate everything before generating
    bad = [f"{q['id']}: {p}" for q in questions if (p := _image_problem(Path(image_folder), q["image"]))]
    if bad:
        raise ValueError(f"{questions_path}: {len(bad)} question(s) with unreadable images:\n  " + "\n  ".join(bad))
    model.to(device).eval()
    answers = []
    for i in range(0, len(questions), batch_size):
        chunk = questions[i:i + batch_size]
        pixels = torch.stack([model.vision.preprocess(load_image(Path(image_folder) / q["image"])) for q in chunk])
        prompts = [prompt_ids(_question(q), model.tokenizer, model.num_patches) for q in chunk]
        texts = model.generate(pixels.to(device), prompts, max_new_tokens)
        answers += [{"question_id": q["id"], "prompt": _question(q).replace("<image>\n", ""), "text": t}
                    for q, t in zip(chunk, texts)]
    answers_path = Path(answers_path)
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = answers_path.with_name(answers_path.name + ".tmp")
    tmp.write_text("".join(json.dumps(a) + "\n" for a in answers))
    os.replace(tmp, answers_path)
    return score(questions, answers, closed_rule)
