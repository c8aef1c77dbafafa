"""Medical VQA evaluation (VQA-RAD / SLAKE / PathVQA in LLaVA-Med's format): answering and scoring.

Question (ground-truth) file: a JSON list of ``{"id", "image", "conversations":
[human, gpt], "answer_type": "CLOSED"|"OPEN"}``, read as LLaVA-Med releases it:
integer ids, numeric answers (read with ``str()``), the key spelled
``conversatons``.  Answer file: JSONL ``{"question_id", "text", ...}``, what
:func:`evaluate` writes and what LLaVA-Med's ``model_vqa_med.py`` writes;
answers are matched to questions by id.

:func:`score` computes the metrics of LLaVA-Med's ``llava/eval/run_eval.py``
(v1.0.0), with both strings lower-cased and normalised by
:func:`normalize_answer` (its ``normalize_word``) as the script does:

* open questions: token recall (the number LLaVA-Med reports), precision and
  F1; its "exact match"; BLEU with nltk's ``sentence_bleu`` (BLEU-4 and the
  single-order BLEU-1/2/3); and, given its candidate answers file, its
  "open accuracy";
* closed questions: accuracy over every closed question, by one of
  :data:`RULES` (see :func:`closed_hit`).

All metrics are fractions in [0, 1] (the script prints percentages).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import torch

from .data import _image_problem, _is_id, _is_value, conversations_of, load_image, prompt_ids

#: closed-question rules; ``words`` is the default
RULES = ("words", "official", "exgramed")

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The VQA evaluation's contraction table, as LLaVA-Med's glossary.py has it (key -> replacement).
# Its capitalised keys never match the lower-cased words; they are kept so the table stays the official one.
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
somethingd=something'd somethingd've=something'd've something'dve=something'd've
somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've
therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll
theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've
werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
          "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")
# LLaVA-Med passes re.UNICODE (= 32) where re.sub takes its count: at most 32 periods go per call
_PERIODS_PER_CALL = int(re.UNICODE)
_BLEU_WEIGHTS = {"bleu": (0.25, 0.25, 0.25, 0.25), "bleu_1": (1, 0, 0, 0), "bleu_2": (0, 1, 0, 0),
                 "bleu_3": (0, 0, 1, 0)}


def normalize_answer(text) -> str:
    """LLaVA-Med's answer normalisation (``normalize_word``), lower-cased.

    Each punctuation mark is deleted where the *original* text has it next to a
    space (or anywhere, if the text has a digit-comma-digit), else replaced by a
    space; periods not followed by a digit go; number words become digits;
    articles go; the VQA contraction table applies; commas go.
    """
    original = str(text).lower()
    out = original
    for p in _PUNCT:
        if p + " " in original or " " + p in original or _COMMA_DIGITS.search(original) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, count=_PERIODS_PER_CALL)
    words = [_NUMBERS.get(w, w) for w in out.split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")


def token_prf(pred, gt) -> tuple[float, float, float]:
    """``(f1, precision, recall)`` over normalised word counts (LLaVA-Med's ``calculate_f1score``).

    True positives add the prediction's count of each shared word; all zeros
    when either side is empty or nothing is shared.
    """
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


def exact_match(pred, gt) -> float:
    """LLaVA-Med's "exact match": distinct ground-truth words found in the prediction / prediction words."""
    p, g = Counter(normalize_answer(pred).split()), set(normalize_answer(gt).split())
    total = sum(p.values())
    return sum(1 for w in g if w in p) / total if total else 0.0


def candidate_hit(pred, gt, candidates: list[str]) -> bool:
    """LLaVA-Med's "open accuracy" test: the candidate most like the prediction is the ground truth.

    A candidate's likeness is the share of its distinct words that the
    prediction contains; the first candidate with the highest likeness is chosen.
    ``candidates`` are normalised (:func:`load_candidates`).
    """
    words = set(normalize_answer(pred).split())
    best, best_sim = None, -1.0
    for c in candidates:
        cw = set(c.split())
        sim = len(words & cw) / len(cw) if cw else 0.0
        if sim > best_sim:
            best, best_sim = c, sim
    return best == normalize_answer(gt)


def bleu_scores(pred: str, gt: str) -> dict:
    """nltk ``sentence_bleu`` of the prediction's words against the truth's, as LLaVA-Med calls it.

    No smoothing: an n-gram order without any match contributes the smallest
    float, so such scores are ~0 (nltk's zero-count warnings are silenced).
    """
    from nltk.translate.bleu_score import sentence_bleu
    ref, hyp = [gt.split()], pred.split()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: float(sentence_bleu(ref, hyp, weights=w)) for k, w in _BLEU_WEIGHTS.items()}


