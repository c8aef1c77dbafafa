"""``generate-extended``: write ``conversations_long`` (extended responses) with an LLM.

Backends:

* ``openai``: any OpenAI-compatible ``POST {base_url}/chat/completions``
  endpoint.  Base URL, model and key come from the environment
  (``OPENAI_BASE_URL``, ``EXGRAMED_EXTEND_MODEL``, ``OPENAI_API_KEY``) or the
  command line.  Requests run concurrently; transport errors, HTTP 429 and 5xx
  are retried with exponential backoff, malformed replies (no text, or a text
  shorter than the original answer) a bounded number of times.
* ``local``: a transformers causal LM from a local directory (greedy).

Every finished record is appended (and fsynced) to ``<output>.partial.jsonl``;
a rerun skips the ids already there, so an interruption loses nothing (a line
torn by a kill is cut off first).  The output JSON (input records plus
``conversations_long``) is written atomically once every record is done;
records that still failed are listed by id.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from . import jsonl
from .data import conversations_of

log = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are a careful medical writer who explains imaging findings to clinicians."
USER_PROMPT = (
    "Here is a question about a medical image and the answer an expert gave.\n"
    "Write a longer, more informative version of the answer: explain what the findings mean and the "
    "concepts behind them in two to four sentences. Keep every medical term of the original answer "
    "exactly as written, do not contradict it, and do not add findings that it does not imply. "
    "Reply with the new answer only.\n\nQuestion: {question}\nAnswer: {answer}")


class ExtendError(RuntimeError):
    """Some records could not be extended; the message lists their ids."""


class Malformed(ValueError):
    """The endpoint replied, but not with a usable answer."""


def _check_reply(text, original: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise Malformed("empty reply")
    text = text.strip()
    if len(text) < len(original.strip()):
        raise Malformed(f"reply shorter than the original answer ({len(text)} < {len(original.strip())} chars)")
    return text


class OpenAIBackend:
    """Chat completions over HTTP with retries (transport) and re-asks (malformed replies)."""

    def __init__(self, base_url: str, model: str, api_key: str | None, max_retries: int = 5,
                 max_malformed: int = 3, backoff: float = 1.0, timeout: float = 60.0, temperature: float = 0.2):
        if not base_url or not model:
            raise ValueError("the openai backend needs a base URL (--base-url or OPENAI_BASE_URL) and a model "
                             "(--model or EXGRAMED_EXTEND_MODEL)")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.key = model, api_key
        self.max_retries, self.max_malformed, self.backoff = max_retries, max_malformed, backoff
        self.timeout, self.temperature = timeout, temperature

    def _post(self, payload: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers)
        for attempt in range(self.max_retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as e:
                retryable = e.code == 429 or e.code >= 500
                if not retryable or attempt == self.max_retries:
                    raise
                err = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                if attempt == self.max_retries:
                    raise
                err = f"{type(e).__name__}: {e}"
            delay = self.backoff * 2 ** attempt
            log.warning("request failed (%s); retry %d/%d in %.2fs", err, attempt + 1, self.max_retries, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def extend(self, question: str, answer: str) -> str:
        payload = {"model": self.model, "temperature": self.temperature,
                   "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                {"role": "user", "content": USER_PROMPT.format(question=question, answer=answer)}]}
        for attempt in range(self.max_malformed + 1):
            reply = self._post(payload)
            try:
                return _check_reply(reply["choices"][0]["message"]["content"], answer)
            except (KeyError, IndexError, TypeError, Malformed) as e:
                if attempt == self.max_malformed:
                    raise Malformed(f"malformed reply after {attempt + 1} tries: {e}") from e
                log.warning("malformed reply (%s); asking again", e)
        raise AssertionError("unreachable")


class LocalBackend:
    """A local transformers causal LM; greedy decoding, one request at a time."""

    def __init__(self, path: str, max_new_tokens: int = 256, min_new_tokens: int = 0, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        self.max_new_tokens, self.min_new_tokens, self.device = max_new_tokens, min_new_tokens, device
        self.lock = threading.Lock()

    def extend(self, question: str, answer: str) -> str:
        import torch
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": USER_PROMPT.format(question=question, answer=answer)}]
        if getattr(self.tok, "chat_template", None):
            ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            if not torch.is_tensor(ids):
                ids = ids["input_ids"]
        else:
            text = f"{SYSTEM_PROMPT}\n\n{messages[1]['content']}\n\nNew answer:"
            ids = self.tok(text, return_tensors="pt")["input_ids"]
        with self.lock, torch.no_grad():
            out = self.model.generate(ids.to(self.device), attention_mask=torch.ones_like(ids).to(self.device),
                                      max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens,
                                      do_sample=False, pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id)
        return _check_reply(self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), answer)


def _extend_record(backend, rec: dict) -> list:
    turns, long_turns, question = conversations_of(rec), [], ""
    for t in turns:
        if t["from"] == "human":
            question = t["value"].replace("<image>", "").strip()
            long_turns.append(dict(t))
        else:
            long_turns.append({"from": "gpt", "value": backend.extend(question, t["value"])})
    return long_turns


def _read_journal(partial: Path) -> dict:
    """Finished records of an earlier run (``id -> conversations_long``); a torn last line is cut off first."""
    done = {}
    if not partial.exists():
        return done
    jsonl.repair_tail(partial)
    for n, line in enumerate(partial.read_text().splitlines(), 1):
        try:
            item = json.loads(line)
            done[item["id"]] = item["conversations_long"]
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("%s line %d is not a finished record; ignored (its record is extended again)", partial, n)
    return done


def generate_extended(records_path, output_path, backend, concurrency: int = 8) -> dict:
    """Add ``conversations_long`` to every record; resumable, see the module docstring."""
    records = json.loads(Path(records_path).read_text())
    bad = [r.get("id", f"#{i}") if isinstance(r, dict) else f"#{i}" for i, r in enumerate(records)
           if not isinstance(r, dict) or not isinstance(r.get("id"), str) or not conversations_of(r)]
    if bad:
        raise ValueError(f"{records_path}: records without an id or conversations: {bad[:10]}")
    output_path = Path(output_path)
    partial = output_path.with_name(output_path.name + ".partial.jsonl")
    done = _read_journal(partial)
    todo = [r for r in records if r["id"] not in done]
    log.info("%d records, %d already done, %d to extend", len(records), len(done), len(todo))
    failed, lock = {}, threading.Lock()
    with open(partial, "a") as sink, ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {pool.submit(_extend_record, backend, r): r["id"] for r in todo}
        for fut in as_completed(futures):
            rid = futures[fut]
            try:
                long_turns = fut.result()
            except Exception as e:  # noqa: BLE001 - reported by id below
                failed[rid] = f"{type(e).__name__}: {e}"
                continue
            with lock:
                jsonl.append(sink, {"id": rid, "conversations_long": long_turns})
            done[rid] = long_turns
    if failed:
        raise ExtendError(f"{len(failed)} record(s) failed (rerun to retry them; finished ones are kept in "
                          f"{partial}):\n  " + "\n  ".join(f"{k}: {v}" for k, v in sorted(failed.items())))
    out = [dict(r, conversations_long=done[r["id"]]) for r in records]
    tmp = output_path.with_name(output_path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, output_path)
    return {"records": len(records), "generated": len(todo), "output": str(output_path)}


def add_arguments(p) -> None:
    p.add_argument("--data", required=True, help="input LLaVA-Med JSON")
    p.add_argument("--output", required=True, help="output JSON with conversations_long")
    p.add_argument("--backend", choices=["openai", "local"], default="openai")
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL"))
    p.add_argument("--model", default=os.environ.get("EXGRAMED_EXTEND_MODEL"),
                   help="endpoint model name, or the local model directory")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--max-malformed", type=int, default=3)
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="local backend")


def run_from_args(args) -> dict:
    if args.backend == "openai":
        backend = OpenAIBackend(args.base_url, args.model, os.environ.get("OPENAI_API_KEY"), args.max_retries,
                                args.max_malformed, args.backoff)
    else:
        if not args.model:
            raise SystemExit("--model must name the local model directory for --backend local")
        backend = LocalBackend(args.model, args.max_new_tokens)
    result = generate_extended(args.data, args.output, backend, args.concurrency)
    print(json.dumps(result))
    return result
