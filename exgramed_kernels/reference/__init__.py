"""Pure-PyTorch reference implementations of every exgramed op.

They are the oracle the tests compare the kernels against (run them in float64), the
baseline the benchmarks measure, and the kernels used when the extension is not built.
"""
from .knn_graph import knn_graph, pairwise_distance  # noqa: F401
from .graph_conv import graph_conv, graph_conv_backward, graph_conv_forward  # noqa: F401
from .linear_assignment import linear_assignment  # noqa: F401
from .qap_gradient import edge_ends, pair_gather, qap_gradient  # noqa: F401
from .qap_solve import implicit_q, qap_objective, qap_solve, random_start_perm  # noqa: F401
from .edge_sq_norms import edge_sq_norms  # noqa: F401
from .pair_scores import gumbel_noise, pair_scores  # noqa: F401
from .edge_pair_indicator import edge_pair_indicator  # noqa: F401
from .align import align, hamming_loss  # noqa: F401
