"""What every ``python -m repo_mlx.<command>`` shares. The types below check a value
while parsing, before any work; they carry what they accept (``kind``, ``lo``, ``hi``)
so the tests can derive the values they must refuse.
"""

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import warnings
from pathlib import Path

import yaml

from .errors import LoadError, one_line
from .files import check_outputs
from .folder_checks import safetensors_header
from .loader import DEFAULT_MODEL, DTYPES, is_hub_id, load, yarn_scaling


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as _version

    try:
        return _version("repo-mlx")
    except PackageNotFoundError:  # a source tree that is not installed
        return "unknown"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2; argparse's own adds a usage block) and ``--version``.
    ``elsewhere`` maps flags of a namesake command (mlx-lm's evaluate is our lm_eval) to a pointer."""

    def __init__(self, *args, elsewhere=None, **kwargs):
        self.elsewhere = elsewhere or {}
        super().__init__(*args, **kwargs)
        if kwargs.get("add_help", True) and "--version" not in self._option_string_actions:
            self.add_argument(
                "--version", action="version", version=f"repo_mlx {version()}",
                help="Print the repo_mlx version and exit.",
            )

    def parse_args(self, args=None, namespace=None):
        for flag in (str(a).split("=")[0] for a in (sys.argv[1:] if args is None else args)):
            if flag in self.elsewhere:
                self.error(f"{flag} is not a flag of {self.prog}: {self.elsewhere[flag]}")
        namespace = super().parse_args(args, namespace)
        outputs, inputs, replaced = paths(self, namespace)
        try:
            check_outputs(outputs, inputs, getattr(namespace, "force", False), replaced)
        except LoadError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        return namespace

    def error(self, message: str):
        print(f"error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


# Flags whose value, where it is a local path, the command reads.
INPUT_FLAGS = ("model", "hf_path", "data", "val_data", "draft_model", "reference_model_path")


def paths(parser, namespace):
    """(outputs, inputs, replaced folders) of a parsed command line, by flag."""
    outputs, inputs, replaced = {}, {}, set()
    for a in parser._actions:
        if not a.option_strings or getattr(namespace, a.dest, None) is None:
            continue
        flag, kind, value = max(a.option_strings, key=len), getattr(a.type, "kind", None), getattr(namespace, a.dest)
        if kind in ("output_file", "output_dir"):
            outputs[flag] = value
            if getattr(a.type, "replaced", False):
                replaced.add(flag)
        elif kind in ("file", "dir") or a.dest in INPUT_FLAGS:
            for i, v in enumerate(value if isinstance(value, list) else [value]):
                inputs[flag if not i else f"{flag} ({i + 1})"] = v
    return outputs, inputs, replaced


def add_trust_remote_code(p) -> None:
    p.add_argument(
        "--trust-remote-code", action="store_true",
        help="Accepted as in mlx-lm, and has no effect: repo_mlx carries the RePo model "
        "code and the OLMo-2 tokenizer needs none, so nothing from the model folder is run.",
    )


def _typed(fn, kind: str, lo=None, hi=None, **extra):
    fn.kind, fn.lo, fn.hi = kind, lo, hi
    for k, v in extra.items():
        setattr(fn, k, v)
    return fn


def int_range(lo=None, hi=None):
    """An integer in [lo, hi] (either end may be open: None)."""
    want = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(lo, f"an integer >= {lo}")
    if hi is not None:
        want = f"an integer from {lo} to {hi}" if lo is not None else f"an integer <= {hi}"

    def parse(s: str) -> int:
        try:
            v = int(s.strip(), 10)
        except (ValueError, AttributeError):
            raise argparse.ArgumentTypeError(f"must be {want}, got {s!r}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {want}, got {v}")
        return v

    parse.__name__ = want  # argparse names the type in some messages
    return _typed(parse, "int", lo, hi)


def float_range(lo=None, hi=None, lo_open=False, hi_open=False):
    """A finite float in [lo, hi]; ``lo_open``/``hi_open`` exclude that end."""
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    want = "a number" + (" " + " and ".join(parts) if parts else "")
    if lo is not None and hi is not None and not (lo_open or hi_open):
        want = f"a number from {lo:g} to {hi:g}"

    def parse(s: str) -> float:
        try:
            v = float(s)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"must be {want}, got {s!r}") from None
        bad = not math.isfinite(v)
        bad |= lo is not None and (v <= lo if lo_open else v < lo)
        bad |= hi is not None and (v >= hi if hi_open else v > hi)
        if bad:
            raise argparse.ArgumentTypeError(f"must be {want}, got {s}")
        return v

    parse.__name__ = want
    return _typed(parse, "float", lo, hi, lo_open=lo_open, hi_open=hi_open)


def _all_or_positive(s: str) -> int:
    try:
        v = int(s.strip(), 10)
    except (ValueError, AttributeError):
        v = None
    if v is None or not (v == -1 or v >= 1):
        raise argparse.ArgumentTypeError(f"must be a positive integer or -1 for all, got {s!r}")
    return v


# Counts where -1 means "all" (mlx-lm's --num-layers, --val-batches, --test-batches).
all_or_positive = _typed(_all_or_positive, "int", -1, None, excluded=(0,))
positive_int = int_range(1)
non_negative_int = int_range(0)
# A count of tokens: MLX sizes and positions are int32; check_tokens_fit bounds it by memory.
MAX_TOKENS = 2**31 - 1
token_count = int_range(1, MAX_TOKENS)
positive_float = float_range(0, lo_open=True)
non_negative_float = float_range(0)
probability = float_range(0, 1)
# numpy's seed takes 32 bits; mlx-lm and our commands seed both.
seed = int_range(0, 2**32 - 1)


def _byte_size(s: str) -> int:
    # mlx-lm's units: a number with M, G, MB or GB (decimal), or bytes.
    units = {"": 1, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}
    number = s.strip().rstrip("MGBmgb")
    try:
        v = int(float(number) * units[s.strip()[len(number):].upper()])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"must be a size like 500MB or 2GB, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a size like 500MB or 2GB, got {s!r}")
    return v


