"""A newcomer's first contact, with no network: the README's first screen runs as
written, and what needs the Hub says so in one line and names --model demo."""

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).parents[1] / "README.md").read_text()
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}


def quick_start():
    section = README[README.index("## Quick start"):README.index("\n## ", README.index("## Quick start") + 5)]
    shell = [line.split("  #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)
             for line in block.splitlines() if line.strip()]
    python = re.findall(r"```python\n(.*?)```", section, re.S)
    return shell, python


def test_the_first_screen_runs_offline(tmp_path):
    shell, python = quick_start()
    demo = [c for c in shell if "--model demo" in c]
    assert len(demo) >= 4 and demo == shell[: len(demo)]  # the demo comes first
    for command in demo:
        argv = [sys.executable if a == "python" else a for a in shlex.split(command)]
        if "repo_mlx.server" in command:  # it serves: started, seen ready, stopped
            p = subprocess.Popen(argv + ["--port", "0"], cwd=tmp_path, env=OFFLINE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            line = p.stdout.readline()
            p.send_signal(signal.SIGINT)
            p.wait(60)
            assert "Serving demo at http://127.0.0.1:" in line, p.stderr.read()
            continue
        r = subprocess.run(argv, cwd=tmp_path, env=OFFLINE, input="Who goes there?\nq\n", capture_output=True,
                           text=True, timeout=180)
        assert r.returncode == 0 and r.stdout.strip(), (command, r.stderr)
        assert "WARNING" not in r.stderr, (command, r.stderr)  # the demo fits the defaults
    (code,) = python
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=OFFLINE, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    # What needs the Hub: one line, naming the way to go on offline.
    for command in shell[len(demo):]:
        argv = [sys.executable if a == "python" else a for a in shlex.split(command)]
        r = subprocess.run(argv, cwd=tmp_path, env=OFFLINE, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--model demo" in r.stderr, (command, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_local_folder_named_demo_says_it_shadows_the_built_in(tmp_path, fixture_path):
    import shutil

    shutil.copytree(fixture_path, tmp_path / "demo", ignore=shutil.ignore_patterns("*.npz"))
    r = subprocess.run([sys.executable, "-m", "repo_mlx.generate", "--model", "demo", "-p", "hi", "-m", "2",
                        "--verbose", "False"], cwd=tmp_path, env=OFFLINE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "not the built-in demo model" in r.stderr, r.stderr


@pytest.mark.parametrize("argv", [["evaluate", "--task", "ruler", "--samples", "1"], ["server", "--port", "0"]])
def test_the_demo_fits_the_defaults(argv, tmp_path):
    """Defaults that are ours adapt to the demo's 256-token context."""
    cmd = [sys.executable, "-m", f"repo_mlx.{argv[0]}", "--model", "demo", *argv[1:]]
    if argv[0] == "server":
        p = subprocess.Popen(cmd, cwd=tmp_path, env=OFFLINE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = p.stdout.readline()
        p.send_signal(signal.SIGINT)
        p.wait(60)
        assert "Serving demo" in line
        return
    r = subprocess.run(cmd, cwd=tmp_path, env=OFFLINE, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "WARNING" not in r.stderr, r.stderr
    assert re.search(r"niah_single\s+256 ", r.stdout) and not re.search(r"1024 ", r.stdout), r.stdout
