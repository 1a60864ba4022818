"""Loading RePo checkpoints (official Hugging Face folders or converted MLX ones)."""

import json
import os
import re
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model as _mlx_lm_load_model
from mlx_lm.utils import load_tokenizer as _mlx_lm_load_tokenizer
from mlx_lm.utils import save

from . import _cli, repo_llama, repo_olmo2, rope
from .errors import LoadError, one_line
from .adapters import load_adapters

DEFAULT_MODEL = "SakanaAI/RePo-OLMo2-1B-stage2-L5"
DTYPES = ("float32", "bfloat16", "float16")
DOWNLOAD_PATTERNS = ["*.json", "model*.safetensors", "*.py", "*.txt", "*.jinja"]
# Any one of these is a tokenizer transformers can read without remote code.
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
# The RePo model file of each model_type; a saved folder carries it and names it
# in config.json's model_file.
ARCHITECTURES = {"olmo2": repo_olmo2, **{t: repo_llama for t in repo_llama.MODEL_TYPES}}
ARCHITECTURE_NAMES = {"olmo2": "OLMo-2", "llama": "Llama", "mistral": "Mistral", "qwen3": "Qwen3"}


def model_file(config: dict):
    """The module (repo_olmo2 or repo_llama) that builds ``config``'s architecture."""
    return ARCHITECTURES[config["model_type"]]


def architecture_name(model_or_config) -> str:
    """'OLMo-2', 'Llama', 'Mistral' or 'Qwen3', for messages."""
    args = getattr(model_or_config, "args", None)
    kind = args.model_type if args is not None else model_or_config.get("model_type")
    return ARCHITECTURE_NAMES.get(kind, str(kind))


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face Hub id, ``owner/name``."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", str(name)) is not None


def check_hub_reachable(what: str, timeout: float = 3.0) -> None:
    """Fail at once, in one line, when the Hub cannot be reached: offline,
    huggingface_hub and datasets retry for half a minute before their error.

    With HF_HUB_OFFLINE set the libraries use their cache and fail fast themselves.
    """
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise LoadError(
            f"{what} needs the Hugging Face Hub, which cannot be reached at {url.hostname} "
            f"({e.strerror or e or 'timed out'}). Connect and retry, or set HF_HUB_OFFLINE=1 "
            "to use what is already cached."
        ) from None


def get_model_path(path_or_hf_repo: str, revision: Optional[str] = None) -> Path:
    """A local folder as is; otherwise a Hub id, downloaded on first use."""
    path = Path(path_or_hf_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            if _is_gguf(path):
                raise LoadError(GGUF_HELP.format(path=path))
            raise LoadError(f"{path} is a file; --model needs a model folder or a Hub id.")
        check_regular_files(path)
        return path
    if path_or_hf_repo == "demo":  # built in: a small RePo trained by experiments/repo_vs_rope.py
        return Path(__file__).parent / "demo"
    if not is_hub_id(path_or_hf_repo):
        raise LoadError(f"Model folder {path_or_hf_repo} does not exist.")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                path_or_hf_repo, revision=revision, allow_patterns=DOWNLOAD_PATTERNS
            )
        )
    except Exception as e:
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )

        if isinstance(e, GatedRepoError):
            why = "the repo is gated: accept its terms on the Hub and run `hf auth login`"
        elif isinstance(e, RepositoryNotFoundError):
            why = "no such repo on the Hub (or it is private: run `hf auth login`)"
        elif isinstance(e, LocalEntryNotFoundError):
            why = "it is not in the local cache and the Hub cannot be reached (offline?)"
        else:
            why = f"{type(e).__name__}: {one_line(e)[:120]}"
        raise LoadError(
            f"Could not download {path_or_hf_repo} from the Hugging Face Hub: {why}. "
            "Connect and retry, or pass a local model folder."
        ) from None


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
        raise LoadError(
            f"{file} is truncated ({size} bytes, needs {8 + n + end}); "
            "download or copy it again."
        )
    return header


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


GGUF_HELP = (
    "{path} is a GGUF file (llama.cpp's format), which repo_mlx does not read: pass the "
    "Hugging Face folder it was made from (config.json, model*.safetensors), or its Hub id."
)
# Bytes per element of each safetensors dtype.
ST_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
             "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def _is_gguf(path: Path) -> bool:
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
    count = 1
    for d in shape:
        count *= d
    if offsets[1] - offsets[0] != count * ST_DTYPES[dtype]:
        bad(f"of shape {shape} {dtype} needs {count * ST_DTYPES[dtype]} bytes, its offsets hold {offsets[1] - offsets[0]}")
    return offsets[1]


# config.json keys every architecture reads, with the type and range they must have
# (mlx-lm's model arguments of OLMo-2, Llama, Mistral and Qwen3). MLX sizes are int32.
MAX_SIZE = 2**31 - 1
_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
_FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
_MAPPINGS = ("rope_scaling", "pe_config")


