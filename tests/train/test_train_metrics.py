"""Evaluation metrics on hand-made fixtures with scores worked out by hand."""
import json

import pytest

from exgramed_train.evaluation import closed_hit, normalize_answer, score, token_prf


@pytest.mark.parametrize("raw, norm", [
    ("The Left Lung.", "left lung"),
    ("Two nodules, seen!", "2 nodules seen"),
    ("an x-ray (frontal)", "x ray frontal"),
    ("it doesnt show", "it doesn't show"),
    ("1,000 cells", "1000 cells"),
    ("3.5 cm", "3.5 cm"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_token_prf_counts_words():
    # pred words {2, nodules, are, seen}, gt words {2, nodules}: tp=2, fp=2, fn=0
    f1, p, r = token_prf("Two nodules are seen.", "two nodules")
    assert (p, r) == (0.5, 1.0) and f1 == pytest.approx(2 / 3)
    assert token_prf("", "left") == (0.0, 0.0, 0.0)
    assert token_prf("right lung", "left") == (0.0, 0.0, 0.0)
    # as LLaVA-Med's calculate_f1score: tp adds the prediction's count of a shared word
    # pred {left: 2, lung: 1}, gt {left: 1, side: 1}: tp=2, fp=1, fn=1
    f1, p, r = token_prf("left left lung", "left side")
    assert (p, r) == (pytest.approx(2 / 3), pytest.approx(2 / 3))


def test_closed_rules():
    assert closed_hit("Yes, the left lung.", "yes")
    assert not closed_hit("No, the nodules are large.", "yes")
    assert not closed_hit("The nodules are large.", "no")  # words: no yes/no word at all
    assert closed_hit("The nodules are large.", "no", rule="official")  # "no" inside "nodules"
    assert not closed_hit("The nodules are large.", "yes", rule="official")
    assert closed_hit("It is the left lung", "left lung")
    assert not closed_hit("It is the leftmost lung", "left", rule="words")


def test_score_fixture():
    qs = [
        {"id": "c1", "image": "x.png", "answer_type": "CLOSED", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "yes"}]},
        {"id": "c2", "image": "x.png", "answer_type": "CLOSED", "conversatons": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "no"}]},
        {"id": "c3", "image": "x.png", "answer_type": "closed", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "no"}]},
        {"id": "o1", "image": "x.png", "answer_type": "OPEN", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "left lung"}]},
        {"id": "o2", "image": "x.png", "answer_type": "OPEN", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "three"}]},
    ]
    ans = [{"question_id": "c1", "text": "Yes."}, {"question_id": "c2", "text": "Yes, it is."},
           {"question_id": "c3", "text": "No"}, {"question_id": "o1", "text": "The left lung is clear"},
           {"question_id": "o2", "text": "two"}]
    m = score(qs, ans)
    # closed: 2 of 3; open o1: pred {left, lung, is, clear} vs {left, lung}: p=.5 r=1 f1=2/3; o2: all 0
    assert m["closed_accuracy"] == pytest.approx(2 / 3)
    assert m["open_recall"] == pytest.approx(0.5)
    assert m["open_precision"] == pytest.approx(0.25)
    assert m["open_f1"] == pytest.approx(1 / 3)
    assert (m["n_closed"], m["n_open"]) == (3, 2)
    with pytest.raises(ValueError, match="have no answer.*o2"):
        score(qs, ans[:-1])
    with pytest.raises(ValueError, match="duplicate answer.*c1"):
        score(qs, ans + ans[:1])
    bad = json.loads(json.dumps(qs[:1]))
    bad[0]["answer_type"] = "MAYBE"
    with pytest.raises(ValueError, match="c1.*CLOSED or OPEN"):
        score(bad, ans[:1])


def test_evaluate_names_questions_with_unreadable_images(tmp_path, spec):
    from exgramed_train.evaluation import evaluate
    from exgramed_train.model import LlavaMed
    qs = [{"id": "q-ok", "image": "chest_000.png", "answer_type": "OPEN",
           "conversations": [{"from": "human", "value": "<image>\nWhich lung?"}, {"from": "gpt", "value": "left"}]},
          {"id": "q-gone", "image": "missing.png", "answer_type": "OPEN",
           "conversations": [{"from": "human", "value": "Which lung?"}, {"from": "gpt", "value": "left"}]}]
    (tmp_path / "q.json").write_text(json.dumps(qs))
    from exgramed_train.make_demo import ASSETS
    with pytest.raises(ValueError, match=r"1 question\(s\) with unreadable images:\n  q-gone: unreadable image 'missing.png'"):
        evaluate(LlavaMed(spec), tmp_path / "q.json", ASSETS / "images", tmp_path / "a.jsonl")
    assert not (tmp_path / "a.jsonl").exists()
    m = evaluate(LlavaMed(spec), _write(tmp_path / "q1.json", qs[:1]), ASSETS / "images", tmp_path / "a.jsonl",
                 max_new_tokens=4)
    assert m["n_open"] == 1 and len((tmp_path / "a.jsonl").read_text().splitlines()) == 1


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path
