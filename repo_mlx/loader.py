"""Loading RePo models (official Hugging Face folders, converted MLX folders, Hub
ids) through mlx-lm's loader, with the folder checked first, and saving them so
that stock mlx-lm loads them too.
"""

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer
from mlx_lm.utils import dequantize_model, save

from . import repo_llama, repo_olmo2, rope
from .errors import LoadError, one_line
from .folder_checks import (GGUF_HELP, check_config, check_layer_count, check_regular_files,
                            check_weight_files, is_gguf)

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
    return ARCHITECTURES[config["model_type"]]


def architecture_name(model_or_config) -> str:
    args = getattr(model_or_config, "args", None)
    kind = args.model_type if args is not None else model_or_config.get("model_type")
    return ARCHITECTURE_NAMES.get(kind, str(kind))


def is_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", str(name)) is not None


def check_hub_reachable(what: str, timeout: float = 3.0) -> None:
    """Fail at once when the Hub cannot be reached: offline, huggingface_hub and datasets
    retry for half a minute. With HF_HUB_OFFLINE set they use their cache and fail fast."""
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
    if path_or_hf_repo == "demo" and path.exists():
        warnings.warn("./demo is a folder here: loading it, not the built-in demo model (rename it to use that).")
    if path.exists():
        if not path.is_dir():
            if is_gguf(path):
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
        return Path(snapshot_download(path_or_hf_repo, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as e:
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

        reasons = ((GatedRepoError, "the repo is gated: accept its terms on the Hub and run `hf auth login`"),
                   (RepositoryNotFoundError, "no such repo on the Hub (or it is private: run `hf auth login`)"),
                   (LocalEntryNotFoundError, "it is not in the local cache and the Hub cannot be reached (offline?)"))
        why = next((w for cls, w in reasons if isinstance(e, cls)), f"{type(e).__name__}: {one_line(e)[:120]}")
        raise LoadError(
            f"Could not download {path_or_hf_repo} from the Hugging Face Hub: {why}. "
            "Connect and retry, pass a local model folder, or try the small RePo model "
            "built into repo_mlx, which needs no network: --model demo."
        ) from None


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


def load_model(path: Path, dtype: Optional[str] = None, model_config: Optional[Dict[str, Any]] = None,
               lazy: bool = False, model_class=None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build the model from a local folder, validating config against weights. ``model_class``: a
    subclass of the architecture's Model to build instead (pretrain's); the caller says what it built."""
    if dtype is not None and dtype not in DTYPES:
        raise LoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    blend = (model_config or {}).get("position_blend", 0.0)
    if not 0.0 <= blend <= 1.0:
        raise LoadError(f"position_blend must be in [0, 1], got {blend}.")
    config = load_config(path)
    arch = model_file(config)
    check_weight_files(path)
    check_layer_count(path, config)
    # A converted folder names its own copy of the model file; use ours instead.
    overrides = {**(model_config or {}), "model_file": None}
    try:
        model, config = mlx_lm_load_model(path, lazy=True, model_config=overrides,
                                          get_model_classes=lambda config: (model_class or arch.Model, arch.ModelArgs))
    except (ValueError, KeyError, TypeError) as e:
        raise LoadError(f"Cannot load {path}: {one_line(e)}") from None
    config.pop("model_file")
    if not model.args.repo_layers and model_class is None:
        # Same text for the same folder: Python's warning filter shows it once.
        warnings.warn(f"{path} is plain {architecture_name(model)}, not RePo: its config has no RePo "
                      "layers (pe_config), so every layer uses token-index positions.")
    if dtype is not None:
        model.set_dtype(getattr(mx, dtype))
    if not lazy:
        mx.eval(model.parameters())
    return model, config


def load(path_or_hf_repo: str = DEFAULT_MODEL, dtype: Optional[str] = None, adapter_path: Optional[str] = None,
         model_config: Optional[Dict[str, Any]] = None, return_config: bool = False,
         revision: Optional[str] = None, tokenizer_config: Optional[Dict[str, Any]] = None):
    """Load a RePo model and its tokenizer from an official Hugging Face folder or Hub id, or a folder
    made by ``repo_mlx.convert``. ``dtype``: one of DTYPES, None keeps the stored one. ``model_config``
    overrides config keys, e.g. ``{"position_blend": 1.0}`` or ``yarn_scaling(2)``; ``tokenizer_config``
    as mlx-lm's (e.g. ``{"chat_template": ...}``)."""
    path = get_model_path(path_or_hf_repo, revision)
    model, config = load_model(path, dtype, model_config)
    if adapter_path is not None:
        if not Path(adapter_path, "adapter_config.json").exists():
            raise LoadError(f"{adapter_path} has no adapter_config.json.")
        from .adapters import load_adapters  # the tuner only when adapters are asked for

        model = load_adapters(model, adapter_path)
        model.eval()
    warn_if_not_finite(model, path)
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"), tokenizer_config=tokenizer_config)
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def load_tokenizer(path: Path, eos_token_ids=None, tokenizer_config=None):
    """mlx-lm's tokenizer loader, saying which file is missing (transformers
    blames sentencepiece or tiktoken instead)."""
    if not any(all((path / f).is_file() for f in files) for files in TOKENIZER_FILES):
        raise LoadError(
            f"{path} has no tokenizer.json (the Hugging Face tokenizer file); copy it, with "
            "tokenizer_config.json, from the source checkpoint."
        )
    try:
        return mlx_lm_load_tokenizer(path, tokenizer_config, eos_token_ids=eos_token_ids)
    except Exception as e:
        raise LoadError(f"Cannot load the tokenizer in {path}: {one_line(e)}") from None


def save_standalone(folder: Path, src: Path, model, tokenizer, config: dict, donate_model=True) -> None:
    """mlx-lm's ``save`` plus the model file, named in config, so stock mlx-lm loads the folder
    without repo_mlx (and, on a Mac, with the Metal kernels: repo_rope.py looks for metal/ beside it)."""
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


def dequantized(model, config: dict):
    """The model through mlx-lm's dequantize_model, its config no longer saying it is quantized."""
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    return dequantize_model(model)


def yarn_scaling(factor: float, original_max_position_embeddings: int = 4096) -> dict:
    """``model_config`` for ``load``: YaRN as the paper used it (all layers, spec section 7);
    factor 2 gives 8K, 4 gives 16K."""
    if not 1 <= factor <= 2**24 / original_max_position_embeddings:  # float32 positions stay exact integers
        raise LoadError(f"YaRN factor must be from 1 to {2**24 // original_max_position_embeddings} "
                        f"(a context of 2^24 tokens, past which positions are not exact in float32), got {factor}.")
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


def warn_if_not_finite(model: nn.Module, path) -> bool:
    """Warn (once per folder) when the model's output on a few tokens is NaN or infinite."""
    logits = model(mx.zeros((1, 4), dtype=mx.int32))
    if mx.isfinite(logits).all().item():
        return True
    warnings.warn(
        f"{path}: the model's output is NaN or infinite, so its text is meaningless; "
        "its weights (or dtype: try --dtype float32) are broken."
    )
    return False


def upload(path: Path, repo: str) -> None:
    """Upload a finished folder, keeping our model card (mlx-lm's ``upload_to_hub`` rewrites it)."""
    from huggingface_hub import HfApi

    print(f"[INFO] Uploading to {repo}")
    try:
        api = HfApi()
        api.create_repo(repo_id=repo, exist_ok=True)
        api.upload_large_folder(folder_path=str(path), repo_id=repo, repo_type="model")
    except Exception as e:
        raise LoadError(f"Upload to {repo} failed ({type(e).__name__}); the model is complete in {path}. "
                        "Log in with `hf auth login` and retry.") from None
