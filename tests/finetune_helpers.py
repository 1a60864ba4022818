"""Shared by the fine-tuning tests: a well-conditioned tiny model, data, a trainer call."""

import contextlib
import io
import json
import random
import re
from pathlib import Path

import synthetic

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "horse", "tiger", "penguin"]
PLACES = ["mat", "log", "box", "hill", "tree", "old barn", "river bank"]


def make_model(path: Path) -> Path:
    """A random tiny RePo checkpoint whose positions span about +-10.

    The official fixture's random position module spreads positions over
    +-200, which makes its training chaotic (1e-7 changes grow 500x per step);
    a trained model is smooth, and so is this one.
    """
    return synthetic.write_checkpoint(path, synthetic.config(), seed=1, position_scale=0.05)


def sentence(rng: random.Random) -> str:
    a, p = rng.choice(ANIMALS), rng.choice(PLACES)
    extra = " and then it sleeps" * rng.randrange(3)  # unequal lengths
    return f"the {a} sat on the {p}{extra}. the {a} likes the {p}."


def make_data(path: Path, sizes=(("train", 64), ("valid", 16), ("test", 16)), seed=0) -> Path:
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    for name, n in sizes:
        lines = [json.dumps({"text": sentence(rng)}) for _ in range(n)]
        (path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return path


def train(model, data, adapters, *flags, iters=20, lr="1e-3") -> str:
    """Run ``repo_mlx.lora`` in this process; returns what it printed."""
    from repo_mlx import lora

    argv = [
        "--model", str(model), "--train", "--data", str(data), "--adapter-path", str(adapters),
        "--iters", str(iters), "--batch-size", "4", "--learning-rate", lr,
        "--num-layers", "-1", "--steps-per-report", "5", "--steps-per-eval", "10",
        "--val-batches", "-1", *map(str, flags),
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        lora.command(argv)
    return out.getvalue()


def val_losses(log: str):
    return [float(v) for v in re.findall(r"val loss ([\d.]+)", log)]
