# RePo-OLMo2: OLMo-2 whose upper layers rotate queries and keys by positions a
# small network assigns to each token and head (arXiv 2512.14391).
#
# The RePo parts are rope.py's; converted folders ship it as repo_rope.py beside this
# file (config key "model_file"), so stock mlx-lm loads them with --trust-remote-code.

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import olmo2
from mlx_lm.models.base import create_attention_mask

try:
    from repo_mlx import rope
except ImportError:  # a converted folder run by stock mlx-lm: use the copy beside us
    _spec = importlib.util.spec_from_file_location(
        "repo_rope", Path(__file__).with_name("repo_rope.py")
    )
    rope = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(rope)


@dataclass
class ModelArgs(olmo2.ModelArgs):
    tie_word_embeddings: bool = False
    pe_config: Optional[Dict[str, Any]] = None
    # The official dynamic_pe_pdrop: 0 uses the learned positions, 1 is plain RoPE.
    position_blend: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.repo_layers = rope.repo_layer_ids(self.pe_config, self.num_hidden_layers)
        if self.repo_layers and self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(
                "RePo needs num_key_value_heads == num_attention_heads (keys of head h "
                f"use the positions of query head h); got {self.num_key_value_heads} "
                f"and {self.num_attention_heads}."
            )


# mlx-lm's projections, q/k norms and RoPE; RePo layers add one position per head.
class Attention(rope.RePoAttention, olmo2.Attention):
    def __init__(self, args: ModelArgs, repo: bool):
        super().__init__(args)
        self.init_positions(args, repo, self.head_dim, self.n_heads)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        queries = self.q_norm(self.q_proj(x))
        keys = self.k_norm(self.k_proj(x))
        values = self.v_proj(x)

        queries = queries.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = keys.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return self.attend(queries, keys, values, x, mask, cache)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, repo: bool):
        super().__init__()
        self.self_attn = Attention(args, repo)
        self.mlp = olmo2.MLP(args)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_feedforward_layernorm = nn.RMSNorm(args.hidden_size, args.rms_norm_eps)

    # Post-norm: attention and MLP read the raw residual stream.
    __call__ = olmo2.TransformerBlock.__call__


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
        rope.check_position_weights(weights, self.args.repo_layers)
        return weights

    layers = olmo2.Model.layers
