"""``MultiGraphAlignment``: the alignment loss as an ``nn.Module`` that owns its GraphConv weights and draws
the op's noise from torch's generator."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .align import problem_graphs
from .config import DEFAULTS, OFFICIAL, AlignConfig
from .distributed import alignment_group, check_graph_scope, gather_batch, global_align, shared_generator


def sample_gumbel(shape, device=None, dtype=torch.float32, generator=None) -> torch.Tensor:
    """Standard Gumbel(0, 1) samples from torch's generator: ``-log(-log(u))``, ``u ~ U(0, 1)``.

    u is clamped to ``[tiny, 1)`` so a drawn 0 gives a finite sample (fp32: the range is about
    [-4.5, 16.6]). Uniform draws are several times cheaper than ``exponential_`` on the CPU.
    """
    u = torch.rand(shape, device=device, dtype=dtype, generator=generator)
    return -torch.log(-torch.log(u.clamp_min_(torch.finfo(dtype).tiny)))


@dataclass
class AlignmentOutput:
    """What :class:`MultiGraphAlignment` returns.

    loss: scalar, differentiable w.r.t. x and the module's parameters.
    accuracy: ``[K]`` (no grad) per modality, the fraction of nodes matched to themselves,
        averaged over the problems that involve the modality (and the S samples).
    Z: ``[S * P, B, B]`` the matchings (see :func:`~exgramed_kernels.align`); with
        ``graph_scope="global"`` this rank's rows ``problems`` of it.
    noise_scale: the Gumbel scale used for this step.
    problems: ``graph_scope="global"``: the flat problems (rows of the global Z) in Z; else None.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    Z: torch.Tensor
    noise_scale: float
    problems: list[int] | None = None


