"""``python -m repo_mlx.chat``: the KV cache kept between turns gives what
``repo_mlx.generate`` gives on the whole transcript."""

import subprocess
import sys

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

import repo_mlx
from repo_mlx.chat import Chat

N = 8  # tokens per reply
GREEDY = make_sampler(0.0)


def whole(tiny, transcript: str, sampler=GREEDY):
    """(text, tokens) of repo_mlx.generate on the whole transcript, no cache reuse."""
    model, tokenizer = tiny
    text = repo_mlx.generate(model, tokenizer, transcript, max_tokens=N, sampler=sampler)
    tokens = [r.token for r in stream_generate(model, tokenizer, transcript, max_tokens=N, sampler=sampler)]
    return text, tokens


def test_two_turns_equal_generate_on_the_transcript(tiny):
    chat = Chat(*tiny)
    first = chat.turn("Hello there", N, GREEDY)
    assert (first, chat.last_tokens) == whole(tiny, "USER: Hello there\nASSISTANT:")
    second = chat.turn("And then?", N, GREEDY)
    transcript = f"USER: Hello there\nASSISTANT: {first.strip()}\nUSER: And then?\nASSISTANT:"
    assert (second, chat.last_tokens) == whole(tiny, transcript)
    # The cache was kept: the second turn fed only what the first had not.
    n = len(tiny[1].encode(transcript))
    assert chat.prompt_tokens < n - 5
    assert chat.cache[0].offset == n + len(chat.last_tokens)


def test_reset_clears_the_history(tiny):
    chat = Chat(*tiny, system_prompt="Be brief.")
    first = chat.turn("Hi", N, GREEDY)
    chat.turn("More", N, GREEDY)
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}] and chat.cached == []
    assert chat.cache[0].offset == 0
    assert chat.turn("Hi", N, GREEDY) == first
    assert chat.messages[0]["content"] == "Be brief."


def test_seeded_sampling_turns_equal_generate(tiny):
    sampler = make_sampler(0.9, top_p=0.95, top_k=50)
    mx.random.seed(7)
    chat = Chat(*tiny)
    first = chat.turn("Hi", N, sampler)
    mx.random.seed(7)
    assert first == whole(tiny, "USER: Hi\nASSISTANT:", sampler)[0]


def run_chat(fixture_path, stdin, *flags):
    return subprocess.run(
        [sys.executable, "-m", "repo_mlx.chat", "--model", str(fixture_path), "-m", str(N), *flags],
        input=stdin, capture_output=True, text=True, timeout=300,
    )


def test_scripted_session_through_stdin(fixture_path, tiny):
    r = run_chat(fixture_path, "Hello there\nAnd then?\n/reset\nHello there\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    first, _ = whole(tiny, "USER: Hello there\nASSISTANT:")
    second, _ = whole(tiny, f"USER: Hello there\nASSISTANT: {first.strip()}\nUSER: And then?\nASSISTANT:")
    # Each reply on its own line; after /reset the conversation starts again.
    assert r.stdout == f"{first.lstrip()}\n{second.lstrip()}\n{first.lstrip()}\n"


def test_bad_flags_are_one_line_errors(fixture_path):
    for flags, flag in ((["--temp", "-1"], "--temp"), (["--max-kv-size", "0"], "--max-kv-size"), (["--top-p", "2"], "--top-p")):
        r = run_chat(fixture_path, "", *flags)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.startswith(f"error: argument {flag}: ") and r.stderr.count("\n") == 1
