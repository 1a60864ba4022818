# RePo for mlx-lm's llama and qwen3 architectures (Llama 3.x, SmolLM2,
# Mistral-style configs, Qwen3): upper layers rotate queries and keys by
# positions a small network assigns to each token and KV head (arXiv 2512.14391).
#
# Grouped-query attention, which the official code refuses: final_map gives one
# position per KV head and each query head takes its KV head's (head h uses KV
# head h // (heads / kv_heads), mlx-lm's grouping), so keys are rotated and
# cached once; with kv_heads == heads it is the official rule. The module reads
# the tensor that feeds q/k/v: here the normed input of a pre-norm block.
#
# The RePo parts are rope.py's; converted folders ship it as repo_rope.py beside this
# file (config key "model_file"), so stock mlx-lm loads them with --trust-remote-code.

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama

try:
    from repo_mlx import rope
except ImportError:  # a converted folder run by stock mlx-lm: use the copy beside us
    _spec = importlib.util.spec_from_file_location(
        "repo_rope", Path(__file__).with_name("repo_rope.py")
    )
    rope = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(rope)

MODEL_TYPES = ("llama", "mistral", "qwen3")  # mlx-lm runs mistral configs as llama


@dataclass
class ModelArgs(llama.ModelArgs):
    rope_theta: Optional[float] = None
    rope_parameters: Optional[dict] = None
    pe_config: Optional[Dict[str, Any]] = None
    # The official dynamic_pe_pdrop: 0 uses the learned positions, 1 is plain RoPE.
    position_blend: float = 0.0

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r}: this file builds {', '.join(MODEL_TYPES)}."
            )
        super().__post_init__()
        # transformers >= 5 nests rope_theta and rope_scaling under rope_parameters.
        if self.rope_parameters:
            if self.rope_theta is None:
                self.rope_theta = self.rope_parameters.get("rope_theta")
            if self.rope_scaling is None:
                self.rope_scaling = self.rope_parameters
        if self.rope_theta is None:
            self.rope_theta = 10000.0
        # Qwen3 normalises each head's queries and keys (RMSNorm over head_dim).
        self.qk_norm = self.model_type == "qwen3"
        self.repo_layers = rope.repo_layer_ids(self.pe_config, self.num_hidden_layers)
        if self.repo_layers and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.repo_layers and self.rope_traditional:
            raise ValueError(
                "RePo layers rotate in the rotate-half layout (rope_traditional false); "
                "this config sets rope_traditional true."
            )


# mlx-lm's projections and RoPE; RePo layers add one position per KV head.
class Attention(rope.RePoAttention, llama.Attention):
    def __init__(self, args: ModelArgs, repo: bool):
        super().__init__(args)
        if args.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.init_positions(args, repo, self.head_dim, self.n_kv_heads)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        queries = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        if hasattr(self, "q_norm"):
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        queries = queries.transpose(0, 2, 1, 3)
        keys = keys.transpose(0, 2, 1, 3)
        values = values.transpose(0, 2, 1, 3)
        return self.attend(queries, keys, values, x, mask, cache)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, repo: bool, use_sliding: bool = False):
        super().__init__()
        self.use_sliding = use_sliding
        self.self_attn = Attention(args, repo)
        self.mlp = llama.MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    # Pre-norm: attention, its position module included, reads the normed input.
    __call__ = llama.TransformerBlock.__call__


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.sliding_window = args.sliding_window
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            TransformerBlock(args, i in args.repo_layers, kind == "sliding_attention")
            for i, kind in enumerate(args.layer_types)
        ]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.fa_idx = args.layer_types.index("full_attention")
        self.swa_idx = next((i for i, l in enumerate(self.layers) if l.use_sliding), None)

    __call__ = llama.LlamaModel.__call__


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    __call__ = llama.Model.__call__

    def sanitize(self, weights):
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        rope.check_position_weights(weights, self.args.repo_layers)
        return weights

    layers = llama.Model.layers

    make_cache = llama.Model.make_cache
