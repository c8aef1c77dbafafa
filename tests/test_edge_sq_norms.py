"""edge_sq_norms: forward and backward against the float64 reference, errors, opcheck."""
import pytest
import torch

import exgramed_kernels as ek
from exgramed_kernels import reference
from exgramed_kernels.testing import devices, rel_err

DEVICES = devices("edge_sq_norms")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("G, N, k, h", [(1, 1, 1, 1), (2, 7, 3, 5), (3, 13, 5, 33), (1, 4, 4, 0)])
def test_edge_sq_norms_matches_reference(device, dtype, G, N, k, h):
    """Forward and backward against the float64 reference, self loops and repeated neighbours included."""
    gen = torch.Generator().manual_seed(G * 100 + N * 10 + k)
    x = torch.randn(G, N, h, generator=gen, dtype=torch.float64)
    nbr = torch.randint(0, N, (G, N, k), generator=gen)
    g = torch.randn(G, N * k, generator=gen, dtype=torch.float64)
    g[:, ::3] = 0  # zero gradients are skipped by the CPU kernel
    xd = x.to(device, dtype).requires_grad_()
    got = ek.edge_sq_norms(xd, nbr.to(device))
    assert got.dtype == dtype and got.shape == (G, N * k)
    (got.double() * g.to(device)).sum().backward()
    xr = x.to(dtype).double().requires_grad_()  # the reference on the same rounded inputs
    want = reference.edge_sq_norms(xr, nbr)
    (want * g).sum().backward()
    tol = 1e-2 if dtype == torch.bfloat16 else (1e-6 if dtype == torch.float32 else 1e-12)
    assert rel_err(got.detach().double().cpu(), want.detach()) < tol
    assert rel_err(xd.grad.double().cpu(), xr.grad) < tol


@pytest.mark.parametrize("device", DEVICES)
def test_edge_sq_norms_opcheck_and_errors(device):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 5, generator=gen).to(device)
    nbr = torch.randint(0, 6, (2, 6, 3), generator=gen).to(device)
    torch.library.opcheck(torch.ops.exgramed.edge_sq_norms.default, (x.requires_grad_(), nbr))
    torch.library.opcheck(torch.ops.exgramed.edge_sq_norms_backward.default,
                          (torch.randn(2, 18, generator=gen).to(device), x.detach(), nbr))
    with pytest.raises(RuntimeError, match="h must have shape"):
        ek.edge_sq_norms(x[0], nbr)
    with pytest.raises(RuntimeError, match="nbr must be int64"):
        ek.edge_sq_norms(x, nbr.int())
    with pytest.raises(RuntimeError, match="entries must lie in"):
        ek.edge_sq_norms(x, nbr + 6)
    with pytest.raises(RuntimeError, match="floating-point"):
        ek.edge_sq_norms(x.long(), nbr)
    # NaN and Inf are named, as every other op does (they passed through silently).
    for bad in (float("nan"), float("inf"), -float("inf")):
        xb = x.detach().clone()
        xb[1, 2, 3] = bad
        with pytest.raises(RuntimeError, match="edge_sq_norms: h contains NaN or Inf"):
            ek.edge_sq_norms(xb, nbr)


def test_double_backward_raises():
    x = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    nbr = torch.randint(0, 6, (2, 6, 3), generator=torch.Generator().manual_seed(1))
    (g,) = torch.autograd.grad(ek.edge_sq_norms(x, nbr).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="edge_sq_norms_backward: .* is not differentiable"):
        g.sum().backward()
