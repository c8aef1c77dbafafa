"""experiments/data_efficiency.py: its pieces, and a smoke run on a few generated records in which every
arm reaches the table, a rerun skips the finished cells and changed options are refused."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def de():
    spec = importlib.util.spec_from_file_location("data_efficiency", ROOT / "experiments" / "data_efficiency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_subsample_is_seeded_sized_and_ordered(de):
    recs = list(range(100))
    a = de.subsample(recs, 0.1, seed=0, minimum=8)
    assert len(a) == 10 and a == sorted(a) and a == de.subsample(recs, 0.1, seed=0, minimum=8)
    assert a != de.subsample(recs, 0.1, seed=1, minimum=8)
    assert len(de.subsample(recs, 0.05, seed=0, minimum=8)) == 8  # at least one micro-batch
    assert de.subsample(recs, 1.0, seed=3, minimum=8) == recs
    with pytest.raises(ValueError, match="fractions"):
        de.subsample(recs, 0.0, seed=0, minimum=8)


def test_interval_is_the_t_interval(de):
    mean, hw = de.interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and hw == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) = 4.3027
    assert de.interval([5.0]) == (5.0, None)


def test_study_data_is_balanced_and_candidates_are_as_written(de, tmp_path):
    from exgramed_train.make_demo import generate_study
    d = generate_study(tmp_path / "data", n_stage1=24, n_stage2=12, n_test=12, n_text=24, seed=3)
    test = json.loads((d / "test.json").read_text())
    s1 = json.loads((d / "stage1.json").read_text())
    s2 = json.loads((d / "stage2.json").read_text())
    assert (len(s1), len(s2), len(test)) == (24, 72, 72)
    assert not {r["image"] for r in s1} & {r["image"] for r in test}  # disjoint image pools
    assert {r["image"] for r in s2}.isdisjoint({r["image"] for r in s1} | {r["image"] for r in test})
    for question in ("Which lung contains the nodules?", "Are the nodules large?"):  # balanced: no prior answers
        answers = [q["conversations"][1]["value"] for q in test if q["conversations"][0]["value"].endswith(question)]
        assert len(answers) == 12 and answers.count(answers[0]) == 6
    assert all(len(r["conversations"]) == 4 and len(r["conversations"][1]["value"].split()) == 1 for r in s2)
    text = json.loads((d / "text.json").read_text())
    assert all("<image>" not in t["value"] for r in text for t in r["conversations"])
    assert any(r["conversations"][0]["value"].startswith("Report: ") for r in text)
    c = de.candidates(test)
    count = next(q for q in test if q["conversations"][0]["value"].endswith("How many nodules are seen?"))
    assert c[count["id"]][0] == ["one", "three", "two"]  # as written, not normalised to digits
    closed = next(q for q in test if q["answer_type"] == "CLOSED")
    assert c[closed["id"]][0] == ["yes", "no"]
    assert generate_study(tmp_path / "again", n_stage1=24, n_stage2=12, n_test=12, n_text=24, seed=3) and \
        (tmp_path / "again" / "test.json").read_text() == (d / "test.json").read_text()


def test_smoke_run_has_every_arm(de, tiny, tmp_path):
    results = tmp_path / "res" / "table.md"
    argv = ["--n-stage1", "24", "--n-stage2", "3", "--n-test", "2", "--n-text", "16", "--lm-steps", "2",
            "--lm-batch", "8", "--seeds", "0", "1", "--stage1-epochs", "1", "--stage2-epochs", "1",
            "--micro-batch", "9", "--align-k", "3", "--max-new-tokens", "2", "--out", str(tmp_path / "run"),
            "--results", str(results)]
    assert de.main(argv) == 0
    text = results.read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| 10 % |", "| 100 % |"))]
    assert len(rows) == len(de.ARMS) + 1  # every arm at 10 %, AR only at 100 % too
    for arm in de.ARMS.values():
        assert any(arm["label"] in r for r in rows), arm["label"]
    assert all("| 2 |" in r and " ± " in r for r in rows)  # two seeds: an interval in every row
    assert sum("(Δ " in r for r in rows) == len(rows) - 1  # paired differences except the reference row
    assert "Premise check" in text and "All cells ran." in text and "CPU time" in text
    assert results.with_suffix(".png").stat().st_size > 0
    r = json.loads((tmp_path / "run" / "seed0" / "frac0.1" / "align" / "result.json").read_text())
    assert r["stage2_steps"] == 2 and 0 <= r["fc"] <= 1 and 6 <= r["n_fc"] <= 12  # closed + open with >= 2 answers
    assert 0 <= r["zero_grad"] <= 1 and r["grad_ratio"] > 0 and 0 <= r["match_acc"] <= 1
    log = [json.loads(line) for line in
           (tmp_path / "run" / "seed0" / "frac0.1" / "align" / "stage2" / "log.jsonl").read_text().splitlines()]
    assert all(x["grad_ratio"] is not None and x["align_grad_zero"] in (0.0, 1.0) for x in log)
    # a rerun finds every cell done; another stage-2 learning rate in the same --out is refused
    assert de.run_all(de.parse_args(argv))["ran"] == 0
    with pytest.raises(SystemExit, match="stage2_lr"):
        de.run_all(de.parse_args(argv + ["--stage2-lr", "1e-2"]))
