"""repo_mlx.lora --train-mode dpo|orpo: the losses against numpy, the reference
is the base exactly, training raises held-out accuracy and margin, Ctrl-C and
resume are bit-identical, a RePo Llama folder (GQA, chat template) trains and
fuses, bad data stops in one line naming file and line."""

import contextlib
import io
import json
import random
import re
import signal
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tuner.callbacks import TrainingCallback
from finetune_helpers import ANIMALS, PLACES, make_model
from mlx.utils import tree_flatten, tree_map

import repo_mlx
from repo_mlx import LoadError, finetune, lora, preference
import synthetic
from repo_mlx.adapters import setup_trainable
from repo_mlx.convert import convert
from repo_mlx.fuse import fuse
from repo_mlx.trainer import Trainer

KIND, UNKIND = ["calm", "kind", "glad", "warm"], ["angry", "mean", "cold", "sad"]
LORA = {"rank": 4, "dropout": 0.0, "scale": 10.0}
EPS = np.finfo(np.float32).eps


def pair(rng: random.Random, chat: bool = False) -> dict:
    """Chosen answers are kind words, rejected ones unkind (sometimes longer)."""
    a, p = rng.choice(ANIMALS), rng.choice(PLACES)
    line = {"prompt": f"the {a} sat on the {p}. the {a} is", "chosen": f" {rng.choice(KIND)}.",
            "rejected": f" {rng.choice(UNKIND)}" + " and loud" * rng.randrange(2) + "."}
    if chat:  # messages lists, a system message, and a string: every form at once
        line = {"system": "Answer in one word.", "prompt": [{"role": "user", "content": line["prompt"]}],
                "chosen": [{"role": "assistant", "content": line["chosen"].strip()}],
                "rejected": line["rejected"].strip()}
    return line


def make_pairs(path, sizes=(("train", 32), ("valid", 8), ("test", 8)), chat=False):
    rng = random.Random(0)
    path.mkdir(parents=True, exist_ok=True)
    for name, n in sizes:
        (path / f"{name}.jsonl").write_text("\n".join(json.dumps(pair(rng, chat)) for _ in range(n)) + "\n")
    return path


def argv(model, data, adapters, *flags, iters=20, lr="1e-3", mode="dpo") -> list:
    return [str(a) for a in [
        "--model", model, "--train", "--data", data, "--adapter-path", adapters, "--train-mode", mode,
        "--iters", iters, "--batch-size", 4, "--learning-rate", lr, "--num-layers", -1,
        "--steps-per-report", 5, "--steps-per-eval", 10, "--val-batches", -1, *flags]]


def run(*args, **kwargs) -> str:
    """``repo_mlx.lora`` in this process; returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        lora.command(argv(*args, **kwargs))
    return out.getvalue()


def val_metrics(log: str):
    return [dict(loss=float(m[0]), margin=float(m[1]), accuracy=float(m[2])) for m in
            re.findall(r"val loss ([-\d.]+), rewards chosen [-\d.]+, rejected [-\d.]+, margin ([-\d.]+), accuracy ([\d.]+)", log)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def q4(base, tmp_path_factory):
    return convert(str(base), str(tmp_path_factory.mktemp("q4") / "q4"), quantize=True)


def adapted(path, kind, position="frozen", seed=0):
    """The model with adapters whose weights are random, so it differs from its base."""
    model, tokenizer = repo_mlx.load(str(path))
    mx.random.seed(seed)  # lora_a's initialisation
    setup_trainable(model, kind, -1, LORA, position)
    rng = np.random.default_rng(seed)
    model.update(tree_map(lambda p: p + mx.array(0.1 * rng.standard_normal(p.shape), p.dtype),
                          model.trainable_parameters()))
    return model, tokenizer


# --- the losses against numpy ----------------------------------------------------


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_logps(logits, rows):
    """Summed log-probabilities of each row's response tokens and their number, in float64."""
    lp = log_softmax(np.array(logits, np.float64))
    sums = [sum(lp[i, t - 1, tokens[t]] for t in range(offset, len(tokens))) for i, (tokens, offset) in enumerate(rows)]
    return np.array(sums), np.array([len(tokens) - offset for tokens, offset in rows], np.float64)


