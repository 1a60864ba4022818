"""Timing a model the way mlx-lm's benchmark does, for benchmark and doctor:
prompt and generation tokens/s and peak memory, alternating models in ABBA order."""

import statistics
import sys
import time
from types import SimpleNamespace

import mlx.core as mx
from mlx_lm.generate import batch_generate, generate_step

clock = time.perf_counter  # the tests swap in a fake clock
# batch_generate decodes its output; random token ids have no text worth decoding.
NO_TEXT = SimpleNamespace(eos_token_ids=[], decode=lambda ids: "")


def run_single(model, prompt, args):
    """Prompt tok/s (to the first token), generation tok/s (after it) and peak GB."""
    mx.clear_cache()
    mx.reset_peak_memory()
    kv = {"kv_bits": args.kv_bits, "kv_group_size": args.kv_group_size, "quantized_kv_start": 0}
    tic = clock()
    steps = generate_step(prompt[0], model, max_tokens=args.generation_tokens, prefill_step_size=args.prefill_step_size, **kv)
    for n, _ in enumerate(steps):  # each step hands back a Python int: timed work is done
        if n == 0:
            prompt_time = clock() - tic
            tic = clock()
    generation_time = clock() - tic
    return (
        prompt[0].size / prompt_time,
        (args.generation_tokens - 1) / generation_time,
        mx.get_peak_memory() / 1e9,
    )


def run_batch(model, prompt, args):
    mx.clear_cache()
    mx.reset_peak_memory()
    stats = batch_generate(
        model, NO_TEXT, prompt.tolist(), max_tokens=args.generation_tokens,
        prefill_step_size=args.prefill_step_size,
        prefill_batch_size=args.batch_size, completion_batch_size=args.batch_size,
    ).stats
    return stats.prompt_tps, stats.generation_tps, stats.peak_memory


def alternate(models: dict, run, trials: int):
    """A warm-up each, then ABBA trials: medians per model, the median per-trial ratios
    of the first model to the second, and their spread (lowest, highest) per column."""
    for name, model in models.items():
        print(f"warm-up: {name}", file=sys.stderr, flush=True)
        run(model)
    results = {name: [] for name in models}
    for i in range(trials):
        for name in list(models)[:: 1 if i % 2 == 0 else -1]:
            results[name].append(run(models[name]))
        print(f"trial {i + 1}/{trials} done", file=sys.stderr, flush=True)
    medians = {k: [statistics.median(col) for col in zip(*v)] for k, v in results.items()}
    first, second = list(results.values())[:2]
    ratios = [[a / b for a, b in zip(r, p)] for r, p in zip(first, second)]
    columns = list(zip(*ratios))
    return medians, [statistics.median(c) for c in columns], [(min(c), max(c)) for c in columns]