class MultiGraphAlignment(nn.Module):
    r"""ExGra-Med's multi-graph alignment loss as a module: owns the two GraphConv layers, samples
    the noise, calls ``torch.ops.exgramed.align``.

    ``out = MultiGraphAlignment(dim)(x)`` with ``x: [K, B, d]``; ``out.loss`` is the alignment loss
    (add it to the task loss, ExGra-Med uses weight 1.0), ``out.accuracy`` per-modality matching
    accuracy, ``out.Z`` the matchings.

    Args:
        dim: d, the embedding size. hidden: GraphConv width h (default d, as the official code).
        k: kNN degree (default: the configuration's, 5).
        official: start from :data:`~exgramed_kernels.config.OFFICIAL` (the official code's settings:
            L2 kNN, graph 2 gets graph 1's edges, reverse-kNN aggregation, partial matchings, one unary
            noise sample shared by all problems, Gumbel scale 0.05, blackbox lambda 80, dropout 0.1,
            plain edge normalisation) instead of :data:`~exgramed_kernels.config.DEFAULTS`.
        config: start from this :class:`~exgramed_kernels.config.AlignConfig` instead.
        options: any option of :class:`~exgramed_kernels.config.AlignConfig` (noise_scale, lambda_,
            estimator, samples, mode, solver, max_iter, tol, restarts, metric, aggr, reverse,
            copy_structure, partial, shared_noise, perturb_quadratic, dropout, edge_floor, ...), replacing
            the starting configuration's. ``docs/align.md`` gives the measurements behind the defaults.
        noise_schedule: optional ``step -> scale`` callable (``step``: training-mode calls so far,
            a Python int, settable); overrides ``noise_scale``. Under ``torch.compile`` each new
            scale value is a recompile: prefer schedules that change the scale rarely.
        bias: whether the GraphConv layers have a bias.
        graph_scope: ``"local"`` (default, the official behaviour: graphs over this process's batch)
            or ``"global"``: graphs over the batch of all ranks of ``process_group`` (default: the
            whole world), problems sharded across ranks, gradients in DDP's convention
            (``exgramed_kernels.distributed``, ``docs/distributed.md``).

    In eval mode there is no dropout; the noise is still sampled (the loss is defined with it)
    unless ``noise_scale`` is 0. Randomness comes from torch's generator, so ``torch.manual_seed``
    reproduces a step (under ``torch.compile`` with inductor, whose RNG differs from eager's, set
    ``torch._inductor.config.fallback_random = True`` to draw exactly eager's noise).
    """

    def __init__(self, dim: int, hidden: int | None = None, k: int | None = None, *, official: bool = False,
                 config: AlignConfig | None = None, noise_schedule: Callable[[int], float] | None = None,
                 bias: bool = True, graph_scope: str = "local", process_group=None, **options):
        super().__init__()
        hidden = dim if hidden is None else hidden
        for name, v in (("dim", dim), ("hidden", hidden)):
            if type(v) is not int or v < 1:
                raise ValueError(f"MultiGraphAlignment: {name} must be an int >= 1, got {v!r}")
        if config is not None and official:
            raise ValueError("MultiGraphAlignment: give either official=True or config, not both")
        check_graph_scope(graph_scope)
        if k is not None:
            options["k"] = k
        self.config = (config if config is not None else OFFICIAL if official else DEFAULTS).replace(**options)
        self.graph_scope, self.process_group = graph_scope, process_group
        self.dim, self.hidden, self.official = dim, hidden, official
        self.noise_schedule = noise_schedule
        self.w_root1 = nn.Parameter(torch.empty(dim, hidden))
        self.w_rel1 = nn.Parameter(torch.empty(dim, hidden))
        self.w_root2 = nn.Parameter(torch.empty(hidden, hidden))
        self.w_rel2 = nn.Parameter(torch.empty(hidden, hidden))
        self.bias1 = nn.Parameter(torch.empty(hidden)) if bias else None
        self.bias2 = nn.Parameter(torch.empty(hidden)) if bias else None
        self.step = 0  # training-mode calls so far; advanced only when a noise schedule is set
        self.reset_parameters()

    @property
    def config(self) -> AlignConfig:
        """The module's options (:class:`~exgramed_kernels.config.AlignConfig`); assign a new one to change them."""
        return self._config

    @config.setter
    def config(self, cfg: AlignConfig) -> None:
        self._config = cfg
        self._op_options = cfg.op_options()  # a plain dict: what torch.compile reads each call

    def reset_parameters(self) -> None:
        """torch.nn.Linear's initialisation (as PyG GraphConv's two Linear layers): U(-1/sqrt(in), 1/sqrt(in))."""
        for w in (self.w_root1, self.w_rel1, self.w_root2, self.w_rel2):
            bound = 1.0 / math.sqrt(w.shape[0])
            nn.init.uniform_(w, -bound, bound)
        for b, fan_in in ((self.bias1, self.dim), (self.bias2, self.hidden)):
            if b is not None:
                nn.init.uniform_(b, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def current_noise_scale(self) -> float:
        """The Gumbel scale of the next step (the schedule at the current step, else ``noise_scale``)."""
        if self.noise_schedule is not None:
            return float(self.noise_schedule(self.step))
        return float(self._op_options["noise_scale"])

    def _draw_noise(self, K: int, N: int, scale: float, device, generator):
        """The op's random inputs for one step, in a fixed order: unary noise ``[S, P | 1, N, N]``, the
        quadratic noise's seeds ``[S, P]``, the dropout mask ``[2, G, N, h]`` (each None when off)."""
        cfg = self.config
        P = len(problem_graphs(K, cfg.mode)[0])
        G = K + 1 if cfg.mode == "barycenter" else K
        S = cfg.samples
        unary = seeds = mask = None
        if scale > 0:
            unary = sample_gumbel((S, 1 if cfg.shared_noise else P, N, N), device, generator=generator)
            if cfg.perturb_quadratic:  # generated inside pair_scores from one seed per problem
                seeds = torch.randint(0, 2**62, (S, P), dtype=torch.long, device=device, generator=generator)
        if self.training and cfg.dropout > 0:
            keep = 1.0 - cfg.dropout
            mask = torch.empty(2, G, N, self.hidden, device=device).bernoulli_(keep, generator=generator) / keep
        return unary, seeds, mask

    def forward(self, x: torch.Tensor) -> AlignmentOutput:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise RuntimeError(f"MultiGraphAlignment: x must have shape [K, B, {self.dim}], got {tuple(x.shape)}")
        scale = self.current_noise_scale()
        weights = (self.w_root1, self.w_rel1, self.bias1, self.w_root2, self.w_rel2, self.bias2)
        group = problems = None
        if self.graph_scope == "global":
            group = alignment_group(self)
            xg, sizes = gather_batch(x, group)
            if xg.shape[1] == 0:
                raise RuntimeError("MultiGraphAlignment: the global batch is empty on every rank (B = 0)")
            unary, seeds, mask = self._draw_noise(xg.shape[0], xg.shape[1], scale, x.device,
                                                  shared_generator(x.device, group))
            loss, Z, problems = global_align(x, *weights, unary, None, mask, seeds, config=self.config,
                                             noise_scale=scale, process_group=group, x_global=(xg, sizes))
        else:
            if x.shape[1] == 0:
                raise RuntimeError("MultiGraphAlignment: x holds no samples (B = 0)")
            unary, seeds, mask = self._draw_noise(x.shape[0], x.shape[1], scale, x.device, None)
            options = dict(self._op_options)
            options["noise_scale"] = scale
            loss, Z = torch.ops.exgramed.align(x, *weights, unary, None, mask, seeds, **options)
        if self.training and self.noise_schedule is not None:
            self.step += 1
        with torch.no_grad():
            accuracy = self._accuracy(Z, x.shape[0], problems, group)
        return AlignmentOutput(loss=loss, accuracy=accuracy, Z=Z, noise_scale=scale, problems=problems)

    def _accuracy(self, Z, K, problems, group):
        """Per modality: the diagonal fraction of its problems' matchings, averaged over problems and samples."""
        src, dst = problem_graphs(K, self.config.mode)
        P = len(src)
        diag = Z.diagonal(dim1=1, dim2=2).to(torch.float32).mean(-1)
        if problems is not None:  # global: every problem's fraction, filled by its rank, summed over ranks
            full = torch.zeros(self.config.samples * P, dtype=torch.float32, device=Z.device)
            if problems:
                full[problems] = diag
            torch.distributed.all_reduce(full, group=group)
            diag = full
        diag = diag.reshape(-1, P).mean(0)
        member = torch.tensor([[float(g in (src[p], dst[p])) for g in range(K)] for p in range(P)], device=Z.device)
        return (diag[:, None] * member).sum(0) / member.sum(0)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, official={self.official}, graph_scope={self.graph_scope}, "
                f"{self.config}")
