"""``python -m repo_mlx.server`` over real HTTP on 127.0.0.1, against the tiny fixture."""

import http.client
import io
import json
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import make_sampler
from mlx_lm.server import Response, convert_chat

import repo_mlx
from repo_mlx.server import Limits, RequestError, check_request, cut_at_stop

TIMEOUT = 120  # seconds; the CPU may be shared with other jobs
DOCS = Path(__file__).parents[1] / "docs"


def app_section() -> str:
    """The docs' examples for apps (docs/usage.md's Python API, docs/server.md's
    curl calls), which must run."""
    usage = (DOCS / "usage.md").read_text()
    return usage[usage.index("## Use it from an app") :] + (DOCS / "server.md").read_text()


PROMPT = "Hello world"


def start_server(*args, stderr):
    """A server process and its port, read from the line it prints when ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "repo_mlx.server", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    line = proc.stdout.readline() if sel.select(TIMEOUT) else ""
    sel.close()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/v1|http://0\.0\.0\.0:(\d+)/v1", line)
    if not match:
        proc.kill()
        proc.wait()
        raise AssertionError(f"server did not start: {line!r}")
    return proc, int(match.group(1) or match.group(2))


def stop_server(proc):
    proc.send_signal(signal.SIGINT)  # as Ctrl-C: the server shuts down cleanly
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(fixture_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "stderr.txt"
    with open(log, "w") as err:
        proc, port = start_server("--model", str(fixture_path), "--log-level", "INFO", stderr=err)
        try:
            yield {"port": port, "log": log, "proc": proc, "model": str(fixture_path)}
        finally:
            assert stop_server(proc) == 130  # "interrupted", after a clean shutdown


def request(server, method, path, body=None, headers=None):
    """(status, parsed JSON) of one request; ``body`` may be a dict or raw bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=TIMEOUT)
    try:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        conn.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def post(server, path, body, **kw):
    return request(server, "POST", path, body, **kw)


def stream(server, path, body):
    """The JSON events of a streamed reply, checking it ends with ``data: [DONE]``."""
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=TIMEOUT)
    try:
        conn.request("POST", path, json.dumps({**body, "stream": True}))
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
        data = [line[6:] for line in r.read().decode().split("\n") if line.startswith("data: ")]
    finally:
        conn.close()
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def reference(tiny, prompt, max_tokens, **kw):
    """Text and tokens of repo_mlx.generate for the same request."""
    model, tokenizer = tiny
    tokens = [r.token for r in repo_mlx.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kw)]
    return repo_mlx.generate(model, tokenizer, prompt, max_tokens=max_tokens, **kw), tokens


def choice(reply):
    return reply["choices"][0]


# --- endpoints ---------------------------------------------------------------


def test_models_lists_the_one_served_model(server):
    status, reply = request(server, "GET", "/v1/models")
    assert status == 200
    assert [m["id"] for m in reply["data"]] == [server["model"]]
    status, card = request(server, "GET", "/v1/models/" + server["model"])
    assert status == 200 and card["id"] == server["model"] and card["object"] == "model"
    assert request(server, "GET", "/v1/models/other")[0] == 404
    assert request(server, "GET", "/health") == (200, {"status": "ok"})


