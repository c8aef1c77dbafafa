"""Argument checks of every op, shared by the fake kernels, the reference fallbacks and the Triton kernels.

They raise the errors the compiled kernels raise (csrc/checks.h and csrc/<op>.h), naming the argument.
``check_values=False`` skips the checks that read tensor values (index ranges, NaN/Inf): fake tensors
have none.
"""
from __future__ import annotations

import math

import torch

METRICS = ("l2", "cosine")
AGGRS = ("max", "mean", "sum", "gcn")
METHODS = ("fw", "sinkhorn")
ESTIMATORS = ("imle", "blackbox", "imle_symmetric")
# qap_solve's starts per problem at most (csrc/qap.h kMaxRestarts): each start holds O(N) to O(N^2) state.
MAX_RESTARTS = 1 << 16


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every kernel computes in (csrc/checks.h): float64 stays float64; float32, float16 and bfloat16
    compute in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def is_concrete(t: torch.Tensor) -> bool:
    """Whether ``t`` holds values that may be read (not fake, not meta, not being traced)."""
    from torch._subclasses.fake_tensor import is_fake

    return not torch.compiler.is_compiling() and not is_fake(t) and t.device.type != "meta"


def check_finite(op: str, **tensors: torch.Tensor | None) -> None:
    """Raise ``"<op>: <name> contains NaN or Inf"`` for the first given tensor with a non-finite value."""
    for name, t in tensors.items():
        if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
            raise RuntimeError(f"{op}: {name} contains NaN or Inf")


def check_index_range(op: str, n: int, **tensors: torch.Tensor) -> None:
    """Raise ``"<op>: <name> entries must lie in [0, n)"`` for the first index tensor out of range."""
    for name, t in tensors.items():
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise RuntimeError(f"{op}: {name} entries must lie in [0, {n})")


def check_node_features(op: str, x: torch.Tensor) -> None:
    """``x`` is a floating-point ``[G, N, d]`` tensor of node features."""
    if x.dim() != 3:
        raise RuntimeError(f"{op}: x must have shape [G, N, d] (3 dims), got {_shape(x)}")
    if not x.dtype.is_floating_point:
        raise RuntimeError(f"{op}: x must be a floating-point tensor, got {x.dtype}")


# ----------------------------------------------------------------------------- knn_graph


def check_knn_args(x: torch.Tensor, k: int, metric: str, check_values: bool = True) -> None:
    if metric not in METRICS:
        raise RuntimeError(f"knn_graph: metric must be 'l2' or 'cosine', got '{metric}'")
    check_node_features("knn_graph", x)
    N = x.shape[1]
    if N < 2:
        raise RuntimeError(f"knn_graph: x must have at least 2 nodes per graph (N >= 2), got N = {N}")
    if not 1 <= k < N:
        raise RuntimeError(f"knn_graph: k must satisfy 1 <= k < N (N = {N}), got k = {k}")
    if x.shape[2] < 1:
        raise RuntimeError("knn_graph: x must have at least one feature (d >= 1)")
    if check_values:
        check_finite("knn_graph", x=x)


# ----------------------------------------------------------------------------- graph_conv


def check_graph_conv_args(x, nbr, w_root, w_rel, bias, aggr, check_values=True) -> None:
    if aggr not in AGGRS:
        raise RuntimeError(f"graph_conv: aggr must be one of 'max', 'mean', 'sum', 'gcn', got '{aggr}'")
    check_node_features("graph_conv", x)
    if nbr.dim() != 3:
        raise RuntimeError(f"graph_conv: nbr must have shape [G, N, k] (3 dims), got {_shape(nbr)}")
    if nbr.dtype != torch.long:
        raise RuntimeError(f"graph_conv: nbr must be an int64 tensor, got {nbr.dtype}")
    G, N, d = x.shape
    if nbr.shape[0] != G or nbr.shape[1] != N:
        raise RuntimeError(f"graph_conv: nbr must have shape [G, N, k] = [{G}, {N}, k] to match x, got {_shape(nbr)}")
    for name, w in (("w_root", w_root), ("w_rel", w_rel)):
        if w.dim() != 2:
            raise RuntimeError(f"graph_conv: {name} must have shape [d, h] (2 dims), got {_shape(w)}")
        if w.dtype != x.dtype:
            raise RuntimeError(f"graph_conv: {name} must have the dtype of x ({x.dtype}), got {w.dtype}")
        if w.device != x.device:
            raise RuntimeError(f"graph_conv: x and {name} must be on the same device, got {x.device} and {w.device}")
    if w_root.shape[0] != d:
        raise RuntimeError(f"graph_conv: w_root must have shape [d, h] with d = {d} (the last dim of x), got "
                           f"{_shape(w_root)}")
    if w_rel.shape != w_root.shape:
        raise RuntimeError(f"graph_conv: w_rel must have the shape of w_root {_shape(w_root)}, got {_shape(w_rel)}")
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != w_root.shape[1]:
            raise RuntimeError(f"graph_conv: bias must have shape [h] with h = {w_root.shape[1]}, got {_shape(bias)}")
        if bias.dtype != x.dtype:
            raise RuntimeError(f"graph_conv: bias must have the dtype of x ({x.dtype}), got {bias.dtype}")
        if bias.device != x.device:
            raise RuntimeError(f"graph_conv: x and bias must be on the same device, got {x.device} and {bias.device}")
    if nbr.device != x.device:
        raise RuntimeError(f"graph_conv: x and nbr must be on the same device, got {x.device} and {nbr.device}")
    if check_values:
        if nbr.numel() and (int(nbr.min()) < 0 or int(nbr.max()) >= N):
            raise RuntimeError(f"graph_conv: nbr entries must lie in [0, N) = [0, {N}), got values in "
                               f"[{int(nbr.min())}, {int(nbr.max())}]")
        check_finite("graph_conv", x=x)