def _layer_ids(s: str) -> str:
    # pretrain --repo-layer-ids: comma-separated layer indices; the model bounds them.
    if not all(p.strip().isdecimal() for p in s.split(",")):
        raise argparse.ArgumentTypeError(f"must be comma-separated layer numbers like 5,6,7, got {s!r}")
    return ",".join(str(int(p)) for p in s.split(","))


layer_ids = _typed(_layer_ids, "text")


def _json_object(s: str) -> dict:
    try:
        v = json.loads(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"is not valid JSON ({e})") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {s!r}")
    return v


def _boolean(s: str) -> bool:
    # mlx-lm's --verbose takes True/False; 1/0 and yes/no too.
    v = {"true": True, "t": True, "1": True, "yes": True, "false": False, "f": False, "0": False, "no": False}.get(s.strip().lower())
    if v is None:
        raise argparse.ArgumentTypeError(f"must be True or False, got {s!r}")
    return v


boolean = _typed(_boolean, "bool")
byte_size = _typed(_byte_size, "size")
json_object = _typed(_json_object, "json")


def _path_check(kind: str, check):
    def parse(s: str) -> Path:
        if not s.strip():
            raise argparse.ArgumentTypeError("must be a path, got ''")
        _text(s)  # MLX writes and reads UTF-8 names only: a rename beats a crash after the work
        p = Path(s).expanduser()
        problem = check(p)
        if problem:
            raise argparse.ArgumentTypeError(f"{s}: {problem}")
        return p

    parse.__name__ = kind.replace("_", " ")
    return _typed(parse, kind)


def _file(p: Path):
    if p.is_dir():
        return "is a folder, not a file"
    if not p.is_file():
        return "no such file"


def _dir(p: Path):
    if p.exists() and not p.is_dir():
        return "is a file, not a folder"
    if not p.is_dir():
        return "no such folder"