def log_sigmoid(x):
    return -np.logaddexp(0, -x)


@pytest.mark.parametrize("mode,loss_type", [("dpo", "sigmoid"), ("dpo", "hinge"), ("dpo", "ipo"), ("orpo", None)])
def test_losses_match_numpy(base, pairs, mode, loss_type):
    beta = 0.5
    model, tokenizer = adapted(base, "dora")
    batch_pairs = preference.load_pairs(pairs / "train.jsonl", tokenizer, 2048, 4)[:4]
    batch, lengths = preference.collate(batch_pairs, 2048)
    assert len({len(t) for p in batch_pairs for t, _ in p}) > 1  # padding and masks matter
    loss = preference.make_loss(mode, beta, loss_type or "sigmoid")
    value, metrics = loss(model, batch, lengths)

    rows = [c for c, _ in batch_pairs] + [r for _, r in batch_pairs]
    pi, counts = numpy_logps(model(batch[:, :-1]), rows)
    ref, _ = numpy_logps(repo_mlx.load(str(base))[0](batch[:, :-1]), rows)  # a base loaded afresh
    # float32 precision: each summed log-probability (about -100 here) is off by a few ulps,
    # and the losses and rewards are differences of such sums.
    np.testing.assert_allclose(np.array(preference.sequence_logps(model, batch, lengths)[0]), pi, rtol=4 * EPS)
    tol = 8 * EPS * np.abs(pi).max()
    n = len(batch_pairs)
    if mode == "orpo":
        avg = pi / counts
        log_odds = (avg[:n] - avg[n:]) - (np.log1p(-np.exp(avg[:n])) - np.log1p(-np.exp(avg[n:])))
        want = -pi[:n].sum() / counts[:n].sum() - beta * log_sigmoid(log_odds).mean()
        rc, rr = beta * avg[:n], beta * avg[n:]
    else:
        if loss_type == "ipo":
            pi, ref = pi / counts, ref / counts
        rc, rr = beta * (pi[:n] - ref[:n]), beta * (pi[n:] - ref[n:])
        d = (rc - rr) / beta
        want = {"sigmoid": -log_sigmoid(beta * d), "hinge": np.maximum(0, 1 - beta * d),
                "ipo": (d - 1 / (2 * beta)) ** 2}[loss_type].mean()
    assert abs(rc - rr).min() > 1e-3  # the adapters move the model away from its reference
    got = [m.item() for m in metrics]
    np.testing.assert_allclose(value.item(), want, rtol=0, atol=tol)
    np.testing.assert_allclose(got, [want * n, counts.sum(), n, rc.sum(), rr.sum(), (rc > rr).sum()],
                               rtol=0, atol=n * tol)


def test_orpo_odds_stay_finite_near_certainty():
    avg = mx.array([-1e-7, -1e-3, -0.5, -40.0])
    got = preference.log1m_exp(avg)
    want = np.log(-np.expm1(np.array(avg, np.float64)))
    np.testing.assert_allclose(np.array(got), want, rtol=1e-6, atol=1e-12)
    grad = mx.grad(lambda x: preference.orpo_losses(x, x - 1, 0.1)[0].sum())(avg)
    assert mx.isfinite(grad).all().item()


# --- the reference ---------------------------------------------------------------


