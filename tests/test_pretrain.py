"""Continual pre-training into RePo (repo_mlx.pretrain): the inserted module,
gradients, precision, resume, data parallel, token cache, output and bad input."""

import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from finetune_helpers import sentence
from mlx.utils import tree_flatten, tree_unflatten
from test_distributed import free_port_pair

import repo_mlx
from repo_mlx import _cli, pretrain, pretrain_data
import synthetic
from repo_mlx.trainer import MASTER, clip_grad_norm

FIXTURE = Path(__file__).parent / "fixtures" / "repo-olmo2-tiny"
SMALL = ["--seq-len", "32", "--batch-size", "4", "--dtype", "float32", "--learning-rate", "1e-3",
         "--steps-per-report", "1", "--steps-per-eval", "3", "--repo-start-layer", "1"]


def settings(**kw):
    """pretrain's arguments with its defaults, as parse_args makes them."""
    argv = ["--model", "m", "--data", "d"]
    args = pretrain.parse_args(argv)
    args.model = args.data = None
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def run_cli(*argv, on_step=None):
    """Run the command in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if on_step is None:
                pretrain.main([str(a) for a in argv])
            else:
                _cli.run(lambda a: pretrain.run(pretrain.parse_args(a), on_step), [str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def write_text(path: Path, n=120, seed=0) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": sentence(rng)}) + "\n" for _ in range(n)))
    return path


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A plain (non-RePo) OLMo-2 checkpoint of the fixture's shape, and data for it."""
    root = tmp_path_factory.mktemp("pretrain")
    base = synthetic.write_checkpoint(root / "plain", synthetic.config(repo=False), seed=1)
    return base, write_text(root / "train.jsonl"), root


# --- the inserted module -----------------------------------------------------------


def test_inserted_module_layers_shapes_and_weights(plain):
    base, _, _ = plain
    prep = pretrain.prepare_model(settings(model=str(base), repo_layer_ids="0,2,3", repo_start_layer=2, dtype="float32"), log=lambda *a: None)
    assert prep.inserted and prep.repo_layers == [2, 3]
    assert prep.model.args.repo_layers == [2, 3]
    for i, layer in enumerate(prep.model.layers):
        assert layer.self_attn.repo == (i in (2, 3))
    params = dict(tree_flatten(prep.model.parameters()))
    assert params["model.layers.2.self_attn.gate_map.weight"].shape == (8, 64)
    assert params["model.layers.3.self_attn.content_map.weight"].shape == (8, 64)
    assert params["model.layers.3.self_attn.final_map.weight"].shape == (4, 8)
    # Every base weight is kept exactly.
    stored = mx.load(str(base / "model.safetensors"))
    assert set(params) - set(stored) == {
        f"model.layers.{i}.self_attn.{n}.weight" for i in (2, 3) for n in ("gate_map", "content_map", "final_map")
    }
    for k, v in stored.items():
        assert mx.array_equal(params[k], v), k
    assert prep.config["pe_config"]["dynmaic_pe_start_layer"] == 2
    assert prep.config["pe_config"]["dynmaic_pe_layer_ids"] == "0,2,3"


def test_init_statistics_are_the_official_truncated_normal():
    args = repo_mlx.repo_olmo2.ModelArgs.from_dict(synthetic.config(hidden_size=1024, num_attention_heads=8, start_layer=0))
    model = repo_mlx.repo_olmo2.Model(args)
    w = pretrain.init_position_weights(model, seed=0)
    assert len(w) == 3 * args.num_hidden_layers
    gate = np.array(w["model.layers.0.self_attn.gate_map.weight"])
    assert gate.shape == (128, 1024)
    # N(0, 0.02) cut at +-3 std has std 0.02 * 0.98658 and nothing beyond 0.06.
    assert abs(gate.mean()) < 2e-4
    assert abs(gate.std() / (0.02 * 0.98658) - 1) < 0.01
    assert np.abs(gate).max() <= 0.06 and np.abs(gate).max() > 0.059
    assert abs((np.abs(gate) > 0.04).mean() - 0.0428) < 0.003  # the truncated tail mass beyond 2 std
    # Each matrix is drawn afresh; the seed decides them.
    assert not np.array_equal(gate, np.array(w["model.layers.1.self_attn.gate_map.weight"]))
    again = pretrain.init_position_weights(model, seed=0)
    assert all(mx.array_equal(w[k], again[k]) for k in w)


