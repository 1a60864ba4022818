"""Generating with a RePo model: mlx-lm's ``generate`` and ``stream_generate``,
warning first when the prompt is longer than the model's context, and the
sampling and KV-cache options that generate, chat and benchmark share.
"""

from typing import List, Union

import mlx.core as mx
from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START
from mlx_lm.generate import generate as mlx_lm_generate
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate
from mlx_lm.sample_utils import make_sampler

from . import _cli
from .errors import LoadError, one_line
from .limits import check_length
from .loader import get_model_path, load, load_config

KV_BITS = [2, 3, 4, 6, 8]
KV_GROUP_SIZES = [32, 64, 128]  # what mx.quantize supports
MIN_KV_SIZE = 8  # mlx-lm's rotating cache always keeps the first 4 tokens


def _encode(model, tokenizer, prompt: Union[str, List[int], mx.array]):
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt)
    check_length(model, prompt.size if isinstance(prompt, mx.array) else len(prompt))
    return prompt


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """mlx-lm's ``generate`` (same keywords), warning on prompts past the context."""
    return mlx_lm_generate(model, tokenizer, _encode(model, tokenizer, prompt), verbose, **kwargs)


def stream_generate(model, tokenizer, prompt, **kwargs):
    """mlx-lm's ``stream_generate`` (same keywords), warning on prompts past the context."""
    yield from mlx_lm_stream_generate(model, tokenizer, _encode(model, tokenizer, prompt), **kwargs)


def add_sampling_flags(p, seed=None) -> None:
    """mlx_lm.generate's sampling flags (chat's too, whose seed defaults to 0 as mlx_lm.chat's)."""
    a = p.add_argument
    a("--temp", type=_cli.non_negative_float, default=0.0, help="Sampling temperature; 0 is greedy (default: 0).")
    a("--top-p", type=_cli.probability, default=1.0, help="Nucleus sampling: keep tokens up to this probability mass, 0 to 1 (default: 1, off).")
    a("--min-p", type=_cli.probability, default=0.0, help="Drop tokens below this fraction of the top probability, 0 to 1 (default: 0, off).")
    a("--top-k", type=_cli.non_negative_int, default=0, help="Sample from the k most likely tokens only (default: 0, off).")
    a("--xtc-probability", type=_cli.probability, default=0.0, help="XTC sampling: the probability of cutting the most likely tokens above --xtc-threshold (default: 0, off).")
    a("--xtc-threshold", type=_cli.float_range(0, 0.5), default=0.1, help="XTC sampling: tokens above this probability may be cut, 0 to 0.5 (default: 0.1).")
    a("--min-tokens-to-keep", type=_cli.positive_int, default=1, help="Tokens --min-p always keeps (default: 1).")
    a("--seed", type=_cli.seed, default=seed, help=f"Random seed for sampling, 0 to {2**32 - 1} (default: {'random' if seed is None else seed}).")


def sampler(args, tokenizer):
    return make_sampler(
        args.temp, args.top_p, args.min_p, args.min_tokens_to_keep, top_k=args.top_k,
        xtc_probability=args.xtc_probability, xtc_threshold=args.xtc_threshold,
        xtc_special_tokens=tokenizer.encode("\n") + list(tokenizer.eos_token_ids),
    )  # fmt: skip


def add_draft_flags(p, note: str = "") -> None:
    """mlx-lm's speculative decoding flags; ``note`` adds to --draft-model's help."""
    p.add_argument("--draft-model", help="A small model with the same tokenizer that drafts tokens for the RePo "
                   "model to verify (speculative decoding: the same greedy output, faster when the draft guesses "
                   f"well): a plain or RePo folder or Hub id{note} (default: none).")
    p.add_argument("--num-draft-tokens", type=_cli.positive_int, default=3, help="Tokens the draft model proposes per step (default: 3).")


def check_kv_bits(model, kv_bits, kv_group_size) -> int:
    """The KV cache's group size (mlx-lm's 64, else the largest that divides head_dim),
    before any work: it can only be quantized in groups dividing head_dim."""
    head_dim = model.layers[0].self_attn.head_dim
    fits = [g for g in KV_GROUP_SIZES if head_dim % g == 0]
    kv_group_size = kv_group_size or (64 if 64 in fits or not fits else max(fits))
    if kv_bits is not None and head_dim % kv_group_size:
        fix = (f"pick --kv-group-size {' or '.join(map(str, fits))}" if fits
               else f"no group size ({', '.join(map(str, KV_GROUP_SIZES))}) divides it, so drop --kv-bits")
        raise LoadError(f"--kv-group-size {kv_group_size} does not divide this model's head_dim {head_dim}; {fix}.")
    return kv_group_size


def add_kv_flags(p, start: bool = True, bits: bool = True, max_kv: bool = False) -> None:
    """mlx-lm's prefill and KV-cache flags: --prefill-step-size, --max-kv-size and the quantization ones."""
    a = p.add_argument
    a("--prefill-step-size", type=_cli.positive_int, default=2048, help="Tokens per prefill step; smaller needs less memory (default: 2048).")
    if max_kv:
        a("--max-kv-size", type=_cli.int_range(MIN_KV_SIZE),
          help=f"Keep at most this many tokens (at least {MIN_KV_SIZE}) in a rotating KV cache (default: unbounded).")
    if bits:
        a("--kv-bits", type=int, choices=KV_BITS, default=None, help="Quantize the KV cache to this many bits (default: off); needs a --kv-group-size that divides head_dim.")
        a("--kv-group-size", type=int, choices=KV_GROUP_SIZES, default=None, help="Group size for --kv-bits; must divide head_dim (default: 64, or 32 where it does not divide head_dim).")
    if bits and start:
        a("--quantized-kv-start", type=_cli.non_negative_int, default=DEFAULT_QUANTIZED_KV_START, help=f"With --kv-bits, the token from which the cache is quantized (default: {DEFAULT_QUANTIZED_KV_START}).")


def load_draft(path, tokenizer):
    """The draft model of speculative decoding: a RePo or plain model repo_mlx
    loads, or any model mlx-lm loads; its tokenizer must be the target's."""
    from mlx_lm.utils import load as mlx_lm_load

    folder = get_model_path(path)
    try:
        load_config(folder)
    except LoadError:  # not an architecture repo_mlx carries
        try:
            draft, draft_tokenizer = mlx_lm_load(str(folder))
        except Exception as e:
            raise LoadError(f"Cannot load the draft model {path}: {one_line(e)}") from None
    else:
        draft, draft_tokenizer = load(str(folder))
    if draft_tokenizer.vocab_size != tokenizer.vocab_size or draft_tokenizer.encode("The 1st draft.") != tokenizer.encode("The 1st draft."):
        raise LoadError(f"--draft-model {path} has another tokenizer than the model; speculative decoding needs the same one.")
    return draft
