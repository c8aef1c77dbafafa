"""Training stages: what trains, the loss and its logs, bf16 + checkpointing, exact resume."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from exgramed_train.make_demo import ASSETS
from exgramed_train.model import LlavaMed
from exgramed_train.training import TrainConfig, latest_checkpoint, train


IMAGES = str(ASSETS / "images")


def _log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _s1(tmp_path, subset, n=16, **kw):
    base = dict(stage="stage1", data=subset("stage1.json", tmp_path / "s1.json", n), image_folder=IMAGES,
                out=str(tmp_path / "run"), micro_batch=4, max_length=192, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _s2(tmp_path, subset, n=24, **kw):
    base = dict(stage="stage2", data=subset("stage2.json", tmp_path / "s2.json", n), image_folder=IMAGES,
                out=str(tmp_path / "run2"), micro_batch=6, max_length=192, progress=False, lr=1e-3, epochs=2)
    base.update(kw)
    return TrainConfig(**base)


def test_stage_defaults_follow_the_paper():
    c1 = TrainConfig(stage="stage1", data="x", image_folder="y", out="z")
    c2 = TrainConfig(stage="stage2", data="x", image_folder="y", out="z")
    assert (c1.lr, c1.epochs, c2.lr, c2.epochs) == (2e-3, 1, 2e-5, 3)
    with pytest.raises(ValueError, match="stage must be"):
        TrainConfig(stage="stage3", data="x", image_folder="y", out="z")


def test_stage1_trains_projector_and_new_rows_only(tmp_path, spec, tiny, subset):
    built = {}

    def factory():
        built["m"] = LlavaMed(spec)
        built["init"] = {k: v.clone() for k, v in built["m"].state_dict().items()}
        return built["m"]

    res = train(_s1(tmp_path, subset, grad_accum=2), factory)
    m, init = built["m"], built["init"]
    assert res["steps"] == res["total_steps"] == 2  # 16 samples / (4 x 2)
    n = m.n_base_tokens
    emb = "lm.model.embed_tokens.weight"
    after = m.state_dict()
    assert torch.equal(after[emb][:n], init[emb][:n])
    assert not torch.equal(after[emb][n:], init[emb][n:])
    changed = {k for k in init if not torch.equal(after[k], init[k])}
    assert changed == {emb} | {k for k in init if k.startswith("projector.")}
    log = _log(res["log"])
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["align_loss"] == 0 and r["accuracy"] is None and r["align_grad_zero"] is None
               and r["grad_ratio"] is None and r["grad_norm"] > 0 for r in log)
    assert (Path(res["model"]) / "exgramed_model.json").exists()


def test_stage2_adds_alignment_loss_and_trains_lm(tmp_path, stage1_model, subset):
    res = train(_s2(tmp_path, subset, epochs=1), lambda: LlavaMed.load(stage1_model, with_alignment=True, align_k=3))
    log = _log(res["log"])
    assert len(log) == 4
    for r in log:
        assert r["align_loss"] > 0 and len(r["accuracy"]) == 3
        assert all(0 <= a <= 1 for a in r["accuracy"])
        assert r["loss"] == pytest.approx(r["ar_loss"] + r["align_loss"], rel=1e-5)
        assert 0 < r["align_share"] < 1
    out = LlavaMed.load(res["model"], with_alignment=True)
    ref = LlavaMed.load(stage1_model)
    assert not torch.equal(out.lm.model.layers[0].mlp.up_proj.weight, ref.lm.model.layers[0].mlp.up_proj.weight)
    assert (Path(res["model"]) / "alignment.pt").exists()


def test_stage2_logs_the_auxiliary_gradient_without_changing_training(tmp_path, stage1_model, subset):
    """Every stage-2 step logs whether the alignment's gradient (w.r.t. its input) was exactly zero and its
    norm; every grad_stats_every steps the AR and auxiliary gradient norms; none of it changes the run."""
    def run(every, kind, out):
        res = train(_s2(tmp_path, subset, epochs=1, n=18, grad_stats_every=every, out=str(tmp_path / out)),
                    lambda: LlavaMed.load(stage1_model, with_alignment=True, align_k=3, aux_loss=kind))
        return _log(res["log"])

    measured, plain = run(1, "alignment", "a"), run(2, "alignment", "b")
    assert len(measured) == len(plain) == 3
    for x, y in zip(measured, plain):
        assert (x["loss"], x["grad_norm"], x["accuracy"]) == (y["loss"], y["grad_norm"], y["accuracy"])
    for r in measured:
        assert r["align_grad_zero"] in (0.0, 1.0) and r["align_grad_x"] >= 0 and r["grad_norm"] > 0
        assert r["ar_grad_norm"] > 0 and r["grad_ratio"] == pytest.approx(r["aux_grad_norm"] / r["ar_grad_norm"])
        assert 0 <= r["aux_grad_norm_shared"] <= r["aux_grad_norm"]
        # the two parts add up to the total (the clip at 1.0 acts after the norm is taken)
        assert r["grad_norm"] <= r["ar_grad_norm"] + r["aux_grad_norm"] + 1e-6
    assert [r["grad_ratio"] is None for r in plain] == [False, True, False]  # steps 1 and 3
    assert [r["grad_stats_time"] > 0 for r in plain] == [True, False, True]  # logged apart from step_time
    for r in run(1, "none", "c"):  # AR only: the auxiliary gradient is exactly zero, AR's is the total
        assert r["align_grad_zero"] == 1.0 and r["aux_grad_norm"] == 0.0 and r["grad_ratio"] == 0.0
        assert r["ar_grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-6)


@pytest.mark.parametrize("official", [False, True])
def test_stage2_builds_the_official_alignment_text_in_official_mode(tmp_path, stage1_model, subset, monkeypatch,
                                                                    official):
    """--align-option official=true also joins the alignment texts as ExGra-Med's code does."""
    import exgramed_train.training as training

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop after loading")

    monkeypatch.setattr(training, "load_records", spy)
    with pytest.raises(RuntimeError, match="stop after loading"):
        train(_s2(tmp_path, subset), lambda: LlavaMed.load(stage1_model, with_alignment=True, align_k=3,
                                                           align_options={"official": True} if official else {}))
    assert seen["official_text"] is official