def test_position_warmup_step_zero_is_the_base_model(plain):
    base, _, _ = plain
    prep = pretrain.prepare_model(settings(model=str(base), repo_start_layer=1, dtype="float32"), log=lambda *a: None)
    with pytest.warns(UserWarning, match="plain OLMo-2"):
        plain_model, _ = repo_mlx.load(str(base))
    trainer = pretrain.make_trainer(prep.model, settings(iters=10, position_warmup=4, grad_checkpoint=False, z_loss=0.0))
    assert [trainer.blend(s) for s in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    repo_mlx.set_position_blend(prep.model, trainer.blend(0))
    ids = mx.array(np.random.default_rng(0).integers(0, 318, (2, 40)))
    ours, theirs = prep.model(ids), plain_model(ids)
    # Integer positions through the continuous rotation: the base's logits.
    assert mx.abs(ours - theirs).max().item() < 1e-5  # float32 rounding: 1.9e-6 seen
    # Without the blend the new module's near-zero positions change them.
    repo_mlx.set_position_blend(prep.model, 0.0)
    assert mx.abs(prep.model(ids) - theirs).max().item() > 1e-2


# --- gradients ------------------------------------------------------------------------


def test_gradients_match_the_official_implementation():
    official = dict(np.load(FIXTURE / "official-grads.npz"))
    model, _ = repo_mlx.load(str(FIXTURE))
    model.unfreeze()
    ids = mx.array(official["input_ids"])
    loss_and_grad = nn.value_and_grad(model, lambda m, b: pretrain.loss_fn(m, b, 0.0))
    for blend in (0, 1):
        repo_mlx.set_position_blend(model, float(blend))
        (loss, _), grads = loss_and_grad(model, ids)
        assert abs(loss.item() - official[f"loss_pdrop{blend}"]) < 1e-4
        grads = dict(tree_flatten(grads))
        errors = []
        for key, ref in official.items():
            if not key.startswith(f"pdrop{blend}/"):
                continue
            g = np.array(grads[key.split("/", 1)[1]])
            if not np.abs(ref).max():  # the position module under integer positions
                assert np.abs(g).max() == 0, key
                continue
            errors.append(np.median(np.abs(g - ref) / (np.abs(ref) + 1e-3 * np.abs(ref).max())))
        assert len(errors) >= 40
        # What an independent float32 computation achieves (fixtures README).
        assert np.median(errors) < (1e-3 if blend == 0 else 2e-5), np.median(errors)


def test_gradient_clipping_uses_an_accurate_global_norm():
    # 8M elements: MLX's CPU sum in float32 (optim.clip_grad_norm) is 0.5% low here.
    grads = {"big": mx.random.normal((1 << 14, 512), key=mx.random.key(0)) * 1e-3,
             "layers": [{"w": mx.full((3, 4097), 1e-3)}, {"w": mx.full((5,), 2e-3)}]}
    exact = np.sqrt(sum((np.array(g, np.float64) ** 2).sum() for _, g in tree_flatten(grads)))
    clipped, norm = clip_grad_norm(grads, 1.0)
    assert abs(norm.item() / exact - 1) < 1e-5
    scale = 1.0 / (exact + 1e-6)  # PyTorch's rule: clip to max_norm / (norm + 1e-6)
    for (k, g), (_, c) in zip(tree_flatten(grads), tree_flatten(clipped)):
        np.testing.assert_allclose(np.array(c), np.array(g) * scale, rtol=1e-5, err_msg=k)
    kept, _ = clip_grad_norm(grads, 2 * exact)  # under the limit: unchanged
    assert all(mx.array_equal(a, b).item() for (_, a), (_, b) in zip(tree_flatten(grads), tree_flatten(kept)))


def test_gradients_match_finite_differences(plain):
    """One training step's loss (z-loss included) against central differences, in float64."""
    base, _, _ = plain
    prep = pretrain.prepare_model(settings(model=str(base), repo_start_layer=1, dtype="float32"), log=lambda *a: None)
    model = prep.model
    # Make the new module matter: positions of a few units instead of ~0.
    for layer in model.layers[1:]:
        layer.self_attn.final_map.weight = layer.self_attn.final_map.weight * 100
    model.set_dtype(mx.float64)
    model.unfreeze()
    ids = mx.array(np.random.default_rng(1).integers(0, 318, (2, 16)))
    f = lambda m: pretrain.loss_fn(m, ids, 0.1)
    (_, (ce, z)), grads = nn.value_and_grad(model, lambda m: f(m))(model)
    assert z.item() > 1e-3  # the z-loss term is in play
    grads = dict(tree_flatten(grads))
    params = dict(tree_flatten(model.parameters()))
    rng = np.random.default_rng(2)
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
             "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_norm.weight",
             "model.layers.2.mlp.down_proj.weight"] + [
        f"model.layers.{i}.self_attn.{n}.weight" for i in (1, 3) for n in ("gate_map", "content_map", "final_map")
    ]
    # Rotation angles are float32 even here, so the loss carries ~1e-7 noise: take
    # large steps and cancel their h^2 error (Richardson).
    h = 3e-2
    for name in names:
        v = mx.array(rng.standard_normal(params[name].shape)).astype(mx.float64)
        v = v * mx.sqrt((params[name] ** 2).sum() / (v * v).sum())

        def slope(t):
            loss = []
            for s in (t, -t):
                model.update(tree_unflatten([(name, params[name] + s * v)]))
                loss.append(f(model)[0].item())
            return (loss[0] - loss[1]) / (2 * t)

        fd = (4 * slope(h / 2) - slope(h)) / 3
        model.update(tree_unflatten([(name, params[name])]))
        analytic = (grads[name] * v).sum().item()
        # Plus the float32 angles' ~1e-7 loss noise over the step: 1e-6 (seen on a 1e-4 slope).
        assert abs(fd - analytic) <= 5e-3 * abs(analytic) + 2e-6, (name, fd, analytic)


# --- precision -------------------------------------------------------------------------


