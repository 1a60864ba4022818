# RePo-OLMo2: OLMo-2 whose upper layers rotate queries and keys by positions a
# small network assigns to each token and head (arXiv 2512.14391).
#
# Self-contained on purpose: converted folders ship this file (config key
# "model_file") so stock mlx-lm can load them with --trust-remote-code.

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import (
    BaseModelArgs,
    create_attention_mask,
    scaled_dot_product_attention,
)
from mlx_lm.models.rope_utils import initialize_rope

try:
    from repo_mlx import rope
except ImportError:  # a converted folder run by stock mlx-lm: use the copy beside us
    _spec = importlib.util.spec_from_file_location(
        "repo_rope", Path(__file__).with_name("repo_rope.py")
    )
    rope = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(rope)

POSITION_MODES = ("swigluex_multihead",)
POSITION_WEIGHTS = ("gate_map", "content_map", "final_map")


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    rms_norm_eps: float
    vocab_size: int
    head_dim: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    attention_bias: bool = False
    rope_theta: float = 10000
    rope_scaling: Optional[Dict[str, Union[float, str]]] = None
    tie_word_embeddings: bool = False
    pe_config: Optional[Dict[str, Any]] = None
    # The official dynamic_pe_pdrop: 0 uses the learned positions, 1 is plain RoPE.
    position_blend: float = 0.0

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.repo_layers = repo_layer_ids(self.pe_config, self.num_hidden_layers)
        if self.repo_layers and self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(
                "RePo needs num_key_value_heads == num_attention_heads (keys of head h "
                f"use the positions of query head h); got {self.num_key_value_heads} "
                f"and {self.num_attention_heads}."
            )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, repo: bool):
        super().__init__()
        dim = args.hidden_size
        self.n_heads = n_heads = args.num_attention_heads
        self.n_kv_heads = n_kv_heads = args.num_key_value_heads
        self.head_dim = head_dim = args.head_dim or dim // n_heads
        self.scale = head_dim**-0.5
        bias = args.attention_bias

        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=bias)
        # q/k norms span the whole projection, before the split into heads.
        self.q_norm = nn.RMSNorm(n_heads * head_dim, args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(n_kv_heads * head_dim, args.rms_norm_eps)

        self.repo = repo
        if repo:
            d_p = dim // 8
            self.gate_map = nn.Linear(dim, d_p, bias=False)
            self.content_map = nn.Linear(dim, d_p, bias=False)
            self.final_map = nn.Linear(d_p, n_heads, bias=False)
            self.position_blend = args.position_blend
            # Built once; private, so not a parameter.
            self._inv_freq, self._attention_factor = rope_parameters(
                head_dim, args.rope_theta, args.rope_scaling
            )
        else:
            self.rope = initialize_rope(
                head_dim,
                args.rope_theta,
                False,
                args.rope_scaling,
                args.max_position_embeddings,
            )

    def positions(self, x: mx.array, offset=0) -> mx.array:
        """z [B, heads, N] in float32: where this layer puts each token, per head."""
        z = self.final_map(swiglu(self.gate_map(x), self.content_map(x)))
        z = z.astype(mx.float32).transpose(0, 2, 1)
        if p := self.position_blend:
            index = mx.arange(x.shape[1], dtype=mx.float32)
            if isinstance(offset, mx.array) and offset.ndim == 1:  # batch cache
                index = offset[:, None, None].astype(mx.float32) + index
            else:
                index = index + offset
            z = (1 - p) * z + p * index
        return z

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        queries = self.q_norm(self.q_proj(x))
        keys = self.k_norm(self.k_proj(x))
        values = self.v_proj(x)

        queries = queries.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = keys.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        if self.repo:
            queries, keys = rope.continuous_rope_qk(
                queries,
                keys,
                self.positions(x, offset),
                inv_freq=self._inv_freq,
                attention_factor=self._attention_factor,
            )
        else:
            queries = self.rope(queries, offset=offset)
            keys = self.rope(keys, offset=offset)
        # The cache holds rotated keys: a token's position never changes later.
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)

        output = scaled_dot_product_attention(
            queries, keys, values, cache=cache, scale=self.scale, mask=mask
        )
        return self.o_proj(output.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)

    def __call__(self, x) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, repo: bool):
        super().__init__()
        self.self_attn = Attention(args, repo)
        self.mlp = MLP(args)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_feedforward_layernorm = nn.RMSNorm(
            args.hidden_size, args.rms_norm_eps
        )

    def __call__(self, x, mask=None, cache=None) -> mx.array:
        # Post-norm: attention and MLP read the raw residual stream.
        h = x + self.post_attention_layernorm(self.self_attn(x, mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(h))


class Olmo2Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            TransformerBlock(args, i in args.repo_layers)
            for i in range(args.num_hidden_layers)
        ]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None):
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, cache=c)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Olmo2Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None):
        out = self.model(inputs, cache, input_embeddings)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(out)
        return self.lm_head(out)

    def sanitize(self, weights):
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        # Stock loaders silently drop or ignore these weights; never load a
        # checkpoint whose position modules disagree with its config.
        found = {
            int(k.split(".")[2])
            for k in weights
            if k.startswith("model.layers.") and k.split(".")[4] in POSITION_WEIGHTS
        }
        expected = set(self.args.repo_layers)
        if extra := sorted(found - expected):
            raise ValueError(
                f"Layers {extra} have RePo position weights (gate_map/content_map/"
                "final_map) but pe_config does not make them RePo layers; "
                "fix pe_config or use the matching checkpoint."
            )
        for i in sorted(expected):
            for name in POSITION_WEIGHTS:
                key = f"model.layers.{i}.self_attn.{name}.weight"
                if key not in weights:
                    raise ValueError(
                        f"pe_config makes layer {i} a RePo layer but the checkpoint "
                        f"has no {key}; the weights are incomplete or the config is wrong."
                    )
        return weights

    @property
    def layers(self):
        return self.model.layers


