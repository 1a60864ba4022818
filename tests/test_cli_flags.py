"""Every command's flags refuse bad values while parsing, before any work.

The walker reads each command's parser (the console scripts pyproject.toml
declares, as ``repo_mlx.__main__.commands()`` reads them) and feeds every numeric, path and choice flag
values it must refuse: negative, zero, out of range, the wrong type, empty, a
file where a folder is expected and the reverse. Each must end the command
with exit status 2 and one line on stderr naming the flag, no traceback, and
nothing written. Which flags may be zero or negative is stated here, by hand,
not read from the code, so a check weakened in the code fails here.
"""

import argparse
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from repo_mlx import _cli
from repo_mlx.__main__ import commands

COMMANDS = commands()

ROOT = Path(__file__).parents[1]

# Flags for which 0 is a meaningful value (off, greedy, any port, first layer, ...).
ZERO_OK = {
    "--temp", "--top-p", "--top-k", "--min-p", "--seed", "--position-blend", "--port",
    "--num-shots", "--warmup", "--position-warmup", "--weight-decay", "--z-loss",
    "--repo-start-layer", "--val-share", "--grad-clip", "--quantized-kv-start",
    "--delay", "--xtc-probability", "--xtc-threshold", "--clear-cache-threshold", "--prompt-cache-bytes",
}
# Flags for which -1 means "all" (as in mlx-lm); other negatives are still refused.
MINUS_ONE_OK = {"--num-layers", "--val-batches", "--test-batches"}
# Fractions: above 1 is out of range.
FRACTIONS = {"--top-p", "--min-p", "--position-blend", "--val-share"}


def parsers():
    for name in COMMANDS:
        yield name, importlib.import_module(f"repo_mlx.{name}").build_parser()


def flag_name(action) -> str:
    return max(action.option_strings, key=len)


def value_flags(parser):
    """The flags that take a value (not --help, --version or on/off switches)."""
    for a in parser._actions:
        if a.option_strings and a.nargs != 0 and not isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            yield a


def kind(action):
    if action.choices is not None:
        return "choice"
    if getattr(action.type, "kind", None):
        return action.type.kind
    if action.type in (int, float, Path):
        return "unchecked"
    return None


def bad_values(action):
    """(what, value) pairs the flag must refuse; ``{file}``/``{dir}`` are filled in."""
    flag, k = flag_name(action), kind(action)
    if k == "choice":
        return [("not a choice", "not-a-choice"), ("empty", "")]
    if k == "unchecked" and action.type is not Path:  # bare int/float: fed all the same
        k = action.type.__name__
    if k in ("int", "float"):
        out = [("wrong type", "abc"), ("empty", "")]
        out.append(("negative", "-2" if flag in MINUS_ONE_OK else "-1"))
        if flag not in ZERO_OK:
            out.append(("zero", "0"))
        if k == "int":
            out.append(("fraction", "1.5"))
        else:
            out += [("not a number", "nan"), ("infinite", "inf")]
        hi = getattr(action.type, "hi", None)
        if flag in FRACTIONS:
            out.append(("above 1", "1.5"))
        elif hi is not None:
            out.append(("above the range", str(hi + 1)))
        return out
    if k == "text":  # bytes of argv that are not UTF-8 reach Python as lone surrogates
        return [("not UTF-8", "caf\udce9")]
    if k == "file":
        return [("a folder", "{dir}"), ("missing", "{dir}/missing"), ("empty", "")]
    if k == "dir":
        return [("a file", "{file}"), ("missing", "{dir}/missing"), ("empty", "")]
    # A place no one can write, even root (Linux): refused while parsing, not after the work;
    # and a name MLX's writer cannot take (not UTF-8): refused before the work, not by a crash after it.
    unwritable = [("not writable", "/proc/repo-mlx-out/x")] if Path("/proc/self").is_dir() else []
    unwritable.append(("a name not UTF-8", "{dir}/caf\udce9"))
    if k == "output_dir":
        return [("an existing file", "{file}"), ("under a file", "{file}/out"), ("empty", ""), *unwritable]
    if k == "output_file":
        return [("an existing folder", "{dir}"), ("under a file", "{file}/out"), ("empty", ""), *unwritable]
    if k == "size":
        return [("negative", "-1"), ("not a size", "lots")]
    if k == "json":
        return [("not JSON", "{{"), ("not an object", "[1]")]  # "{{" is "{" after format
    if k == "bool":
        return [("not a truth value", "perhaps")]
    return []


CASES = [
    pytest.param(name, flag_name(a), what, value, id=f"{name} {flag_name(a)} {what}")
    for name, parser in parsers()
    for a in value_flags(parser)
    for what, value in bad_values(a)
]


def test_case_count():
    # The walker covers every command; this number is in the report of issue 11.
    assert {c.values[0] for c in CASES} == set(COMMANDS)
    assert len(CASES) > 400


