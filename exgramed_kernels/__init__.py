"""exgramed_kernels: batched kernels for ExGra-Med's multi-graph alignment.

Ops live under ``torch.ops.exgramed``; the functions here are their documented entry points, one module
per op (``knn_graph.py``, ``graph_conv.py``, ...), the alignment's options in ``config.py``.
"""
__version__ = "0.1.0"

from . import _backend, reference  # noqa: F401
from ._backend import HAS_EXTENSION  # noqa: F401
from .config import DEFAULTS, OFFICIAL, AlignConfig  # noqa: F401
from .knn_graph import knn_graph, reverse_neighbors  # noqa: F401
from .graph_conv import GraphConvNet, graph_conv  # noqa: F401
from .linear_assignment import linear_assignment  # noqa: F401
from .qap_gradient import qap_gradient  # noqa: F401
from .qap_solve import qap_objective, qap_solve  # noqa: F401
from .edge_sq_norms import edge_sq_norms  # noqa: F401
from .pair_scores import pair_scores, pair_scores_backward_sparse  # noqa: F401
from .edge_pair_indicator import edge_pair_indicator  # noqa: F401
from .align import align  # noqa: F401
from .distributed import global_align  # noqa: F401
from .module import AlignmentOutput, MultiGraphAlignment  # noqa: F401
