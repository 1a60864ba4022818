"""Generate text with a RePo model: ``python -m repo_mlx.generate --prompt ...``.

``generate`` and ``stream_generate`` are mlx-lm's, warning first when the
prompt is longer than the model's context.
"""

import argparse
import sys
from pathlib import Path
from typing import List, Union

import mlx.core as mx
from mlx_lm.generate import generate as _mlx_lm_generate
from mlx_lm.generate import stream_generate as _mlx_lm_stream_generate
from mlx_lm.sample_utils import make_sampler

from . import _cli
from .errors import LoadError
from .utils import DEFAULT_MODEL, DTYPES, load, warn_if_too_long

DEFAULT_PROMPT = "The key idea of positional encoding in transformers is"


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
    p = argparse.ArgumentParser(
        prog="python -m repo_mlx.generate",
        description="Generate text with a RePo-OLMo2 model, streaming it to stdout.",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="Model folder (official Hugging Face or converted) or Hub id, "
        f"downloaded on first use (default: {DEFAULT_MODEL}).",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--prompt", "-p", default=None, help=f"Prompt text; '-' reads stdin (default: {DEFAULT_PROMPT!r})."
    )
    src.add_argument("--prompt-file", type=Path, help="Read the prompt from this file.")
    p.add_argument("--max-tokens", "-m", type=int, default=100, help="Tokens to generate (default: 100).")
    p.add_argument("--temp", type=float, default=0.0, help="Sampling temperature; 0 is greedy (default: 0).")
    p.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling: keep tokens up to this probability mass (default: 1, off).")
    p.add_argument("--min-p", type=float, default=0.0, help="Drop tokens below this fraction of the top probability (default: 0, off).")
    p.add_argument("--seed", type=int, default=None, help="Random seed for sampling (default: random).")
    p.add_argument("--kv-bits", type=int, choices=[2, 3, 4, 6, 8], default=None, help="Quantize the KV cache to this many bits (default: off).")
    p.add_argument("--kv-group-size", type=int, choices=[32, 64, 128], default=64, help="Group size for --kv-bits; must divide head_dim (default: 64).")
    p.add_argument("--max-kv-size", type=int, default=None, help="Keep at most this many tokens in a rotating KV cache (default: unbounded).")
    p.add_argument(
        "--position-blend",
        type=float,
        default=0.0,
        help="Blend learned positions with token indices: 0 = RePo as trained, "
        "1 = plain RoPE in every layer (the paper's ablation), default 0.",
    )
    p.add_argument("--dtype", choices=DTYPES, default=None, help="Compute dtype (default: the checkpoint's).")
    p.add_argument("--adapter-path", default=None, help="Folder of LoRA/DoRA adapters to apply (from repo_mlx.lora).")
    p.add_argument("--verbose", type=int, choices=[0, 1], default=1, help="1 prints separators and speed (default); 0 prints the text only.")
    return p


def read_prompt(args) -> str:
    if args.prompt_file is not None:
        try:
            return args.prompt_file.read_text()
        except OSError as e:
            raise LoadError(f"Cannot read --prompt-file {args.prompt_file}: {e.strerror}.") from None
    if args.prompt == "-":
        return sys.stdin.read()
    return args.prompt if args.prompt is not None else DEFAULT_PROMPT


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.max_tokens < 1:
        raise LoadError("--max-tokens must be at least 1.")
    prompt = read_prompt(args)
    model, tokenizer = load(
        args.model,
        dtype=args.dtype,
        adapter_path=args.adapter_path,
        model_config={"position_blend": args.position_blend},
    )
    head_dim = model.layers[0].self_attn.head_dim
    if args.kv_bits is not None and head_dim % args.kv_group_size:
        raise LoadError(
            f"--kv-group-size {args.kv_group_size} does not divide this model's "
            f"head_dim {head_dim}; pick one that does (32, 64 or 128)."
        )
    if args.seed is not None:  # after loading: building the model draws random numbers
        mx.random.seed(args.seed)
    text = generate(
        model,
        tokenizer,
        prompt,
        verbose=bool(args.verbose),
        max_tokens=args.max_tokens,
        sampler=make_sampler(args.temp, args.top_p, args.min_p),
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        max_kv_size=args.max_kv_size,
    )
    if not args.verbose:
        print(text)


if __name__ == "__main__":
    _cli.run(main)