def test_completion_matches_generate_and_is_deterministic(server, tiny):
    text, tokens = reference(tiny, PROMPT, 12)
    assert tokens[-1] not in tiny[1].eos_token_ids  # so the reply ends by length
    body = {"prompt": PROMPT, "max_tokens": 12, "logprobs": 0}
    first = post(server, "/v1/completions", body)
    second = post(server, "/v1/completions", body)  # served from the prompt cache
    for status, reply in (first, second):
        assert status == 200
        assert reply["object"] == "text_completion" and reply["model"] == server["model"]
        assert choice(reply)["text"] == text
        logprobs = choice(reply)["logprobs"]  # OpenAI's completions shape
        assert logprobs["tokens"] == [tiny[1].decode([t]) for t in tokens]
        assert len(logprobs["token_logprobs"]) == 12 and logprobs["top_logprobs"] is None
        assert choice(reply)["finish_reason"] == "length"
        n = len(tiny[1].encode(PROMPT))
        assert {k: reply["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == {
            "prompt_tokens": n, "completion_tokens": 12, "total_tokens": n + 12}
    assert second[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_chat_without_template_uses_the_plain_transcript(server, tiny):
    assert not tiny[1].has_chat_template  # like the released base model
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    ]
    prompt = convert_chat([messages[0], {"role": "user", "content": "Hi there"}])
    assert prompt.endswith("USER: Hi there\nASSISTANT:")
    text, _ = reference(tiny, prompt, 16)
    assert "\nUSER:" not in text  # else the server would (rightly) stop there
    status, reply = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 16})
    assert status == 200 and reply["object"] == "chat.completion"
    assert choice(reply)["message"] == {"role": "assistant", "content": text}
    assert reply["usage"]["prompt_tokens"] == len(tiny[1].encode(prompt))
    assert reply["usage"]["completion_tokens"] == 16


def test_streaming_completion_and_chat(server):
    body = {"prompt": PROMPT, "max_tokens": 10, "stream_options": {"include_usage": True}}
    whole = post(server, "/v1/completions", body)[1]
    events = stream(server, "/v1/completions", body)
    *chunks, usage = events
    assert "".join(choice(c)["text"] for c in chunks) == choice(whole)["text"]
    assert [choice(c)["finish_reason"] for c in chunks][-1] == "length"
    assert all(choice(c)["finish_reason"] is None for c in chunks[:-1])
    assert usage["usage"]["completion_tokens"] == 10
    assert usage["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]

    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10}
    whole = post(server, "/v1/chat/completions", body)[1]
    events = stream(server, "/v1/chat/completions", body)
    assert all(e["object"] == "chat.completion.chunk" and "usage" not in e for e in events)
    text = "".join(choice(e)["delta"].get("content", "") for e in events)
    assert text == choice(whole)["message"]["content"]
    assert choice(events[-1])["finish_reason"] == "length"


def test_stop_strings_end_the_reply(server, tiny):
    text, _ = reference(tiny, PROMPT, 20)
    stop = text[6:8]
    cut = text.index(stop)
    assert 0 < cut < len(text) - 2
    body = {"prompt": PROMPT, "max_tokens": 20, "stop": ["never there", stop]}
    reply = post(server, "/v1/completions", body)[1]
    assert choice(reply)["text"] == text[:cut]
    assert choice(reply)["finish_reason"] == "stop"
    events = stream(server, "/v1/completions", body)
    assert "".join(choice(e)["text"] for e in events) == text[:cut]
    assert choice(events[-1])["finish_reason"] == "stop"


@pytest.mark.parametrize("top_p", [1.0, 0.5])
def test_seed_temperature_and_top_p(server, tiny, top_p):
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "top_p": top_p, "seed": 7}
    a = choice(post(server, "/v1/completions", body)[1])["text"]
    b = choice(post(server, "/v1/completions", body)[1])["text"]
    c = choice(post(server, "/v1/completions", {**body, "seed": 8})[1])["text"]
    assert a == b != c
    mx.random.seed(7)
    model, tokenizer = tiny
    expected = repo_mlx.generate(model, tokenizer, PROMPT, max_tokens=12, sampler=make_sampler(1.0, top_p))
    assert a == expected


def test_null_fields_take_defaults(server):
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": None, "stop": None, "seed": None, "stream": None}
    status, reply = post(server, "/v1/completions", body)
    assert status == 200 and reply["usage"]["completion_tokens"] == 5


# --- bad requests ------------------------------------------------------------

