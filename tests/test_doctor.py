"""python -m repo_mlx.doctor off-Mac: what it runs, what it skips and why, the
report and the exit status; and the shared checks it runs when a check fails."""

import contextlib
import subprocess
import sys

import mlx.core as mx
import pytest

from repo_mlx import LoadError, doctor, kernel_checks as kc, rope


def test_doctor_off_mac_report_and_exit_status(tmp_path):
    out = tmp_path / "report.md"
    done = subprocess.run(  # the fixture installed with the package
        [sys.executable, "-m", "repo_mlx.doctor", "--output", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = done.stdout
    assert report == out.read_text()
    assert report.startswith("## repo_mlx doctor report\n")
    for row in ("| mlx | ", "| mlx-lm | ", "| default device | ", "| Metal available | False |",
                "| kernels | not used: no Metal GPU here"):  # fmt: skip
        assert row in report
    # The pure path in each dtype, decode and prefill shapes, forward and backward.
    for dtype in ("float32", "float16", "bfloat16"):
        for shape in ("decode", "prefill"):
            assert f"| pure path {dtype} {shape} | pass |" in report
    assert "| model vs official fixture (Device(cpu, 0)) | pass |" in report
    assert "| operations per decode token (official tiny checkpoint) | measured |" in report
    # What needs a Mac is skipped, saying why.
    assert "| Metal kernels | skipped | no Metal GPU here" in report
    assert "| speed | skipped | no Metal GPU here" in report
    assert report.rstrip().endswith("passed, 0 failed, 2 skipped.")
    assert "[1/5] pure rotation path" in done.stderr  # progress goes to stderr


def test_doctor_exits_1_when_a_check_fails(monkeypatch, capsys, fixture_path):
    # Limits no result can meet: the pure-path checks fail.
    monkeypatch.setattr(kc, "REFERENCE_LIMITS", {d: (0.0, 0.0) for d in kc.DTYPES})
    with pytest.raises(SystemExit) as exit:
        doctor.command(["--fixture", str(fixture_path)])
    assert exit.value.code == 1
    report = capsys.readouterr().out
    assert "| pure path float32 decode | **FAIL** |" in report
    assert "| model vs official fixture (Device(cpu, 0)) | pass |" in report
    assert ", 6 failed, " in report


def test_doctor_bad_model_is_a_one_line_error(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "repo_mlx.doctor", "--model", str(tmp_path / "nothing")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_doctor_without_fixture_skips_the_model(tmp_path, monkeypatch, capsys):
    # A --fixture without the official outputs is a mistake, refused before any check.
    with pytest.raises(LoadError, match="has no reference.npz"):
        doctor.command(["--fixture", str(tmp_path)])
    # An install that lost its packaged fixture still runs the other checks.
    monkeypatch.setattr(kc, "FIXTURE", tmp_path)
    doctor.command([])
    report = capsys.readouterr().out
    assert "| model vs official fixture | skipped | fixture not found" in report
    assert "| operations and speed | skipped | no model" in report


def test_kernel_check_that_crashes_is_a_failed_check(monkeypatch):
    """On a Mac whose kernels fail, check_kernels reports each failure (strict
    mode: no silent fallback) instead of passing on the pure path."""
    monkeypatch.setattr(kc, "kernels_unavailable", lambda: None)
    monkeypatch.setattr(rope, "_on_metal_gpu", lambda: True)
    # No GPU stream here: run the "GPU" half on the default (CPU) stream.
    monkeypatch.setattr(mx, "stream", lambda device: contextlib.nullcontext())
    rows = kc.check_kernels(dtypes=[kc.F32], shapes={"decode": 1})
    assert [r.status for r in rows] == ["fail"]
    assert "No Metal back-end" in rows[0].detail
    assert rope._state["mode"] == "on" and rope._state["failure"] is None  # restored


def test_shipped_fixture_is_the_official_one(fixture_path):
    shipped = sorted(kc.FIXTURE.iterdir())
    assert {f.name for f in shipped} >= {"config.json", "model.safetensors", "reference.npz", "tokenizer.json"}
    for f in shipped:
        assert f.read_bytes() == (fixture_path / f.name).read_bytes(), f.name


def test_speed_times_each_model(tiny, monkeypatch):
    """The timing the doctor runs on a Mac (here on the CPU, numbers unchecked)."""
    model, _ = tiny
    monkeypatch.setattr(kc, "kernels_unavailable", lambda: None)
    rows = doctor.speed(model, tokens=2, prompt_tokens=4, trials=1)
    assert [r.name for r in rows] == ["speed: RePo, kernels on", "speed: RePo, kernels off", "speed: OLMo-2 (mlx-lm)"]
    assert all(r.status == "info" and "decode tokens/s" in r.detail for r in rows)
