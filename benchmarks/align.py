"""align against the official-equivalent ExGra-Med pipeline and the GraphConv GEMM floor.

The official-equivalent pipeline is assembled from peers as the official code runs it: for each of
the 2K problems (k -> barycenter and back), dense L2 kNN of graph 1 with its edges copied to graph 2,
PyG ``GraphConv(aggr="max")`` x2 on both graphs of the problem, the per-edge Python loop of
``build_graph`` for the edge features, dense scores ``cos + s g - 0.5`` and ``0.5 (<e1, e2> + s g' - 0.5)``
(s = 0.05), and one Frank-Wolfe solve per problem whose linear oracle is scipy's
``linear_sum_assignment`` (standing in for LPMP, which cannot be installed; partial matchings, 50
iterations from the barycenter), with a blackbox backward (lambda 80) that re-solves every problem.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

import exgramed_kernels as ek
from exgramed_kernels.align import problem_graphs, problem_scores
from exgramed_kernels.module import sample_gumbel

from .harness import Bench, Case, Provider, feature_dim

K, KNN = 3, 5
OFFICIAL_MAX_B = {"full": 256, "quick": 64, "tiny": 8}


def fw_scipy(U, Q, src1, dst1, src2, dst2, max_iter=50, partial=True):
    """Maximise <U, X> + sum_ef Q[e, f] X[src1 e, src2 f] X[dst1 e, dst2 f]: Frank-Wolfe, scipy LAP oracle."""
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import csr_matrix

    N, Nk = U.shape[0], len(src1)
    S1 = csr_matrix((np.ones(Nk), (np.arange(Nk), dst1)), shape=(Nk, N))
    S2 = csr_matrix((np.ones(Nk), (np.arange(Nk), dst2)), shape=(Nk, N))
    k = Nk // N

    def q(X):
        return float((Q * X[np.ix_(src1, src2)] * X[np.ix_(dst1, dst2)]).sum())

    def grad(X):
        g = (Q * X[np.ix_(dst1, dst2)]).reshape(N, k, N, k).sum((1, 3))
        g += (S1.T @ (S2.T @ (Q * X[np.ix_(src1, src2)]).T).T)
        return U + g

    def vertex(S):
        r, col = linear_sum_assignment(-(np.maximum(S, 0) if partial else S))
        P = np.zeros((N, N))
        P[r, col] = 1
        return P * (S > 0) if partial else P

    X = np.full((N, N), 1.0 / N)
    best, best_f = None, -np.inf
    for _ in range(max_iter):
        g = grad(X)
        P = vertex(g)
        fP = float((U * P).sum()) + q(P)
        if fP > best_f:
            best, best_f = P, fP
        D = P - X
        gap = float((g * D).sum())
        if gap <= 1e-6:
            break
        b = q(D)
        X = X + (min(1.0, -gap / (2 * b)) if b < 0 else 1.0) * D
    return best


def _solve_all(U, Q, edges):
    Z = [fw_scipy(u.double().cpu().numpy(), q.double().cpu().numpy(), *e) for u, q, e in zip(U, Q, edges)]
    return torch.from_numpy(np.stack(Z)).to(U.device, U.dtype)


class _BlackboxGM(torch.autograd.Function):
    """BB-GM's GraphMatchingModule pattern: per-problem solves, blackbox backward."""

    @staticmethod
    def forward(ctx, U, Q, edges, lam):
        Z = _solve_all(U.detach(), Q.detach(), edges)
        ctx.save_for_backward(U, Q, Z)
        ctx.edges, ctx.lam = edges, lam
        return Z

    @staticmethod
    def backward(ctx, gZ):
        U, Q, Z = ctx.saved_tensors
        Zp = _solve_all((U - ctx.lam * gZ).detach(), Q.detach(), ctx.edges)

        def pairs(z, e):  # quadratic matching: z[src1 e, src2 f] z[dst1 e, dst2 f]
            return z[np.ix_(e[0], e[2])] * z[np.ix_(e[1], e[3])]

        dQ = torch.stack([torch.from_numpy(pairs(z.numpy(), e) - pairs(zp.numpy(), e))
                          for z, zp, e in zip(Z.double().cpu(), Zp.double().cpu(), ctx.edges)])
        return (Z - Zp) / ctx.lam, dQ.to(Q.device, Q.dtype) / ctx.lam, None, None


