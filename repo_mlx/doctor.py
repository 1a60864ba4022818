"""Check repo_mlx on this machine: ``python -m repo_mlx.doctor [--model M]``.

The rotation, the kernels and the model against their references, the operations
of a decode step and the speed, as a Markdown report; what cannot run here is skipped.
"""

import argparse
import platform
import sys
from importlib.metadata import version
from types import SimpleNamespace

import mlx.core as mx

from . import _cli, kernel_checks as kc, rope
from .kernel_checks import Check
from .errors import LoadError
from .files import atomic_file
from .loader import architecture_name, load
from .speed import alternate, run_single


def environment() -> list:
    metal = mx.metal.is_available()
    info = mx.metal.device_info() if metal else {}
    return [
        ("repo_mlx", _cli.version()),
        ("mlx", mx.__version__),
        ("mlx-lm", version("mlx-lm")),
        ("numpy", version("numpy")),  # both required by repo_mlx
        ("python", platform.python_version()),
        ("machine", f"{platform.system()} {platform.release()} {platform.machine()}"),
        *([("macOS", platform.mac_ver()[0])] if platform.system() == "Darwin" else []),
        ("default device", str(mx.default_device())),
        ("Metal available", str(metal)),
        *([("GPU", f"{info.get('architecture', '?')}, "
                   f"{info.get('memory_size', 0) / 2**30:.0f} GiB")] if metal else []),  # fmt: skip
        ("kernel mode", rope.kernel_state()["mode"]),
        ("kernels", kc.kernel_status()),
        ("kernel source", str(rope.metal_source_path())),
    ]


def speed(model, tokens: int, prompt_tokens: int = 64, trials: int = 3) -> list:
    """Decode tokens/s: RePo with kernels on and off, and mlx-lm's plain model on the
    same weights (the position module and rotation are RePo's whole cost)."""
    if why := kc.kernels_unavailable():
        return [Check("speed", "skip", f"{why}: speed is measured on a Metal GPU only")]
    models = {
        "RePo, kernels on": (model, "on"),
        "RePo, kernels off": (model, "off"),
        f"{architecture_name(model)} (mlx-lm)": (kc.plain_twin(model), "off"),
    }
    prompt = mx.random.randint(0, model.args.vocab_size, (1, prompt_tokens), key=mx.random.key(0))
    # benchmark's timing: the first token ends the prefill, ``tokens`` more are decoded.
    settings = SimpleNamespace(generation_tokens=tokens + 1, prefill_step_size=2048, kv_bits=None, kv_group_size=64)

    def run(entry):
        m, mode = entry
        with kc.kernels(mode):
            return run_single(m, prompt, settings)

    medians, *_ = alternate(models, run, trials)
    on = medians["RePo, kernels on"][1]
    return [
        Check(f"speed: {name}", "info", f"{tps:.1f} decode tokens/s ({tps / on:.2f} x kernels on)")
        for name, (_, tps, _) in medians.items()
    ]


def operations(model, what: str) -> list:
    with mx.stream(mx.default_device()):
        ops = kc.decode_ops(model)
    detail = f"RePo layer {ops['repo']}, plain layer {ops['plain']} (views not counted)"
    return [Check(f"operations per decode token ({what})", "info", detail)]


def report(env: list, checks: list) -> str:
    counts = {s: sum(c.status == s for c in checks) for s in ("pass", "fail", "skip")}
    lines = ["## repo_mlx doctor report", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env]
    lines += ["", "| check | result | detail |", "|---|---|---|"]
    mark = {"pass": "pass", "fail": "**FAIL**", "skip": "skipped", "info": "measured"}
    lines += [f"| {c.name} | {mark[c.status]} | {c.detail} |" for c in checks]
    lines += ["", f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="python -m repo_mlx.doctor",
        description="Check the kernels and the model on this machine and print a "
        "Markdown report to paste into an issue (exit status 1 if a check fails).",
    )
    p.add_argument(
        "--model", default=None,
        help="A RePo model (folder or Hugging Face id) to count operations and time "
        "decoding on, e.g. the 1B; default: the official tiny checkpoint, whose "
        "timings are dominated by launch overhead.",
    )  # fmt: skip
    p.add_argument(
        "--fixture", type=_cli.existing_dir, default=kc.FIXTURE,
        help="The official tiny checkpoint with its reference.npz (default: the copy "
        "installed with repo_mlx).",
    )  # fmt: skip
    p.add_argument(
        "--tokens", type=_cli.positive_int, default=64,
        help="Decode tokens per timed run (default: 64).",
    )  # fmt: skip
    p.add_argument(
        "--output", type=_cli.output_file, default=None,
        help="Also write the report to this file.",
    )  # fmt: skip
    return p


def command(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.fixture != kc.FIXTURE and not (args.fixture / "reference.npz").is_file():
        raise LoadError(
            f"--fixture {args.fixture} has no reference.npz (the official outputs it is "
            "checked against); pass the folder that holds it, or leave --fixture out."
        )
    model = None
    if args.model is not None:  # bad input fails now, not after the checks
        model, _ = load(args.model)
    env = environment()
    for name, value in env:
        print(f"{name}: {value}", file=sys.stderr)
    steps = [
        ("pure rotation path vs float64 (CPU)", kc.check_pure_path),
        ("Metal kernels vs pure path and float64", kc.check_kernels),
        ("model vs official fixture", lambda: kc.check_model(fixture=args.fixture)),
    ]
    if mx.default_device() == mx.gpu:
        steps.append(("model vs official fixture on the CPU",
                      lambda: kc.check_model(mx.cpu, fixture=args.fixture)))  # fmt: skip
    if model is None and (args.fixture / "config.json").is_file():
        model, _ = load(str(args.fixture))
        what = "official tiny checkpoint"
    else:
        what = args.model
    if model is not None:
        steps.append(("operations per decode token", lambda: operations(model, what)))
        steps.append(("speed", lambda: speed(model, args.tokens)))
    else:
        why = "no model: the fixture was not found; pass --model"
        steps.append(("operations and speed", lambda: [Check("operations and speed", "skip", why)]))
    checks = []
    for i, (title, run) in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {title} ...", file=sys.stderr, flush=True)
        try:
            rows = run()
        except Exception as e:  # a crash of one check is its result; go on
            rows = [Check(title, "fail", rope.one_line_error(e))]
        for c in rows:
            print(f"    {c.status:5s} {c.name}: {c.detail}", file=sys.stderr)
        checks += rows
    text = report(env, checks)
    print("\nPaste this report into an issue:\n", file=sys.stderr)
    print(text, end="")
    if args.output is not None:
        with atomic_file(args.output) as tmp:
            tmp.write_text(text)
    if any(c.status == "fail" for c in checks):
        sys.exit(1)


def main(argv=None) -> None:
    _cli.run(command, argv)


if __name__ == "__main__":
    main()