BAD = {
    "malformed JSON": (b'{"prompt": "x", ', 400),
    "not an object": (b'["x"]', 400),
    "not UTF-8": (b'{"prompt": "\xff"}', 400),
    "NaN": (b'{"prompt": "x", "temperature": NaN}', 400),
    "overflowing number": (b'{"prompt": "x", "temperature": 1e999}', 400),
    "negative max_tokens": ({"prompt": "x", "max_tokens": -1}, 400),
    "zero max_tokens": ({"prompt": "x", "max_tokens": 0}, 400),
    "huge max_tokens": ({"prompt": "x", "max_tokens": 10**12}, 400),
    "max_tokens over the context": ({"prompt": "x", "max_tokens": 4097}, 400),
    "boolean max_tokens": ({"prompt": "x", "max_tokens": True}, 400),
    "string max_tokens": ({"prompt": "x", "max_tokens": "10"}, 400),
    "string temperature": ({"prompt": "x", "temperature": "hot"}, 400),
    "negative temperature": ({"prompt": "x", "temperature": -1}, 400),
    "top_p above 1": ({"prompt": "x", "top_p": 1.5}, 400),
    "negative seed": ({"prompt": "x", "seed": -1}, 400),
    "huge seed": ({"prompt": "x", "seed": 2**64}, 400),
    "string stream": ({"prompt": "x", "stream": "yes"}, 400),
    "stream_options not an object": ({"prompt": "x", "stream": True, "stream_options": 1}, 400),
    "numeric stop": ({"prompt": "x", "stop": 5}, 400),
    "empty stop": ({"prompt": "x", "stop": [""]}, 400),
    "logit_bias past the vocabulary": ({"prompt": "x", "logit_bias": {"320": 5}}, 400),
    "token ids past the vocabulary": ({"prompt": [1, 320]}, 400),
    "token ids and text mixed": ({"prompt": [1, "x"]}, 400),
    "empty prompt list": ({"prompt": []}, 400),
    "streamed prompt list": ({"prompt": ["x", "y"], "stream": True}, 400),
    "boolean logprobs on completions": ({"prompt": "x", "logprobs": True}, 400),
    "logprobs above 5 on completions": ({"prompt": "x", "logprobs": 6}, 400),
    "top_logprobs on completions": ({"prompt": "x", "logprobs": 1, "top_logprobs": 2}, 400),
    "negative repetition_penalty (mlx-lm's check)": ({"prompt": "x", "repetition_penalty": -1}, 400),
    "empty prompt": ({"prompt": ""}, 400),
    "no prompt": ({"max_tokens": 3}, 400),
    "n above 1": ({"prompt": "x", "n": 2}, 400),
    "adapters": ({"prompt": "x", "adapters": "elsewhere"}, 400),
    "numeric model": ({"prompt": "x", "model": 3}, 400),
    "JSON nested 65 deep": ({"prompt": "x", "user": json.loads("[" * 64 + "]" * 64)}, 400),
    "JSON nested past Python's parser": (b'{"prompt": "x", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
    "prompt over the context": ({"prompt": "word " * 1000}, 400),
}
BAD_CHAT = {
    "messages not a list": ({"messages": "hi"}, 400),
    "no messages": ({"messages": []}, 400),
    "message without role": ({"messages": [{"content": "hi"}]}, 400),
    "unknown role": ({"messages": [{"role": "narrator", "content": "hi"}]}, 400),
    "null content": ({"messages": [{"role": "user", "content": None}]}, 400),
    "image part": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]},
        400,
    ),
    "role_mapping not strings": ({"messages": [{"role": "user", "content": "hi"}], "role_mapping": {"user": 1}}, 400),
    "top_logprobs above 11 (mlx-lm's check)": ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 12}, 400),
    "string logprobs (mlx-lm's check)": ({"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}, 400),
}


def check_error(status, reply, expected):
    assert status == expected
    message = reply["error"]["message"]  # OpenAI's shape, which its clients show
    assert isinstance(message, str) and message


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_completion_requests_get_4xx_json(server, name):
    body, expected = BAD[name]
    check_error(*post(server, "/v1/completions", body), expected)


@pytest.mark.parametrize("name", sorted(BAD_CHAT))
def test_bad_chat_requests_get_4xx_json(server, name):
    body, expected = BAD_CHAT[name]
    check_error(*post(server, "/v1/chat/completions", body), expected)


def raw_exchange(server, head: bytes) -> tuple:
    """Send raw request bytes; (status, JSON) of the reply."""
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=TIMEOUT) as s:
        s.sendall(head)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    header, _, body = reply.partition(b"\r\n\r\n")
    return int(header.split()[1]), json.loads(body)


