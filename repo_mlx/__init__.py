"""repo_mlx: RePo (context re-positioning) OLMo-2 models in MLX."""

import warnings

# As in mlx-lm, ``generate`` and ``positions`` are both functions of the API and
# commands; runpy warns that ``python -m repo_mlx.generate`` runs a module the
# package already imported, which is harmless here.
warnings.filterwarnings(
    "ignore", r"'repo_mlx\.\w+' found in sys\.modules", RuntimeWarning, "runpy"
)

from . import errors

# Started as a command, Ctrl-C during the imports below exits 130 in one line
# (no traceback); _cli.run hands SIGINT back to Python once the command runs.
errors.quiet_interrupt_while_starting()

from .errors import LoadError  # noqa: E402
from .generate import generate, stream_generate
from .positions import positions
from .rope import continuous_rope, continuous_rope_qk
from .utils import DEFAULT_MODEL, load, set_position_blend

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
