"""``generate-extended``: write ``conversations_long`` (extended responses) with an LLM.

Backends:

* ``openai``: any OpenAI-compatible ``POST {base_url}/chat/completions``
  endpoint, through the ``openai`` package.  Base URL, model and key come from
  the environment (``OPENAI_BASE_URL``, ``EXGRAMED_EXTEND_MODEL``,
  ``OPENAI_API_KEY``) or the command line.  Requests run concurrently.  Each
  request has a total deadline (``timeout``, from connecting to the last byte
  of the reply; the client's own timeouts apply to each socket read, which a
  server sending a byte now and then never trips).  Deadlines, transport
  errors, HTTP 429 and 5xx are retried with exponential backoff, malformed
  replies (no text, or a text shorter than the original answer) re-asked, both
  a bounded number of times.
* ``local``: a transformers causal LM from a local directory (greedy).

Every finished record is appended (and fsynced) to ``<output>.partial.jsonl``;
a rerun skips the ids already there, so an interruption loses nothing (a line
torn by a kill is cut off first).  The output JSON (input records plus
``conversations_long``) is written atomically once every record is done;
records that still failed are listed by id.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
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


class DeadlineExceeded(TimeoutError):
    """No complete reply within the request's total deadline."""


class InputError(ValueError):
    """The records file is unreadable, not JSON, or not a list of records with ids and conversations."""


def _check_reply(text, original: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise Malformed("empty reply")
    text = text.strip()
    if len(text) < len(original.strip()):
        raise Malformed(f"reply shorter than the original answer ({len(text)} < {len(original.strip())} chars)")
    return text


class OpenAIBackend:
    """Chat completions through ``openai.AsyncOpenAI``, with a total deadline per request, retries and re-asks.

    :meth:`extend` is called from worker threads; the requests run on one event loop in a thread of its
    own, where ``asyncio.wait_for`` cancels a request at its deadline.  ``close()`` (or ``with``) stops it.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None, max_retries: int = 5,
                 max_malformed: int = 3, backoff: float = 1.0, timeout: float = 60.0, temperature: float = 0.2):
        if not base_url or not model:
            raise ValueError("the openai backend needs a base URL (--base-url or OPENAI_BASE_URL) and a model "
                             "(--model or EXGRAMED_EXTEND_MODEL)")
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"--timeout must be a finite number of seconds > 0, got {timeout!r}")
        if not (isinstance(backoff, (int, float)) and math.isfinite(backoff) and backoff >= 0):
            raise ValueError(f"--backoff must be a finite number of seconds >= 0, got {backoff!r}")
        for name, value in (("--max-retries", max_retries), ("--max-malformed", max_malformed)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        import openai
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_retries, self.max_malformed, self.backoff = max_retries, max_malformed, backoff
        self.timeout, self.temperature = float(timeout), temperature
        # the retries are ours (each attempt gets its own deadline); "EMPTY" is the placeholder key that
        # OpenAI-compatible servers without authentication (vLLM, llama.cpp) expect
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=self.timeout,
                                          max_retries=0)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-backend", daemon=True)
        self._thread.start()

    def extend(self, question: str, answer: str) -> str:
        return asyncio.run_coroutine_threadsafe(self._extend(question, answer), self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    async def _extend(self, question: str, answer: str) -> str:
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": USER_PROMPT.format(question=question, answer=answer)}]
        for attempt in range(self.max_malformed + 1):
            reply = await self._complete(messages)
            try:
                return _check_reply(reply.choices[0].message.content, answer)
            except (AttributeError, IndexError, TypeError, Malformed) as e:
                if attempt == self.max_malformed:
                    raise Malformed(f"malformed reply after {attempt + 1} tries: {e}") from e
                log.warning("malformed reply (%s); asking again", e)
        raise AssertionError("unreachable")

    async def _complete(self, messages):
        import openai
        for attempt in range(self.max_retries + 1):
            try:
                return await asyncio.wait_for(self._client.chat.completions.create(
                    model=self.model, messages=messages, temperature=self.temperature), self.timeout)
            except asyncio.TimeoutError:
                if attempt == self.max_retries:
                    raise DeadlineExceeded(f"no complete reply from {self.url} within {self.timeout:g} s "
                                           f"(--timeout), {attempt + 1} attempt(s)") from None
                err = f"no complete reply within {self.timeout:g} s"
            except openai.APIStatusError as e:
                if not (e.status_code == 429 or e.status_code >= 500) or attempt == self.max_retries:
                    raise
                err = f"HTTP {e.status_code}"
            except (openai.APIConnectionError, json.JSONDecodeError) as e:  # no connection; a non-JSON body
                if attempt == self.max_retries:
                    raise
                err = f"{type(e).__name__}: {e}"
            delay = self.backoff * 2 ** attempt
            log.warning("request failed (%s); retry %d/%d in %.2fs", err, attempt + 1, self.max_retries, delay)
            await asyncio.sleep(delay)
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


def read_records(path) -> list:
    """The records of a LLaVA-Med JSON file; :class:`InputError` names the file and what is wrong."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot be read ({e})") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno}); expected a JSON list "
                         f"of LLaVA-Med records") from None
    if not isinstance(records, list):
        kind = {dict: "an object", str: "a string", bool: "a boolean", type(None): "null"}.get(type(records),
                                                                                            "a number")
        raise InputError(f"{path}: expected a JSON list of LLaVA-Med records, got {kind}")
    bad = [r.get("id", f"#{i}") if isinstance(r, dict) else f"#{i}" for i, r in enumerate(records)
           if not isinstance(r, dict) or not isinstance(r.get("id"), str) or not conversations_of(r)]
    if bad:
        raise InputError(f"{path}: records without an id or conversations: {bad[:10]}")
    return records


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
    records = read_records(records_path)
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
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds one request may take, from connecting to the last byte of the reply (then it "
                        "is cancelled and retried)")
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--max-malformed", type=int, default=3)
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="local backend")


def run_from_args(args) -> dict:
    """The ``generate-extended`` command; bad input and failed records end it with a message, no traceback."""
    try:
        read_records(args.data)  # before a backend (maybe a local model) is loaded
    except InputError as e:
        raise SystemExit(f"generate-extended: --data {e}") from None
    if args.backend == "openai":
        try:
            backend = OpenAIBackend(args.base_url, args.model, os.environ.get("OPENAI_API_KEY"), args.max_retries,
                                    args.max_malformed, args.backoff, args.timeout)
        except ValueError as e:
            raise SystemExit(f"generate-extended: {e}") from None
    else:
        if not args.model:
            raise SystemExit("generate-extended: --model must name the local model directory for --backend local")
        backend = LocalBackend(args.model, args.max_new_tokens)
    try:
        result = generate_extended(args.data, args.output, backend, args.concurrency)
    except InputError as e:
        raise SystemExit(f"generate-extended: --data {e}") from None
    except ExtendError as e:
        raise SystemExit(f"generate-extended: {e}") from None
    finally:
        if isinstance(backend, OpenAIBackend):
            backend.close()
    print(json.dumps(result))
    return result
