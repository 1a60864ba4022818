"""What every ``python -m repo_mlx.<command>`` shares."""

import sys
import warnings

from .errors import LoadError


def run(main, argv=None) -> None:
    """Run a command's main, turning known bad input into a one-line error."""
    warnings.formatwarning = lambda msg, cat, *args, **kw: f"[WARNING] {msg}\n"
    try:
        main(argv)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
