"""repo_mlx.probe: the token-index probe on cases with a known answer, and on tiny models."""

import math

import mlx.core as mx
import numpy as np
import pytest

from repo_mlx import probe
from repo_mlx import repo_llama, repo_olmo2

VOCAB, N = 64, 48
PE = {"dynamic_pe_mode": "swigluex_multihead", "dynmaic_pe_start_layer": 1, "dynmaic_pe_layer_ids": ""}


def tiny(model_type, repo):
    """A random 3-layer model (hidden 32, 4 heads; 2 KV heads outside OLMo-2)."""
    mx.random.seed(0)
    common = dict(model_type=model_type, hidden_size=32, num_hidden_layers=3, intermediate_size=64,
                  num_attention_heads=4, rms_norm_eps=1e-6, vocab_size=VOCAB,
                  pe_config=PE if repo else None)
    if model_type == "olmo2":
        return repo_olmo2.Model(repo_olmo2.ModelArgs(**common))
    return repo_llama.Model(repo_llama.ModelArgs(num_key_value_heads=2 if not repo else 4, **common))


def test_ridge_r2_known_answers():
    rng = np.random.default_rng(0)
    y = np.tile(np.arange(50.0), 8)
    linear = np.stack([y + rng.normal(0, 0.5, y.size), rng.normal(size=y.size)], 1)
    assert probe.ridge_r2(linear[:200], y[:200], linear[200:], y[200:]) > 0.99
    noise = rng.normal(size=(y.size, 10))
    assert probe.ridge_r2(noise[:200], y[:200], noise[200:], y[200:]) < 0.05


def test_an_embedding_that_holds_the_index_gives_r2_near_one():
    # Token id i sits at index i, and embedding i holds i linearly: layer 0's input (OLMo-2's
    # raw residual stream) carries the index. Shuffled token order: it carries the id only.
    model = tiny("olmo2", repo=False)
    table = np.array(mx.random.normal((VOCAB, 32))) * 0.1
    table[:, 0] = np.arange(VOCAB) / VOCAB
    model.model.embed_tokens.weight = mx.array(table.astype(np.float32))
    ordered = [list(range(N))] * 6
    assert probe.index_probe(model, ordered)[0] > 0.99
    rng = np.random.default_rng(1)
    shuffled = [list(rng.permutation(VOCAB)[:N]) for _ in range(6)]
    assert probe.index_probe(model, shuffled)[0] < 0.1


@pytest.mark.parametrize("model_type", ["olmo2", "llama", "qwen3"])
@pytest.mark.parametrize("repo", [False, True])
def test_one_finite_value_per_layer(model_type, repo):
    model = tiny(model_type, repo)
    assert bool(model.args.repo_layers) == repo
    rng = np.random.default_rng(2)
    seqs = [[int(t) for t in rng.integers(0, VOCAB, N)] for _ in range(4)]
    r2 = probe.index_probe(model, seqs, skip_first=1)
    assert sorted(r2) == [0, 1, 2] and all(math.isfinite(v) for v in r2.values())
    # Pre-norm blocks: the attention input is the normed residual stream.
    x = probe.attention_inputs(model, seqs[0])
    assert len(x) == 3 and x[0].shape == (1, N, 32)
    if model_type != "olmo2":
        h = model.model.embed_tokens(mx.array([seqs[0]]))
        assert mx.allclose(x[0], model.layers[0].input_layernorm(h)).item()


def test_too_few_sequences_is_one_clear_error():
    with pytest.raises(ValueError, match="at least 4 sequences"):
        probe.index_probe(tiny("olmo2", False), [[1, 2, 3]] * 3)


def test_index_probe_script_writes_one_r2_per_layer(tmp_path, fixture_path):
    import json
    import random
    import subprocess
    import sys
    from pathlib import Path

    from repo_mlx.tasks import filler_sentence

    rng = random.Random(0)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(filler_sentence(rng) for _ in range(300)))
    script = Path(__file__).parents[1] / "experiments" / "index_probe.py"
    args = [sys.executable, str(script), "--model", str(fixture_path), "--text", str(text), "--out", str(tmp_path / "p")]
    r = subprocess.run(args + ["--windows", "4", "--length", "64"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "p" / "results.json").read_text())
    assert len(result["r2"]) == 4 and all(math.isfinite(v) for v in result["r2"].values())
    r = subprocess.run(args + ["--windows", "400"], capture_output=True, text=True)
    assert r.returncode == 2 and "fewer than --windows x --length" in r.stderr
