"""python -m repo_mlx.positions: CSV, JSON, plot and summary of the learned positions."""

import csv
import importlib
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

import repo_mlx
from repo_mlx import LoadError
from repo_mlx import positions as utils_positions
from repo_mlx import yarn_scaling

# `from repo_mlx import positions` gives the function; the module is the CLI.
positions_cli = importlib.import_module("repo_mlx.positions")

PROMPT = "The grass is green. The sky is blue. The sun is yellow. Here we go."


def run(fixture_path, *args):
    positions_cli.command(["--model", str(fixture_path), "--prompt", PROMPT, *args])


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_csv_and_json_equal_repo_mlx_positions(tiny, fixture_path, tmp_path, capsys):
    model, tokenizer = tiny
    run(fixture_path, "--csv", str(tmp_path / "z.csv"), "--json", str(tmp_path / "z.json"))
    ids = tokenizer.encode(PROMPT)
    z = {l: np.array(v)[0] for l, v in utils_positions(model, ids).items()}
    n_heads = model.args.num_attention_heads

    with open(tmp_path / "z.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["layer", "head", "index", "token", "position"]
    assert len(rows) - 1 == len(z) * n_heads * len(ids)
    for layer, head, index, token, position in rows[1:]:
        layer, head, index = int(layer), int(head), int(index)
        assert token == tokenizer.decode([ids[index]])
        assert np.float32(float(position)) == z[layer][head, index]

    data = json.loads((tmp_path / "z.json").read_text())
    assert data["token_ids"] == ids
    assert data["tokens"] == [tokenizer.decode([i]) for i in ids]
    assert sorted(data["positions"]) == ["1", "2", "3"]
    for layer, heads in data["positions"].items():
        assert sorted(heads, key=int) == [str(h) for h in range(n_heads)]
        for head, values in heads.items():
            np.testing.assert_array_equal(np.float32(values), z[int(layer)][int(head)])

    # The terminal summary: one line per layer and head, from the same numbers.
    out = capsys.readouterr().out
    s = positions_cli.summary(z[2][1])
    line = next(l for l in out.splitlines() if l.split()[:2] == ["2", "1"])
    assert [float(v) for v in line.split()[2:]] == pytest.approx(
        [s["min"], s["max"], s["iqr"], s["increasing"]], abs=0.006
    )


def test_one_layer_one_head_and_truncation(tiny, fixture_path, tmp_path):
    model, tokenizer = tiny
    run(fixture_path, "--layer", "3", "--head", "2", "--max-tokens", "10", "--json", str(tmp_path / "z.json"))
    data = json.loads((tmp_path / "z.json").read_text())
    ids = tokenizer.encode(PROMPT)[:10]
    assert data["token_ids"] == ids
    assert list(data["positions"]) == ["3"] and list(data["positions"]["3"]) == ["2"]
    want = np.array(utils_positions(model, ids)[3])[0, 2]
    np.testing.assert_array_equal(np.float32(data["positions"]["3"]["2"]), want)


def test_plot_is_a_png_of_the_expected_size(fixture_path, tmp_path):
    run(fixture_path, "--layer", "2", "--head", "1", "--plot", str(tmp_path / "one.png"))
    assert png_size(tmp_path / "one.png") == (1000, 500)
    run(fixture_path, "--layer", "2", "--head", "1", "--full-range", "--plot", str(tmp_path / "full.png"))
    assert png_size(tmp_path / "full.png") == (1000, 500)
    assert (tmp_path / "one.png").read_bytes() != (tmp_path / "full.png").read_bytes()
    # 4 heads: a grid of 4 columns, 4 x 3 inches each at 100 dpi.
    run(fixture_path, "--layer", "2", "--plot", str(tmp_path / "grid.png"))
    assert png_size(tmp_path / "grid.png") == (1600, 300)


def test_inlier_range_on_hand_made_data():
    # Q1 = 2.5, Q3 = 7.5, fences -5 .. 15: 100 and -40 are out; inliers 0..9 plus 5% padding.
    values = list(range(10)) + [100]
    assert positions_cli.inlier_range(values) == pytest.approx((-0.45, 9.45))
    assert positions_cli.inlier_range(values + [-40]) == pytest.approx((-0.45, 9.45))
    assert positions_cli.inlier_range(values, full=True) == pytest.approx((-5.0, 105.0))
    assert positions_cli.inlier_range([3.0, 3.0, 3.0]) == pytest.approx((2.0, 4.0))
    # A value on a fence is an inlier: [0, 0, 1, 1] has fences -1.5 .. 2.5.
    assert positions_cli.inlier_range([0, 0, 1, 1, 2.5]) == pytest.approx((-0.125, 2.625))
    assert list(positions_cli.outliers(values + [-40])) == [10, 11]


def test_summary_on_hand_made_data():
    s = positions_cli.summary([0.0, 1.0, 3.0, 2.0, 5.0])
    assert s == {"min": 0.0, "max": 5.0, "iqr": 2.0, "increasing": 0.75}


def test_bad_options_are_one_line_errors(fixture_path):
    with pytest.raises(LoadError, match="not a RePo layer; RePo layers are 1, 2, 3"):
        run(fixture_path, "--layer", "0")
    with pytest.raises(LoadError, match="--head 4 must be 0..3"):
        run(fixture_path, "--head", "4")
    with pytest.raises(LoadError, match="--plot needs a single --layer"):
        run(fixture_path, "--plot", "x.png")
    with pytest.raises(LoadError, match="empty"):
        positions_cli.command(["--model", str(fixture_path), "--prompt", ""])
    proc = subprocess.run(
        [sys.executable, "-m", "repo_mlx.positions", "--model", str(fixture_path), "--prompt", "hi", "--layer", "7"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --layer 7 is not a RePo layer")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_yarn_option(tiny, fixture_path, tmp_path):
    run(fixture_path, "--layer", "2", "--yarn", "2", "--json", str(tmp_path / "z.json"))
    got = json.loads((tmp_path / "z.json").read_text())["positions"]["2"]
    ids = tiny[1].encode(PROMPT)
    scaled, _ = repo_mlx.load(str(fixture_path), model_config=yarn_scaling(2))
    want = np.array(utils_positions(scaled, ids)[2])[0]
    plain = np.array(utils_positions(tiny[0], ids)[2])[0]
    for head, values in got.items():
        np.testing.assert_array_equal(np.float32(values), want[int(head)])
    # Layer 0 rotates with YaRN, so the hidden states that layer 2 reads change.
    assert np.abs(want - plain).max() > 1e-3


def test_plot_marks_every_outlier_and_labels_without_overlap(tmp_path):
    # 40 ordinary positions 0..39, then 12 outliers: 10 far above the range in one
    # cluster of neighbouring tokens (their labels would pile up), one far below, one above.
    z = np.concatenate([np.arange(40.0), np.full(10, 500.0) + np.arange(10), [-100.0, 200.0]])
    tokens = [f"t{i}" for i in range(len(z))]
    counts = positions_cli.plot(tmp_path / "p.png", 1, {0: z}, tokens)
    assert png_size(tmp_path / "p.png") == (1000, 500)
    c = counts[0]
    assert c["outliers"] == len(positions_cli.outliers(z)) == 12
    lo, hi = positions_cli.inlier_range(z)
    assert c["off_range"] == int(((z < lo) | (z > hi)).sum()) == 12
    # Ten labels on adjacent tokens at one height cannot all fit: some are skipped,
    # and the two lone outliers are labelled instead.
    assert 3 <= c["labelled"] < 8
    assert not list(tmp_path.glob(".*partial*"))


def test_place_labels_keeps_only_non_overlapping():
    boxes = [(20, 9)] * 4
    assert positions_cli.place_labels([(0, 0), (5, 0), (30, 0), (5, 20)], boxes) == [0, 2, 3]
    assert positions_cli.place_labels([(0, 0), (5, 0), (30, 0), (5, 20)], boxes, limit=2) == [0, 2]


def test_bad_output_paths_are_refused_before_loading(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    for flag, value in (("--plot", tmp_path), ("--csv", tmp_path / "f" / "x.csv"), ("--prompt-file", tmp_path)):
        with pytest.raises(SystemExit) as e:
            positions_cli.command(["--model", str(tmp_path / "missing"), "--layer", "1", "--prompt", "hi", flag, str(value)]
                               if flag != "--prompt-file" else ["--model", str(tmp_path / "missing"), flag, str(value)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: argument {flag}")
