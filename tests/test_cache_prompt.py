"""Prompt-cache files: ``repo_mlx.cache_prompt``, ``generate --prompt-cache-file``, the server option."""

import http.client
import json
import re
import selectors
import signal
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import save_prompt_cache

import repo_mlx
from repo_mlx import prompt_cache
import synthetic
from repo_mlx.errors import LoadError
from repo_mlx import yarn_scaling

DOCUMENT = "RePo places each token where it belongs. " * 2  # 56 tokens
QUESTION = " Where does a token go?"
STEP = 16  # prefill chunk: the document takes several


def run(module, *args):
    return subprocess.run([sys.executable, "-m", f"repo_mlx.{module}", *args], capture_output=True, text=True)


def greedy(model, tokens, max_tokens=12, **kw):
    gen = generate_step(mx.array(tokens), model, max_tokens=max_tokens, prefill_step_size=STEP, **kw)
    return [int(t) for t, _ in gen]


@pytest.fixture(scope="module")
def document_file(tiny, tmp_path_factory):
    model, tokenizer = tiny
    path = tmp_path_factory.mktemp("cache") / "doc.safetensors"
    tokens = tokenizer.encode(DOCUMENT)
    cache = prompt_cache.prefill(model, tokens, prefill_step_size=STEP)
    prompt_cache.save(path, model, tokens, cache, "fixture")
    return path


def test_tokens_after_cached_prefix_equal_uncached_run(tiny, document_file):
    model, tokenizer = tiny
    doc, question = tokenizer.encode(DOCUMENT), tokenizer.encode(QUESTION)
    assert len(doc) > 3 * STEP
    cache, tokens = prompt_cache.load_for(document_file, model)
    assert tokens == doc and cache[0].offset == len(doc)
    assert greedy(model, question, prompt_cache=cache) == greedy(model, doc + question)


def test_cli_make_then_generate(fixture_path, tiny, tmp_path):
    model, tokenizer = tiny
    out = tmp_path / "doc.safetensors"
    (tmp_path / "doc.txt").write_text(DOCUMENT)
    r = run("cache_prompt", "--model", str(fixture_path), "--prompt-file", str(tmp_path / "doc.txt"),
            "--prompt-cache-file", str(out), "--prefill-step-size", str(STEP))
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(rf"Saved the cache of {len(tokenizer.encode(DOCUMENT))} tokens to \S+ \([\d.]+ MB\); "
                        r"peak memory [\d.]+ GB\.\n", r.stdout)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no scratch file left
    r = run("generate", "--model", str(fixture_path), "--prompt-cache-file", str(out),
            "--prompt", QUESTION, "-m", "10", "--verbose", "0")
    assert r.returncode == 0, r.stderr
    expected = repo_mlx.generate(model, tokenizer, tokenizer.encode(DOCUMENT) + tokenizer.encode(QUESTION), max_tokens=10)
    assert r.stdout == expected + "\n"


def refusal(path, model) -> str:
    with pytest.raises(LoadError) as e:
        prompt_cache.load_for(path, model)
    return str(e.value)


def test_other_settings_and_models_are_refused(fixture_path, document_file, tmp_path):
    yarn, _ = repo_mlx.load(str(fixture_path), model_config=yarn_scaling(2))
    assert "was made with YaRN off but this run uses YaRN x2" in refusal(document_file, yarn)
    plain, _ = repo_mlx.load(str(fixture_path), model_config={"position_blend": 1.0})
    assert "made with --position-blend 0 but this run uses --position-blend 1" in refusal(document_file, plain)
    half, _ = repo_mlx.load(str(fixture_path), dtype="bfloat16")
    assert "made with float32 but this run uses bfloat16" in refusal(document_file, half)
    # Same config and shapes, other weights.
    other = synthetic.write_checkpoint(tmp_path / "other", synthetic.config(), seed=1)
    model, _ = repo_mlx.load(str(other))
    assert "was made for another model (fixture, fingerprint" in refusal(document_file, model)
    # A plain mlx-lm cache file records no model.
    bare = tmp_path / "bare.safetensors"
    save_prompt_cache(str(bare), prompt_cache.read(document_file)[0])
    assert "has no record of the RePo model" in refusal(bare, model)


def test_cli_refusals_are_one_line(fixture_path, document_file, tmp_path):
    r = run("generate", "--model", str(fixture_path), "--prompt-cache-file", str(document_file), "--yarn", "2", "-p", "x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: ") and "YaRN off" in r.stderr
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(document_file.read_bytes()[:-100])
    r = run("generate", "--model", str(fixture_path), "--prompt-cache-file", str(truncated), "-p", "x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: {truncated} is truncated (")
    r = run("generate", "--model", str(fixture_path), "--prompt-cache-file", str(document_file), "--max-kv-size", "64")
    assert r.returncode == 2 and "--max-kv-size cannot be used with --prompt-cache-file" in r.stderr
    r = run("cache_prompt", "--model", str(fixture_path), "-p", "x", "--prompt-cache-file", str(tmp_path / "c.npz"))
    assert r.returncode == 2 and r.stderr == f"error: --prompt-cache-file {tmp_path / 'c.npz'} must end in .safetensors.\n"


def test_server_puts_the_document_before_every_request(fixture_path, tiny, document_file):
    model, tokenizer = tiny
    proc = subprocess.Popen(
        [sys.executable, "-m", "repo_mlx.server", "--port", "0", "--model", str(fixture_path),
         "--prompt-cache-file", str(document_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        line = proc.stdout.readline() if sel.select(120) else ""
        port = int(re.search(r"127\.0\.0\.1:(\d+)/v1", line).group(1))
        for question in (QUESTION, " And why?", QUESTION):  # the last reuses a trimmed cache
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            body = {"prompt": question, "max_tokens": 8, "temperature": 0}
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            reply = json.loads(conn.getresponse().read())
            conn.close()
            tokens = tokenizer.encode(DOCUMENT) + tokenizer.encode(question)
            assert reply["choices"][0]["text"] == repo_mlx.generate(model, tokenizer, tokens, max_tokens=8)
            assert reply["usage"]["prompt_tokens"] == len(tokens)
            assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(tokenizer.encode(DOCUMENT))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