@pytest.mark.parametrize("name, flag, what, value", CASES)
def test_bad_value_is_one_line_exit_2(name, flag, what, value, tmp_path, monkeypatch, capsys):
    inputs = tmp_path / "inputs"
    (inputs / "dir").mkdir(parents=True)
    (inputs / "file").write_text("x")
    value = value.format(file=inputs / "file", dir=inputs / "dir")
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    module = importlib.import_module(f"repo_mlx.{name}")
    argv = [f"{flag}={value}"]  # "=" so that "-1" and "" are values
    with pytest.raises(SystemExit) as e:
        module.build_parser().parse_args(argv)
        # Not refused while parsing: main may still refuse it before any work. A
        # missing model (and data) makes sure no work starts, and its error does
        # not name the flag.
        parser = module.build_parser()
        for other in ("--model", "--data"):
            if other in parser._option_string_actions and other != flag:
                argv += [other, str(tmp_path / "missing")]
        module.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and flag in err, err
    assert "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before


def test_one_rule_for_outputs():
    """An existing output folder is replaced only with --force; output files are
    replaced whole (atomically). lm_eval --output-dir only adds result files."""
    for name, parser in parsers():
        folders = [flag_name(a) for a in value_flags(parser) if kind(a) == "output_dir"]
        if [f for f in folders if f != "--output-dir"]:
            assert "--force" in parser._option_string_actions, f"{name} replaces {folders} without --force"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_no_unchecked_numbers_or_paths(name):
    parser = importlib.import_module(f"repo_mlx.{name}").build_parser()
    bare = [flag_name(a) for a in value_flags(parser) if kind(a) == "unchecked"]
    assert not bare, f"{name}: flags typed int/float/Path without a range check: {bare}"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_explains_every_flag_and_version(name, capsys):
    parser = importlib.import_module(f"repo_mlx.{name}").build_parser()
    silent = [flag_name(a) for a in parser._actions if a.option_strings and not (a.help or "").strip()]
    assert not silent, f"{name}: flags without help: {silent}"
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"repo_mlx {_cli.version()}"


def test_commands_are_modules_and_console_scripts():
    """pyproject.toml is the one list: each console script is repo_mlx.<command>:main."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"repo_mlx": "repo_mlx.__main__:main", **{f"repo_mlx.{n}": f"repo_mlx.{n}:main" for n in COMMANDS}}
    assert len(COMMANDS) == 14
    for name in COMMANDS:
        module = importlib.import_module(f"repo_mlx.{name}")
        assert callable(module.build_parser) and callable(module.main) and callable(module.command)
    # No launcher reads its own name, runs modules by string or hides runpy's warnings.
    code = "\n".join(p.read_text() for p in (ROOT / "repo_mlx").rglob("*.py"))
    for trick in ("runpy", "orig_argv", "sys.argv[0]", "filterwarnings"):
        assert trick not in code, trick


def umbrella(*args, **kw):
    return subprocess.run([sys.executable, "-m", "repo_mlx", *args], capture_output=True, text=True, timeout=120, **kw)


def test_umbrella_runs_each_command(tmp_path, monkeypatch, capsys):
    """python -m repo_mlx <command>: a bad value through the umbrella for every command.

    In this process (a real process per command costs seconds of imports each),
    except the server, whose exit skips interpreter teardown; the umbrella
    itself runs as a real process for it.
    """
    from repo_mlx.__main__ import main

    (tmp_path / "file").write_text("x")
    monkeypatch.chdir(tmp_path)
    for name in COMMANDS:
        flag, value = next((c.values[1], c.values[3]) for c in CASES if c.values[0] == name and c.values[3])
        value = value.format(file=tmp_path / "file", dir=tmp_path)
        if name == "server":
            r = umbrella(name, f"{flag}={value}", cwd=tmp_path)
            code, out, err = r.returncode, r.stdout, r.stderr
        else:
            monkeypatch.setattr(sys, "argv", ["repo_mlx", name, f"{flag}={value}"])
            with pytest.raises(SystemExit) as e:
                main()
            (out, err), code = capsys.readouterr(), e.value.code
        assert code == 2 and out == "", (name, err)
        assert err.count("\n") == 1 and err.startswith(f"error: argument {flag}"), (name, err)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
    r = umbrella("--help")
    assert r.returncode == 0 and f"commands: {', '.join(COMMANDS)}" in r.stdout
    r = umbrella("nonsense")
    assert r.returncode == 2 and r.stderr.startswith("error: no command 'nonsense'") and r.stderr.count("\n") == 1
    assert umbrella("--version").stdout.strip() == f"repo_mlx {_cli.version()}"


@pytest.mark.parametrize("how", ["console script", "python -m"])
def test_commands_start_directly_without_warnings(fixture_path, how):
    """The console script repo_mlx.generate and python -m repo_mlx.generate run the command,
    with nothing on stderr (runpy warns when a package imported the module it runs)."""
    script = Path(sys.executable).with_name("repo_mlx.generate")
    assert script.exists(), f"{script} is missing: the README's install always writes it"
    start = [str(script)] if how == "console script" else [sys.executable, "-m", "repo_mlx.generate"]
    r = subprocess.run([*start, "--model", str(fixture_path), "-p", "hi", "-m", "3", "--verbose", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() and r.stderr == "", r.stderr


def test_api_names_stay_functions_after_the_commands_load():
    """generate and positions are commands and functions: importing the commands must
    not rebind the package's names."""
    r = subprocess.run([sys.executable, "-c",
                        "import importlib, repo_mlx\n"
                        "for n in ('generate', 'positions'): importlib.import_module(f'repo_mlx.{n}')\n"
                        "import repo_mlx.generate, repo_mlx.positions\n"
                        "print(callable(repo_mlx.generate), callable(repo_mlx.positions))"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["True", "True"], r.stderr
