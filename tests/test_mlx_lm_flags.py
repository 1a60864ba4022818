"""mlx-lm users' habits: every flag of mlx-lm 0.32's matching commands exists here
with the same name, type, default and meaning (or is refused in one line saying
why), read from mlx-lm's own parsers, so a new mlx-lm flag shows up as a failing
test; speculative decoding; chat's one-letter commands; lm_eval's --tasks."""

import argparse
import importlib
import json
import shutil
import subprocess
import sys
from unittest import mock

import mlx.core as mx
import pytest

import repo_mlx
import synthetic

OURS = {"generate": "mlx_lm.generate", "chat": "mlx_lm.chat", "server": "mlx_lm.server",
        "convert": "mlx_lm.convert", "fuse": "mlx_lm.fuse", "cache_prompt": "mlx_lm.cache_prompt",
        "benchmark": "mlx_lm.benchmark"}
# Where our default is not mlx-lm's, and why.
OUR_DEFAULTS = {
    "--model": "the released RePo model (mlx-lm's: its own example models or mlx_model); required where a model must be named",
    ("generate", "--prompt"): "a sentence a base model continues (RePo is a base model; mlx-lm's 'hello' suits chat models)",
    ("server", "--allowed-origins"): "no cross-origin browser access unless asked (mlx-lm: '*', any web page may drive the model)",
    ("server", "--max-tokens"): "512, or the model's context when it is shorter (the built-in demo's is 256)",
    ("server", "--kv-group-size"): "64, or the largest group size that divides a smaller head_dim",
    ("generate", "--kv-group-size"): "64, or the largest group size that divides a smaller head_dim",
    ("cache_prompt", "--kv-group-size"): "64, or the largest group size that divides a smaller head_dim",
    ("benchmark", "--generation-tokens"): "128 (mlx-lm: 1024): the default model is a random 1B, and a CPU takes minutes a trial at 1024",
    ("fuse", "--model"): "the base model adapter_config.json names",
}
# mlx-lm's flags that RePo cannot have: accepted, then refused in one line that says why.
REFUSED = {("generate", "--image"): "vision", ("fuse", "--export-gguf"): "GGUF", ("server", "--pipeline"): "one machine",
           ("chat", "--pipeline"): "one machine", ("benchmark", "--pipeline"): "one machine"}


def mlx_lm_parser(module: str) -> argparse.ArgumentParser:
    """mlx-lm's own parser: from its builder, or caught as its main() builds it."""
    m = importlib.import_module(module)
    for name in ("setup_arg_parser", "configure_parser"):
        if hasattr(m, name):
            return getattr(m, name)()
    caught = []

    def catch(self, *a, **kw):
        caught.append(self)
        raise SystemExit(0)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch), mock.patch.object(sys, "argv", ["x"]):
        with pytest.raises(SystemExit):
            m.main()
    return caught[0]


def sample(action):
    """A value mlx-lm's parser takes for this flag, as text."""
    if action.choices:
        return str(list(action.choices)[0])
    if action.default not in (None, ()) and not isinstance(action.default, bool):
        return action.default if isinstance(action.default, str) else json.dumps(action.default)
    return {int: "64", float: "0.25"}.get(action.type) or {"_parse_size": "2GB", "str2bool": "False"}.get(action.type.__name__, "x")


@pytest.mark.parametrize("name", OURS)
def test_every_mlx_lm_flag_exists_with_its_type_and_default(name):
    theirs = mlx_lm_parser(OURS[name])
    ours = importlib.import_module(f"repo_mlx.{name}").build_parser()
    for a in theirs._actions:
        if not a.option_strings or a.dest == "help":
            continue
        flag = max(a.option_strings, key=len)
        for option in a.option_strings:
            assert option in ours._option_string_actions, f"{name} lacks mlx-lm's {option}"
        o = ours._option_string_actions[flag]
        assert type(o).__name__ == type(a).__name__ and o.nargs == a.nargs, f"{name} {flag}: another kind of flag"
        if not (flag in OUR_DEFAULTS or (name, flag) in OUR_DEFAULTS):
            want = a.type(a.default) if isinstance(a.default, str) and callable(a.type) else a.default
            assert o.default == want or (not o.default and not want), f"{name} {flag}: default {o.default!r}, mlx-lm's {want!r}"
        # Values: the same number (or setting) from the same text; str flags may be checked paths here.
        if a.nargs is None and a.type not in (None, str) and (name, flag) not in REFUSED:
            value = sample(a)
            assert o.type(value) == a.type(value), f"{name} {flag}: {value!r} reads otherwise"


