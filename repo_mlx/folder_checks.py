"""What a model folder must hold before a model is built from it: config keys of
the right types and ranges, whole safetensors files, the shards an index names and
as many layers as the config says. Each problem is one LoadError that says what
to fix; MLX's own errors come later, deep in a library, or not at all.
"""

import json
import math
import re
import struct
from pathlib import Path

from .errors import LoadError

GGUF_HELP = (
    "{path} is a GGUF file (llama.cpp's format), which repo_mlx does not read: pass the "
    "Hugging Face folder it was made from (config.json, model*.safetensors), or its Hub id."
)

# Bytes per element of each safetensors dtype.
ST_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
             "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}

# config.json keys every architecture reads, with the type and range they must have
# (mlx-lm's model arguments of OLMo-2, Llama, Mistral and Qwen3). MLX sizes are int32.
MAX_SIZE = 2**31 - 1
_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
_FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
_MAPPINGS = ("rope_scaling", "pe_config")


def safetensors_header(file: Path) -> dict:
    """The tensor table of a safetensors file, checking the file is whole."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise LoadError(f"{file} is not a safetensors file or is truncated.")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LoadError(f"{file} has a corrupt safetensors header.") from None
    if not isinstance(header, dict):
        raise LoadError(f"{file} has a corrupt safetensors header (not a mapping).")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise LoadError(f"{file} has a corrupt safetensors header: __metadata__ is not a mapping of strings.")
    end = max((_check_tensor_entry(file, k, t) for k, t in header.items()), default=0)
    if 8 + n + end > size:
        raise LoadError(f"{file} is truncated ({size} bytes, needs {8 + n + end}); download or copy it again.")
    return header


def _check_tensor_entry(file: Path, key: str, t) -> int:
    """A header entry's dtype, shape and offsets agree; returns its end offset."""
    def bad(why):
        raise LoadError(f"{file} has a corrupt safetensors header: tensor {key!r} {why}.")

    if not isinstance(t, dict):
        bad("is not a mapping")
    dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
    if dtype not in ST_DTYPES:
        bad(f"has dtype {dtype!r}, not one of {', '.join(ST_DTYPES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        bad(f"has shape {shape!r}, not a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        bad(f"has data_offsets {offsets!r}, not [begin, end]")
    count = math.prod(shape)
    if offsets[1] - offsets[0] != count * ST_DTYPES[dtype]:
        bad(f"of shape {shape} {dtype} needs {count * ST_DTYPES[dtype]} bytes, its offsets hold {offsets[1] - offsets[0]}")
    return offsets[1]


def check_weight_files(path: Path) -> None:
    """Clear errors for missing shards and truncated files before MLX reads them."""
    files = sorted(path.glob("model*.safetensors"))
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise LoadError(f"{index_file} is not a valid safetensors index.") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) and Path(f).name == f for f in weight_map.values()
        ):
            raise LoadError(f"{index_file}: weight_map must map tensor names to file names in the folder.")
        missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
        if missing:
            raise LoadError(
                f"{path} is missing weight files {', '.join(missing)} named in "
                "model.safetensors.index.json; download them again."
            )
    if not files:
        if any(path.glob("*.gguf")):
            raise LoadError(GGUF_HELP.format(path=next(path.glob("*.gguf"))))
        raise LoadError(f"{path} has no model*.safetensors weight files.")
    for file in files:
        safetensors_header(file)


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def check_regular_files(path: Path) -> None:
    """What the loaders read must be a regular file: a FIFO blocks the read
    forever, a folder or a symlink loop fails deep in a library."""
    for p in path.iterdir():
        if p.suffix in (".json", ".safetensors", ".model", ".txt", ".jinja", ".py") and not p.is_file():
            what = ("a folder" if p.is_dir() else "a FIFO" if p.is_fifo()
                    else "a broken or looping symlink" if p.is_symlink() else "not a regular file")
            raise LoadError(f"{p} is {what}; the model folder needs a regular file there.")


def check_config(config: dict, where) -> None:
    """Types and ranges of the keys the model is built from, before it is built."""
    def bad(key, want):
        raise LoadError(f"{where}: {key} must be {want}, got {json.dumps(config[key])[:60]}.")

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for key in _SIZES:
        if key not in config:
            raise LoadError(f"{where} has no {key}; is it a model's config?")
    for key in _SIZES + _OPTIONAL_SIZES:
        v = config.get(key)
        if key in config and not ((type(v) is int and 1 <= v <= MAX_SIZE) or (key in _OPTIONAL_SIZES and v is None)):
            bad(key, f"an integer from 1 to {MAX_SIZE}")
    for key in _FLAGS:
        if key in config and type(config[key]) is not bool:
            bad(key, "true or false")
    for key in _MAPPINGS:
        if config.get(key) is not None and not isinstance(config[key], dict):
            bad(key, "an object or null")
    eps = config.get("rms_norm_eps", 1e-6)
    if not (number(eps) and 0 < eps < 1):
        bad("rms_norm_eps", "a number between 0 and 1")
    theta = config.get("rope_theta", 10000.0)
    if not (number(theta) and 1 < theta < math.inf):
        bad("rope_theta", "a finite number above 1")
    factor = (config.get("rope_scaling") or {}).get("factor", 1.0)
    if not (number(factor) and 0 < factor < math.inf):
        raise LoadError(f"{where}: rope_scaling.factor must be a positive number, got {factor!r}.")
    eos = config.get("eos_token_id")
    ids = [eos] if type(eos) is int else eos if isinstance(eos, list) else [None] if eos is not None else []
    if not all(type(e) is int and 0 <= e < config["vocab_size"] for e in ids):
        bad("eos_token_id", f"a token id below vocab_size {config['vocab_size']}, a list of them, or null")
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if heads % kv:
        raise LoadError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}.")
    if config.get("head_dim") is None and config["hidden_size"] % heads:
        raise LoadError(f"{where}: hidden_size {config['hidden_size']} is not a multiple of num_attention_heads {heads}.")


def check_layer_count(path: Path, config: dict) -> None:
    """More layers than the weights hold would build (and allocate) them all first."""
    n = config["num_hidden_layers"]
    layers = {int(m[1]) for file in sorted(path.glob("model*.safetensors")) for key in safetensors_header(file)
              if (m := re.match(r"(?:model\.)?layers\.(\d+)\.", key))}
    if layers and n != len(layers):
        raise LoadError(f"{path / 'config.json'}: num_hidden_layers is {n}, the weights hold {len(layers)} layers.")
