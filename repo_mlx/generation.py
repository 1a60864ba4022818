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
from .limits import warn_if_too_long
from .loader import ARCHITECTURES, get_model_path, load, load_config

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
    return mlx_lm_generate(model, tokenizer, _encode(model, tokenizer, prompt), verbose, **kwargs)


def stream_generate(model, tokenizer, prompt, **kwargs):
    """mlx-lm's ``stream_generate`` (same keywords), warning on prompts past the context."""
    yield from mlx_lm_stream_generate(model, tokenizer, _encode(model, tokenizer, prompt), **kwargs)


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


def add_kv_flags(p, start: bool = True) -> None:
    """mlx-lm's KV-cache quantization flags."""
    p.add_argument("--kv-bits", type=int, choices=KV_BITS, default=None, help="Quantize the KV cache to this many bits (default: off); needs a --kv-group-size that divides head_dim.")
    p.add_argument("--kv-group-size", type=int, choices=KV_GROUP_SIZES, default=64, help="Group size for --kv-bits; must divide head_dim (default: 64).")
    if start:
        p.add_argument("--quantized-kv-start", type=_cli.non_negative_int, default=DEFAULT_QUANTIZED_KV_START, help=f"With --kv-bits, the token from which the cache is quantized (default: {DEFAULT_QUANTIZED_KV_START}).")


def load_draft(path, tokenizer):
    """The draft model of speculative decoding: a RePo or plain model repo_mlx
    loads, or any model mlx-lm loads; its tokenizer must be the target's."""
    from mlx_lm.utils import load as mlx_lm_load

    folder = get_model_path(path)
    if load_config_type(folder) in ARCHITECTURES:
        draft, draft_tokenizer = load(str(folder))
    else:
        try:
            draft, draft_tokenizer = mlx_lm_load(str(folder))
        except Exception as e:
            raise LoadError(f"Cannot load the draft model {path}: {one_line(e)}") from None
    if draft_tokenizer.vocab_size != tokenizer.vocab_size or draft_tokenizer.encode("The 1st draft.") != tokenizer.encode("The 1st draft."):
        raise LoadError(f"--draft-model {path} has another tokenizer than the model; speculative decoding needs the same one.")
    return draft


def load_config_type(folder) -> str:
    """A folder's model_type, or '' where its config cannot say."""
    try:
        return load_config(folder)["model_type"]
    except LoadError:
        return ""
