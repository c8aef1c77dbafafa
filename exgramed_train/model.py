"""The LLaVA-style model: CLIP patch tokens -> projector -> causal LM, plus ExGra-Med alignment.

Image tokens: ``<image>`` in a prompt becomes ``<im_start>`` + N x ``<im_patch>``
+ ``<im_end>`` (N from the vision config); the ``<im_patch>`` embeddings are
replaced by the projected patch features.  The three tokens are added to the
tokenizer and the LM's input and output embeddings; their new rows are set to
the mean of the existing rows (as LLaVA does).

Alignment (stage 2, as the official ExGra-Med code): node features are the
mean-pooled projected patches, and the raw and extended responses pooled
either over their token embeddings (``align_text="embed"``) or over the
decoder's last hidden states (``"after_de"``).  Pooling is masked by the
attention mask unless ``official_pooling`` (which, like the official code,
averages over the padding too).  ``MultiGraphAlignment`` from
``exgramed_kernels`` computes the alignment loss; total = AR + alpha * align.
A hook on the pooled embeddings ``x`` records, in every backward, whether the
gradient they receive (the auxiliary loss's alone: nothing else uses ``x``) is
exactly zero, and its norm (``align_grad`` in the forward's result).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from exgramed_kernels.config import DEFAULTS

from .data import IM_END, IM_PATCH, IM_START
from .vision import load_vision

SPEC_FILE = "exgramed_model.json"


@dataclass
class ModelSpec:
    """Everything needed to rebuild the model; saved as ``exgramed_model.json``."""
    llm: str
    vision: str
    tokenizer: str | None = None
    vision_backend: str = "hf"
    vision_model_name: str | None = None
    projector: str = "mlp2x_gelu"
    select_layer: int = -2
    align_text: str = "embed"
    official_pooling: bool = False
    align_k: int = DEFAULTS.k
    align_hidden: int | None = None
    align_options: dict = field(default_factory=dict)
    alpha: float = 1.0
    aux_loss: str = "alignment"  # stage-2 auxiliary loss: alignment, infonce, siglip, none (contrastive.py)


def build_projector(kind: str, d_in: int, d_out: int) -> nn.Module:
    """``linear`` or ``mlp2x_gelu`` (Linear, GELU, Linear) as in LLaVA."""
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))
    raise ValueError(f"projector must be 'linear' or 'mlp2x_gelu', got {kind!r}")


def pool(h: torch.Tensor, mask: torch.Tensor, official: bool) -> torch.Tensor:
    """Mean over the sequence: masked by ``mask``, or over every position (pads too) if ``official``."""
    if official:
        return h.mean(1)
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class LlavaMed(nn.Module):
    """Vision tower + projector + causal LM (+ the alignment module when ``with_alignment``)."""

    def __init__(self, spec: ModelSpec, with_alignment: bool = False, _lm_has_image_tokens: bool = False):
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer
        if spec.align_text not in ("embed", "after_de"):
            raise ValueError(f"align_text must be 'embed' or 'after_de', got {spec.align_text!r}")
        self.spec = spec
        self.vision = load_vision(spec.vision, spec.vision_backend, spec.vision_model_name, spec.select_layer)
        self.tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or spec.llm)
        self.lm = AutoModelForCausalLM.from_pretrained(spec.llm, dtype=torch.float32)
        d = self.lm.get_input_embeddings().weight.shape[1]
        self.projector = build_projector(spec.projector, self.vision.hidden_size, d)
        if not _lm_has_image_tokens:
            self._add_image_tokens()
        self.patch_id = self.tokenizer.convert_tokens_to_ids(IM_PATCH)
        self.num_patches = self.vision.num_patches
        self.align = None
        if with_alignment:  # aux_loss "alignment" without ablation keys is a plain MultiGraphAlignment
            from .contrastive import build_aux_loss
            self.align = build_aux_loss(spec.aux_loss, d, spec.align_hidden, spec.align_k, spec.align_options)

    def _add_image_tokens(self) -> None:
        n_old = len(self.tokenizer)
        added = self.tokenizer.add_tokens([IM_PATCH, IM_START, IM_END], special_tokens=True)
        if added != 3:
            raise ValueError(f"tokenizer of {self.spec.llm} already contains image tokens; "
                             "load a saved exgramed model with LlavaMed.load instead")
        self.lm.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        with torch.no_grad():
            for emb in (self.lm.get_input_embeddings(), self.lm.get_output_embeddings()):
                emb.weight[n_old:] = emb.weight[:n_old].mean(0, keepdim=True)
        self.n_base_tokens = n_old

    # ------------------------------------------------------------------ forward
    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected patch features ``[B, N, d]``."""
        feats = self.vision.patch_features(pixel_values)
        return self.projector(feats.to(self.projector_dtype))

    @property
    def projector_dtype(self):
        return next(self.projector.parameters()).dtype

    def embed_with_image(self, input_ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the ``<im_patch>`` rows replaced by ``img`` (row-major)."""
        emb = self.lm.get_input_embeddings()(input_ids)
        mask = input_ids == self.patch_id
        counts = mask.sum(1)
        if not bool((counts == img.shape[1]).all()):
            raise ValueError(f"every sequence needs exactly {img.shape[1]} {IM_PATCH} tokens, got {counts.tolist()}")
        return emb.masked_scatter(mask.unsqueeze(-1), img.to(emb.dtype))

    def text_embedding(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pooled response embedding for alignment (token embeddings or decoder states)."""
        if self.spec.align_text == "embed":
            h = self.lm.get_input_embeddings()(ids)
        else:
            h = self.lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        return pool(h, mask, self.spec.official_pooling)

    def forward(self, batch: dict, align: bool = False) -> dict:
        """AR loss (and alignment loss / accuracy when ``align``) of a collated batch."""
        img = self.image_embeddings(batch["pixel_values"])
        embeds = self.embed_with_image(batch["input_ids"], img)
        out = self.lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
        result = {"ar_loss": out.loss, "loss": out.loss}
        if align:
            if self.align is None:
                raise RuntimeError("model was built without the alignment module (with_alignment=False)")
            t0 = time.perf_counter()
            x = torch.stack([pool(img, torch.ones(img.shape[:2], device=img.device), False),
                             self.text_embedding(batch["raw_ids"], batch["raw_mask"]),
                             self.text_embedding(batch["ext_ids"], batch["ext_mask"])])
            a = self.align(x)
            timing = {"forward": _elapsed(t0, x)}
            grad = {}
            if torch.is_grad_enabled() and x.requires_grad:
                # the alignment's backward runs from the loss's gradient to x's gradient
                a.loss.register_hook(lambda g: timing.__setitem__("bwd_start", _elapsed(0.0, x)))
                x.register_hook(lambda g: _x_grad_probe(g, timing, grad))
            result.update(align_loss=a.loss, accuracy=a.accuracy.detach(), align_timing=timing, align_grad=grad,
                          loss=out.loss + self.spec.alpha * a.loss)
        return result

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, prompts: list[list[int]], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers for prompts (token id lists with image tokens), left-padded into one batch."""
        img = self.image_embeddings(pixel_values)
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=img.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=img.device)
        embeds = self.embed_with_image(ids, img)
        gen = self.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                               do_sample=False, num_beams=1, eos_token_id=self.tokenizer.eos_token_id,
                               pad_token_id=pad, stop_strings=["###"], tokenizer=self.tokenizer)
        texts = self.tokenizer.batch_decode(gen, skip_special_tokens=True)
        return [t.split("###")[0].strip() for t in texts]

    # ------------------------------------------------------------- save / load
    def save(self, path) -> None:
        """Write a self-contained model directory (LM, tokenizer, projector, alignment, spec)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(str(path / "lm"))
        self.tokenizer.save_pretrained(str(path / "lm"))
        spec = asdict(self.spec)
        spec.update(llm="lm", tokenizer="lm")
        if any(p.requires_grad for p in self.vision.parameters()) and self.vision.backend == "hf":
            self.vision.save(path / "vision")
            spec["vision"] = "vision"
        else:
            spec["vision"] = str(Path(self.spec.vision).resolve())
        _atomic_torch_save(self.projector.state_dict(), path / "projector.pt")
        if self.align is not None:
            _atomic_torch_save(self.align.state_dict(), path / "alignment.pt")
        tmp = path / (SPEC_FILE + ".tmp")
        tmp.write_text(json.dumps(spec, indent=1))
        tmp.replace(path / SPEC_FILE)

    @classmethod
    def load(cls, path, with_alignment: bool = False, **spec_overrides) -> "LlavaMed":
        """Load a directory written by :meth:`save`; ``spec_overrides`` change e.g. alignment settings."""
        path = Path(path)
        if not (path / SPEC_FILE).exists():
            raise FileNotFoundError(f"{path} is not an exgramed model directory (no {SPEC_FILE})")
        spec = json.loads((path / SPEC_FILE).read_text())
        for key in ("llm", "tokenizer", "vision"):
            if spec[key] and not Path(spec[key]).is_absolute():
                spec[key] = str(path / spec[key])
        spec.update(spec_overrides)
        model = cls(ModelSpec(**spec), with_alignment=with_alignment, _lm_has_image_tokens=True)
        model.projector.load_state_dict(torch.load(path / "projector.pt", map_location="cpu", weights_only=True))
        if with_alignment and (path / "alignment.pt").exists():
            model.align.load_state_dict(torch.load(path / "alignment.pt", map_location="cpu", weights_only=True))
        return model


def _elapsed(t0: float, like: torch.Tensor) -> float:
    """Seconds since ``t0`` after the device of ``like`` finished its queued work."""
    if like.is_cuda:
        torch.cuda.synchronize(like.device)
    return time.perf_counter() - t0


def _x_grad_probe(g: torch.Tensor, timing: dict, grad: dict) -> None:
    """x's gradient hook: the backward's end time, and the gradient x receives (only the auxiliary loss
    uses x): whether it is exactly zero, and its squared norm (tensors, read after the backward)."""
    timing["bwd_end"] = _elapsed(0.0, g)
    grad["zero"] = (g == 0).all()
    grad["sq_norm"] = g.detach().double().pow(2).sum()


def align_seconds(timing: dict) -> float:
    """Forward plus (when it ran) backward time of the alignment from a forward's ``align_timing``."""
    bwd = timing["bwd_end"] - timing["bwd_start"] if "bwd_end" in timing and "bwd_start" in timing else 0.0
    return timing["forward"] + max(bwd, 0.0)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