# ------------------------------------------------------------ config parsing
def rope_parameters(
    head_dim: int, base: float, rope_scaling: Optional[dict]
) -> Tuple[mx.array, float]:
    """Inverse frequencies and cos/sin factor for a config's ``rope_scaling``."""
    kind = (rope_scaling or {}).get("rope_type") or (rope_scaling or {}).get("type")
    if kind in (None, "default"):
        return rope.inv_frequencies(head_dim, base), 1.0
    if kind == "yarn":
        keys = ("original_max_position_embeddings", "beta_fast", "beta_slow")
        extra = {k: rope_scaling[k] for k in keys if rope_scaling.get(k) is not None}
        return rope.yarn_parameters(head_dim, base, rope_scaling["factor"], **extra)
    raise ValueError(
        f"rope_scaling type {kind!r} is not supported for RePo layers; "
        "use 'yarn' (as the paper did) or none."
    )


def _pe_setting(pe_config: dict, name: str):
    # The official code reads only the misspelled key; its converter writes both.
    wrong, right = pe_config.get("dynmaic_" + name), pe_config.get("dynamic_" + name)
    if wrong is not None and right is not None and wrong != right:
        raise ValueError(
            f"pe_config disagrees with itself: dynmaic_{name}={wrong!r} but "
            f"dynamic_{name}={right!r}; make both spellings equal."
        )
    return wrong if wrong is not None else right


def pe_config(start_layer: int = 1, layer_ids: str = "", mode="swigluex_multihead") -> dict:
    """A ``pe_config`` as the official converter writes it (both spellings of each key)."""
    return {
        "dynamic_pe_mode": mode,
        "dynamic_pe_start_layer": start_layer,
        "dynmaic_pe_start_layer": start_layer,
        "dynamic_pe_layer_ids": layer_ids,
        "dynmaic_pe_layer_ids": layer_ids,
        "dynamic_pe_init_pdrop": 1.0,
        "dynamic_pe_dropout_anneal_step": 0,
        "model_type": "",
    }


def repo_layer_ids(pe_config: Optional[dict], num_layers: int) -> List[int]:
    """The layers that assign their own positions, from a HF ``pe_config``."""
    if not pe_config:
        return []
    mode = pe_config.get("dynamic_pe_mode")
    if mode in (None, "", "none"):
        return []
    if mode not in POSITION_MODES:
        raise ValueError(
            f"pe_config dynamic_pe_mode {mode!r} is not supported; "
            f"supported: {', '.join(POSITION_MODES)} (or 'none' for plain OLMo-2)."
        )
    start = int(_pe_setting(pe_config, "pe_start_layer") or 0)
    ids = _pe_setting(pe_config, "pe_layer_ids") or ""
    if isinstance(ids, str):
        try:
            ids = [int(i) for i in ids.split(",") if i.strip()]
        except ValueError:
            raise ValueError(
                f"pe_config layer ids {ids!r} must be comma-separated integers."
            ) from None
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"pe_config names layers {bad} but the model has {num_layers} layers."
        )
    return [i for i in (ids or range(num_layers)) if i >= start]
