"""repo_mlx.lora: training works for every mode, the position module obeys
--position-module, checkpoints resume exactly, bad data is reported clearly."""

import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import types

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from finetune_helpers import make_data, make_model, train, val_losses
from mlx.utils import tree_flatten

import repo_mlx
from repo_mlx import finetune, finetune_data
from repo_mlx.trainer import MASTER
from repo_mlx.adapters import setup_trainable
from repo_mlx.convert import convert
from repo_mlx.rope import POSITION_WEIGHTS
from repo_mlx import LoadError

# (fine-tune type, position module, 4-bit base?)
RUNS = {
    "lora": ("lora", "frozen", False),
    "dora": ("dora", "lora", False),
    "full": ("full", "full", False),
    "qlora": ("lora", "lora", True),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def runs(base, data, tmp_path_factory):
    """Each mode trained once for 20 iterations: name -> (model, adapters, log)."""
    root = tmp_path_factory.mktemp("runs")
    q4 = convert(str(base), str(root / "q4"), quantize=True)
    out = {}
    for name, (kind, position, quantized) in RUNS.items():
        model = q4 if quantized else base
        adapters = root / name
        lr = "1e-4" if kind == "full" else "1e-3"
        log = train(model, data, adapters, "--fine-tune-type", kind,
                    "--position-module", position, lr=lr)
        out[name] = (model, adapters, log)
    return out


def position_weights(model) -> dict:
    """Effective gate_map/content_map/final_map weights, LoRA/DoRA fused."""
    out = {}
    for i, layer in enumerate(model.layers):
        if layer.self_attn.repo:
            for name in POSITION_WEIGHTS:
                m = getattr(layer.self_attn, name)
                out[f"{i}.{name}"] = (m.fuse() if hasattr(m, "fuse") else m).weight
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_validation_loss_falls(runs, name):
    log = runs[name][2]
    losses = val_losses(log)
    assert len(losses) == 3, log  # before training, after iterations 10 and 20
    assert losses[-1] < 0.6 * losses[0], f"{name}: {losses}"
    for field in ("train loss", "tokens/s", "peak mem"):
        assert field in log


def test_qlora_trains_on_4bit_with_float_position_module(runs):
    model_path, adapters, _ = runs["qlora"]
    assert json.loads((model_path / "config.json").read_text())["quantization"]["bits"] == 4
    model, _ = repo_mlx.load(str(model_path), adapter_path=str(adapters))
    attn = model.layers[1].self_attn
    assert isinstance(attn.q_proj.linear, nn.QuantizedLinear)
    assert type(attn.gate_map.linear) is nn.Linear  # LoRA over a float position map
    with pytest.raises(LoadError, match="quantized"):
        setup_trainable(repo_mlx.load(str(model_path))[0], "full", -1, None, "full")


def test_lora_adapters_load_in_stock_mlx_lm(runs):
    # Position module frozen or LoRA: plain mlx-lm adapters (lora_parameters
    # lists the module keys), so stock mlx-lm applies them to a converted folder.
    from mlx_lm.utils import load as mlx_lm_load

    model_path, adapters, _ = runs["qlora"]
    ids = mx.array([[ord(c) for c in "the owl sat on"]])
    stock, _ = mlx_lm_load(str(model_path), adapter_path=str(adapters), trust_remote_code=True)
    ours, _ = repo_mlx.load(str(model_path), adapter_path=str(adapters))
    assert mx.array_equal(stock(ids), ours(ids)).item()


@pytest.mark.parametrize("name,changed", [("lora", False), ("dora", True), ("full", True), ("qlora", True)])
def test_position_module_follows_the_flag(runs, base, name, changed):
    model_path, adapters, _ = runs[name]
    before = position_weights(repo_mlx.load(str(model_path))[0])
    after = position_weights(repo_mlx.load(str(model_path), adapter_path=str(adapters))[0])
    saved = mx.load(str(adapters / "adapters.safetensors"))
    touches = any(k.split(".")[4] in POSITION_WEIGHTS for k in saved)
    assert touches == changed
    for key in before:
        same = mx.array_equal(before[key], after[key]).item()
        assert same != changed, f"{name}: {key} {'unchanged' if changed else 'changed'}"
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["position_module"] == RUNS[name][1]


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
@pytest.mark.parametrize("position", ["frozen", "lora", "full"])
def test_trainable_position_parameters(base, kind, position):
    model, _ = repo_mlx.load(str(base))
    setup_trainable(model, kind, 2, {"rank": 4, "dropout": 0.0, "scale": 10.0}, position)
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    maps = sorted(k for k in names if k.split(".")[4] in POSITION_WEIGHTS)
    expected = {
        "frozen": [],
        "lora": [f"model.layers.{i}.self_attn.{m}.{p}" for i in (2, 3) for m in POSITION_WEIGHTS
                 for p in ("lora_a", "lora_b", "m")[: 3 if kind == "dora" else 2]],
        "full": [f"model.layers.{i}.self_attn.{m}.weight" for i in (2, 3) for m in POSITION_WEIGHTS],
    }[position]
    assert maps == sorted(expected)
    assert not any(k.startswith(("model.layers.0.", "model.layers.1.")) for k in names)
    assert any(".q_proj." in k for k in names)  # the rest of the tuned layers trains


def test_gradients_reach_positions(base):
    model, _ = repo_mlx.load(str(base))
    ids = mx.array([[ord(c) for c in "the owl sat on the hill. the owl"]])
    attn = model.layers[2].self_attn
    assert attn.repo
    original = attn.positions

    def loss(delta):
        attn.positions = lambda x, offset=0: original(x, offset) + delta
        logits = model(ids[:, :-1])
        return nn.losses.cross_entropy(logits, ids[:, 1:]).mean()

    zero = mx.zeros((1, attn.n_heads, ids.shape[1] - 1))
    grad = mx.grad(loss)(zero)
    assert mx.isfinite(grad).all().item() and (mx.abs(grad) > 0).all().item()
    # The gradient is right, not just present: compare a directional derivative.
    direction = mx.array(np.random.default_rng(0).standard_normal(zero.shape), mx.float32)
    eps = 1e-2
    numeric = (loss(eps * direction) - loss(-eps * direction)) / (2 * eps)
    assert abs(numeric.item() - (grad * direction).sum().item()) < 0.02 * abs(numeric.item())

    # The trainer's gradient reaches the position weights only when they train.
    batch = mx.concatenate([ids, ids])
    lengths = mx.array([[0, ids.shape[1]]] * 2)
    for mode, expect in (("frozen", False), ("lora", True), ("full", True)):
        model, _ = repo_mlx.load(str(base))
        setup_trainable(model, "lora", -1, {"rank": 4, "dropout": 0.0, "scale": 10.0}, mode)
        _, grads = nn.value_and_grad(model, finetune.token_weighted_loss)(
            model, batch, lengths, mx.distributed.init()
        )
        position = {k: g for k, g in tree_flatten(grads) if k.split(".")[4] in POSITION_WEIGHTS}
        assert bool(position) == expect, mode
        if mode == "lora":  # lora_b starts at zero, so lora_a's gradient is zero
            position = {k: g for k, g in position.items() if k.endswith("lora_b")}
        assert all(mx.abs(g).max().item() > 0 for g in position.values()), mode


def test_resume_equals_uninterrupted_run(base, data, tmp_path):
    # Dropout on, so the random state must be right too.
    config = tmp_path / "config.yaml"
    config.write_text("lora_parameters:\n  rank: 4\n  dropout: 0.2\n  scale: 10.0\n")
    flags = ["--position-module", "lora", "-c", config, "--save-every", "6"]
    full = tmp_path / "uninterrupted"
    uninterrupted_log = train(base, data, full, *flags, iters=18)
    # Interrupted right after iteration 6's checkpoint: resume from it.
    resumed = tmp_path / "resumed"
    log = train(base, data, resumed, *flags, "--resume-adapter-file",
                full / "0000006_adapters.safetensors", iters=18)
    assert "at iteration 6" in log and "Iter 6:" not in log and "Iter 10: train loss" in log
    final = lambda text: re.search(r"Iter 18: val loss ([\d.]+)", text)[1]
    assert final(log) == final(uninterrupted_log)  # the same validation batches
    for file in ("adapters.safetensors", "adapters.state.safetensors"):
        a, b = mx.load(str(full / file)), mx.load(str(resumed / file))
        assert a.keys() == b.keys()
        for k in a:
            assert mx.array_equal(a[k], b[k]).item(), f"{file}: {k}"
    # Without the optimizer state it cannot match: the check above can fail.
    (full / "0000006_adapters.state.safetensors").unlink()
    fresh = tmp_path / "fresh"
    with pytest.warns(UserWarning, match="optimizer"):
        train(base, data, fresh, *flags, "--resume-adapter-file",
              full / "0000006_adapters.safetensors", iters=12)
    a = mx.load(str(full / "0000018_adapters.safetensors"))
    b = mx.load(str(fresh / "adapters.safetensors"))
    assert not all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_half_precision_full_fine_tuning_keeps_float32_masters(data, tmp_path):
    """As pretrain: at a small lr a bfloat16 update vanishes, the float32 master keeps it."""
    from repo_mlx import lora
    import synthetic

    path = synthetic.write_checkpoint(tmp_path / "bf16", synthetic.config(), seed=1, dtype="bfloat16",
                                      position_scale=0.05)
    model, tokenizer = repo_mlx.load(str(path))
    args = lora.parse_args(["--model", str(path), "--data", str(data), "--train", "--fine-tune-type", "full",
                            "--num-layers", "-1", "--batch-size", "4", "--learning-rate", "1e-6"])
    setup_trainable(model, "full", -1, None, "frozen")
    trainer = finetune.make_trainer(model, args)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert set(trainer.master) == set(trainable) and all(v.dtype == mx.bfloat16 for v in trainable.values())
    before = dict(trainer.master)
    batches = finetune.train_batches(finetune_data.load_data(args, tokenizer)[0], args, mx.distributed.init())
    trainer.train_step(lambda: next(batches))
    after = trainer.master
    assert all(not mx.array_equal(before[k], after[k]).item() for k in before)
    same = sum((trainable[k] + (after[k] - before[k]).astype(mx.bfloat16) == trainable[k]).sum().item() for k in before)
    assert same / sum(v.size for v in before.values()) > 0.9  # what a bfloat16 update would keep
    for k, v in tree_flatten(model.trainable_parameters()):
        assert mx.array_equal(v, after[k].astype(mx.bfloat16)).item(), k
    # The adapter file keeps mlx-lm's format; resuming needs the masters, in the state file.
    flags = ["--fine-tune-type", "full", "--save-every", "3"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(path, data, full, *flags, iters=6, lr="1e-5")
    train(path, data, resumed, *flags, "--resume-adapter-file", full / "0000003_adapters.safetensors", iters=6, lr="1e-5")
    assert {v.dtype for v in mx.load(str(full / "adapters.safetensors")).values()} == {mx.bfloat16}
    for file in ("adapters.safetensors", "adapters.state.safetensors"):
        a, b = mx.load(str(full / file)), mx.load(str(resumed / file))
        assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a), file
    assert any(k.startswith(MASTER) for k in a)


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(base, data, tmp_path, monkeypatch):
    import signal

    from repo_mlx import lora

    class StopAt5:
        def on_train_loss_report(self, info):
            if info["iteration"] == 5:
                signal.raise_signal(signal.SIGINT)

        def on_val_loss_report(self, info):
            pass

    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train(base, data, full, iters=10)
    monkeypatch.setattr(lora, "get_reporting_callbacks", lambda *a: StopAt5())
    with pytest.raises(SystemExit) as e:
        train_argv = ["--model", base, "--train", "--data", data, "--adapter-path", stopped, "--iters", "10",
                      "--batch-size", "4", "--learning-rate", "1e-3", "--num-layers", "-1",
                      "--steps-per-report", "5", "--steps-per-eval", "10", "--val-batches", "-1"]
        with contextlib.redirect_stdout(io.StringIO()) as out:
            lora.main([str(a) for a in train_argv])
    assert e.value.code == 130 and "Iter 5: saved" in out.getvalue()
    monkeypatch.undo()
    train(base, data, stopped, "--resume-adapter-file", stopped / "adapters.safetensors", iters=10)
    a, b = mx.load(str(full / "adapters.safetensors")), mx.load(str(stopped / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_damaged_checkpoint_falls_back_and_unsaved_runs_do_not_block(base, data, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(base, data, full, "--save-every", "4", iters=12)
    train(base, data, cut, "--save-every", "4", iters=8)
    state = cut / "adapters.state.safetensors"  # a kill during the save at iteration 8
    state.write_bytes(state.read_bytes()[:100])
    (cut / "0000008_adapters.safetensors").unlink()
    with pytest.warns(UserWarning, match=r"adapters\.safetensors is damaged.*trying the newest one before it"):
        log = train(base, data, cut, "--save-every", "4", "--resume-adapter-file",
                    cut / "adapters.safetensors", iters=12)
    assert "Resuming from" in log and "0000004_adapters.safetensors instead" in log
    a, b = mx.load(str(full / "adapters.safetensors")), mx.load(str(cut / "adapters.safetensors"))
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    # Stopped before the first save: a config and an orphan state file are no earlier run.
    early = tmp_path / "early"
    early.mkdir()
    (early / "adapter_config.json").write_text("{}")
    (early / "adapters.state.safetensors").write_bytes(b"x")
    (early / f".adapters.safetensors.partial-{os.getpid() + 10**6}.safetensors").write_bytes(b"x")
    train(base, data, early, iters=2)
    assert sorted(p.name for p in early.iterdir()) == [
        "adapter_config.json", "adapters.safetensors", "adapters.state.safetensors"]


def test_resume_rejects_mismatched_checkpoint(runs, base, data, tmp_path):
    with pytest.raises(LoadError, match="does not match"):
        train(base, data, tmp_path / "x", "--position-module", "frozen",
              "--resume-adapter-file", runs["full"][1] / "adapters.safetensors")


def test_generate_uses_adapters_without_fusing(runs, capsys):
    model_path, adapters, _ = runs["dora"]
    generate = importlib.import_module("repo_mlx.generate")
    argv = ["--model", str(model_path), "--prompt", "the owl sat on", "-m", "12", "--verbose", "0"]
    generate.command(argv + ["--adapter-path", str(adapters)])
    tuned = capsys.readouterr().out
    generate.command(argv)
    plain = capsys.readouterr().out
    assert tuned != plain
    assert "the" in tuned  # the adapter learned the data's words


# --- bad data ----------------------------------------------------------------


def load_data(folder, tokenizer, **overrides):
    args = dict(data=str(folder), train=True, test=False, batch_size=2, max_seq_length=2048,
                mask_prompt=False)
    return finetune_data.load_data(types.SimpleNamespace(**{**args, **overrides}), tokenizer)


@pytest.fixture(scope="module")
def tokenizer(base):
    return repo_mlx.load(str(base))[1]


GOOD = json.dumps({"text": "the cat sat on the mat."})


@pytest.mark.parametrize(
    "train_lines,message",
    [
        (None, r"train\.jsonl does not exist"),
        ([], r"train\.jsonl is empty"),
        ([GOOD, GOOD, '{"text": "unfinished'], r"train\.jsonl, line 3: not valid JSON"),
        ([GOOD, '["text"]'], r"train\.jsonl, line 2: expected a JSON object"),
        ([json.dumps({"txt": "x"})], r"train\.jsonl, line 1: Unsupported data format.*found keys: 'txt'"),
        ([GOOD, "", json.dumps({"prompt": "a"})], r"train\.jsonl, line 3: 'text' must be a str .*missing"),
        ([GOOD, json.dumps({"text": 5})], r"train\.jsonl, line 2: 'text' must be a str"),
        ([GOOD], r"1 examples, fewer than --batch-size 2"),
    ],
)
def test_bad_data_names_file_and_line(tokenizer, tmp_path, train_lines, message):
    if train_lines is not None:
        (tmp_path / "train.jsonl").write_text("\n".join(train_lines))
    with pytest.raises(LoadError, match=message):
        load_data(tmp_path, tokenizer)


def test_missing_data_folder_and_chat_without_template(tokenizer, tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_data(tmp_path / "nope", tokenizer)
    chat = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    (tmp_path / "train.jsonl").write_text(f"{chat}\n{chat}\n")
    with pytest.raises(LoadError, match="chat template"):
        load_data(tmp_path, tokenizer)


def test_long_sequences_warn_and_truncate(tokenizer, tmp_path):
    lines = [GOOD, json.dumps({"text": "x" * 100}), GOOD, json.dumps({"text": "y" * 50})]
    (tmp_path / "train.jsonl").write_text("\n".join(lines))
    with pytest.warns(UserWarning) as caught:
        train_set, valid, _ = load_data(tmp_path, tokenizer, max_seq_length=32)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert re.search(r"train\.jsonl: 2 example\(s\).*line 2, 4; longest 101", messages[0])
    assert re.search(r"valid\.jsonl does not exist; training without validation", messages[1])
    assert max(len(t) for t, _ in train_set) == 32 and valid == []


def test_prompt_completion_without_chat_template(tokenizer, tmp_path):
    line = json.dumps({"prompt": "Q: 2+2? A:", "completion": " 4"})
    for name in ("train", "valid"):
        (tmp_path / f"{name}.jsonl").write_text(f"{line}\n{line}\n")
    (tokens, offset), _ = load_data(tmp_path, tokenizer, mask_prompt=True)[0]
    assert tokens == tokenizer.encode("Q: 2+2? A:") + tokenizer.encode(" 4") + [tokenizer.eos_token_id]
    assert offset == len(tokenizer.encode("Q: 2+2? A:"))


def test_cli_bad_data_is_one_line(base, tmp_path):
    (tmp_path / "train.jsonl").write_text(GOOD + "\n{oops\n")
    r = subprocess.run(
        [sys.executable, "-m", "repo_mlx.lora", "--model", str(base), "--train",
         "--data", str(tmp_path), "--iters", "1", "--adapter-path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert err == [f"error: {tmp_path / 'train.jsonl'}, line 2: not valid JSON "
                   "(Expecting property name enclosed in double quotes at column 2)."], r.stderr
    assert not (tmp_path / "out").exists()


# --- found in issue 11, each by name ------------------------------------------


def lora_main(*argv):
    from repo_mlx import lora

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        lora.command([str(a) for a in argv])
    return out.getvalue()


def short_run(base, data, adapters, *flags):
    return lora_main("--model", base, "--train", "--data", data, "--adapter-path", adapters,
                     "--iters", 2, "--batch-size", 2, "--steps-per-eval", 100, "--val-batches", 1,
                     "--save-every", 1, *flags)


def test_negative_learning_rate_is_refused(capsys, tmp_path):
    from repo_mlx import lora

    with pytest.raises(SystemExit) as e:
        lora.main(["--train", "--learning-rate", "-1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: argument --learning-rate: must be a number > 0, got -1")
    (tmp_path / "c.yaml").write_text("learning_rate: -1\n")
    with pytest.raises(LoadError, match=r"c\.yaml: learning_rate must be a number > 0, got -1"):
        lora.parse_args(["-c", str(tmp_path / "c.yaml")])


@pytest.mark.parametrize("module", ["lora", "pretrain"])
def test_config_files_are_read_one_way(tmp_path, module):
    """lora and pretrain share -c: unknown keys and values their flags refuse are errors."""
    parse = importlib.import_module(f"repo_mlx.{module}").parse_args
    argv = ["--model", "m", "--data", "d"] if module == "pretrain" else []
    cases = {"learnig_rate: 1e-4\n": r"unknown options learnig_rate",
             "iters: 0\n": r"c\.yaml: iters must be a positive integer, got 0",
             "- a list\n": r"must hold a mapping", "a: [\n": r"is not valid YAML"}
    for text, message in cases.items():
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(LoadError, match=message):
            parse([*argv, "-c", str(tmp_path / "c.yaml")])
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-4\nseed: 3\n")
    args = parse([*argv, "-c", str(tmp_path / "c.yaml"), "--seed", "4"])
    assert args.learning_rate == 1e-4 and args.seed == 4  # the flag wins


def test_existing_adapter_path_needs_force(base, data, tmp_path):
    adapters = tmp_path / "adapters"
    short_run(base, data, adapters)
    old = sorted(p.name for p in adapters.iterdir())
    assert "0000002_adapters.safetensors" in old
    before = {p.name: p.read_bytes() for p in adapters.iterdir()}
    with pytest.raises(LoadError, match=r"holds an earlier run .*--resume-adapter-file .*adapters.safetensors, replace it with --force"):
        short_run(base, data, adapters, "--iters", 1)
    assert {p.name: p.read_bytes() for p in adapters.iterdir()} == before
    # --force replaces the earlier run: none of its numbered checkpoints stay behind.
    short_run(base, data, adapters, "--iters", 1, "--force")
    assert "0000002_adapters.safetensors" not in {p.name for p in adapters.iterdir()}
    assert json.loads((adapters / "adapter_config.json").read_text())["iters"] == 1
    # Resuming from a checkpoint in the same folder continues it, no --force needed.
    short_run(base, data, adapters, "--resume-adapter-file", adapters / "0000001_adapters.safetensors")


def test_default_num_layers_fits_a_small_model(base, data, tmp_path):
    n = len(repo_mlx.load(str(base))[0].layers)
    assert n < 16  # mlx-lm's default
    lora_main("--model", base, "--train", "--data", data, "--adapter-path", tmp_path / "a",
              "--iters", 1, "--batch-size", 2, "--val-batches", 1)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["num_layers"] == n
    with pytest.raises(LoadError, match=rf"--num-layers 16 is more than the model's {n} layers; pass {n} or -1 for all"):
        lora_main("--model", base, "--train", "--data", data, "--adapter-path", tmp_path / "b",
                  "--iters", 1, "--num-layers", 16)


def test_help_names_muon_and_minus_one():
    from repo_mlx import lora

    text = lora.build_parser().format_help()
    assert "muon" in text.split("--optimizer")[-1].split("--mask-prompt")[0]
    assert "-1 for all" in text.split("--num-layers NUM_LAYERS")[-1]


def test_torch_adamw_is_one_config_line_away(tmp_path):
    """lora keeps mlx-lm's uncorrected Adam by default (step 1 moves a weight by
    (1 - 0.9) / sqrt(1 - 0.999) = 3.16 lr); optimizer_config turns on torch's bias
    correction (pretrain's), and step 1 then moves it by lr."""
    from repo_mlx import lora

    (tmp_path / "c.yaml").write_text("optimizer: adamw\noptimizer_config:\n  adamw: {bias_correction: true, weight_decay: 0.0}\n")
    for config, moved in ((None, 3.162), (tmp_path / "c.yaml", 1.0)):
        args = lora.parse_args(["--learning-rate", "1e-3"] + (["-c", str(config)] if config else []))
        if config is None:
            args.optimizer, args.optimizer_config = "adamw", {"adamw": {"weight_decay": 0.0}}
        layer = nn.Linear(4, 4)
        opt = finetune.build_optimizer(args)
        before = layer.weight
        opt.update(layer, {"weight": mx.ones((4, 4)), "bias": mx.ones((4,))})
        step = mx.abs(layer.weight - before).mean().item() / 1e-3
        assert abs(step - moved) < 2e-3, (config, step)
