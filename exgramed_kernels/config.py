"""The alignment's options, each written once with its default: :class:`AlignConfig`.

Every entry point derives from it: the op ``torch.ops.exgramed.align`` (its schema's defaults),
:func:`exgramed_kernels.align`, :func:`exgramed_kernels.reference.align`,
:func:`exgramed_kernels.distributed.global_align`, :class:`exgramed_kernels.MultiGraphAlignment` and
the training driver's ``--align-option KEY=VALUE``. :data:`DEFAULTS` is the package's setting,
:data:`OFFICIAL` the official ExGra-Med code's where it differs; ``docs/align.md`` gives the
measurements behind the defaults.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .checks import AGGRS, ESTIMATORS, MAX_RESTARTS, METRICS
from .checks import METHODS as SOLVERS

MODES = ("barycenter", "pairwise")


@dataclass(frozen=True)
class AlignConfig:
    """The options of the multi-graph alignment (``align``'s math: :func:`exgramed_kernels.align`).

    Op options (arguments of ``torch.ops.exgramed.align``):

    k: kNN degree. metric: kNN metric, ``"cosine"`` or ``"l2"``. mode: ``"barycenter"`` (every modality
    against the barycenter graph, both directions) or ``"pairwise"``. aggr: GraphConv aggregation
    (``"max"``, ``"mean"``, ``"sum"``, ``"gcn"``). reverse: aggregate over in-neighbours (PyG's flow on
    kNN edges). copy_structure: graph 2 of a problem takes graph 1's edges. edge_floor: edge lengths are
    ``sqrt(|h_i - h_j|^2 + (edge_floor r)^2)``, r the graph's RMS node norm (0: plain normalisation).
    noise_scale: Gumbel scale s of the perturbations. solver (``"fw"``, ``"sinkhorn"``), max_iter, tol,
    restarts, seed, partial: ``qap_solve``'s. estimator (``"imle"``, ``"blackbox"``, ``"imle_symmetric"``)
    and lambda_: the solver's backward.

    Module options (how :class:`~exgramed_kernels.MultiGraphAlignment` draws the op's random inputs):

    samples: S noise samples per problem. shared_noise: one unary noise sample shared by all problems.
    perturb_quadratic: perturb the edge-pair scores too (noise generated inside ``pair_scores``).
    dropout: dropout probability after each GraphConv layer (training mode).
    """

    k: int = 5
    metric: str = "cosine"
    mode: str = "barycenter"
    aggr: str = "max"
    reverse: bool = False
    copy_structure: bool = False
    edge_floor: float = 0.1
    noise_scale: float = 0.3
    solver: str = "fw"
    max_iter: int = 50
    tol: float = 1e-6
    restarts: int = 1
    seed: int = 0
    partial: bool = False
    estimator: str = "imle"
    lambda_: float = 80.0
    samples: int = 1
    shared_noise: bool = False
    perturb_quadratic: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        self._validate()

    def _validate(self) -> None:
        """Raise ``ValueError`` naming the first option of the wrong type or out of range."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = _TYPES[f.name]
            if kind is float and type(value) is int:
                continue
            if type(value) is not kind:
                raise ValueError(f"alignment option {f.name} must be a {kind.__name__}, got {value!r}")

        checks = (
            ("k", self.k >= 1, "an int >= 1"),
            ("metric", self.metric in METRICS, f"one of {METRICS}"),
            ("mode", self.mode in MODES, f"one of {MODES}"),
            ("aggr", self.aggr in AGGRS, f"one of {AGGRS}"),
            ("edge_floor", self.edge_floor >= 0 and math.isfinite(self.edge_floor), "a finite number >= 0"),
            ("noise_scale", self.noise_scale >= 0 and math.isfinite(self.noise_scale), "a finite number >= 0"),
            ("solver", self.solver in SOLVERS, f"one of {SOLVERS}"),
            ("max_iter", self.max_iter >= 1, "an int >= 1"),
            ("tol", self.tol >= 0 and math.isfinite(self.tol), "a finite number >= 0"),
            ("restarts", 1 <= self.restarts <= MAX_RESTARTS or self.restarts == -1,
             f"an int in [1, {MAX_RESTARTS}], or -1 (size-based)"),
            ("estimator", self.estimator in ESTIMATORS, f"one of {ESTIMATORS}"),
            ("lambda_", 0 < self.lambda_ < math.inf, "a positive finite number"),
            ("samples", self.samples >= 1, "an int >= 1"),
            ("dropout", 0 <= self.dropout < 1, "a number in [0, 1)"),
        )
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"alignment option {name} must be {what}, got {getattr(self, name)!r}")

    def replace(self, **options) -> "AlignConfig":
        """A copy with ``options`` changed; unknown names raise ``TypeError`` listing the valid ones."""
        unknown = sorted(set(options) - set(FIELDS))
        if unknown:
            raise TypeError(f"unknown alignment option(s) {unknown}; valid: {list(FIELDS)}")
        return dataclasses.replace(self, **options)

    def op_options(self) -> dict:
        """The options ``torch.ops.exgramed.align`` takes, by name."""
        return {name: getattr(self, name) for name in OP_FIELDS}


FIELDS = tuple(f.name for f in dataclasses.fields(AlignConfig))
_TYPES = {f.name: {"int": int, "float": float, "str": str, "bool": bool}[f.type] for f in dataclasses.fields(AlignConfig)}
# The options that are arguments of the op (in its schema's order); the rest are the module's.
OP_FIELDS = FIELDS[:FIELDS.index("samples")]

DEFAULTS = AlignConfig()

# The official ExGra-Med code where it differs from the paper's wording, and its noise.
OFFICIAL = DEFAULTS.replace(
    metric="l2",  # L2 kNN
    copy_structure=True,  # graph 2 of each problem gets graph 1's edges
    reverse=True,  # PyG GraphConv on knn_graph edges aggregates over in-neighbours
    partial=True,  # LPMP solves partial matchings
    shared_noise=True,  # one unary Gumbel sample per step, shared by every problem
    noise_scale=0.05,
    estimator="blackbox",  # BB-GM's GraphMatchingModule
    dropout=0.1,
    edge_floor=0.0,  # F.normalize(h_i - h_j)
)


def parse_option(key: str, text: str):
    """``KEY=VALUE`` text (the driver's ``--align-option``) as the option's typed value."""
    if key not in FIELDS:
        raise TypeError(f"unknown alignment option {key!r}; valid: {list(FIELDS)}")
    kind = _TYPES[key]
    if kind is bool:
        low = text.strip().lower()
        if low not in ("true", "false", "1", "0"):
            raise ValueError(f"alignment option {key} must be true or false, got {text!r}")
        return low in ("true", "1")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"alignment option {key} must be a {kind.__name__}, got {text!r}") from None
