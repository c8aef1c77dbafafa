"""linear_assignment against scipy's linear_sum_assignment, lap's lapjv and torch-linear-assignment (GPU)."""
from __future__ import annotations

import numpy as np
import torch

import exgramed_kernels as ek

from .harness import Bench, Case, Provider

G = 12


def setup(N, scale, device):
    S = torch.rand(G, N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(N)).to(device)
    Sn = S.cpu().numpy()
    neg = -Sn  # lapjv and torch-linear-assignment minimise

    def scipy():
        from scipy.optimize import linear_sum_assignment

        return [linear_sum_assignment(s, maximize=True)[1] for s in Sn]

    def lapjv():
        import lap

        return [lap.lapjv(c, extend_cost=False)[1] for c in neg]

    def tla():
        from torch_linear_assignment import batch_linear_assignment

        return batch_linear_assignment(-S)

    fns = {"ours": lambda: ek.linear_assignment(S), "scipy linear_sum_assignment": scipy, "lap.lapjv": lapjv,
           "torch-linear-assignment": tla, "floor: one pass over the scores": lambda: S.amax(-1)}

    def objectives(outputs):
        out = {}
        for name, cols in outputs.items():
            if not name.startswith("floor"):
                cols = torch.as_tensor(np.stack(cols) if isinstance(cols, list) else cols).to(torch.int64).cpu()
                out[name] = S.cpu().gather(2, cols[:, :, None]).sum((1, 2))
        return out

    return Case(fns, info=dict(G=G), objectives=objectives)


BENCH = Bench(
    op="linear_assignment",
    description=f"Batches of G = {G} dense float64 problems, uniform scores, maximise; the peers loop over the batch "
                "(scipy's shortest augmenting path, lap's LAPJV on the negated scores), torch-linear-assignment "
                "takes the batch on a GPU. Floor: one pass over the scores (row maxima). Quality: the peer's "
                "objective relative to ours (all are exact: 0 up to rounding).",
    x="N",
    sizes={"full": [16, 64, 256, 1024], "quick": [16, 64, 256], "tiny": [16]},
    providers=[Provider("ours", "ours"),
               Provider("scipy linear_sum_assignment", devices=("cpu",), requires=("scipy",)),
               Provider("lap.lapjv", devices=("cpu",), requires=("lap",)),
               Provider("torch-linear-assignment", devices=("cuda",), requires=("torch_linear_assignment",)),
               Provider("floor: one pass over the scores", "floor")],
    setup=setup,
    graph=True,
)
