"""Random RePo checkpoints in the official Hugging Face format, for the tests and
the bench scripts (no Hub access needed): the config keys, weight names and
tokenizer kind of ``SakanaAI/RePo-OLMo2-1B-stage2-L5``. The bench scripts import it
from here too; no command uses it.
"""

import json
import zlib
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from repo_mlx.rope import pe_config

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
    """float32 numpy weights under HF names, one for each parameter of the model the
    config builds: normal of std 1/sqrt(fan-in), norms near 1, the embedding N(0, 1).

    ``position_scale`` scales final_map so positions spread over about
    +-150 * position_scale, as in the official fixture.
    """
    from repo_mlx.loader import model_file

    arch = model_file(cfg)
    shapes = tree_flatten(arch.Model(arch.ModelArgs.from_dict(cfg)).parameters())  # lazy: nothing computed
    out = {}
    for name, p in shapes:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # the same whatever the order
        w = rng.standard_normal(p.shape, dtype=np.float32)
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * w
        elif not name.endswith("embed_tokens.weight"):
            w *= (6.0 * position_scale if "final_map" in name else 1.0) * p.shape[-1] ** -0.5
        out[name] = w.astype(np.float32)
    return out


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
