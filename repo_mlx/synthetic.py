"""Random RePo checkpoints in the official Hugging Face format.

For tests and benchmarks (no Hub access needed): same config keys, weight
names and tokenizer kind as ``SakanaAI/RePo-OLMo2-1B-stage2-L5``.
"""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from .rope import pe_config

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def config(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=320,
    start_layer=1,
    repo=True,
    **overrides,
) -> dict:
    """A RePo-OLMo2 config; the defaults are the tiny fixture's shape."""
    cfg = {
        "architectures": ["Olmo2ForCausalLM"],
        "model_type": "olmo2",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_attention_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "eos_token_id": vocab_size - 2,
        "pad_token_id": vocab_size - 1,
        "torch_dtype": "float32",
    }
    if repo:
        cfg["pe_config"] = pe_config(start_layer)
    cfg.update(overrides)
    return cfg


def config_1b(**overrides) -> dict:
    """The released 1B's shapes: 16 layers of 2048, RePo from layer 5."""
    return config(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=16,
        intermediate_size=8192,
        vocab_size=100352,
        start_layer=5,
        **{"eos_token_id": 100257, "pad_token_id": 100277, **overrides},
    )


def random_weights(cfg: dict, seed: int = 0, position_scale: float = 1.0) -> dict:
    """float32 numpy weights under HF names; RePo layers get a position module.

    ``position_scale`` scales final_map so positions spread over about
    +-150 * position_scale, as in the official fixture.
    """
    from .repo_olmo2 import ModelArgs

    args = ModelArgs.from_dict(cfg)
    rng = np.random.default_rng(seed)
    d, f, v = args.hidden_size, args.intermediate_size, args.vocab_size
    hd = args.head_dim or d // args.num_attention_heads
    qd, kd = args.num_attention_heads * hd, args.num_key_value_heads * hd

    def normal(*shape, std=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    def norm(n):
        return (1.0 + normal(n, std=0.1)).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(v, d, std=1.0), "model.norm.weight": norm(d)}
    if not cfg.get("tie_word_embeddings"):
        w["lm_head.weight"] = normal(v, d, std=d**-0.5)
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        w.update(
            {
                p + "self_attn.q_proj.weight": normal(qd, d, std=d**-0.5),
                p + "self_attn.k_proj.weight": normal(kd, d, std=d**-0.5),
                p + "self_attn.v_proj.weight": normal(kd, d, std=d**-0.5),
                p + "self_attn.o_proj.weight": normal(d, qd, std=qd**-0.5),
                p + "self_attn.q_norm.weight": norm(qd),
                p + "self_attn.k_norm.weight": norm(kd),
                p + "mlp.gate_proj.weight": normal(f, d, std=d**-0.5),
                p + "mlp.up_proj.weight": normal(f, d, std=d**-0.5),
                p + "mlp.down_proj.weight": normal(d, f, std=f**-0.5),
                p + "post_attention_layernorm.weight": norm(d),
                p + "post_feedforward_layernorm.weight": norm(d),
            }
        )
        if i in args.repo_layers:
            dp = d // 8
            w[p + "self_attn.gate_map.weight"] = normal(dp, d, std=d**-0.5)
            w[p + "self_attn.content_map.weight"] = normal(dp, d, std=d**-0.5)
            w[p + "self_attn.final_map.weight"] = normal(
                args.num_attention_heads, dp, std=6.0 * position_scale * dp**-0.5
            )
    return w


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (OLMo-2's kind) with eos and pad at the end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Pad up to the model's vocabulary so eos and pad get its last two ids.
    filler = [f"<|extra_{i}|>" for i in range(len(vocab), vocab_size - 2)]
    tok.add_special_tokens(filler + [EOS, PAD])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    fast.save_pretrained(str(path))


def write_checkpoint(
    path,
    cfg: Optional[dict] = None,
    seed: int = 0,
    dtype: str = "float32",
    shards: int = 1,
    position_scale: float = 1.0,
) -> Path:
    """Write a random checkpoint (config, safetensors, tokenizer) to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg or config())
    cfg["torch_dtype"] = dtype
    weights = {
        k: mx.array(a).astype(getattr(mx, dtype))
        for k, a in random_weights(cfg, seed, position_scale).items()
    }
    names = sorted(weights)
    parts = [names[i::shards] for i in range(shards)]
    if shards == 1:
        mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    else:
        weight_map = {}
        for j, part in enumerate(parts):
            file = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
            mx.save_safetensors(
                str(path / file), {k: weights[k] for k in part}, metadata={"format": "pt"}
            )
            weight_map.update({k: file for k in part})
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
        )
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(path, cfg["vocab_size"])
    return path
