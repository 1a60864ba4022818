"""repo_mlx: RePo (context re-positioning) OLMo-2 models in MLX."""

from pathlib import Path

# The top-level convert/ and metal/ folders are the subpackages repo_mlx.convert
# and repo_mlx.metal: a wheel installs them so (pyproject.toml), and in a source
# checkout this makes them importable without an install.
_source = Path(__file__).resolve().parent.parent
if (_source / "pyproject.toml").is_file() and (_source / "convert" / "__init__.py").is_file():
    __path__.append(str(_source))

from .rope import continuous_rope, continuous_rope_qk
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
    "continuous_rope_qk",
    "generate",
    "load",
    "positions",
    "set_position_blend",
    "stream_generate",
]
