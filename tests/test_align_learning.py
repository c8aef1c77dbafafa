"""The learning test: gradients estimated through the combinatorial solver carry signal.

Planted problem (exgramed_kernels.planted_align): three modalities are different noisy linear maps
of shared latents; a trainable linear layer per modality is trained with the alignment loss alone.
Cross-modal matching accuracy must go from chance (1/16) to >= 95 %; with the gradient replaced by
zeros it must stay at chance.
"""
import pytest
import torch

from exgramed_kernels.planted_align import run_planted

SETUP = dict(steps=300, B=16, eval_every=100, restarts=4, max_iter=20, noise_scale=0.5, lambda_=80.0)


@pytest.fixture
def one_thread():
    # Tiny GEMMs: one thread is faster than two and immune to the other processes' load.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("seed", [0, 1])
def test_alignment_loss_learns_through_the_solver(one_thread, seed):
    res = run_planted(seed=seed, **SETUP)
    assert res.accuracy[0] < 0.2  # chance is 1/16
    assert res.accuracy[-1] >= 0.95, res.accuracy
    assert res.retrieval[-1] > 3 * res.retrieval[0]


def test_zero_gradient_stays_at_chance(one_thread):
    res = run_planted(seed=0, zero_grad=True, **SETUP)
    assert max(res.accuracy) < 0.2, res.accuracy
    assert max(res.retrieval) < 0.2, res.retrieval