def check_config(config: dict, where) -> None:
    """Types and ranges of the keys the model is built from, before it is built."""
    def bad(key, want):
        raise LoadError(f"{where}: {key} must be {want}, got {json.dumps(config[key])[:60]}.")

    def size(v):
        return type(v) is int and 1 <= v <= MAX_SIZE

    for key in _SIZES:
        if key not in config:
            raise LoadError(f"{where} has no {key}; is it a model's config?")
    for key in _SIZES + _OPTIONAL_SIZES:
        if key in config and not (size(config[key]) or (key in _OPTIONAL_SIZES and config[key] is None)):
            bad(key, f"an integer from 1 to {MAX_SIZE}")
    for key in _FLAGS:
        if key in config and type(config[key]) is not bool:
            bad(key, "true or false")
    for key in _MAPPINGS:
        if config.get(key) is not None and not isinstance(config[key], dict):
            bad(key, "an object or null")
    eps = config.get("rms_norm_eps", 1e-6)
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < 1):
        bad("rms_norm_eps", "a number between 0 and 1")
    theta = config.get("rope_theta", 10000.0)
    if not (isinstance(theta, (int, float)) and not isinstance(theta, bool) and 1 < theta < float("inf")):
        bad("rope_theta", "a finite number above 1")
    factor = (config.get("rope_scaling") or {}).get("factor", 1.0)
    if not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and 0 < factor < float("inf")):
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
    layers = set()
    for file in sorted(path.glob("model*.safetensors")):
        for key in safetensors_header(file):
            m = re.match(r"(?:model\.)?layers\.(\d+)\.", key)
            if m:
                layers.add(int(m[1]))
    if layers and n != len(layers):
        raise LoadError(
            f"{path / 'config.json'}: num_hidden_layers is {n}, the weights hold {len(layers)} layers."
        )


def load_config(path: Path) -> Dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise LoadError(f"{path} has no config.json; is it a model folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path / 'config.json'} is not valid JSON: {one_line(e)}") from None
    if not isinstance(config, dict):
        raise LoadError(f"{path / 'config.json'} must hold a JSON object, not {type(config).__name__}.")
    if not isinstance(config.get("model_type"), str) or config["model_type"] not in ARCHITECTURES:
        raise LoadError(
            f"{path} holds a {config.get('model_type')!r} model; repo_mlx runs RePo models "
            f"of model_type {', '.join(map(repr, ARCHITECTURES))}."
        )
    check_config(config, path / "config.json")
    return config


