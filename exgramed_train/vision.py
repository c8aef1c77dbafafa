"""CLIP vision towers: transformers ``CLIPVisionModel`` or open_clip, loaded from local files.

Both expose the same small interface used by the LLaVA model:

* ``patch_features(pixel_values) -> [B, N, D]``: patch tokens (class token
  dropped) of the layer ``select_layer`` (LLaVA's default ``-2``: the output of
  the second-to-last transformer block);
* ``num_patches`` (N, from the vision config), ``hidden_size`` (D);
* ``preprocess(PIL image) -> [3, H, W]`` float tensor, the tower's own
  resize / crop / normalisation.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class HFCLIPVision(nn.Module):
    """``transformers.CLIPVisionModel`` from a local directory (``save_pretrained`` layout)."""

    backend = "hf"

    def __init__(self, path: str, select_layer: int = -2):
        super().__init__()
        from transformers import CLIPImageProcessor, CLIPVisionModel
        self.path = str(path)
        self.model = CLIPVisionModel.from_pretrained(self.path)
        self.processor = CLIPImageProcessor.from_pretrained(self.path)
        cfg = self.model.config
        self.select_layer = select_layer
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.hidden_size = cfg.hidden_size

    def preprocess(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.select_layer][:, 1:]

    def save(self, path: Path) -> None:
        self.model.save_pretrained(str(path))
        self.processor.save_pretrained(str(path))

    def gradient_checkpointing_enable(self):
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class OpenCLIPVision(nn.Module):
    """open_clip ``create_model(name, pretrained=<local checkpoint>)``; only the visual tower is kept.

    ``path`` is a local checkpoint file; ``model_name`` is either a registered
    open_clip model name or a path to a model-config JSON (registered under its
    file stem with ``open_clip.add_model_config``).
    """

    backend = "open_clip"

    def __init__(self, path: str, model_name: str, select_layer: int = -2):
        super().__init__()
        import open_clip
        self.path, self.model_name = str(path), str(model_name)
        name = self.model_name
        if name.endswith(".json"):
            open_clip.add_model_config(name)
            name = Path(name).stem
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=self.path)
        self.model = model.visual
        self._preprocess = preprocess
        grid = self.model.grid_size
        self.num_patches = grid[0] * grid[1]
        self.hidden_size = self.model.conv1.out_channels
        n_blocks = len(self.model.transformer.resblocks)
        self.layer_index = n_blocks + select_layer if select_layer < 0 else select_layer - 1
        self.select_layer = select_layer
        if not 0 <= self.layer_index < n_blocks:
            raise ValueError(f"select_layer={select_layer} is outside the {n_blocks} blocks of {name}")

    def preprocess(self, image) -> torch.Tensor:
        return self._preprocess(image)

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_intermediates(pixel_values, indices=[self.layer_index],
                                               intermediates_only=True, output_fmt="NLC")
        return out["image_intermediates"][0]

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        # a full open_clip checkpoint cannot be rebuilt from the visual tower alone: point at the source
        (path / "open_clip_source.json").write_text(json.dumps({"path": self.path, "model_name": self.model_name}))

    def gradient_checkpointing_enable(self):
        self.model.set_grad_checkpointing(True)


def load_vision(path: str, backend: str = "hf", model_name: str | None = None, select_layer: int = -2):
    """Load a vision tower; ``backend`` is ``"hf"`` or ``"open_clip"`` (needs ``model_name``)."""
    if backend == "hf":
        return HFCLIPVision(path, select_layer)
    if backend == "open_clip":
        if not model_name:
            raise ValueError("vision backend 'open_clip' needs --vision-model-name (a name or a config JSON)")
        return OpenCLIPVision(path, model_name, select_layer)
    raise ValueError(f"vision backend must be 'hf' or 'open_clip', got {backend!r}")
