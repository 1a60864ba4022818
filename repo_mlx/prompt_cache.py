"""A document's KV cache in a file, for generate, server and cache_prompt.

mlx-lm's prompt-cache format (``save_prompt_cache``) with a record of the model
that made it: RePo layers cache keys already rotated by their learned positions,
so a cache is only valid for the same weights, adapters, dtype, YaRN settings and
position blend, and any other model is refused.
"""

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import List, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

from .errors import LoadError, one_line
from .files import atomic_file
from .folder_checks import safetensors_header

FORMAT = "repo_mlx prompt cache 1"
# Checked one by one for a clear message; the fingerprint covers everything else.
SETTINGS = ("rope_scaling", "position_blend", "dtype")
SAMPLES_PER_WEIGHT = 256


def model_settings(model) -> dict:
    """What a cache depends on besides the weights, as JSON-able values."""
    return {
        "rope_scaling": model.args.rope_scaling,
        "position_blend": float(model.args.position_blend),
        # The norms stay in the compute dtype when the linear layers are quantized.
        "dtype": str(model.model.norm.weight.dtype).replace("mlx.core.", ""),
    }


def fingerprint(model) -> str:
    """A short hash of the config and of evenly spaced values of every weight: not all 1B of
    them, enough to tell checkpoints, fine-tunes, adapters and quantizations apart in a split second."""
    config = dataclasses.asdict(model.args)
    for key in ("rope_scaling", "position_blend", "max_position_embeddings"):
        config.pop(key, None)  # YaRN and blend: checked by name, with a clearer message
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    samples = []
    for name, w in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        flat = w.reshape(-1)
        samples.append(flat[:: max(1, flat.size // SAMPLES_PER_WEIGHT)].astype(mx.float32))
        h.update(f"{name}{tuple(w.shape)}{w.dtype}".encode())
    mx.eval(samples)
    for s in samples:
        h.update(np.array(s).tobytes())
    return h.hexdigest()[:16]


def describe(key: str, value) -> str:
    if key == "rope_scaling":
        if not value:
            return "YaRN off"
        if value.get("rope_type", value.get("type")) == "yarn" and "factor" in value:
            return f"YaRN x{value['factor']:g}"
        return f"rope_scaling {json.dumps(value)}"
    if key == "position_blend":
        return f"--position-blend {value:g}"
    return value


def save(path: Path, model, tokens: List[int], cache, model_name: str, eos_token=None) -> None:
    """Write ``cache`` (``tokens`` processed) to ``path``, atomically; ``eos_token``
    ends the replies of runs that continue it (mlx-lm's --eos-token)."""
    metadata = {
        "format": FORMAT,
        "model": model_name,  # mlx_lm.generate reads these two keys
        "tokenizer_config": json.dumps({"eos_token": eos_token} if eos_token else {}),
        "fingerprint": fingerprint(model),
        "tokens": json.dumps(tokens),
        **{k: json.dumps(v) for k, v in model_settings(model).items()},
    }
    with atomic_file(path) as tmp:
        save_prompt_cache(str(tmp), cache, metadata)


def read(path) -> Tuple[list, dict]:
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"Prompt cache file {path} does not exist; make it with python -m repo_mlx.cache_prompt.")
    safetensors_header(path)  # a truncated file: a clear message, not MLX's
    try:
        cache, metadata = load_prompt_cache(str(path), return_metadata=True)
    except Exception as e:
        raise LoadError(f"{path} is not a prompt cache file ({one_line(e)}).") from None
    if metadata.get("format") != FORMAT:
        raise LoadError(
            f"{path} has no record of the RePo model it belongs to (made by mlx_lm.cache_prompt?); "
            "make it with python -m repo_mlx.cache_prompt."
        )
    return cache, metadata


def load_for(path, model, tokenizer=None) -> Tuple[list, List[int]]:
    """The cache in ``path`` and its tokens, refused unless ``model`` made it; its
    end-of-text token, if it records one, joins ``tokenizer``'s."""
    cache, metadata = read(path)
    now = model_settings(model)
    for key in SETTINGS:
        if (then := json.loads(metadata[key])) != now[key]:
            raise LoadError(
                f"{path} was made with {describe(key, then)} but this run uses {describe(key, now[key])}; "
                "use the same settings or make the cache again."
            )
    if metadata["fingerprint"] != fingerprint(model):
        raise LoadError(
            f"{path} was made for another model ({metadata['model']}, fingerprint "
            f"{metadata['fingerprint']}): the weights, adapters or config differ; make it again "
            "for this model with python -m repo_mlx.cache_prompt."
        )
    mx.eval([c.state for c in cache])
    if tokenizer is not None and (eos := json.loads(metadata.get("tokenizer_config", "{}")).get("eos_token")):
        tokenizer.add_eos_token(eos)
    return cache, json.loads(metadata["tokens"])


def prefill(model, tokens: List[int], prefill_step_size: int = 2048, progress=None, max_kv_size=None, **kv) -> list:
    """A KV cache holding all of ``tokens`` (the last ``max_kv_size``), filled by mlx-lm's
    generate_step; ``progress``: a new tqdm bar; ``kv``: its KV-cache quantization keywords."""
    cache = make_prompt_cache(model, max_kv_size)
    moved = None if progress is None else lambda n, total: progress.update(n - progress.n)
    # max_tokens=0 still runs the last prompt token, so the cache holds them all.
    for _ in generate_step(
        mx.array(tokens), model, max_tokens=0, prompt_cache=cache,
        prefill_step_size=prefill_step_size, prompt_progress_callback=moved, **kv,
    ):
        pass
    return cache
