"""Run by test_ddp.py under torchrun: stage 1 then stage 2 on 2 CPU ranks (gloo)."""
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from exgramed_train.make_demo import ASSETS
from exgramed_train.model import LlavaMed, ModelSpec
from exgramed_train.training import TrainConfig, train

torch.set_num_threads(1)
out, s1_data, s2_data = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
paths = json.loads(os.environ["TINY_PATHS"])
spec = ModelSpec(llm=paths["llm"], vision=paths["vision"], tokenizer=paths["tokenizer"], align_k=3)
rank = int(os.environ["RANK"])
models = {}


def keep(stage, build):
    def factory():
        models[stage] = build()
        return models[stage]
    return factory


common = dict(image_folder=str(ASSETS / "images"), micro_batch=4, max_length=192, progress=False)
r1 = train(TrainConfig(stage="stage1", data=s1_data, out=str(out / "s1"), **common), keep("s1", lambda: LlavaMed(spec)))
r2 = train(TrainConfig(stage="stage2", data=s2_data, out=str(out / "s2"), lr=1e-3, grad_accum=2, **common),
           keep("s2", lambda: LlavaMed.load(r1["model"], with_alignment=True, align_k=3)))
# one micro-batch per step: the gradient norms are split after the synchronising backward
r3 = train(TrainConfig(stage="stage2", data=s2_data, out=str(out / "s2b"), lr=1e-3, epochs=1, grad_stats_every=1,
                       **common), keep("s2b", lambda: LlavaMed.load(r1["model"], with_alignment=True, align_k=3)))


def digest(model):
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


(out / f"rank{rank}.json").write_text(json.dumps({"s1": digest(models["s1"]), "s2": digest(models["s2"]),
                                                  "s2b": digest(models["s2b"]), "r1": r1, "r2": r2}))
