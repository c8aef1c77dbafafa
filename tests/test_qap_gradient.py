"""qap_gradient: the CPU/CUDA kernels and the Triton kernel against the float64 reference, errors, opcheck."""
import pytest
import torch

import exgramed_kernels as ek
from exgramed_kernels import reference
from exgramed_kernels.testing import RTOL, devices, rel_err, triton_available
from qap_problems import problem

DEVICES = devices("qap_gradient")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 6, 2), (2, 13, 5), (1, 1, 0), (2, 4, 3), (1, 9, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_kernel_vs_reference(device, shape, dtype):
    G, N, k = shape
    gen = torch.Generator().manual_seed(G * 100 + N * 10 + k)
    _, n1, n2, Q = problem(G, N, k, gen, self_loops=N < 5)
    X = torch.rand(G, N, N, dtype=torch.float64, generator=gen)
    ref = reference.qap_gradient(X, n1, n2, Q)
    out = ek.qap_gradient(X.to(device, dtype), n1.to(device), n2.to(device), Q.to(device, dtype))
    assert out.dtype == dtype and out.shape == X.shape
    if ref.numel():
        assert rel_err(out.cpu(), ref) <= RTOL[dtype]
    X4 = torch.rand(G, 3, N, N, dtype=torch.float64, generator=gen)
    ref4 = torch.stack([reference.qap_gradient(X4[:, r], n1, n2, Q) for r in range(3)], 1)
    out4 = ek.qap_gradient(X4.to(device, dtype), n1.to(device), n2.to(device), Q.to(device, dtype))
    if ref4.numel():
        assert rel_err(out4.cpu(), ref4) <= RTOL[dtype]


@pytest.mark.skipif(not triton_available(), reason="needs triton (GPU, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("shape", [(2, 5, 2), (1, 7, 3)])
def test_gradient_triton_vs_reference(shape):
    G, N, k = shape
    gen = torch.Generator().manual_seed(N)
    _, n1, n2, Q = problem(G, N, k, gen, self_loops=True)
    X = torch.rand(G, N, N, dtype=torch.float64, generator=gen)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ref = reference.qap_gradient(X, n1, n2, Q)
    out = ek.qap_gradient(X.float().to(dev), n1.to(dev), n2.to(dev), Q.float().to(dev), backend="triton")
    assert out.shape == X.shape and out.dtype == torch.float32
    assert rel_err(out.cpu(), ref) <= RTOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_errors_and_opcheck(device):
    gen = torch.Generator().manual_seed(1)
    _, n1, n2, Q = (t.to(device) for t in problem(2, 6, 2, gen, dtype=torch.float32))
    X = torch.rand(2, 6, 6, device=device)
    with pytest.raises(RuntimeError, match=r"Q must have shape \[G, N\*k, N\*k\]"):
        ek.qap_gradient(X, n1, n2, Q[:, :3])
    with pytest.raises(RuntimeError, match=r"nbr1 entries must lie in \[0, 6\)"):
        ek.qap_gradient(X, n1 + 6, n2, Q)
    torch.library.opcheck(torch.ops.exgramed.qap_gradient.default, (X, n1, n2, Q))
    torch.library.opcheck(torch.ops.exgramed.qap_gradient.default, (torch.rand(2, 3, 6, 6, device=device), n1, n2, Q))


@pytest.mark.parametrize("iterates", [False, True])
def test_gradcheck(iterates):
    """qap_gradient is differentiable in X (its Hessian is symmetric: the VJP is qap_gradient itself) and in Q."""
    gen = torch.Generator().manual_seed(3)
    _, n1, n2, Q = problem(2, 5, 2, gen, self_loops=True)
    shape = (2, 3, 5, 5) if iterates else (2, 5, 5)
    X = torch.rand(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    Q = Q.requires_grad_()
    assert torch.autograd.gradcheck(lambda X, Q: ek.qap_gradient(X, n1, n2, Q), (X, Q))
