"""repo_mlx.fuse: fused logits equal base + adapters; --export-hf writes the
official format and loads back with the same logits."""

import json
import shutil
import struct
import subprocess
import sys

import mlx.core as mx
import pytest
from finetune_helpers import make_data, make_model, train

import repo_mlx
from repo_mlx.convert import convert
from repo_mlx.fuse import fuse
from repo_mlx import LoadError

IDS = mx.array([[ord(c) for c in "the fox sat on the old barn. the fox likes"]])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Base model, 4-bit copy, and adapters: position module LoRA'd and fully trained."""
    root = tmp_path_factory.mktemp("fuse")
    base = make_model(root / "base")
    data = make_data(root / "data", sizes=(("train", 32), ("valid", 8)))
    q4 = convert(str(base), str(root / "q4"), quantize=True)
    adapters = {}
    for name, model, flags in (
        ("lora", base, ("--position-module", "lora")),
        ("full_positions", base, ("--fine-tune-type", "dora", "--position-module", "full")),
        ("qlora", q4, ("--position-module", "lora")),
    ):
        adapters[name] = root / name
        train(model, data, adapters[name], *flags, iters=6)
    return {"base": base, "q4": q4, "adapters": adapters, "root": root}


def logits(path, adapter_path=None):
    model, _ = repo_mlx.load(str(path), adapter_path=adapter_path and str(adapter_path))
    return model(IDS)


def max_diff(a, b):
    return mx.abs(a - b).max().item()


def mean_diff(a, b):
    return mx.abs(a - b).mean().item()


@pytest.mark.parametrize("name", ["lora", "full_positions"])
def test_fused_logits_equal_base_plus_adapter(trained, name):
    adapters = trained["adapters"][name]
    out = fuse(str(trained["base"]), str(adapters), str(trained["root"] / f"fused_{name}"))
    expected = logits(trained["base"], adapters)
    assert max_diff(expected, logits(trained["base"])) > 1e-2  # the adapter matters
    assert max_diff(logits(out), expected) < 1e-4
    # A standalone MLX folder, like repo_mlx.convert writes.
    config = json.loads((out / "config.json").read_text())
    assert config["model_file"] == "repo_olmo2.py"
    assert (out / "repo_olmo2.py").exists() and (out / "repo_rope.py").exists()


def test_qlora_fuse_keeps_or_drops_quantization(trained):
    adapters = trained["adapters"]["qlora"]
    expected = logits(trained["q4"], adapters)
    float_out = fuse(str(trained["q4"]), str(adapters), str(trained["root"] / "q_float"), de_quantize=True)
    assert "quantization" not in json.loads((float_out / "config.json").read_text())
    assert max_diff(logits(float_out), expected) < 1e-4
    q_out = fuse(str(trained["q4"]), str(adapters), str(trained["root"] / "q_4bit"))
    assert json.loads((q_out / "config.json").read_text())["quantization"]["bits"] == 4
    # Re-quantized, so not equal: it costs about what the original 4-bit conversion did.
    quantization_error = mean_diff(logits(trained["q4"]), logits(trained["base"]))
    assert mean_diff(logits(q_out), expected) < 1.5 * quantization_error


def safetensors_metadata(file):
    with open(file, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)).get("__metadata__")


@pytest.mark.parametrize("model", ["base", "q4"])
def test_export_hf_is_the_official_format(trained, model):
    name = "lora" if model == "base" else "qlora"
    adapters = trained["adapters"][name]
    root = trained["root"]
    mlx_out = fuse(str(trained[model]), str(adapters), str(root / f"mlx_{model}"), de_quantize=True)
    hf_out = fuse(str(trained[model]), str(adapters), str(root / f"hf_{model}"), export_hf_format=True)

    config = json.loads((hf_out / "config.json").read_text())
    pe = config["pe_config"]
    assert pe["dynamic_pe_start_layer"] == pe["dynmaic_pe_start_layer"] == 1
    assert pe["dynamic_pe_layer_ids"] == pe["dynmaic_pe_layer_ids"] == ""
    assert config["architectures"] == ["Olmo2ForCausalLM"] and config["torch_dtype"] == "float32"
    for key in ("model_file", "quantization", "quantization_config"):
        assert key not in config
    assert not list(hf_out.glob("*.py"))
    assert safetensors_metadata(hf_out / "model.safetensors") == {"format": "pt"}
    tok = json.loads((hf_out / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] != "TokenizersBackend" and (hf_out / "tokenizer.json").exists()
    # HF key names: the same set as an official checkpoint, no scales/biases.
    official = set(mx.load(str(trained["base"] / "model.safetensors")))
    assert set(mx.load(str(hf_out / "model.safetensors"))) == official

    # transformers itself reads the config and tokenizer (no torch needed for these).
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(hf_out).pe_config == pe
    tokenizer = repo_mlx.load(str(trained["base"]))[1]
    assert AutoTokenizer.from_pretrained(hf_out).encode("the fox") == tokenizer.encode("the fox")

    assert max_diff(logits(hf_out), logits(mlx_out)) == 0.0
    assert max_diff(logits(hf_out), logits(trained[model], adapters)) < 1e-4


def test_fuse_errors_leave_no_folder(trained, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LoadError, match="adapter_config.json"):
        fuse(str(trained["base"]), str(tmp_path), str(out))
    # Adapters whose config disagrees with their weights: refused, nothing written.
    bad = tmp_path / "bad"
    shutil.copytree(trained["adapters"]["full_positions"], bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "position_module": "frozen"}))
    with pytest.raises(LoadError, match="unexpected: model.layers.1.self_attn.content_map.weight"):
        fuse(str(trained["base"]), str(bad), str(out))
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    out.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "repo_mlx.fuse", "--model", str(trained["base"]),
         "--adapter-path", str(trained["adapters"]["lora"]), "--save-path", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: --save-path {out} already exists; pass --force to replace it."
    ]


def test_bfloat16_fuse_rounds_once(trained):
    """Each fused bfloat16 weight is (W + delta) computed in float32, rounded once."""
    root = trained["root"]
    bf16 = convert(str(trained["base"]), str(root / "bf16"), dtype="bfloat16")
    adapters = root / "bf16_lora"
    train(bf16, make_data(root / "bf16_data", sizes=(("train", 16),)), adapters, iters=4)
    out = fuse(str(bf16), str(adapters), str(root / "bf16_fused"))
    fused = mx.load(str(out / "model.safetensors"))

    adapted, _ = repo_mlx.load(str(bf16), adapter_path=str(adapters))
    once = naive = total = 0
    for name, m in adapted.named_modules():
        if not hasattr(m, "fuse"):
            continue
        w = m.linear.weight
        delta = (m.scale * m.lora_b.T.astype(mx.float32)) @ m.lora_a.T.astype(mx.float32)
        want = (w.astype(mx.float32) + delta).astype(mx.bfloat16)
        got = fused[f"{name}.weight"]
        assert got.dtype == mx.bfloat16
        once += mx.array_equal(got, want).item()
        naive += mx.array_equal(got, w + delta.astype(w.dtype)).item()  # mlx-lm's rounding
        total += 1
    assert total > 0 and once == total
    assert naive < total  # the two roundings differ somewhere, so this test can fail
