"""`linear_assignment`: exact batched linear assignment (shortest augmenting paths)."""
from __future__ import annotations

import torch

from . import reference
from ._backend import register_fallback
from .checks import check_assignment_args


@torch.library.register_fake("exgramed::linear_assignment")
def _linear_assignment_fake(score, maximize=True):
    check_assignment_args(score, check_values=False)
    return score.new_empty(score.shape[:2], dtype=torch.long)


@register_fallback("linear_assignment")
def _linear_assignment_reference(score, maximize=True):
    check_assignment_args(score)
    return reference.linear_assignment(score, maximize)


def linear_assignment(score: torch.Tensor, maximize: bool = True) -> torch.Tensor:
    r"""Exact optimal assignment of every problem of a batch.

    For each g, the permutation :math:`\sigma` maximising (``maximize=True``) or minimising
    :math:`\sum_i \mathrm{score}[g, i, \sigma(i)]`. Shortest augmenting paths with dual
    potentials (Jonker-Volgenant style) in float64, so the optimum is exact up to float64
    rounding of the sums; among equally good permutations the result is deterministic.
    CPU: problems in parallel. CUDA: one thread block per problem, each Dijkstra step's
    relaxation and argmin done by the block's threads; no copy to the host.

    Args:
        score: ``[G, N, N]`` float16, bfloat16, float32 or float64, finite.
        maximize: maximise (default) or minimise.

    Returns:
        int64 ``[G, N]``: the column assigned to each row (a permutation of ``0..N-1``).
    """
    return torch.ops.exgramed.linear_assignment(score, maximize)