def test_bad_framing_gets_4xx_json(server):
    # An oversized body is refused (and dropped); a huge one from its Content-Length alone.
    check_error(*post(server, "/v1/completions", b'{"prompt": "' + b"a" * (2 << 20) + b'"}'), 413)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n"
    check_error(*raw_exchange(server, head), 413)
    check_error(*raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n"), 411)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"
    check_error(*raw_exchange(server, head), 400)
    check_error(*post(server, "/v1/nothing", {"prompt": "x"}), 404)
    check_error(*request(server, "GET", "/nothing"), 404)
    # What http.server answers itself is JSON too (it wrote HTML pages).
    check_error(*request(server, "DELETE", "/v1/models"), 501)
    check_error(*raw_exchange(server, b"GET /health HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n"), 431)


def test_token_prompts_are_served_as_their_text(server, tiny):
    """OpenAI's prompt of token ids, alone or in a list, gives what its text gives."""
    ids = tiny[1].encode(PROMPT)
    text, _ = reference(tiny, PROMPT, 6)
    for prompt in (ids, [ids, PROMPT]):
        status, reply = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 6})
        assert status == 200 and [c["text"] for c in reply["choices"]] == [text] * (1 + isinstance(prompt[0], list))
    assert "".join(choice(e)["text"] for e in stream(server, "/v1/completions", {"prompt": ids, "max_tokens": 6})) == text


def test_other_web_origins_are_refused(server):
    headers = {"Origin": "http://evil.example"}
    check_error(*post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2}, headers=headers), 403)
    check_error(*request(server, "GET", "/v1/models", headers=headers), 403)


def test_still_serving_after_bad_requests(server, tiny):
    for body, _ in list(BAD.values()):
        post(server, "/v1/completions", body)
    text, _ = reference(tiny, "still there?", 8)
    status, reply = post(server, "/v1/completions", {"prompt": "still there?", "max_tokens": 8})
    assert status == 200 and choice(reply)["text"] == text


# --- load and disconnects ----------------------------------------------------


def test_eight_concurrent_requests(server, tiny):
    prompts = [f"Request {i}: " + "la " * i for i in range(8)]
    expected = [reference(tiny, p, 24)[0] for p in prompts]
    results = [None] * 8

    def run(i):
        body = {"prompt": prompts[i], "max_tokens": 24}
        if i % 2:
            results[i] = "".join(choice(e)["text"] for e in stream(server, "/v1/completions", body))
        else:
            status, reply = post(server, "/v1/completions", body)
            results[i] = choice(reply)["text"] if status == 200 else f"HTTP {status}"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert results == expected


def test_burst_of_200_health_checks(server):
    """All answered: with socketserver's listen backlog of 5, most timed out or were reset."""
    start, statuses = threading.Barrier(200), []

    def run():
        start.wait(TIMEOUT)
        conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=20)
        try:
            conn.request("GET", "/health")
            statuses.append(conn.getresponse().status)
        except OSError as e:
            statuses.append(type(e).__name__)
        finally:
            conn.close()

    threads = [threading.Thread(target=run) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert statuses == [200] * 200


def test_prompt_over_the_limit_is_refused_before_prefill(server):
    status, reply = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 1000}], "stream": True})
    message = reply["error"]["message"]
    assert status == 400 and "more than this server's limit of 4096 (--max-prompt-tokens)" in message
    # Nesting up to the limit is served.
    status, reply = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "user": json.loads("[" * 63 + "]" * 63)})
    assert status == 200