def test_half_precision_small_lr_still_changes_weights(plain):
    base, data, _ = plain
    args = settings(model=str(base), repo_start_layer=1, dtype="bfloat16", iters=4, learning_rate=1e-6,
                    seq_len=32, batch_size=4, grad_checkpoint=False)
    prep = pretrain.prepare_model(args, log=lambda *a: None)
    tokens = pretrain_data.token_cache(pretrain_data.Source(str(data)), prep.tokenizer, data.parent / "half.tokens", "train", lambda *a: None)
    train_set = pretrain_data.Packed(tokens, 32)
    pretrain.setup_trainable(prep.model, "all", None)
    trainer = pretrain.make_trainer(prep.model, args, pretrain.to_compute_dtype(prep, "bfloat16"))
    assert all(v.dtype == mx.bfloat16 for _, v in tree_flatten(prep.model.parameters()))
    before = dict(trainer.master)
    assert set(before) == {k for k, _ in tree_flatten(prep.model.trainable_parameters())}
    bf16_before = dict(tree_flatten(prep.model.parameters()))
    source = pretrain.batches(train_set, args)
    trainer.train_step(lambda: next(source))
    after = trainer.master
    changed = np.mean([not mx.array_equal(before[k], after[k]).item() for k in before])
    assert changed == 1.0  # every float32 master moved
    # The same update applied to the bfloat16 weights is mostly swallowed.
    same = total = 0
    for k in before:
        naive = bf16_before[k] + (after[k] - before[k]).astype(mx.bfloat16)
        same += (naive == bf16_before[k]).sum().item()
        total += naive.size
    assert same / total > 0.9
    # The model computes with the masters' rounding, not with a stale copy.
    for k, v in tree_flatten(prep.model.trainable_parameters()):
        assert mx.array_equal(v, after[k].astype(mx.bfloat16)), k


# --- runs: loss, resume, output -----------------------------------------------------------


@pytest.fixture(scope="module")
def runs(plain):
    """The same run uninterrupted, and interrupted by Ctrl-C at step 2 then resumed."""
    base, data, root = plain
    config = root / "run.yaml"
    config.write_text("grad_accumulation_steps: 2\nposition_warmup: 3\nseq_len: 32\n")
    flags = [*SMALL, "--dtype", "bfloat16", "-c", config, "--iters", "5", "--save-every", "2",
             "--keep-checkpoints", "5"]
    one = root / "one"
    code, log_one, err = run_cli("--model", base, "--data", data, "--save-path", one, *flags,
                                 "--export-hf", root / "one-hf", "--plot", root / "one.png")
    assert code == 0, err

    def interrupt(trainer):
        if trainer.step == 3:
            signal.raise_signal(signal.SIGINT)

    two = root / "two"
    code, log_a, err = run_cli("--model", base, "--data", data, "--save-path", two, *flags, on_step=interrupt)
    assert code == 130, err
    code, log_b, err = run_cli("--resume", two)
    assert code == 0, err
    return types.SimpleNamespace(one=one, two=two, log_one=log_one, log_a=log_a, log_b=log_b, root=root)