def _out(want_dir: bool):
    def check(p: Path):
        if want_dir and p.exists() and not p.is_dir():
            return "exists and is not a folder"
        if not want_dir and p.is_dir():
            return "is a folder; give a file name"
        base = p.parent.absolute()
        while not base.exists() and base != base.parent:
            base = base.parent
        if not base.is_dir():
            return f"cannot be created: {base} is a file, not a folder"
        try:  # the one sure test that it can be written, before any work
            fd, probe = tempfile.mkstemp(dir=base, prefix=".repo_mlx-probe-")
        except OSError as e:
            return f"cannot be created: {base} is not writable ({e.strerror})"
        os.close(fd)
        os.unlink(probe)

    return check


def _adapters(p: Path):
    # Checked as model weights are, while parsing: a damaged folder fails before any work.
    if problem := _dir(p):
        return problem
    try:
        config = json.loads((p / "adapter_config.json").read_text())
        if not isinstance(config, dict):
            return "adapter_config.json does not hold a JSON object"
        if not (p / "adapters.safetensors").is_file():
            return "no adapters.safetensors there"
        safetensors_header(p / "adapters.safetensors")
    except FileNotFoundError:
        return "no adapter_config.json there; is it a folder of adapters from repo_mlx.lora?"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"adapter_config.json is unreadable ({one_line(e)})"
    except LoadError as e:
        return one_line(e)


existing_file = _path_check("file", _file)
existing_dir = _path_check("dir", _dir)
adapter_dir = _path_check("dir", _adapters)
output_dir = _path_check("output_dir", _out(True))
new_folder = _typed(_path_check("output_dir", _out(True)), "output_dir", replaced=True)  # replaced whole: --force rules
output_file = _path_check("output_file", _out(False))


def add_model_flags(p, yarn: bool = False, adapter: bool = True, required: bool = False) -> None:
    """--model, --dtype and, where the command takes them, --yarn and --adapter-path."""
    p.add_argument(
        "--model",
        required=required,
        default=None if required else DEFAULT_MODEL,
        help="Model folder (official Hugging Face or converted) or Hub id, downloaded on first use"
        + ("." if required else f" (default: {DEFAULT_MODEL})."),
    )
    p.add_argument("--dtype", choices=DTYPES, default=None, help="Compute dtype (default: the checkpoint's).")
    if yarn:
        p.add_argument(
            "--yarn", type=float_range(1, 4096), default=None,
            help="YaRN factor over 4096 tokens for every layer, the RePo layers included, as the "
            "paper did, for texts past 4K: 2 for 8K, 4 for 16K; at most 4096, a context of 2^24 tokens, "
            "where float32 positions stop being exact (default: off).",
        )  # fmt: skip
    if adapter:
        p.add_argument(
            "--adapter-path", type=adapter_dir, default=None,
            help="Folder of LoRA/DoRA adapters to apply (from repo_mlx.lora).",
        )  # fmt: skip


def load_from_args(args, **model_config):
    """``load`` with the flags of ``add_model_flags`` and mlx-lm's chat-template flags."""
    if getattr(args, "yarn", None) is not None:
        model_config.update(yarn_scaling(args.yarn))
    template = getattr(args, "chat_template", None)
    model, tokenizer = load(
        args.model,
        dtype=args.dtype,
        adapter_path=getattr(args, "adapter_path", None),
        model_config=model_config or None,
        tokenizer_config={"chat_template": template} if template else None,
    )
    if getattr(args, "use_default_chat_template", False) and tokenizer.chat_template is None:
        tokenizer.chat_template = tokenizer.default_chat_template
    return model, tokenizer


def add_blends_flag(p) -> None:
    p.add_argument(
        "--position-blend", default="0",
        help="Comma-separated blends run side by side: 0 = learned positions, 1 = plain RoPE "
        "in every layer; '0,1' compares the two (default: 0).",
    )  # fmt: skip


