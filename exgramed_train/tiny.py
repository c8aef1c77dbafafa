"""Tiny random-initialised LLaMA and CLIP-vision models from the committed demo configs.

At first use the models are initialised from a fixed seed and written with
``save_pretrained`` to a cache directory (``$EXGRAMED_CACHE`` or
``~/.cache/exgramed_train``), keyed by a hash of the configs; the training code
then loads them like any real checkpoint (``from_pretrained`` on a local path).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

from .make_demo import ASSETS


def cache_root() -> Path:
    return Path(os.environ.get("EXGRAMED_CACHE", Path.home() / ".cache" / "exgramed_train"))


def demo_models(assets: Path = ASSETS, seed: int = 0) -> dict:
    """Paths ``{"llm", "vision", "tokenizer"}`` of the tiny demo models, creating them once."""
    files = [assets / n for n in ("llm_config.json", "vision_config.json", "preprocessor_config.json")]
    key = hashlib.sha256(b"".join(f.read_bytes() for f in files) + str(seed).encode()).hexdigest()[:12]
    root = cache_root() / f"demo-{key}"
    paths = {"llm": root / "llm", "vision": root / "vision", "tokenizer": assets / "tokenizer"}
    if not (root / "done").exists():
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _materialize(assets, tmp, seed)
        (tmp / "done").write_text("ok\n")
        try:
            os.replace(tmp, root)  # atomic; a concurrent creator may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return {k: str(v) for k, v in paths.items()}


def _materialize(assets: Path, out: Path, seed: int) -> None:
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                              LlamaForCausalLM)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        llm = LlamaForCausalLM(LlamaConfig.from_json_file(str(assets / "llm_config.json")))
        llm.save_pretrained(str(out / "llm"))
        vision = CLIPVisionModel(CLIPVisionConfig.from_json_file(str(assets / "vision_config.json")))
        vision.save_pretrained(str(out / "vision"))
        CLIPImageProcessor.from_json_file(str(assets / "preprocessor_config.json")).save_pretrained(str(out / "vision"))
    finally:
        torch.random.set_rng_state(state)
