"""Pre-training speed and memory: repo_mlx.pretrain vs ``mlx_lm.lora --fine-tune-type full``.

Throughput: repo_mlx.pretrain's trainer (--train-only all, the paper's AdamW,
the inserted position module) against mlx-lm's full fine-tuning of the plain
model of the same shape (OLMo-2, or with bench_model.py's smollm2 and
qwen3-0.6b shapes mlx-lm's llama and qwen3), same batch and sequence length,
each run in its own process, alternating; tokens/s over the steps after the
first window (which pays for compilation). Twice: with mlx-lm's work (no
gradient clipping, no z-loss), which isolates RePo's and the trainer's cost,
and with the paper's recipe (clip 1.0, z-loss 1e-5; the global norm needs every
gradient before any update). Memory: measured peak of each
--train-only setting with and without --grad-checkpoint, next to the
estimate --dry-run prints.

    python bench/bench_pretrain.py --shape tiny --seq-len 256 --batch-size 2 --runs 3
    python bench/bench_pretrain.py --shape smollm2 --seq-len 32 --batch-size 1 --iters 3 --report 1 --no-memory

``--spike`` instead measures what --position-warmup does to the early loss
spike: it pre-trains a small plain OLMo-2 on text whose structure needs
positions, then continues it into RePo from a cold start and with warm-up,
on the same data, and prints both loss curves' first steps.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from bench_model import SHAPES as MODEL_SHAPES

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # synthetic.py lives with the tests

SHAPES = {
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  intermediate_size=2048, vocab_size=32000, start_layer=2),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=1024, vocab_size=4096, start_layer=1),
    # Grouped-query attention, RePo layers as pretrain inserts them (from round(5n/16)).
    "smollm2": MODEL_SHAPES["smollm2"],
    "qwen3-0.6b": MODEL_SHAPES["qwen3-0.6b"],
}


def config(shape: str) -> dict:
    import synthetic  # tests/synthetic.py

    cfg = SHAPES[shape]
    return dict(cfg) if "model_type" in cfg else synthetic.config(**cfg)


def trainer_args(a, **kw):
    from repo_mlx import pretrain

    args = pretrain.parse_args(["--model", "-", "--data", "-"])
    settings = dict(batch_size=a.batch_size, seq_len=a.seq_len, dtype=a.dtype,
                    iters=a.iters, grad_checkpoint=a.grad_checkpoint)
    for k, v in {**settings, **kw}.items():
        setattr(args, k, v)
    return args


def one(a) -> dict:
    """One measurement in this process: steps/s and peak memory."""
    from repo_mlx import pretrain, pretrain_data
    from repo_mlx.loader import model_file

    cfg = config(a.shape)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg["vocab_size"], 16 * a.batch_size * a.seq_len).astype(np.uint32)
    arch = model_file(cfg)
    repo = arch.Model(arch.ModelArgs.from_dict(cfg))
    dtype = getattr(mx, a.dtype)
    times = []
    if a.one == "mlx-lm":
        from mlx_lm.tuner.trainer import TrainingArgs, train

        from repo_mlx.kernel_checks import plain_twin

        plain = plain_twin(repo)
        plain.set_dtype(dtype)
        del repo
        plain.unfreeze()
        data = [(tokens[i * a.seq_len : (i + 1) * a.seq_len + 1].tolist(), 0) for i in range(15 * a.batch_size)]
        targs = TrainingArgs(batch_size=a.batch_size, iters=a.iters, steps_per_report=a.report,
                             steps_per_eval=a.iters + 1, steps_per_save=a.iters + 1,
                             max_seq_length=a.seq_len + 1, adapter_file=str(Path(a.tmp) / "a.safetensors"),
                             grad_checkpoint=a.grad_checkpoint)

        class Recorder:
            def on_train_loss_report(self, info):
                # mlx-lm divides --report steps by the window's time, also for a
                # shorter last window: keep each window's time and true step count.
                done = info["iteration"] - sum(n for n, _ in times)
                times.append((done, a.report / info["iterations_per_second"]))

            def on_val_loss_report(self, info):
                pass

        opt = optim.AdamW(learning_rate=1e-5, betas=[0.9, 0.95], weight_decay=0.1)
        mx.eval(plain.parameters())
        mx.reset_peak_memory()
        train(plain, opt, data, None, targs, training_callback=Recorder())
        steps_per_s = sum(n for n, _ in times[1:]) / sum(t for _, t in times[1:])
        estimate = None
    else:
        # The pretrain command's model and trainer, minus loading from disk.
        init = pretrain.init_position_weights(repo, 0)
        repo.load_weights(list(init.items()), strict=False)
        args = trainer_args(a, train_only=a.train_only, learning_rate=1e-5)
        if a.one == "repo-as-mlx-lm":
            args.grad_clip, args.z_loss = None, 0.0
        master = None
        if a.dtype != "float32":
            master = {k: v.astype(mx.float32) for k, v in tree_flatten(repo.parameters())}
        repo.set_dtype(dtype)
        mx.eval(repo.parameters(), master)
        pretrain.setup_trainable(repo, a.train_only, args.lora_parameters)
        trainer = pretrain.make_trainer(repo, args, master)
        del master
        source = pretrain.batches(pretrain_data.Packed(tokens, a.seq_len), args)
        mx.reset_peak_memory()
        for step in range(a.iters):
            tic = time.perf_counter()
            trainer.train_step(lambda: next(source))
            times.append(time.perf_counter() - tic)
        steps_per_s = 1 / statistics.mean(times[a.report :])
        est = pretrain.estimate_memory(repo, types.SimpleNamespace(
            dtype=a.dtype, batch_size=a.batch_size, seq_len=a.seq_len,
            grad_checkpoint=a.grad_checkpoint, grad_accumulation_steps=1))
        estimate = est["total"] / 1e9
    return {"tokens_per_second": steps_per_s * a.batch_size * a.seq_len,
            "peak_gb": mx.get_peak_memory() / 1e9, "estimate_gb": estimate}


def measure(a, who: str, train_only="all", checkpoint=False) -> dict:
    cmd = [sys.executable, __file__, "--one", who, "--train-only", train_only, "--shape", a.shape,
           "--dtype", a.dtype, "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size),
           "--iters", str(a.iters), "--report", str(a.report), "--tmp", a.tmp]
    if checkpoint:
        cmd.append("--grad-checkpoint")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def throughput(a) -> None:
    print(f"shape {a.shape}, {a.dtype}, batch {a.batch_size} x {a.seq_len} tokens, "
          f"{a.iters} steps ({a.report} dropped), {a.runs} alternating runs, device {mx.default_device()}")
    res = {"mlx-lm": [], "repo-as-mlx-lm": [], "repo": []}
    for i in range(a.runs):
        for who in list(res)[:: 1 if i % 2 == 0 else -1]:
            res[who].append(measure(a, who))
    for who in res:
        tps = statistics.median(r["tokens_per_second"] for r in res[who])
        peak = statistics.median(r["peak_gb"] for r in res[who])
        print(f"{who:<15} tokens/s {tps:10.1f}  peak {peak:.4f} GB")
    for who, what in (("repo-as-mlx-lm", "same work (no clip, no z-loss)"), ("repo", "paper's recipe")):
        ratios = [r["tokens_per_second"] / b["tokens_per_second"] for r, b in zip(res[who], res["mlx-lm"])]
        print(f"tokens/s ratio {who}/mlx-lm, {what}: median {statistics.median(ratios):.3f} "
              f"(runs: {', '.join(f'{x:.3f}' for x in ratios)})")
    if a.no_memory:
        return
    print("\nmemory of repo_mlx.pretrain settings (measured peak vs --dry-run estimate):")
    for train_only in ("all", "position+lora", "position"):
        for ckpt in (False, True):
            r = measure(a, "repo", train_only, ckpt)
            print(f"  --train-only {train_only:<14}{' --grad-checkpoint' if ckpt else '':<19}"
                  f"peak {r['peak_gb']:.4f} GB, estimate {r['estimate_gb']:.4f} GB, "
                  f"tokens/s {r['tokens_per_second']:.0f}")


# --- the early loss spike ------------------------------------------------------------


def spike_text(n: int, seed: int = 0) -> list:
    """Documents a model can only predict with positions: lists recalled in order."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnop"))
    docs = []
    for _ in range(n):
        items = " ".join("".join(rng.choice(letters, 3)) for _ in range(5))
        docs.append(f"list: {items}. again: {items}.")
    return docs


