"""What every test parametrises over: devices, dtypes, tolerances, and backend availability."""
from __future__ import annotations

import torch

from ._backend import has_kernel

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Relative tolerance of a kernel against the float64 reference, per input dtype
# (about twice what plain PyTorch in that dtype loses).
RTOL = {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4, torch.float64: 1e-10}


def devices(op: str | None = None) -> list[str]:
    """CPU, plus CUDA when a GPU is present (and, if `op` is given, its CUDA kernel was built)."""
    out = ["cpu"]
    if torch.cuda.is_available() and (op is None or has_kernel(op, "CUDA")):
        out.append("cuda")
    return out


def triton_available() -> bool:
    """Triton kernels run on a GPU, or on the CPU under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import os

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max(max |ref|, tiny), computed in float64."""
    a, ref = a.double(), ref.double()
    a, ref = a.detach(), ref.detach()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-300)) if ref.numel() else 0.0
