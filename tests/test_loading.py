"""Config handling, checkpoint formats and every bad input a user can hit."""

import json
import shutil
import subprocess
import sys
import warnings

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import olmo2

import repo_mlx
import synthetic
from repo_mlx.rope import repo_layer_ids
from repo_mlx import LoadError


@pytest.fixture
def copy_of(fixture_path, tmp_path):
    """A writable copy of the fixture, with config edits applied."""

    def make(**config_changes):
        dst = tmp_path / f"model{len(list(tmp_path.iterdir()))}"
        shutil.copytree(fixture_path, dst)
        cfg = json.loads((dst / "config.json").read_text())
        for key, value in config_changes.items():
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        (dst / "config.json").write_text(json.dumps(cfg))
        return dst

    return make


def pe(**keys):
    return {"dynamic_pe_mode": "swigluex_multihead", **keys}


@pytest.mark.parametrize(
    "pe_config,expected",
    [
        (pe(dynmaic_pe_start_layer=2, dynamic_pe_start_layer=2), [2, 3]),
        (pe(dynmaic_pe_start_layer=2), [2, 3]),  # what the official code reads
        (pe(dynamic_pe_start_layer=3), [3]),  # fallback to the correct spelling
        (pe(), [0, 1, 2, 3]),  # no start layer: 0, like the official code
        (pe(dynmaic_pe_start_layer=1, dynmaic_pe_layer_ids="0,2, 3"), [2, 3]),
        (pe(dynamic_pe_layer_ids="1"), [1]),
        ({"dynamic_pe_mode": "none"}, []),
        (None, []),
    ],
)
def test_repo_layers_from_config(pe_config, expected):
    assert repo_layer_ids(pe_config, 4) == expected


@pytest.mark.parametrize(
    "pe_config,message",
    [
        (pe(dynmaic_pe_start_layer=1, dynamic_pe_start_layer=2), "disagrees with itself"),
        (pe(dynmaic_pe_layer_ids="1,2", dynamic_pe_layer_ids="1"), "disagrees with itself"),
        ({"dynamic_pe_mode": "multihead_continuous"}, "not supported"),
        (pe(dynmaic_pe_layer_ids="1,x"), "comma-separated integers"),
        (pe(dynmaic_pe_layer_ids="1,7"), "has 4 layers"),
    ],
)
def test_bad_pe_config_is_refused(pe_config, message):
    with pytest.raises(ValueError, match=message):
        repo_layer_ids(pe_config, 4)


def test_disagreeing_spellings_refused_at_load(copy_of):
    path = copy_of(pe_config=pe(dynmaic_pe_start_layer=1, dynamic_pe_start_layer=2))
    with pytest.raises(LoadError, match="dynmaic_pe_start_layer=1 but dynamic_pe_start_layer=2"):
        repo_mlx.load(str(path))


def test_gqa_refused(copy_of):
    with pytest.raises(LoadError, match="num_key_value_heads == num_attention_heads"):
        repo_mlx.load(str(copy_of(num_key_value_heads=2)))


def test_unknown_mode_refused(copy_of):
    path = copy_of(pe_config={"dynamic_pe_mode": "continuous"})
    with pytest.raises(LoadError, match="'continuous' is not supported"):
        repo_mlx.load(str(path))


def test_missing_position_weights_refused(copy_of):
    # Config says layers 1..3 are RePo layers; make it claim layer 0 too.
    path = copy_of(pe_config=pe(dynmaic_pe_start_layer=0, dynamic_pe_start_layer=0))
    with pytest.raises(LoadError, match="layer 0 a RePo layer but the checkpoint has no"):
        repo_mlx.load(str(path))


def test_position_weights_without_config_refused(copy_of):
    with pytest.raises(LoadError, match=r"Layers \[1, 2, 3\] have RePo position weights"):
        repo_mlx.load(str(copy_of(pe_config=None)))
    path = copy_of(pe_config=pe(dynmaic_pe_start_layer=2, dynamic_pe_start_layer=2))
    with pytest.raises(LoadError, match=r"Layers \[1\] have RePo position weights"):
        repo_mlx.load(str(path))


def test_plain_olmo2_checkpoint_loads_as_plain_olmo2(tmp_path):
    cfg = synthetic.config(repo=False)
    path = synthetic.write_checkpoint(tmp_path / "plain", cfg)
    model, _ = repo_mlx.load(str(path))
    assert model.args.repo_layers == []
    plain = olmo2.Model(olmo2.ModelArgs.from_dict(cfg))
    plain.load_weights(str(path / "model.safetensors"))
    ids = mx.array([[1, 5, 9, 200, 3, 7]])
    assert mx.allclose(model(ids), plain(ids), atol=1e-5)
    assert repo_mlx.positions(model, ids) == {}


