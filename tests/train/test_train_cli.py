"""The command line end to end: stage1 -> stage2 -> evaluate, the demo, and the demo data generator."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exgramed_train.__main__ import main
from exgramed_train.data import DataError
from exgramed_train.make_demo import ASSETS


ROOT = Path(__file__).resolve().parents[2]


def test_cli_stage1_stage2_evaluate(tmp_path, tiny, capsys, subset):
    images = str(ASSETS / "images")
    s1 = subset("stage1.json", tmp_path / "s1.json", 8)
    s2 = subset("stage2.json", tmp_path / "s2.json", 8)
    q = tmp_path / "q.json"
    q.write_text(json.dumps(json.loads((ASSETS / "test.json").read_text())[:7]))
    assert main(["stage1", "--llm", tiny["llm"], "--vision", tiny["vision"], "--tokenizer", tiny["tokenizer"],
                 "--projector", "linear", "--data", s1, "--image-folder", images, "--out", str(tmp_path / "a"),
                 "--micro-batch", "4", "--max-length", "192", "--no-progress"]) == 0
    assert main(["stage2", "--init-from", str(tmp_path / "a" / "model"), "--data", s2, "--image-folder", images,
                 "--out", str(tmp_path / "b"), "--micro-batch", "4", "--align-k", "3", "--epochs", "1",
                 "--align-text", "after_de", "--max-length", "192", "--no-progress"]) == 0
    spec = json.loads((tmp_path / "b" / "model" / "exgramed_model.json").read_text())
    assert (spec["projector"], spec["align_text"], spec["align_k"]) == ("linear", "after_de", 3)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path / "b" / "model"), "--questions", str(q), "--image-folder",
                 images, "--answers", str(tmp_path / "ans.jsonl"), "--metrics", str(tmp_path / "m.json"),
                 "--max-new-tokens", "6"]) == 0
    answers = [json.loads(l) for l in (tmp_path / "ans.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [r["id"] for r in json.loads(q.read_text())]
    m = json.loads((tmp_path / "m.json").read_text())
    assert (m["n_closed"], m["n_open"]) == (3, 4) and 0 <= m["closed_accuracy"] <= 1
    assert json.loads(capsys.readouterr().out) == m


def test_cli_reports_bad_data_by_id(tmp_path, tiny):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "sample-7", "image": "chest_000.png", "conversations": []}]))
    with pytest.raises(DataError, match="sample-7: missing or empty field 'conversations'"):
        main(["stage1", "--llm", tiny["llm"], "--vision", tiny["vision"], "--tokenizer", tiny["tokenizer"],
              "--data", str(bad), "--image-folder", str(ASSETS / "images"), "--out", str(tmp_path / "o"),
              "--no-progress"])


def test_demo_end_to_end(tmp_path, tiny):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "exgramed_train", "demo", "--out", str(tmp_path / "demo"),
                           "--stage2-epochs", "1", "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "demo"
    from PIL import Image
    with Image.open(out / "losses.png") as im:
        assert im.format == "PNG" and im.size[0] > 500
    res = json.loads((out / "metrics.json").read_text())
    m = res["metrics"]
    assert (m["n_closed"], m["n_open"]) == (72, 77)
    assert all(0 <= m[k] <= 1 for k in ("closed_accuracy", "open_recall", "open_f1"))
    s2 = [json.loads(l) for l in (out / "stage2" / "log.jsonl").read_text().splitlines()]
    assert s2[-1]["ar_loss"] < s2[0]["ar_loss"] - 1.0  # the LM learns the answers' format
    report = (out / "report.md").read_text()
    assert "closed accuracy" in report and "losses.png" in report
    assert "exactly zero in" in report and "norm over the AR gradient's: median" in report
    assert s2[0]["grad_ratio"] > 0 and 0 <= s2[0]["align_grad_zero"] <= 1  # step 1 is measured
    assert len((out / "answers.jsonl").read_text().splitlines()) == 149


def test_demo_assets_are_reproducible(tmp_path, capsys):
    assert main(["make-demo", "--out", str(tmp_path / "demo")]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out == tmp_path / "demo"
    for name in ("stage1.json", "stage2.json", "test.json", "llm_config.json", "vision_config.json",
                 "tokenizer/tokenizer.json"):
        assert (out / name).read_text() == (ASSETS / name).read_text(), name
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(p.name for p in (ASSETS / "images").iterdir())
