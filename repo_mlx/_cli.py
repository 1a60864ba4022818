"""What every ``python -m repo_mlx.<command>`` shares."""

import sys
import types
import warnings


def run(main, argv=None) -> None:
    """Run a command's main, turning known bad input into a one-line error."""
    from .utils import LoadError

    warnings.formatwarning = lambda msg, cat, *args, **kw: f"[WARNING] {msg}\n"
    try:
        main(argv)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def callable_module(name: str, function) -> None:
    """Let module ``name`` be called like ``function``.

    ``repo_mlx.generate`` is both a function and the module behind
    ``python -m repo_mlx.generate``; importing the module rebinds the package
    attribute, and this keeps ``repo_mlx.generate(...)`` working either way.
    """

    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return function(*args, **kwargs)

    sys.modules[name].__class__ = CallableModule