def test_sharded_bfloat16_checkpoint(tmp_path):
    cfg = synthetic.config()
    f32 = synthetic.write_checkpoint(tmp_path / "f32", cfg, seed=5)
    bf16 = synthetic.write_checkpoint(tmp_path / "bf16", cfg, seed=5, dtype="bfloat16", shards=3)
    assert len(list(bf16.glob("model-*.safetensors"))) == 3
    a, _ = repo_mlx.load(str(f32))
    b, _ = repo_mlx.load(str(bf16))  # dtype=None keeps the stored dtype
    assert b.layers[1].self_attn.gate_map.weight.dtype == mx.bfloat16
    c, _ = repo_mlx.load(str(bf16), dtype="float32")
    assert c.lm_head.weight.dtype == mx.float32
    ids = mx.array([[4, 8, 15, 16, 23, 42]])
    # Same draws rounded to bfloat16: close, not equal.
    la, lc = np.array(a(ids)), np.array(c(ids))
    assert 0 < np.abs(la - lc).max() / np.abs(la).max() < 0.1


def test_missing_folder():
    with pytest.raises(LoadError, match="does not exist"):
        repo_mlx.load("./no/such/model")


def test_missing_config(copy_of):
    path = copy_of()
    (path / "config.json").unlink()
    with pytest.raises(LoadError, match="has no config.json"):
        repo_mlx.load(str(path))


def test_unsupported_architecture(copy_of):
    with pytest.raises(LoadError, match="'gemma3' model; repo_mlx runs RePo models of model_type 'olmo2', 'llama'"):
        repo_mlx.load(str(copy_of(model_type="gemma3")))


def test_missing_weights(copy_of):
    path = copy_of()
    (path / "model.safetensors").unlink()
    with pytest.raises(LoadError, match="no model.*safetensors weight files"):
        repo_mlx.load(str(path))


@pytest.mark.parametrize("keep", [0, 5, 100, 500_000])
def test_truncated_weights(copy_of, keep):
    path = copy_of()
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:keep])
    with pytest.raises(LoadError, match="truncated|corrupt"):
        repo_mlx.load(str(path))


def test_missing_shard(tmp_path):
    path = synthetic.write_checkpoint(tmp_path / "sharded", shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LoadError, match="missing weight files model-00002-of-00002"):
        repo_mlx.load(str(path))


def test_invalid_dtype(fixture_path):
    with pytest.raises(LoadError, match="'float64' is not one of"):
        repo_mlx.load(str(fixture_path), dtype="float64")


def test_invalid_position_blend(fixture_path):
    with pytest.raises(LoadError, match=r"position_blend must be in \[0, 1\]"):
        repo_mlx.load(str(fixture_path), model_config={"position_blend": 2})


def test_offline_hub_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    # huggingface_hub reads these at import; run where they are set.
    code = (
        "import repo_mlx\n"
        "try:\n    repo_mlx.load('SakanaAI/RePo-OLMo2-1B-stage2-L5')\n"
        "except repo_mlx.LoadError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "Could not download SakanaAI/RePo-OLMo2-1B-stage2-L5" in out.stdout
    assert "offline" in out.stdout


def test_unreachable_hub_gives_clear_error(monkeypatch, tmp_path):
    # A closed port on loopback: the real download code runs and fails fast.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    out = subprocess.run(
        [sys.executable, "-m", "repo_mlx.generate", "--model", "someone/some-model"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Could not download someone/some-model")


def test_long_prompt_warns(tiny):
    model, tokenizer = tiny
    prompt = list(range(3, 300)) * 14  # 4158 tokens > 4096
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = repo_mlx.generate(model, tokenizer, prompt, max_tokens=2)
    assert isinstance(text, str)
    assert any("more than the model's context of 4096" in str(w.message) for w in caught)


def test_import_stays_light():
    """import repo_mlx loads the model and the loader, not the training stack or the
    server: mlx-lm's own load imports adapter code only when adapters are asked for."""
    import subprocess
    import sys

    heavy = ("mlx_lm.tuner", "mlx.optimizers", "mlx_lm.server", "mlx_lm.lora", "repo_mlx.trainer", "repo_mlx.server")
    r = subprocess.run([sys.executable, "-c", f"import sys, repo_mlx; print([m for m in {heavy!r} if m in sys.modules])"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