def test_stage2_rejects_batch_not_larger_than_k(tmp_path, stage1_model, subset):
    with pytest.raises(ValueError, match=r"micro_batch \(3\) must exceed the alignment's k \(3\)"):
        train(_s2(tmp_path, subset, micro_batch=3), lambda: LlavaMed.load(stage1_model, with_alignment=True, align_k=3))


def test_bf16_autocast_and_gradient_checkpointing(tmp_path, stage1_model, subset):
    res = train(_s2(tmp_path, subset, epochs=1, n=12, bf16=True, grad_checkpointing=True),
                lambda: LlavaMed.load(stage1_model, with_alignment=True, align_k=3))
    log = _log(res["log"])
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)


def _resume_matches(tmp_path, cfg, factory, stop):
    full = train(replace(cfg, out=str(tmp_path / "full")), factory)
    part = train(replace(cfg, out=str(tmp_path / "part"), max_steps=stop), factory)
    assert part["interrupted"] and part["steps"] == stop and part["model"] is None
    assert latest_checkpoint(tmp_path / "part").name == f"checkpoint-{stop}"
    resumed = train(replace(cfg, out=str(tmp_path / "part"), resume=True), factory)
    a, b = _log(full["log"]), _log(resumed["log"])
    assert [r["step"] for r in b] == list(range(1, full["steps"] + 1))
    for x, y in zip(a, b):
        for key in ("loss", "ar_loss", "align_loss", "accuracy", "lr", "epoch"):
            assert x[key] == y[key], (x["step"], key)
    return a


def test_stage1_resume_reproduces_uninterrupted_losses(tmp_path, spec, subset):
    # 3 steps per epoch, 2 epochs; interrupt in the middle of the first epoch
    log = _resume_matches(tmp_path, _s1(tmp_path, subset, n=12, epochs=2), lambda: LlavaMed(spec), stop=2)
    assert len(log) == 6


def test_stage2_resume_reproduces_uninterrupted_losses(tmp_path, stage1_model, subset):
    log = _resume_matches(tmp_path, _s2(tmp_path, subset, n=12, epochs=2, grad_accum=1),
                          lambda: LlavaMed.load(stage1_model, with_alignment=True, align_k=3), stop=3)
    assert len(log) == 4


# ------------------------------------------------------------------ checkpoint files, --out, resume options

def test_rng_states_round_trip_through_weights_only_files(tmp_path):
    import random

    import numpy as np
    from exgramed_train.training import load_rng_state, save_rng_state

    def draws():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(3).tolist(),
                torch.rand(3).tolist())

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn(1)  # leave a cached second Gaussian in both generators
    save_rng_state(tmp_path / "rng.pt")
    first = draws()
    load_rng_state(tmp_path / "rng.pt")
    assert draws() == first
    state = torch.load(tmp_path / "rng.pt", weights_only=True)  # plain data only
    assert set(state) >= {"python", "numpy", "torch"}


