"""repo_mlx: RePo (context re-positioning) models in MLX: OLMo-2, Llama and Qwen3."""

# ``generate`` and ``positions`` are functions here and commands (packages, so that
# ``python -m`` runs their __main__). The commands load first: importing a package
# later would rebind its name here from the function to the package.
from . import generate, positions  # noqa: F401
from .errors import LoadError
from .generation import generate, stream_generate
from .loader import DEFAULT_MODEL, load, yarn_scaling
from .rope import continuous_rope, continuous_rope_qk, positions, set_position_blend

__version__ = "0.1.0"


__all__ = ["DEFAULT_MODEL", "LoadError", "continuous_rope", "continuous_rope_qk", "generate", "load", "positions",
           "set_position_blend", "stream_generate", "yarn_scaling"]
