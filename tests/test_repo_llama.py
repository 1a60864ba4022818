"""RePo for mlx-lm's llama and qwen3 architectures, on tiny random configs with
grouped-query attention: mlx-lm's model checks, mlx-lm's own logits at position
blend 1, the GQA rule against attention with repeated KV heads, and a folder that
stock mlx-lm loads without repo_mlx."""

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.generate import generate_step
from mlx_lm.models import llama, qwen3
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.rope_utils import initialize_rope

from repo_mlx import repo_llama, rope
from repo_mlx.rope import pe_config

# 6 query heads on 2 KV heads, Llama 3.1 frequency scaling (its smooth band hits
# head_dim 16 with this short context), untied lm_head.
LLAMA = dict(
    model_type="llama", hidden_size=96, num_hidden_layers=4, intermediate_size=128,
    num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=101,
    rope_theta=10000.0, tie_word_embeddings=False, pe_config=pe_config(1),
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
)  # fmt: skip
# Qwen3: per-head q/k norms, head_dim not hidden / heads, tied embeddings, 4 on 2.
QWEN3 = dict(
    model_type="qwen3", hidden_size=64, num_hidden_layers=3, intermediate_size=96,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
    vocab_size=101, rope_theta=1e6, max_position_embeddings=512, tie_word_embeddings=True,
    pe_config=pe_config(1),
)  # fmt: skip
CONFIGS = {"llama": LLAMA, "qwen3": QWEN3}
STOCK = {"llama": llama, "qwen3": qwen3}


def build(config, seed=0, **overrides):
    """A RePo model with random weights; positions reach tens of units."""
    mx.random.seed(seed)
    model = repo_llama.Model(repo_llama.ModelArgs.from_dict({**config, **overrides}))
    for layer in model.layers:
        if layer.self_attn.repo:
            layer.self_attn.final_map.weight *= 300.0
    mx.eval(model.parameters())
    return model


def same_weights(model, config, **overrides):
    """``config`` built by repo_llama with ``model``'s weights (position module kept)."""
    other = repo_llama.Model(repo_llama.ModelArgs.from_dict({**config, **overrides}))
    other.load_weights(tree_flatten(model.parameters()))
    return other


def plain(model, config):
    """mlx-lm's own model of the architecture, same weights minus the position module."""
    arch = STOCK[config["model_type"]]
    stock = arch.Model(arch.ModelArgs.from_dict(config))
    weights = tree_flatten(model.parameters())
    weights = [(k, w) for k, w in weights if k.split(".")[-2] not in rope.POSITION_WEIGHTS]
    stock.load_weights(weights)
    return stock


