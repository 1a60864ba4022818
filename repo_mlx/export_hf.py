"""Write a float RePo model in the official Hugging Face format, which the official
PyTorch code (SakanaAI's transformers fork) reads: safetensors marked ``format: pt``,
a config.json without MLX-only keys, ``pe_config`` in both spellings."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import make_shards

from .rope import pe_setting
from .errors import LoadError

# Keys only MLX loaders understand; the official config has none of them.
MLX_ONLY = ("model_file", "quantization", "quantization_config", "position_blend")
DTYPE_NAMES = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)
# Written by transformers >= 5, unknown to the official code (a 4.x fork).
NEW_TOKENIZER_KEYS = ("backend", "is_local", "local_files_only")


def hf_config(config: dict, dtype: str) -> dict:
    cfg = {k: v for k, v in config.items() if k not in MLX_ONLY}
    if cfg.get("pe_config"):
        pe = dict(cfg["pe_config"])
        for name in ("pe_start_layer", "pe_layer_ids"):
            value = pe_setting(pe, name)
            if value is not None:
                pe["dynamic_" + name] = pe["dynmaic_" + name] = value
        cfg["pe_config"] = pe
    cfg.update(architectures=["Olmo2ForCausalLM"], model_type="olmo2", torch_dtype=dtype)
    return dict(sorted(cfg.items()))


def check_exportable(config: dict) -> None:
    """Only RePo-OLMo2 has an official format (and PyTorch code that reads it)."""
    if config.get("model_type") != "olmo2":
        raise LoadError(
            f"--export-hf writes the official RePo-OLMo2 format; no official format exists "
            f"for a RePo {config.get('model_type')!r} model. Use the MLX folder (stock mlx-lm "
            "loads it with --trust-remote-code)."
        )


def export_hf(dst: Path, model: nn.Module, tokenizer, config: dict, src: Path) -> None:
    """Write ``model`` (float, not quantized) and its tokenizer to folder ``dst``."""
    check_exportable(config)
    if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
        raise LoadError("The Hugging Face format needs float weights; dequantize first.")
    weights = dict(tree_flatten(model.parameters()))
    dtypes = {w.dtype for w in weights.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPE_NAMES:
        raise LoadError(f"Cannot export mixed or unsupported dtypes {sorted(map(str, dtypes))}.")
    dst.mkdir(parents=True, exist_ok=True)
    shards = make_shards(weights)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        mx.save_safetensors(str(dst / name), shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(w.nbytes for w in weights.values())},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    dtype = DTYPE_NAMES[next(iter(dtypes))]
    (dst / "config.json").write_text(json.dumps(hf_config(config, dtype), indent=2))
    # The source's tokenizer files as they are, readable by transformers 4.x.
    if (src / "tokenizer.json").exists():
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy(src / name, dst)
    else:
        tokenizer.save_pretrained(str(dst))
    file = dst / "tokenizer_config.json"
    tok_config = json.loads(file.read_text()) if file.exists() else {}
    if tok_config.get("tokenizer_class") in (None, "TokenizersBackend"):
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in NEW_TOKENIZER_KEYS:
        tok_config.pop(key, None)
    file.write_text(json.dumps(tok_config, indent=2))
    if (src / "generation_config.json").exists():
        shutil.copy(src / "generation_config.json", dst)
