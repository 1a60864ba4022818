"""Conversion to MLX (float, 8-bit, 4-bit), stock mlx-lm compatibility, atomic output."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import repo_mlx
from repo_mlx import convert as conv
from repo_mlx import LoadError

POSITION_KEYS = ("gate_map", "content_map", "final_map")


def run(*args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def converted(fixture_path, tmp_path_factory):
    """Converted folders: float, 8-bit and 4-bit, made by the real CLI."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name, flags in [("float", []), ("q8", ["-q", "--q-bits", "8"]), ("q4", ["-q"])]:
        dst = root / name
        r = run("-m", "repo_mlx.convert", "--hf-path", str(fixture_path), "--mlx-path", str(dst), *flags)
        assert r.returncode == 0, r.stderr
        assert f"[INFO] Saving to {dst}" in r.stdout
        out[name] = dst
    return out


def test_float_conversion_is_exact(converted, tiny, reference):
    model, _ = repo_mlx.load(str(converted["float"]))
    ids = mx.array(reference["input_ids"])
    assert mx.array_equal(model(ids), tiny[0](ids))
    config = json.loads((converted["float"] / "config.json").read_text())
    assert config["model_file"] == "repo_olmo2.py"
    assert config["pe_config"]["dynmaic_pe_start_layer"] == 1
    assert (converted["float"] / "repo_olmo2.py").exists()
    assert (converted["float"] / "repo_rope.py").exists()
    # On a Mac the copy of rope.py finds the kernels beside it.
    assert (converted["float"] / "metal" / "rope.metal").exists()


@pytest.mark.parametrize("name,bits,tol", [("q8", 8, 0.2), ("q4", 4, 0.8)])
def test_quantized_conversion(converted, reference, name, bits, tol):
    path = converted[name]
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"]["bits"] == bits
    weights = mx.load(str(path / "model.safetensors"))
    assert "model.layers.1.self_attn.q_proj.scales" in weights
    # The position module stays float, and so do the norms.
    for key, w in weights.items():
        if any(p in key for p in POSITION_KEYS) or "norm" in key:
            assert key.endswith(".weight") and w.dtype == mx.float32, key
    model, tokenizer = repo_mlx.load(str(path))
    logits = np.array(model(mx.array(reference["input_ids"])))
    err = np.abs(logits - reference["logits"]).max() / np.abs(reference["logits"]).max()
    # Observed on this 64-wide random model: 8-bit 0.14, 4-bit 0.62 (plain RoPE
    # on the same quantized weights: 0.03 and 0.62); the README has 1B figures.
    assert err < tol
    assert len(repo_mlx.generate(model, tokenizer, "hello", max_tokens=5)) > 0


STOCK = """
import json, sys
sys.modules["repo_mlx"] = None  # stock mlx-lm only: importing repo_mlx now fails
import mlx.core as mx, mlx_lm
from mlx_lm.generate import generate_step
out = {}
for path in sys.argv[2:]:
    model, _ = mlx_lm.load(path, trust_remote_code=True)
    ids = mx.array(json.loads(sys.argv[1]))
    out[path] = [int(t) for t, _ in generate_step(ids, model, max_tokens=16)]
print(json.dumps(out))
"""


def test_stock_mlx_lm_gives_identical_tokens(converted, reference):
    prompt = reference["input_ids"][0].tolist()
    paths = [str(p) for p in converted.values()]
    r = run("-c", STOCK, json.dumps(prompt), *paths)
    assert r.returncode == 0, r.stderr
    stock = json.loads(r.stdout)
    from mlx_lm.generate import generate_step

    for path in paths:
        model, _ = repo_mlx.load(path)
        ours = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=16)]
        assert stock[path] == ours, path
    assert stock[str(converted["float"])] == reference["greedy"].tolist()


def between_rules(stdout):
    return stdout.split("==========\n")[1]


def test_stock_mlx_lm_cli(converted):
    block = "import sys, runpy; sys.modules['repo_mlx'] = None; sys.argv[0] = 'mlx_lm.generate'; runpy.run_module('mlx_lm.generate', run_name='__main__')"
    args = ["--model", str(converted["float"]), "--prompt", "hello world", "-m", "12"]
    stock = run("-c", block, *args, "--trust-remote-code")
    assert stock.returncode == 0, stock.stderr
    ours = run("-m", "repo_mlx.generate", *args)
    assert ours.returncode == 0, ours.stderr
    assert between_rules(stock.stdout) == between_rules(ours.stdout)
    # Without --trust-remote-code stock mlx-lm refuses rather than guessing.
    refused = run("-c", block, *args)
    assert refused.returncode != 0 and "trust_remote_code" in refused.stderr