def closed_hit(pred, gt, rule: str = "words") -> bool:
    """Closed-question hit, both strings normalised (:func:`normalize_answer`).

    * ``"words"`` (default): a yes/no ground truth must equal the prediction's
      first whole word "yes" or "no"; any other ground truth must appear in the
      prediction as a run of whole words.
    * ``"official"`` (LLaVA-Med v1.0.0 ``llava/eval/run_eval.py``): the
      prediction contains "yes" or "no" anywhere, even inside a word ("nodule"
      holds a "no"), and contains the ground truth as a substring.
    * ``"exgramed"`` (ExGra-Med ``exgra_med/llava/eval/run_eval.py``): the
      prediction contains the ground truth as a substring; no yes/no test.
    """
    pred, gt = normalize_answer(pred), normalize_answer(gt)
    if rule == "official":
        return ("yes" in pred or "no" in pred) and gt in pred
    if rule == "exgramed":
        return gt in pred
    if rule != "words":
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    words = pred.split()
    if gt in ("yes", "no"):
        return next((w for w in words if w in ("yes", "no")), None) == gt
    g = gt.split()
    return any(words[i:i + len(g)] == g for i in range(len(words) - len(g) + 1))


def score(questions: list[dict], answers: list[dict], rule: str = "words",
          candidates: list[str] | None = None) -> dict:
    """Metrics of ``answers`` (``question_id``, ``text``) against ``questions``; ids must match 1:1.

    Every closed question counts in ``closed_accuracy``.  With ``rule="official"``
    the result also has ``closed_accuracy_literal``: the number run_eval.py prints
    as written, where a prediction that mentions yes/no but misses adds no entry
    (its ``else`` belongs to the outer ``if``) and so leaves the denominator.
    ``open_accuracy`` needs ``candidates`` (else ``None``).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    _check_questions(questions)
    by_id = {}
    for a in answers:
        key = str(a["question_id"])
        if key in by_id:
            raise ValueError(f"duplicate answer for question id {a['question_id']!r}")
        by_id[key] = str(a["text"])
    ids = {str(q["id"]) for q in questions}
    missing = [q["id"] for q in questions if str(q["id"]) not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} question(s) have no answer, e.g. {missing[:5]}")
    unknown = [a["question_id"] for a in answers if str(a["question_id"]) not in ids]
    if unknown:
        raise ValueError(f"{len(unknown)} answer(s) for question ids not in the question file, e.g. {unknown[:5]}")
    closed, literal, opened = [], [], []
    for q in questions:
        raw_pred, raw_gt = by_id[str(q["id"])], _gt(q)
        # run_eval.py normalises both strings once; its open metrics normalise them again
        pred, gt = normalize_answer(raw_pred), normalize_answer(raw_gt)
        if _kind(q) == "CLOSED":
            hit = closed_hit(raw_pred, raw_gt, rule)
            closed.append(float(hit))
            if hit or not ("yes" in pred or "no" in pred):
                literal.append(float(hit))
        else:
            f1, precision, recall = token_prf(pred, gt)
            m = {"recall": recall, "precision": precision, "f1": f1, "exact_match": exact_match(pred, gt),
                 **bleu_scores(pred, gt)}
            if candidates is not None:
                m["open_accuracy"] = float(candidate_hit(pred, gt, candidates))
            opened.append(m)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    out = {"closed_accuracy": mean(closed)}
    if rule == "official":
        out["closed_accuracy_literal"] = mean(literal)
    out.update({f"open_{k}": mean([m[k] for m in opened]) for k in ("recall", "precision", "f1")})
    out.update({k: mean([m[k] for m in opened]) for k in ("exact_match", *_BLEU_WEIGHTS)})
    out["open_accuracy"] = mean([m["open_accuracy"] for m in opened]) if candidates is not None else None
    out.update(n_closed=len(closed), n_open=len(opened))
    return out


def _kind(q: dict) -> str:
    kind = str(q.get("answer_type", "")).upper()
    return "CLOSED" if kind.startswith("CLOSE") else kind


def _answer_of(q: dict):
    """The first gpt turn's value, or ``None`` when there is no usable one."""
    turns = conversations_of(q)
    gpt = [t.get("value") for t in (turns if isinstance(turns, list) else []) if isinstance(t, dict)
           and t.get("from") == "gpt"]
    return gpt[0] if gpt and _is_value(gpt[0]) else None


