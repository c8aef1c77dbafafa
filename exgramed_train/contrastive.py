"""Auxiliary stage-2 losses next to the multi-graph alignment: InfoNCE, SigLIP, none, and ablations.

The data-efficiency study (``experiments/data_efficiency.py``) compares, on the
same pooled embeddings the alignment sees (``x: [K, B, d]``; row 0 the
mean-pooled projected image patches, row 1 the pooled raw response, row 2 the
pooled extended response):

* ``alignment``: :class:`exgramed_kernels.MultiGraphAlignment` (the default);
* ``infonce``: CLIP's symmetric InfoNCE between the image and the response(s);
* ``siglip``: SigLIP's pairwise sigmoid loss between the same pairs;
* ``none``: a zero loss (AR only), still reporting in-batch retrieval accuracy.

Every module returns an object with ``.loss`` (scalar, added to the AR loss
with weight ``alpha``) and ``.accuracy`` (a small float vector the trainer
logs), so the training loop does not care which one it runs.
:func:`build_aux_loss` is the one entry point the model calls.
"""
from __future__ import annotations

import inspect
import json
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

AUX_LOSSES = ("alignment", "infonce", "siglip", "none")


class AuxOutput(NamedTuple):
    """``loss``: scalar; ``accuracy``: ``[2 * len(text_modalities)]`` in-batch top-1 retrieval
    accuracy, image->text then text->image for each text modality (a diagnostic, no gradient)."""
    loss: torch.Tensor
    accuracy: torch.Tensor


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{name}: a and b must be [B, d] matrices, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{name}: a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 1:
        raise ValueError(f"{name}: empty batch (B = 0)")
    if not (a.dtype.is_floating_point and b.dtype.is_floating_point):
        raise ValueError(f"{name}: a and b must be floating point, got {a.dtype} and {b.dtype}")


def info_nce_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    r"""CLIP's symmetric InfoNCE between paired rows of ``a`` and ``b``.

    ``s_ij = exp(logit_scale) * <a_i/|a_i|, b_j/|b_j|>`` and

        L = 1/2 [ -1/B sum_i log softmax_j(s_ij)[i] - 1/B sum_j log softmax_i(s_ij)[j] ]

    (row ``i`` of ``a`` and of ``b`` are the same sample). ``a, b``: ``[B, d]`` float;
    ``logit_scale``: the log inverse temperature (a scalar tensor or float; CLIP starts at
    ``log(1 / 0.07)``). Returns a scalar in ``a``'s dtype. ``B = 1`` gives 0.
    """
    _check_pair(a, b, "info_nce_loss")
    s = torch.as_tensor(logit_scale, dtype=a.dtype, device=a.device).exp()
    logits = s * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def siglip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float,
                logit_bias: torch.Tensor | float) -> torch.Tensor:
    r"""SigLIP's pairwise sigmoid loss between paired rows of ``a`` and ``b`` (Zhai et al. 2023).

    ``z_ij = exp(logit_scale) * <a_i/|a_i|, b_j/|b_j|> + logit_bias``, ``y_ij = +1`` if ``i = j``
    else ``-1``, and

        L = -1/B sum_i sum_j log sigmoid(y_ij z_ij)

    (normalised by the batch size, as the paper). ``a, b``: ``[B, d]`` float; SigLIP starts at
    ``logit_scale = log 10``, ``logit_bias = -10``. Returns a scalar in ``a``'s dtype.
    """
    _check_pair(a, b, "siglip_loss")
    s = torch.as_tensor(logit_scale, dtype=a.dtype, device=a.device).exp()
    z = s * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T + torch.as_tensor(logit_bias, dtype=a.dtype,
                                                                                  device=a.device)
    y = 2.0 * torch.eye(a.shape[0], dtype=a.dtype, device=a.device) - 1.0
    return -F.logsigmoid(y * z).sum() / a.shape[0]


