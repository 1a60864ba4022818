"""``python -m repo_mlx.generate`` as a user runs it."""

import shutil
import subprocess
import sys
import types

import pytest

import repo_mlx
from repo_mlx import LoadError, _cli
import synthetic
from repo_mlx.generate import main as generate_main
from mlx_lm.sample_utils import make_sampler


def generate(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "repo_mlx.generate", *args],
        capture_output=True,
        text=True,
        input=stdin,
    )


def test_streams_text_then_speed_and_memory(fixture_path, tiny):
    r = generate("--model", str(fixture_path), "--prompt", "hello world", "-m", "10")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    parts = r.stdout.split("==========\n")
    assert len(parts) == 3 and parts[0] == ""
    model, tokenizer = tiny
    expected = repo_mlx.generate(model, tokenizer, "hello world", max_tokens=10)
    assert parts[1] == expected + "\n"
    tail = parts[2].splitlines()
    assert tail[0].startswith(f"Prompt: {len(tokenizer.encode('hello world'))} tokens, ") and tail[0].endswith("tokens-per-sec")
    assert tail[1].startswith("Generation: 10 tokens, ")
    assert tail[2].startswith("Peak memory: ") and tail[2].endswith(" GB")


def test_prompt_file_stdin_and_quiet(fixture_path, tmp_path, tiny):
    (tmp_path / "p.txt").write_text("a prompt from a file")
    model, tokenizer = tiny
    expected = repo_mlx.generate(model, tokenizer, "a prompt from a file", max_tokens=6)
    r = generate("--model", str(fixture_path), "--prompt-file", str(tmp_path / "p.txt"), "-m", "6", "--verbose", "0")
    assert r.stdout == expected + "\n"
    r = generate("--model", str(fixture_path), "--prompt", "-", "-m", "6", "--verbose", "0", stdin="a prompt from a file")
    assert r.stdout == expected + "\n"


def test_sampling_flags_and_seed(fixture_path, tiny):
    args = ["--model", str(fixture_path), "-p", "hi", "-m", "12", "--temp", "0.9",
            "--top-p", "0.95", "--min-p", "0.02", "--seed", "3", "--verbose", "0"]
    a, b = generate(*args), generate(*args)
    assert a.returncode == 0 and a.stdout == b.stdout
    model, tokenizer = tiny
    import mlx.core as mx

    mx.random.seed(3)
    sampler = make_sampler(0.9, 0.95, 0.02)
    assert a.stdout == repo_mlx.generate(model, tokenizer, "hi", max_tokens=12, sampler=sampler) + "\n"


def test_position_blend_flag(fixture_path):
    plain, _ = repo_mlx.load(str(fixture_path), model_config={"position_blend": 1.0})
    tokenizer = repo_mlx.load(str(fixture_path))[1]
    expected = repo_mlx.generate(plain, tokenizer, "hello", max_tokens=8)
    r = generate("--model", str(fixture_path), "-p", "hello", "-m", "8", "--position-blend", "1", "--verbose", "0")
    assert r.stdout == expected + "\n"


def test_kv_bits_needs_a_fitting_group_size(fixture_path):
    # Found: the fixture's head_dim is 16, which no group size mx.quantize has divides;
    # the error suggested 32, 64 or 128 all the same.
    r = generate("--model", str(fixture_path), "--kv-bits", "4")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: --kv-group-size 64 does not divide this model's head_dim 16; "
        "no group size (32, 64, 128) divides it, so drop --kv-bits."
    )


def test_kv_bits_suggests_the_group_sizes_that_fit():
    from repo_mlx.generate import check_kv_bits

    model = types.SimpleNamespace(layers=[types.SimpleNamespace(self_attn=types.SimpleNamespace(head_dim=96))])
    with pytest.raises(LoadError, match=r"head_dim 96; pick --kv-group-size 32\.$"):
        check_kv_bits(model, 4, 64)
    check_kv_bits(model, 4, 32)
    check_kv_bits(model, None, 64)


