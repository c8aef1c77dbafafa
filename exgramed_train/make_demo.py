"""Generate the embedded demo dataset, tokenizer and tiny model configurations.

Everything under ``exgramed_train/assets/demo`` is produced by this module from
a fixed seed and committed, so the demo needs no network:

* real medical images that ship inside PyPI wheels: scikit-image's retina
  (fundus photograph), microaneurysms (fundus detail) and immunohistochemistry
  (histology) images, pydicom's ``CT_small.dcm`` and ``MR_small.dcm`` (copied
  as DICOM files, so the DICOM reading path is exercised);
* procedurally generated chest radiograph-like images with planted findings
  (number, side and size of round nodules).  Radiological convention: the
  patient's left lung is on the right of the image.

Captions, closed (yes/no) and open questions, answers and extended answers are
written from the planted facts only.  A byte-level BPE tokenizer is trained
with ``tokenizers`` on these texts; tiny LLaMA / CLIP-vision configurations
are written as JSON (the weights are random-initialised at first use, see
:mod:`exgramed_train.tiny`).

Run ``python -m exgramed_train make-demo`` to regenerate (deterministic).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np

from .data import V0_SYSTEM

ASSETS = Path(__file__).resolve().parent / "assets" / "demo"
IMAGE_SIZE = 48  # stored size; the vision tower resizes to its own input size
NUMBERS = {1: "one", 2: "two", 3: "three"}
ZONES = ("upper", "middle", "lower")

REAL_IMAGES = {
    # name: (modality answer, caption, extended caption)
    "retina": ("fundus photography",
               "Fundus photograph of the retina showing the optic disc and the retinal vessels.",
               "This is a colour fundus photograph of the retina. The optic disc is visible and the "
               "retinal vessels, arteries and veins, radiate from the optic disc across the retina."),
    "microaneurysms": ("fundus photography",
                       "Fundus photograph detail with small red dots consistent with microaneurysms.",
                       "This fundus photograph detail shows small red dots. Such dots are consistent with "
                       "microaneurysms, small outpouchings of retinal capillaries seen in diabetic retinopathy."),
    "ihc": ("immunohistochemistry",
            "Histology slide with immunohistochemistry staining of tissue.",
            "This is a histology slide prepared with immunohistochemistry staining. The brown "
            "staining marks the target antigen and the blue counterstain shows the cell nuclei of the tissue."),
    "ct": ("computed tomography",
           "Axial computed tomography slice.",
           "This is an axial computed tomography slice. Computed tomography uses x-ray attenuation, "
           "so dense structures appear bright and air appears dark on this slice."),
    "mr": ("magnetic resonance imaging",
           "Axial magnetic resonance imaging slice.",
           "This is an axial magnetic resonance imaging slice. Magnetic resonance imaging shows "
           "soft tissue contrast without ionising radiation."),
}


def _real_arrays() -> dict:
    """The real images: uint8 RGB arrays, and the paths of the two DICOM files (shipped as they are)."""
    import skimage.data as skd
    from pydicom.data import get_testdata_file

    def gray_to_rgb(a):
        a = a.astype(np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-9) * 255.0
        return np.repeat(a.astype(np.uint8)[..., None], 3, axis=2)

    out = {"retina": skd.retina(), "microaneurysms": gray_to_rgb(skd.microaneurysms()),
           "ihc": skd.immunohistochemistry()}
    for name, fname in (("ct", "CT_small.dcm"), ("mr", "MR_small.dcm")):
        out[name] = get_testdata_file(fname, download=False)  # a path: shipped as DICOM
    return out


def _chest_image(rng: np.random.Generator, count: int, side: str, size: str) -> tuple[np.ndarray, list]:
    """A chest radiograph-like image with ``count`` nodules in one lung, and their zones."""
    n = IMAGE_SIZE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    img = np.full((n, n), 20.0)
    lungs = {"right": (n * 0.30, n * 0.5), "left": (n * 0.70, n * 0.5)}  # patient's side
    for cx, cy in lungs.values():
        inside = ((xx - cx) / (n * 0.17)) ** 2 + ((yy - cy) / (n * 0.38)) ** 2 <= 1
        img[inside] = 70.0
    radius = 2.0 if size == "small" else 4.5
    cx0, cy0 = lungs[side]
    slots = sorted(rng.choice(3, size=count, replace=False))  # upper, middle, lower zone
    for slot in slots:
        x = cx0 + rng.uniform(-0.05, 0.05) * n
        y = cy0 + (slot - 1) * 0.24 * n + rng.uniform(-0.03, 0.03) * n
        img[(xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2] = 220.0
    img += rng.normal(0, 6, size=img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2), [ZONES[z] for z in slots]


def _zones_text(zones: list) -> str:
    return zones[0] if len(zones) == 1 else ", ".join(zones[:-1]) + " and " + zones[-1]


def _chest_texts(count: int, side: str, size: str, zones: list) -> dict:
    word = NUMBERS[count]
    noun = "nodule" if count == 1 else "nodules"
    where = f"the {_zones_text(zones)} {'zone' if count == 1 else 'zones'} of the {side} lung"
    caption = f"Chest radiograph showing {word} {size} {noun} in {where}."
    extended = (f"This chest radiograph shows {word} {size} pulmonary {noun} located in {where}. "
                f"The {'other' if count == 1 else 'remaining'} lung fields are clear. "
                f"A {size} nodule is a round opacity; {'small nodules are usually benign' if size == 'small' else 'large nodules need further work-up'}.")
    other = "right" if side == "left" else "left"
    large = "yes" if size == "large" else "no"
    qa = [  # (question, short answer for evaluation, sentence answer for training, answer type)
        ("How many nodules are seen?", word, f"{word.capitalize()} {noun} {'is' if count == 1 else 'are'} seen.",
         "OPEN"),
        ("Which lung contains the nodules?", side, f"The {side} lung.", "OPEN"),
        ("What is the size of the nodules?", size, f"The {noun} {'is' if count == 1 else 'are'} {size}.", "OPEN"),
        (f"Is there a nodule in the {side} lung?", "yes", f"Yes, the {side} lung has {word} {noun}.", "CLOSED"),
        (f"Is there a nodule in the {other} lung?", "no", f"No, the {other} lung is clear.", "CLOSED"),
        ("Are the nodules large?", large, f"{large.capitalize()}, the {noun} {'is' if count == 1 else 'are'} "
         f"{size}.", "CLOSED"),
    ]
    return {"caption": caption, "extended": extended, "qa": qa}


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image
    Image.fromarray(arr).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).save(path, optimize=True)


def _record(rid, image, question, answer, extended=None, answer_type=None, finding=None):
    """A record; with ``finding``, a second turn asks for the finding (caption, or extended caption)."""
    turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    follow_up = {"from": "human", "value": "Describe the finding."}
    rec = {"id": rid, "image": image, "conversations": turns + ([follow_up, {"from": "gpt", "value": finding}]
                                                                if finding else [])}
    if extended is not None:  # the extended response replaces the finding (or the only answer)
        rec["conversations_long"] = ((turns + [follow_up]) if finding else turns[:1]) + [
            {"from": "gpt", "value": extended}]
    if answer_type is not None:
        rec["answer_type"] = answer_type
    return rec


def generate(out: Path = ASSETS, n_train: int = 96, n_test: int = 24, seed: int = 0) -> Path:
    """Write images, ``stage1.json``, ``stage2.json``, ``test.json``, tokenizer and configs."""
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    stage1, stage2, test = [], [], []
    # procedural chest images: facts balanced over (count, side, size)
    facts = [(c, s, z) for c in (1, 2, 3) for s in ("left", "right") for z in ("small", "large")]
    for i in range(n_train + n_test):
        count, side, size = facts[i % len(facts)]
        name = f"chest_{i:03d}.png"
        img, zones = _chest_image(rng, count, side, size)
        _save_png(img, tmp / "images" / name)
        t = _chest_texts(count, side, size, zones)
        if i < n_train:
            stage1.append(_record(f"s1-chest-{i}", name, "Describe the image.", t["caption"]))
            for j, (q, _, sentence, _) in enumerate(t["qa"]):  # short answer, then the finding on request
                stage2.append(_record(f"s2-chest-{i}-{j}", name, q, sentence, t["extended"], finding=t["caption"]))
        else:
            for j, (q, a, _, kind) in enumerate(t["qa"]):
                test.append(_record(f"test-chest-{i}-{j}", name, q, a, answer_type=kind))
    # real images: the whole image for training, a held-out crop for testing
    real = _real_arrays()
    for name, (modality, caption, extended) in REAL_IMAGES.items():
        src = real[name]
        if isinstance(src, str):  # DICOM: ship the file itself
            fname = f"{name}.dcm"
            shutil.copyfile(src, tmp / "images" / fname)
            train_names, test_names = [fname], [fname]
        else:
            h, w = src.shape[:2]
            train_names = [f"{name}.png"]
            _save_png(src, tmp / "images" / train_names[0])
            crop = src[h // 8: h - h // 8, w // 8: w - w // 8]
            test_names = [f"{name}_crop.png"]
            _save_png(crop, tmp / "images" / test_names[0])
        for k in range(4):  # repeated so that the modality facts are seen often enough
            stage1.append(_record(f"s1-{name}-{k}", train_names[0], "Describe the image.", caption))
            stage2.append(_record(f"s2-{name}-{k}", train_names[0], "What imaging modality is this?",
                                  f"This is {modality}.", extended, finding=caption))
        test.append(_record(f"test-{name}-modality", test_names[0], "What imaging modality is this?",
                            modality, answer_type="OPEN"))
    pyrng.shuffle(stage1)
    pyrng.shuffle(stage2)
    for fname, recs in (("stage1.json", stage1), ("stage2.json", stage2), ("test.json", test)):
        (tmp / fname).write_text(json.dumps(recs, indent=1) + "\n")
    vocab = _train_tokenizer(tmp / "tokenizer", stage1 + stage2 + test)
    _write_configs(tmp, vocab)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


STUDY_INSTRUCTION = "Describe the image."


def _balanced_facts(n: int, rng: np.random.Generator) -> list:
    """``n`` (count, side, size) facts, every combination equally often (up to the remainder), shuffled."""
    combos = [(c, s, z) for c in (1, 2, 3) for s in ("left", "right") for z in ("small", "large")]
    facts = [combos[i % len(combos)] for i in range(n)]
    return [facts[i] for i in rng.permutation(n)]


def generate_study(out: Path, n_stage1: int = 1000, n_stage2: int = 96, n_test: int = 48, n_text: int = 2000,
                   report_share: float = 0.5, seed: int = 0) -> Path:
    """Chest-only data for the data-efficiency study (``experiments/data_efficiency.py``).

    Three disjoint pools of procedurally generated chest images (the demo's generator), with the
    facts (count, side, size) balanced within each pool, so no answer is predictable from the question:

    * ``stage1.json``: one caption per image (``n_stage1`` images; the study trains on a fraction);
    * ``stage2.json``: the demo's six questions per image with their short answers ("left", "two",
      "yes"), each followed by "Describe the finding." (the caption; the extended description in
      ``conversations_long``) (``n_stage2`` images);
    * ``test.json``: the six questions on ``n_test`` held-out images (3 closed, 3 open each);
    * ``text.json``: ``n_text`` image-free conversations (a caption, or a question with its short
      answer and the description) written from randomly drawn facts, a share ``report_share`` of
      them with the facts stated in the first prompt ("Report: left lung; two small nodules; upper
      and lower zones."): the domain text a language model is pretrained on before it sees images,
      from which it learns the answer formats and to read findings from its context.

    Deterministic in ``seed``; written to ``out`` (replaced).
    """
    rng = np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    files = {"stage1.json": [], "stage2.json": [], "test.json": []}
    for pool, n in (("stage1", n_stage1), ("stage2", n_stage2), ("test", n_test)):
        for i, (count, side, size) in enumerate(_balanced_facts(n, rng)):
            name = f"{pool}_{i:04d}.png"
            img, zones = _chest_image(rng, count, side, size)
            _save_png(img, tmp / "images" / name)
            t = _chest_texts(count, side, size, zones)
            if pool == "stage1":
                files["stage1.json"].append(_record(f"s1-{i}", name, STUDY_INSTRUCTION, t["caption"]))
            for j, (q, a, _, kind) in enumerate(t["qa"]):
                if pool == "stage2":
                    files["stage2.json"].append(_record(f"s2-{i}-{j}", name, q, a, t["extended"],
                                                        finding=t["caption"]))
                elif pool == "test":
                    files["test.json"].append(_record(f"test-{i}-{j}", name, q, a, answer_type=kind))
    text = []
    for i, (count, side, size) in enumerate(_balanced_facts(n_text, rng)):
        zones = [ZONES[z] for z in sorted(rng.choice(3, size=count, replace=False))]
        t = _chest_texts(count, side, size, zones)
        pick = int(rng.integers(len(t["qa"]) + 1))
        if pick == len(t["qa"]):
            turns = [(STUDY_INSTRUCTION, t["caption"])]
        else:
            q, a, _, _ = t["qa"][pick]
            turns = [(q, a), ("Describe the finding.", t["caption"] if rng.random() < 0.5 else t["extended"])]
        if rng.random() < report_share:  # the facts stated in the prompt, where an image will be later
            report = (f"Report: {side} lung; {NUMBERS[count]} {size} {'nodule' if count == 1 else 'nodules'}; "
                      f"{_zones_text(zones)}.")
            turns[0] = (report + "\n" + turns[0][0], turns[0][1])
        text.append({"id": f"text-{i}", "conversations": [{"from": who, "value": v} for q, a in turns
                                                          for who, v in (("human", q), ("gpt", a))]})
    files["text.json"] = text
    for fname, recs in files.items():
        (tmp / fname).write_text(json.dumps(recs, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _train_tokenizer(path: Path, records) -> int:
    """Train a small byte-level BPE tokenizer on the demo texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [V0_SYSTEM, "### Human: ### Assistant:"]
    for r in records:
        for key in ("conversations", "conversations_long"):
            texts += [t["value"] for t in r.get(key, [])]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=2,
                                  special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", model_max_length=512)
    fast.save_pretrained(str(path))
    return len(fast)


def _write_configs(path: Path, vocab_size: int) -> None:
    llm = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 4, "max_position_embeddings": 256, "vocab_size": vocab_size,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "tie_word_embeddings": False,
           "rms_norm_eps": 1e-5, "torch_dtype": "float32"}
    vision = {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
              "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
              "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "projection_dim": 48,
              "torch_dtype": "float32"}
    pre = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
           "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_normalize": True,
           "image_mean": [0.48145466, 0.4578275, 0.40821073],
           "image_std": [0.26862954, 0.26130258, 0.27577711], "do_rescale": True,
           "rescale_factor": 1 / 255, "do_convert_rgb": True, "resample": 3}
    for name, cfg in (("llm_config.json", llm), ("vision_config.json", vision),
                      ("preprocessor_config.json", pre)):
        (path / name).write_text(json.dumps(cfg, indent=1) + "\n")
