"""RePo's cost over plain OLMo-2: prefill and decode tokens/s and peak memory.

Both models share the same base weights (random, same shapes); repo_mlx adds
the position module and the continuous rotation in the RePo layers. Runs
alternate and the median of each is reported, as a ratio repo_mlx / mlx-lm.

    python bench/bench_model.py --shape 1b --prompt-tokens 256 --gen-tokens 32
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models import olmo2
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import load as load_tokenizer

from repo_mlx import synthetic
from repo_mlx.repo_olmo2 import POSITION_WEIGHTS, Model, ModelArgs

SHAPES = {
    "1b": synthetic.config_1b(),
    "small": synthetic.config(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
        intermediate_size=2048, vocab_size=32000, start_layer=2,
    ),
}


def tokenizer(vocab_size: int):
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.write_tokenizer(Path(tmp), vocab_size)
        # No eos: every run decodes exactly --gen-tokens tokens.
        return load_tokenizer(Path(tmp), eos_token_ids=[])


def build(shape: str, dtype: str):
    cfg = SHAPES[shape]
    repo = Model(ModelArgs.from_dict(cfg))
    repo.set_dtype(getattr(mx, dtype))
    plain = olmo2.Model(olmo2.ModelArgs.from_dict({**cfg, "tie_word_embeddings": False}))
    base = [(k, v) for k, v in tree_flatten(repo.parameters()) if k.split(".")[-2] not in POSITION_WEIGHTS]
    plain.load_weights(base)  # the very same arrays: no copy
    mx.eval(repo.parameters())
    return repo, plain


def measure(model, tok, prompt, gen_tokens):
    mx.clear_cache()
    mx.reset_peak_memory()
    for r in stream_generate(model, tok, prompt, max_tokens=gen_tokens):
        pass
    return r.prompt_tps, r.generation_tps, r.peak_memory


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
    tok = tokenizer(SHAPES[args.shape]["vocab_size"])
    prompt = mx.random.randint(0, 1000, (args.prompt_tokens,)).tolist()
    results = {"repo_mlx": [], "mlx-lm olmo2": []}
    measure(repo, tok, prompt, 4), measure(plain, tok, prompt, 4)  # warm up
    for i in range(args.runs):
        for name, model in ([("repo_mlx", repo), ("mlx-lm olmo2", plain)][:: 1 if i % 2 == 0 else -1]):
            results[name].append(measure(model, tok, prompt, args.gen_tokens))
    med = {k: [statistics.median(col) for col in zip(*v)] for k, v in results.items()}
    print(f"{'':14s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'peak GB':>8s}")
    for name, (pre, dec, mem) in med.items():
        print(f"{name:14s} {pre:14.1f} {dec:13.2f} {mem:8.3f}")
    r, b = med["repo_mlx"], med["mlx-lm olmo2"]
    print(f"{'ratio':14s} {r[0] / b[0]:14.3f} {r[1] / b[1]:13.3f} {r[2] / b[2]:8.3f}")


if __name__ == "__main__":
    main()