def test_yarn_raises_the_prompt_limit(fixture_path, tmp_path):
    with open(tmp_path / "stderr.txt", "w") as err:
        proc, port = start_server("--model", str(fixture_path), "--yarn", "2", "--max-tokens", "1", stderr=err)
        try:
            status, reply = post({"port": port}, "/v1/completions", {"prompt": "word " * 1700})
            assert status == 400 and "limit of 8192" in reply["error"]["message"]
        finally:
            stop_server(proc)


def log_lines_with(server, text: str, at_least: int) -> int:
    deadline = time.time() + TIMEOUT
    while (n := server["log"].read_text().count(text)) < at_least and time.time() < deadline:
        time.sleep(0.2)
    return n


def test_client_disconnect_mid_stream(server, tiny):
    before = server["log"].read_text().count("disconnected")
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=TIMEOUT) as s:
        body = json.dumps({"prompt": PROMPT, "max_tokens": 4000, "stream": True}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        seen = b""
        while b"data: {" not in seen:  # the reply is streaming
            chunk = s.recv(4096)
            assert chunk, "the server closed the stream"
            seen += chunk
    # The server notices and stops generating for the client that left.
    assert log_lines_with(server, "disconnected", before + 1) > before
    # Clients that reset the connection before the reply: one line each, no traceback.
    for head in (b"GET /health HTTP/1.1\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\nContent-Length: 9\r\n\r\n{"):
        with socket.create_connection(("127.0.0.1", server["port"]), timeout=TIMEOUT) as s:
            s.sendall(head)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert log_lines_with(server, "disconnected", before + 3) == before + 3
    assert "Traceback" not in server["log"].read_text()
    text, _ = reference(tiny, PROMPT, 8)
    status, reply = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8})
    assert status == 200 and choice(reply)["text"] == text
    assert server["proc"].poll() is None


# --- pure request checks -----------------------------------------------------

LIMITS = Limits(max_tokens=4096, vocab_size=320)


def test_check_request_normalizes():
    body = check_request({"prompt": "x", "stop": "a", "seed": None}, "/v1/completions", LIMITS, "m", False)
    assert body == {"prompt": "x", "stop": ["a"], "model": "m", "stream_options": {"include_usage": False}}
    assert check_request({"prompt": ["x", [1, 2]]}, "/v1/completions", LIMITS, "m", False)["prompts"] == ["x", [1, 2]]
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                         {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]}
    body = check_request(chat, "/v1/chat/completions", LIMITS, "m", False)
    assert [m["content"] for m in body["messages"]] == ["ab", ""] and body["stop"] == ["\nUSER:"]
    # With a chat template, or a custom transcript, the server adds no stop string.
    assert check_request(chat, "/v1/chat/completions", LIMITS, "m", True)["stop"] == []
    custom = {**chat, "role_mapping": {"user": "Q: ", "assistant": "A: "}}
    assert check_request(custom, "/v1/chat/completions", LIMITS, "m", False)["stop"] == []
    with pytest.raises(RequestError, match="max_tokens"):
        check_request({"prompt": "x", "max_tokens": 4097}, "/v1/completions", LIMITS, "m", False)