class _RunsCode:
    """Unpickling this object runs ``exec(code)`` (what a crafted checkpoint does)."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def test_resume_refuses_a_malicious_pickle(tmp_path, spec, subset):
    from exgramed_train.training import CheckpointError
    cfg = _s1(tmp_path, subset, n=8, max_steps=1)  # 2 steps; stops with a checkpoint after 1
    factory = lambda: LlavaMed(spec)  # noqa: E731
    train(cfg, factory)
    ckpt = latest_checkpoint(cfg.out)
    marker = tmp_path / "pwned"
    for name in ("state.pt", "rng-rank0.pt"):
        good = (ckpt / name).read_bytes()
        torch.save({"model": _RunsCode(f"open({str(marker)!r}, 'w').close()")}, ckpt / name)
        with pytest.raises(CheckpointError, match=rf"refusing to load .*{name}: it holds Python objects.*"
                                                  r"Unsupported global: GLOBAL exec was not an allowed global") as e:
            train(replace(cfg, resume=True, max_steps=None), factory)
        assert "add_safe_globals" not in str(e.value)  # no advice on how to load it anyway
        assert not marker.exists(), f"loading {name} ran the attacker's code"
        (ckpt / name).write_bytes(good)
    assert train(replace(cfg, resume=True, max_steps=None), factory)["steps"] == 2


def test_fresh_run_refuses_a_non_empty_out_unless_overwrite(tmp_path, spec, subset):
    factory = lambda: LlavaMed(spec)  # noqa: E731
    cfg = _s1(tmp_path, subset, n=8)
    first = train(cfg, factory)
    out = Path(cfg.out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"--out .*run is not empty \(checkpoint-2, checkpoint-latest, log.jsonl, "
                                         r"model\): pass --resume to continue the run in it, or --overwrite"):
        train(cfg, factory)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    with pytest.raises(ValueError, match="--resume continues the run in --out and --overwrite deletes it"):
        replace(cfg, resume=True, overwrite=True)
    # --overwrite deletes the previous run's log, checkpoints and model before it starts; other files stay
    (out / "notes.txt").write_text("mine")
    again = train(replace(cfg, overwrite=True, max_steps=1), factory)
    assert again["interrupted"] and [r["step"] for r in _log(again["log"])] == [1]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-latest", "log.jsonl", "notes.txt"]
    assert not Path(first["model"]).exists()
    # an existing empty directory is fine
    (tmp_path / "empty").mkdir()
    assert train(replace(cfg, out=str(tmp_path / "empty"), max_steps=1), factory)["steps"] == 1


def test_resume_refuses_changed_options_and_lists_them(tmp_path, stage1_model, subset):
    cfg = _s2(tmp_path, subset, n=12, epochs=1, max_steps=1)
    train(cfg, lambda: LlavaMed.load(stage1_model, with_alignment=True, align_k=3))
    log_before = Path(cfg.out, "log.jsonl").read_bytes()
    other = subset("stage2.json", tmp_path / "other.json", 13)
    with pytest.raises(ValueError) as e:
        train(replace(cfg, resume=True, micro_batch=4, data=other, lr=5e-4, max_steps=None),
              lambda: LlavaMed.load(stage1_model, with_alignment=True, align_k=2))
    msg = str(e.value)
    assert msg.startswith("--resume: these options differ from those checkpoint ")
    changed = [line.strip() for line in msg.splitlines() if line.startswith("  ")]
    assert changed == ["--micro-batch: 6 in the checkpoint, 4 now",
                       f"--data: the content of {Path(other).resolve()} differs from the data the checkpoint "
                       f"trained on ({Path(cfg.data).resolve()}, SHA-256 " + changed[1].rsplit("SHA-256 ", 1)[1],
                       "--align-k: 3 in the checkpoint, 2 now"]
    assert "A resume may change only --lr, --epochs, --warmup-ratio, --max-steps, --save-every" in msg
    assert Path(cfg.out, "log.jsonl").read_bytes() == log_before
    # the same data under another path is the same data
    moved = tmp_path / "moved.json"
    moved.write_bytes(Path(cfg.data).read_bytes())
    res = train(replace(cfg, resume=True, data=str(moved), max_steps=None),
                lambda: LlavaMed.load(stage1_model, with_alignment=True, align_k=3))
    assert res["steps"] == 2 and not res["interrupted"]


def test_resume_applies_a_new_lr_and_more_epochs(tmp_path, spec, subset):
    import math
    factory = lambda: LlavaMed(spec)  # noqa: E731
    cfg = _s1(tmp_path, subset, n=12, epochs=1, lr=1e-3, warmup_ratio=0.0, max_steps=2)  # 3 steps per epoch
    train(cfg, factory)
    res = train(replace(cfg, resume=True, max_steps=None, lr=4e-4, epochs=2), factory)
    log = _log(res["log"])
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and res["total_steps"] == 6

    def cosine(step, total):  # transformers' cosine schedule without warmup, as logged after `step` steps
        return 0.5 * (1 + math.cos(math.pi * step / total))

    assert [r["lr"] for r in log[:2]] == pytest.approx([1e-3 * cosine(s, 3) for s in (1, 2)], rel=1e-12)
    assert [r["lr"] for r in log[2:]] == pytest.approx([4e-4 * cosine(s, 6) for s in (3, 4, 5, 6)], rel=1e-12,
                                                       abs=1e-20)
    with pytest.raises(ValueError, match=r"--epochs 1: 3 steps in all, but the checkpoint .* is at step 6"):
        train(replace(cfg, resume=True, max_steps=None, epochs=1), factory)


def test_resume_after_a_kill_tore_the_last_log_line(tmp_path, spec, subset):
    factory = lambda: LlavaMed(spec)  # noqa: E731
    cfg = _s1(tmp_path, subset, n=12, max_steps=1)
    train(cfg, factory)
    with open(Path(cfg.out, "log.jsonl"), "a") as f:
        f.write('{"stage": "stage1", "step": 2, "epoch": 0, "lr": 0.00')  # step 2's line, cut by a kill
    res = train(replace(cfg, resume=True, max_steps=None), factory)
    assert [r["step"] for r in _log(res["log"])] == [1, 2, 3]