def official_forward(x, convs, un, qn):
    """The official-equivalent pipeline's loss (module docstring); noise ``un [2K, B, B]``, ``qn [2K, Bk, Bk]``."""
    conv1, conv2 = convs
    Kx, B, _ = x.shape
    graphs = list(x) + [x.mean(0)]
    src, dst = problem_graphs(Kx, "barycenter")
    U, Q, edges = [], [], []
    for p in range(len(src)):
        g1, g2 = graphs[src[p]], graphs[dst[p]]
        d2 = torch.cdist(g1.detach(), g1.detach()).square()
        d2.fill_diagonal_(float("inf"))
        ei = torch.stack([torch.arange(B, device=x.device).repeat_interleave(KNN),
                          d2.topk(KNN, largest=False).indices.reshape(-1)])  # dense kNN, copied to graph 2
        h1 = torch.relu(conv2(torch.relu(conv1(g1, ei)), ei))
        h2 = torch.relu(conv2(torch.relu(conv1(g2, ei)), ei))
        feats = []
        for h in (h1, h2):  # build_graph: one Python step per edge
            rows = []
            for e in range(ei.shape[1]):
                i, j = int(ei[0, e]), int(ei[1, e])
                rows.append(h[i] - h[j])
            feats.append(F.normalize(torch.stack(rows), dim=-1))
        U.append(F.normalize(h1, dim=-1) @ F.normalize(h2, dim=-1).T + 0.05 * un[p] - 0.5)
        Q.append(0.5 * (feats[0] @ feats[1].T + 0.05 * qn[p] - 0.5))
        s, d = ei[0].cpu().numpy(), ei[1].cpu().numpy()
        edges.append((s, d, s, d))
    Z = _BlackboxGM.apply(torch.stack(U), torch.stack(Q), edges, 80.0)
    T = torch.eye(B, device=x.device)
    return ((Z * (1 - T) + (1 - Z) * T).sum((1, 2)) / B).mean()


def forward_problems(m, x, noise_seed):
    """The 2K noisy problems of the module's forward (its settings, barycenter mode), without autograd:
    ``(U, Q, nbr1, nbr2)``; the unary noise from torch's generator, the quadratic from ``noise_seed``."""
    o = m.config
    Kx, B, _ = x.shape
    with torch.no_grad():
        graphs = torch.cat([x, x.mean(0, keepdim=True)])
        nbr = torch.ops.exgramed.knn_graph(graphs, o.k, o.metric)
        h = torch.ops.exgramed.graph_conv(graphs, nbr, m.w_root1, m.w_rel1, m.bias1, o.aggr, o.reverse, True)
        h = torch.ops.exgramed.graph_conv(h, nbr, m.w_root2, m.w_rel2, m.bias2, o.aggr, o.reverse, True)
        src, dst = problem_graphs(Kx, "barycenter")
        U, Q, nbr1, nbr2 = problem_scores(h, nbr, src, dst, o.copy_structure, None, o.noise_scale, noise_seed,
                                          o.edge_floor)
        U = U + o.noise_scale * sample_gumbel((len(src), B, B), x.device)
    return U, Q, nbr1, nbr2