def test_request_attributes_are_mlx_lm_s():
    """The server sets the request attributes mlx-lm's own do_POST sets for the same body:
    mlx-lm's defaults for the fields a request leaves out, the request's values otherwise."""
    import mlx_lm.server
    from repo_mlx.server import DefaultsProbe, Handler

    cli = types.SimpleNamespace(num_draft_tokens=3, max_tokens=9, temp=0.25, top_p=0.5, top_k=4, min_p=0.125)

    class Probe(mlx_lm.server.APIHandler):
        def __init__(self, body):  # no socket: just what do_POST reads
            self.path, self.headers = "/v1/completions", {"Content-Length": str(len(body))}
            self.rfile = io.BytesIO(body)
            self.response_generator = types.SimpleNamespace(cli_args=cli)

        def validate_model_parameters(self):
            raise StopIteration  # everything is read by now

    given = {"max_completion_tokens": 7, "max_tokens": 3, "temperature": 0.5, "top_k": 2, "xtc_threshold": 0.2,
             "repetition_context_size": 5, "frequency_penalty": 1.5, "logit_bias": {"1": 2.0}, "seed": 3,
             "adapter": "a", "requested_draft_model": "d"}  # not fields: mlx-lm reads adapters and draft_model
    for fields in ({}, given):
        body = {"prompt": "x", "model": "m", "stream_options": {"include_usage": False}, **fields}
        probe = Probe(json.dumps(body).encode())
        with pytest.raises(StopIteration):
            probe.do_POST()
        handler = Handler.__new__(Handler)  # no socket either
        handler.response_generator = types.SimpleNamespace(cli_args=cli, request_defaults=DefaultsProbe(cli).defaults())
        handler.read_request(check_request(body, "/v1/completions", LIMITS, "m", False))
        stand_in = ("body", "path", "headers", "rfile", "response_generator")
        expected = {k: v for k, v in vars(probe).items() if k not in stand_in}
        assert len(expected) == 24 and {k: getattr(handler, k) for k in expected} == expected
    assert handler.max_tokens == 7 and handler.xtc_threshold == 0.2 and handler.temperature == 0.5


def test_the_server_uses_mlx_lm_s_public_seams():
    """No private mlx-lm method overridden, no request stream replaced."""
    import ast

    import repo_mlx.server

    tree = ast.parse(Path(repo_mlx.server.__file__).read_text())
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for f in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
            assert not (f.name.startswith("_") and not f.name.startswith("__")), f"{cls.name}.{f.name}"
    # DefaultsProbe reads mlx-lm's defaults once from an empty body of its own, serving no client.
    probe = {id(n) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == "DefaultsProbe" for n in ast.walk(c)}
    assert probe
    targets = [t for n in ast.walk(tree) if isinstance(n, ast.Assign) and id(n) not in probe for t in n.targets]
    targets += [e for t in targets if isinstance(t, ast.Tuple) for e in t.elts]
    assert not [t.attr for t in targets if isinstance(t, ast.Attribute) and t.attr in ("rfile", "wfile")]
    # Nor as a keyword (``vars(handler).update(rfile=...)``).
    assert not [n.arg for n in ast.walk(tree) if isinstance(n, ast.keyword) and n.arg in ("rfile", "wfile")]


def responses(*texts, last="length"):
    return [Response(t, i, 0.0, last if i == len(texts) - 1 else None, ()) for i, t in enumerate(texts)]


def test_cut_at_stop_matches_text_across_tokens():
    # The stop string spans tokens and starts inside one: its text decides, not its tokens.
    out = list(cut_at_stop(responses("Hello. ", "Bye\n", "\nmore", "x"), ["\n\n"]))
    assert [r.text for r in out] == ["Hello. ", "Bye", ""]  # "\n" held back, then dropped
    assert out[-1].finish_reason is None  # mlx-lm's handler then reports "stop"
    out = list(cut_at_stop(responses("ab", "cSTOPd"), ["STOP", "zz"]))
    assert [r.text for r in out] == ["ab", "c"]
    # The first stop string to complete wins; without a match everything passes through.
    assert [r.text for r in cut_at_stop(responses("xabcd"), ["abcd", "bc"])] == ["xa"]
    assert list(cut_at_stop(responses("a", "b"), ["zz"])) == responses("a", "b")
    # Text held back for a stop string that never completes comes out at the end,
    # also at end of text, which then ends with finish_reason None ("stop" to mlx-lm).
    out = list(cut_at_stop(responses("a", "z", last="stop"), ["zz"]))
    assert [(r.text, r.finish_reason) for r in out] == [("a", None), ("z", None)]
    out = list(cut_at_stop(responses("a", "z", "y"), ["zz"]))
    assert [(r.text, r.finish_reason) for r in out] == [("a", None), ("", None), ("zy", "length")]