def test_bfloat16_conversion(fixture_path, tmp_path):
    dst = conv.convert(str(fixture_path), str(tmp_path / "bf16"), dtype="bfloat16")
    weights = mx.load(str(dst / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {mx.bfloat16}
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model, _ = repo_mlx.load(str(dst))
    assert model.lm_head.weight.dtype == mx.bfloat16


def test_existing_destination_needs_force(fixture_path, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    r = run("-m", "repo_mlx.convert", "--hf-path", str(fixture_path), "--mlx-path", str(dst))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: --mlx-path {dst} already exists; pass --force to replace it."
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    # --force replaces only a folder repo_mlx wrote (or an empty one): not this one.
    r = run("-m", "repo_mlx.convert", "--hf-path", str(fixture_path), "--mlx-path", str(dst), "--force")
    assert r.returncode == 2 and "holds files repo_mlx did not write" in r.stderr and r.stderr.count("\n") == 1
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    (dst / "keep.txt").unlink()
    for _ in range(2):  # an empty folder, then the converted one
        r = run("-m", "repo_mlx.convert", "--hf-path", str(fixture_path), "--mlx-path", str(dst), "--force")
        assert r.returncode == 0, r.stderr
        assert (dst / "config.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_conversion_leaves_nothing(fixture_path, tmp_path):
    src = tmp_path / "broken"
    src.mkdir()
    for f in fixture_path.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg["pe_config"]["dynmaic_pe_start_layer"] = 0  # claims weights it lacks
    cfg["pe_config"]["dynamic_pe_start_layer"] = 0
    (src / "config.json").write_text(json.dumps(cfg))
    dst = tmp_path / "out"
    r = run("-m", "repo_mlx.convert", "--hf-path", str(src), "--mlx-path", str(dst))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "layer 0 a RePo layer" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_interrupted_conversion_leaves_nothing(fixture_path, tmp_path, monkeypatch):
    def save_then_stop(dst, *args, **kwargs):
        dst.mkdir()
        (dst / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(repo_mlx.loader, "save", save_then_stop)  # mlx-lm's save, as save_standalone calls it
    with pytest.raises(KeyboardInterrupt):
        conv.convert(str(fixture_path), str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []
    # With --force, the old folder survives a failed replacement.
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        conv.convert(str(fixture_path), str(old), force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert (old / "config.json").read_text() == "{}"


def test_killed_conversion_leaves_nothing(fixture_path, tmp_path):
    # SIGTERM while saving: the handler turns it into a clean exit.
    code = (
        "import os, signal, sys\n"
        "from repo_mlx import _cli, convert as c, loader\n"
        "real = loader.save\n"
        "def save(*a, **k):\n    real(*a, **k)\n    os.kill(os.getpid(), signal.SIGTERM)\n"
        "loader.save = save\n"
        "c.main(sys.argv[1:])\n"  # as python -m repo_mlx.convert runs it
    )
    r = run("-c", code, "--hf-path", str(fixture_path), "--mlx-path", str(tmp_path / "out"))
    assert r.returncode == 143
    assert list(tmp_path.iterdir()) == []


def test_upload_failure_is_one_line(fixture_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    dst = tmp_path / "out"
    r = run(
        "-m", "repo_mlx.convert", "--hf-path", str(fixture_path),
        "--mlx-path", str(dst), "--upload-repo", "me/repo-mlx-test",
    )
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: Upload to me/repo-mlx-test failed")
    assert (dst / "model.safetensors").exists()  # the conversion itself is complete


def test_convert_help_lists_every_flag():
    r = run("-m", "repo_mlx.convert", "--help")
    for flag in ["--hf-path", "--mlx-path", "--dtype", "--quantize", "--q-bits",
                 "--q-group-size", "--upload-repo", "--revision", "--force"]:
        assert flag in r.stdout


def test_convert_bad_source(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        conv.convert(str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_model_card(converted, fixture_path):
    """README.md is a real card; its stock mlx-lm Python example runs as written."""
    card = (converted["q4"] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mlx\n")
    assert "RePo" in card and "arxiv.org/abs/2512.14391" in card
    assert "4-bit weights (group size 64)" in card and "position module" in card
    assert f"`{fixture_path.name}`" in card and "License:" in card
    assert "python -m mlx_lm generate --model q4 --trust-remote-code" in card
    assert "not quantized" in (converted["float"] / "README.md").read_text()
    stock = card.split("## Run with stock mlx-lm")[1].split("```python\n")[1].split("```")[0]
    stock = stock.replace('"q4"', repr(str(converted["q4"]))).replace("max_tokens=32", "max_tokens=2")
    r = run("-c", stock)
    assert r.returncode == 0, r.stderr


def test_model_card_names_hub_source_and_license():
    card = conv.model_card("me/repo-1b-4bit", "SakanaAI/RePo-OLMo2-1B", {"torch_dtype": "bfloat16", "model_type": "olmo2", "model_file": "repo_olmo2.py"}, "apache-2.0")
    assert "base_model: SakanaAI/RePo-OLMo2-1B\n" in card and "license: apache-2.0\n" in card
    assert "[SakanaAI/RePo-OLMo2-1B](https://huggingface.co/SakanaAI/RePo-OLMo2-1B)" in card
    assert "bfloat16 weights, not quantized" in card


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--q-bits", "8"], "error: --q-bits needs -q/--quantize"),
        (["--q-group-size", "32"], "error: --q-group-size needs -q/--quantize"),
        (["--mlx-path", "{file}/out"], "error: argument --mlx-path: "),
        (["--mlx-path", "{file}"], "error: argument --mlx-path: "),
    ],
)
def test_convert_bad_flags_are_one_line_errors(fixture_path, tmp_path, flags, message):
    (tmp_path / "file").write_text("x")
    flags = [f.format(file=tmp_path / "file") for f in flags]
    if "--mlx-path" not in flags:
        flags += ["--mlx-path", str(tmp_path / "out")]
    r = run("-m", "repo_mlx.convert", "--hf-path", str(fixture_path), *flags)
    assert r.returncode == 2
    assert r.stderr.startswith(message) and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