def split_stacked_weight(x: torch.Tensor, weight: torch.Tensor, aggr: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``graph_conv_stacked``'s ``weight = [w_root; w_rel]`` (``[2d, h]``; ``w_rel`` alone, ``[d, h]``, for gcn)
    as ``(w_root, w_rel)`` views."""
    if aggr not in AGGRS:
        raise RuntimeError(f"graph_conv: aggr must be one of 'max', 'mean', 'sum', 'gcn', got '{aggr}'")
    check_node_features("graph_conv", x)
    d = x.shape[2]
    if aggr == "gcn":
        if weight.dim() != 2 or weight.shape[0] != d:
            raise RuntimeError(f"graph_conv: weight must have shape [d, h] with d = {d} (the last dim of x) for "
                               f"aggr='gcn', got {_shape(weight)}")
        return weight, weight
    if weight.dim() != 2 or weight.shape[0] != 2 * d:
        raise RuntimeError(f"graph_conv: weight must have shape [2d, h] = [w_root; w_rel] with d = {d} (the last dim "
                           f"of x), got {_shape(weight)}")
    return weight[:d], weight[d:]


# ----------------------------------------------------------------------------- linear_assignment


def check_assignment_args(score: torch.Tensor, check_values: bool = True) -> None:
    if score.dim() != 3:
        raise RuntimeError(f"linear_assignment: score must have shape [G, N, N] (3 dims), got {_shape(score)}")
    if score.shape[1] != score.shape[2]:
        raise RuntimeError(f"linear_assignment: score must be square per problem ([G, N, N]), got {_shape(score)}")
    if not score.dtype.is_floating_point:
        raise RuntimeError(f"linear_assignment: score must be a floating-point tensor, got {score.dtype}")
    if check_values:
        check_finite("linear_assignment", score=score)


# ----------------------------------------------------------------------------- qap_solve


def check_estimator(estimator: str, lambda_: float, op: str = "qap_solve") -> None:
    """The estimator arguments shared by ``qap_solve`` and ``align``."""
    if estimator not in ESTIMATORS:
        raise RuntimeError(f"{op}: estimator must be one of {ESTIMATORS}, got '{estimator}'")
    if not 0 < lambda_ < math.inf:
        raise RuntimeError(f"{op}: lambda_ must be a positive finite number, got {lambda_}")


def check_qap_args(U, nbr1, nbr2, Q=None, H1=None, H2=None, method="fw", max_iter=30, tol=1e-6, restarts=-1,
                   partial=False, seed=0, estimator="imle", lambda_=80.0, init=None, check_values=True,
                   op="qap_solve") -> None:
    p = f"{op}: "
    if U.dim() != 3 or U.shape[1] != U.shape[2]:
        raise RuntimeError(f"{p}U must have shape [G, N, N], got {_shape(U)}")
    if not U.dtype.is_floating_point:
        raise RuntimeError(f"{p}U must be a floating-point tensor, got {U.dtype}")
    G, N = U.shape[0], U.shape[1]
    for name, nbr in (("nbr1", nbr1), ("nbr2", nbr2)):
        if nbr.dtype != torch.long:
            raise RuntimeError(f"{p}{name} must be an int64 tensor, got {nbr.dtype}")
        if nbr.dim() != 3 or nbr.shape[0] != G or nbr.shape[1] != N:
            raise RuntimeError(f"{p}{name} must have shape [G, N, k] = [{G}, {N}, k], got {_shape(nbr)}")
        if nbr.device != U.device:
            raise RuntimeError(f"{p}{name} and U must be on the same device, got {nbr.device} and {U.device}")
    if nbr1.shape != nbr2.shape:
        raise RuntimeError(f"{p}nbr1 and nbr2 must have the same shape [G, N, k], got {_shape(nbr1)} and "
                           f"{_shape(nbr2)}")
    k = nbr1.shape[2]
    if Q is not None and (H1 is not None or H2 is not None):
        raise RuntimeError(f"{p}give either Q or (H1, H2), not both")
    if (H1 is None) != (H2 is None):
        raise RuntimeError(f"{p}H1 and H2 must be given together")
    if Q is not None:
        if Q.dim() != 3 or _shape(Q) != (G, N * k, N * k):
            raise RuntimeError(f"{p}Q must have shape [G, N*k, N*k] = [{G}, {N * k}, {N * k}], got {_shape(Q)}")
        if not Q.dtype.is_floating_point:
            raise RuntimeError(f"{p}Q must be a floating-point tensor, got {Q.dtype}")
        if Q.device != U.device:
            raise RuntimeError(f"{p}Q and U must be on the same device, got {Q.device} and {U.device}")
    if H1 is not None:
        for name, H in (("H1", H1), ("H2", H2)):
            if H.dim() != 3 or H.shape[0] != G or H.shape[1] != N:
                raise RuntimeError(f"{p}{name} must have shape [G, N, h] = [{G}, {N}, h], got {_shape(H)}")
            if not H.dtype.is_floating_point:
                raise RuntimeError(f"{p}{name} must be a floating-point tensor, got {H.dtype}")
            if H.device != U.device:
                raise RuntimeError(f"{p}{name} and U must be on the same device, got {H.device} and {U.device}")
        if H1.shape[2] != H2.shape[2]:
            raise RuntimeError(f"{p}H1 and H2 must have the same feature size h, got {_shape(H1)} and {_shape(H2)}")
    if method not in METHODS:
        raise RuntimeError(f"{p}method must be 'fw' or 'sinkhorn', got '{method}'")
    if estimator not in ESTIMATORS:
        raise RuntimeError(f"{p}estimator must be 'imle', 'blackbox' or 'imle_symmetric', got '{estimator}'")
    if not 0 < lambda_ < math.inf:
        raise RuntimeError(f"{p}lambda_ must be a positive finite number, got {lambda_}")
    if max_iter < 1:
        raise RuntimeError(f"{p}max_iter must be >= 1, got {max_iter}")
    if not tol >= 0:
        raise RuntimeError(f"{p}tol must be >= 0, got {tol}")
    if restarts != -1 and not 1 <= restarts <= MAX_RESTARTS:
        raise RuntimeError(f"{p}restarts must be in [1, {MAX_RESTARTS}] (or -1 for the size-based default), got "
                           f"{restarts}")
    if init is not None:
        if init.dtype != torch.long:
            raise RuntimeError(f"{p}init must be an int64 tensor, got {init.dtype}")
        if _shape(init) != (G, N):
            raise RuntimeError(f"{p}init must have shape [G, N] = [{G}, {N}], got {_shape(init)}")
        if init.device != U.device:
            raise RuntimeError(f"{p}init and U must be on the same device, got {init.device} and {U.device}")
    if check_values and init is not None and init.numel():
        if int(init.min()) < (-1 if partial else 0) or int(init.max()) >= N:
            extra = " or be -1 (unmatched)" if partial else " (-1 = unmatched needs partial=True)"
            raise RuntimeError(f"{p}init entries must lie in [0, {N}){extra}")
        counts = torch.zeros(G, N + 1, dtype=torch.long, device=init.device).scatter_add_(1, init + 1,
                                                                                          torch.ones_like(init))
        if int(counts[:, 1:].max()) > 1:
            raise RuntimeError(f"{p}every row of init must be a (partial) permutation, but a column appears twice")
    if check_values:
        check_index_range(op, N, nbr1=nbr1, nbr2=nbr2)
        check_finite(op, U=U, Q=Q, H1=H1, H2=H2)
        if H1 is not None:
            check_implicit_q_range(op, H1, H2)


def check_implicit_q_range(op, H1, H2) -> None:
    """The implicit Q squares the features' norms (the cross Gram, the squared edge lengths) in float32, or float64
    when either H is (csrc/qap.h): every entry below ``sqrt(max) / (2 sqrt(h))`` keeps those finite."""
    dtype = compute_dtype(torch.promote_types(H1.dtype, H2.dtype))
    limit = math.sqrt(torch.finfo(dtype).max) / (2 * math.sqrt(max(1, H1.shape[-1])))
    for name, H in (("H1", H1), ("H2", H2)):
        largest = float(H.abs().amax()) if H.numel() else 0.0
        if largest > limit:
            raise RuntimeError(f"{op}: {name} has entries up to {largest:g}; beyond {limit:g} the implicit Q's squared "
                               f"norms overflow {str(dtype).removeprefix('torch.')}: scale {name} down (Q does not "
                               "depend on the scale of H1 or H2)")


# ----------------------------------------------------------------------------- qap_gradient


def check_gradient_args(X, nbr1, nbr2, Q, check_values=True) -> None:
    p = "qap_gradient: "
    if X.dim() not in (3, 4) or X.shape[-1] != X.shape[-2]:
        raise RuntimeError(f"{p}X must have shape [G, N, N] or [G, R, N, N], got {_shape(X)}")
    if not X.dtype.is_floating_point:
        raise RuntimeError(f"{p}X must be a floating-point tensor, got {X.dtype}")
    G, N = X.shape[0], X.shape[-1]
    for name, nbr in (("nbr1", nbr1), ("nbr2", nbr2)):
        if nbr.dtype != torch.long or nbr.dim() != 3 or nbr.shape[0] != G or nbr.shape[1] != N:
            raise RuntimeError(f"{p}{name} must be int64 [G, N, k] = [{G}, {N}, k], got {nbr.dtype} {_shape(nbr)}")
    k = nbr1.shape[2]
    if nbr2.shape[2] != k:
        raise RuntimeError(f"{p}nbr1 and nbr2 must have the same k, got {_shape(nbr1)} and {_shape(nbr2)}")
    if _shape(Q) != (G, N * k, N * k):
        raise RuntimeError(f"{p}Q must have shape [G, N*k, N*k] = [{G}, {N * k}, {N * k}], got {_shape(Q)}")
    if not Q.dtype.is_floating_point:
        raise RuntimeError(f"{p}Q must be a floating-point tensor, got {Q.dtype}")
    for name, t in (("nbr1", nbr1), ("nbr2", nbr2), ("Q", Q)):
        if t.device != X.device:
            raise RuntimeError(f"{p}{name} and X must be on the same device, got {t.device} and {X.device}")
    if check_values:
        check_index_range("qap_gradient", N, nbr1=nbr1, nbr2=nbr2)


# ----------------------------------------------------------------------------- pair_scores


def check_pair_scores_args(C, w1, w2, nbr1, nbr2, noise=None, noise_seed=None, op="pair_scores") -> tuple[int, int]:
    """Returns ``(P, N k)``."""
    if C.dim() != 3 or C.shape[1] != C.shape[2]:
        raise RuntimeError(f"{op}: C must have shape [P, N, N], got {_shape(C)}")
    if not C.dtype.is_floating_point:
        raise RuntimeError(f"{op}: C must be a floating-point tensor, got {C.dtype}")
    P, N = C.shape[0], C.shape[1]
    for name, t in (("nbr1", nbr1), ("nbr2", nbr2)):
        if t.dtype != torch.long or t.dim() != 3 or t.shape[0] != P or t.shape[1] != N:
            raise RuntimeError(f"{op}: {name} must be int64 [P, N, k] = [{P}, {N}, k], got {t.dtype} {_shape(t)}")
        if t.device != C.device:
            raise RuntimeError(f"{op}: {name} and C must be on the same device, got {t.device} and {C.device}")
    if nbr1.shape[2] != nbr2.shape[2]:
        raise RuntimeError(f"{op}: nbr1 and nbr2 must have the same k, got {_shape(nbr1)} and {_shape(nbr2)}")
    Nk = N * nbr1.shape[2]
    for name, t in (("w1", w1), ("w2", w2)):
        if _shape(t) != (P, Nk):
            raise RuntimeError(f"{op}: {name} must have shape [P, N*k] = [{P}, {Nk}], got {_shape(t)}")
        if t.dtype != C.dtype:
            raise RuntimeError(f"{op}: {name} must have C's dtype {C.dtype}, got {t.dtype}")
        if t.device != C.device:
            raise RuntimeError(f"{op}: {name} and C must be on the same device, got {t.device} and {C.device}")
    if noise is not None and noise_seed is not None:
        raise RuntimeError(f"{op}: give either noise or noise_seed, not both")
    if noise is not None and _shape(noise) != (P, Nk, Nk):
        raise RuntimeError(f"{op}: noise must have shape [P, N*k, N*k] = [{P}, {Nk}, {Nk}], got {_shape(noise)}")
    if noise_seed is not None:
        if noise_seed.dtype != torch.long or _shape(noise_seed) != (P,):
            raise RuntimeError(f"{op}: noise_seed must be an int64 tensor of shape [P] = [{P}] (one seed per problem), "
                               f"got {noise_seed.dtype} {_shape(noise_seed)}")
        if noise_seed.device != C.device:
            raise RuntimeError(f"{op}: noise_seed and C must be on the same device, got {noise_seed.device} and "
                               f"{C.device}")
    return P, Nk


def check_sparse_grad_args(indices, values, C, op="pair_scores_backward_sparse") -> None:
    if indices.dtype != torch.long or indices.dim() != 2 or indices.shape[0] != 3:
        raise RuntimeError(f"{op}: indices must be int64 [3, nnz] (problem, row e, column f), got {indices.dtype} "
                           f"{_shape(indices)}")
    if not values.dtype.is_floating_point or values.dim() != 1 or values.shape[0] != indices.shape[1]:
        raise RuntimeError(f"{op}: values must be a floating-point tensor of shape [nnz] = [{indices.shape[1]}], got "
                           f"{values.dtype} {_shape(values)}")
    for name, t in (("indices", indices), ("values", values)):
        if t.device != C.device:
            raise RuntimeError(f"{op}: {name} and C must be on the same device, got {t.device} and {C.device}")


# ----------------------------------------------------------------------------- edge_sq_norms


def check_edge_sq_norms_args(h, nbr, op="edge_sq_norms") -> tuple[int, int]:
    """Returns ``(G, N k)``."""
    if h.dim() != 3:
        raise RuntimeError(f"{op}: h must have shape [G, N, h], got {_shape(h)}")
    if not h.dtype.is_floating_point:
        raise RuntimeError(f"{op}: h must be a floating-point tensor, got {h.dtype}")
    if nbr.dtype != torch.long or nbr.dim() != 3 or nbr.shape[0] != h.shape[0] or nbr.shape[1] != h.shape[1]:
        raise RuntimeError(f"{op}: nbr must be int64 [G, N, k] = [{h.shape[0]}, {h.shape[1]}, k], got {nbr.dtype} "
                           f"{_shape(nbr)}")
    if nbr.device != h.device:
        raise RuntimeError(f"{op}: nbr and h must be on the same device, got {nbr.device} and {h.device}")
    return h.shape[0], h.shape[1] * nbr.shape[2]


# ----------------------------------------------------------------------------- edge_pair_indicator_sparse


def check_indicator_args(Z, weights, nbr1, nbr2, op="edge_pair_indicator_sparse") -> None:
    for name, t in (("nbr1", nbr1), ("nbr2", nbr2)):
        if t.dtype != torch.long or t.dim() != 3:
            raise RuntimeError(f"{op}: {name} must be int64 [G, N, k], got {t.dtype} {_shape(t)}")
    if nbr1.shape != nbr2.shape:
        raise RuntimeError(f"{op}: nbr1 and nbr2 must have the same shape, got {_shape(nbr1)} and {_shape(nbr2)}")
    G, N, _ = nbr1.shape
    if not weights.dtype.is_floating_point:
        raise RuntimeError(f"{op}: weights must be a floating-point tensor, got {weights.dtype}")
    if _shape(weights) != (len(Z), G):
        raise RuntimeError(f"{op}: weights must have shape [T, G] = [{len(Z)}, {G}] (one row per matching), got "
                           f"{_shape(weights)}")
    for t, z in enumerate(Z):
        if not z.dtype.is_floating_point:
            raise RuntimeError(f"{op}: Z must be a floating-point tensor, got {z.dtype}")
        if _shape(z) != (G, N, N):
            raise RuntimeError(f"{op}: Z[{t}] must have shape [G, N, N] = [{G}, {N}, {N}], got {_shape(z)}")


# ----------------------------------------------------------------------------- align


def check_nonnegative_finite(op: str, name: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise RuntimeError(f"{op}: {name} must be a finite number >= 0, got {value}")
