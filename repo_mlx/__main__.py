"""Every command under one name, as ``python -m mlx_lm``: ``python -m repo_mlx <command> ...``."""

import importlib
import sys
from importlib.metadata import entry_points

from . import _cli


def commands() -> list:
    """The command names, from the console scripts ``repo_mlx.<command>`` pyproject.toml declares."""
    scripts = entry_points(group="console_scripts")
    return sorted(ep.name.split(".", 1)[1] for ep in scripts if ep.value.startswith("repo_mlx.") and "." in ep.name)


def main() -> None:
    names = commands()
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(
            "usage: python -m repo_mlx <command> [flags]   (or repo_mlx.<command> [flags])\n\n"
            f"commands: {', '.join(names)}\n\n"
            "python -m repo_mlx <command> --help explains a command's flags.",
            file=sys.stdout if len(sys.argv) >= 2 else sys.stderr,
        )
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    if sys.argv[1] == "--version":
        print(f"repo_mlx {_cli.version()}")
        return
    if sys.argv[1] not in names:
        print(f"error: no command {sys.argv[1]!r}; commands: {', '.join(names)} (see python -m repo_mlx --help)", file=sys.stderr)
        sys.exit(2)
    importlib.import_module(f"repo_mlx.{sys.argv[1]}").main(sys.argv[2:])


if __name__ == "__main__":
    main()
