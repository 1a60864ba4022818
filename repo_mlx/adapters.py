"""Which weights train when fine-tuning RePo, and loading the adapters. LoRA/DoRA layers
are mlx-lm's; this adds the position module's training mode (frozen, LoRA or full),
recorded in adapter_config.json so that stock mlx-lm rebuilds exactly the trained layers."""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

from .errors import LoadError, one_line
from .folder_checks import safetensors_header
from .rope import POSITION_WEIGHTS

POSITION_MODULE_CHOICES = ("frozen", "lora", "full")
POSITION_KEYS = tuple(f"self_attn.{name}" for name in POSITION_WEIGHTS)


def position_maps(layers):
    return [
        getattr(layer.self_attn, name)
        for layer in layers
        if layer.self_attn.repo
        for name in POSITION_WEIGHTS
    ]


def setup_trainable(
    model: nn.Module,
    fine_tune_type: str,
    num_layers: int,
    lora_parameters: Optional[dict],
    position_module: str = "frozen",
) -> Optional[dict]:
    """Freeze the model, then make trainable what the options ask for; ``position_module``
    ("frozen", "lora" or "full") decides the position module's weights in the tuned layers.
    Returns the LoRA parameters with the exact ``keys`` used, so stock mlx-lm rebuilds them."""
    if position_module not in POSITION_MODULE_CHOICES:
        raise LoadError(
            f"position_module must be one of {', '.join(POSITION_MODULE_CHOICES)}, "
            f"got {position_module!r}."
        )
    if num_layers > len(model.layers):
        raise LoadError(
            f"--num-layers {num_layers} is more than the model's {len(model.layers)} layers."
        )
    layers = model.layers[-max(num_layers, 0) :]
    lora_parameters = lora_parameters or {}
    model.freeze()
    if fine_tune_type == "full":
        if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            raise LoadError(
                "Full fine-tuning needs float weights but this model is quantized; "
                "use --fine-tune-type lora or dora (QLoRA), or convert without -q."
            )
        for layer in layers:
            layer.unfreeze()
        for m in position_maps(layers):
            if position_module != "full":
                m.freeze()
        if position_module != "lora":
            return None
        keys = set(POSITION_KEYS)
        use_dora = False
    elif fine_tune_type in ("lora", "dora"):
        keys = set(lora_parameters.get("keys") or [])
        if not keys:  # mlx-lm's default: every linear in the tuned layers
            keys = {
                k
                for layer in model.layers
                for k, m in layer.named_modules()
                if isinstance(m, (nn.Linear, nn.QuantizedLinear))
            }
        keys = keys - set(POSITION_KEYS)
        if position_module == "lora":
            keys |= set(POSITION_KEYS)
        use_dora = fine_tune_type == "dora"
    else:
        raise LoadError(
            f"fine_tune_type must be lora, dora or full, got {fine_tune_type!r}."
        )
    lora_parameters = {**lora_parameters, "keys": sorted(keys)}
    try:
        linear_to_lora_layers(model, num_layers, lora_parameters, use_dora=use_dora)
    except (KeyError, ValueError) as e:
        raise LoadError(f"Bad lora_parameters: {one_line(e)}") from None
    if position_module == "full":
        for m in position_maps(layers):
            m.unfreeze()
    return lora_parameters


def check_names(weights: dict, model: nn.Module, source) -> None:
    trainable = dict(tree_flatten(model.trainable_parameters()))
    unexpected = sorted(set(weights) - set(trainable))
    missing = sorted(set(trainable) - set(weights))
    wrong = [k for k in weights if k in trainable and weights[k].shape != trainable[k].shape]
    if unexpected or missing or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for what, names in (("unexpected", unexpected), ("missing", missing), ("wrong shape", wrong))
            if names
        )
        raise LoadError(
            f"{source} does not match the model and adapter settings ({detail}); "
            "was it trained on this model with the same --fine-tune-type, "
            "--num-layers and --position-module?"
        )


def load_adapters(model: nn.Module, adapter_path) -> nn.Module:
    """Apply the adapters in ``adapter_path`` (from repo_mlx.lora or mlx-lm), checked
    as model weights are: a damaged file is one LoadError naming it."""
    path = Path(adapter_path)
    config_file, weights_file = path / "adapter_config.json", path / "adapters.safetensors"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"Cannot read {config_file}: {one_line(e)}") from None
    if not isinstance(config, dict):
        raise LoadError(f"{config_file} must hold a JSON object.")
    if not weights_file.is_file():
        raise LoadError(f"{path} has no adapters.safetensors.")
    safetensors_header(weights_file)  # truncated or corrupt: a clear message, not MLX's
    try:
        if "position_module" not in config:  # written by stock mlx-lm
            return mlx_lm_load_adapters(model, str(path))
        setup_trainable(model, config.get("fine_tune_type", "lora"), config["num_layers"],
                        config.get("lora_parameters"), config["position_module"])
        weights = mx.load(str(weights_file))
    except KeyError as e:
        raise LoadError(f"{config_file} lacks {e}.") from None
    except (ValueError, TypeError, RuntimeError, AttributeError) as e:
        raise LoadError(f"Cannot apply the adapters in {path}: {one_line(e)}") from None
    check_names(weights, model, weights_file)
    model.load_weights(list(weights.items()), strict=False)
    return model


def fuse_layer(layer: nn.Module, dequantize: bool = False) -> nn.Module:
    """mlx-lm's ``fuse`` of one adapted layer in float32, rounded once (mlx-lm adds the
    delta in the weight's dtype: in bfloat16 that rounds the delta and then the sum)."""
    base = layer.linear
    dtype = (base.scales if isinstance(base, nn.QuantizedLinear) else base.weight).dtype
    layer.set_dtype(mx.float32)  # floating arrays only: packed 4-bit weights stay
    fused = layer.fuse(dequantize=dequantize)
    fused.set_dtype(dtype)
    return fused
