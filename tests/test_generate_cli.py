"""``python -m repo_mlx.generate`` as a user runs it."""

import subprocess
import sys

import repo_mlx
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
    # The fixture's head_dim is 16, which mx.quantize cannot group.
    r = generate("--model", str(fixture_path), "--kv-bits", "8")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: --kv-group-size 64 does not divide this model's head_dim 16; "
        "pick one that does (32, 64 or 128)."
    )


def test_bad_inputs_are_one_line_errors(fixture_path, tmp_path):
    cases = [
        (["--model", str(tmp_path / "none")], "does not exist"),
        (["--model", str(fixture_path), "--prompt-file", str(tmp_path / "missing.txt")], "Cannot read --prompt-file"),
        (["--model", str(fixture_path), "--position-blend", "3"], "position_blend must be in [0, 1]"),
        (["--model", str(fixture_path), "-m", "0"], "--max-tokens must be at least 1"),
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
                 "--position-blend", "--dtype", "--adapter-path", "--verbose"]:
        assert flag in r.stdout
    assert "SakanaAI/RePo-OLMo2-1B-stage2-L5" in r.stdout

