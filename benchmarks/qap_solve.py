"""qap_solve against pygmtools RRWM (small N) and scipy's FAQ (Koopmans-Beckmann instances), with quality.

Instances, batches of G = 12, kNN k = 5:

* features: node features H1 ~ N(0, I_32), graph 2 a relabelled noisy copy (H2[pi(i)] = H1[i] + 0.5 eps);
  U = cosine similarity; Q[e, f] = <normalize(h_i - h_j), normalize(h_a - h_b)>, each graph its own kNN;
* Koopmans-Beckmann (KB): U = 0, Q[e, f] = A_e B_f with random positive edge weights: the problem
  ``scipy.optimize.quadratic_assignment(method="faq")`` solves.
"""
from __future__ import annotations

import numpy as np
import torch

import exgramed_kernels as ek
from exgramed_kernels import reference

from .harness import Bench, Case, Provider

G, K = 12, 5
PYGM_MAX_N = 16  # pygmtools' dense affinity is N^2 x N^2 per problem
SINKHORN_MAX_N = 64


def features_instance(N, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    H1 = torch.randn(G, N, 32, generator=gen)
    H2 = torch.empty_like(H1)
    for g in range(G):
        H2[g, torch.randperm(N, generator=gen)] = H1[g] + 0.5 * torch.randn(N, 32, generator=gen)
    n1, n2 = ek.knn_graph(H1, K), ek.knn_graph(H2, K)
    h1, h2 = torch.nn.functional.normalize(H1, dim=-1), torch.nn.functional.normalize(H2, dim=-1)
    U = h1 @ h2.transpose(1, 2)
    Q = reference.implicit_q(H1.double(), H2.double(), n1, n2).float()
    return [t.to(device) for t in (U, n1, n2, Q, H1, H2)]


def kb_instance(N, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    p1, p2 = torch.randn(G, N, 2, generator=gen), torch.randn(G, N, 2, generator=gen)
    n1, n2 = ek.knn_graph(p1, K), ek.knn_graph(p2, K)
    w1, w2 = torch.rand(G, N * K, generator=gen), torch.rand(G, N * K, generator=gen)
    return [t.to(device) for t in (torch.zeros(G, N, N), n1, n2, w1[:, :, None] * w2[:, None, :], w1, w2)]


def lawler(U, n1, n2, Q):
    """pygmtools' dense affinity [G, N^2, N^2] (column-wise vec(X)), symmetrised: x^T K x = f(X)."""
    _, N, k = n1.shape
    Kd = torch.zeros(G, N * N, N * N, device=U.device)
    idx = lambda i, a: (a * N + i).reshape(-1)  # noqa: E731 - vec(X) index of X[i, a]
    ar = torch.arange(N, device=U.device)
    i = ar.repeat_interleave(k)[:, None]  # edge e = (i, j) of graph 1 against edge f = (a, b) of graph 2
    a = ar.repeat_interleave(k)[None, :]
    for g in range(G):
        Kd[g, idx(ar[:, None], ar[None, :]), idx(ar[:, None], ar[None, :])] = U[g].reshape(-1)
        j, b = n1[g].reshape(-1)[:, None], n2[g].reshape(-1)[None, :]
        Kd[g].index_put_((idx(i, a), idx(j, b)), Q[g].reshape(-1), accumulate=True)
    return (Kd + Kd.transpose(1, 2)) / 2


def faq(m1, m2, w1, w2):
    """scipy's FAQ per problem of a KB batch: (permutations, objectives)."""
    from scipy.optimize import quadratic_assignment

    N = m1.shape[1]
    res = []
    for g in range(G):
        A, B = np.zeros((N, N)), np.zeros((N, N))
        A[np.repeat(np.arange(N), K), m1[g].reshape(-1).numpy()] = w1[g].numpy()
        B[np.repeat(np.arange(N), K), m2[g].reshape(-1).numpy()] = w2[g].numpy()
        res.append(quadratic_assignment(A, B, method="faq", options={"maximize": True, "rng": np.random.default_rng(0)}))
    return res


def setup(N, scale, device):
    U, n1, n2, Q, H1, H2 = features_instance(N, N, device)
    U0, m1, m2, Qk, w1, w2 = kb_instance(N, N + 1, device)
    kb_cpu = [t.cpu() for t in (m1, m2, w1, w2)]

    def rrwm():
        import pygmtools as pygm

        pygm.set_backend("pytorch")
        nn = torch.full((G,), N, device=device)
        return pygm.hungarian(pygm.rrwm(Kd, nn, nn))

    fns = {"ours": lambda: ek.qap_solve(U, n1, n2, Q)[0],
           "ours, features H": lambda: ek.qap_solve(U, n1, n2, H1=H1, H2=H2)[0],
           "ours, graduated assignment": lambda: ek.qap_solve(U, n1, n2, Q, method="sinkhorn")[0],
           "pygmtools RRWM": rrwm,
           "ours, KB instances": lambda: ek.qap_solve(U0, m1, m2, Qk)[0],
           "scipy FAQ, KB instances": lambda: faq(*kb_cpu),
           "floor: one LAP of U": lambda: ek.linear_assignment(U)}
    skip = {}
    if N <= PYGM_MAX_N:
        Kd = lawler(U, n1, n2, Q)
    else:
        skip["pygmtools RRWM"] = f"N <= {PYGM_MAX_N} only (dense N^2 x N^2 affinity)"
    if N > SINKHORN_MAX_N:
        skip["ours, graduated assignment"] = f"N <= {SINKHORN_MAX_N} only"

    def objectives(outputs):
        out = {}
        for name, Z in outputs.items():
            if name == "scipy FAQ, KB instances":
                out[name] = torch.tensor([r.fun for r in Z], dtype=torch.float64)
            elif "KB" in name:
                out[name] = ek.qap_objective(Z.double(), U0.double(), m1, m2, Qk.double())
            elif not name.startswith("floor"):
                out[name] = ek.qap_objective(Z.double(), U.double(), n1, n2, Q.double())
        return out

    return Case(fns, info=dict(G=G, k=K), skip=skip, objectives=objectives)


BENCH = Bench(
    op="qap_solve",
    description=f"Batches of G = {G} problems, kNN k = {K}, N nodes, `qap_solve`'s defaults (Frank-Wolfe, size-based "
                "starts, 2-opt). Feature instances (dense Q; `features H`: the same problems through the implicit Q; "
                "`graduated assignment`: `method=\"sinkhorn\"`); pygmtools RRWM (torch backend, dense affinity) on "
                "the same instances, N <= 16. KB: Koopmans-Beckmann instances (U = 0, Q = A (x) B), ours against "
                "scipy's FAQ, ratios against `ours, KB instances`. Floor: one linear assignment of U. Quality: the "
                "provider's objective relative to ours on the same instances (mean), and on how many ours is at "
                "least as good.",
    x="N",
    sizes={"full": [16, 64, 256], "quick": [16, 64], "tiny": [8]},
    providers=[Provider("ours", "ours"), Provider("ours, features H", "ours"),
               Provider("ours, graduated assignment", "ours"),
               Provider("pygmtools RRWM", requires=("pygmtools",)),
               Provider("ours, KB instances", "ours", vs="ours, KB instances"),
               Provider("scipy FAQ, KB instances", devices=("cpu",), requires=("scipy",), vs="ours, KB instances"),
               Provider("floor: one LAP of U", "floor")],
    setup=setup,
)
