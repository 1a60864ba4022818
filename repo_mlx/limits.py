"""How much a loaded model can take: its context, and the KV cache this machine's
memory holds. Past the context is a warning (YaRN or a degraded tail may be what
the user wants); past memory is an error before any work.
"""

import os
import warnings
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import LoadError


def context_length(model: nn.Module) -> Optional[int]:
    return getattr(model.args, "max_position_embeddings", None)


def warn_if_too_long(model: nn.Module, num_tokens: int) -> None:
    limit = context_length(model)
    if limit and num_tokens > limit:
        warnings.warn(
            f"The prompt has {num_tokens} tokens, more than the model's context of "
            f"{limit}; output past it may degrade (see YaRN scaling in the README).",
            stacklevel=3,
        )


def check_tokens_fit(model: nn.Module, tokens: int, flag: str, batch: int = 1) -> None:
    """The real bound of a length: its KV cache (keys and values of every layer)
    must fit in this machine's memory; past the context is only a warning."""
    a = model.args
    heads = getattr(a, "num_key_value_heads", None) or a.num_attention_heads
    head_dim = getattr(a, "head_dim", None) or a.hidden_size // a.num_attention_heads
    # The cache holds activations: the dtype of the float weights (norms stay float when quantized).
    dtype = next(v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating))
    need = 2 * len(model.layers) * heads * head_dim * dtype.size
    need *= tokens * batch
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory:
        raise LoadError(
            f"{flag}: {tokens} tokens{f' x {batch}' if batch > 1 else ''} need {need / 2**30:.3g} GiB of "
            f"KV cache, more than this machine's {memory / 2**30:.3g} GiB of memory."
        )
