"""Preference tuning cost: step time and peak memory of DPO and ORPO against SFT.

One random RePo checkpoint, the same tokens for every mode: SFT trains on
2 x --batch-size sequences (each pair's chosen and rejected, loss on the
response), DPO and ORPO on --batch-size pairs of the same sequences. Every mode
runs repo_mlx's own path (repo_mlx.load, setup_trainable, the shared Trainer,
for DPO preference.reference_model: the base with adapters off for LoRA, a
frozen copy for full fine-tuning). Peak memory: each mode alone, over loading
the reference and --warmup steps. Step time: the median of --steps steps after
--warmup (compilation), the modes' steps interleaved so that other work on the
machine slows each mode alike. Prints the ratios mode / SFT.

    python bench/bench_preference.py --shape small --seq-len 256 --batch-size 2
"""

import sys
import argparse
import contextlib
import gc
import io
import statistics
import tempfile
import time
import types
from pathlib import Path

import mlx.core as mx
import numpy as np

import repo_mlx
from repo_mlx import finetune, preference
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # synthetic.py lives with the tests
import synthetic  # noqa: E402  random official-format checkpoints
from repo_mlx.adapters import setup_trainable
from repo_mlx.trainer import Trainer

import bench_lora  # noqa: E402  beside this script (its shapes)

SHAPES = {k: v for k, v in bench_lora.SHAPES.items() if k != "1b"}  # the LoRA bench's, same models


def build(mode: str, path: Path, pairs, args):
    """(trainer, next batch) for ``mode`` on a freshly loaded model."""
    model, tokenizer = repo_mlx.load(str(path))
    setup_trainable(model, args.fine_tune_type, -1, {"rank": args.rank, "dropout": 0.0, "scale": 20.0}, "frozen")
    ns = types.SimpleNamespace(
        model=str(path), train_mode=mode, beta=0.1, dpo_loss_type="sigmoid", reference_model_path=None,
        batch_size=args.batch_size, max_seq_length=args.seq_len + 1, seed=0, optimizer="adam",
        lr_schedule=None, learning_rate=1e-5, optimizer_config=None,
    )
    world = mx.distributed.init()
    if mode == "sft":
        loss = finetune.token_weighted_loss
        ns.batch_size *= 2
        batches = finetune.train_batches([seq for pair in pairs for seq in pair], ns, world)
    else:
        with contextlib.redirect_stdout(io.StringIO()):  # which reference it chose
            reference = preference.reference_model(ns, model, tokenizer)
        loss = preference.make_loss(mode, 0.1, "sigmoid", reference)
        batches = preference.train_batches(pairs, ns, world)
    return Trainer(model, finetune.build_optimizer(ns), loss), lambda: next(batches)


def peak_memory(mode: str, path: Path, pairs, args) -> float:
    """GB at the peak of loading, the reference and --warmup steps, this mode alone."""
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    trainer, batch = build(mode, path, pairs, args)
    for _ in range(args.warmup):
        trainer.train_step(batch)
    peak = mx.get_peak_memory() / 1e9
    del trainer, batch
    return peak


def step_times(modes, path: Path, pairs, args) -> dict:
    """Seconds per step, the modes' steps interleaved so that a load on the
    machine that comes and goes falls on each mode alike."""
    runs = {m: build(m, path, pairs, args) for m in modes}
    for trainer, batch in runs.values():
        for _ in range(args.warmup):
            trainer.train_step(batch)
    times = {m: [] for m in modes}
    for i in range(args.steps):
        for m in modes[i % len(modes):] + modes[: i % len(modes)]:
            trainer, batch = runs[m]
            tic = time.perf_counter()
            trainer.train_step(batch)
            times[m].append(time.perf_counter() - tic)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small", help="Model shape (default: small).")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="Weights dtype (default: float32).")
    p.add_argument("--fine-tune-type", choices=["lora", "full"], default="lora", help="lora (DPO reference: adapters off) or full (a frozen copy) (default: lora).")
    p.add_argument("--seq-len", type=int, default=256, help="Tokens per sequence; the response is its second half (default: 256).")
    p.add_argument("--batch-size", type=int, default=2, help="Pairs per step; SFT gets twice as many sequences (default: 2).")
    p.add_argument("--warmup", type=int, default=2, help="Steps before timing (default: 2).")
    p.add_argument("--steps", type=int, default=9, help="Timed steps per mode, interleaved; the median is reported (default: 9).")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8).")
    p.add_argument("--modes", default="sft,dpo,orpo", help="Comma-separated, sft first (default: sft,dpo,orpo).")
    args = p.parse_args()
    modes = args.modes.split(",")
    if modes[0] != "sft" or not set(modes) <= {"sft", "dpo", "orpo"}:
        p.error("--modes: sft first, then dpo and/or orpo.")

    cfg = SHAPES[args.shape]
    rng = np.random.default_rng(0)
    offset = args.seq_len // 2
    pairs = [tuple((rng.integers(0, cfg["vocab_size"] - 2, args.seq_len + 1).tolist(), offset) for _ in range(2))
             for _ in range(8 * args.batch_size)]
    print(f"shape {args.shape}, {args.dtype}, {args.fine_tune_type}, {args.batch_size} pairs "
          f"(SFT: {2 * args.batch_size} sequences) x {args.seq_len} tokens, device {mx.default_device()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic.write_checkpoint(Path(tmp) / "model", cfg, dtype=args.dtype, position_scale=0.05)
        peaks = {m: peak_memory(m, path, pairs, args) for m in modes}
        times = step_times(modes, path, pairs, args)
    t0, mem0 = statistics.median(times["sft"]), peaks["sft"]
    print(f"{'':6}{'step s':>10}{'peak GB':>10}{'time / SFT':>12}{'memory / SFT':>14}")
    for m in modes:
        t = statistics.median(times[m])
        print(f"{m:6}{t:>10.3f}{peaks[m]:>10.3f}{t / t0:>12.3f}{peaks[m] / mem0:>14.3f}")


if __name__ == "__main__":
    main()
