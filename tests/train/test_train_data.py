"""Data validation, the v0 template and its masking."""
import json
import logging
import shutil
from pathlib import Path

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
    s = load_records(write(tmp_path, [rec("ct", image="ct.dcm"), rec("mr", image="mr.dcm", a="Yes, it is.")]),
                     ASSETS / "images", tok, N, 200)
    import torch
    items = [(x, torch.zeros(3, 4, 4)) for x in s]
    b = collate(items, tok.pad_token_id)
    assert b["ids"] == ["ct", "mr"] and b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert b["attention_mask"].sum(1).tolist() == [len(x.input_ids) for x in s]


def _turns(*values):
    """Alternating human/gpt turns with the given values."""
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


@pytest.mark.parametrize("turns, why", [
    (_turns("<image>\n<image>\nTwo images?", "Yes."), "conversations[0] has 2 <image> placeholders"),
    (_turns("<image>\nWhat is shown?", "It is <image>."), "conversations[1] is a gpt turn with <image>"),
    (_turns("<image>\nWhat is shown?", "A nodule.", "<image>\nAnd here?", "Nothing."),
     "conversations[2] has an <image> placeholder outside the first turn"),
    (_turns("<image>\nIs <im_patch> here?", "No."), "conversations[0] contains the literal text '<im_patch>'"),
    (_turns("<image>\nWhat is shown?", "<im_start>"), "conversations[1] contains the literal text '<im_start>'"),
])
def test_image_placeholder_problems_are_rejected_up_front(tmp_path, tok, turns, why):
    # unchecked, the first four crash training at their batch ("every sequence needs exactly 16
    # <im_patch> tokens", naming no record); a literal <im_start> would be trained on as an answer
    records = [rec("fine"), {"id": "bad-7", "image": "chest_000.png", "conversations": turns}]
    with pytest.raises(DataError) as e:
        load_records(write(tmp_path, records), ASSETS / "images", tok, N, 400)
    assert "1 invalid record(s)" in str(e.value) and f"bad-7: {why}" in str(e.value)


def test_image_tokens_in_extended_responses_are_rejected(tmp_path, tok):
    r = rec("long-bad", long="x")
    r["conversations_long"][1]["value"] = "The <image> shows a nodule."
    with pytest.raises(DataError, match="long-bad: conversations_long\\[1\\] is a gpt turn with <image>"):
        load_records(write(tmp_path, [r]), ASSETS / "images", tok, N, 400, need_long=True)


@pytest.mark.parametrize("key, answer", [("conversations", ""), ("conversations", "  \n\t"),
                                         ("conversations_long", ""), ("conversations_long", "   ")])
def test_empty_answers_are_rejected(tmp_path, tok, key, answer):
    r = rec("empty-3", long="Two nodules are seen in the lung.")
    r[key][1]["value"] = answer
    with pytest.raises(DataError, match=f"empty-3: {key}\\[1\\] is an empty answer"):
        load_records(write(tmp_path, [r, rec("fine", long="Fine.")]), ASSETS / "images", tok, N, 400,
                     need_long=True)


FIXTURES = Path(__file__).parent / "fixtures"


def test_released_llava_med_format_loads(tok):
    # integer ids, the key spelled "conversatons", an integer answer (12), <image> after the question
    s = load_records(FIXTURES / "llava_med_finetune.json", ASSETS / "images", tok, N, 200)
    assert [x.id for x in s] == ["3", "4", "5"]
    learned = [l for l in s[1].labels if l != IGNORE_INDEX]
    assert tok.decode(learned) == "### Assistant: 12\n</s>"


def test_exgramed_stage2_format_loads_with_official_alignment_text(tok):
    # "conversatons" + "conversatons_long", two question-answer rounds, an answer with a newline
    path = FIXTURES / "exgramed_stage2.json"
    s = load_records(path, ASSETS / "images", tok, N, 300, need_long=True)
    assert [x.id for x in s] == ["11", "12"]
    assert tok.decode(s[0].raw_ids) == "2 Two small nodules\nin the left lung."
    assert tok.decode(s[0].ext_ids) == ("Two nodules are seen. The radiograph shows two small nodules\n"
                                        "in the left lung.")
    # ExGra-Med's code joins the responses with ". " and removes the newlines
    s = load_records(path, ASSETS / "images", tok, N, 300, need_long=True, official_text=True)
    assert tok.decode(s[0].raw_ids) == "2. Two small nodulesin the left lung."
    assert tok.decode(s[0].ext_ids) == "Two nodules are seen.. The radiograph shows two small nodulesin the left lung."
    assert tok.decode(s[1].raw_ids) == "Yes."


def test_ids_and_values_of_the_wrong_type_are_named(tmp_path, tok):
    records = [rec(True), rec(7), rec("7"), rec(2.5), rec("x", a=True), rec("y", a=None)]
    with pytest.raises(DataError) as e:
        load_records(write(tmp_path, records), ASSETS / "images", tok, N, 200)
    msg = str(e.value)
    assert "5 invalid record(s)" in msg
    assert "True: missing or empty field 'id' (a string or an integer)" in msg
    assert "7: duplicate id" in msg and "2.5: missing or empty field 'id'" in msg
    for rid in ("x", "y"):
        assert f"{rid}: conversations[1] must be {{'from': 'human'|'gpt', 'value': str or number}}" in msg
