"""RePo's cost over the plain model (mlx-lm's olmo2, llama or qwen3): prefill and
decode tokens/s and peak memory.

Both models share the same base weights (random, same shapes); repo_mlx adds
the position module and the continuous rotation in the RePo layers. Each
measurement is a prefill of --prompt-tokens with a fresh KV cache, then
--gen-tokens greedy decode steps. Runs alternate (ABBA) after a warm-up;
medians are printed, and the ratio repo_mlx / mlx-lm (1.0 = no cost) is the
median of the per-run ratios.

    python bench/bench_model.py --shape 1b --runs 6
    python bench/bench_model.py --shape smollm2     # grouped-query attention, 9/3 heads
    python bench/bench_model.py --shape qwen3-0.6b  # 16/8 heads, per-head q/k norms

--layer times one RePo layer against mlx-lm's layer instead (prefill only):
many quick runs, for when whole-model timings are noisier than the effect.
"""

import sys
from pathlib import Path
import argparse
import statistics
import time

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # synthetic.py lives with the tests
import synthetic  # noqa: E402  random official-format checkpoints
from repo_mlx.speed import alternate
from repo_mlx.kernel_checks import plain_twin
from repo_mlx.rope import pe_config
from repo_mlx.loader import model_file

SHAPES = {
    "1b": synthetic.config_1b(),
    "small": synthetic.config(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
        intermediate_size=2048, vocab_size=32000, start_layer=2,
    ),
    # Grouped-query shapes; RePo from round(5/16 of the layers), pretrain's default.
    "smollm2": dict(
        model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, pe_config=pe_config(9),
    ),
    "qwen3-0.6b": dict(
        model_type="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, pe_config=pe_config(9),
    ),
}


def build(shape: str, dtype: str, layer: bool = False):
    """repo_mlx's and mlx-lm's model (or their first layer, a RePo layer), sharing base weights."""
    cfg = {"tie_word_embeddings": False, **SHAPES[shape]}
    if layer:  # a one-layer model whose layer is a RePo layer; the layer needs no real vocabulary
        cfg.update(num_hidden_layers=1, pe_config=pe_config(0), vocab_size=256)
    arch = model_file(cfg)
    repo = arch.Model(arch.ModelArgs.from_dict(cfg))
    repo.set_dtype(getattr(mx, dtype))
    mx.eval(repo.parameters())
    plain = plain_twin(repo)  # the very same arrays: no copy
    return (repo.layers[0], plain.layers[0]) if layer else (repo, plain)


def measure(model, prompt, gen_tokens):
    """Prefill tokens/s, decode tokens/s (greedy, KV cache) and peak GB."""
    mx.clear_cache()
    mx.reset_peak_memory()
    cache = make_prompt_cache(model)
    tic = time.perf_counter()
    # As mlx-lm prefills: the cache for all but the last token, logits for that one.
    model(prompt[None, :-1], cache=cache)
    mx.eval([c.state for c in cache])
    token = mx.argmax(model(prompt[None, -1:], cache=cache), axis=-1)
    mx.eval(token)
    prefill = prompt.size / (time.perf_counter() - tic)
    tic = time.perf_counter()
    for _ in range(gen_tokens):
        token = mx.argmax(model(token, cache=cache), axis=-1)
        mx.eval(token)
    decode = gen_tokens / (time.perf_counter() - tic)
    return prefill, decode, mx.get_peak_memory() / 1e9


def measure_layer(layer, x):
    """Prefill tokens/s of one layer on hidden states x."""
    tic = time.perf_counter()
    mx.eval(layer(x, "causal"))
    return (x.shape[1] / (time.perf_counter() - tic),)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small", help="Model shape (default: small).")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="Weights dtype (default: float32).")
    p.add_argument("--prompt-tokens", type=int, default=256, help="Prompt length (default: 256).")
    p.add_argument("--gen-tokens", type=int, default=32, help="Tokens to decode (default: 32).")
    p.add_argument("--runs", type=int, default=5, help="Measured runs per model, alternating (default: 5).")
    p.add_argument("--layer", action="store_true", help="Time one RePo layer against mlx-lm's layer (prefill).")
    args = p.parse_args()

    repo, plain = build(args.shape, args.dtype, args.layer)
    models = {"repo_mlx": repo, f"mlx-lm {SHAPES[args.shape].get('model_type', 'olmo2')}": plain}
    n = sum(v.size for _, v in tree_flatten(repo.parameters()))
    extra = n - sum(v.size for _, v in tree_flatten(plain.parameters()))
    print(f"shape {args.shape}{' (one RePo layer)' if args.layer else ''}, {n / 1e6:.1f}M "
          f"parameters ({100 * extra / n:.2f}% position module), {args.dtype}, device {mx.default_device()}")

    if args.layer:
        x = mx.random.normal((1, args.prompt_tokens, SHAPES[args.shape]["hidden_size"])).astype(getattr(mx, args.dtype))
        med, ratio, spread = alternate(models, lambda m: measure_layer(m, x), args.runs)
        print(f"{'':14s} {'prefill tok/s':>14s}")
        for name, (pre,) in med.items():
            print(f"{name:14s} {pre:14.2f}")
        print(f"{'ratio':14s} {ratio[0]:14.3f}")
        print(f"{'runs':14s} {spread[0][0]:6.3f}..{spread[0][1]:.3f}")
        module = statistics.median(
            1 / measure_layer(lambda h, _: repo.self_attn.positions(h), x)[0] for _ in range(args.runs)
        ) * x.shape[1]
        layer = x.shape[1] / med["repo_mlx"][0]
        print(f"position module alone: {1e3 * module:.1f} ms of the layer's {1e3 * layer:.1f} ms "
              f"({100 * module / layer:.1f}%)")
        return

    prompt = mx.random.randint(0, 1000, (args.prompt_tokens,))
    med, ratio, spread = alternate(models, lambda m: measure(m, prompt, args.gen_tokens), args.runs)
    print(f"{'':14s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'peak GB':>8s}")
    for name, (pre, dec, mem) in med.items():
        print(f"{name:14s} {pre:14.2f} {dec:13.2f} {mem:8.3f}")
    print(f"{'ratio':14s} {ratio[0]:14.3f} {ratio[1]:13.3f} {ratio[2]:8.3f}")
    print(f"{'runs':14s} {spread[0][0]:6.3f}..{spread[0][1]:.3f} {spread[1][0]:6.3f}..{spread[1][1]:.3f}")


if __name__ == "__main__":
    main()
