"""Triton kernels, registered as ``torch.ops.exgramed_triton.*`` with ``torch.library.triton_op``.

Imported on demand only: the package works without triton installed.
"""