@pytest.mark.parametrize("kind,quantized", [("lora", False), ("dora", False), ("dora", True)])
def test_adapters_off_is_exactly_the_base(base, q4, kind, quantized):
    path = q4 if quantized else base
    model, _ = adapted(path, kind)
    plain, _ = repo_mlx.load(str(path))
    ids = mx.array([list(range(30, 70))])
    tuned = model(ids)
    assert not mx.allclose(tuned, plain(ids)).item()
    with preference.adapters_off(model):
        assert mx.array_equal(model(ids), plain(ids)).item()
    assert mx.array_equal(model(ids), tuned).item()  # the adapters are back
    assert preference.only_adapters_train(model)


@pytest.mark.parametrize("kind,position,copy", [("lora", "lora", False), ("lora", "full", True), ("full", "frozen", True)])
def test_reference_is_a_frozen_copy_when_base_weights_train(base, kind, position, copy):
    model, tokenizer = adapted(base, kind, position)
    args = lora.parse_args(["--model", str(base), "--train-mode", "dpo"])
    reference = preference.reference_model(args, model, tokenizer)
    assert (reference is not None) == copy
    if copy:
        ids = mx.array([list(range(30, 70))])
        assert not tree_flatten(reference.trainable_parameters())
        assert mx.array_equal(reference(ids), repo_mlx.load(str(base))[0](ids)).item()
        assert not mx.allclose(reference(ids), model(ids)).item()


def test_full_fine_tuning_starts_at_its_frozen_copy(base, pairs, tmp_path):
    log = run(base, pairs, tmp_path / "a", "--fine-tune-type", "full", iters=2, lr="1e-4")
    first, last = val_metrics(log)
    assert "Reference model: a frozen copy of the base" in log
    assert first == dict(loss=0.693, margin=0.0, accuracy=0.0) and last["margin"] > 0, log


def test_compiled_step_sees_the_reference(base, pairs):
    """The trainer's compiled step computes the loss the plain call does (the
    adapters are switched off inside the compiled graph too)."""
    model, tokenizer = adapted(base, "dora")
    batch = preference.collate(preference.load_pairs(pairs / "train.jsonl", tokenizer, 2048, 4)[:4], 2048)
    loss = preference.make_loss("dpo", 0.5)
    want = [m.item() for m in loss(model, *batch)[1]]
    args = lora.parse_args(["--learning-rate", "1e-3"])
    trainer = Trainer(model, finetune.build_optimizer(args), loss)
    for _ in range(2):  # the second step runs the compiled graph again, on updated weights
        before = [m.item() for m in loss(model, *batch)[1]]
        got, _ = trainer.train_step(lambda: batch)
        np.testing.assert_allclose([m.item() for m in got], before, rtol=1e-5, atol=1e-6)
    assert before != want  # the weights moved


# --- training ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dpo", "orpo"])
def test_training_raises_held_out_accuracy_and_margin(base, pairs, tmp_path, mode):
    log = run(base, pairs, tmp_path / "adapters", iters=10, mode=mode)
    first, last = val_metrics(log)
    assert last["accuracy"] >= 0.9 and last["accuracy"] > first["accuracy"], log
    assert last["margin"] > first["margin"] + 0.1 and last["loss"] < first["loss"], log
    assert re.search(r"Iter 10: train loss [\d.]+, rewards chosen [-\d.]+, rejected [-\d.]+, margin "
                     r"[-\d.]+, accuracy [\d.]+, lr .*tokens/s .*peak mem", log)
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert (config["train_mode"], config["beta"], config["dpo_loss_type"]) == (mode, 0.1, "sigmoid")
    if mode == "dpo":  # before any step the model is its reference
        assert first == dict(loss=0.693, margin=0.0, accuracy=0.0)
    # --test on the result, as SFT adapters are tested
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        lora.command(["--model", str(base), "--data", str(pairs), "--test", "--train-mode", mode,
                   "--adapter-path", str(tmp_path / "adapters"), "--batch-size", "4"])
    assert re.search(r"Test loss [\d.]+, rewards chosen .*accuracy (1\.000|0\.9)", out.getvalue()), out.getvalue()


