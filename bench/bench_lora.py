"""LoRA training speed: repo_mlx.lora on RePo vs mlx-lm's LoRA on plain OLMo-2.

Both models share the same base weights (random, same shapes; RePo adds the
position module). Same data, batch, sequence length, LoRA rank, layers and
optimizer; repo_mlx trains with its loop (trainer.py via finetune.train), mlx-lm with
mlx_lm.tuner.trainer.train. tokens/s is over the iterations after the first
report (which pays for compilation). One run each by default; --runs N
alternates them and reports medians. Prints the ratio repo / mlx-lm.

    python bench/bench_lora.py --shape small --seq-len 512 --iters 30
"""

import sys
import argparse
import contextlib
import io
import statistics
import tempfile
import types
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import TrainingArgs
from mlx_lm.tuner.trainer import train as mlx_lm_train
from mlx_lm.tuner.utils import linear_to_lora_layers

from repo_mlx import finetune
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # synthetic.py lives with the tests
import synthetic  # noqa: E402  random official-format checkpoints
from repo_mlx.adapters import POSITION_MODULE_CHOICES, setup_trainable
from repo_mlx.kernel_checks import plain_twin
from repo_mlx.repo_olmo2 import Model, ModelArgs

SHAPES = {
    "1b": synthetic.config_1b(),
    "small": synthetic.config(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
        intermediate_size=2048, vocab_size=32000, start_layer=2,
    ),
    "tiny": synthetic.config(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024, vocab_size=4096, start_layer=1,
    ),
}


class Recorder(TrainingCallback):
    def __init__(self):
        self.reports = []

    def on_train_loss_report(self, info):
        self.reports.append(info)


def build(shape: str, dtype: str):
    cfg = SHAPES[shape]
    repo = Model(ModelArgs.from_dict(cfg))
    repo.set_dtype(getattr(mx, dtype))
    plain = plain_twin(repo)
    mx.eval(repo.parameters(), plain.parameters())
    return repo, plain


def summarize(recorder: Recorder, peak: float):
    measured = recorder.reports[1:]  # the first window includes compilation
    tokens = sum(r["tokens_per_second"] / r["iterations_per_second"] for r in measured)
    seconds = sum(1 / r["iterations_per_second"] for r in measured)
    return tokens / seconds, peak


def run_repo(model, data, args, tmp: Path):
    setup_trainable(model, "lora", args.num_layers, args.lora, args.position_module)
    ns = types.SimpleNamespace(
        batch_size=args.batch_size, iters=args.iters, val_batches=0, steps_per_report=args.report,
        steps_per_eval=args.iters + 1, save_every=args.iters, max_seq_length=args.seq_len + 1,
        grad_checkpoint=False, grad_accumulation_steps=1, clear_cache_threshold=0, seed=0,
        optimizer="adam", lr_schedule=None, learning_rate=1e-5, optimizer_config=None,
    )
    recorder = Recorder()
    mx.reset_peak_memory()
    finetune.train(finetune.make_trainer(model, ns), data, [], ns, tmp / "repo.safetensors", callback=recorder)
    return summarize(recorder, mx.get_peak_memory() / 1e9)


def run_mlx_lm(model, data, args, tmp: Path):
    model.freeze()
    linear_to_lora_layers(model, args.num_layers, args.lora)
    targs = TrainingArgs(
        batch_size=args.batch_size, iters=args.iters, steps_per_report=args.report,
        steps_per_eval=args.iters + 1, steps_per_save=args.iters, max_seq_length=args.seq_len + 1,
        adapter_file=str(tmp / "mlx_lm.safetensors"),
    )
    recorder = Recorder()
    mx.reset_peak_memory()
    mlx_lm_train(model, optim.Adam(learning_rate=1e-5), data, None, targs, training_callback=recorder)
    return summarize(recorder, mx.get_peak_memory() / 1e9)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small", help="Model shape (default: small).")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="Weights dtype (default: float32).")
    p.add_argument("--seq-len", type=int, default=512, help="Tokens per example (default: 512).")
    p.add_argument("--batch-size", type=int, default=4, help="Examples per step (default: 4).")
    p.add_argument("--iters", type=int, default=30, help="Training iterations per run (default: 30).")
    p.add_argument("--report", type=int, default=5, help="Iterations per tokens/s window; the first is dropped (default: 5).")
    p.add_argument("--num-layers", type=int, default=-1, help="LoRA on the last N layers, -1 all (default: -1).")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8).")
    p.add_argument("--position-module", choices=POSITION_MODULE_CHOICES, default="frozen", help="RePo's --position-module (default: frozen).")
    p.add_argument("--runs", type=int, default=1, help="Runs per trainer, alternating; medians are reported (default: 1).")
    args = p.parse_args()
    if args.iters < 2 * args.report:
        p.error("--iters must cover at least two --report windows.")
    args.lora = {"rank": args.rank, "dropout": 0.0, "scale": 20.0}

    cfg = SHAPES[args.shape]
    rng = np.random.default_rng(0)
    data = [(rng.integers(0, cfg["vocab_size"], args.seq_len + 1).tolist(), 0) for _ in range(8 * args.batch_size)]
    print(f"shape {args.shape}, {args.dtype}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"LoRA rank {args.rank}, position module {args.position_module}, device {mx.default_device()}")
    results = {"mlx-lm": [], "repo": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for name in ("mlx-lm", "repo")[:: 1 if i % 2 == 0 else -1]:
                repo, plain = build(args.shape, args.dtype)
                mx.clear_cache()
                run = run_repo if name == "repo" else run_mlx_lm
                with contextlib.redirect_stdout(io.StringIO()):  # both trainers' progress
                    results[name].append(run(repo if name == "repo" else plain, data, args, Path(tmp)))
                del repo, plain
    (base_tps, base_peak), (repo_tps, repo_peak) = (
        [statistics.median(col) for col in zip(*results[k])] for k in ("mlx-lm", "repo")
    )
    print(f"{'':14}{'tokens/s':>10}{'peak GB':>10}")
    print(f"{'mlx-lm olmo2':14}{base_tps:>10.1f}{base_peak:>10.3f}")
    print(f"{'repo_mlx':14}{repo_tps:>10.1f}{repo_peak:>10.3f}")
    print(f"ratio repo/mlx-lm: tokens/s {repo_tps / base_tps:.3f}, peak memory {repo_peak / base_peak:.3f}")


if __name__ == "__main__":
    main()
