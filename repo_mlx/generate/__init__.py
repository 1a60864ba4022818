"""Generate text with a RePo model: ``python -m repo_mlx.generate --prompt ...``."""

import argparse
import warnings

import mlx.core as mx

from .. import _cli, prompt_cache
from ..errors import LoadError
from ..generation import (KV_BITS, KV_GROUP_SIZES, MIN_KV_SIZE, add_sampling_flags, check_kv_bits,
                         generate, sampler)
from ..limits import check_tokens_fit, context_length

DEFAULT_PROMPT = "The key idea of positional encoding in transformers is"


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="python -m repo_mlx.generate",
        description="Generate text with a RePo model (OLMo-2, Llama or Qwen3), streaming it to stdout.",
    )
    _cli.add_model_flags(p, yarn=True)
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


def command(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.prompt_cache_file is not None and args.max_kv_size is not None:
        raise LoadError("--max-kv-size cannot be used with --prompt-cache-file: the cached document is in a plain KV cache.")
    prompt = _cli.read_prompt(args, DEFAULT_PROMPT)
    if not prompt:
        raise LoadError("The prompt is empty; give text with --prompt, --prompt-file or on stdin (--prompt -).")
    model, tokenizer = _cli.load_from_args(args, position_blend=args.position_blend)
    check_kv_bits(model, args.kv_bits, args.kv_group_size)
    cache = None
    if args.prompt_cache_file is not None:
        cache, _ = prompt_cache.load_for(args.prompt_cache_file, model)
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


def main(argv=None) -> None:
    """The command line: bad input is one ``error:`` line and exit status 2."""
    _cli.run(command, argv)

