"""exgramed_kernels: batched kernels for ExGra-Med's multi-graph alignment.

Ops live under ``torch.ops.exgramed``; the functions here are their documented entry points.
"""
from . import _backend, reference
from ._backend import HAS_EXTENSION
from .knn import knn_graph, reverse_neighbors

__all__ = ["HAS_EXTENSION", "knn_graph", "reference", "reverse_neighbors"]
__version__ = "0.1.0"