def parse_blends(text: str):
    try:
        blends = [float(b) for b in text.split(",")]
    except ValueError:
        raise LoadError(f"--position-blend {text!r} must be numbers in [0, 1], e.g. 0,1.") from None
    if not all(0.0 <= b <= 1.0 for b in blends):
        raise LoadError(f"--position-blend values must be in [0, 1], got {text}.")
    return list(dict.fromkeys(blends))


def blend_name(blend: float) -> str:
    """A results column: what a position blend makes of the model."""
    return {0.0: "RePo (blend 0)", 1.0: "RoPE (blend 1)"}.get(blend, f"blend {blend:g}")


def add_prompt_flags(p, what: str = "the prompt", required: bool = False, default=None) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    note = f" (default: {default!r})" if default is not None else ""
    src.add_argument("--prompt", "-p", type=text, default=None, help=f"Text of {what}; '-' reads stdin{note}.")
    src.add_argument("--prompt-file", type=existing_file, help=f"Read {what} from this file.")


def read_prompt(args, default=None) -> str:
    if args.prompt_file is not None:
        return read_text(args.prompt_file, f"--prompt-file {args.prompt_file}")
    if args.prompt == "-":
        return decode(sys.stdin.buffer.read(), "stdin (--prompt -)")
    return args.prompt if args.prompt is not None else default


# Text inputs (arguments, files, stdin, chat lines) are UTF-8; anything else is
# refused in one line naming the input and the first bad byte, before any work.
def decode(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LoadError(
            f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it to UTF-8, e.g. with iconv -f latin1 -t utf-8."
        ) from None


def read_text(path, what: str) -> str:
    try:
        with open(path, "rb") as f:
            return decode(f.read(), what)
    except OSError as e:
        raise LoadError(f"Cannot read {what}: {e.strerror or e}.") from None


def _text(s: str) -> str:
    # Python hands bytes of argv that are not UTF-8 over as lone surrogates.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(s[e.start]) - 0xDC00 if 0xDC80 <= ord(s[e.start]) <= 0xDCFF else None
        at = f"byte 0x{byte:02x} " if byte is not None else ""
        raise argparse.ArgumentTypeError(f"is not UTF-8 text ({at}at character {e.start})") from None
    return s


text = _typed(_text, "text")


def read_config(path, parser, known) -> dict:
    """A ``-c`` YAML file's options, each value checked by its flag's own type."""
    from mlx_lm.lora import yaml_loader  # mlx-lm's: reads 1e-5 as a number

    try:
        with open(path) as f:
            config = yaml.load(f, yaml_loader)
    except OSError as e:
        raise LoadError(f"Cannot read config {path}: {e.strerror}.") from None
    except yaml.YAMLError as e:
        raise LoadError(f"{path} is not valid YAML: {one_line(e)}") from None
    if not isinstance(config, dict):
        raise LoadError(f"{path} must hold a mapping of option names to values.")
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise LoadError(f"{path}: unknown options {', '.join(unknown)} (names are the flags' with underscores; see --help).")
    types = {a.dest: a.type for a in parser._actions if callable(a.type)}
    for k, v in config.items():
        if k in types and v is not None and not isinstance(v, (list, dict, bool)):
            try:
                v = types[k](str(v))
            except (argparse.ArgumentTypeError, ValueError) as e:
                raise LoadError(f"{path}: {k} {e}.") from None
            config[k] = str(v) if isinstance(v, Path) else v  # checked; kept as written
    return config


def run(main, argv=None) -> None:
    """Run a command's main, turning known bad input into a one-line error."""
    warnings.formatwarning = lambda msg, cat, *args, **kw: f"[WARNING] {msg}\n"
    # A kill runs the same cleanup as an error: no half-written output is left.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main(argv)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def hub_repo(s: str) -> str:
    """--upload-repo: a Hub repo id, checked while parsing (before any work)."""
    if not is_hub_id(s):
        raise argparse.ArgumentTypeError(f"must be a Hub repo id like owner/name, got {s!r}")
    return s


hub_repo.kind = "text"
