r"""Global-batch alignment across data-parallel ranks (``graph_scope="global"``).

The official ExGra-Med code builds its graphs per device: B_local nodes per graph. Here the graphs
are built over the global batch (B = sum of the ranks' B_r) and the matching problems are shared
out, so no rank solves all of them:

1. ``[K, B_r, d]`` embeddings are all-gathered with autograd (sizes first, then padded to
   ``max_r B_r``, gathered, unpadded: uneven batches and ranks with ``B_r = 0`` work);
2. the kNN graphs and the GraphConv features are computed, on every rank, for the graphs its
   problems touch (in ``barycenter`` mode: the barycenter and the modalities of its problems);
3. the ``S * P`` problems of the step (flat index ``j = s * P + p``, the row order of ``align``'s Z)
   are dealt round-robin, rank r solving ``j % W == r``; its scores, noise and the batched
   ``qap_solve`` cover only those;
4. the partial losses ``l_r = sum_{j in shard r} hamming_j / (S P)`` are summed over the ranks,
   so every rank returns the global loss ``L = sum_r l_r``, the value of the single-process
   ``align`` on the concatenated batch.

Gradient convention (the data-parallel one, as DDP and FSDP expect): for every rank r,

    x_r.grad        = W * dL/dx_r         (dL/dx_r: the single-process gradient of rank r's rows)
    theta.grad (r)  = W * dl_r/dtheta     (the alignment module's own parameters)

and DDP / FSDP, which average parameter gradients over ranks, then hold exactly the
single-process gradient ``dL/dtheta`` for the module's weights and ``dL/dphi`` for every
parameter upstream of x (the encoders that make x_r). This is the same factor W that DDP's
averaged task loss gives its inputs: the task loss of rank r is ``W`` times its share of the
global mean. Without a data-parallel wrapper, average the parameter gradients over ranks
(``all_reduce(SUM) / W``) to get the single-process ones. How: the sum's backward hands every
rank the *mean* of the ranks' incoming gradients, so the solver's estimator (not linear in
``dL/dZ``: it re-solves at ``theta - lambda dL/dZ``) sees the single-process ``dL/dZ``; the factor W
is applied to the scores' gradients after the solver, where everything is linear.

The collectives run on a group of their own (:func:`alignment_group`), apart from DDP's/FSDP's.

Noise: rank 0's default generator (of x's device) is the source. Its state is broadcast; rank 0
draws from the default generator itself and the other ranks from a private generator set to the
same state, each drawing the global noise tensors exactly as the single-process module does (same
shapes, same order). With ``torch.manual_seed(s)`` on rank 0 the step is therefore the step of a
single process seeded with s on the concatenated batch; the other ranks' generators are untouched.

Exactness: the shard runs the pipeline of ``align`` (:func:`~exgramed_kernels.align.align_problems`) on
its problems, and everything a problem's result depends on travels with it -- its graphs, its noise
(the in-kernel quadratic noise is keyed by the problem's own seed) and the solver's starts (keyed by
the seed and the start, not the problem's position in the batch) -- so each rank's matchings are the
single-process ones, with any number of starts.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .align import INPUT_NAMES, align_problems, autocast_off, check_align_inputs, checked, num_samples, problem_graphs
from .checks import compute_dtype
from .config import DEFAULTS, AlignConfig

GRAPH_SCOPES = ("local", "global")


def _group_info(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("global alignment: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group, or use graph_scope='local')")
    return dist.get_world_size(group), dist.get_rank(group)


def shard(num_problems: int, world: int, rank: int) -> list[int]:
    """The flat problem indices rank ``rank`` of ``world`` solves: ``j % world == rank``."""
    return list(range(rank, num_problems, world))


def gather_batch(x: torch.Tensor, group=None) -> tuple[torch.Tensor, list[int]]:
    """All-gather ``[K, B_r, d]`` from every rank into ``[K, sum_r B_r, d]`` (rank order), with autograd.

    The sizes are gathered first; each rank pads to ``max_r B_r`` so the collective sees equal
    shapes, and the padding is cut off again. Backward: the gathered gradient's rows of rank r,
    summed over the W ranks' graphs, come back to rank r (reduce-scatter; all-to-all on gloo).

    Returns ``(x_global, sizes)`` with ``sizes[r] = B_r``.
    """
    if x.dim() != 3:
        raise RuntimeError(f"global alignment: x must have shape [K, B, d] (3 dims), got {tuple(x.shape)}")
    world, _ = _group_info(group)
    meta = torch.tensor([x.shape[0], x.shape[1], x.shape[2]], dtype=torch.int64, device=x.device)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta, group=group)
    metas = [m.tolist() for m in metas]
    for r, (K, _, d) in enumerate(metas):
        if (K, d) != (x.shape[0], x.shape[2]):
            raise RuntimeError(f"global alignment: x must have the same K and d on every rank; this rank has "
                               f"[{x.shape[0]}, {x.shape[1]}, {x.shape[2]}], rank {r} has {metas[r]}")
    sizes = [m[1] for m in metas]
    if max(sizes) == 0:
        return x, sizes
    return _GatherRows.apply(x, sizes, group), sizes


class _GatherRows(torch.autograd.Function):
    """``[K, B_r, d]`` per rank -> ``[K, sum_r B_r, d]``; backward: the gradient of rank r's rows, summed over ranks."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group, ctx.rank = sizes, group, dist.get_rank(group)
        bmax = max(sizes)
        padded = F.pad(x, (0, 0, 0, bmax - x.shape[1])).contiguous()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:, :b] for p, b in zip(parts, sizes)], dim=1)

    @staticmethod
    def backward(ctx, grad):
        sizes, bmax = ctx.sizes, max(ctx.sizes)
        chunks = [F.pad(g, (0, 0, 0, bmax - g.shape[1])).contiguous() for g in grad.split(sizes, dim=1)]
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = torch.empty_like(chunks[0])
            dist.reduce_scatter(out, chunks, group=ctx.group)
        else:  # gloo has no reduce-scatter: all-reduce the (padded) whole, keep our rows
            whole = torch.stack(chunks)
            dist.all_reduce(whole, group=ctx.group)
            out = whole[ctx.rank]
        return out[:, :sizes[ctx.rank]], None, None


