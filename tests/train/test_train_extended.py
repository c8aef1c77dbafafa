"""generate-extended against a real HTTP server on loopback, and the local transformers backend."""
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest

from exgramed_train import jsonl
from exgramed_train.extended import DeadlineExceeded, ExtendError, LocalBackend, OpenAIBackend, generate_extended

ROOT = Path(__file__).resolve().parents[2]


def _reply(answer):
    """The endpoint's extended answer."""
    return f"In more detail: {answer} This keeps every term of the answer."


class Endpoint:
    """An OpenAI-compatible /v1/chat/completions server whose replies follow a per-answer script."""

    def __init__(self, script):
        self.script = script  # answer text -> list of actions, consumed in order; "ok" afterwards
        self.requests, self.lock = [], threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][1]["content"]
                answer = user.rsplit("Answer: ", 1)[1]
                with endpoint.lock:
                    endpoint.requests.append({"path": self.path, "answer": answer, "model": body["model"],
                                              "auth": self.headers.get("Authorization"), "user": user})
                    actions = endpoint.script.setdefault(answer, [])
                    action = actions.pop(0) if actions else "ok"
                if action.startswith("http"):
                    self.send_response(int(action[4:]))
                    self.end_headers()
                    return
                if action == "trickle":  # a valid reply, one byte every 0.2 s (about 30 s in all)
                    payload = json.dumps({"choices": [{"message": {"content": _reply(answer) + " " * 80}}]})
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    try:
                        for b in payload.encode():
                            self.wfile.write(bytes([b]))
                            self.wfile.flush()
                            time.sleep(0.2)
                    except (BrokenPipeError, ConnectionResetError):  # the client gave up
                        pass
                    return
                if action == "garbage":
                    payload = b"{not json"
                elif action == "empty":
                    payload = json.dumps({"choices": [{"message": {"content": ""}}]}).encode()
                elif action == "nochoices":
                    payload = json.dumps({"error": "oops"}).encode()
                else:
                    payload = json.dumps({"choices": [{"message": {"role": "assistant",
                                                                   "content": _reply(answer)}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _records(tmp_path, n=6):
    recs = [{"id": f"r{i}", "image": "x.png", "conversations": [
        {"from": "human", "value": f"<image>\nQuestion {i}?"}, {"from": "gpt", "value": f"Answer {i}."},
        {"from": "human", "value": "And more?"}, {"from": "gpt", "value": f"Second answer {i}."}]}
            for i in range(n)]
    p = tmp_path / "in.json"
    p.write_text(json.dumps(recs))
    return p, recs


def test_http_retries_malformed_and_concurrency(tmp_path):
    src, recs = _records(tmp_path)
    ep = Endpoint({"Answer 1.": ["http503", "http429"], "Answer 2.": ["garbage"],
                   "Second answer 3.": ["empty", "nochoices"]})
    try:
        with OpenAIBackend(ep.url, "tiny-model", "sk-test", max_retries=3, max_malformed=2, backoff=0.01) as backend:
            res = generate_extended(src, tmp_path / "out.json", backend, concurrency=4)
    finally:
        ep.close()
    assert res == {"records": 6, "generated": 6, "output": str(tmp_path / "out.json")}
    out = json.loads((tmp_path / "out.json").read_text())
    assert [r["id"] for r in out] == [r["id"] for r in recs]
    for r, o in zip(recs, out):
        assert o["conversations"] == r["conversations"]
        long = o["conversations_long"]
        assert [t["from"] for t in long] == ["human", "gpt", "human", "gpt"]
        assert long[0] == r["conversations"][0]
        assert long[1]["value"] == _reply(r["conversations"][1]["value"])
    # 12 answers + 2 HTTP retries + 1 garbage retry + 2 malformed re-asks
    assert len(ep.requests) == 17
    assert {q["path"] for q in ep.requests} == {"/v1/chat/completions"}
    assert {q["auth"] for q in ep.requests} == {"Bearer sk-test"} and {q["model"] for q in ep.requests} == {"tiny-model"}
    assert "Keep every medical term" in ep.requests[0]["user"]


def test_failures_are_reported_by_id_and_a_rerun_resumes(tmp_path):
    src, recs = _records(tmp_path, n=4)
    out = tmp_path / "out.json"
    ep = Endpoint({"Answer 2.": ["empty"] * 10})
    backend = OpenAIBackend(ep.url, "m", None, max_retries=0, max_malformed=1, backoff=0.01)
    try:
        with pytest.raises(ExtendError, match=r"1 record\(s\) failed.*\n  r2: Malformed"):
            generate_extended(src, out, backend, concurrency=2)
        assert not out.exists()
        partial = tmp_path / "out.json.partial.jsonl"
        assert sorted(json.loads(l)["id"] for l in partial.read_text().splitlines()) == ["r0", "r1", "r3"]
        with open(partial, "a") as f:
            f.write('{"id": "r2", "conversa')  # a torn line, as after a kill mid-write
        n_before = len(ep.requests)
        ep.script["Answer 2."] = []
        res = generate_extended(src, out, backend, concurrency=2)
    finally:
        backend.close()
        ep.close()
    assert res["generated"] == 1
    assert {q["answer"] for q in ep.requests[n_before:]} == {"Answer 2.", "Second answer 2."}
    assert [r["id"] for r in json.loads(out.read_text())] == ["r0", "r1", "r2", "r3"]


def test_http_gives_up_after_bounded_retries(tmp_path):
    ep = Endpoint({"A.": ["http500"] * 5, "B.": ["http400"]})
    try:
        with OpenAIBackend(ep.url, "m", None, max_retries=2, backoff=0.01) as backend:
            with pytest.raises(openai.InternalServerError):
                backend.extend("Q?", "A.")
            assert len(ep.requests) == 3
            with pytest.raises(openai.BadRequestError):  # a client error is not retried
                backend.extend("Q?", "B.")
            assert len(ep.requests) == 4
    finally:
        ep.close()
    with pytest.raises(ValueError, match="base URL"):
        OpenAIBackend("", "m", None)
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="--timeout must be a finite number of seconds > 0"):
            OpenAIBackend(ep.url, "m", None, timeout=bad)
    with pytest.raises(ValueError, match="--max-retries must be an integer >= 0"):
        OpenAIBackend(ep.url, "m", None, max_retries=-1)


def test_deadline_bounds_a_trickling_server(tmp_path):
    # the server sends a valid reply one byte every 0.2 s; no socket read ever waits long, so only a
    # deadline on the whole request ends it.  Two attempts of 1 s each, 0.05 s apart.
    ep = Endpoint({"A.": ["trickle", "trickle"]})
    try:
        with OpenAIBackend(ep.url, "m", None, max_retries=1, backoff=0.05, timeout=1.0) as backend:
            t = time.perf_counter()
            with pytest.raises(DeadlineExceeded, match=r"within 1 s \(--timeout\), 2 attempt"):
                backend.extend("Q?", "A.")
            wall = time.perf_counter() - t
    finally:
        ep.close()
    print(f"trickling server: 2 attempts x --timeout 1.0 s + 0.05 s backoff ended after {wall:.2f} s")
    assert len(ep.requests) == 2
    assert 2.0 <= wall < 3.0


def test_cli_timeout_ends_a_trickling_call_and_names_the_record(tmp_path):
    from exgramed_train.__main__ import main
    src, recs = _records(tmp_path, n=1)
    ep = Endpoint({"Answer 0.": ["trickle"]})
    try:
        t = time.perf_counter()
        with pytest.raises(SystemExit) as exc:
            main(["generate-extended", "--data", str(src), "--output", str(tmp_path / "o.json"), "--base-url",
                  ep.url, "--model", "m", "--timeout", "0.5", "--max-retries", "0"])
        wall = time.perf_counter() - t
    finally:
        ep.close()
    assert wall < 2.0
    assert "1 record(s) failed" in str(exc.value)
    assert "r0: DeadlineExceeded: no complete reply" in str(exc.value) and "within 0.5 s (--timeout)" in str(exc.value)
    assert not (tmp_path / "o.json").exists()


def test_cli_rejects_data_that_is_not_json_without_a_traceback(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("id,question\nr0,What?\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "exgramed_train", "generate-extended", "--data", str(bad),
                           "--output", str(tmp_path / "o.json"), "--base-url", "http://127.0.0.1:9/v1",
                           "--model", "m"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"generate-extended: --data {bad}: not JSON (Expecting value at line 1 column 1); "
                                   f"expected a JSON list of LLaVA-Med records")
    from exgramed_train.__main__ import main
    (tmp_path / "obj.json").write_text('{"id": "r0"}')
    with pytest.raises(SystemExit, match=r"--data .*obj.json: expected a JSON list of LLaVA-Med records, got an "
                                         r"object"):
        main(["generate-extended", "--data", str(tmp_path / "obj.json"), "--output", str(tmp_path / "o.json"),
              "--base-url", "http://127.0.0.1:9/v1", "--model", "m"])


def test_local_backend_on_tiny_model(tmp_path, tiny):
    from transformers import AutoTokenizer
    # a local model directory as a user would have it: weights + tokenizer
    d = tmp_path / "local"
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tiny["llm"]).save_pretrained(str(d))
    AutoTokenizer.from_pretrained(tiny["tokenizer"]).save_pretrained(str(d))
    src, recs = _records(tmp_path, n=2)
    backend = LocalBackend(str(d), max_new_tokens=24, min_new_tokens=24)
    res = generate_extended(src, tmp_path / "out.json", backend, concurrency=2)
    assert res["generated"] == 2
    out = json.loads((tmp_path / "out.json").read_text())
    texts = [t["value"] for o in out for t in o["conversations_long"] if t["from"] == "gpt"]
    assert len(texts) == 4 and all(len(t) >= len("Second answer 0.") for t in texts)
    # greedy decoding is deterministic: a second run gives the same texts
    res2 = generate_extended(src, tmp_path / "out2.json", backend, concurrency=1)
    out2 = json.loads((tmp_path / "out2.json").read_text())
    assert res2["generated"] == 2 and out2 == out


def test_cli_reads_endpoint_from_environment(tmp_path, monkeypatch, capsys):
    from exgramed_train.__main__ import main
    src, recs = _records(tmp_path, n=3)
    ep = Endpoint({})
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", ep.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
        monkeypatch.setenv("EXGRAMED_EXTEND_MODEL", "env-model")
        assert main(["generate-extended", "--data", str(src), "--output", str(tmp_path / "o.json"),
                     "--concurrency", "3"]) == 0
    finally:
        ep.close()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["generated"] == 3
    assert {q["model"] for q in ep.requests} == {"env-model"} and {q["auth"] for q in ep.requests} == {"Bearer sk-env"}
    assert len(json.loads((tmp_path / "o.json").read_text())) == 3


def _journal_line(rec):
    """The journal line generate-extended writes for ``rec`` against :class:`Endpoint`."""
    long = [dict(t) if t["from"] == "human" else {"from": "gpt", "value": _reply(t["value"])}
            for t in rec["conversations"]]
    return json.dumps({"id": rec["id"], "conversations_long": long}) + "\n"


def _limit_file_size(limit):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return preexec


def test_a_kill_in_the_middle_of_a_journal_write_is_repaired(tmp_path):
    src, recs = _records(tmp_path, n=5)
    out = tmp_path / "out.json"
    partial = tmp_path / "out.json.partial.jsonl"
    lines = [_journal_line(r).encode() for r in recs]
    # a file-size limit in the middle of the third record: the kernel writes up to the limit, and the
    # write of the rest kills the process with SIGXFSZ -- a real kill while the line is being written
    # (python ignores SIGXFSZ, so the child restores the default action first)
    limit = len(lines[0]) + len(lines[1]) + len(lines[2]) // 2
    child = ("import runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); "
             "sys.argv[0] = 'exgramed_train'; runpy.run_module('exgramed_train', run_name='__main__')")
    ep = Endpoint({})
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OPENAI_API_KEY="",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run([sys.executable, "-c", child, "generate-extended", "--data", str(src),
                               "--output", str(out), "--base-url", ep.url, "--model", "m", "--concurrency", "1"],
                              env=env, capture_output=True, text=True, timeout=300,
                              preexec_fn=_limit_file_size(limit))
        assert proc.returncode == -signal.SIGXFSZ, proc.stderr[-2000:]
        assert partial.read_bytes() == lines[0] + lines[1] + lines[2][:limit - len(lines[0]) - len(lines[1])]
        assert not out.exists()
        n_before = len(ep.requests)
        with OpenAIBackend(ep.url, "m", None, backoff=0.01) as backend:
            res = generate_extended(src, out, backend, concurrency=1)
    finally:
        ep.close()
    assert res["generated"] == 3
    assert {q["answer"] for q in ep.requests[n_before:]} == {f"{a} {i}." for i in (2, 3, 4)
                                                             for a in ("Answer", "Second answer")}
    # the torn fragment was cut off: every line is one whole record, in order
    assert partial.read_bytes() == b"".join(lines)
    assert [r["conversations_long"] for r in json.loads(out.read_text())] == \
        [json.loads(line)["conversations_long"] for line in lines]


def test_repair_tail_completes_a_whole_last_record_and_cuts_a_torn_one(tmp_path):
    p = tmp_path / "j.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}')  # the newline was not written
    assert jsonl.repair_tail(p) == 0
    assert p.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    p.write_text('{"id": "a"}\n{"id": "b", "x": [1, 2')
    assert jsonl.repair_tail(p) == len('{"id": "b", "x": [1, 2')
    assert p.read_text() == '{"id": "a"}\n'
    p.write_bytes(b'{"id": "\xc3')  # a multi-byte character cut in half, on the only line
    assert jsonl.repair_tail(p) == len(b'{"id": "\xc3') and p.read_bytes() == b""
    assert jsonl.repair_tail(tmp_path / "missing.jsonl") == 0
