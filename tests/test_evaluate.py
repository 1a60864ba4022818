"""python -m repo_mlx.evaluate: perplexity, synthetic tasks, blends side by side."""

import json
import random
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import repo_mlx
from repo_mlx import evaluate, tasks
from repo_mlx import LoadError
from repo_mlx import set_position_blend, yarn_scaling


@pytest.fixture(scope="module")
def text():
    rng = random.Random(5)
    return " ".join(tasks.filler_sentence(rng) for _ in range(8))  # about 350 tokens


@pytest.fixture
def blend(tiny):
    """Set the shared model's position blend for one test, then restore it."""
    yield lambda b: set_position_blend(tiny[0], b)
    set_position_blend(tiny[0], 0.0)


def log_softmax64(logits):
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def reference_nll(model, tokens, window, stride):
    """Mean NLL from full-window forward passes: token t is scored in the first
    window (start k * stride) that holds it with at least one token before it."""
    cache, total, count = {}, 0.0, 0
    for t in range(1, len(tokens)):
        k = max(0, -(-(t - window + 1) // stride))
        start = k * stride
        if start == t:  # first token of a window (stride == window): no context
            continue
        if start not in cache:
            cache[start] = log_softmax64(model(mx.array(tokens[start : start + window])[None])[0])
        total -= cache[start][t - 1 - start, tokens[t]]
        count += 1
    return total / count, count


def test_windows_cover_every_token_once():
    assert evaluate.windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert evaluate.windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert evaluate.windows(3, 8, 8) == [(0, 3, 1)]
    for n, w, s in [(50, 8, 3), (51, 16, 16), (9, 2, 1)]:
        scored = [t for _, end, first in evaluate.windows(n, w, s) for t in range(first, end)]
        expected = [t for t in range(1, n) if s < w or t % w]
        assert scored == expected


@pytest.mark.parametrize("window, stride, position_blend", [(128, 64, 0.0), (96, 96, 0.0), (128, 64, 1.0)])
def test_perplexity_equals_an_independent_computation(tiny, text, blend, window, stride, position_blend):
    model, tokenizer = tiny
    blend(position_blend)
    tokens = tokenizer.encode(text)
    assert len(tokens) > 2.5 * window
    got = evaluate.perplexity(model, tokens, window, stride)
    nll, count = reference_nll(model, tokens, window, stride)
    assert got["tokens"] == count
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["perplexity"] == pytest.approx(np.exp(nll), rel=1e-5)


@pytest.mark.parametrize("position_blend", [0.0, 1.0])  # 1: integer positions follow the cache offset
def test_window_nll_is_the_same_in_chunks(tiny, text, blend, position_blend):
    model, tokenizer = tiny
    blend(position_blend)
    ids = tokenizer.encode(text)[:200]
    whole = evaluate.window_nll(model, ids, 1, chunk=512)
    lp = log_softmax64(model(mx.array(ids)[None])[0])
    ref = -sum(lp[t - 1, ids[t]] for t in range(70, 200))
    assert evaluate.window_nll(model, ids, 70, chunk=32) == pytest.approx(ref, rel=1e-5)
    assert evaluate.window_nll(model, ids, 1, chunk=48) == pytest.approx(whole, rel=1e-5)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_samples_are_deterministic_and_sized(tiny, task):
    tokenizer = tiny[1]
    a = tasks.make_samples(task, tokenizer, 800, 3, seed=7)
    assert a == tasks.make_samples(task, tokenizer, 800, 3, seed=7)
    assert a != tasks.make_samples(task, tokenizer, 800, 3, seed=8)
    assert len({s.prompt for s in a}) == 3
    for s in a:
        n = len(tokenizer.encode(s.prompt))
        assert s.prompt_tokens == n and 800 - 100 < n <= 800  # filled up to the budget, never past it
        for ans in s.answers:
            assert tasks.score(s.prompt.split("Question:")[0], [ans]) == 1.0  # the needle is there


def test_needles_and_distractors(tiny):
    tokenizer = tiny[1]
    multi = tasks.make_sample("niah_multikey", tokenizer, 900, seed=0)
    assert multi.prompt.count("One of the special magic numbers for") == 4
    kv = tasks.make_sample("kv_retrieval", tokenizer, 900, seed=0)
    pairs = json.loads(kv.prompt[kv.prompt.index("{") : kv.prompt.index("}") + 1])
    key = kv.prompt.split('Question: What is the value of key "')[1].split('"')[0]
    assert len(pairs) > 5 and pairs[key] == kv.answers[0]
    vt = tasks.make_sample("variable_tracking", tokenizer, 900, seed=0)
    names = vt.answers
    value = vt.prompt.split("hold the value ")[-1].split()[0]
    assert len(names) == 5 and len(re.findall(r"VAR [A-Z]{5} = ", vt.prompt)) == 10  # two chains
    # The asked chain starts at its value and is assigned in order through the text.
    steps = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    at = [vt.prompt.index(s) for s in steps]
    assert at == sorted(at)


def test_score_on_hand_made_answers():
    assert tasks.score("1234567.", ["1234567"]) == 1.0
    assert tasks.score("is 12345678", ["1234567"]) == 0.0
    assert tasks.score("is 91234567", ["1234567"]) == 0.0
    assert tasks.score("is 1234 567", ["1234567"]) == 0.0
    assert tasks.score("FFEZP, vrzka and QQQQQ", ["FFEZP", "VRZKA", "XZJUT", "RQJSZ"]) == 0.5
    uuid = "1b8c078d-8a31-e7fd-e0fe-e7fbd38dd39f"
    assert tasks.score(f' "{uuid}",', [uuid]) == 1.0
    assert tasks.score(f' "{uuid[:-1]}",', [uuid]) == 0.0
    assert tasks.first_line("\n  is 42.\nQuestion: and") == "is 42."
    assert tasks.first_line(" \n") == ""


def test_answer_is_the_greedy_continuation(tiny):
    model, tokenizer = tiny
    sample = tasks.make_sample("niah_single", tokenizer, 300, seed=3)
    got = evaluate.answer(model, tokenizer, sample.prompt, sample.max_tokens)
    ids, out = tokenizer.encode(sample.prompt), []
    for _ in range(sample.max_tokens):  # no cache: a full forward per token
        token = int(np.argmax(np.array(model(mx.array(ids + out)[None])[0, -1])))
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
        if "\n" in tokenizer.decode(out).lstrip():
            break
    assert got == tokenizer.decode(out) and got


def test_cli_blends_side_by_side(tiny, fixture_path, text, tmp_path, capsys):
    model, tokenizer = tiny
    (tmp_path / "data.txt").write_text(text)
    evaluate.command(
        [
            "--model", str(fixture_path), "--task", "perplexity,niah_single",
            "--data", str(tmp_path / "data.txt"), "--window", "128",
            "--lengths", "300", "--samples", "2", "--position-blend", "0,1",
            "--output", str(tmp_path / "out.json"),
        ]
    )
    out = capsys.readouterr().out
    assert "RePo (blend 0)" in out and "RoPE (blend 1)" in out
    report = json.loads((tmp_path / "out.json").read_text())
    rows = {(r["task"], r["position_blend"]): r for r in report["results"]}
    assert sorted(rows) == [("niah_single", 0.0), ("niah_single", 1.0), ("perplexity", 0.0), ("perplexity", 1.0)]
    tokens = tokenizer.encode(text)
    try:
        for b in (0.0, 1.0):
            set_position_blend(model, b)
            want = evaluate.perplexity(model, tokens, 128)
            assert rows["perplexity", b]["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)
            line = next(l for l in out.splitlines() if l.startswith("perplexity"))
            assert f"{want['perplexity']:.3f}" in line.split()
            samples = rows["niah_single", b]["samples"]
            assert len(samples) == 2 and rows["niah_single", b]["length"] == 300
            for s, made in zip(samples, tasks.make_samples("niah_single", tokenizer, 300, 2, 0)):
                assert s["answers"] == made.answers and s["prompt_tokens"] == made.prompt_tokens
                assert s["score"] == tasks.score(s["prediction"], s["answers"])
    finally:
        set_position_blend(model, 0.0)
    # Plain RoPE is a different model on the same weights.
    assert rows["perplexity", 0.0]["perplexity"] != rows["perplexity", 1.0]["perplexity"]


def test_cli_yarn_flag(fixture_path, text, tmp_path):
    (tmp_path / "data.txt").write_text(text)
    evaluate.command(
        ["--model", str(fixture_path), "--task", "perplexity", "--data", str(tmp_path / "data.txt"),
         "--window", "128", "--yarn", "2", "--output", str(tmp_path / "out.json")]
    )
    got = json.loads((tmp_path / "out.json").read_text())["results"][0]["perplexity"]
    model, tokenizer = repo_mlx.load(str(fixture_path), model_config=yarn_scaling(2))
    plain, _ = repo_mlx.load(str(fixture_path))
    tokens = tokenizer.encode(text)
    assert got == pytest.approx(evaluate.perplexity(model, tokens, 128)["perplexity"], rel=1e-6)
    # On a 128-token window YaRN moves perplexity by about 5e-4 (float noise is 1e-6).
    assert got != pytest.approx(evaluate.perplexity(plain, tokens, 128)["perplexity"], rel=1e-4)


def test_bad_options_are_one_line_errors(fixture_path, tmp_path):
    base = ["--model", str(fixture_path)]
    with pytest.raises(LoadError, match="Unknown task 'niah'"):
        evaluate.command(base + ["--task", "niah"])
    with pytest.raises(LoadError, match="needs --data"):
        evaluate.command(base + ["--task", "perplexity"])
    with pytest.raises(LoadError, match=r"in \[0, 1\]"):
        evaluate.command(base + ["--task", "ruler", "--position-blend", "0,2"])
    with pytest.raises(LoadError, match="Bad context length"):
        evaluate.command(base + ["--task", "ruler", "--lengths", "4Q"])
    with pytest.raises(LoadError, match="longer than the window"):
        evaluate.command(base + ["--task", "ruler", "--window", "64", "--stride", "65"])
    with pytest.raises(LoadError, match="too short"):
        evaluate.command(base + ["--task", "variable_tracking", "--lengths", "64"])
    assert evaluate.parse_length("16K") == 16384 and evaluate.parse_length("1000") == 1000
    proc = subprocess.run(
        [sys.executable, "-m", "repo_mlx.evaluate", *base, "--task", "perplexity", "--data", str(tmp_path / "missing.txt")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: argument --data: ") and "no such file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