class _SumLosses(torch.autograd.Function):
    """Forward: the sum of the ranks' partial losses. Backward: the *mean* of the ranks' incoming gradients.

    The mean, not the sum: the solver's estimator is not linear in the gradient it receives (it
    re-solves at ``theta - lambda * dL/dZ``), so it must see the single-process gradient; the
    factor W of the data-parallel convention is applied after the solver (``align_problems``' ``grad_scale``).
    """

    @staticmethod
    def forward(ctx, part, group):
        ctx.group = group
        total = part.detach().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad / dist.get_world_size(ctx.group), None


def shared_generator(device: torch.device, group=None) -> torch.Generator:
    """The generator every rank draws the global noise from: rank 0's default generator of ``device``.

    Rank 0 returns its default generator; the others a private generator set to rank 0's state
    (one broadcast of the state: 5056 bytes for the CPU Mersenne twister, 16 for CUDA's Philox).
    """
    device = torch.device(device)
    world, rank = _group_info(group)
    if device.type == "cuda":
        default = torch.cuda.default_generators[device.index if device.index is not None else
                                                torch.cuda.current_device()]
    else:
        default = torch.default_generator
    state = default.get_state()
    if world == 1:
        return default
    # The state travels as bytes on the group's device (a CUDA tensor for NCCL).
    buf = state.to(device)
    dist.broadcast(buf, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if rank == 0:
        return default
    gen = torch.Generator(device=device)
    gen.set_state(buf.cpu())
    return gen


def global_align(x: torch.Tensor, w_root1: torch.Tensor, w_rel1: torch.Tensor, bias1: torch.Tensor | None,
                 w_root2: torch.Tensor, w_rel2: torch.Tensor, bias2: torch.Tensor | None,
                 unary_noise: torch.Tensor | None = None, quadratic_noise: torch.Tensor | None = None,
                 dropout_mask: torch.Tensor | None = None, noise_seed: torch.Tensor | None = None, *,
                 config: AlignConfig | None = None, process_group=None,
                 x_global: tuple[torch.Tensor, list[int]] | None = None, **options
                 ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    r""":func:`exgramed_kernels.align` over the global batch of a process group, problems sharded.

    Every rank passes its own rows ``x: [K, B_r, d]`` (``B_r`` may differ, and be 0) and the
    *global* noise inputs (identical on every rank: ``[S, P | 1, B, B]``, ``[S, P | 1, Bk, Bk]`` or the
    seeds ``[S, P | 1]``, dropout ``[2, G, B, h]`` with ``B = sum_r B_r``); the weights are the replicated
    module's. Computes ``align(cat_r x_r, ...)`` (every argument and option as there), with rank r solving
    the problems ``j % W == r`` of the ``S * P`` (module docstring). ``x_global``: an already gathered
    ``(x_global, sizes)`` from :func:`gather_batch` (the module gathers first to size the noise).
    ``process_group``: the ranks whose batches form the global batch (default: WORLD). Under
    DDP/FSDP give a group of its own (``dist.new_group``), not the wrapper's: see
    :func:`alignment_group`.

    Returns:
        ``(loss, Z, problems)``: ``loss`` the global loss (same value on every rank; gradient
        convention in the module docstring: ``W`` times the single-process gradient for this
        rank's rows and this rank's share of the weights' gradient, what DDP/FSDP averaging
        expects), ``Z: [len(problems), B, B]`` this rank's matchings, ``problems`` their flat
        indices ``j = s * P + p`` (rows ``j`` of the single-process Z).
    """
    cfg = (DEFAULTS if config is None else config).replace(**options)
    world, rank = _group_info(process_group)
    xg, sizes = gather_batch(x, process_group) if x_global is None else x_global
    weights = (w_root1, w_rel1, bias1, w_root2, w_rel2, bias2)
    check_align_inputs(xg, weights, unary_noise, quadratic_noise, dropout_mask, noise_seed, cfg)
    K, N, _ = xg.shape
    P = len(problem_graphs(K, cfg.mode)[0])
    jobs = shard(num_samples(unary_noise, quadratic_noise, noise_seed) * P, world, rank)
    dtype = compute_dtype(xg.dtype)
    with autocast_off(xg.device.type):
        if jobs:
            # The estimator gets the single-process dL/dZ (_SumLosses); the scores' gradients get the factor W.
            part, Z = align_problems(xg.to(dtype), weights, unary_noise, quadratic_noise, dropout_mask, noise_seed,
                                     cfg, problems=jobs, grad_scale=float(world))
        else:
            # No problem here (W > S P): a zero that still depends on x and the weights, so this
            # rank joins the gather's backward collective and DDP sees every parameter used.
            # The inputs' value checks still run here, as on the ranks with problems (align_problems').
            xc = checked(xg, [xg, *weights, unary_noise, quadratic_noise, dropout_mask], INPUT_NAMES)
            part = sum(t.sum() for t in (xc, *weights) if t is not None).to(dtype) * 0.0
            Z = torch.zeros(0, N, N, dtype=dtype, device=xg.device)
        loss = _SumLosses.apply(part, process_group)
    return loss, Z, jobs


def alignment_group(module):
    """The group the module's collectives run on: ``module.process_group``, else a private copy of WORLD.

    The gather's and the all-reduce's backward are collectives issued from inside autograd, where
    DDP/FSDP issue their gradient all-reduces too; the order of the two streams can differ between
    ranks (their graphs differ: other shards, empty shards), and collectives of one group must be
    issued in the same order on every rank. A group of our own (its own gloo context / NCCL
    communicator) keeps them apart. Created on the first global call, by every rank (collective).
    """
    if module.process_group is not None:
        return module.process_group
    group = module.__dict__.get("_exgramed_group")
    if group is None:
        world, _ = _group_info(None)
        group = dist.new_group(ranks=list(range(world)))
        module.__dict__["_exgramed_group"] = group
    return group


def check_graph_scope(graph_scope: str) -> None:
    """``graph_scope`` must be ``"local"`` (per-process graphs) or ``"global"`` (graphs over the group's batch)."""
    if graph_scope not in GRAPH_SCOPES:
        raise ValueError(f"MultiGraphAlignment: graph_scope must be 'local' or 'global', got {graph_scope!r}")


__all__ = ["GRAPH_SCOPES", "alignment_group", "gather_batch", "global_align", "shard", "shared_generator"]