def test_ctrl_c_and_resume_equal_an_uninterrupted_run(base, pairs, tmp_path, monkeypatch):
    config = tmp_path / "config.yaml"
    config.write_text("lora_parameters:\n  rank: 4\n  dropout: 0.2\n  scale: 10.0\n")  # random state matters
    flags = ["-c", config, "--fine-tune-type", "dora", "--save-every", 3, "--steps-per-report", 3,
             "--steps-per-eval", 6, "--val-batches", 1]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    full_log = run(base, pairs, full, *flags, iters=6)

    class StopAt3(TrainingCallback):  # mlx-lm's, whose other hooks do nothing
        def on_train_loss_report(self, info):
            if info["iteration"] == 3:
                signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(lora, "get_reporting_callbacks", lambda *a: StopAt3())
    with pytest.raises(SystemExit) as e:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            lora.main(argv(base, pairs, stopped, *flags, iters=6))
    assert e.value.code == 130 and "Iter 3: saved" in out.getvalue()
    monkeypatch.undo()
    log = run(base, pairs, stopped, *flags, "--resume-adapter-file", stopped / "adapters.safetensors", iters=6)
    assert "at iteration 3" in log and val_metrics(log)[-1] == val_metrics(full_log)[-1]
    for file in ("adapters.safetensors", "adapters.state.safetensors"):
        a, b = mx.load(str(full / file)), mx.load(str(stopped / file))
        assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a), file


def test_repo_llama_trains_on_chat_pairs_and_fuses(tmp_path):
    from test_gqa_commands import write_folder

    model = write_folder(tmp_path / "llama", "llama")  # 6 query / 2 KV heads, a ChatML template
    data = make_pairs(tmp_path / "data", sizes=(("train", 8), ("valid", 4)), chat=True)
    tokenizer = repo_mlx.load(str(model))[1]
    (chosen, offset), _ = preference.load_pairs(data / "train.jsonl", tokenizer, 2048, 4)[0]
    line = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    assert tokenizer.decode(chosen[:offset]).startswith("<|im_start|>system\nAnswer in one word.")
    assert tokenizer.decode(chosen[offset:]) == line["chosen"][0]["content"] + "<|im_end|>\n"
    log = run(model, data, tmp_path / "adapters", "--fine-tune-type", "dora", iters=4, lr="1e-2")
    first, last = val_metrics(log)
    assert last["margin"] > first["margin"], log
    fused = fuse(str(model), str(tmp_path / "adapters"), str(tmp_path / "fused"))
    ids = mx.array([list(range(20, 40))])
    want = repo_mlx.load(str(model), adapter_path=str(tmp_path / "adapters"))[0](ids)
    assert mx.abs(repo_mlx.load(str(fused))[0](ids) - want).max().item() < 1e-4 * mx.abs(want).max().item()


def test_qlora_dpo_adapters_load_in_stock_mlx_lm(q4, pairs, tmp_path):
    from mlx_lm.utils import load as mlx_lm_load

    log = run(q4, pairs, tmp_path / "a", "--position-module", "lora", iters=2)
    assert "Reference model: the base (adapters switched off)" in log
    ids = mx.array([list(range(30, 50))])
    stock, _ = mlx_lm_load(str(q4), adapter_path=str(tmp_path / "a"), trust_remote_code=True)
    ours, _ = repo_mlx.load(str(q4), adapter_path=str(tmp_path / "a"))
    assert mx.array_equal(stock(ids), ours(ids)).item()


def test_reference_model_path(base, pairs, tmp_path):
    other = synthetic.write_checkpoint(tmp_path / "other", synthetic.config(), seed=2, position_scale=0.05)
    log = run(base, pairs, tmp_path / "a", "--reference-model-path", other, iters=1)
    assert f"Reference model: {other}" in log
    assert val_metrics(log)[0]["margin"] != 0.0  # policy and reference differ from the start
    wider = synthetic.write_checkpoint(tmp_path / "wider", synthetic.config(vocab_size=384), seed=2)
    with pytest.raises(LoadError, match="has another vocabulary"):
        run(base, pairs, tmp_path / "b", "--reference-model-path", wider, iters=1)
    with pytest.raises(LoadError, match="--reference-model-path is for --train-mode dpo"):
        run(base, pairs, tmp_path / "c", "--reference-model-path", other, iters=1, mode="orpo")


