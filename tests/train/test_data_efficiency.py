"""Smoke run of experiments/data_efficiency.py on a few demo records: every arm reaches the table."""
import importlib.util
import json
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


def test_candidates_for_forced_choice(de):
    from exgramed_train.make_demo import ASSETS
    qs = json.loads((ASSETS / "test.json").read_text())
    c = de._candidates(qs)
    closed = [q for q in qs if q["answer_type"] == "CLOSED"]
    assert all(c[q["id"]][0] == ["yes", "no"] for q in closed)
    side = next(q for q in qs if "Which lung" in q["conversations"][0]["value"])
    cands, ref = c[side["id"]]
    assert cands == ["left", "right"] and cands[ref] == side["conversations"][1]["value"]


def test_smoke_run_has_every_arm(de, tiny, subset, tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    s1 = subset("stage1.json", d / "s1.json", 16)
    s2 = subset("stage2.json", d / "s2.json", 16)
    te = subset("test.json", d / "test.json", 8)
    results = tmp_path / "res" / "table.md"
    argv = ["--stage1", s1, "--stage2", s2, "--test", te, "--seeds", "0", "1", "--stage1-epochs", "1",
            "--stage2-epochs", "1", "--align-k", "3", "--max-new-tokens", "2", "--out", str(tmp_path / "run"),
            "--results", str(results), "--llm", tiny["llm"], "--vision", tiny["vision"],
            "--tokenizer", tiny["tokenizer"]]
    assert de.main(argv) == 0
    text = results.read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| 10 % |", "| 100 % |"))]
    for arm in de.MAIN_ARMS.values():  # main arms at both fractions
        assert sum(arm["label"] in r for r in rows) == 2, arm["label"]
    for arm in de.ABLATION_ARMS.values():  # ablations at the smallest fraction only
        assert sum(arm["label"] in r and r.startswith("| 10 % ") for r in rows) == 1, arm["label"]
    assert len(rows) == 2 * len(de.MAIN_ARMS) + len(de.ABLATION_ARMS)
    assert all("| 2 |" in r and "± " in r for r in rows)  # two seeds: a spread in every row
    assert results.with_suffix(".png").stat().st_size > 0
    assert "All cells ran." in text
    # a rerun finds every cell done and only rebuilds the report
    r = json.loads((tmp_path / "run" / "seed0" / "frac0.1" / "align" / "result.json").read_text())
    assert r["stage2_steps"] == 2 and 0 <= r["fc_closed"] <= 1 and r["nll"] > 0
    assert de.run_all(de.parse_args(argv))["ran"] == 0
    # the gradient-norm diagnostic reuses the stage-1 model and prints one row per auxiliary loss
    capsys.readouterr()
    assert de.main(argv + ["--grad-norms"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| alignment", "| infonce", "| siglip"))]
    assert len(rows) == 3 and all(float(r.split("|")[2]) > 0 for r in rows)