def rel_err(a, b):
    a, b = np.array(a.astype(mx.float32), np.float64), np.array(b.astype(mx.float32), np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def greedy(model, prompt, n):
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


IDS = mx.array([
    [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26],
    [2, 71, 82, 81, 82, 84, 59, 0, 45, 23, 53, 60],
])  # fmt: skip


@pytest.mark.parametrize("arch", CONFIGS)
def test_mlx_lm_model_checks(arch):
    """What mlx-lm's model tests check for each architecture: fp32 and fp16 shapes
    and dtypes, with and without a prompt cache, a decode step, batch 2."""
    config = CONFIGS[arch]
    model = build(config)
    assert len(model.layers) == config["num_hidden_layers"] and model.model_type == arch
    assert [l.self_attn.repo for l in model.layers] == [False] + [True] * (len(model.layers) - 1)
    V = config["vocab_size"]
    for dtype in (mx.float32, mx.float16):
        model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
        inputs = mx.array([[0, 1]])
        out = model(inputs)
        assert out.shape == (1, 2, V) and out.dtype == dtype
        cache = make_prompt_cache(model)
        out = model(inputs, cache=cache)
        assert out.shape == (1, 2, V) and out.dtype == dtype
        out = model(mx.argmax(out[0, -1:, :], keepdims=True), cache=cache)
        assert out.shape == (1, 1, V) and out.dtype == dtype
        assert cache[1].offset == 3 and cache[1].keys.shape[1] == config["num_key_value_heads"]
        out = model(mx.array([[0, 1], [2, 3]]))
        assert out.shape == (2, 2, V) and out.dtype == dtype
        assert mx.isfinite(out).all().item()


@pytest.mark.parametrize("arch", CONFIGS)
def test_cache_chunks_and_batch_rows_equal_one_shot(arch):
    model = build(CONFIGS[arch])
    full = model(IDS)
    cache = make_prompt_cache(model)
    steps = [model(IDS[:, :5], cache=cache)]
    steps += [model(IDS[:, i : i + 1], cache=cache) for i in range(5, IDS.shape[1])]
    assert rel_err(mx.concatenate(steps, axis=1), full) < 1e-5
    for row in range(2):
        assert rel_err(model(IDS[row : row + 1])[0], full[row]) < 1e-5


@pytest.mark.parametrize("arch", CONFIGS)
def test_position_blend_one_is_mlx_lm(arch):
    """Blend 1 turns every RePo layer into plain RoPE: mlx-lm's own llama / qwen3
    logits and greedy tokens (through the KV cache) on the same weights."""
    config = CONFIGS[arch]
    model = build(config)
    blended, stock = same_weights(model, config, position_blend=1.0), plain(model, config)
    assert rel_err(blended(IDS), stock(IDS)) < 1e-5
    assert greedy(blended, IDS[0].tolist(), 10) == greedy(stock, IDS[0].tolist(), 10)
    # ... and the learned positions change the logits clearly.
    assert rel_err(model(IDS), stock(IDS)) > 0.05


def repeat_kv_heads(model, config):
    """The same network as attention without grouping: each KV head's k_proj and
    v_proj rows, and its final_map row, repeated for the query heads of its group."""
    G = config["num_attention_heads"] // config["num_key_value_heads"]
    mha = repo_llama.Model(repo_llama.ModelArgs.from_dict(
        {**config, "num_key_value_heads": config["num_attention_heads"]}
    ))  # fmt: skip
    weights = []
    for key, w in tree_flatten(model.parameters()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            heads = config["num_key_value_heads"]
            w = mx.repeat(w.reshape(heads, -1, w.shape[-1]), G, axis=0).reshape(-1, w.shape[-1])
        elif key.endswith("final_map.weight"):
            w = mx.repeat(w, G, axis=0)
        weights.append((key, w))
    mha.load_weights(weights)
    return mha


@pytest.mark.parametrize("arch", CONFIGS)
def test_grouped_rule_is_attention_with_repeated_kv_heads(arch):
    """Query head h uses KV head h // G's keys and positions: exactly the official
    (ungrouped) rule on a model whose KV heads and positions are repeated."""
    config = CONFIGS[arch]
    model = build(config)
    attn = model.layers[1].self_attn
    assert attn.final_map.weight.shape[0] == config["num_key_value_heads"]
    mha = repeat_kv_heads(model, config)
    assert mha.layers[1].self_attn.final_map.weight.shape[0] == config["num_attention_heads"]
    assert rel_err(model(IDS), mha(IDS)) < 1e-5
    assert greedy(model, IDS[1].tolist(), 10) == greedy(mha, IDS[1].tolist(), 10)


def test_position_module_reads_the_normed_input(monkeypatch):
    model = build(LLAMA)
    layer, seen = model.layers[2], []
    original = type(layer.self_attn).positions

    def spy(self, x, offset=0):
        seen.append(x)
        return original(self, x, offset)

    monkeypatch.setattr(type(layer.self_attn), "positions", spy)
    h = mx.random.normal((1, 7, LLAMA["hidden_size"]), key=mx.random.key(1)) * 5
    layer(h, "causal")
    assert mx.array_equal(seen[0], layer.input_layernorm(h))
    z = layer.self_attn.positions(layer.input_layernorm(h))
    assert z.shape == (1, 2, 7) and z.dtype == mx.float32
    assert mx.abs(z).max().item() > 10  # positions far from token indices: rotations matter


@pytest.mark.parametrize("arch", CONFIGS)
def test_gradient_reaches_the_position_module(arch):
    model = build(CONFIGS[arch])

    def loss(m):
        return nn.losses.cross_entropy(m(IDS[:, :-1]), IDS[:, 1:]).mean()

    _, grads = nn.value_and_grad(model, loss)(model)
    for i, layer in enumerate(grads["model"]["layers"]):
        if model.layers[i].self_attn.repo:
            g = layer["self_attn"]["gate_map"]["weight"]
            assert mx.isfinite(g).all().item() and mx.abs(g).max().item() > 0


@pytest.mark.parametrize(
    "scaling",
    [None, {"rope_type": "linear", "factor": 4.0}, LLAMA["rope_scaling"],
     {"type": "llama3", "factor": 32.0, "original_max_position_embeddings": 64}],
)  # fmt: skip
def test_rope_parameters_match_mlx_lm_at_integer_positions(scaling):
    D, base = 16, 10000.0
    x = mx.random.normal((1, 2, 40, D), key=mx.random.key(0))
    inv_freq, factor = rope.rope_parameters(D, base, scaling)
    theirs = initialize_rope(D, base, False, scaling, 2048)
    for offset in (0, 9):
        p = mx.broadcast_to(mx.arange(offset, offset + 40, dtype=mx.float32), (1, 2, 40))
        ours = rope.continuous_rope(x, p, inv_freq=inv_freq, attention_factor=factor)
        assert mx.abs(ours - theirs(x, offset=offset)).max().item() <= 1e-5


def test_sanitize_checks_position_weights_and_ties():
    model = build(QWEN3)
    weights = dict(tree_flatten(model.parameters()))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = mx.ones(4)
    kept = model.sanitize(dict(weights))
    assert "lm_head.weight" not in kept and not any("inv_freq" in k for k in kept)
    missing = {k: v for k, v in weights.items() if k != "model.layers.2.self_attn.final_map.weight"}
    with pytest.raises(ValueError, match="layer 2 a RePo layer but the checkpoint has no"):
        model.sanitize(missing)
    extra = {**weights, "model.layers.0.self_attn.gate_map.weight": mx.zeros((8, 64))}
    with pytest.raises(ValueError, match=r"Layers \[0\] have RePo position weights"):
        model.sanitize(extra)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(num_key_value_heads=4), "must be a multiple of num_key_value_heads"),
        (dict(rope_traditional=True), "rope_traditional"),
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "'dynamic' is not supported"),
        (dict(model_type="gemma"), "builds llama, mistral, qwen3"),
        (dict(pe_config=pe_config(1, mode="continuous")), "'continuous' is not supported"),
    ],
)
def test_configs_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        repo_llama.Model(repo_llama.ModelArgs.from_dict({**LLAMA, **overrides}))
    # Plain configs (no pe_config) pass whatever only RePo layers refuse.
    if "pe_config" not in overrides and "model_type" not in overrides:
        repo_llama.ModelArgs.from_dict({**LLAMA, **overrides, "pe_config": None})


