"""The one exception every command turns into a one-line error."""

import os
import signal
import sys


class LoadError(Exception):
    """A model folder, Hub id, file or option that cannot be used; the message says why."""


def one_line(e: Exception) -> str:
    """An exception's message on one line, cut to a readable length."""
    return " ".join(str(e).split())[:400]


def _started_as_command() -> bool:
    """``python -m repo_mlx[.X]`` or a ``repo_mlx[.X]`` console script; never a
    program that imports repo_mlx as a library."""
    argv, orig = sys.argv or [""], getattr(sys, "orig_argv", [])
    if argv[0] == "-m":  # python -m PACKAGE.X is importing PACKAGE
        return "-m" in orig[:-1] and orig[orig.index("-m") + 1].split(".")[0] == "repo_mlx"
    script = os.path.basename(argv[0]).removesuffix(".exe")
    return script == "repo_mlx" or (script.startswith("repo_mlx.") and not script.endswith(".py"))


def _interrupted(signum, frame):
    print("interrupted", file=sys.stderr)
    raise SystemExit(130)  # SystemExit ends the imports quietly; KeyboardInterrupt prints a traceback


def quiet_interrupt_while_starting() -> None:
    if _started_as_command() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)
