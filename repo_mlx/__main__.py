"""Every command under one name, as ``python -m mlx_lm``: ``python -m repo_mlx <command> ...``.

The console scripts (``repo_mlx.generate``, ...) all start ``main`` here,
which reads the command from the script's name.
"""

import runpy
import sys
from pathlib import Path

from . import _cli

# The commands: each is the module repo_mlx.<name>, with build_parser() and main(argv).
COMMANDS = {
    "generate": "generate text from a prompt",
    "chat": "chat in the terminal, keeping the KV cache between turns",
    "server": "OpenAI-compatible HTTP server",
    "convert": "convert an official checkpoint to MLX, float or quantized",
    "lora": "fine-tune: LoRA, QLoRA, DoRA or full",
    "fuse": "fuse adapters into a standalone model",
    "pretrain": "continual pre-training of an OLMo-2 model into RePo",
    "evaluate": "perplexity and synthetic long-context tasks",
    "lm_eval": "standard benchmarks through lm-evaluation-harness",
    "cache_prompt": "save a long document's KV cache to a file",
    "positions": "the positions RePo assigns to each token: summary, CSV, JSON, plot",
    "viewer": "explore positions in the browser",
    "benchmark": "speed and memory of this machine",
    "doctor": "check the installation on this machine",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return (
        "usage: python -m repo_mlx <command> [flags]   (or repo_mlx.<command> [flags])\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n"
        "python -m repo_mlx <command> --help explains a command's flags."
    )


def main() -> None:
    script = Path(sys.argv[0]).name.removesuffix(".exe")
    if script.startswith("repo_mlx.") and script[len("repo_mlx."):] in COMMANDS:
        name, argv = script[len("repo_mlx."):], sys.argv[1:]  # a console script
    else:
        if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
            print(usage(), file=sys.stdout if len(sys.argv) >= 2 else sys.stderr)
            sys.exit(0 if len(sys.argv) >= 2 else 2)
        if sys.argv[1] == "--version":
            print(f"repo_mlx {_cli.version()}")
            return
        name, argv = sys.argv[1], sys.argv[2:]
        if name not in COMMANDS:
            print(f"error: no command {name!r}; commands: {', '.join(COMMANDS)} (see python -m repo_mlx --help)", file=sys.stderr)
            sys.exit(2)
    # Exactly as ``python -m repo_mlx.<name>``: the module's own __main__ block runs.
    sys.argv = [f"python -m repo_mlx {name}", *argv]
    runpy.run_module(f"repo_mlx.{name}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
