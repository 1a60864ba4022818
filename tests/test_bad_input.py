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
from pathlib import Path

import pytest

from repo_mlx import LoadError

from test_cli_flags import flag_name, kind, parsers, value_flags


def one_line_exit_2(module, argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    with pytest.raises(SystemExit) as e:
        module.main(argv)
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


# --- model folders ---------------------------------------------------------------


def test_corrupted_model_folders():
    """bench/fuzz_models.py in small: every fifth case, each class of fault kept."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    import fuzz_models

    rows = fuzz_models.run_cases(fuzz_models.cases()[::5], timeout=60)
    bad = [r for r in rows if r[1] not in ("clean", "ran")]
    assert len(rows) >= 95 and not bad, bad
    assert sum(r[1] == "clean" for r in rows) > 0.9 * len(rows)


def test_gguf_and_nan_are_named(fixture_path, tmp_path, capsys):
    import json

    from repo_mlx import LoadError, folder_checks, load, loader

    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(LoadError, match="is a GGUF file .* does not read"):
        load(str(tmp_path / "m.gguf"))
    model, _ = load(str(fixture_path))
    model.model.norm.weight[:] = float("nan")
    with pytest.warns(UserWarning, match="output is NaN or infinite"):
        assert not loader.warn_if_not_finite(model, fixture_path)
    config = json.loads((fixture_path / "config.json").read_text())
    for key, value in [("rope_theta", -1), ("rms_norm_eps", float("nan")), ("num_hidden_layers", 10**18),
                       ("pe_config", 5), ("hidden_size", True)]:
        with pytest.raises(LoadError, match=key):
            folder_checks.check_config({**config, key: value}, "config.json")


# --- Ctrl-C while a command starts ---------------------------------------------------


def blocked_reading_stdin(pid: int) -> bool:
    try:  # Linux; elsewhere give the command time to get there
        return "pipe_read" in Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        time.sleep(10)
        return True


@pytest.mark.parametrize("entry", ["-m repo_mlx.generate", "-m repo_mlx generate", "console script"])
def test_ctrl_c_while_the_command_runs_exits_130_quietly(entry):
    """Ctrl-C once the command runs (here: waiting for its prompt on stdin) is one line,
    exit status 130. Before that, while Python imports the command, Ctrl-C prints
    Python's traceback, as in mlx-lm: catching it there would need a guess from argv
    that the program is a repo_mlx command, which a library user's program is not."""
    script = Path(sys.executable).with_name("repo_mlx.generate")
    cmd = [str(script)] if entry == "console script" else [sys.executable, *entry.split()]
    assert entry != "console script" or script.exists(), f"{script} is missing: reinstall the package"
    p = subprocess.Popen([*cmd, "--model", "missing", "--prompt", "-"], stdin=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not blocked_reading_stdin(p.pid) and time.time() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == "interrupted\n", err


def test_library_users_keep_keyboard_interrupt():
    r = subprocess.run([sys.executable, "-c", "import signal, repo_mlx; print(signal.getsignal(signal.SIGINT).__name__)"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "default_int_handler", r.stderr


# --- the Hub out of reach ------------------------------------------------------------

HUB_INPUTS = {  # the commands that fetch data by Hub id, with that id
    "lora": ["--train", "--data", "owner/dataset", "--iters", "1"],
    "pretrain": ["--data", "owner/dataset", "--iters", "1"],
    "lm_eval": ["--tasks", "arc_easy"],
}


@pytest.mark.parametrize("name", HUB_INPUTS)
def test_unreachable_hub_fails_fast(name, fixture_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(f"repo_mlx.{name}")
    start = time.monotonic()
    err = one_line_exit_2(module, ["--model", str(fixture_path), *HUB_INPUTS[name]], capsys)
    assert "needs the Hugging Face Hub, which cannot be reached" in err
    assert time.monotonic() - start < 20


# --- sizes ----------------------------------------------------------------------------

SIZES = {  # a length each command accepts while parsing and cannot hold in memory
    "generate": ["-p", "hi", "--max-tokens", "2000000000"],
    "chat": ["--max-tokens", "2000000000"],
    "benchmark": ["--prompt-tokens", "2000000000"],
    "evaluate": ["--task", "niah_single", "--lengths", "2000000000"],
}


@pytest.mark.parametrize("name", SIZES)
def test_lengths_past_memory_are_refused(name, fixture_path, capsys):
    module = importlib.import_module(f"repo_mlx.{name}")
    argv = SIZES[name]
    err = one_line_exit_2(module, ["--model", str(fixture_path), *argv], capsys)
    # Past memory, or first past 4x the context (benchmark's prompt is processed before generation).
    assert argv[-2] in err and ("GiB of KV cache, more than this machine's" in err or "4 times the model's context" in err)


def test_generation_past_the_context_warns(fixture_path, tmp_path, capsys):
    import json
    import shutil

    short = tmp_path / "short"
    shutil.copytree(fixture_path, short, ignore=shutil.ignore_patterns("*.npz"))
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8}))
    module = importlib.import_module("repo_mlx.generate")
    with pytest.warns(UserWarning, match="run past the model's context of 8"):
        module.main(["--model", str(short), "-p", "hi", "-m", "10", "--verbose", "0"])


def test_outputs_are_written_whole_into_new_folders_and_errors_are_one_line(tmp_path):
    """The rule behind every output flag: a file is replaced whole (its folder made
    if needed), a folder only with --force, and a write that fails is a LoadError."""
    from repo_mlx.files import atomic_file, atomic_folder

    target = tmp_path / "new" / "deeper" / "out.json"
    with atomic_file(target) as tmp:
        tmp.write_text("one")
    with atomic_file(target) as tmp:
        tmp.write_text("two")
    assert target.read_text() == "two" and sorted(p.name for p in target.parent.iterdir()) == ["out.json"]
    (tmp_path / "folder").mkdir()
    with pytest.raises(LoadError, match="already exists; pass --force"):
        with atomic_folder(tmp_path / "folder", force=False):
            pass
    if Path("/proc/self").is_dir():
        with pytest.raises(LoadError, match=r"^Cannot write /proc/x/out"):
            with atomic_folder(Path("/proc/x/out"), force=False):
                pass


# --- outputs that are inputs, or not ours to replace ----------------------------------


def output_cases(model, tmp):
    """(command, argv) that name an input (or another output) as an output, or replace
    a folder repo_mlx did not write: one per command with outputs."""
    import mlx.core as mx

    notes, unrelated = tmp / "notes.txt", tmp / "unrelated"
    notes.write_text("a prompt")
    unrelated.mkdir(exist_ok=True)
    (unrelated / "mine.txt").write_text("keep")
    adapters = tmp / "adapters"  # whole, as the parser checks them
    adapters.mkdir(exist_ok=True)
    (adapters / "adapter_config.json").write_text("{}")
    mx.save_safetensors(str(adapters / "adapters.safetensors"), {"a": mx.zeros((1,))})
    return [
        ("positions", ["--model", model, "--prompt-file", notes, "--csv", notes]),
        ("positions", ["--model", model, "--prompt", "hi", "--csv", tmp / "a", "--json", tmp / "a"]),
        ("viewer", ["--model", model, "--prompt-file", notes, "--html", notes]),
        ("cache_prompt", ["--model", model, "--prompt", "hi", "--prompt-cache-file", model / "model.safetensors"]),
        ("evaluate", ["--model", model, "--task", "perplexity", "--data", notes, "--output", notes]),
        ("convert", ["--model", model, "--mlx-path", ".", "--force"]),
        ("convert", ["--model", model, "--mlx-path", unrelated, "--force"]),
        ("convert", ["--model", model, "--mlx-path", model.parent, "--force"]),
        ("fuse", ["--model", model, "--adapter-path", adapters, "--save-path", model, "--force"]),
        ("pretrain", ["--model", model, "--data", notes, "--save-path", tmp / "o", "--export-hf", tmp / "o"]),
        ("pretrain", ["--model", model, "--data", notes, "--save-path", tmp / "o", "--plot", notes]),
        ("pretrain", ["--model", model, "--data", notes, "--save-path", unrelated, "--force"]),
        ("lora", ["--model", model, "--train", "--data", tmp, "--adapter-path", unrelated]),
        ("lm_eval", ["--model", model, "--tasks", "x", "--output-dir", ".", "--include-path", "."]),
    ]


def snapshot(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_outputs_never_replace_inputs_or_foreign_folders(fixture_path, tmp_path, monkeypatch, capsys):
    """One rule over every command with outputs: refused in one line, nothing touched."""
    model = tmp_path / "models" / "m"
    shutil_copy = __import__("shutil").copytree
    shutil_copy(fixture_path, model, ignore=__import__("shutil").ignore_patterns("*.npz"))
    monkeypatch.chdir(tmp_path)
    cases = output_cases(model, tmp_path)
    assert {c for c, _ in cases} >= {n for n, p in parsers() if any(kind(a) in ("output_file", "output_dir") for a in value_flags(p))} - {"doctor"}
    for name, argv in cases:
        before = snapshot(tmp_path)
        err = one_line_exit_2(importlib.import_module(f"repo_mlx.{name}"), [str(a) for a in argv], capsys)
        assert any(w in err for w in ("an input of this run", "name the same place", "never replaces",
                                      "did not write", "not a lora run")), (name, err)
        assert snapshot(tmp_path) == before, name


# --- damaged adapters -----------------------------------------------------------------


def test_damaged_adapters_are_one_line_for_every_command(fixture_path, tmp_path, capsys):
    """A truncated adapters.safetensors, wherever --adapter-path is read."""
    import json

    import mlx.core as mx

    adapters = tmp_path / "adapters"
    adapters.mkdir()
    mx.save_safetensors(str(adapters / "adapters.safetensors"), {"x.lora_a": mx.zeros((64, 4))})
    raw = (adapters / "adapters.safetensors").read_bytes()
    (adapters / "adapters.safetensors").write_bytes(raw[: len(raw) // 2])
    (adapters / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 4, "lora_parameters": {"rank": 4, "scale": 1.0, "dropout": 0.0}, "position_module": "frozen"}))
    extra = {"generate": ["-p", "hi"], "cache_prompt": ["-p", "hi", "--prompt-cache-file", tmp_path / "c.safetensors"], "chat": [],
             "fuse": ["--save-path", tmp_path / "f"], "lm_eval": ["--tasks", "arc_easy"]}
    readers = [n for n, p in parsers() if "--adapter-path" in p._option_string_actions and n not in ("lora", "server")]
    assert set(readers) == set(extra)
    for name in readers:
        argv = ["--model", fixture_path, "--adapter-path", adapters, *extra[name]]
        err = one_line_exit_2(importlib.import_module(f"repo_mlx.{name}"), [str(a) for a in argv], capsys)
        assert "adapters.safetensors" in err and "truncated" in err, (name, err)
    from repo_mlx import LoadError, load

    with pytest.raises(LoadError, match="truncated"):  # the Python API's error, as documented
        load(str(fixture_path), adapter_path=str(adapters))


# --- training that diverges -----------------------------------------------------------


def test_a_diverging_run_stops_in_one_line_and_keeps_its_last_checkpoint(fixture_path, tmp_path, capsys):
    from finetune_helpers import make_data

    data = make_data(tmp_path / "data")
    lora = importlib.import_module("repo_mlx.lora")
    # Finite for its first steps at a normal rate, then a rate that blows up: resume with it.
    ok = ["--model", fixture_path, "--train", "--data", data, "--adapter-path", tmp_path / "a", "--batch-size", "2",
          "--steps-per-eval", "100", "--val-batches", "1", "--save-every", "2"]
    lora.main([str(a) for a in ok + ["--iters", "2"]])
    kept = (tmp_path / "a" / "adapters.safetensors").read_bytes()
    capsys.readouterr()
    argv = ok + ["--iters", "6", "--learning-rate", "1e30", "--resume-adapter-file", tmp_path / "a" / "adapters.safetensors"]
    with pytest.raises(SystemExit) as e:
        lora.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "training diverged" in err and "of step 2, is kept" in err, err
    assert (tmp_path / "a" / "adapters.safetensors").read_bytes() == kept
    pretrain = importlib.import_module("repo_mlx.pretrain")
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 400)
    argv = ["--model", fixture_path, "--data", text, "--save-path", tmp_path / "p", "--seq-len", "32", "--batch-size", "2",
            "--iters", "3", "--learning-rate", "1e30", "--dtype", "float32", "--steps-per-eval", "100"]
    with pytest.raises(SystemExit) as e:
        pretrain.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "training diverged" in err and err.count("\n") == 1, err
    # A new run that diverges before its first checkpoint leaves nothing (no NaN model, no folder).
    assert "no checkpoint was saved" in err and not (tmp_path / "p").exists() and not (tmp_path / "p.tokens").exists()
    argv = ok[:ok.index("--adapter-path")] + ["--adapter-path", tmp_path / "b", "--batch-size", "2", "--steps-per-eval", "100",
                                              "--iters", "3", "--learning-rate", "1e30"]
    with pytest.raises(SystemExit) as e:
        lora.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no checkpoint was saved" in err and not (tmp_path / "b").exists(), err


def test_one_context_warning_for_every_command_that_takes_a_prompt(fixture_path, tmp_path, capsys):
    """Past the context: the same warning from every command, counting what runs (the
    cached document included); past 4 contexts: refused."""
    import json
    import shutil
    import warnings

    short = tmp_path / "short"
    shutil.copytree(fixture_path, short, ignore=shutil.ignore_patterns("*.npz"))
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    words = "abcdefghij" * 2  # 20 tokens (a byte each): past 16, under 64
    runs = {
        "cache_prompt": ["-p", words, "--prompt-cache-file", tmp_path / "doc.safetensors"],
        "generate": ["--prompt-cache-file", tmp_path / "doc.safetensors", "-p", " and", "-m", "1", "--verbose", "False"],
        "positions": ["-p", words],
        "benchmark": ["-p", "20", "-g", "2", "-n", "1"],
        "viewer": ["-p", words, "--html", tmp_path / "v.html", "--max-tokens", "20"],  # it shows the context by default
    }
    for name, argv in runs.items():
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            importlib.import_module(f"repo_mlx.{name}").main([str(a) for a in ["--model", short, *argv]])
        said = [str(w.message) for w in seen if "context of 16" in str(w.message)]
        assert len(said) == 1 and "more than the model's context of 16" in said[0], (name, said)
    capsys.readouterr()
    err = one_line_exit_2(importlib.import_module("repo_mlx.positions"), ["--model", str(short), "-p", words * 4], capsys)
    assert "more than 4 times the model's context of 16" in err