@torch.no_grad()
def retrieval_accuracy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[2]``: fraction of rows of ``a`` whose most cosine-similar row of ``b`` is its own, and
    the same from ``b`` to ``a`` (ties go to the lower index, as ``argmax``)."""
    sim = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T
    idx = torch.arange(a.shape[0], device=a.device)
    return torch.stack([(sim.argmax(1) == idx).float().mean(), (sim.argmax(0) == idx).float().mean()])


def _check_x(x: torch.Tensor, text_modalities, name: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name}: x must have shape [K, B, d], got {tuple(x.shape)}")
    bad = [m for m in text_modalities if not 1 <= m < x.shape[0]]
    if bad:
        raise ValueError(f"{name}: text_modalities {bad} out of range for K = {x.shape[0]} (row 0 is the image)")


class _PairLoss(nn.Module):
    """Shared body: image row 0 against each row in ``text_modalities``, losses averaged."""

    def __init__(self, text_modalities=(1,), logit_scale: float = 0.0, logit_bias: float | None = None,
                 learn_temperature: bool = True):
        super().__init__()
        self.text_modalities = tuple(int(m) for m in text_modalities)
        if not self.text_modalities:
            raise ValueError(f"{type(self).__name__}: text_modalities must name at least one row of x")
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)), requires_grad=learn_temperature)
        self.logit_bias = None if logit_bias is None else nn.Parameter(torch.tensor(float(logit_bias)),
                                                                       requires_grad=learn_temperature)

    def pair_loss(self, a, b):
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> AuxOutput:
        _check_x(x, self.text_modalities, type(self).__name__)
        losses = [self.pair_loss(x[0], x[m]) for m in self.text_modalities]
        acc = torch.cat([retrieval_accuracy(x[0], x[m]) for m in self.text_modalities])
        return AuxOutput(loss=torch.stack(losses).mean(), accuracy=acc)


class InfoNCELoss(_PairLoss):
    """:func:`info_nce_loss` between the pooled image (row 0 of ``x``) and each of
    ``text_modalities`` (default the raw response, row 1), averaged; a learnable temperature
    starting at CLIP's 0.07 (``learn_temperature=False`` keeps it fixed: it is detached in the
    loss, so the trainer's ``requires_grad_(True)`` on the module cannot unfreeze it)."""

    def __init__(self, text_modalities=(1,), temperature: float = 0.07, learn_temperature: bool = True):
        super().__init__(text_modalities, math.log(1.0 / temperature), None, learn_temperature)
        self.learn_temperature = learn_temperature

    def pair_loss(self, a, b):
        scale = self.logit_scale if self.learn_temperature else self.logit_scale.detach()
        return info_nce_loss(a, b, scale)


class SigLIPLoss(_PairLoss):
    """:func:`siglip_loss` between the pooled image (row 0) and each of ``text_modalities``
    (default row 1), averaged; learnable ``logit_scale`` (start ``log 10``) and ``logit_bias``
    (start -10) as in the SigLIP paper."""

    def __init__(self, text_modalities=(1,), logit_scale: float = math.log(10.0), logit_bias: float = -10.0,
                 learn_temperature: bool = True):
        super().__init__(text_modalities, logit_scale, logit_bias, learn_temperature)
        self.learn_temperature = learn_temperature

    def pair_loss(self, a, b):
        if self.learn_temperature:
            return siglip_loss(a, b, self.logit_scale, self.logit_bias)
        return siglip_loss(a, b, self.logit_scale.detach(), self.logit_bias.detach())


class NoAuxLoss(nn.Module):
    """AR only: the loss is an exact zero that still depends on ``x`` (so gradient hooks and the
    trainer's bookkeeping run unchanged); accuracy is the image/raw-response retrieval accuracy."""

    def __init__(self, text_modalities=(1,)):
        super().__init__()
        self.text_modalities = tuple(int(m) for m in text_modalities)

    def forward(self, x: torch.Tensor) -> AuxOutput:
        _check_x(x, self.text_modalities, "NoAuxLoss")
        acc = torch.cat([retrieval_accuracy(x[0], x[m]) for m in self.text_modalities])
        return AuxOutput(loss=(x * 0.0).sum(), accuracy=acc)


