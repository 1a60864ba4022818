"""RePo's cost over plain OLMo-2: prefill and decode tokens/s and peak memory.

Both models share the same base weights (random, same shapes); repo_mlx adds
the position module and the continuous rotation in the RePo layers. Each
measurement is a prefill of --prompt-tokens with a fresh KV cache, then
--gen-tokens greedy decode steps. Runs alternate (ABBA) after a warm-up;
medians are printed, and the ratio repo_mlx / mlx-lm (1.0 = no cost) is the
median of the per-run ratios.

    python bench/bench_model.py --shape 1b --dtype bfloat16 --runs 6
"""

import argparse
import statistics
import time

import mlx.core as mx
from mlx_lm.models import olmo2
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from repo_mlx import synthetic
from repo_mlx.repo_olmo2 import POSITION_WEIGHTS, Model, ModelArgs

SHAPES = {
    "1b": synthetic.config_1b(),
    "small": synthetic.config(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
        intermediate_size=2048, vocab_size=32000, start_layer=2,
    ),
}


def build(shape: str, dtype: str):
    cfg = SHAPES[shape]
    repo = Model(ModelArgs.from_dict(cfg))
    repo.set_dtype(getattr(mx, dtype))
    plain = olmo2.Model(olmo2.ModelArgs.from_dict({**cfg, "tie_word_embeddings": False}))
    base = [(k, v) for k, v in tree_flatten(repo.parameters()) if k.split(".")[-2] not in POSITION_WEIGHTS]
    plain.load_weights(base)  # the very same arrays: no copy
    mx.eval(repo.parameters())
    return repo, plain


def measure(model, prompt, gen_tokens):
    """Prefill tokens/s, decode tokens/s (greedy, KV cache) and peak GB."""
    mx.clear_cache()
    mx.reset_peak_memory()
    cache = make_prompt_cache(model)
    tic = time.perf_counter()
    logits = model(prompt[None], cache=cache)
    token = mx.argmax(logits[:, -1:], axis=-1)
    mx.eval(token)
    prefill = prompt.size / (time.perf_counter() - tic)
    tic = time.perf_counter()
    for _ in range(gen_tokens):
        token = mx.argmax(model(token, cache=cache)[:, -1:], axis=-1)
        mx.eval(token)
    decode = gen_tokens / (time.perf_counter() - tic)
    return prefill, decode, mx.get_peak_memory() / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small", help="Model shape (default: small).")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="Weights dtype (default: float32).")
    p.add_argument("--prompt-tokens", type=int, default=256, help="Prompt length (default: 256).")
    p.add_argument("--gen-tokens", type=int, default=32, help="Tokens to decode (default: 32).")
    p.add_argument("--runs", type=int, default=5, help="Measured runs per model, alternating (default: 5).")
    args = p.parse_args()

    repo, plain = build(args.shape, args.dtype)
    n = sum(v.size for _, v in tree_flatten(repo.parameters()))
    extra = n - sum(v.size for _, v in tree_flatten(plain.parameters()))
    print(f"shape {args.shape}, {n / 1e6:.1f}M parameters ({100 * extra / n:.2f}% position module), "
          f"{args.dtype}, device {mx.default_device()}")
    prompt = mx.random.randint(0, 1000, (args.prompt_tokens,))
    models = {"repo_mlx": repo, "mlx-lm olmo2": plain}
    for model in models.values():  # warm up: the first runs of a process are slower
        measure(model, prompt, args.gen_tokens)
    results = {name: [] for name in models}
    for i in range(args.runs):
        # ABBA order, so drift over the run favours neither model.
        for name in list(models)[:: 1 if i % 2 == 0 else -1]:
            results[name].append(measure(models[name], prompt, args.gen_tokens))
    med = {k: [statistics.median(col) for col in zip(*v)] for k, v in results.items()}
    print(f"{'':14s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'peak GB':>8s}")
    for name, (pre, dec, mem) in med.items():
        print(f"{name:14s} {pre:14.2f} {dec:13.2f} {mem:8.3f}")
    # Ratio of each run's pair, then the median: robust to slow drift.
    pairs = [[a / b for a, b in zip(r, p)] for r, p in zip(*results.values())]
    ratio = [statistics.median(col) for col in zip(*pairs)]
    print(f"{'ratio':14s} {ratio[0]:14.3f} {ratio[1]:13.3f} {ratio[2]:8.3f}")


if __name__ == "__main__":
    main()
