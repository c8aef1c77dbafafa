r"""Reference graph matching (quadratic assignment), pure PyTorch, float64.

Objective, maximised over N x N permutation matrices X (partial permutations with
``partial=True``):

    f(X) = sum_ia U_ia X_ia + q(X),   q(X) = sum_{e in E1} sum_{f in E2} Q[e, f] X[s1(e), s2(f)] X[t1(e), t2(f)]

Edge e = i*k + s of graph 1 is (s1, t1) = (i, nbr1[i, s]); edge f = a*k + t of graph 2 is
(a, nbr2[a, t]). Q is dense ``[G, N*k, N*k]`` or implicit from node features:
Q[e, f] = <normalize(H1_i - H1_j), normalize(H2_a - H2_b)> (a zero vector normalises to 0).

Gradient of the quadratic part (q is homogeneous of degree 2, so <grad q(X), X> = 2 q(X)):

    dq/dX[x, y] = sum_{s1(e)=x, s2(f)=y} Q[e,f] X[t1(e), t2(f)] + sum_{t1(e)=x, t2(f)=y} Q[e,f] X[s1(e), s2(f)]

Solver (the same algorithm as the compiled kernels, written for clarity, not speed):
Frank-Wolfe on the (sub-)doubly-stochastic relaxation with the linear assignment of the
gradient as the oracle and an exact line search (f is quadratic along X + t (P - X):
f = f(X) + t <grad f(X), P - X> + t^2 q(P - X)), the best vertex kept, several starts,
and a 2-opt polish of each start's best vertex; or graduated assignment (``sinkhorn``).
"""
from __future__ import annotations

import math

import torch

from .linear_assignment import _lap_min
from .pair_scores import splitmix64
from .qap_gradient import edge_ends, pair_gather, qap_gradient

SINKHORN_INNER = 20  # Sinkhorn normalisation sweeps per temperature
SINKHORN_T_RATIO = 1e-3  # final / initial temperature of the annealing
POLISH_MAX_PASSES = 100


def default_restarts(N: int) -> int:
    """Number of starts when ``restarts=-1``: many for small problems (cheap, and where plain
    Frank-Wolfe most often stops at a poor vertex), few for large ones."""
    if N <= 8:
        return 32
    if N <= 16:
        return 16
    if N <= 32:
        return 8
    if N <= 64:
        return 4
    return 2


def implicit_q(H1: torch.Tensor, H2: torch.Tensor, nbr1: torch.Tensor, nbr2: torch.Tensor) -> torch.Tensor:
    """Dense Q ``[G, N*k, N*k]`` of the implicit (feature) form, from explicit edge vectors."""

    def edge_vectors(H, nbr):
        G, N, k = nbr.shape
        src = H.unsqueeze(2).expand(G, N, k, H.shape[-1])
        tgt = torch.gather(H, 1, nbr.reshape(G, N * k, 1).expand(G, N * k, H.shape[-1])).view(G, N, k, -1)
        d = (src - tgt).reshape(G, N * k, -1)
        n = d.norm(dim=-1, keepdim=True)
        return torch.where(n > 0, d / n.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(d))

    return edge_vectors(H1, nbr1) @ edge_vectors(H2, nbr2).transpose(1, 2)


