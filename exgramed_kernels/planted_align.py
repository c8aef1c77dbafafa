"""A planted multi-modal alignment problem: does the gradient through the solver carry signal?

K modalities are different noisy linear maps of shared latents, ``x_k = z A_k + sigma eps``;
a trainable linear layer per modality, followed by :class:`MultiGraphAlignment`, is trained
with the alignment loss alone. Success is measured on fresh held-out batches as cross-modal
matching accuracy: for every pair of modalities, the fraction of samples that the optimal
one-to-one matching of the projections' cosine similarities maps to themselves (chance 1/B);
top-1 retrieval (nearest neighbour instead of a matching) is recorded too.

Used by tests/test_align_learning.py (the learning test) and experiments/noise_lambda.py (the
noise scale / lambda table).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .module import MultiGraphAlignment


@dataclass
class PlantedResult:
    accuracy: list[float] = field(default_factory=list)  # cross-modal matching accuracy per evaluation
    retrieval: list[float] = field(default_factory=list)  # cross-modal top-1 retrieval per evaluation
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)  # training loss per step
    seconds: float = 0.0

    @property
    def final(self) -> float:
        return self.accuracy[-1]


def cross_modal_matching(y: torch.Tensor) -> float:
    """y: ``[K, B, h]``. Mean over pairs k < l of the fraction of samples that the optimal one-to-one
    matching of cosine similarities (a linear assignment) maps to themselves."""
    from .linear_assignment import linear_assignment

    K, B, _ = y.shape
    yn = F.normalize(y.double(), dim=-1)
    pairs = [(a, b) for a in range(K) for b in range(a + 1, K)]
    sim = torch.stack([yn[a] @ yn[b].T for a, b in pairs])
    cols = linear_assignment(sim, True)
    return float((cols == torch.arange(B)).double().mean())


def cross_modal_retrieval(y: torch.Tensor) -> float:
    """y: ``[K, B, h]``. Mean over ordered pairs k != l of the fraction of i with argmax_j cos(y_k_i, y_l_j) = i."""
    K, B, _ = y.shape
    yn = F.normalize(y.double(), dim=-1)
    target = torch.arange(B)
    accs = []
    for a in range(K):
        for b in range(K):
            if a != b:
                accs.append(float(((yn[a] @ yn[b].T).argmax(1) == target).double().mean()))
    return sum(accs) / len(accs)


def run_planted(steps: int = 300, B: int = 16, K: int = 3, latent: int = 8, in_dim: int = 16, dim: int = 32,
                sigma: float = 0.1, lr: float = 1e-2, seed: int = 0, zero_grad: bool = False,
                eval_every: int = 50, eval_batches: int = 4, **align_options) -> PlantedResult:
    """Train K linear layers (+ the module's GraphConv) with the alignment loss alone.

    ``zero_grad=True`` replaces the gradient reaching the embeddings by zeros (the control run).
    ``align_options`` go to :class:`MultiGraphAlignment` (e.g. ``noise_scale``, ``lambda_``, ``k``).
    """
    gen = torch.Generator().manual_seed(seed)
    maps = torch.randn(K, latent, in_dim, generator=gen) / latent**0.5

    def batch(g):
        z = torch.randn(B, latent, generator=g)
        return torch.einsum("br,krd->kbd", z, maps) + sigma * torch.randn(K, B, in_dim, generator=g)

    torch.manual_seed(seed)
    proj = nn.ModuleList(nn.Linear(in_dim, dim) for _ in range(K))
    align = MultiGraphAlignment(dim, dim, **{"k": 3, **align_options})
    opt = torch.optim.Adam(list(proj.parameters()) + list(align.parameters()), lr=lr)
    eval_gen = torch.Generator().manual_seed(seed + 1)
    eval_x = [batch(eval_gen) for _ in range(eval_batches)]

    def evaluate():
        with torch.no_grad():
            ys = [torch.stack([p(x[k]) for k, p in enumerate(proj)]) for x in eval_x]
            res.accuracy.append(sum(map(cross_modal_matching, ys)) / len(ys))
            res.retrieval.append(sum(map(cross_modal_retrieval, ys)) / len(ys))

    res = PlantedResult()
    res.steps.append(0)
    evaluate()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x = batch(gen)
        y = torch.stack([p(x[k]) for k, p in enumerate(proj)])
        if zero_grad:
            y.register_hook(torch.zeros_like)
        out = align(y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        res.loss.append(float(out.loss.detach()))
        if step % eval_every == 0 or step == steps:
            res.steps.append(step)
            evaluate()
    res.seconds = time.perf_counter() - t0
    return res
