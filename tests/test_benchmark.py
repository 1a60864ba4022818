"""``python -m repo_mlx.benchmark``: the Markdown report's structure and where its figures come from."""

import itertools
import re
import subprocess
import sys

import pytest

from repo_mlx import benchmark, speed
import synthetic

ROW = r"\| {} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|"


def figures(text: str, name: str):
    m = re.search(ROW.format(re.escape(name)), text)
    assert m, f"no row {name!r} in:\n{text}"
    return [float(v) for v in m.groups()]


def test_figures_come_from_the_clock(monkeypatch, capsys):
    # Every clock reading is one second later: the prompt takes 1 s to the first
    # token and the other tokens 1 s, so tokens/s equal the token counts.
    ticks = itertools.count()
    monkeypatch.setattr(speed, "clock", lambda: float(next(ticks)))
    benchmark.command(["--shape", "tiny", "-p", "16", "-g", "5", "-n", "3"])
    out = capsys.readouterr()
    for name in ("RePo (repo_mlx)", "OLMo-2 (mlx-lm, same weights)"):
        prompt, generation, memory = figures(out.out, name)
        assert (prompt, generation) == (16.0, 4.0) and memory > 0
    assert figures(out.out, "**ratio RePo / OLMo-2**")[:2] == [1.0, 1.0]
    assert out.err.count("trial ") == 3 and "warm-up: RePo" in out.err  # progress on stderr only
    assert "- per-trial ratios: prompt 1.000 to 1.000, generation 1.000 to 1.000" in out.out


def test_alternate_gives_median_ratio_and_its_range():
    # A takes 2, 4, 8 (after a warm-up of 1), B always 4: ratios 0.5, 1, 2 in ABBA order.
    values = {"A": iter([1.0, 2.0, 4.0, 8.0]), "B": itertools.repeat(4.0)}
    order = []

    def run(name):
        order.append(name)
        return (next(values[name]),)

    medians, ratio, spread = speed.alternate({"A": "A", "B": "B"}, run, 3)
    assert order == ["A", "B", "A", "B", "B", "A", "A", "B"]
    assert medians == {"A": [4.0], "B": [4.0]} and ratio == [1.0] and spread == [(0.5, 2.0)]


def test_report_of_a_loaded_model_in_batches(fixture_path):
    r = subprocess.run(
        [sys.executable, "-m", "repo_mlx.benchmark", "--model", str(fixture_path), "-p", "24", "-g", "4", "-n", "2", "-b", "2"],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:4] == [
        "### repo_mlx benchmark",
        "",
        "| model | prompt tok/s | generation tok/s | peak memory (GB) |",
        "|---|---:|---:|---:|",
    ]
    repo, plain = figures(r.stdout, "RePo (repo_mlx)"), figures(r.stdout, "OLMo-2 (mlx-lm, same weights)")
    ratio = figures(r.stdout, "**ratio RePo / OLMo-2**")
    assert all(v > 0 for v in repo + plain + ratio)
    # The position module is the only difference between the two models.
    assert "float32, 0.2M parameters (1.52% position module)" in r.stdout
    assert "prompt 24 tokens, 4 generated, batch 2, KV cache not quantized" in r.stdout
    for key in ("- machine: ", "- software: Python ", " mlx ", " mlx-lm ", " repo_mlx ", "Metal rotary kernels: "):
        assert key in r.stdout


def test_default_is_the_1b_shape_without_download(monkeypatch, capsys):
    """The released 1B's shape on a Metal GPU; on a CPU, where a 1B trial takes minutes
    (and Ctrl-C waits for it), the tiny one, said first."""
    args = benchmark.build_parser().parse_args([])
    assert (args.model, args.shape, args.prompt_tokens, args.generation_tokens, args.num_trials) == (None, None, 512, 128, 5)
    monkeypatch.setattr(benchmark, "alternate", lambda *a: (_ for _ in ()).throw(SystemExit(0)))
    monkeypatch.setattr(benchmark.mx.metal, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        benchmark.command([])
    assert capsys.readouterr().err.startswith("Building a random model in the tiny test shape")
    # The released model's shapes, as the test checkpoints have them.
    assert benchmark.SHAPES["1b"] == {k: v for k, v in synthetic.config_1b().items() if k in benchmark.SHAPES["1b"]}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kv-bits", "4", "-b", "2"], "error: --kv-bits works with --batch-size 1 only"),
        (["--shape", "tiny", "--kv-bits", "4"], "error: --kv-group-size 64 does not divide this model's head_dim 16"),
        (["-g", "1"], "error: argument --generation-tokens/-g: must be an integer from 2 to 2147483647, got 1"),
    ],
)
def test_bad_flags_are_one_line_errors(flags, message):
    r = subprocess.run([sys.executable, "-m", "repo_mlx.benchmark", *flags], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
