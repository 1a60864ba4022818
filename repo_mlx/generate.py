"""Generate text with a RePo model: ``python -m repo_mlx.generate --prompt ...``.

``generate`` and ``stream_generate`` are mlx-lm's, warning first when the
prompt is longer than the model's context.
"""

import argparse
import warnings
from typing import List, Union

import mlx.core as mx
from mlx_lm.generate import generate as _mlx_lm_generate
from mlx_lm.generate import stream_generate as _mlx_lm_stream_generate
from mlx_lm.sample_utils import make_sampler

from . import _cli, cache_prompt
from .errors import LoadError
from .utils import add_model_flags, check_tokens_fit, context_length, load_from_args, warn_if_too_long

DEFAULT_PROMPT = "The key idea of positional encoding in transformers is"
KV_BITS = [2, 3, 4, 6, 8]
KV_GROUP_SIZES = [32, 64, 128]  # what mx.quantize supports
MIN_KV_SIZE = 8  # mlx-lm's rotating cache always keeps the first 4 tokens


def _encode(model, tokenizer, prompt: Union[str, List[int], mx.array]):
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt)
    warn_if_too_long(model, prompt.size if isinstance(prompt, mx.array) else len(prompt))
    return prompt


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """mlx-lm's ``generate`` (same keywords), warning on prompts past the context."""
    return _mlx_lm_generate(model, tokenizer, _encode(model, tokenizer, prompt), verbose, **kwargs)


def stream_generate(model, tokenizer, prompt, **kwargs):
    """mlx-lm's ``stream_generate`` (same keywords), warning on prompts past the context."""
    yield from _mlx_lm_stream_generate(model, tokenizer, _encode(model, tokenizer, prompt), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="python -m repo_mlx.generate",
        description="Generate text with a RePo model (OLMo-2, Llama or Qwen3), streaming it to stdout.",
    )
    add_model_flags(p, yarn=True)
    _cli.add_prompt_flags(p, default=DEFAULT_PROMPT)
    p.add_argument("--max-tokens", "-m", type=_cli.token_count, default=100, help="Tokens to generate (default: 100).")
    add_sampling_flags(p)
    p.add_argument("--kv-bits", type=int, choices=KV_BITS, default=None, help="Quantize the KV cache to this many bits (default: off); needs a head_dim divisible by 32.")
    p.add_argument("--kv-group-size", type=int, choices=KV_GROUP_SIZES, default=64, help="Group size for --kv-bits; must divide head_dim (default: 64).")
    p.add_argument("--max-kv-size", type=_cli.int_range(MIN_KV_SIZE), default=None, help=f"Keep at most this many tokens (at least {MIN_KV_SIZE}) in a rotating KV cache (default: unbounded).")
    p.add_argument(
        "--position-blend",
        type=_cli.probability,
        default=0.0,
        help="Blend learned positions with token indices: 0 = RePo as trained, "
        "1 = plain RoPE in every layer (the paper's ablation), default 0.",
    )
    p.add_argument(
        "--prompt-cache-file",
        type=_cli.existing_file,
        default=None,
        help="A document's KV cache made by repo_mlx.cache_prompt: the prompt continues after "
        "the document. Needs the model, --dtype, --yarn, --position-blend and --adapter-path that made it.",
    )
    _cli.add_trust_remote_code(p)
    p.add_argument("--verbose", type=int, choices=[0, 1], default=1, help="1 prints separators and speed (default); 0 prints the text only.")
    return p


def add_sampling_flags(p) -> None:
    """The sampling flags of mlx_lm.generate (shared with repo_mlx.chat)."""
    p.add_argument("--temp", type=_cli.non_negative_float, default=0.0, help="Sampling temperature; 0 is greedy (default: 0).")
    p.add_argument("--top-p", type=_cli.probability, default=1.0, help="Nucleus sampling: keep tokens up to this probability mass, 0 to 1 (default: 1, off).")
    p.add_argument("--top-k", type=_cli.non_negative_int, default=0, help="Sample from the k most likely tokens only (default: 0, off).")
    p.add_argument("--min-p", type=_cli.probability, default=0.0, help="Drop tokens below this fraction of the top probability, 0 to 1 (default: 0, off).")
    p.add_argument("--seed", type=_cli.seed, default=None, help=f"Random seed for sampling, 0 to {2**32 - 1} (default: random).")


def sampler(args):
    return make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k)


def check_kv_bits(model, kv_bits, kv_group_size) -> None:
    """Before any work: the KV cache can only be quantized in groups dividing head_dim."""
    head_dim = model.layers[0].self_attn.head_dim
    if kv_bits is not None and head_dim % kv_group_size:
        fits = [g for g in KV_GROUP_SIZES if head_dim % g == 0]
        fix = (
            f"pick --kv-group-size {' or '.join(map(str, fits))}"
            if fits
            else f"no group size ({', '.join(map(str, KV_GROUP_SIZES))}) divides it, so drop --kv-bits"
        )
        raise LoadError(
            f"--kv-group-size {kv_group_size} does not divide this model's head_dim {head_dim}; {fix}."
        )


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.prompt_cache_file is not None and args.max_kv_size is not None:
        raise LoadError("--max-kv-size cannot be used with --prompt-cache-file: the cached document is in a plain KV cache.")
    prompt = _cli.read_prompt(args, DEFAULT_PROMPT)
    if not prompt:
        raise LoadError("The prompt is empty; give text with --prompt, --prompt-file or on stdin (--prompt -).")
    model, tokenizer = load_from_args(args, position_blend=args.position_blend)
    check_kv_bits(model, args.kv_bits, args.kv_group_size)
    cache = None
    if args.prompt_cache_file is not None:
        cache, _ = cache_prompt.load_for(args.prompt_cache_file, model)
    # After a cached document the prompt is a continuation: no BOS in the middle.
    prompt = tokenizer.encode(prompt, add_special_tokens=cache is None)
    if not prompt:
        raise LoadError("The prompt encodes to no tokens; give some text.")
    check_tokens_fit(model, len(prompt) + args.max_tokens, "--max-tokens")
    limit = context_length(model)
    if limit and len(prompt) <= limit < len(prompt) + args.max_tokens:
        warnings.warn(
            f"--max-tokens {args.max_tokens} after a prompt of {len(prompt)} tokens runs past the "
            f"model's context of {limit}; text past it may degrade (see --yarn)."
        )
    if args.seed is not None:  # after loading: building the model draws random numbers
        mx.random.seed(args.seed)
    text = generate(
        model,
        tokenizer,
        prompt,
        verbose=bool(args.verbose),
        max_tokens=args.max_tokens,
        sampler=sampler(args),
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        max_kv_size=args.max_kv_size,
        prompt_cache=cache,
    )
    if not args.verbose:
        print(text)


if __name__ == "__main__":
    _cli.run(main)
