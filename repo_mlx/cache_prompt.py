"""Keep a long document's KV cache as a file: ``python -m repo_mlx.cache_prompt``. The file is
valid only for the model that made it (see prompt_cache.py)."""

import argparse

import mlx.core as mx
from tqdm import tqdm

from . import _cli
from .errors import LoadError
from .generation import add_kv_flags, check_kv_bits
from .limits import check_length, check_tokens_fit
from .prompt_cache import prefill, save


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="python -m repo_mlx.cache_prompt",
        description="Run a long prompt (a document) through a RePo model once and save its KV "
        "cache, so that repo_mlx.generate and repo_mlx.server can continue after it without "
        "processing it again.",
    )
    _cli.add_model_flags(p, yarn=True)
    _cli.add_prompt_flags(p, "the document", required=True)
    p.add_argument(
        "--prompt-cache-file", type=_cli.output_file, required=True,
        help="The .safetensors file to write the cache to (replaced if it exists). Runs that "
        "use it must pass the same --model, --dtype, --yarn, --position-blend and --adapter-path.",
    )  # fmt: skip
    p.add_argument("--position-blend", type=_cli.probability, default=0.0, help="0 = learned positions (default), 1 = plain RoPE in every layer.")
    add_kv_flags(p, max_kv=True)
    p.add_argument("--eos-token", type=_cli.text, help="A token that also ends the replies of runs that continue after the document (generate --prompt-cache-file).")
    _cli.add_trust_remote_code(p)
    return p


def command(argv=None) -> None:
    args = build_parser().parse_args(argv)
    out = args.prompt_cache_file
    if out.suffix != ".safetensors":
        raise LoadError(f"--prompt-cache-file {out} must end in .safetensors.")
    text = _cli.read_prompt(args)
    model, tokenizer = _cli.load_from_args(args, position_blend=args.position_blend)
    args.kv_group_size = check_kv_bits(model, args.kv_bits, args.kv_group_size)
    tokens = tokenizer.encode(text)
    if not tokens:
        raise LoadError("The prompt is empty; give the document with --prompt or --prompt-file.")
    check_length(model, len(tokens), what="The document")
    check_tokens_fit(model, len(tokens), "--prompt")
    # disable=None: a bar on a terminal, silence when output goes to a file.
    with tqdm(total=len(tokens), desc="prefill", unit="tok", unit_scale=True, disable=None) as bar:
        cache = prefill(model, tokens, args.prefill_step_size, bar, args.max_kv_size, kv_bits=args.kv_bits,
                        kv_group_size=args.kv_group_size, quantized_kv_start=args.quantized_kv_start)
    save(out, model, tokens, cache, args.model, args.eos_token)
    print(f"Saved the cache of {len(tokens)} tokens to {out} ({out.stat().st_size / 1e6:.1f} MB); "
          f"peak memory {mx.get_peak_memory() / 1e9:.3f} GB.")


def main(argv=None) -> None:
    _cli.run(command, argv)


if __name__ == "__main__":
    main()