# --- the command line --------------------------------------------------------


def test_adapter_path(fixture_path, tmp_path, tiny):
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    # A LoRA adapter with random B, so that it changes what the model says.
    model, tokenizer = repo_mlx.load(str(fixture_path))
    lora = {"rank": 4, "scale": 10.0, "dropout": 0.0}
    linear_to_lora_layers(model, 4, lora)
    mx.random.seed(0)
    weights = {k: mx.random.normal(v.shape) * 0.5 if k.endswith("lora_b") else v
               for k, v in tree_flatten(model.parameters()) if ".lora_" in k}
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), weights)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 4, "lora_parameters": lora}))
    adapted = repo_mlx.load(str(fixture_path), adapter_path=str(tmp_path))
    expected = repo_mlx.generate(*adapted, PROMPT, max_tokens=12)
    assert expected != repo_mlx.generate(*tiny, PROMPT, max_tokens=12)

    with open(tmp_path / "stderr.txt", "w") as err:
        proc, port = start_server("--model", str(fixture_path), "--adapter-path", str(tmp_path), stderr=err)
        try:
            status, reply = post({"port": port}, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12})
        finally:
            stop_server(proc)
    assert status == 200 and choice(reply)["text"] == expected


def test_non_loopback_host_warns(fixture_path, tmp_path):
    # Binds all interfaces but sends no traffic at all; only the warning is checked.
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc, _ = start_server("--model", str(fixture_path), "--host", "0.0.0.0", stderr=err)
        stop_server(proc)
    assert "[WARNING] Listening on 0.0.0.0" in log.read_text()


def test_loopback_host_does_not_warn(server):
    assert "Listening on" not in server["log"].read_text()


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "repo_mlx.server", *args], capture_output=True, text=True, timeout=TIMEOUT
    )


def test_bad_command_lines_are_one_line_errors(fixture_path, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        cases = [
            (["--model", str(tmp_path / "missing"), "--port", "0"], "does not exist"),
            (["--model", str(fixture_path), "--port", "70000"], "--port"),
            (["--model", str(fixture_path), "--max-tokens", "0", "--port", "0"], "--max-tokens"),
            (["--model", str(fixture_path), "--port", port], "Cannot listen"),
            (["--model", str(fixture_path), "--max-tokens", "5000", "--port", "0"], "above the limit"),
        ]
        for args, message in cases:
            r = run_cli(*args)
            assert r.returncode == 2, r.stderr
            assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr


# --- docs: "Use it from an app" ---------------------------------------------


def test_apps_doc_python_example_runs(fixture_path, tiny):
    code = re.findall(r"```python\n(.*?)```", app_section(), re.S)[0]
    assert repo_mlx.DEFAULT_MODEL in code
    code = code.replace(repo_mlx.DEFAULT_MODEL, str(fixture_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    model, tokenizer = tiny
    assert r.stdout.startswith(repo_mlx.generate(model, tokenizer, "The capital of France is", max_tokens=20) + "\n")
    # Sampled without a seed: it may stop early at end of text.
    done = re.search(r"^\[(\d+) tokens, \d+ tokens/s\]$", r.stdout, re.M)
    assert done and 1 <= int(done.group(1)) <= 40
    assert [int(m) for m in re.findall(r"^(\d+) \(1, 4, \d+\) \[", r.stdout, re.M)] == [1, 2, 3]


def test_apps_doc_curl_examples_are_served(server):
    examples = re.findall(r"curl (?:-N )?http://127\.0\.0\.1:8080(/v1/\S+) .*?-d '(.*?)'", app_section(), re.S)
    assert len(examples) == 3
    for path, body in examples:
        body = json.loads(body)
        if body.get("stream"):
            assert stream(server, path, body)[-1]["usage"]["completion_tokens"] > 0
        else:
            status, reply = post(server, path, body)
            assert status == 200 and reply["usage"]["completion_tokens"] > 0