STOCK_LOAD = """
import sys
sys.modules["repo_mlx"] = None  # stock mlx-lm only: importing repo_mlx now fails
from pathlib import Path
import mlx.core as mx, numpy as np
from mlx_lm.utils import load_model
model, _ = load_model(Path(sys.argv[1]), trust_remote_code=True)
np.save(sys.argv[2], np.array(model(mx.array([[3, 14, 15, 92, 65, 35]]))))
rope = type(model).__init__.__globals__["rope"]  # the copy the model file found
print(type(model).__module__, rope.__file__, rope.metal_source_path())
"""


@pytest.mark.parametrize("arch", CONFIGS)
def test_stock_mlx_lm_loads_a_folder_carrying_the_files(arch, tmp_path):
    """A folder with this file as its model_file, rope.py as repo_rope.py and
    metal/ beside them loads in stock mlx-lm with repo_mlx unimportable, and gives
    the same logits."""
    config = CONFIGS[arch]
    model = build(config)
    folder = tmp_path / "model"
    (folder / "metal").mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps({**config, "model_file": "repo_llama.py"}))
    shutil.copy(repo_llama.__file__, folder / "repo_llama.py")
    shutil.copy(rope.__file__, folder / "repo_rope.py")
    shutil.copy(rope.metal_source_path(), folder / "metal" / "rope.metal")
    out = subprocess.run(
        [sys.executable, "-c", STOCK_LOAD, str(folder), str(tmp_path / "logits.npy")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.split() == [
        "custom_model", str(folder / "repo_rope.py"), str(folder / "metal" / "rope.metal")
    ]
    want = np.array(model(IDS[:1, :6]))
    assert np.abs(np.load(tmp_path / "logits.npy") - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("arch", CONFIGS)
def test_pretrain_counts_parameters_and_inserts_one_position_per_kv_head(arch):
    from repo_mlx import pretrain

    config = CONFIGS[arch]
    model = repo_llama.Model(repo_llama.ModelArgs.from_dict(config))
    counts = pretrain.count_parameters(model)
    d, kv = config["hidden_size"], config["num_key_value_heads"]
    assert counts["position"] == len(model.args.repo_layers) * (2 * d * (d // 8) + (d // 8) * kv)
    new = pretrain.init_position_weights(model, seed=0)
    assert {w.shape for k, w in new.items() if "final_map" in k} == {(config["num_key_value_heads"], config["hidden_size"] // 8)}
    assert [pretrain.default_start_layer(n) for n in (8, 16, 24, 28, 30, 32)] == [3, 5, 8, 9, 9, 10]
