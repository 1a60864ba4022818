"""``repo_mlx.server`` driven by the real ``openai`` Python client."""

import math

import mlx.core as mx
import numpy as np
import openai  # a test dependency: pip install 'repo-mlx[test]'
import pytest
from mlx_lm.sample_utils import make_sampler

import repo_mlx
from test_server import reference, start_server, stop_server

PROMPT = "Hello world"


@pytest.fixture(scope="module")
def client(fixture_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("openai") / "stderr.txt"
    with open(log, "w") as err:
        proc, port = start_server("--model", str(fixture_path), stderr=err)
        try:
            yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local", max_retries=0)
        finally:
            assert stop_server(proc) == 130


def log_softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    return logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())


def test_completion_whole_and_streamed(client, tiny):
    text, tokens = reference(tiny, PROMPT, 10)
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=10, temperature=0)
    assert r.choices[0].text == text and r.choices[0].index == 0
    assert r.usage.completion_tokens == len(tokens) and r.usage.prompt_tokens == len(tiny[1].encode(PROMPT))
    chunks = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=10, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text


def test_completion_logprobs_are_openai_s_integer_form(client, tiny):
    model, tokenizer = tiny
    text, tokens = reference(tiny, PROMPT, 6)
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=6, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in tokens]
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(len(top) <= 2 for top in lp.top_logprobs) and len(lp.top_logprobs[0]) == 2
    # Offsets count from the start of the prompt, one token after the other.
    assert lp.text_offset[0] == len(PROMPT)
    assert [b - a for a, b in zip(lp.text_offset, lp.text_offset[1:])] == [len(t) for t in lp.tokens[:-1]]
    # The first token's log-probabilities are the model's, greedy picks the top one.
    want = log_softmax(model(mx.array([tokenizer.encode(PROMPT)]))[0, -1])
    assert lp.token_logprobs[0] == pytest.approx(want.max(), abs=1e-4)
    assert sorted(lp.top_logprobs[0].values(), reverse=True) == pytest.approx(sorted(want)[::-1][:2], abs=1e-4)
    zero = client.completions.create(model="m", prompt=PROMPT, max_tokens=3, logprobs=0).choices[0].logprobs
    assert len(zero.token_logprobs) == 3 and zero.top_logprobs is None
    # Streamed, the events carry the same logprobs, each those of its own tokens.
    events = [c.choices[0] for c in client.completions.create(model="m", prompt=PROMPT, max_tokens=6, logprobs=2, stream=True)]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert sum((getattr(e.logprobs, key) for e in events), []) == getattr(lp, key)
    assert all("".join(e.logprobs.tokens) == e.text for e in events)


def test_prompt_list_gives_one_choice_per_prompt(client, tiny):
    prompts = [PROMPT, "The sky is", "One two three"]
    r = client.completions.create(model="m", prompt=prompts, max_tokens=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [reference(tiny, p, 5)[0] for p in prompts]
    assert r.usage.prompt_tokens == sum(len(tiny[1].encode(p)) for p in prompts)
    assert r.usage.completion_tokens == 15


def test_chat_whole_streamed_and_logprobs(client, tiny):
    model, tokenizer = tiny
    messages = [{"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=6, logprobs=True, top_logprobs=3)
    text, tokens = reference(tiny, "USER: Hi there\nASSISTANT:", 6)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    content = r.choices[0].logprobs.content  # chat's shape: one entry per token
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in tokens]
    for c in content:
        assert c.bytes == list(c.token.encode()) and math.isfinite(c.logprob)
        tops = [t.logprob for t in c.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert c.logprob == pytest.approx(tops[0])  # greedy: the chosen token is the top one
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=6, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    chunks = client.chat.completions.create(model="m", messages=messages, max_tokens=6, logprobs=True, top_logprobs=3, stream=True)
    assert [t for c in chunks for t in c.choices[0].logprobs.content] == content


def test_seeded_sampling(client, tiny):
    kw = dict(model="m", prompt=PROMPT, max_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    a = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == a
    mx.random.seed(11)
    assert a == repo_mlx.generate(*tiny, PROMPT, max_tokens=10, sampler=make_sampler(1.0, 0.9))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature must be a number at least 0, got -1."),
        ({"logprobs": 6}, "logprobs must be an integer from 0 to 5 on /v1/completions"),
        ({"extra_body": {"repetition_penalty": -1}}, "repetition_penalty must be at least 0."),  # mlx-lm's check
    ],
)
def test_bad_request_raises_bad_request_error_with_our_message(client, kwargs, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt=PROMPT, max_tokens=3, **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["message"].startswith(message) and e.value.body["type"] == "invalid_request_error"
    assert message in str(e.value)
