"""How much a loaded model can take, one rule for every command: a prompt past the
model's context is a warning (YaRN, or a degraded tail, may be what the user
wants), past 4x the context an error (the paper took RePo to 4x with YaRN; beyond
is noise), and a KV cache larger than this machine's memory an error, all before
the work starts."""

import os
import warnings
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import LoadError

MAX_CONTEXTS = 4  # prompts up to this many times the context


def context_length(model: nn.Module) -> Optional[int]:
    return getattr(model.args, "max_position_embeddings", None)


def check_length(model: nn.Module, tokens: int, new_tokens: int = 0, what: str = "The prompt", cached: int = 0) -> None:
    """Warn when ``tokens`` (``cached`` of them in a prompt cache) and then ``new_tokens``
    generated run past the context; refuse a prompt over MAX_CONTEXTS contexts."""
    limit = context_length(model)
    if not limit:
        return
    doc = f" ({cached} of them the cached document)" if cached else ""
    if tokens > MAX_CONTEXTS * limit:
        raise LoadError(
            f"{what} is {tokens} tokens{doc}, more than {MAX_CONTEXTS} times the model's context of {limit}, "
            f"past which RePo gives noise (the paper went to {MAX_CONTEXTS}x with --yarn {MAX_CONTEXTS}): shorten it."
        )
    if tokens > limit:
        warnings.warn(f"{what} is {tokens} tokens{doc}, more than the model's context of {limit}; "
                      "what comes past it may degrade (--yarn 2 doubles the context).", stacklevel=2)
    elif tokens + new_tokens > limit:
        warnings.warn(f"{new_tokens} new tokens after {tokens}{doc} run past the model's context of {limit}; "
                      "text past it may degrade (--yarn 2 doubles the context).", stacklevel=2)


def check_tokens_fit(model: nn.Module, tokens: int, flag: str, batch: int = 1) -> None:
    """The real bound of a length: its KV cache (keys and values of every layer)
    must fit in this machine's memory; past the context is only a warning."""
    a = model.args
    heads = getattr(a, "num_key_value_heads", None) or a.num_attention_heads
    head_dim = getattr(a, "head_dim", None) or a.hidden_size // a.num_attention_heads
    # The cache holds activations: the dtype of the float weights (norms stay float when quantized).
    dtype = next(v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating))
    need = 2 * len(model.layers) * heads * head_dim * dtype.size * tokens * batch
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory:
        raise LoadError(
            f"{flag}: {tokens} tokens{f' x {batch}' if batch > 1 else ''} need {need / 2**30:.3g} GiB of "
            f"KV cache, more than this machine's {memory / 2**30:.3g} GiB of memory."
        )