def peer_objectives(U, Q, nbr1, nbr2, partial):
    """The official-equivalent solver's matchings (:func:`fw_scipy`) of the problems, their float64 objectives."""
    B = U.shape[1]
    s1 = np.repeat(np.arange(B), nbr1.shape[2])
    Z = torch.stack([torch.from_numpy(fw_scipy(U[p].double().cpu().numpy(), Q[p].double().cpu().numpy(), s1,
                                               nbr1[p].reshape(-1).cpu().numpy(), s1, nbr2[p].reshape(-1).cpu().numpy(),
                                               partial=partial)) for p in range(U.shape[0])])
    return ek.qap_objective(Z.to(U.device), U.double(), nbr1, nbr2, Q.double())


def floor_gemms(x, ws):
    """The GraphConv linear layers alone on the K + 1 graphs (no kNN, aggregation, scores or solver)."""
    g = torch.cat([x, x.mean(0, keepdim=True)])
    h = torch.relu(g @ ws[0] + g @ ws[1])
    return torch.relu(h @ ws[2] + h @ ws[3])


def setup(B, scale, device):
    d = feature_dim(scale, device)
    x = torch.randn(K, B, d, device=device).requires_grad_()
    m = ek.MultiGraphAlignment(d, k=KNN, official=True, dropout=0.0).to(device)
    ws = [p.detach().clone().requires_grad_() for p in (m.w_root1, m.w_rel1, m.w_root2, m.w_rel2)]
    fns = {"ours": lambda: m(x).loss, "floor: GraphConv GEMMs": lambda: floor_gemms(x, ws)}
    skip = {}
    if B > OFFICIAL_MAX_B[scale]:
        skip["official-equivalent"] = f"B <= {OFFICIAL_MAX_B[scale]} only (its cost)"
    else:
        from torch_geometric.nn import GraphConv

        convs = [GraphConv(d, d, aggr="max").to(device) for _ in range(2)]
        un, qn = sample_gumbel((2 * K, B, B), device), sample_gumbel((2 * K, B * KNN, B * KNN), device)

        def official():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return official_forward(x, convs, un, qn)

        fns["official-equivalent"] = official

    def objectives(outputs):  # our forward problems, solved by ours and by the official-equivalent's solver
        U, Q, nbr1, nbr2 = forward_problems(m, x.detach(), torch.randint(0, 2**62, (2 * K,), device=device))
        c = m.config
        Z, _ = ek.qap_solve(U, nbr1, nbr2, Q, method=c.solver, max_iter=c.max_iter, tol=c.tol, restarts=c.restarts,
                            partial=c.partial)
        out = {"ours": ek.qap_objective(Z.double(), U.double(), nbr1, nbr2, Q.double())}
        if "official-equivalent" in outputs:
            out["official-equivalent"] = peer_objectives(U, Q, nbr1, nbr2, c.partial)
        return out

    return Case(fns, info=dict(d=d, K=K, k=KNN), skip=skip, objectives=objectives)


BENCH = Bench(
    op="align",
    description="The whole alignment, K = 3 modalities of B samples, k = 5, h = d, fp32, official settings "
                "(`MultiGraphAlignment(d, official=True, dropout=0)`: L2 kNN, copied structure, reverse aggregation, "
                "partial matchings, Gumbel scale 0.05, one Frank-Wolfe start + 2-opt, blackbox backward); "
                "backward: gradients for x and the GraphConv weights. Official-equivalent: "
                "`benchmarks/align.py`'s `official_forward` (per problem: dense kNN, PyG GraphConv, the per-edge "
                "Python loop of build_graph, dense scores, scipy-LAP Frank-Wolfe; blackbox re-solve), only up to "
                "the B its cost allows. Floor: the GraphConv GEMMs alone. Quality: on our forward's 2K noisy "
                "problems, the official-equivalent solver's objective relative to ours.",
    x="B",
    sizes={"full": [16, 64, 256, 1024], "quick": [16, 64], "tiny": [8]},
    providers=[Provider("ours", "ours"), Provider("official-equivalent", requires=("torch_geometric", "scipy")),
               Provider("floor: GraphConv GEMMs", "floor")],
    setup=setup,
    modes=("forward", "backward", "full"),
)
