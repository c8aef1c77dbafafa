"""Shared fixtures: tiny demo models in a per-session cache, small data subsets, one stage-1 run."""
import json
import os
from pathlib import Path

import pytest
import torch

from exgramed_train.make_demo import ASSETS

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of the tiny random LLaMA / CLIP models (created once per session)."""
    os.environ["EXGRAMED_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    from exgramed_train.tiny import demo_models
    return demo_models()


@pytest.fixture(scope="session")
def spec(tiny):
    from exgramed_train.model import ModelSpec
    return ModelSpec(llm=tiny["llm"], vision=tiny["vision"], tokenizer=tiny["tokenizer"], align_k=3)


def _subset(src: str, dst: Path, n: int) -> str:
    """The first ``n`` records of a demo JSON file, written to ``dst``."""
    dst.write_text(json.dumps(json.loads((ASSETS / src).read_text())[:n]))
    return str(dst)


@pytest.fixture(scope="session")
def subset():
    """``subset(src, dst, n)``: the first ``n`` records of a demo JSON file, written to ``dst``."""
    return _subset


@pytest.fixture(scope="session")
def stage1_model(tmp_path_factory, spec):
    """A short stage-1 run on the demo data; returns its output directory."""
    from exgramed_train.model import LlavaMed
    from exgramed_train.training import TrainConfig, train
    d = tmp_path_factory.mktemp("stage1")
    cfg = TrainConfig(stage="stage1", data=_subset("stage1.json", d / "s1.json", 16), image_folder=str(ASSETS / "images"),
                      out=str(d / "run"), micro_batch=8, max_length=160, progress=False)
    res = train(cfg, lambda: LlavaMed(spec))
    return Path(res["model"])