def _gt(q: dict) -> str:
    """The ground-truth answer: the first gpt turn, as text."""
    answer = _answer_of(q)
    if answer is None:
        raise ValueError(f"question {q.get('id', q)!r}: {_NO_ANSWER}")
    return str(answer)


def _first_value(q: dict):
    """The first turn's value (the question), or ``None``."""
    turns = conversations_of(q)
    first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
    return first.get("value") if _is_value(first.get("value")) else None


def _question(q: dict) -> str:
    """The question as a prompt, with ``<image>`` in front unless it has one."""
    text = str(_first_value(q))
    return text if "<image>" in text else "<image>\n" + text


_NO_ANSWER = "needs a gpt turn with the answer (text or number)"


def _check_questions(questions, need_images: bool = False, source="questions") -> None:
    """Raise one error naming every malformed question (id, answer type, answer, question, image)."""
    if not isinstance(questions, list):
        raise ValueError(f"{source}: expected a JSON list of questions, got {type(questions).__name__}")
    errors = []
    for n, q in enumerate(questions):
        qid = q.get("id", f"<question #{n}>") if isinstance(q, dict) else f"<question #{n}>"
        if not isinstance(q, dict):
            problem = "not a JSON object"
        elif not _is_id(q.get("id")):
            problem = "missing or empty field 'id' (a string or an integer)"
        elif _kind(q) not in ("CLOSED", "OPEN"):
            problem = f"answer_type must be CLOSED or OPEN, got {q.get('answer_type')!r}"
        elif _answer_of(q) is None:
            problem = _NO_ANSWER
        elif need_images and (not isinstance(q.get("image"), str) or not q["image"]):
            problem = "missing or empty field 'image'"
        elif need_images and _first_value(q) is None:
            problem = "the first turn must be the question"
        else:
            continue
        errors.append(f"{qid}: {problem}")
    ids = Counter(str(q["id"]) for q in questions if isinstance(q, dict) and _is_id(q.get("id")))
    errors += [f"{i}: duplicate id" for i, c in ids.items() if c > 1]
    if errors:
        raise ValueError(f"{source}: {len(errors)} invalid question(s):\n  " + "\n  ".join(errors))


def load_questions(path, need_images: bool = False) -> list[dict]:
    """Read and validate a question (ground-truth) JSON file."""
    try:
        questions = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read question file {path}: {e}") from e
    _check_questions(questions, need_images, str(path))
    return questions


def load_answers(path) -> list[dict]:
    """Read an answer JSONL file; every line needs ``question_id`` and ``text``."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read answer file {path}: {e}") from e
    answers = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            a = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not JSON ({e})") from e
        if not isinstance(a, dict) or not _is_id(a.get("question_id")) or not _is_value(a.get("text")):
            raise ValueError(f"{path}, line {n}: needs 'question_id' (string or integer) and 'text'")
        answers.append(a)
    return answers


def load_candidates(path) -> list[str]:
    """Normalised candidate answers from LLaVA-Med's candidates file (``{"0": [...]}``) or a JSON list."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read candidate file {path}: {e}") from e
    items = data.get("0") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items or not all(_is_value(c) for c in items):
        raise ValueError(f"{path}: expected {{\"0\": [answers...]}} or a non-empty JSON list of answers")
    return [normalize_answer(c) for c in items]


def rescore(questions_path, answers_path, rule: str = "words", candidates_path=None) -> dict:
    """Metrics of an existing answer file against a question file (no model involved)."""
    candidates = load_candidates(candidates_path) if candidates_path else None
    return score(load_questions(questions_path), load_answers(answers_path), rule, candidates)


def evaluate(model, questions_path, image_folder, answers_path, batch_size: int = 16,
             max_new_tokens: int = 32, device: str = "cpu", rule: str = "words",
             candidates_path=None) -> dict:
    """Answer every question greedily, write the answer JSONL atomically, and return the metrics."""
    questions = load_questions(questions_path, need_images=True)
    candidates = load_candidates(candidates_path) if candidates_path else None
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
    return score(questions, answers, rule, candidates)