def spike(a) -> None:
    from repo_mlx import pretrain, pretrain_data
    import synthetic  # tests/synthetic.py
    import repo_mlx

    root = Path(a.tmp)
    cfg = synthetic.config(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=256, vocab_size=320, repo=False)
    base = synthetic.write_checkpoint(root / "plain", cfg, seed=0)
    data = root / "spike.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in spike_text(3000)))
    # 1. Pre-train the plain OLMo-2 until it copies the lists (uses positions).
    model, tok = repo_mlx.load(str(base))
    args = trainer_args(a, dtype="float32", iters=a.base_steps, learning_rate=3e-3, seq_len=128,
                        batch_size=16, grad_checkpoint=False, weight_decay=0.0)
    tokens = pretrain_data.token_cache(pretrain_data.Source(str(data)), tok, root / "cache", "train", lambda *x: None)
    train_set, _ = pretrain_data.split(tokens, 128, 0.0)
    model.unfreeze()
    trainer = pretrain.make_trainer(model, args)
    source = pretrain.batches(train_set, args)
    for step in range(a.base_steps):
        (ce, _), _ = trainer.train_step(lambda: next(source))
        if (step + 1) % 100 == 0:
            print(f"plain pre-training step {step + 1}: loss {ce.item():.3f}", flush=True)
    trained = root / "trained"
    from repo_mlx.loader import save_standalone
    save_standalone(trained, base, model, tok, json.loads((base / "config.json").read_text()), donate_model=False)
    # 2. Continue into RePo on fresh data from the same source: cold start vs warm-up.
    fresh = root / "fresh.jsonl"
    fresh.write_text("".join(json.dumps({"text": t}) + "\n" for t in spike_text(2000, seed=1)))
    # Control: the plain model itself, continued on the same data with the same optimizer,
    # shows the part of any early rise that comes from AdamW's first steps, not positions.
    model, _ = repo_mlx.load(str(trained))
    model.unfreeze()
    args = trainer_args(a, dtype="float32", iters=a.spike_steps, learning_rate=a.spike_lr, seq_len=128,
                        batch_size=16, grad_checkpoint=False)
    fresh_tokens = pretrain_data.token_cache(pretrain_data.Source(str(fresh)), tok, root / "cache", "fresh", lambda *x: None)
    fresh_train, _ = pretrain_data.split(fresh_tokens, 128, 0.02)
    trainer = pretrain.make_trainer(model, args)
    source = pretrain.batches(fresh_train, args)
    curves = {"plain": [trainer.train_step(lambda: next(source))[0][0].item() for _ in range(a.spike_steps)]}
    for k in (0, *a.warmups):
        out = root / f"repo-w{k}"
        argv = ["--model", str(trained), "--data", str(fresh), "--save-path", str(out), "--force",
                "--repo-start-layer", "1", "--dtype", "float32", "--seq-len", "128", "--batch-size", "16",
                "--iters", str(a.spike_steps), "--learning-rate", str(a.spike_lr), "--steps-per-report", "1",
                "--steps-per-eval", str(a.spike_steps), "--save-every", str(a.spike_steps),
                "--position-warmup", str(k), "--val-share", "0.02"]
        pretrain.run(pretrain.parse_args(argv))
        recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        curves[f"warmup {k}"] = [r["loss"] for r in recs if "loss" in r]
    print(f"\nloss of the first {a.spike_steps} steps (batch 16 x 128 tokens, lr {a.spike_lr:g}):")
    print("step " + " ".join(f"{k:>11}" for k in curves))
    for s in list(range(0, min(10, a.spike_steps))) + list(range(10, a.spike_steps, 10)):
        print(f"{s + 1:4} " + " ".join(f"{curves[k][s]:11.3f}" for k in curves))
    for k, c in curves.items():
        print(f"{k:>10}: first-step loss {c[0]:.3f}, peak loss {max(c):.3f} (step {int(np.argmax(c)) + 1}), "
              f"mean of steps 1-20 {np.mean(c[:20]):.3f}, last {c[-1]:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="Model shape (default: tiny).")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="Compute dtype (default: float32).")
    p.add_argument("--seq-len", type=int, default=256, help="Tokens per sequence (default: 256).")
    p.add_argument("--batch-size", type=int, default=2, help="Sequences per step (default: 2).")
    p.add_argument("--iters", type=int, default=12, help="Steps per run (default: 12).")
    p.add_argument("--report", type=int, default=4, help="Steps per window; the first window is dropped (default: 4).")
    p.add_argument("--runs", type=int, default=3, help="Alternating runs per trainer (default: 3).")
    p.add_argument("--no-memory", action="store_true", help="Skip the memory table of the --train-only settings.")
    p.add_argument("--grad-checkpoint", action="store_true", help="With --one: checkpoint layers.")
    p.add_argument("--train-only", default="all", help="With --one: repo_mlx.pretrain's --train-only.")
    p.add_argument("--one", choices=["repo", "repo-as-mlx-lm", "mlx-lm"], help="Internal: run one measurement and print JSON.")
    p.add_argument("--tmp", help="Internal: scratch folder.")
    p.add_argument("--spike", action="store_true", help="Measure the early loss spike, cold start vs --position-warmup.")
    p.add_argument("--base-steps", type=int, default=400, help="With --spike: plain pre-training steps (default: 400).")
    p.add_argument("--spike-steps", type=int, default=60, help="With --spike: RePo steps per run (default: 60).")
    p.add_argument("--spike-lr", type=float, default=1e-4, help="With --spike: learning rate of the continued runs (default: 1e-4).")
    p.add_argument("--warmups", type=int, nargs="+", default=[20], help="With --spike: --position-warmup values against 0 (default: 20).")
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        a.tmp = tmp
        spike(a) if a.spike else throughput(a)


if __name__ == "__main__":
    main()