def test_loss_falls_and_progress_is_reported(runs):
    records = [json.loads(l) for l in (runs.one / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    for key in ("z_loss", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_gb", "eta_seconds"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert np.allclose([r["position_blend"] for r in train], [1.0, 2 / 3, 1 / 3, 0.0, 0.0])
    # Linear decay to 0 over 5 steps, no warm-up.
    assert np.allclose([r["learning_rate"] for r in train], [1e-3 * (1 - s / 5) for s in range(5)])
    evals = [r for r in records if "positions" in r]
    assert [r["step"] for r in evals] == [0, 3, 5]
    assert set(evals[0]["positions"]) == {"1", "2", "3"}
    assert all(0 <= s["increasing"] <= 1 for r in evals for s in r["positions"].values())
    assert "val_loss" in evals[0] and "ETA" in runs.log_one and "peak mem" in runs.log_one
    assert (runs.root / "one.png").read_bytes()[:4] == b"\x89PNG"


def test_interrupted_and_resumed_equals_uninterrupted(runs):
    assert "saved checkpoint" in runs.log_a and "Resuming from" in runs.log_b
    ckpts = lambda out: [p.stem for p in pretrain.checkpoints(out)]
    assert ckpts(runs.one) == ["step-0000002", "step-0000004", "step-0000005"]
    assert ckpts(runs.two) == ["step-0000002", "step-0000003", "step-0000004", "step-0000005"]
    for name in ("step-0000004.safetensors", "step-0000004.state.safetensors",
                 "step-0000005.safetensors", "step-0000005.state.safetensors"):
        (x, mx_), (y, my) = (mx.load(str(o / "checkpoints" / name), return_metadata=True) for o in (runs.one, runs.two))
        assert x.keys() == y.keys() and mx_ == my
        for k in x:
            assert mx.array_equal(x[k], y[k]).item(), (name, k)
    _, state = mx.load(str(runs.one / "checkpoints" / "step-0000005.state.safetensors"), return_metadata=True)
    assert state["cursor"] == str(5 * 2 * 4) and state["step"] == "5"
    same = lambda out: [l for l in (out / "metrics.jsonl").read_text().splitlines()
                        if "tokens_per_second" not in l and "eta" not in l]
    assert [json.loads(l)["step"] for l in same(runs.two)] == [json.loads(l)["step"] for l in same(runs.one)]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def test_resume_finishes_a_killed_final_write_and_says_when_complete(plain, tmp_path):
    base, data, _ = plain
    out = tmp_path / "o"
    flags = [*SMALL, "--iters", "3", "--save-every", "2"]
    assert run_cli("--model", base, "--data", data, "--save-path", out, *flags)[0] == 0
    final = {f.name: f.read_bytes() for f in out.glob("model*.safetensors")}
    # Killed while moving the final files in: config.json goes first, weights half there.
    (out / "config.json").unlink()
    (out / "model.safetensors").write_bytes(b"torn")
    (out / f".final.partial-{dead_pid()}").mkdir()
    code, log, err = run_cli("--resume", out)
    assert code == 0 and "writing the final model the interrupted run did not finish" in log, err
    assert {f.name: f.read_bytes() for f in out.glob("model*.safetensors")} == final
    assert not list(out.glob(".final*"))
    code, log, err = run_cli("--resume", out)
    assert code == 0 and "is complete (step 3" in log and "Loading" not in log, err
    # A larger --iters trains on and is recorded.
    code, log, err = run_cli("--resume", out, "--iters", "4")
    assert code == 0 and "Resuming from" in log and "Step 4/4" in log, err
    assert json.loads((out / "pretrain_args.json").read_text())["iters"] == 4


@pytest.mark.parametrize("damage", ["truncated-weights", "no-state", "torn-optimizer"])
def test_resume_skips_a_damaged_newest_checkpoint(plain, tmp_path, damage):
    base, data, _ = plain
    one, two = tmp_path / "one", tmp_path / "two"
    flags = [*SMALL, "--iters", "4", "--save-every", "2", "--keep-checkpoints", "3"]
    assert run_cli("--model", base, "--data", data, "--save-path", one, *flags)[0] == 0
    shutil.copytree(one, two)
    (two / "config.json").unlink()
    newest = two / "checkpoints" / "step-0000004.safetensors"
    state = two / "checkpoints" / "step-0000004.state.safetensors"
    if damage == "truncated-weights":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    elif damage == "no-state":
        state.unlink()
    else:
        state.write_bytes(b"\x00" * 3)
    with open(two / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # half a line
    with pytest.warns(UserWarning, match=r"step-0000004.safetensors is damaged.*trying the newest one before it"):
        code, log, err = run_cli("--resume", two)
    assert code == 0 and "Resuming from" in log and "step-0000002.safetensors at step 2" in log, err
    for f in ("model.safetensors", "checkpoints/step-0000004.safetensors"):
        a, b = mx.load(str(one / f)), mx.load(str(two / f))
        assert all(mx.array_equal(a[k], b[k]).item() for k in a), f
    assert all(json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines())


def test_stale_scratch_of_killed_runs_is_removed_and_a_lost_output_restored(plain, tmp_path):
    from repo_mlx.files import remove_stale

    base, data, _ = plain
    out = tmp_path / "o"
    assert run_cli("--model", base, "--data", data, "--save-path", out, *SMALL, "--iters", "2")[0] == 0
    pid = dead_pid()
    folders = [tmp_path / f".o.partial-{pid}"]
    files = [tmp_path / "o.tokens" / f".train-x.u32.partial-{pid}", out / f".config.json.partial-{pid}.json",
             out / "checkpoints" / f".step-0000003.safetensors.partial-{pid}.safetensors"]
    for p in folders:
        p.mkdir()
    for p in files:
        p.write_text("x")
    stale = folders + files
    alive = tmp_path / f".o.partial-{os.getpid()}"
    alive.mkdir()
    code, log, err = run_cli("--resume", out, "--iters", "3")
    assert code == 0, err
    assert not any(p.exists() for p in stale) and alive.exists()
    # Killed between the two renames of a replace: the old output is the only copy.
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "a.txt").write_text("previous")
    (tmp_path / "gone").rename(tmp_path / f".gone.old-{pid}")
    remove_stale(tmp_path)
    assert (tmp_path / "gone" / "a.txt").read_text() == "previous"


def test_output_loads_and_round_trips_through_export_hf(runs):
    ours, tokenizer = repo_mlx.load(str(runs.one))  # the loader's config/weight cross-check
    assert ours.args.repo_layers == [1, 2, 3]
    hf, _ = repo_mlx.load(str(runs.root / "one-hf"))
    ids = mx.array([tokenizer.encode("the cat sat on the mat.")])
    assert mx.array_equal(ours(ids), hf(ids)).item()
    config = json.loads((runs.root / "one-hf" / "config.json").read_text())
    assert config["pe_config"]["dynmaic_pe_start_layer"] == 1 and "model_file" not in config
    # Saved from the float32 masters in the base's dtype.
    assert {v.dtype for _, v in tree_flatten(ours.parameters())} == {mx.float32}
    state = mx.load(str(runs.one / "checkpoints" / "step-0000005.state.safetensors"))
    master = state[MASTER + "lm_head.weight"]  # bfloat16 training: the float32 master
    assert mx.array_equal(dict(tree_flatten(ours.parameters()))["lm_head.weight"], master).item()
    stock = (
        "import sys, json; sys.modules['repo_mlx'] = None\n"
        "import mlx.core as mx, mlx_lm\n"
        "m, t = mlx_lm.load(sys.argv[1], trust_remote_code=True)\n"
        "print(json.dumps(m(mx.array([json.loads(sys.argv[2])]))[0, -1].tolist()))\n"
    )
    r = subprocess.run([sys.executable, "-c", stock, str(runs.one), json.dumps(ids[0].tolist())],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert np.allclose(json.loads(r.stdout), np.array(ours(ids)[0, -1]), atol=1e-5)


def test_position_and_lora_settings_train_what_they_say(plain, tmp_path):
    base, data, _ = plain
    for train_only, expect in (("position", {"gate_map", "content_map", "final_map"}),
                               ("position+lora", {"gate_map", "content_map", "final_map", "lora_a", "lora_b"})):
        out = tmp_path / train_only
        code, log, err = run_cli("--model", base, "--data", data, "--save-path", out, *SMALL,
                                 "--iters", "2", "--train-only", train_only)
        assert code == 0, err
        saved = mx.load(str(out / "checkpoints" / "step-0000002.safetensors"))
        assert {k.split(".")[-2] if "lora" not in k else k.split(".")[-1] for k in saved} == expect
        model, _ = repo_mlx.load(str(out))  # LoRA fused into a plain RePo folder
        base_w = mx.load(str(base / "model.safetensors"))
        w = dict(tree_flatten(model.parameters()))
        assert mx.array_equal(w["lm_head.weight"], base_w["lm_head.weight"]).item()
        q = "model.layers.2.self_attn.q_proj.weight"
        assert mx.array_equal(w[q], base_w[q]).item() == (train_only == "position")


def test_position_and_lora_on_bfloat16_fuses_in_float32_and_rounds_once(plain, tmp_path):
    from mlx_lm.tuner.lora import LoRALinear

    base, data, root = plain
    bf16 = synthetic.write_checkpoint(root / "plain-bf16", synthetic.config(repo=False), seed=1, dtype="bfloat16")
    out = tmp_path / "o"
    code, log, err = run_cli("--model", bf16, "--data", data, "--save-path", out, *SMALL,
                             "--dtype", "bfloat16", "--iters", "2", "--train-only", "position+lora")
    assert code == 0, err
    # The trained weights: their float32 masters, in the checkpoint's state file.
    state = mx.load(str(out / "checkpoints" / "step-0000002.state.safetensors"))
    trained = {k[len(MASTER):]: v for k, v in state.items() if k.startswith(MASTER)}
    assert trained and all(v.dtype == mx.float32 for v in trained.values())
    base_w, fused = mx.load(str(bf16 / "model.safetensors")), mx.load(str(out / "model.safetensors"))
    once = twice = total = 0
    for k in base_w:
        if not k.endswith("_proj.weight"):
            continue
        a, b = trained[k.replace(".weight", ".lora_a")], trained[k.replace(".weight", ".lora_b")]
        layer = LoRALinear.from_base(nn.Linear(1, 1, bias=False), r=8, scale=20.0)
        layer.linear.weight, layer.lora_a, layer.lora_b = base_w[k].astype(mx.float32), a, b
        once += mx.array_equal(fused[k], layer.fuse().weight.astype(mx.bfloat16)).item()
        layer.linear.weight = base_w[k]  # mlx-lm's fuse in bfloat16: the delta, then the sum rounded
        twice += mx.array_equal(fused[k], layer.fuse().weight).item()
        total += 1
    assert total == 28 and once == total and twice < total, (once, twice, total)


def test_quantized_base_trains_position_and_lora(plain, tmp_path):
    """The 16 GB route: a 4-bit plain base, QLoRA plus the full position module."""
    from repo_mlx.convert import convert

    base, data, _ = plain
    with pytest.warns(UserWarning, match="plain OLMo-2"), contextlib.redirect_stdout(io.StringIO()):
        q4 = convert(str(base), str(tmp_path / "q4"), quantize=True, q_group_size=32)
    out = tmp_path / "out"
    code, log, err = run_cli("--model", q4, "--data", data, "--save-path", out, *SMALL,
                             "--iters", "2", "--train-only", "position+lora", "--dtype", "bfloat16")
    assert code == 0, err
    model, _ = repo_mlx.load(str(out))
    assert model.args.repo_layers == [1, 2, 3]
    assert isinstance(model.layers[2].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(model.layers[2].self_attn.gate_map, nn.Linear)  # positions stay float
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4


# --- data parallel ------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_match_one_on_the_combined_batch(plain, tmp_path):
    base, data, _ = plain
    flags = [*SMALL, "--iters", "3", "--grad-clip", "0.05"]  # the clip acts on the averaged gradient
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = run_cli("--model", base, "--data", data, "--save-path", one, *flags)
    assert code == 0, err
    launcher = shutil.which("mlx.launch", path=str(Path(sys.executable).parent))
    assert launcher, "mlx.launch is not installed beside this Python"
    r = subprocess.run(
        [launcher, "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2",
         "--starting-port", str(free_port_pair()), "--", sys.executable, "-m", "repo_mlx.pretrain",
         "--model", str(base), "--data", str(data), "--save-path", str(two), *map(str, flags)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("Step 3: saved checkpoint") == 1  # only rank 0 prints and saves
    rec = lambda out: [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rec(one), rec(two)):
        for k in ("loss", "val_loss", "grad_norm"):
            if k in a:
                assert abs(a[k] - b[k]) < 1e-4 * abs(a[k]), (k, a, b)
    x = mx.load(str(one / "checkpoints" / "step-0000003.safetensors"))
    y = mx.load(str(two / "checkpoints" / "step-0000003.safetensors"))
    # atol 1% of one step (lr 1e-3): torch's bias-corrected first Adam step moves a weight
    # by lr * g / (|g| + 1e-8), so a gradient near 1e-8 turns summation-order rounding
    # into up to 3e-6 (seen in 1 of 8192 elements).
    for k in x:
        assert mx.allclose(x[k], y[k], rtol=1e-4, atol=1e-5).item(), k


# --- token cache --------------------------------------------------------------------------


class Tok:
    """A stand-in tokenizer: one id per character, eos 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}

    def get_vocab(self):
        return {"": 0}


def test_token_cache_packing_and_eos(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("abc")
    (docs / "b.jsonl").write_text('{"text": "de"}\n\n{"text": ""}\n{"text": "fghij"}\n')
    logs = []
    tokens = pretrain_data.token_cache(pretrain_data.Source(str(docs)), Tok(), tmp_path / "c", "train", logs.append)
    # Documents in file order, each followed by EOS; empty ones dropped.
    assert tokens.tolist() == [97, 98, 99, 0, 100, 101, 0, 102, 103, 104, 105, 106, 0]
    packed = pretrain_data.Packed(tokens, 4)
    assert len(packed) == 3  # the 13th token does not fill a sequence
    assert [packed[i].tolist() for i in range(3)] == [[97, 98, 99, 0], [100, 101, 0, 102], [103, 104, 105, 106]]
    train, val = pretrain_data.split(tokens, 4, 0.3)
    assert (len(train), len(val)) == (2, 1) and val[0].tolist() == packed[2].tolist()
    # Unchanged data reuses the file; a changed one is tokenized again.
    again = pretrain_data.token_cache(pretrain_data.Source(str(docs)), Tok(), tmp_path / "c", "train", logs.append)
    assert "reused" in logs[-1] and again.filename == tokens.filename
    (docs / "a.txt").write_text("abX")
    changed = pretrain_data.token_cache(pretrain_data.Source(str(docs)), Tok(), tmp_path / "c", "train", logs.append)
    assert changed.filename != tokens.filename and changed[:3].tolist() == [97, 98, 88]
    assert len(list((tmp_path / "c").iterdir())) == 1  # the stale cache is gone


def test_data_order_depends_only_on_seed_and_cursor():
    a = pretrain_data.batch_indices(10, 3, 0, 25)
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:20]) == list(range(10))
    assert not np.array_equal(a[:10], a[10:20])  # each epoch reshuffled
    assert np.array_equal(pretrain_data.batch_indices(10, 3, 7, 4), a[7:11])


def test_parquet_data(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="the optional data extra")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["ab", "c"]}), tmp_path / "d.parquet")
    tokens = pretrain_data.token_cache(pretrain_data.Source(str(tmp_path / "d.parquet")), Tok(), tmp_path / "c", "t", lambda *a: None)
    assert tokens.tolist() == [97, 98, 0, 99, 0]


# --- bad input ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_bases(plain):
    _, _, root = plain
    gqa = synthetic.config(repo=False, num_key_value_heads=2)
    gqa_path = root / "gqa"
    gqa_path.mkdir()
    (gqa_path / "config.json").write_text(json.dumps(gqa))
    shutil.copy(root / "plain" / "model.safetensors", gqa_path)
    q4 = root / "q4"
    shutil.copytree(root / "plain", q4)
    cfg = json.loads((q4 / "config.json").read_text())
    cfg["quantization"] = {"group_size": 64, "bits": 4}
    (q4 / "config.json").write_text(json.dumps(cfg))
    return {"gqa": gqa_path, "q4": q4}


@pytest.mark.parametrize("case", [
    "start-layer", "layer-ids", "gqa", "quantized", "missing-data", "binary-data", "empty-data",
    "seq-len", "exists", "repo-mismatch", "too-little-data", "plain-repo", "plain-module",
])
def test_bad_input_is_one_clear_line_and_writes_nothing(plain, odd_bases, tmp_path, case):
    base, data, root = plain
    out = tmp_path / "out"
    argv = ["--model", base, "--data", data, "--save-path", out, *SMALL, "--iters", "1"]
    expect = {
        "start-layer": ("--repo-start-layer 4 is beyond the base's 4 layers", ["--repo-start-layer", "4"]),
        "layer-ids": ("has 4 layers", ["--repo-layer-ids", "1,7"]),
        "gqa": ("grouped-query attention (2 key/value heads for 4 query heads)", ["--model", odd_bases["gqa"]]),
        "quantized": ("--train-only all needs float weights", ["--model", odd_bases["q4"]]),
        "missing-data": ("does not exist", ["--data", tmp_path / "nope.txt"]),
        "binary-data": ("is not UTF-8 text", ["--data", tmp_path / "bin.txt"]),
        "empty-data": ("holds no text", ["--data", tmp_path / "empty.jsonl"]),
        "seq-len": ("longer than the base's context of 4096 tokens; use --seq-len 4096 or pass --yarn-factor 2", ["--seq-len", "5000"]),
        "exists": ("already exists; pass --force", []),
        "repo-mismatch": ("already a RePo model with RePo layers [1, 2, 3]", ["--model", FIXTURE, "--repo-start-layer", "2"]),
        "too-little-data": ("fewer than --batch-size 4", ["--data", tmp_path / "short.txt"]),
        "plain-repo": ("--plain continues a plain OLMo-2, but", ["--model", FIXTURE, "--plain"]),
        "plain-module": ("--plain trains every weight of a plain model", ["--plain"]),
    }[case]
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    (tmp_path / "short.txt").write_text("just a few words")
    if case == "exists":
        out.mkdir()
    code, stdout, err = run_cli(*argv, *expect[1])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert expect[0] in err, err
    assert out.exists() == (case == "exists") and not (out.exists() and any(out.iterdir()))
    assert not (tmp_path / "out.tokens").exists()


def test_plain_control_trains_without_a_module(plain, tmp_path):
    """--plain: the same recipe on the plain model, the paper's RoPE control."""
    base, data, _ = plain
    argv = SMALL[: SMALL.index("--repo-start-layer")]
    code, stdout, err = run_cli("--model", base, "--data", data, "--save-path", tmp_path / "o",
                                "--plain", *argv, "--iters", "2")
    assert code == 0, err
    assert "without a position module" in stdout
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert "pe_config" not in config
    weights = mx.load(str(tmp_path / "o" / "model.safetensors"))
    assert not [k for k in weights if "_map" in k]
    before = mx.load(str(base / "model.safetensors"))
    assert set(weights) == set(before)
    assert any(not mx.array_equal(weights[k], before[k]) for k in before)


def test_grad_clip_zero_turns_clipping_off(plain, tmp_path):
    base, data, _ = plain
    assert pretrain.make_trainer(nn.Linear(2, 2), settings(grad_clip=0.0)).grad_clip is None
    assert pretrain.make_trainer(nn.Linear(2, 2), settings()).grad_clip == 1.0
    code, stdout, err = run_cli("--model", base, "--data", data, "--save-path", tmp_path / "o",
                                *SMALL, "--iters", "2", "--grad-clip", "0")
    assert code == 0, err
    assert "Step 2/2: loss " in stdout and "grad norm" not in stdout  # no norm is computed
    records = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_norm"] for r in records if "loss" in r] == [None, None]


def test_hub_dataset_offline_is_one_line(plain, tmp_path):
    pytest.importorskip("datasets", reason="the optional data extra")
    base, _, _ = plain
    r = subprocess.run(
        [sys.executable, "-m", "repo_mlx.pretrain", "--model", str(base), "--data", "someone/no-such-set",
         "--save-path", str(tmp_path / "o"), *SMALL],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 2 and r.stderr.startswith("error: Cannot load Hub dataset someone/no-such-set"), r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "o").exists()


def test_dry_run_prints_the_estimate_and_trains_nothing(plain, tmp_path):
    base, data, _ = plain
    code, stdout, err = run_cli("--model", base, "--data", data, "--save-path", tmp_path / "o", *SMALL, "--dry-run")
    assert code == 0, err
    # Longer than the base's context is fine with YaRN.
    code, _, err = run_cli("--model", base, "--data", data, "--save-path", tmp_path / "o", *SMALL,
                           "--dry-run", "--seq-len", "8192", "--yarn-factor", "2")
    assert code == 0, err
    for part in ("weights", "master weights", "gradients", "optimizer", "activations", "total"):
        assert part in stdout
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tokens").exists()


def test_memory_estimate_of_the_1b_shape():
    model = repo_mlx.repo_olmo2.Model(repo_mlx.repo_olmo2.ModelArgs.from_dict(synthetic.config_1b()))  # lazy: no memory
    n = pretrain.count_parameters(model)
    assert abs(n["total"] / 1.4847e9 - 1) < 0.01  # OLMo-2 1B plus the 0.8% position module
    assert abs(n["position"] / n["total"] - 0.0079) < 0.001 and n["trainable"] == n["total"]
    s = types.SimpleNamespace(dtype="bfloat16", batch_size=1, seq_len=4096, grad_checkpoint=True,
                              grad_accumulation_steps=1)
    est = pretrain.estimate_memory(model, s)
    # bf16 weights, float32 masters and AdamW moments: 2 + 4 + 8 bytes per parameter.
    assert abs(est["weights"] + est["master weights"] + est["optimizer"] - 14 * n["total"]) < 1e6
    pretrain.setup_trainable(model, "position", None)
    assert pretrain.count_parameters(model)["trainable"] == n["position"]
    small = pretrain.estimate_memory(model, s)
    assert small["total"] < est["total"] / 3
    pretrain.setup_trainable(model, "position+lora", {"rank": 8, "dropout": 0.0, "scale": 20.0})
    lora = pretrain.count_parameters(model)
    assert lora["adapters"] == 16 * 8 * (4 * (2048 + 2048) + 3 * (2048 + 8192))  # rank x (in + out) of 7 linears a layer
    assert lora["trainable"] == n["position"] + lora["adapters"] and lora["total"] == n["total"]


def test_sigkill_at_random_moments_resumes_bit_identical():
    """bench/kill_resume.py in small: pretrain (once during its final write) and lora."""
    script = Path(__file__).parents[1] / "bench" / "kill_resume.py"
    r = subprocess.run([sys.executable, str(script), "--kills", "3", "--iters", "8", "--seed", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pretrain: kill 3 during the final write" in r.stdout, r.stdout
    assert r.stdout.count("bit-identical: True; scratch left: []") == 2, r.stdout


# --- the recipe, exactly --------------------------------------------------------------


def test_first_step_is_torch_adamw_with_bias_correction(plain):
    """torch's AdamW corrects its moments: step 1 moves a weight by lr * g / (|g| + eps).

    MLX's default (no correction) moves it by (1 - 0.9) / sqrt(1 - 0.95) = 0.447 x that.
    """
    base, _, _ = plain
    prep = pretrain.prepare_model(settings(model=str(base), plain=True, dtype="float32"), log=lambda *a: None)
    pretrain.setup_trainable(prep.model, "all", None)
    args = settings(learning_rate=1e-3, weight_decay=0.0, grad_clip=0.0, z_loss=0.0, iters=10)
    trainer = pretrain.make_trainer(prep.model, args)
    batch = (mx.array(np.random.default_rng(0).integers(0, 318, (2, 16))),)
    before = dict(tree_flatten(prep.model.parameters()))
    _, grad = nn.value_and_grad(prep.model, lambda m, b: pretrain.loss_fn(m, b, 0.0))(prep.model, *batch)
    mx.eval(before, grad)
    trainer.train_step(lambda: batch)
    after = dict(tree_flatten(prep.model.parameters()))
    for k, g in tree_flatten(grad):
        want = before[k] - 1e-3 * g / (mx.abs(g) + 1e-8)
        assert mx.allclose(after[k], want, rtol=0, atol=1e-6).item(), k
    moved = mx.abs(after["lm_head.weight"] - before["lm_head.weight"]) / 1e-3
    assert np.median(np.array(moved)) > 0.99  # 0.447 without the correction


def test_warmup_logs_step_zero_as_the_base_it_starts_from(plain, tmp_path):
    """With --position-warmup the step-0 model is the base (blend 1): its validation
    loss is the plain control's, not that of the cold module."""
    base, data, _ = plain
    plain_small = SMALL[: SMALL.index("--repo-start-layer")]
    losses = {}
    for name, extra in (("warm", [*SMALL, "--position-warmup", "4"]), ("cold", SMALL), ("plain", [*plain_small, "--plain"])):
        code, _, err = run_cli("--model", base, "--data", data, *extra, "--iters", "1", "--save-path", tmp_path / name)
        assert code == 0, err
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = next(r["val_loss"] for r in records if r.get("step") == 0 and "val_loss" in r)
    assert abs(losses["warm"] - losses["plain"]) < 1e-4, losses
    assert abs(losses["cold"] - losses["plain"]) > 1e-3, losses  # the cold module does move it


def test_nope_control_keeps_positions_at_zero(plain, tmp_path):
    """--nope: the RePo layers' module is fixed at 0 and frozen; everything else trains."""
    base, data, _ = plain
    code, stdout, err = run_cli("--model", base, "--data", data, "--save-path", tmp_path / "o",
                                "--nope", *SMALL, "--iters", "2")
    assert code == 0, err
    assert "NoPE control" in stdout
    weights = mx.load(str(tmp_path / "o" / "model.safetensors"))
    finals = [v for k, v in weights.items() if "final_map" in k]
    assert len(finals) == 3 and all(mx.all(v == 0).item() for v in finals)
    model, tok = repo_mlx.load(str(tmp_path / "o"))
    z = repo_mlx.positions(model, mx.array([[1, 2, 3, 4, 5]]))
    assert sorted(z) == [1, 2, 3] and all(mx.all(v == 0).item() for v in z.values())
    before = mx.load(str(base / "model.safetensors"))
    assert any(not mx.array_equal(weights[k], before[k]) for k in before)
    code, _, err = run_cli("--model", base, "--data", data, "--save-path", tmp_path / "p",
                           "--nope", "--plain", *SMALL, "--iters", "1")
    assert code == 2 and "two different controls" in err


def test_plot_into_a_new_folder(plain, tmp_path):
    """--plot names a folder that does not exist yet: made at the end, as every output."""
    pytest.importorskip("matplotlib")
    base, data, _ = plain
    plot = tmp_path / "new" / "deeper" / "loss.png"
    code, _, err = run_cli("--model", base, "--data", data, "--save-path", tmp_path / "o", *SMALL, "--iters", "1", "--plot", plot)
    assert code == 0, err
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_probe_prints_the_base_s_token_index_r2_and_trains_nothing(plain, tmp_path):
    from repo_mlx.probe import index_probe

    base, data, _ = plain
    code, stdout, err = run_cli("--model", base, "--data", data, "--save-path", tmp_path / "o", *SMALL, "--probe")
    assert code == 0, err
    rows = [line.split() for line in stdout.splitlines() if line.strip().startswith("layer ")]
    model, tok = repo_mlx.load(str(base))
    assert [int(r[1]) for r in rows] == list(range(len(model.layers)))
    assert ["(RePo" in " ".join(r) for r in rows] == [i >= 1 for i in range(len(model.layers))]  # --repo-start-layer 1
    # The probe of the plain base itself (the inserted module is blended away), on the held-out
    # sequences first, then training ones.
    args = pretrain.parse_args(["--model", str(base), "--data", str(data), *SMALL])
    train, val, _ = pretrain.load_split(args, tok, tmp_path / "o.tokens")
    seqs = [d[i] for d in (val, train) for i in range(min(len(d), 16))][:16]
    want = index_probe(model, seqs)
    assert [float(r[3]) for r in rows] == pytest.approx([round(v, 2) for v in want.values()], abs=0.011)
    assert not (tmp_path / "o").exists()
