"""InfoNCE / SigLIP against hand-computed values; the aux-loss modules, ablations and the model hook."""
import math

import pytest
import torch

from exgramed_train.contrastive import (AUX_LOSSES, InfoNCELoss, NoAuxLoss, SigLIPLoss, build_aux_loss,
                                        info_nce_loss, retrieval_accuracy, siglip_loss)

# a normalises to [[0.6, 0.8], [0, 1]], b to [[1, 0], [0, 1]]: cosines C = [[0.6, 0.8], [0, 1]]
A = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
B = torch.tensor([[1.0, 0.0], [0.0, 5.0]], dtype=torch.float64)


def _lse(*v):
    return math.log(sum(math.exp(t) for t in v))


def test_info_nce_identity_pairs_by_hand():
    # logits = I (scale e^0 = 1): every row and column is -log(e / (e + 1)) = log(1 + e^-1)
    eye = torch.eye(2, dtype=torch.float64)
    assert info_nce_loss(eye, eye, 0.0).item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-12)


def test_info_nce_by_hand():
    # scale 2: logits [[1.2, 1.6], [0, 2]]
    rows = (-1.2 + _lse(1.2, 1.6)) + (-2.0 + _lse(0.0, 2.0))
    cols = (-1.2 + _lse(1.2, 0.0)) + (-2.0 + _lse(1.6, 2.0))
    expected = 0.5 * (rows / 2 + cols / 2)
    assert info_nce_loss(A, B, math.log(2.0)).item() == pytest.approx(expected, rel=1e-12)
    # scale is a tensor (learnable) too, and the loss is symmetric in (a, b)
    assert info_nce_loss(B, A, torch.tensor(math.log(2.0), dtype=torch.float64)).item() == pytest.approx(expected, rel=1e-12)


def test_siglip_by_hand():
    # z = 2 C - 1 = [[0.2, 0.6], [-1, 1]], y = 2 I - 1
    logsig = lambda t: -math.log1p(math.exp(-t))  # noqa: E731
    expected = -(logsig(0.2) + logsig(-0.6) + logsig(1.0) + logsig(1.0)) / 2
    assert siglip_loss(A, B, math.log(2.0), -1.0).item() == pytest.approx(expected, rel=1e-12)


def test_siglip_at_init_values_and_gradients():
    # SigLIP's init (scale 10, bias -10) on orthonormal pairs: z = 10 I - 10 -> diagonal 0, off -10
    eye = torch.eye(3, dtype=torch.float64)
    ls = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    lb = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    loss = siglip_loss(eye, eye, ls, lb)
    expected = (3 * math.log(2.0) + 6 * math.log1p(math.exp(-10.0))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    # dL/db = -1/B sum y (1 - sigmoid(y z)): diagonal terms -1/2 each, off-diagonal +sigmoid(-10) each
    assert lb.grad.item() == pytest.approx((-3 * 0.5 + 6 / (1 + math.exp(10.0))) / 3, rel=1e-10)


def test_gradcheck_both_losses():
    a = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(info_nce_loss, (a, b, s))
    assert torch.autograd.gradcheck(siglip_loss, (a, b, s, t))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="same shape"):
        info_nce_loss(torch.randn(3, 2), torch.randn(4, 2), 0.0)
    with pytest.raises(ValueError, match=r"\[B, d\]"):
        siglip_loss(torch.randn(3), torch.randn(3), 0.0, 0.0)
    with pytest.raises(ValueError, match="empty batch"):
        info_nce_loss(torch.randn(0, 2), torch.randn(0, 2), 0.0)
    with pytest.raises(ValueError, match="floating point"):
        info_nce_loss(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="out of range"):
        InfoNCELoss(text_modalities=(3,))(torch.randn(3, 4, 2))
    with pytest.raises(ValueError, match="aux_loss must be one of"):
        build_aux_loss("clip", 8)


def test_retrieval_accuracy():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.0]])
    # a->b: rows 0, 1 right, row 2 picks b0 or b1 (wrong); b->a: b0 -> a0, b1 -> a1, b2 -> a1 (wrong)
    assert retrieval_accuracy(a, b).tolist() == pytest.approx([2 / 3, 2 / 3])


