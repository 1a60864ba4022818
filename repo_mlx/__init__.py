"""repo_mlx: RePo (context re-positioning) OLMo-2 models in MLX."""

from .rope import continuous_rope
from .utils import (
    DEFAULT_MODEL,
    LoadError,
    generate,
    load,
    positions,
    set_position_blend,
    stream_generate,
)

__version__ = "0.1.0"


__all__ = [
    "DEFAULT_MODEL",
    "LoadError",
    "continuous_rope",
    "generate",
    "load",
    "positions",
    "set_position_blend",
    "stream_generate",
]
