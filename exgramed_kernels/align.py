r"""``align``: the differentiable multi-graph alignment loss of ExGra-Med, as one pipeline over any subset
of its matching problems.

:func:`align_problems` is the pipeline: the local op ``torch.ops.exgramed.align`` runs it on all the
problems of a step, the global-batch alignment (``distributed.py``) on each rank's share. The op is a
``CompositeImplicitAutograd`` of the other exgramed ops (``knn_graph``, ``graph_conv``,
``edge_sq_norms``, ``pair_scores``, ``qap_solve``) and torch ops: autograd flows through their
registered formulas (the solver's is the IMLE / blackbox estimator of ``qap_solve.py``), and
``torch.compile`` traces straight through it. Its schema is built here from
:class:`~exgramed_kernels.config.AlignConfig`, which holds every option's default.
"""
from __future__ import annotations

import contextlib
import math

import torch

from .checks import compute_dtype, is_concrete
from .config import DEFAULTS, OP_FIELDS, AlignConfig


def problem_graphs(K: int, mode: str) -> tuple[list[int], list[int]]:
    """``(src, dst)``: problem p matches graph ``src[p]`` (graph 1) to graph ``dst[p]`` (graph 2).

    ``barycenter`` (graphs 0..K-1 the modalities, K the barycenter): k -> K for each k, then K -> k.
    ``pairwise``: every pair k < l as k -> l, then the same pairs as l -> k.
    """
    if mode == "barycenter":
        return list(range(K)) + [K] * K, [K] * K + list(range(K))
    if mode == "pairwise":
        pairs = [(a, b) for a in range(K) for b in range(a + 1, K)]
        return [a for a, _ in pairs] + [b for _, b in pairs], [b for _, b in pairs] + [a for a, _ in pairs]
    raise ValueError(f"alignment option mode must be 'barycenter' or 'pairwise', got {mode!r}")


def num_samples(unary_noise, quadratic_noise, noise_seed) -> int:
    """S, the noise samples per problem: the leading size of the noise inputs (1 without noise)."""
    for t in (unary_noise, quadratic_noise, noise_seed):
        if t is not None:
            return t.shape[0]
    return 1