def quadratic_term(X: torch.Tensor, nbr1: torch.Tensor, nbr2: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """q(X) ``[G]`` for dense Q."""
    if nbr1.shape[2] == 0 or X.shape[1] == 0:
        return X.new_zeros(X.shape[0])
    s1, t1 = edge_ends(nbr1)
    s2, t2 = edge_ends(nbr2)
    return (Q.to(X.dtype) * pair_gather(X, s1, s2) * pair_gather(X, t1, t2)).sum((1, 2))


def qap_objective(Z, U, nbr1, nbr2, Q=None, H1=None, H2=None) -> torch.Tensor:
    """f(Z) ``[G]`` (in float64 when any input is float64, else in U's dtype via float64)."""
    out = (U.double() * Z.double()).sum((1, 2))
    if Q is None and H1 is not None:
        Q = implicit_q(H1.double(), H2.double(), nbr1, nbr2)
    if Q is not None:
        out = out + quadratic_term(Z.double(), nbr1, nbr2, Q.double())
    return out.to(U.dtype)


class _Problem:
    """One problem in float64 with the helpers the solvers need."""

    def __init__(self, U, nbr1, nbr2, Q, partial):
        self.U, self.nbr1, self.nbr2, self.Q, self.partial = U, nbr1, nbr2, Q, partial
        self.N = U.shape[0]

    def grad_q(self, X):
        if self.Q is None:
            return torch.zeros_like(X)
        return qap_gradient(X[None], self.nbr1[None], self.nbr2[None], self.Q[None])[0]

    def q(self, X):
        if self.Q is None:
            return 0.0
        return float(quadratic_term(X[None], self.nbr1[None], self.nbr2[None], self.Q[None])[0])

    def f(self, X):
        return float((self.U * X).sum()) + self.q(X)

    def lap(self, S):
        """Vertex maximising <S, P>: a permutation, or with ``partial`` a partial one
        (max over partial permutations = LAP of max(S, 0) with the non-positive pairs dropped)."""
        N = self.N
        c = S.clamp_min(0) if self.partial else S
        cols = _lap_min(-c)
        P = torch.zeros(N, N, dtype=torch.float64)
        P[torch.arange(N), cols] = 1.0
        if self.partial:
            P = P * (S > 0)
        return P


def _extended_perm(P: torch.Tensor, partial: bool) -> list[int]:
    """Permutation of size N (or 2N with dummies for ``partial``) of a (partial) permutation matrix."""
    N = P.shape[0]
    cols = [int(torch.nonzero(P[i])[0]) if bool(P[i].any()) else -1 for i in range(N)]
    if not partial:
        return cols
    used = set(c for c in cols if c >= 0)
    free_real = [a for a in range(N) if a not in used]
    perm = [c if c >= 0 else N + i for i, c in enumerate(cols)]
    free_dummy = [N + i for i, c in enumerate(cols) if c >= 0]
    return perm + free_real + free_dummy


def _perm_matrix(perm: list[int], N: int) -> torch.Tensor:
    P = torch.zeros(N, N, dtype=torch.float64)
    for i in range(N):
        if 0 <= perm[i] < N:  # -1 (unmatched) and dummies >= N leave the row empty
            P[i, perm[i]] = 1.0
    return P


def _polish(prob: _Problem, P: torch.Tensor) -> tuple[torch.Tensor, float]:
    """2-opt: swap the columns of two rows (dummies included with ``partial``) while it improves."""
    N = prob.N
    perm = _extended_perm(P, prob.partial)
    M = len(perm)
    cur = prob.f(P)
    tol = 1e-12 * max(1.0, abs(cur))
    for _ in range(POLISH_MAX_PASSES):
        improved = False
        for i in range(M):
            for j in range(i + 1, M):
                if perm[i] >= N and perm[j] >= N:
                    continue
                perm[i], perm[j] = perm[j], perm[i]
                val = prob.f(_perm_matrix(perm, N))
                if val > cur + tol:
                    cur, improved = val, True
                else:
                    perm[i], perm[j] = perm[j], perm[i]
        if not improved:
            break
    P = _perm_matrix(perm, N)
    return P, prob.f(P)


def _frank_wolfe(prob: _Problem, X: torch.Tensor, max_iter: int, tol: float, vertex_start: bool = False):
    best_P, best_f = None, -math.inf
    if vertex_start:  # a start at a vertex is a candidate itself (seen first: it wins ties)
        best_P, best_f = X, prob.f(X)
    gq = prob.grad_q(X)
    for _ in range(max_iter):
        g = prob.U + gq
        P = prob.lap(g)
        fP = prob.f(P)
        if fP > best_f:
            best_P, best_f = P, fP
        qX = float((gq * X).sum()) / 2
        fX = float((prob.U * X).sum()) + qX
        gap = float((g * (P - X)).sum())
        if gap <= tol * max(1.0, abs(fX)):
            break
        b = prob.q(P) - float((gq * P).sum()) + qX  # q(P - X)
        t = min(1.0, -gap / (2 * b)) if b < 0 else 1.0
        X = X + t * (P - X)
        gq = prob.grad_q(X)
    P = prob.lap(X)  # the rounding of the last iterate is a candidate too
    fP = prob.f(P)
    if fP > best_f:
        best_P, best_f = P, fP
    return best_P


def _sinkhorn(S: torch.Tensor, partial: bool) -> torch.Tensor:
    N = S.shape[0]
    if partial:  # dummy rows/columns of score 0: a node may stay unmatched
        E = S.new_zeros(2 * N, 2 * N)
        E[:N, :N] = S
        S = E
    for _ in range(SINKHORN_INNER):
        S = S - torch.logsumexp(S, 1, keepdim=True)
        S = S - torch.logsumexp(S, 0, keepdim=True)
    return S.exp()  # [N, N], or [2N, 2N] with the dummies


def _graduated_assignment(prob: _Problem, X: torch.Tensor, max_iter: int, tol: float, t_scale: float = 1.0):
    best_P, best_f = None, -math.inf
    g = prob.U + prob.grad_q(X)
    T0 = float(g.max() - g.min())
    T0 = t_scale * (T0 if T0 > 0 else 1.0)
    for it in range(max_iter):
        T = T0 * SINKHORN_T_RATIO ** (it / max(1, max_iter - 1))
        X_ext = _sinkhorn(g / T, prob.partial)
        X_new = X_ext[: prob.N, : prob.N]
        if prob.partial:  # round the extended matrix: rows whose mass sits on the dummies stay unmatched
            cols = _lap_min(-X_ext)[: prob.N]
            P = torch.zeros_like(X_new)
            real = cols < prob.N
            P[torch.arange(prob.N)[real], cols[real]] = 1.0
        else:
            P = prob.lap(X_new)
        fP = prob.f(P)
        if fP > best_f:
            best_P, best_f = P, fP
        change = float((X_new - X).abs().max())
        X = X_new
        if change <= tol:
            break
        g = prob.U + prob.grad_q(X)
    return best_P


def random_start_perm(seed: int, r: int, N: int) -> list[int]:
    """The permutation of random start r (Fisher-Yates on splitmix64; ``random_start_perm`` of csrc/qap.h):
    keyed by (seed, r) only, so a problem's starts do not depend on its position in the batch."""
    _, z = splitmix64(seed & 0xFFFFFFFFFFFFFFFF)
    s = z ^ ((r * 0x8CB92BA72F3D8DD7) & 0xFFFFFFFFFFFFFFFF)
    perm = list(range(N))
    for i in range(N - 1, 0, -1):
        s, z = splitmix64(s)
        j = z % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def qap_solve(U, nbr1, nbr2, Q=None, H1=None, H2=None, method="fw", max_iter=30, tol=1e-6, restarts=-1,
              partial=False, seed=0, estimator="imle", lambda_=80.0, init=None):
    """Reference solver; same signature and result contract as ``torch.ops.exgramed.qap_solve``.

    Starts: 0 the barycenter J/N (the vertex ``init[g]`` when given), 1 the vertex LAP(U), r >= 2 the midpoint of J/N and a random
    permutation keyed by (seed, r) (:func:`random_start_perm`, the kernels' generator). Returns (Z [G,N,N], obj [G]) in U's dtype.
    """
    G, N, _ = U.shape
    device, dtype = U.device, U.dtype
    Ud = U.detach().double().cpu()
    n1, n2 = nbr1.cpu(), nbr2.cpu()
    if Q is None and H1 is not None:
        Q = implicit_q(H1.detach().double().cpu(), H2.detach().double().cpu(), n1, n2)
    Qd = None if Q is None or nbr1.shape[2] == 0 else Q.detach().double().cpu()
    R = default_restarts(N) if restarts < 0 else max(1, restarts)
    Z = torch.zeros(G, N, N, dtype=torch.float64)
    obj = torch.zeros(G, dtype=torch.float64)
    for g in range(G):
        if N == 0:
            continue
        prob = _Problem(Ud[g], n1[g], n2[g], None if Qd is None else Qd[g], partial)
        if prob.Q is None:
            best = prob.lap(prob.U)
        else:
            best, best_f = None, -math.inf
            for r in range(R):
                if r == 0 and init is not None:
                    X0 = _perm_matrix(init[g].tolist(), N)
                elif r == 0:
                    X0 = torch.full((N, N), 1.0 / N, dtype=torch.float64)
                elif r == 1:
                    X0 = prob.lap(prob.U)
                else:
                    X0 = 0.5 * (torch.full((N, N), 1.0 / N, dtype=torch.float64)
                                + _perm_matrix(random_start_perm(seed, r, N), N))
                if method == "fw":
                    P = _frank_wolfe(prob, X0, max_iter, tol, vertex_start=r == 1 or (r == 0 and init is not None))
                else:  # starts also differ in the initial temperature (annealing forgets a hot start)
                    P = _graduated_assignment(prob, X0, max_iter, tol, 0.5 ** (r % 6))
                P, fP = _polish(prob, P)
                if fP > best_f:
                    best, best_f = P, fP
        Z[g] = best
        obj[g] = prob.f(best)
    return Z.to(device=device, dtype=dtype), obj.to(device=device, dtype=dtype)