def test_modules_average_over_text_rows_and_learn_temperature():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 8, requires_grad=True)
    m = InfoNCELoss(text_modalities=(1, 2))
    out = m(x)
    expected = 0.5 * (info_nce_loss(x[0], x[1], math.log(1 / 0.07)) + info_nce_loss(x[0], x[2], math.log(1 / 0.07)))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.accuracy.shape == (4,)
    out.loss.backward()
    assert m.logit_scale.grad is not None and x.grad.abs().sum() > 0
    s = SigLIPLoss()
    assert s(x).loss.item() == pytest.approx(siglip_loss(x[0], x[1], math.log(10.0), -10.0).item(), rel=1e-6)


def test_fixed_temperature_survives_requires_grad():
    x = torch.randn(3, 6, 8)
    for m in (InfoNCELoss(learn_temperature=False), SigLIPLoss(learn_temperature=False)):
        m.requires_grad_(True)  # what the trainer does to the aux module
        x1 = x.clone().requires_grad_(True)
        m(x1).loss.backward()
        assert m.logit_scale.grad is None


def test_no_aux_loss_is_zero_but_connected():
    x = torch.randn(3, 6, 8, requires_grad=True)
    out = NoAuxLoss()(x)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert out.accuracy.shape == (2,)


def test_alignment_variants():
    from exgramed_kernels import MultiGraphAlignment
    plain = build_aux_loss("alignment", 8, None, 3, {"mode": "pairwise"})
    assert type(plain) is MultiGraphAlignment and plain.config.mode == "pairwise"
    torch.manual_seed(0)
    x = torch.randn(3, 8, 8, requires_grad=True)
    noext = build_aux_loss("alignment", 8, None, 3, {"modalities": [0, 1]})
    out = noext(x)
    assert out.accuracy.shape == (2,)  # two graphs (image, raw response) + their barycenter
    nomp = build_aux_loss("alignment", 8, None, 3, {"message_passing": False})
    assert "w_rel1" not in dict(nomp.named_parameters()) and "w_rel1" in nomp.state_dict()
    nomp.requires_grad_(True)
    opt = torch.optim.SGD(nomp.parameters(), lr=0.1)
    loss = nomp(x).loss + sum(p.sum() for p in nomp.parameters())  # every parameter gets a gradient
    loss.backward()
    opt.step()
    assert torch.equal(nomp.w_rel1, torch.zeros(8, 8)) and torch.equal(nomp.w_rel2, torch.zeros(8, 8))
    with pytest.raises(ValueError, match="at least 2"):
        build_aux_loss("alignment", 8, None, 3, {"modalities": [0]})


def test_standardized_alignment_inputs():
    """standardize=true: each modality centred on its batch mean with unit RMS norm, whatever its scale."""
    from exgramed_train.contrastive import parse_aux_options, standardize_nodes
    torch.manual_seed(0)
    x = torch.randn(3, 8, 8) * torch.tensor([30.0, 0.07, 0.05])[:, None, None] + 1.0
    z = standardize_nodes(x)
    assert torch.allclose(z.mean(1), torch.zeros(3, 8), atol=1e-6)
    assert torch.allclose(z.pow(2).sum(-1).mean(-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(standardize_nodes(x * 1e3), z, atol=1e-5)  # scale-free
    assert parse_aux_options("alignment", ["standardize=true"]) == {"standardize": True}
    std = build_aux_loss("alignment", 8, None, 3, {"standardize": True})
    torch.manual_seed(1)
    a = std(x.clone().requires_grad_(True))
    torch.manual_seed(1)
    b = std(z)  # the same problem once standardised: the same noise gives the same matchings
    assert torch.equal(a.Z, b.Z) and a.loss.requires_grad


@pytest.mark.parametrize("kind", AUX_LOSSES)
def test_model_hook_selects_the_aux_loss(spec, kind):
    from dataclasses import replace

    from exgramed_train.model import LlavaMed
    model = LlavaMed(replace(spec, aux_loss=kind), with_alignment=True)
    expected = {"alignment": "MultiGraphAlignment", "infonce": "InfoNCELoss", "siglip": "SigLIPLoss",
                "none": "NoAuxLoss"}[kind]
    assert type(model.align).__name__ == expected
    torch.manual_seed(0)
    d = model.lm.get_input_embeddings().weight.shape[1]
    out = model.align(torch.randn(3, 6, d))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