def check_align_inputs(x, weights, unary_noise, quadratic_noise, dropout_mask, noise_seed, cfg: AlignConfig) -> None:
    """The tensor arguments of ``align`` against each other and the options (errors name the argument)."""
    if x.dim() != 3:
        raise RuntimeError(f"align: x must have shape [K, B, d] (3 dims), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise RuntimeError(f"align: x must be a floating-point tensor, got {x.dtype}")
    K, N, d = x.shape
    if K < 2:
        raise RuntimeError(f"align: x must hold at least 2 modalities (K >= 2), got K = {K}")
    if not 1 <= cfg.k < N:
        raise RuntimeError(f"align: k must satisfy 1 <= k < B (B = {N}), got k = {cfg.k}")
    w_root1, w_rel1, bias1, w_root2, w_rel2, bias2 = weights
    h = w_root1.shape[-1] if w_root1.dim() == 2 else -1
    for name, w, shape in (("w_root1", w_root1, (d, h)), ("w_rel1", w_rel1, (d, h)),
                           ("w_root2", w_root2, (h, h)), ("w_rel2", w_rel2, (h, h))):
        if tuple(w.shape) != shape:
            raise RuntimeError(f"align: {name} must have shape {list(shape)} ([d, h] then [h, h]), got "
                               f"{tuple(w.shape)}")
    for name, b in (("bias1", bias1), ("bias2", bias2)):
        if b is not None and tuple(b.shape) != (h,):
            raise RuntimeError(f"align: {name} must have shape [{h}], got {tuple(b.shape)}")
    named = (("w_root1", w_root1), ("w_rel1", w_rel1), ("w_root2", w_root2), ("w_rel2", w_rel2), ("bias1", bias1),
             ("bias2", bias2), ("unary_noise", unary_noise), ("quadratic_noise", quadratic_noise),
             ("dropout_mask", dropout_mask), ("noise_seed", noise_seed))
    for name, t in named:
        if t is not None and t.device != x.device:
            raise RuntimeError(f"align: {name} must be on x's device {x.device}, got {t.device}")
        if t is not None and name != "noise_seed" and not t.dtype.is_floating_point:
            raise RuntimeError(f"align: {name} must be a floating-point tensor, got {t.dtype}")
    P = len(problem_graphs(K, cfg.mode)[0])
    G = K + 1 if cfg.mode == "barycenter" else K
    S = None
    for name, t, tail in (("unary_noise", unary_noise, (N, N)), ("quadratic_noise", quadratic_noise,
                                                                  (N * cfg.k, N * cfg.k)), ("noise_seed", noise_seed, ())):
        if t is None:
            continue
        if t.dim() != 2 + len(tail) or t.shape[1] not in (1, P) or tuple(t.shape[2:]) != tail:
            dims = ", ".join(["S", "P"] + [str(n) for n in tail])
            one = ", ".join(["S", "1"] + [str(n) for n in tail])
            raise RuntimeError(f"align: {name} must have shape [{dims}] or [{one}] (P = {P} problems), got "
                               f"{tuple(t.shape)}")
        if S is not None and t.shape[0] != S:
            raise RuntimeError("align: unary_noise, quadratic_noise and noise_seed must have the same number of "
                               "samples S (their first dimension)")
        S = t.shape[0]
        if S < 1:
            raise RuntimeError(f"align: {name} must hold at least one sample (S >= 1)")
    if noise_seed is not None:
        if quadratic_noise is not None:
            raise RuntimeError("align: give either quadratic_noise or noise_seed, not both")
        if noise_seed.dtype != torch.long:
            raise RuntimeError(f"align: noise_seed must be an int64 tensor, got {noise_seed.dtype}")
    if dropout_mask is not None and tuple(dropout_mask.shape) != (2, G, N, h):
        raise RuntimeError(f"align: dropout_mask must have shape [2, {G}, {N}, {h}], got {tuple(dropout_mask.shape)}")


INPUT_NAMES = ("x", "w_root1", "w_rel1", "bias1", "w_root2", "w_rel2", "bias2", "unary_noise", "quadratic_noise",
               "dropout_mask")


def _check_values(tensors, names, limit: float, what: str) -> torch.Tensor:
    """``align_check_values``: every entry of the tensors finite and at most ``limit`` in magnitude, or raise naming
    the user's argument: ``"align: <name> contains NaN or Inf"`` for an input (``what`` empty), else the
    features described by ``what`` overflowed (finite inputs still can: the GraphConv layers multiply x by the
    weights, the scores square the features' norms), named by the arguments that set their scale. Returns a
    zero in the first tensor's dtype."""
    first = next(t for t in tensors if t is not None)
    named = [(n, t) for n, t in zip(names, tensors) if t is not None and t.numel() and is_concrete(t)]
    if not named:
        return first.new_zeros(())

    def magnitude(t):  # the largest |entry|, NaN for a NaN entry, without a temporary of t's size
        lo, hi = torch.aminmax(t)
        return torch.maximum(-lo, hi).double()

    # one device->host sync for all the tensors
    for (name, t), largest in zip(named, torch.stack([magnitude(t) for _, t in named]).tolist()):
        if math.isfinite(largest) and largest <= limit:
            continue
        if not what:
            raise RuntimeError(f"align: {name} contains NaN or Inf")
        dtype = str(t.dtype).removeprefix("torch.")
        if math.isfinite(largest):
            what = (f"{what} reach |h| = {largest:.3g}; beyond {limit:.3g} the alignment's squared norms overflow "
                    f"{dtype}")
        else:
            what = f"{what} overflow {dtype} (NaN or Inf from finite inputs)"
        raise RuntimeError(f"align: {what}: x or the GraphConv weights (w_root1, w_rel1, bias1, w_root2, w_rel2, "
                           "bias2) are too large; scale them down (without biases the loss does not depend on the "
                           "scale of x)")
    return first.new_zeros(())


def checked(t: torch.Tensor, tensors, names, limit: float = math.inf, what: str = "") -> torch.Tensor:
    """``t`` after the value checks of ``tensors`` (:func:`_check_values`), run by the op ``align_check_values``: so
    they run where the values are -- eagerly, and at run time inside a ``torch.compile``'d graph, whose traced
    Python sees none. ``t`` plus the op's zero output keeps the op in the graph and runs it before the ops that
    ``t`` feeds, which would otherwise meet the bad values first and name their own arguments."""
    return t + torch.ops.exgramed.align_check_values([None if v is None else v.detach() for v in tensors],
                                                     list(names), limit, what)


def feature_limit(h: torch.Tensor, edge_floor: float) -> float:
    """The largest feature magnitude whose scores stay finite in h's dtype: the squared node norms, the cross Gram
    (``<= |h|^2``), its second differences in ``pair_scores`` and the squared edge lengths (``<= 4 |h|^2``) with
    the edge floor's ``edge_floor^2 r^2``, for node norms up to ``sqrt(h_dim)`` times the largest entry."""
    return (torch.finfo(h.dtype).max / (max(1, int(h.shape[-1])) * (4.0 + edge_floor ** 2))) ** 0.5


def inverse_edge_lengths(h: torch.Tensor, nbr: torch.Tensor, edge_floor: float = 0.0) -> torch.Tensor:
    """``1 / max(|h_i - h_j|, 1e-12)`` per kNN edge (F.normalize's convention): ``[G, N, h], [G, N, k] ->
    [G, N k]`` in h's dtype, the squared lengths from ``edge_sq_norms`` (the differences themselves, float64
    sums: no cancellation, O(N k h)).

    ``edge_floor`` > 0: ``1 / sqrt(|h_i - h_j|^2 + (edge_floor * r)^2)`` with r the graph's RMS node
    norm (no gradient through r). Edges much shorter than ``edge_floor * r`` then have edge features
    shorter than 1 instead of unit directions amplified by ``1 / |h_i - h_j|``: the gradient through
    the edge normalisation is bounded by ``1 / (edge_floor r)``, whatever the batch's spread.
    """
    d2 = torch.ops.exgramed.edge_sq_norms(h, nbr)
    if edge_floor > 0:
        r2 = h.detach().square().sum(-1).mean(1, keepdim=True)
        return (d2 + edge_floor ** 2 * r2).clamp_min(1e-24).rsqrt()
    return d2.clamp_min(1e-24).rsqrt()


def _take(t: torch.Tensor, idx) -> torch.Tensor:
    """``t[idx]`` along dim 0 for a list of indices, as ``index_select``: its backward is one ``index_add_``,
    where advanced indexing's is an accumulating ``index_put_`` (several times slower at align's sizes).
    Symbolic indices (dynamic shapes) keep plain indexing."""
    if all(type(v) is int for v in idx):
        return t.index_select(0, torch.tensor(idx, dtype=torch.long, device=t.device))
    return t[idx]


def _take_by_product(t: torch.Tensor, idx) -> torch.Tensor:
    """``t[idx]`` along dim 0 as the product of a one-hot ``[len(idx), G]`` selector with ``t``: exact for
    finite ``t`` (one term per output is non-zero), and its backward is the transposed product, a GEMM
    that takes a gradient of any layout, where ``index_select``'s is an ``index_add``."""
    rows = torch.arange(t.shape[0], device=t.device)
    sel = torch.stack([rows == v for v in idx]).to(t.dtype)
    return torch.mm(sel, t.flatten(1)).view(len(idx), *t.shape[1:])


def _cross_cosines(hn: torch.Tensor, src, dst) -> torch.Tensor:
    """``hn[src[p]] hn[dst[p]]^T`` for every problem p: ``[G, N, h] -> [P, N, N]``.

    One GEMM per unordered pair of graphs: a problem and its reverse (both directions in either mode)
    and the S noise samples of a problem share it, transposed or repeated -- half the GEMMs (and of
    their backward) of one per problem.

    The right operand is gathered by :func:`_take_by_product`, whose backward is a GEMM: the gradient
    of a gathered-then-transposed operand is a transposed tensor, and ``index_select``'s backward
    (an ``index_add`` of it) is what Inductor's C++ backend of torch 2.11 to 2.13 compiles wrongly
    on two or more threads (pytorch/pytorch#191837: a tiled transposed load feeding a vectorised
    atomic add that applies the inner loop offset twice, writing past the gradient buffer -- heap
    corruption, an abort, and wrong gradients).
    """
    if not all(type(v) is int for v in (*src, *dst)):  # symbolic K (dynamic shapes): one GEMM per problem
        return torch.bmm(_take(hn, src), _take_by_product(hn, dst).transpose(1, 2))
    first = {}
    for a, b in zip(src, dst):
        if (a, b) not in first and (b, a) not in first:
            first[(a, b)] = len(first)
    keys = list(first)
    base = torch.bmm(_take(hn, [a for a, _ in keys]), _take_by_product(hn, [b for _, b in keys]).transpose(1, 2))
    if len(keys) == len(src):
        return base
    return torch.stack([base[first[(a, b)]] if (a, b) in first else base[first[(b, a)]].transpose(0, 1)
                        for a, b in zip(src, dst)])


def node_features(graphs, weights, dropout_masks, k, metric, aggr, reverse, dtype):
    """kNN graphs and the two GraphConv layers (ReLU, optional dropout masks) of ``align``.

    graphs: ``[G, N, d]``; weights: ``(w_root1, w_rel1, bias1, w_root2, w_rel2, bias2)``;
    dropout_masks: ``None`` or the two layers' masks ``[2, G, N, h]``. Returns ``(h [G, N, h], nbr)``.
    Graphs are independent through both stages, so any subset gives those graphs' features.
    """
    w_root1, w_rel1, bias1, w_root2, w_rel2, bias2 = weights
    nbr = torch.ops.exgramed.knn_graph(graphs.detach(), k, metric)
    h = graphs
    for layer, (w_root, w_rel, bias) in enumerate(((w_root1, w_rel1, bias1), (w_root2, w_rel2, bias2))):
        h = torch.ops.exgramed.graph_conv(h, nbr, w_root.to(dtype), w_rel.to(dtype),
                                          None if bias is None else bias.to(dtype), aggr, reverse, True)
        if dropout_masks is not None:
            h = h * dropout_masks[layer].to(dtype)
        if layer == 0:  # the second layer's are checked by the caller, against the scores' limit
            h = checked(h, [h], ["h"], torch.finfo(h.dtype).max, "the features of GraphConv layer 1")
    return h, nbr


def problem_scores(h, nbr, src, dst, copy_structure, quadratic_noise=None, noise_scale=0.0, noise_seed=None,
                   edge_floor=0.0):
    """Scores of the problems graph ``src[p]`` -> graph ``dst[p]``:
    unary ``cos(h1_i, h2_a) - 0.5`` ``[P, N, N]`` (noise-free) and quadratic
    ``0.5 (<e1, e2> + s g' - 0.5)`` ``[P, Nk, Nk]`` (``pair_scores``; ``g'`` the given
    ``quadratic_noise [P, Nk, Nk]``, or the in-kernel Gumbel sample of the problems' ``noise_seed [P]``, or
    none), with the problems' neighbour tables ``(U, Q, nbr1, nbr2)``. ``edge_floor``: see
    :func:`inverse_edge_lengths`."""
    norms = h.norm(dim=-1)  # [G, N]
    hn = h / norms.clamp_min(1e-12).unsqueeze(-1)  # F.normalize
    nbr1 = _take(nbr, src)
    nbr2 = nbr1 if copy_structure else _take(nbr, dst)
    cos = _cross_cosines(hn, src, dst)
    U = cos - 0.5
    # Edge lengths once per graph (each graph sits in several problems); with copied structure,
    # graph 2's edges follow graph 1's table, so its lengths are per problem.
    w = inverse_edge_lengths(h, nbr, edge_floor)
    w2 = inverse_edge_lengths(_take(h, dst), nbr2, edge_floor) if copy_structure else _take(w, dst)
    # The cross Gram h1 h2^T from the cosines and the norms: no second [P, N, N, h] GEMM (nor its
    # two in the backward); the same float32 rounding class as the direct product.
    C = cos * _take(norms, src).unsqueeze(2) * _take(norms, dst).unsqueeze(1)
    Q = torch.ops.exgramed.pair_scores(C, _take(w, src), w2, nbr1, nbr2, 0.5, -0.25,
                                       quadratic_noise, 0.5 * noise_scale, noise_seed)
    return U, Q, nbr1, nbr2


def hamming_to_identity(Z, dtype):
    """Per-problem Hamming loss against the identity T: ``sum(Z (1 - T) + (1 - Z) T) / N``
    ``= (sum Z - 2 tr Z + N) / N``; Z ``[P, N, N]`` -> ``[P]``."""
    N = Z.shape[-1]
    Zf = Z.to(dtype)
    return (Zf.sum((1, 2)) - 2 * Zf.diagonal(dim1=1, dim2=2).sum(1) + N) / N


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient (dense or sparse) by ``scale``."""

    @staticmethod
    def forward(ctx, t, scale):
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _problem_rows(t, s_of, p_of, S, P, everything):
    """Rows ``(s, p)`` of a per-sample, per-problem input ``[S, P | 1, ...]``: ``[J, ...]`` for the problems
    ``j = s P + p`` (all of them, in order, when ``everything``)."""
    if t is None:
        return None
    if everything:
        return t.expand(S, P, *t.shape[2:]).reshape(S * P, *t.shape[2:])
    return t[s_of, p_of if t.shape[1] == P else [0] * len(p_of)]


def align_problems(x, weights, unary_noise, quadratic_noise, dropout_mask, noise_seed, cfg: AlignConfig,
                   problems=None, grad_scale: float = 1.0):
    """The alignment pipeline on the flat problems ``problems`` (``j = s P + p``; default: all ``S P``).

    Builds the graphs those problems touch (kNN, two GraphConv layers), their scores, and solves them in
    one batched ``qap_solve``. Inputs as :func:`align`, already checked, x in the compute dtype.
    ``grad_scale`` multiplies the scores' gradients after the solver (the global-batch convention).

    Returns ``(sum_{j in problems} hamming_j / (S P), Z [len(problems), N, N])``: with all problems, the loss
    of :func:`align`; over a partition of the problems, the parts sum to it.
    """
    K, N, _ = x.shape
    dtype = x.dtype
    src, dst = problem_graphs(K, cfg.mode)
    P = len(src)
    S = num_samples(unary_noise, quadratic_noise, noise_seed)
    everything = problems is None
    jobs = list(range(S * P)) if everything else list(problems)
    s_of, p_of = [j // P for j in jobs], [j % P for j in jobs]
    x = checked(x, [x, *weights, unary_noise, quadratic_noise, dropout_mask], INPUT_NAMES)
    graphs = torch.cat([x, x.mean(0, keepdim=True)]) if cfg.mode == "barycenter" else x
    if cfg.mode == "barycenter":
        graphs = checked(graphs, [graphs[K:]], ["h"], torch.finfo(dtype).max,
                         "the barycenter graph's features (the mean of x)")
    masks = dropout_mask
    a, b = [src[p] for p in p_of], [dst[p] for p in p_of]
    if not everything:  # only the graphs these problems touch: graphs are independent through kNN and GraphConv
        needed = sorted(set(a) | set(b))
        slot = {g: i for i, g in enumerate(needed)}
        a, b = [slot[g] for g in a], [slot[g] for g in b]
        graphs = _take(graphs, needed)
        masks = None if dropout_mask is None else dropout_mask[:, needed]
    h, nbr = node_features(graphs, weights, masks, cfg.k, cfg.metric, cfg.aggr, cfg.reverse, dtype)
    h = checked(h, [h], ["h"], feature_limit(h, cfg.edge_floor), "the node features")
    qn = _problem_rows(quadratic_noise, s_of, p_of, S, P, everything)
    seeds = _problem_rows(noise_seed, s_of, p_of, S, P, everything)
    U, Q, nbr1, nbr2 = problem_scores(h, nbr, a, b, cfg.copy_structure, None if qn is None else qn.to(dtype),
                                      cfg.noise_scale, seeds, cfg.edge_floor)
    if unary_noise is not None:
        U = torch.add(U, _problem_rows(unary_noise, s_of, p_of, S, P, everything).to(dtype), alpha=cfg.noise_scale)
    if grad_scale != 1.0:
        U, Q = _ScaleGrad.apply(U, grad_scale), _ScaleGrad.apply(Q, grad_scale)
    # Q comes from pair_scores (or _ScaleGrad, which passes sparse gradients on): its backward takes the
    # solver's sparse dL/dQ.
    Z, _ = torch.ops.exgramed.qap_solve(U, nbr1, nbr2, Q, None, None, cfg.solver, cfg.max_iter, cfg.tol,
                                        cfg.restarts, cfg.partial, cfg.seed, cfg.estimator, cfg.lambda_, None, True)
    return hamming_to_identity(Z, dtype).sum() / (S * P), Z


def autocast_off(device_type: str):
    """A context with autocast off on ``device_type``; nothing to turn off on a device without autocast (the
    meta device, where ``torch.autocast`` raises)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _align_impl(x, w_root1, w_rel1, bias1, w_root2, w_rel2, bias2, unary_noise=None, quadratic_noise=None,
                dropout_mask=None, noise_seed=None, *args, **kwargs):
    cfg = DEFAULTS.replace(**dict(zip(OP_FIELDS, args)), **kwargs)
    weights = (w_root1, w_rel1, bias1, w_root2, w_rel2, bias2)
    check_align_inputs(x, weights, unary_noise, quadratic_noise, dropout_mask, noise_seed, cfg)
    dtype = compute_dtype(x.dtype)  # whatever the input or autocast would pick
    with autocast_off(x.device.type):
        return align_problems(x.to(dtype), weights, unary_noise, quadratic_noise, dropout_mask, noise_seed, cfg)


def _schema() -> str:
    """``align``'s schema, its option defaults taken from :data:`~exgramed_kernels.config.DEFAULTS`."""
    def default(v):
        if isinstance(v, str):
            return f"'{v}'"
        return repr(v)

    types = {int: "int", float: "float", str: "str", bool: "bool"}
    options = ", ".join(f"{types[type(getattr(DEFAULTS, n))]} {n}={default(getattr(DEFAULTS, n))}" for n in OP_FIELDS)
    return ("align(Tensor x, Tensor w_root1, Tensor w_rel1, Tensor? bias1, Tensor w_root2, Tensor w_rel2, "
            "Tensor? bias2, Tensor? unary_noise=None, Tensor? quadratic_noise=None, Tensor? dropout_mask=None, "
            f"Tensor? noise_seed=None, {options}) -> (Tensor, Tensor)")


_LIB = torch.library.Library("exgramed", "FRAGMENT")
_LIB.define(_schema())
_LIB.impl("align", _align_impl, "CompositeImplicitAutograd")
_LIB.define("align_check_values(Tensor?[] tensors, str[] names, float limit, str what) -> Tensor")
_LIB.impl("align_check_values", _check_values, "CompositeExplicitAutograd")


@torch.library.register_fake("exgramed::align_check_values")
def _check_values_fake(tensors, names, limit, what):
    return next(t for t in tensors if t is not None).new_zeros(())


def align(x: torch.Tensor, w_root1: torch.Tensor, w_rel1: torch.Tensor, bias1: torch.Tensor | None,
          w_root2: torch.Tensor, w_rel2: torch.Tensor, bias2: torch.Tensor | None,
          unary_noise: torch.Tensor | None = None, quadratic_noise: torch.Tensor | None = None,
          dropout_mask: torch.Tensor | None = None, noise_seed: torch.Tensor | None = None, *,
          config: AlignConfig | None = None, **options) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Multi-graph alignment loss of K modality embeddings of the same B samples (ExGra-Med).

    Computation (``torch.ops.exgramed.align``; deterministic given its inputs and noise tensors):

    1. graphs: the K modalities ``x[k]`` plus, in ``mode="barycenter"``, the barycenter
       ``mean_k x[k]`` (G = K + 1 graphs; G = K in ``mode="pairwise"``);
    2. ``nbr = knn_graph(graphs, k, metric)`` (no gradient through the graph structure);
    3. two GraphConv layers with ReLU on all G graphs in one batched call each,
       ``h' = relu(h W_root + AGG_{j in nbr(i)} h_j W_rel + b)`` (``reverse=True``: over in-neighbours),
       each followed by ``* dropout_mask[layer]`` when given;
    4. problems ``src[p] -> dst[p]`` (:func:`problem_graphs`): all k -> barycenter and barycenter -> k
       (P = 2K), or all pairs in both directions (P = K(K-1));
       unary ``U_ia = cos(h1_i, h2_a) + s g_ia - 0.5``,
       quadratic ``Q_ef = 0.5 (<e1_e, e2_f> + s g'_ef - 0.5)`` (``pair_scores``) with
       ``e_ij = (h_i - h_j) / sqrt(|h_i - h_j|^2 + (edge_floor r)^2)`` on the kNN edges of each graph
       (``copy_structure=True``: graph 2 uses graph 1's edge list), ``s = noise_scale``, ``g, g'`` the
       given standard Gumbel samples;
    5. ``Z = qap_solve(U, nbr1, nbr2, Q, ...)`` for the ``S * P`` problems in one batched call
       (maximisation; ``partial=True`` allows unmatched nodes); its backward is the estimator
       (``imle``, ``blackbox``, ``imle_symmetric``, step ``lambda_``; ``qap_solve.py``);
    6. ``loss`` = mean over problems of the Hamming loss ``sum(Z (1 - I) + (1 - Z) I) / B``.

    Args:
        x: ``[K, B, d]`` float (K >= 2; bf16/fp16 are computed in fp32); may require grad.
        w_root1, w_rel1: ``[d, h]``; w_root2, w_rel2: ``[h, h]``; bias1, bias2: ``[h]`` or None.
        unary_noise: ``[S, P, B, B]`` or ``[S, 1, B, B]`` (shared by the problems) standard Gumbel,
            or None (no unary noise). S samples are solved as S perturbed copies of each problem.
        quadratic_noise: ``[S, P, Bk, Bk]`` or ``[S, 1, Bk, Bk]``, or None.
        dropout_mask: ``[2, G, B, h]`` multipliers after each layer (already scaled by 1/(1-p)), or None.
        noise_seed: instead of ``quadratic_noise``, int64 ``[S, P]`` (or ``[S, 1]``) on x's device: the
            quadratic noise of problem p of sample s is then the standard Gumbel sample generated inside
            ``pair_scores`` from seed ``noise_seed[s, p]``; the ``[S P, Bk, Bk]`` noise tensor is never
            sampled or stored. What :class:`MultiGraphAlignment` uses (seeds drawn from torch's generator).
        config, options: the options (:class:`~exgramed_kernels.config.AlignConfig`: k, metric, mode, aggr,
            reverse, copy_structure, edge_floor, noise_scale, solver, max_iter, tol, restarts, seed,
            partial, estimator, lambda_), ``config`` (default :data:`~exgramed_kernels.config.DEFAULTS`)
            with ``options`` replacing some of them. The module-only options (samples, shared_noise,
            quadratic_noise, dropout) are ignored here: the noise and mask tensors carry them.

    Returns:
        ``(loss, Z)``: scalar loss (fp32, fp64 for fp64 x) and the matchings ``[S * P, B, B]``
        (problem ``p`` of sample ``s`` at row ``s * P + p``).
    """
    cfg = (DEFAULTS if config is None else config).replace(**options)
    return torch.ops.exgramed.align(x, w_root1, w_rel1, bias1, w_root2, w_rel2, bias2, unary_noise, quadratic_noise,
                                    dropout_mask, noise_seed, **cfg.op_options())
