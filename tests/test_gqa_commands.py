"""Every command on a RePo Llama (6 query / 2 KV heads) and a RePo Qwen3 folder,
in this process where that is cheap; plain Llama/Qwen3 folders get what plain
OLMo-2 gets from the RePo-only commands.

lm_eval is left to test_lm_eval.py: its adapter only calls the model, and one
run costs over a minute on a small CPU (lm-eval indexes its whole task
library), more than this file's every other command together."""

import importlib
import io
import json
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from finetune_helpers import make_data, train
from mlx.utils import tree_flatten
from test_pretrain import run_cli
from test_server import post, start_server, stop_server

import repo_mlx
from repo_mlx import LoadError, benchmark, cache_prompt, chat, doctor, evaluate, viewer
import synthetic
from repo_mlx import positions as positions_of
from repo_mlx.convert import convert
from repo_mlx.fuse import fuse
from repo_mlx.repo_llama import Model, ModelArgs
from repo_mlx.rope import pe_config

# `from repo_mlx import positions, generate` gives the functions; these are the commands.
positions_cli = importlib.import_module("repo_mlx.positions")
generate_cli = importlib.import_module("repo_mlx.generate")

CONFIGS = {
    "llama": dict(
        model_type="llama", hidden_size=96, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, max_position_embeddings=512,
    ),
    "qwen3": dict(
        model_type="qwen3", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
        rope_theta=1e6, max_position_embeddings=512, tie_word_embeddings=True,
    ),
}  # fmt: skip
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT = "the fox sat on the old barn. the fox likes"
N = 6


def write_folder(path, arch, repo=True):
    """A random float32 Hugging Face folder of ``arch`` (RePo layer 1 if ``repo``)
    with a byte-level tokenizer and a ChatML chat template."""
    cfg = {**CONFIGS[arch], "vocab_size": 320, "eos_token_id": 318, "pad_token_id": 319, "torch_dtype": "float32"}
    if repo:
        cfg["pe_config"] = pe_config(1)
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(cfg))
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg))
    synthetic.write_tokenizer(path, 320)
    tc = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": CHATML}))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gqa")
    return {
        **{arch: write_folder(root / arch, arch) for arch in CONFIGS},
        **{f"plain {arch}": write_folder(root / f"plain-{arch}", arch, repo=False) for arch in CONFIGS},
        "plain olmo2": synthetic.write_checkpoint(root / "plain-olmo2", synthetic.config(repo=False)),
    }


@pytest.fixture(scope="module")
def loaded(folders):
    return {arch: repo_mlx.load(str(folders[arch])) for arch in CONFIGS}


def out_of(capsys):
    return capsys.readouterr().out


@pytest.mark.parametrize("arch", CONFIGS)
def test_generate_and_chat(arch, folders, loaded, capsys, monkeypatch):
    model, tokenizer = loaded[arch]
    assert model.args.num_key_value_heads == 2 and model.args.repo_layers == [1]
    # As mlx_lm.generate: the prompt as a user message of the folder's chat template, or as is.
    generate_cli.command(["--model", str(folders[arch]), "-p", PROMPT, "-m", str(N), "--verbose", "0"])
    templated = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    assert out_of(capsys) == repo_mlx.generate(model, tokenizer, templated, max_tokens=N) + "\n"
    generate_cli.command(["--model", str(folders[arch]), "-p", PROMPT, "-m", str(N), "--verbose", "0", "--ignore-chat-template"])
    assert out_of(capsys) == repo_mlx.generate(model, tokenizer, PROMPT, max_tokens=N) + "\n"
    # One turn from piped stdin, through the folder's chat template.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n"))
    chat.command(["--model", str(folders[arch]), "-m", str(N)])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
    assert out_of(capsys) == repo_mlx.generate(model, tokenizer, prompt, max_tokens=N).lstrip() + "\n"


def test_server_completion(folders, loaded, tmp_path):
    model, tokenizer = loaded["llama"]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc, port = start_server("--model", str(folders["llama"]), stderr=err)
        try:
            status, reply = post({"port": port}, "/v1/completions", {"prompt": PROMPT, "max_tokens": N, "temperature": 0})
        finally:
            stop_server(proc)
    assert status == 200, reply
    assert reply["choices"][0]["text"] == repo_mlx.generate(model, tokenizer, PROMPT, max_tokens=N)


@pytest.mark.parametrize("arch", CONFIGS)
def test_convert_float_and_quantized_keeps_the_module_float(arch, folders, loaded, tmp_path):
    model, _ = loaded[arch]
    ids = mx.array([list(range(20, 40))])
    convert(str(folders[arch]), str(tmp_path / "float"))
    convert(str(folders[arch]), str(tmp_path / "q4"), quantize=True, q_group_size=32)
    converted, _ = repo_mlx.load(str(tmp_path / "float"))
    assert mx.array_equal(converted(ids), model(ids))
    quantized, _ = repo_mlx.load(str(tmp_path / "q4"))
    attn = quantized.model.layers[1].self_attn
    assert isinstance(attn.q_proj, nn.QuantizedLinear)
    for name in ("gate_map", "content_map", "final_map"):
        got, want = getattr(attn, name), getattr(model.model.layers[1].self_attn, name)
        assert type(got) is nn.Linear and mx.array_equal(got.weight, want.weight)
    assert mx.abs(quantized(ids) - model(ids)).max().item() < 0.5 * mx.abs(model(ids)).max().item()


