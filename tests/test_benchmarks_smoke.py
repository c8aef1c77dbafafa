"""The benchmark harness end to end at tiny sizes (``python -m benchmarks.report --tiny``): every provider of
every op produced a number in every mode, every solver row has a quality figure, RESULTS.md and its plots
are rendered from the saved JSON alone. No timing is asserted."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

pytest.importorskip("matplotlib")

from benchmarks import report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The peers the tables must show wherever their package is installed (requirements-test.txt installs them).
PEERS = {"knn_graph": {"addmm+topk", "FAISS flat"}, "graph_conv": {"PyG GraphConv"},
         "linear_assignment": {"scipy linear_sum_assignment", "lap.lapjv", "torch-linear-assignment"},
         "qap_solve": {"pygmtools RRWM", "scipy FAQ, KB instances"}, "align": {"official-equivalent"}}
SOLVERS = ("linear_assignment", "qap_solve", "align")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        res = report.main(["--tiny", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out, res


def test_every_provider_produced_a_number(tiny):
    _, res = tiny
    assert not [r for r in res["records"] if "error" in r]
    assert set(res["benches"]) == set(report.OPS)
    for op, meta in res["benches"].items():
        names = {p["name"] for p in meta["providers"]}
        assert PEERS.get(op, set()) <= names, op
        assert op == "overhead" or any(p["kind"] == "floor" for p in meta["providers"]), op
        for p in meta["providers"]:
            if p["device"] is None:  # a GPU-only peer, or Triton without TRITON_INTERPRET: it says why
                assert p["unavailable"] and (p["name"] == "torch-linear-assignment" or "Triton" in p["unavailable"])
                continue
            for mode in meta["modes"]:
                rs = [r for r in res["records"] if (r["op"], r["provider"], r["mode"]) == (op, p["name"], mode)
                      and "median" in r]
                assert rs, (op, p["name"], mode)
                assert all(0 < r["q20"] <= r["median"] <= r["q80"] and r["n"] >= 1 for r in rs)


def test_every_solver_row_has_a_quality_figure(tiny):
    _, res = tiny
    for op in SOLVERS:
        meta = res["benches"][op]
        kind = {p["name"]: p for p in meta["providers"]}
        rows = [r for r in res["records"] if r["op"] == op and r["mode"] == meta["modes"][0] and "median" in r
                and kind[r["provider"]]["kind"] != "floor" and kind[r["provider"]]["vs"] != r["provider"]]
        assert rows, op
        for r in rows:
            q = r["quality"]
            assert q["n"] >= 1 and 0 <= q["vs_ge"] <= q["n"] and q["min"] <= q["mean"] <= q["max"], (op, r)
    # exact linear assignments reach the same objective
    assert all(abs(r["quality"]["mean"]) < 1e-9 for r in res["records"] if "quality" in r and r["op"] == SOLVERS[0])


def test_results_file(tiny):
    out, res = tiny
    text = (out / "RESULTS.md").read_text()
    assert "`python -m benchmarks.report --tiny`" in text and f"torch {torch.__version__}" in text
    for op in report.OPS[1:]:
        assert f"### {op} (CPU)" in text
        assert (out / "results" / f"{op}_cpu.png").read_bytes()[:8] == PNG_MAGIC
    assert re.search(r"\| 8 \| 1\.2 s \| [0-9.]+ (us|ms|s) \| [0-9.]+ % \|", text)  # the overhead table at B = 8
    assert "## Peak memory of align (CPU)" in text and "obj " in text
    assert not re.search(r"(/work|/tmp|/home)/", text) and str(out) not in text


def test_render_from_json_alone(tiny, tmp_path):
    out, _ = tiny
    first = (out / "RESULTS.md").read_text()
    report.main(["--render", "--out", str(out)])
    assert (out / "RESULTS.md").read_text() == first
    # A GPU run writes the same format (results/cuda.json); the report shows it beside the CPU run. Here the
    # CPU run's records stand in for one, relabelled, to exercise that rendering.
    shutil.copytree(out / "results", tmp_path / "results")
    run = json.loads((out / "results" / "cpu.json").read_text())
    run["device"], run["machine"]["gpu"] = "cuda", "GPU stand-in"
    for r in run["records"]:
        r["device"] = "cuda"
    (tmp_path / "results" / "cuda.json").write_text(json.dumps(run))
    report.main(["--render", "--out", str(tmp_path)])
    text = (tmp_path / "RESULTS.md").read_text()
    assert "### align (GPU stand-in)" in text and "align fwd + bwd, GPU stand-in float32" in text
    assert (tmp_path / "results" / "align_cuda.png").exists()
    # The GPU targets' file (benchmarks.gpu_targets), here from its CPU-capable part at tiny sizes.
    from benchmarks import gpu_targets
    from benchmarks.harness import machine

    targets = dict(machine=machine("cpu"), targets=gpu_targets.floor_targets("cpu", "tiny"), errors={"lap": "X: y"},
                   cuda_graph=dict(B=8, d=16, captured=False, replay_matches=None, error="RuntimeError: no"))
    (tmp_path / "results" / "cuda_targets.json").write_text(json.dumps(targets))
    report.main(["--render", "--out", str(tmp_path)])
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## GPU targets" in text and "| knn_graph forward / floor: Gram GEMM, N = 16 | <= 2x |" in text
    assert "Part `lap` failed: `X: y`" in text and "not capturable: `RuntimeError: no`" in text


def test_solver_budget_experiment(tmp_path, monkeypatch):
    import experiments
    from experiments import solver_budget

    rows = solver_budget.run([(16, 1)], scale="tiny", log=lambda *_: None)
    assert [r["budget"] for r in rows] == solver_budget.BUDGETS
    assert (rows[0]["vs_default"], rows[0]["speedup"]) == (0.0, 1.0)
    assert all(r["n"] == 6 and 0 <= r["at_least_peer"] <= 6 and r["worst_vs_peer"] <= r["vs_peer"] for r in rows)
    monkeypatch.setattr(experiments, "RESULTS", str(tmp_path))
    threads = torch.get_num_threads()
    try:
        path = solver_budget.main(["--sizes", "16:1"])
    finally:
        torch.set_num_threads(threads)
    text = open(path).read()
    assert text.count("\n| 16 | ") == len(solver_budget.BUDGETS) and "python -m experiments.solver_budget" in text


def test_solver_scaling_experiment(tmp_path):
    from experiments import solver_scaling

    threads = torch.get_num_threads()
    try:
        md = solver_scaling.main(["--threads", "1", "--sizes", "16,24", "--lap-sizes", "16", "--batches", "16:1",
                                  "--memory-b", "24", "--json-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    text = open(md).read()
    for heading in ("## linear_assignment against lap.lapjv", "## align: stages against B", "## Quality contract",
                    "## Peak memory"):
        assert heading in text
    stages = json.loads((tmp_path / "solver_scaling_stages.json").read_text())["stages"]
    assert {(r["setting"], r["B"]) for r in stages} == {(s, b) for s in ("default", "official") for b in (16, 24)}
    assert all(r["floor"] > 0 and r["total"] > 0 for r in stages)
    lap = json.loads((tmp_path / "solver_scaling_lap.json").read_text())["lap"]
    assert lap[0]["max_objective_gap"] < 1e-9 and lap[0]["lapjv"] > 0
    quality = json.loads((tmp_path / "solver_scaling_quality.json").read_text())["quality"]
    assert [r["problems"] for r in quality] == [6, 6]
