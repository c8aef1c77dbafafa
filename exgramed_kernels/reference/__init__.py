"""Pure-PyTorch reference implementations of every exgramed op.

They are the oracle the tests compare the kernels against (run them in float64), the
baseline the benchmarks measure, and the kernels used when the extension is not built.
One import line per op module (branches append lines; see .gitattributes).
"""
from .knn import knn_graph, pairwise_distance  # noqa: F401
from .graph_conv import graph_conv  # noqa: F401
from .assignment import linear_assignment  # noqa: F401
from .qap import implicit_q, qap_gradient, qap_objective, qap_solve  # noqa: F401
from .align import align, edge_pair_indicator, hamming_loss, problem_graphs  # noqa: F401
from .pair_scores import edge_sq_norms, gumbel_noise, pair_scores  # noqa: F401