def test_refused_flags_say_why(capsys, tmp_path):
    from repo_mlx import benchmark, chat, fuse

    generate = importlib.import_module("repo_mlx.generate")  # the command, not the function
    # A well-formed adapter folder, so that fuse reaches the refusal (the folder is checked while parsing).
    (tmp_path / "adapter_config.json").write_text("{}")
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), {"a": mx.zeros((1,))})
    cases = {generate: ["--model", "demo", "--image", "x.png"], fuse: ["--adapter-path", str(tmp_path), "--export-gguf"],
             chat: ["--model", "demo", "--pipeline"], benchmark: ["--shape", "tiny", "--pipeline"]}
    for module, argv in cases.items():
        with pytest.raises(SystemExit) as e:
            module.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and ("not supported" in err or "text only" in err), err
    r = subprocess.run([sys.executable, "-m", "repo_mlx.server", "--model", "demo", "--pipeline"], capture_output=True, text=True)
    assert r.returncode == 2 and "one machine" in r.stderr and r.stderr.count("\n") == 1


def test_speculative_decoding_keeps_greedy_output(fixture_path, tmp_path):
    """A plain OLMo-2 with the fixture's tokenizer drafts for the RePo model: greedy
    output is token for token the same, through the API and the command; and so with
    a draft that guesses right (the model itself), whose tokens are taken."""
    draft_dir = synthetic.write_checkpoint(tmp_path / "draft", synthetic.config(repo=False, num_hidden_layers=1), seed=3)
    for f in fixture_path.glob("tokenizer*"):
        shutil.copy(f, draft_dir / f.name)
    model, tokenizer = repo_mlx.load(str(fixture_path))
    with pytest.warns(UserWarning, match="plain OLMo-2"):
        draft, _ = repo_mlx.load(str(draft_dir))
    prompt = tokenizer.encode("Hello world, here we go")
    plain = [r.token for r in repo_mlx.stream_generate(model, tokenizer, prompt, max_tokens=16)]
    drafted = list(repo_mlx.stream_generate(model, tokenizer, prompt, max_tokens=16, draft_model=draft, num_draft_tokens=3))
    assert [r.token for r in drafted] == plain
    itself = list(repo_mlx.stream_generate(model, tokenizer, prompt, max_tokens=16, draft_model=model, num_draft_tokens=3))
    assert [r.token for r in itself] == plain and sum(r.from_draft for r in itself) >= 8
    run = lambda *extra: subprocess.run(
        [sys.executable, "-m", "repo_mlx.generate", "--model", str(fixture_path), "-p", "Hello world", "-m", "12",
         "--verbose", "False", *extra], capture_output=True, text=True, timeout=120)
    a, b = run(), run("--draft-model", str(draft_dir), "--num-draft-tokens", "2")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout, b.stderr


def test_chat_takes_mlx_lm_s_one_letter_commands(fixture_path):
    """q, r and h are commands, as in mlx_lm.chat (and /exit, /reset, /help still work)."""
    script = "hello\nr\nhello\nh\nq\nnever sent\n"
    r = subprocess.run([sys.executable, "-m", "repo_mlx.chat", "--model", str(fixture_path), "-m", "6"],
                       input=script, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    replies = r.stdout.strip().splitlines()
    assert len(replies) == 2 and replies[0] == replies[1]  # r reset: the same first turn again
    assert "starts a new conversation" in r.stderr  # h printed the help


def test_lm_eval_tasks_as_mlx_lm_evaluate_takes_them():
    from repo_mlx import lm_eval

    p = lm_eval.build_parser()
    assert p.parse_args(["--tasks", "a", "b,c"]).tasks == ["a", "b,c"]  # spaces (mlx-lm) and commas


@pytest.mark.parametrize("argv, hint", [
    (["evaluate", "--tasks", "arc_easy"], "python -m repo_mlx.lm_eval"),
    (["lm_eval", "--tasks", "arc_easy", "--lengths", "1K"], "python -m repo_mlx.evaluate"),
    (["lm_eval", "--tasks", "ruler"], "python -m repo_mlx.evaluate"),
])
def test_a_namesake_command_s_flags_point_to_the_right_command(argv, hint, capsys):
    module = importlib.import_module(f"repo_mlx.{argv[0]}")
    with pytest.raises(SystemExit) as e:
        module.main(["--model", "demo", *argv[1:]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and hint in err, err


def test_generate_verbose_takes_true_and_false(fixture_path):
    p = importlib.import_module("repo_mlx.generate").build_parser()
    assert [p.parse_args(["--verbose", v]).verbose for v in ("True", "False", "1", "0")] == [True, False, True, False]