def standardize_nodes(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Each modality's nodes (``x: [K, B, d]``) centred on their batch mean and scaled to unit RMS norm."""
    c = x - x.mean(1, keepdim=True)
    return c / c.pow(2).sum(-1).mean(-1).clamp_min(eps).sqrt()[:, None, None]


def ablated_alignment(dim: int, hidden: int | None = None, k: int | None = None, *, modalities=None,
                      message_passing: bool = True, standardize: bool = False, **options):
    """:class:`exgramed_kernels.MultiGraphAlignment` with the paper's ablations, and one input option.

    ``modalities``: the rows of ``x`` that become graphs (``[0, 1]``: without extended
    context); ``message_passing=False``: the GraphConv layers keep only their root (self)
    term, ``h' = relu(W_root h + b)`` (``W_rel`` fixed at zero as buffers, so no node sees its
    neighbours; the kNN edges still enter the matching's quadratic term); ``mode="pairwise"``
    (a MultiGraphAlignment option) replaces the barycenter. ``standardize=True``: every modality's
    nodes are centred on their batch mean and scaled to unit RMS norm before the alignment
    (:func:`standardize_nodes`; not in the paper: the pooled image and text embeddings of a LLaVA
    model can differ in scale by orders of magnitude, and the barycenter then is the larger one).
    With none of these this returns a plain MultiGraphAlignment.
    """
    from exgramed_kernels import MultiGraphAlignment

    if modalities is None and message_passing and not standardize:
        return MultiGraphAlignment(dim, hidden=hidden, k=k, **options)

    class AblatedAlignment(MultiGraphAlignment):
        def __init__(self):
            super().__init__(dim, hidden=hidden, k=k, **options)
            self.modalities = None if modalities is None else [int(m) for m in modalities]
            if self.modalities is not None and len(self.modalities) < 2:
                raise ValueError(f"ablated_alignment: modalities must name at least 2 rows, got {modalities}")
            self.message_passing = bool(message_passing)
            self.standardize = bool(standardize)
            if not self.message_passing:
                for name in ("w_rel1", "w_rel2"):
                    w = getattr(self, name)
                    delattr(self, name)
                    self.register_buffer(name, torch.zeros_like(w.data))

        def forward(self, x):
            if self.modalities is not None:
                if x.dim() != 3 or max(self.modalities) >= x.shape[0]:
                    raise RuntimeError(f"AblatedAlignment: modalities {self.modalities} out of range for x "
                                       f"of shape {tuple(x.shape)}")
                x = x[self.modalities]
            if self.standardize:
                x = standardize_nodes(x)
            return super().forward(x)

    return AblatedAlignment()


def build_aux_loss(kind: str, dim: int, hidden: int | None = None, k: int | None = None, options: dict | None = None):
    """The stage-2 auxiliary loss module ``kind`` (one of :data:`AUX_LOSSES`) for ``d = dim``.

    ``k``: the alignment's kNN degree (None: its configuration's). ``options``: for ``alignment``,
    MultiGraphAlignment's options plus the keys of
    :func:`ablated_alignment` (``modalities``, ``message_passing``, ``standardize``); for ``infonce`` /
    ``siglip``: ``text_modalities``, ``temperature`` (InfoNCE), ``logit_scale``/``logit_bias``
    (SigLIP), ``learn_temperature``; for ``none``: ``text_modalities``.
    """
    options = dict(options or {})
    if kind == "alignment":
        return ablated_alignment(dim, hidden, k, **options)
    if kind == "infonce":
        return InfoNCELoss(**options)
    if kind == "siglip":
        return SigLIPLoss(**options)
    if kind == "none":
        return NoAuxLoss(**options)
    raise ValueError(f"aux_loss must be one of {list(AUX_LOSSES)}, got {kind!r}")


# MultiGraphAlignment's own keywords and ablated_alignment's that a command line may set, beside the
# alignment options of exgramed_kernels.config.AlignConfig.
ALIGNMENT_KEYS = ("official", "graph_scope", "bias", "modalities", "message_passing", "standardize")


def aux_option_keys(kind: str) -> tuple[str, ...]:
    """The ``--align-option`` keys valid for the auxiliary loss ``kind`` (the kNN degree is ``--align-k``)."""
    if kind == "alignment":
        from exgramed_kernels.config import FIELDS

        return tuple(f for f in FIELDS if f != "k") + ALIGNMENT_KEYS
    cls = {"infonce": InfoNCELoss, "siglip": SigLIPLoss, "none": NoAuxLoss}.get(kind)
    if cls is None:
        raise ValueError(f"aux_loss must be one of {list(AUX_LOSSES)}, got {kind!r}")
    return tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self")


def parse_aux_options(kind: str, pairs) -> dict:
    """``KEY=VALUE`` strings (the driver's repeatable ``--align-option``) as the options of :func:`build_aux_loss`.

    Alignment options take their type from :class:`exgramed_kernels.config.AlignConfig`; other values are
    read as JSON (a bare word stays a string). Unknown keys raise ``ValueError`` listing the valid ones.
    """
    from exgramed_kernels.config import FIELDS, parse_option

    keys = aux_option_keys(kind)
    out = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"--align-option expects KEY=VALUE, got {pair!r}")
        if key not in keys:
            raise ValueError(f"--align-option: unknown key {key!r} for --aux-loss {kind}; valid: {', '.join(keys)}")
        if kind == "alignment" and key in FIELDS:
            out[key] = parse_option(key, text)
            continue
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out
