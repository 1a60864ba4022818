"""Data parallel: ``mlx.launch`` (ring backend, two processes on 127.0.0.1)
trains like one process on the combined batch."""

import re
import shutil
import socket
import subprocess
import sys
import types

import mlx.core as mx
import pytest
from finetune_helpers import make_data, make_model, train

import repo_mlx
from repo_mlx import finetune, finetune_data

FLAGS = ["--position-module", "full", "--optimizer", "adam", "--steps-per-report", "2"]


def free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (one per ring rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


class Rank:
    """Stands in for a process group when computing what each rank would load."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return make_model(root / "base"), make_data(root / "data"), root


def test_ranks_hold_unequal_token_counts(setup):
    # Otherwise the per-process token weighting would go untested below.
    base, data, _ = setup
    tokenizer = repo_mlx.load(str(base))[1]
    args = types.SimpleNamespace(data=str(data), train=True, test=False, batch_size=4,
                                 max_seq_length=2048, seed=0, mask_prompt=False)
    train_set = finetune_data.load_data(args, tokenizer)[0]
    counts = []
    for r in range(2):
        batches = finetune.train_batches(train_set, args, Rank(r, 2))
        counts.append([int(next(batches)[1][:, 1].sum()) for _ in range(8)])
    assert counts[0] != counts[1]


def test_two_processes_match_one_on_the_combined_batch(setup):
    base, data, root = setup
    one, two = root / "one", root / "two"
    log_one = train(base, data, one, *FLAGS, iters=8)

    launcher = shutil.which("mlx.launch", path=str(sys.executable.rsplit("/", 1)[0]))
    assert launcher, "mlx.launch is not installed beside this Python"
    argv = [
        "--model", base, "--train", "--data", data, "--adapter-path", two, "--iters", "8",
        "--batch-size", "4", "--learning-rate", "1e-3", "--num-layers", "-1",
        "--steps-per-eval", "10", "--val-batches", "-1", *FLAGS,
    ]
    r = subprocess.run(
        [launcher, "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2",
         "--starting-port", str(free_port_pair()), "--",
         sys.executable, "-m", "repo_mlx.lora", *map(str, argv)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    log_two = r.stdout

    # Only rank 0 prints and saves.
    assert log_two.count("Iter 8: saved") == 1
    losses = lambda log: re.findall(r"train loss ([\d.]+)", log)
    assert losses(log_one) == losses(log_two) and len(losses(log_one)) == 4
    tokens = lambda log: re.findall(r"trained tokens (\d+)", log)
    assert tokens(log_one) == tokens(log_two)
    a = mx.load(str(one / "adapters.safetensors"))
    b = mx.load(str(two / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert mx.allclose(a[k], b[k], rtol=1e-4, atol=1e-5).item(), k