def test_bad_inputs_are_one_line_errors(fixture_path, tmp_path):
    cases = [
        (["--model", str(tmp_path / "none")], "does not exist"),
        (["--model", str(fixture_path), "--prompt-file", str(tmp_path / "missing.txt")], "argument --prompt-file: "),
        # Every flag's range is walked in test_cli_flags.py.
    ]
    for args, message in cases:
        r = generate(*args)
        assert r.returncode == 2, args
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_help_explains_every_flag():
    r = generate("--help")
    for flag in ["--model", "--prompt", "--prompt-file", "--max-tokens", "--temp", "--top-p",
                 "--min-p", "--seed", "--kv-bits", "--kv-group-size", "--max-kv-size",
                 "--position-blend", "--dtype", "--adapter-path", "--verbose", "--top-k",
                 "--yarn", "--trust-remote-code", "--version"]:
        assert flag in r.stdout
    assert "SakanaAI/RePo-OLMo2-1B-stage2-L5" in r.stdout



# --- found in issue 11, each by name ------------------------------------------


def one_line_error(r, starts):
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(starts), r.stderr


def test_empty_prompt_and_empty_stdin(fixture_path):
    # Found: mlx-lm's ValueError (a traceback) after the ========== line.
    for r in (generate("--model", str(fixture_path), "--prompt", ""),
              generate("--model", str(fixture_path), "--prompt", "-", stdin="")):
        one_line_error(r, "error: The prompt is empty;")
        assert r.stdout == ""


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--seed", "-5", "must be an integer from 0 to 4294967295, got -5"),  # was a TypeError
        ("--max-kv-size", "-3", "must be an integer >= 8, got -3"),  # was "Negative dimensions"
        ("--max-kv-size", "0", "must be an integer >= 8, got 0"),  # was accepted
        ("--temp", "-1", "must be a number >= 0, got -1"),  # sampled at random
        ("--top-p", "2", "must be a number from 0 to 1, got 2"),
        ("--min-p", "1.5", "must be a number from 0 to 1, got 1.5"),
        ("--yarn", "0.5", "must be a number from 1 to 4096, got 0.5"),
    ],
)
def test_found_flag_values_are_refused(fixture_path, flag, value, message, capsys):
    # In this process: what a real process prints is checked above.
    with pytest.raises(SystemExit) as e:
        _cli.run(generate_main, ["--model", str(fixture_path), flag, value])
    r = subprocess.CompletedProcess([], e.value.code, *capsys.readouterr())
    one_line_error(r, f"error: argument {flag}: {message} (see python -m repo_mlx.generate --help)")


def test_top_k_yarn_and_trust_remote_code(fixture_path, tiny):
    from mlx_lm.sample_utils import make_sampler
    import mlx.core as mx

    r = generate("--model", str(fixture_path), "-p", "hi", "-m", "8", "--temp", "1", "--top-k", "3",
                 "--seed", "4", "--trust-remote-code", "--verbose", "0")
    mx.random.seed(4)
    assert r.stdout == repo_mlx.generate(*tiny, "hi", max_tokens=8, sampler=make_sampler(1.0, top_k=3)) + "\n"
    r = generate("--model", str(fixture_path), "-p", "hi", "-m", "8", "--yarn", "2", "--verbose", "0")
    scaled, tokenizer = repo_mlx.load(str(fixture_path), model_config=repo_mlx.yarn_scaling(2))
    assert r.stdout == repo_mlx.generate(scaled, tokenizer, "hi", max_tokens=8) + "\n"


def test_missing_tokenizer_json_is_named(fixture_path, tmp_path):
    # Found: transformers' "You need to have sentencepiece or tiktoken installed".
    shutil.copytree(fixture_path, tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").unlink()
    r = generate("--model", str(tmp_path / "m"), "-m", "2")
    one_line_error(r, f"error: {tmp_path / 'm'} has no tokenizer.json (the Hugging Face tokenizer file)")


def test_plain_olmo2_gets_one_notice(tmp_path):
    path = synthetic.write_checkpoint(tmp_path / "plain", synthetic.config(repo=False))
    r = generate("--model", str(path), "-p", "hi", "-m", "2", "--verbose", "0")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("is plain OLMo-2, not RePo") == 1 and r.stderr.count("\n") == 1
    r = generate("--model", str(synthetic.write_checkpoint(tmp_path / "repo", synthetic.config())), "-p", "hi", "-m", "2")
    assert "plain OLMo-2" not in r.stderr
