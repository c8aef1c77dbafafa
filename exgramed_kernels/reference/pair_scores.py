"""Reference ``pair_scores``: the edge-pair scores of ``align`` and their counter-based Gumbel noise.

    Q[p, e, f] = alpha * w1[p, e] * w2[p, f] * (C_ia - C_ib - C_ja + C_jb) + beta + noise_scale * n[p, e, f]

for edge ``e = i * k + s = (i, j = nbr1[p, i, s])`` and ``f = a * k + t = (a, b = nbr2[p, a, t])``.
The noise n is a given tensor, or the standard Gumbel sample :func:`gumbel_noise` of ``noise_seed``
(one seed per problem: a problem's noise depends on its own seed only, not on its row in the batch).
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


def splitmix64(s: int) -> tuple[int, int]:
    """One splitmix64 step on Python ints: (new state, output)."""
    s = (s + 0x9E3779B97F4A7C15) & _M64
    z = s
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return s, z ^ (z >> 31)


def noise_row_keys(seed: int, row: int) -> tuple[int, int]:
    """The two 32-bit keys of row ``e`` of the noise of a problem with seed ``seed`` (``noise_row_keys`` of
    csrc/pair_scores.h)."""
    s, z = splitmix64(seed & _M64)
    s = z ^ ((row * 0xD1B54A32D192ED03) & _M64)
    _, z = splitmix64(s)
    return z & _M32, z >> 32


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2^32`` for int64 x in [0, 2^32), without int64 overflow (16-bit halves of c)."""
    lo = (x * (c & 0xFFFF)) & _M32
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seeds, Nk: int) -> torch.Tensor:
    """The in-kernel noise of ``pair_scores`` for problems with seeds ``seeds`` (ints or an int64 tensor
    ``[P]``): ``[P, Nk, Nk]`` float64 standard Gumbel samples, ``-log(-log(u))`` with
    ``u = ((hash32(hash32(f ^ lo) ^ hi) >> 8) | 1) / 2^24`` and ``(lo, hi)`` the keys of row e of the
    problem's seed: exact in float32 and never 0 or 1 (the samples lie in [-2.82, 16.64])."""
    seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
    f = torch.arange(Nk, dtype=torch.int64)
    out = torch.empty(len(seeds), Nk, Nk, dtype=torch.float64)
    for p, seed in enumerate(seeds):
        for e in range(Nk):
            lo, hi = noise_row_keys(seed, e)
            x = hash32(hash32(f ^ lo) ^ hi)
            u = ((x >> 8) | 1).double() / 16777216.0
            out[p, e] = -torch.log(-torch.log(u))
    return out


def pair_scores(C, w1, w2, nbr1, nbr2, alpha=1.0, beta=0.0, noise=None, noise_scale=0.0, noise_seed=None):
    """Dense reference (gathers), in C's dtype."""
    P, N, k = nbr1.shape
    Nk = N * k
    heads = torch.arange(N, device=C.device).repeat_interleave(k)
    t1, t2 = nbr1.reshape(P, Nk), nbr2.reshape(P, Nk)

    def pair(rows, cols):  # C[p, rows[p, e], cols[p, f]]
        R = torch.gather(C, 1, rows.unsqueeze(2).expand(P, Nk, N))
        return torch.gather(R, 2, cols.unsqueeze(1).expand(P, Nk, Nk))

    h1, h2 = heads.expand(P, Nk), heads.expand(P, Nk)
    inner = pair(h1, h2) - pair(h1, t2) - pair(t1, h2) + pair(t1, t2)
    Q = alpha * w1.unsqueeze(2) * w2.unsqueeze(1) * inner + beta
    if noise is not None:
        Q = Q + noise_scale * noise.to(Q.dtype)
    elif noise_seed is not None:
        Q = Q + noise_scale * gumbel_noise(noise_seed, Nk).to(device=Q.device, dtype=Q.dtype)
    return Q
