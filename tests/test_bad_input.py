"""Bad input of every class, walked over every command that takes it.

Each class (text that is not UTF-8, outputs, sizes, an unreachable Hub,
Ctrl-C) is found from the parsers, as in test_cli_flags, so a new command
gets the check for free: one line, exit status 2 (130 for Ctrl-C), no
traceback, nothing written, before any work.
"""

import importlib
import io
import signal
import subprocess
import sys
import time

import pytest

from repo_mlx import _cli
from repo_mlx.__main__ import COMMANDS

from test_cli_flags import flag_name, kind, parsers, value_flags


def one_line_exit_2(module, argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    with pytest.raises(SystemExit) as e:
        _cli.run(module.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


# --- text that is not UTF-8 ------------------------------------------------------

TEXT_COMMANDS = [name for name, p in parsers() if "--prompt-file" in p._option_string_actions]


def test_text_flags_are_checked():
    """Every prompt-like flag is typed text (the walker in test_cli_flags feeds it bytes)."""
    for name, parser in parsers():
        for a in value_flags(parser):
            if flag_name(a).endswith("prompt"):
                assert kind(a) == "text", f"{name} {flag_name(a)}"
    assert set(TEXT_COMMANDS) >= {"generate", "positions", "viewer", "cache_prompt"}


@pytest.mark.parametrize("name", TEXT_COMMANDS)
def test_latin1_file_and_stdin_are_refused(name, tmp_path, capsys, monkeypatch):
    module = importlib.import_module(f"repo_mlx.{name}")
    latin1 = tmp_path / "prompt.txt"
    latin1.write_bytes("café au lait".encode("latin-1"))
    monkeypatch.chdir(tmp_path)
    missing = ["--model", str(tmp_path / "missing")]  # no work can start
    out = {"cache_prompt": ["--prompt-cache-file", str(tmp_path / "c.safetensors")],
           "viewer": ["--html", str(tmp_path / "v.html")]}.get(name, [])
    err = one_line_exit_2(module, ["--prompt-file", str(latin1), *missing, *out], capsys)
    assert f"--prompt-file {latin1} is not UTF-8 text (byte 0xe9 at offset 3)" in err
    err = one_line_exit_2(module, ["--prompt", "-", *missing, *out], capsys, b"caf\xe9", monkeypatch)
    assert "stdin (--prompt -) is not UTF-8 text (byte 0xe9 at offset 3)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompt.txt"]


def test_chat_refuses_a_piped_line_that_is_not_utf8(fixture_path):
    r = subprocess.run(
        [sys.executable, "-m", "repo_mlx.chat", "--model", str(fixture_path), "-m", "2"],
        input=b"hello\ncaf\xe9\n", capture_output=True, timeout=120,
    )
    err = r.stderr.decode()
    assert r.returncode == 2 and err.strip().splitlines()[-1].startswith("error: stdin line 2 is not UTF-8"), err
    assert "Traceback" not in err