@pytest.mark.parametrize("arch", CONFIGS)
def test_lora_then_fuse(arch, folders, tmp_path):
    data = make_data(tmp_path / "data", sizes=(("train", 16), ("valid", 4)))
    log = train(folders[arch], data, tmp_path / "adapters", iters=2)
    assert "Iter 2" in log
    fused = fuse(str(folders[arch]), str(tmp_path / "adapters"), str(tmp_path / "fused"))
    ids = mx.array([list(range(20, 40))])
    with_adapters, _ = repo_mlx.load(str(folders[arch]), adapter_path=str(tmp_path / "adapters"))
    got, _ = repo_mlx.load(str(fused))
    want = with_adapters(ids)
    assert mx.abs(got(ids) - want).max().item() < 1e-4 * mx.abs(want).max().item()


@pytest.mark.parametrize("arch", CONFIGS)
def test_positions_and_viewer_page(arch, folders, loaded, tmp_path, capsys):
    model, tokenizer = loaded[arch]
    ids = tokenizer.encode(PROMPT)
    positions_cli.command(["--model", str(folders[arch]), "--prompt", PROMPT, "--json", str(tmp_path / "z.json")])
    got = json.loads((tmp_path / "z.json").read_text())["positions"]
    want = np.array(positions_of(model, ids)[1])[0]  # [KV heads, tokens]
    assert list(got) == ["1"] and list(got["1"]) == ["0", "1"]  # one curve per KV head
    assert np.allclose([got["1"]["0"], got["1"]["1"]], want, atol=1e-5)
    html = tmp_path / "page.html"
    viewer.command(["--model", str(folders[arch]), "--html", str(html), "--prompt", PROMPT, "--max-tokens", "64"])
    data = viewer.compute(model, tokenizer, PROMPT, 64, name=str(folders[arch]))
    assert html.read_text(encoding="utf-8") == viewer.page(data, viewer.plotly_js())


@pytest.mark.parametrize("arch", CONFIGS)
def test_evaluate_cache_prompt_and_benchmark(arch, folders, loaded, tmp_path, capsys):
    model, tokenizer = loaded[arch]
    folder = str(folders[arch])
    text = tmp_path / "text.txt"
    text.write_text(" ".join([PROMPT] * 4))
    evaluate.command(["--model", folder, "--task", "perplexity", "--data", str(text), "--window", "64",
                   "--output", str(tmp_path / "eval.json")])  # fmt: skip
    (row,) = json.loads((tmp_path / "eval.json").read_text())["results"]
    want = evaluate.perplexity(model, tokenizer.encode(text.read_text()), 64)["perplexity"]
    assert row["perplexity"] == pytest.approx(want, rel=1e-6)

    cache = tmp_path / "doc.safetensors"
    cache_prompt.command(["--model", folder, "--prompt", PROMPT, "--prompt-cache-file", str(cache)])
    capsys.readouterr()
    generate_cli.command(["--model", folder, "--prompt-cache-file", str(cache), "--prompt", " and", "-m", str(N), "--verbose", "0"])
    ids = tokenizer.encode(PROMPT) + tokenizer.encode(" and")
    assert out_of(capsys) == repo_mlx.generate(model, tokenizer, ids, max_tokens=N) + "\n"

    benchmark.command(["--model", folder, "-p", "8", "-g", "2", "-n", "1"])
    name = {"llama": "Llama", "qwen3": "Qwen3"}[arch]
    report = out_of(capsys)
    assert f"{name} (mlx-lm, same weights)" in report and f"ratio RePo / {name}" in report


def test_doctor_with_the_model(folders, capsys):
    doctor.command(["--model", str(folders["llama"]), "--tokens", "2"])  # exit status 1 on a failed check
    report = out_of(capsys)
    assert f"| operations per decode token ({folders['llama']}) | measured | RePo layer " in report
    assert " 0 failed, " in report


@pytest.mark.parametrize("arch", ["olmo2", "llama", "qwen3"])
def test_plain_folders_get_the_plain_olmo2_answer(arch, folders, tmp_path):
    """positions and the viewer refuse a plain model of any architecture alike,
    after the loader's one notice."""
    folder = str(folders[f"plain {arch}"])
    name = {"olmo2": "OLMo-2", "llama": "Llama", "qwen3": "Qwen3"}[arch]
    with pytest.warns(UserWarning, match=f"^{folder} is plain {name}, not RePo: "):
        with pytest.raises(LoadError, match=r"^This model has no RePo layers \(a plain model\): nothing to show\.$"):
            positions_cli.command(["--model", folder, "--prompt", PROMPT])
    with pytest.warns(UserWarning, match="not RePo"), pytest.raises(LoadError) as e:
        viewer.command(["--model", folder, "--html", str(tmp_path / "page.html"), "--prompt", PROMPT])
    assert str(e.value) == f"{folder} has no RePo layers (plain {name}): there are no positions to show."
    assert not (tmp_path / "page.html").exists()


def test_pretrain_export_hf_refuses_a_llama_base_before_training(folders, tmp_path):
    data = tmp_path / "train.txt"
    data.write_text(PROMPT * 20)
    code, out, err = run_cli("--model", folders["plain llama"], "--data", data, "--save-path", tmp_path / "out",
                             "--export-hf", tmp_path / "hf", "--seq-len", "16", "--iters", "1", "--dtype", "float32")  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: --export-hf writes the official RePo-OLMo2 format; no official format exists for a RePo 'llama' model.")
    assert "Step" not in out and not (tmp_path / "out").exists() and not (tmp_path / "hf").exists()
