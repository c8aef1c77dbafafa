"""Triton kernels, registered as ``torch.ops.exgramed_triton.*`` with ``torch.library.triton_op``.

Imported on demand only: the package works without triton installed.
"""
from __future__ import annotations

from typing import Any

from torch.library import wrap_triton

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # a triton without the interpreter: no kernel is interpreted
    InterpretedFunction = ()  # type: ignore[assignment,misc]


def launchable(kernel: Any) -> Any:
    """``wrap_triton(kernel)``, or the kernel itself when Triton interprets it (TRITON_INTERPRET=1).

    An interpreted kernel launches eagerly but carries none of the JIT metadata that tracing needs;
    torch >= 2.14's ``wrap_triton`` returns it as it is, torch 2.11-2.13's raises. This does the
    former on every supported torch.
    """
    return kernel if isinstance(kernel, InterpretedFunction) else wrap_triton(kernel)
