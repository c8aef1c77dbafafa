"""The LLaVA model: image tokens, patch replacement, pooling, projectors, save/load, open_clip tower."""
import json

import pytest
import torch

from exgramed_train.data import IM_END, IM_PATCH, IM_START, ImageTextDataset, collate, load_records
from exgramed_train.make_demo import ASSETS
from exgramed_train.model import LlavaMed, ModelSpec, build_projector, pool


@pytest.fixture(scope="module")
def model(spec):
    return LlavaMed(spec)


def _batch(model, n=4, need_long=False):
    s = load_records(ASSETS / ("stage2.json" if need_long else "stage1.json"), ASSETS / "images", model.tokenizer,
                     model.num_patches, 160, need_long=need_long)[:n]
    ds = ImageTextDataset(s, ASSETS / "images", model.vision.preprocess)
    return collate([ds[i] for i in range(n)], model.tokenizer.pad_token_id)


def test_image_tokens_added_with_mean_rows(model, tiny):
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny["llm"])
    n = base.get_input_embeddings().weight.shape[0]
    assert model.n_base_tokens == n and len(model.tokenizer) == n + 3
    ids = model.tokenizer.convert_tokens_to_ids([IM_PATCH, IM_START, IM_END])
    assert sorted(ids) == [n, n + 1, n + 2]
    for new, old in ((model.lm.get_input_embeddings(), base.get_input_embeddings()),
                     (model.lm.get_output_embeddings(), base.get_output_embeddings())):
        assert torch.equal(new.weight[:n], old.weight)
        assert torch.allclose(new.weight[n:], old.weight.mean(0).expand(3, -1))
    vc = json.loads((ASSETS / "vision_config.json").read_text())
    assert model.num_patches == (vc["image_size"] // vc["patch_size"]) ** 2


def test_patch_rows_are_replaced_by_projected_features(model):
    b = _batch(model, 2)
    img = model.image_embeddings(b["pixel_values"])
    assert img.shape == (2, model.num_patches, model.lm.config.hidden_size)
    emb = model.embed_with_image(b["input_ids"], img)
    for i in range(2):
        pos = (b["input_ids"][i] == model.patch_id).nonzero().flatten()
        assert torch.equal(emb[i, pos], img[i])
        other = b["input_ids"][i] != model.patch_id
        assert torch.equal(emb[i, other], model.lm.get_input_embeddings()(b["input_ids"][i, other]))
    with pytest.raises(ValueError, match="exactly 16 <im_patch>"):
        model.embed_with_image(b["input_ids"][:, :20], img)


def test_pooling_masked_or_official():
    h = torch.tensor([[[1.0], [3.0], [100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(h, mask, official=False).item() == 2.0
    assert pool(h, mask, official=True).item() == pytest.approx(104 / 3)


def test_projectors():
    assert isinstance(build_projector("linear", 4, 6), torch.nn.Linear)
    mlp = build_projector("mlp2x_gelu", 4, 6)
    assert [type(m).__name__ for m in mlp] == ["Linear", "GELU", "Linear"]
    assert mlp(torch.zeros(2, 4)).shape == (2, 6)
    with pytest.raises(ValueError, match="projector"):
        build_projector("mlp3x", 4, 6)


def test_after_de_text_embedding_uses_decoder(spec):
    from dataclasses import replace
    m = LlavaMed(replace(spec, align_text="after_de"))
    ids = torch.tensor([[5, 6, 7, 3]])
    mask = torch.tensor([[1, 1, 1, 0]])
    h = m.lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(m.text_embedding(ids, mask), h[0, :3].mean(0, keepdim=True), atol=1e-6)


def test_save_load_roundtrip(model, tmp_path):
    b = _batch(model, 2)
    with torch.no_grad():
        model.projector[0].weight.add_(0.5)  # make the projector differ from a fresh one
        before = model(b)["ar_loss"]
    model.save(tmp_path / "m")
    loaded = LlavaMed.load(tmp_path / "m")
    with torch.no_grad():
        after = loaded(b)["ar_loss"]
    assert torch.allclose(before, after)
    assert len(loaded.tokenizer) == len(model.tokenizer)
    with pytest.raises(FileNotFoundError, match="not an exgramed model directory"):
        LlavaMed.load(tmp_path)


def test_open_clip_tower_selects_second_to_last_block(tmp_path):
    import open_clip
    from PIL import Image
    from exgramed_train.vision import load_vision
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    cfg_path = tmp_path / "tiny-exgramed-vit.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(cfg_path))
    torch.manual_seed(0)
    ref = open_clip.create_model("tiny-exgramed-vit")
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "ckpt.pt")
    tower = load_vision(str(tmp_path / "ckpt.pt"), "open_clip", str(cfg_path), -2)
    assert tower.num_patches == 16 and tower.hidden_size == 32
    x = tower.preprocess(Image.new("RGB", (40, 40), (120, 30, 200))).unsqueeze(0)
    assert x.shape == (1, 3, 32, 32)
    feats = tower.patch_features(x)
    # by hand: patch embedding, class token, positions, ln_pre, the first L-1 = 2 blocks, class token dropped
    v = ref.visual
    with torch.no_grad():
        h = v.conv1(x).flatten(2).transpose(1, 2)
        h = torch.cat([v.class_embedding.expand(1, 1, -1), h], 1) + v.positional_embedding
        h = v.ln_pre(h)
        for blk in v.transformer.resblocks[:2]:
            h = blk(h)
    assert feats.shape == (1, 16, 32)
    assert torch.allclose(feats, h[:, 1:], atol=1e-5)
    with pytest.raises(ValueError, match="open_clip"):
        load_vision(str(tmp_path / "ckpt.pt"), "open_clip", None)


def test_alignment_loss_and_its_timing(spec):
    from exgramed_train.model import align_seconds
    m = LlavaMed(spec, with_alignment=True)
    b = _batch(m, 5, need_long=True)
    r = m(b, align=True)
    assert r["loss"].item() == pytest.approx(r["ar_loss"].item() + r["align_loss"].item(), rel=1e-6)
    assert r["accuracy"].shape == (3,) and not r["accuracy"].requires_grad
    r["align_loss"].backward()  # the alignment alone
    t = r["align_timing"]
    assert t["bwd_end"] >= t["bwd_start"] and align_seconds(t) >= t["forward"] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.align.parameters())
    assert m.projector[0].weight.grad.abs().sum() > 0  # the alignment reaches the projector
    assert m.lm.model.layers[0].mlp.up_proj.weight.grad is None  # but not the decoder (align_text="embed")


def test_batched_generation_equals_one_by_one(model):
    from exgramed_train.data import prompt_ids
    from exgramed_train.data import load_image
    qs = ["<image>\nHow many nodules are seen?", "<image>\nIs there a nodule in the left lung of this patient?"]
    pix = torch.stack([model.vision.preprocess(load_image(ASSETS / "images" / f)) for f in ("chest_001.png", "ct.dcm")])
    prompts = [prompt_ids(q, model.tokenizer, model.num_patches) for q in qs]
    assert len(prompts[0]) != len(prompts[1])  # left padding is exercised
    batched = model.generate(pix, prompts, max_new_tokens=8)
    single = [model.generate(pix[i:i + 1], prompts[i:i + 1], max_new_tokens=8)[0] for i in range(2)]
    assert batched == single and all(len(t) > 0 for t in batched), batched
