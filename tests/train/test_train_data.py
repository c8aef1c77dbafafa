"""Data validation, the v0 template and its masking."""
import json
import logging
import shutil

import pytest
from transformers import AutoTokenizer

from exgramed_train.data import (IGNORE_INDEX, IM_PATCH, DataError, collate, load_records, prompt_ids,
                                 tokenize_conversation)
from exgramed_train.make_demo import ASSETS

N = 16


@pytest.fixture(scope="module")
def tok():
    t = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizer"))
    t.add_tokens([IM_PATCH, "<im_start>", "<im_end>"], special_tokens=True)
    return t


def rec(rid, image="chest_000.png", q="<image>\nHow many nodules?", a="Two.", key="conversations", long=None):
    r = {"id": rid, "image": image, key: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if long is not None:
        r["conversations_long"] = [{"from": "human", "value": q}, {"from": "gpt", "value": long}]
    return r


def write(tmp_path, records):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(records))
    return p


def test_masks_header_and_human_turns(tok):
    turns = rec("a")["conversations"]
    ids, labels = tokenize_conversation(turns, tok, N)
    assert len(ids) == len(labels)
    assert ids.count(tok.convert_tokens_to_ids(IM_PATCH)) == N
    learned = [l for l in labels if l != IGNORE_INDEX]
    assert tok.decode(learned) == "### Assistant: Two.\n</s>"
    # the generation prompt is exactly the training sequence up to the answer
    prompt = prompt_ids(turns[0]["value"], tok, N)
    assert ids[:len(prompt)] == prompt
    k = len(tok("### Assistant:", add_special_tokens=False)["input_ids"])
    assert all(l == IGNORE_INDEX for l in labels[:len(prompt) - k])
    assert labels[len(prompt) - k:len(prompt)] == prompt[-k:]


def test_accepts_released_misspelling(tmp_path, tok):
    s = load_records(write(tmp_path, [rec("a", key="conversatons")]), ASSETS / "images", tok, N, 200)
    assert [x.id for x in s] == ["a"]


def test_reports_every_bad_record_by_id(tmp_path, tok):
    bad_img = tmp_path / "broken.png"
    bad_img.write_bytes(b"not a png")
    shutil.copy(ASSETS / "images" / "chest_000.png", tmp_path / "ok.png")
    records = [rec("good", image="ok.png"), {"id": "no-image", "conversations": rec("x")["conversations"]},
               rec("no-gpt", image="ok.png"), rec("broken", image="broken.png"), rec("missing", image="nope.png"),
               rec("good", image="ok.png")]
    records[2]["conversations"] = records[2]["conversations"][:1]
    with pytest.raises(DataError) as e:
        load_records(write(tmp_path, records), tmp_path, tok, N, 200)
    msg = str(e.value)
    assert "5 invalid record(s)" in msg
    for rid, why in [("no-image", "'image'"), ("no-gpt", "no 'gpt' turn"), ("broken", "unreadable image"),
                     ("missing", "unreadable image"), ("good", "duplicate id")]:
        assert f"{rid}: " in msg and why in msg


def test_stage2_requires_conversations_long(tmp_path, tok):
    with pytest.raises(DataError, match="a: missing or empty field 'conversations_long'"):
        load_records(write(tmp_path, [rec("a")]), ASSETS / "images", tok, N, 200, need_long=True)
    s = load_records(write(tmp_path, [rec("a", long="Two nodules are seen in the lung.")]), ASSETS / "images",
                     tok, N, 200, need_long=True)
    assert tok.decode(s[0].raw_ids) == "Two." and tok.decode(s[0].ext_ids) == "Two nodules are seen in the lung."


def test_overlength_is_an_error_or_a_counted_warning(tmp_path, tok, caplog):
    long_answer = "The nodules are large. " * 20
    p = write(tmp_path, [rec("short"), rec("long", a=long_answer)])
    with pytest.raises(DataError, match=r"1 over-length sample\(s\): long \("):
        load_records(p, ASSETS / "images", tok, N, 150)
    with caplog.at_level(logging.WARNING):
        s = load_records(p, ASSETS / "images", tok, N, 150, on_overlength="skip")
    assert [x.id for x in s] == ["short"]
    assert "1 over-length sample(s): long" in caplog.text


def test_dicom_images_load_and_collate(tmp_path, tok):
    from exgramed_train.vision import HFCLIPVision  # noqa: F401 - imported for its preprocess contract
    s = load_records(write(tmp_path, [rec("ct", image="ct.dcm"), rec("mr", image="mr.dcm", a="Yes, it is.")]),
                     ASSETS / "images", tok, N, 200)
    import torch
    items = [(x, torch.zeros(3, 4, 4)) for x in s]
    b = collate(items, tok.pad_token_id)
    assert b["ids"] == ["ct", "mr"] and b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert b["attention_mask"].sum(1).tolist() == [len(x.input_ids) for x in s]