def load_model(
    path: Path,
    dtype: Optional[str] = None,
    model_config: Optional[Dict[str, Any]] = None,
    lazy: bool = False,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build the model from a local folder, validating config against weights."""
    if dtype is not None and dtype not in DTYPES:
        raise LoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    blend = (model_config or {}).get("position_blend", 0.0)
    if not 0.0 <= blend <= 1.0:
        raise LoadError(f"position_blend must be in [0, 1], got {blend}.")
    arch = model_file(load_config(path))
    check_weight_files(path)
    check_layer_count(path, load_config(path))
    # A converted folder names its own copy of the model file; use ours instead.
    overrides = {**(model_config or {}), "model_file": None}
    try:
        model, config = _mlx_lm_load_model(
            path,
            lazy=True,
            model_config=overrides,
            get_model_classes=lambda config: (arch.Model, arch.ModelArgs),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise LoadError(f"Cannot load {path}: {one_line(e)}") from None
    config.pop("model_file")
    if not model.args.repo_layers:
        # Same text for the same folder: Python's warning filter shows it once.
        warnings.warn(
            f"{path} is plain {architecture_name(model)}, not RePo: its config has no RePo "
            "layers (pe_config), "
            "so every layer uses token-index positions."
        )
    if dtype is not None:
        model.set_dtype(getattr(mx, dtype))
    if not lazy:
        mx.eval(model.parameters())
    return model, config


def load(
    path_or_hf_repo: str = DEFAULT_MODEL,
    dtype: Optional[str] = None,
    adapter_path: Optional[str] = None,
    model_config: Optional[Dict[str, Any]] = None,
    return_config: bool = False,
    revision: Optional[str] = None,
):
    """Load a RePo model and its tokenizer.

    ``path_or_hf_repo``: an official Hugging Face folder or Hub id, or a folder
    made by ``repo_mlx.convert``. ``dtype``: None keeps the stored dtype, or one
    of "float32", "bfloat16", "float16". ``model_config`` overrides config keys,
    e.g. ``{"position_blend": 1.0}`` or a YaRN ``rope_scaling``.
    """
    path = get_model_path(path_or_hf_repo, revision)
    model, config = load_model(path, dtype, model_config)
    if adapter_path is not None:
        if not Path(adapter_path, "adapter_config.json").exists():
            raise LoadError(f"{adapter_path} has no adapter_config.json.")
        model = load_adapters(model, adapter_path)
        model.eval()
    warn_if_not_finite(model, path)
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def save_standalone(folder: Path, src: Path, model, tokenizer, config: dict, donate_model=True) -> None:
    """mlx-lm's ``save`` plus the model file, named in config, so stock mlx-lm
    loads the folder without repo_mlx (and, on a Mac, with the Metal kernels:
    repo_rope.py looks for metal/ beside it)."""
    arch = model_file(config)
    config["model_file"] = Path(arch.__file__).name
    save(folder, src, model, tokenizer, config, donate_model=donate_model)
    files = {
        config["model_file"]: arch.__file__,
        "repo_rope.py": rope.__file__,
        "metal/rope.metal": rope.metal_source_path(),
    }
    for name, source in files.items():
        if source is not None:
            (folder / name).parent.mkdir(exist_ok=True)
            shutil.copy(source, folder / name)


def add_model_flags(p, yarn: bool = False, adapter: bool = True, required: bool = False) -> None:
    """--model, --dtype and, where the command takes them, --yarn and --adapter-path."""
    p.add_argument(
        "--model",
        required=required,
        default=None if required else DEFAULT_MODEL,
        help="Model folder (official Hugging Face or converted) or Hub id, downloaded on first use"
        + ("." if required else f" (default: {DEFAULT_MODEL})."),
    )
    p.add_argument("--dtype", choices=DTYPES, default=None, help="Compute dtype (default: the checkpoint's).")
    if yarn:
        p.add_argument(
            "--yarn", type=_cli.float_range(1), default=None,
            help="YaRN factor over 4096 tokens for every layer, the RePo layers included, as the "
            "paper did, for texts past 4K: 2 for 8K, 4 for 16K (default: off).",
        )  # fmt: skip
    if adapter:
        p.add_argument(
            "--adapter-path", type=_cli.existing_dir, default=None,
            help="Folder of LoRA/DoRA adapters to apply (from repo_mlx.lora).",
        )  # fmt: skip


def load_from_args(args, **model_config):
    """``load`` with the flags of ``add_model_flags``; returns (model, tokenizer)."""
    if getattr(args, "yarn", None) is not None:
        model_config.update(yarn_scaling(args.yarn))
    return load(
        args.model,
        dtype=args.dtype,
        adapter_path=getattr(args, "adapter_path", None),
        model_config=model_config or None,
    )


def load_tokenizer(path: Path, eos_token_ids=None):
    """mlx-lm's tokenizer loader, saying which file is missing (transformers
    blames sentencepiece or tiktoken instead)."""
    if not any(all((path / f).is_file() for f in files) for files in TOKENIZER_FILES):
        raise LoadError(
            f"{path} has no tokenizer.json (the Hugging Face tokenizer file); copy it, with "
            "tokenizer_config.json, from the source checkpoint."
        )
    try:
        return _mlx_lm_load_tokenizer(path, eos_token_ids=eos_token_ids)
    except Exception as e:
        raise LoadError(f"Cannot load the tokenizer in {path}: {one_line(e)}") from None


def yarn_scaling(factor: float, original_max_position_embeddings: int = 4096) -> dict:
    """``model_config`` for YaRN as the paper used it (all layers, spec section 7).

    Pass it to ``load(..., model_config=...)``; factor 2 gives 8K, 4 gives 16K.
    """
    if factor < 1:
        raise LoadError(f"YaRN factor must be at least 1, got {factor}.")
    return {
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": float(factor),
            "original_max_position_embeddings": original_max_position_embeddings,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
        },
        "max_position_embeddings": int(original_max_position_embeddings * factor),
    }


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


def warn_if_not_finite(model: nn.Module, path) -> bool:
    """Warn (once per folder) when the model's output on a few tokens is NaN or
    infinite: its weights are broken, and everything it generates is noise."""
    logits = model(mx.zeros((1, 4), dtype=mx.int32))
    if mx.isfinite(logits).all().item():
        return True
    warnings.warn(
        f"{path}: the model's output is NaN or infinite, so its text is meaningless; "
        "its weights (or dtype: try --dtype float32) are broken."
    )
    return False


def set_position_blend(model: nn.Module, blend: float) -> None:
    """0 uses the learned positions, 1 turns every RePo layer into plain RoPE."""
    if not 0.0 <= blend <= 1.0:
        raise LoadError(f"position_blend must be in [0, 1], got {blend}.")
    model.args.position_blend = blend
    for layer in model.layers:
        if layer.self_attn.repo:
            layer.self_attn.position_blend = blend