def test_processes_share_each_batch(base, pairs):
    """Under mlx.launch each process takes its share of the pairs of a batch
    (the loss is a mean over pairs, ORPO's NLL weighted by tokens, as lora's)."""

    class Rank:
        def __init__(self, rank, size):
            self.rank, self.size = lambda: rank, lambda: size

    tokenizer = repo_mlx.load(str(base))[1]
    data = preference.load_pairs(pairs / "train.jsonl", tokenizer, 2048, 4)
    rows = lambda world: [tuple(row[:n].tolist()) for batch, lengths in preference.iterate_pairs(data, 4, 2048, 0, world)
                          for row, (_, n) in zip(batch, lengths.tolist())]
    one, halves = rows(Rank(0, 1)), [rows(Rank(r, 2)) for r in range(2)]
    assert sorted(one) == sorted(halves[0] + halves[1]) and halves[0] != halves[1]


# --- bad data ------------------------------------------------------------------

GOOD = json.dumps({"prompt": "the cat is", "chosen": " calm.", "rejected": " angry."})


@pytest.mark.parametrize(
    "line,message",
    [
        (json.dumps({"prompt": "the cat is", "chosen": " calm."}), r"line 2: missing 'rejected'"),
        (json.dumps({"prompt": "the cat is", "chosen": " ", "rejected": " angry."}), r"line 2: 'chosen' is empty"),
        (json.dumps({"prompt": "the cat " * 20, "chosen": " calm.", "rejected": " angry."}),
         r"line 2: the prompt is 160 tokens, which leaves no room for a response within --max-seq-length 64"),
        (json.dumps({"prompt": "the cat is", "chosen": 3, "rejected": " angry."}), r"line 2: 'chosen' must be a string"),
        (json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}),
         r"line 2: chat messages and 'system' need a chat template"),
        ("{oops", r"line 2: not valid JSON"),
    ],
)
def test_bad_pairs_name_file_and_line(base, tmp_path, line, message):
    tokenizer = repo_mlx.load(str(base))[1]
    (tmp_path / "train.jsonl").write_text(f"{GOOD}\n{line}\n{GOOD}\n")
    with pytest.raises(LoadError, match=re.escape(str(tmp_path / "train.jsonl")) + ", " + message):
        preference.load_pairs(tmp_path / "train.jsonl", tokenizer, 64, 2)


def test_cli_bad_pair_is_one_line_and_writes_nothing(base, tmp_path):
    (tmp_path / "train.jsonl").write_text(f"{GOOD}\n{GOOD}\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "repo_mlx.lora", "--model", str(base), "--train", "--train-mode", "orpo",
                        "--data", str(tmp_path), "--adapter-path", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'train.jsonl'}, line 3: missing 'rejected' (a preference line needs 'prompt', "
        "'chosen' and 'rejected'; found keys: 'prompt', 'chosen')."], r.stderr
    assert not (tmp_path / "out").exists()


def test_config_values_are_checked(tmp_path):
    for text, message in (("train_mode: ppo\n", "train_mode must be one of sft, dpo, orpo"),
                          ("dpo_loss_type: robust\n", "dpo_loss_type must be one of sigmoid, hinge, ipo"),
                          ("beta: 0\n", r"beta must be a number > 0")):
        (tmp_path / "c.yaml").write_text(text + "train_mode: dpo\n" * ("train_mode" not in text))
        with pytest.raises(LoadError, match=message):
            preference.check_args(lora.parse_args(["-c", str(tmp_path / "c.yaml")]))
