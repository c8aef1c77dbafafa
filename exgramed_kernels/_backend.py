"""Loading the compiled ops, and the pure-PyTorch fallback when they are absent.

`import exgramed_kernels._C` runs the TORCH_LIBRARY registrations of csrc/ (schemas from
schemas.def, CPU and, when built, CUDA kernels). If the extension cannot be loaded, or
EXGRAMED_NO_EXTENSION=1 is set, the same schemas are defined from schemas.def here and
every op is served by its reference implementation, with one warning.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Callable

import torch

NAMESPACE = "exgramed"
_SCHEMA_FILE = os.path.join(os.path.dirname(__file__), "schemas.def")


def schemas() -> dict[str, str]:
    """Op name -> schema string, as written in schemas.def."""
    out = {}
    with open(_SCHEMA_FILE) as f:
        for line in f:
            m = re.match(r'\s*EXGRAMED_OP\("(.*)"\)\s*$', line)
            if m:
                schema = m.group(1)
                out[schema.split("(", 1)[0]] = schema
    return out


def _load_extension() -> tuple[bool, str | None]:
    if os.environ.get("EXGRAMED_NO_EXTENSION", "").strip().lower() in ("1", "true", "yes", "on"):
        return False, "EXGRAMED_NO_EXTENSION is set"
    try:
        from . import _C  # noqa: F401
    except ImportError as e:  # not built, or built against another torch
        return False, str(e)
    return True, None


HAS_EXTENSION, _LOAD_ERROR = _load_extension()
_LIB = None
if not HAS_EXTENSION:
    warnings.warn(
        "exgramed_kernels: the compiled extension is not available "
        f"({_LOAD_ERROR}); every op runs its pure-PyTorch reference implementation. "
        "Build it with `pip install --no-build-isolation .`.",
        RuntimeWarning,
        stacklevel=2,
    )
    _LIB = torch.library.Library(NAMESPACE, "DEF")
    for _schema in schemas().values():
        _LIB.define(_schema)


def register_fallback(name: str) -> Callable[[Callable], Callable]:
    """Serve op `name` with the decorated reference function when there is no extension."""

    def deco(fn: Callable) -> Callable:
        if not HAS_EXTENSION:
            _LIB.impl(name, fn, "CompositeExplicitAutograd")
        return fn

    return deco


def has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether op `name` has a kernel registered for `dispatch_key` (e.g. "CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", dispatch_key)


def register_no_gradient(name: str, what: str) -> None:
    """Make a gradient requested through op ``name`` raise, naming ``what`` has none (an internal op whose
    derivative is not implemented), instead of PyTorch's silent None or zero."""

    def backward(ctx, *grads):
        raise RuntimeError(f"exgramed::{name}: {what} is not differentiable (no gradient through it is implemented)")

    torch.library.register_autograd(f"{NAMESPACE}::{name}", backward)
