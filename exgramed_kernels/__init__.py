"""exgramed_kernels: batched kernels for ExGra-Med's multi-graph alignment.

Ops live under ``torch.ops.exgramed``; the functions here are their documented entry points.
One import line per op module (branches append lines; see .gitattributes).
"""
__version__ = "0.1.0"

from . import _backend, reference  # noqa: F401
from ._backend import HAS_EXTENSION  # noqa: F401
from .knn import knn_graph, reverse_neighbors  # noqa: F401
from .graph_conv import GraphConvNet, graph_conv  # noqa: F401
from .assignment import linear_assignment  # noqa: F401
from .qap import qap_gradient, qap_objective, qap_solve  # noqa: F401
from .align import MultiGraphAlignment, align  # noqa: F401
from .distributed import global_align  # noqa: F401
from .pair_scores import edge_sq_norms, pair_scores, pair_scores_backward_sparse  # noqa: F401
