"""experiments/recall.py: the task's sequences, and the whole run at the smoke size."""

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parents[1] / "experiments" / "recall.py"
sys.path.insert(0, str(SCRIPT.parent))

import recall  # noqa: E402


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_each_answer_is_the_value_of_its_key():
    cfg = Namespace(**recall.PRESETS["default"])
    toks, mask, labels = recall.make_batch(cfg, np.random.default_rng(0), 8, 64, (0, 3))
    v = recall.vocab(cfg)
    for t, m, lab in zip(toks, mask, labels):
        pairs = {t[i]: t[i + 1] for i in range(63) if lab[i] == "key"}
        assert len(pairs) == cfg.pairs and (lab == "value").sum() == cfg.pairs
        answers = np.flatnonzero(m)
        assert len(answers) == cfg.pairs and all(lab[answers] == "answer")
        assert all(pairs[t[i - 1]] == t[i] for i in answers)  # query key, then its value
        noise = t[lab == "filler"]
        assert noise.min() >= v["noise"][0] and noise.max() < v["noise"][1]
        # Between pairs: 0..3 noise tokens.
        keys = np.flatnonzero(lab == "key")
        assert all(2 <= d <= 5 for d in np.diff(keys))


@pytest.mark.slow
def test_smoke_run_writes_the_report_and_resumes(tmp_path):
    out = tmp_path / "run"
    r = run("--preset", "smoke", "--out", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads((out / "report" / "results.json").read_text())
    assert [row["setting"] for row in results["table"]] == ["32, noise 0-3 (trained)", "64, noise 0-3", "64, noise 4-8"]
    for row in results["table"]:
        assert all(0 <= a[0] <= 1 for a in row["accuracy"].values())
        assert set(row["paired"]) == {"repo-rope", "repo-nope", "nope-rope"}
    pos = results["runs"]["repo-0"]["positions"]["test"]["1"]
    assert len(pos) == 2 and set(pos[0]["placement"]) == {"filler", "key", "value", "query"}
    assert set(results["runs"]["nope-0"]["probe"]) == {"0", "1"}
    md = (out / "report" / "report.md").read_text()
    assert "| RePo − RoPE | RePo − NoPE | NoPE − RoPE |" in md
    assert (out / "report" / "training.png").read_bytes()[:4] == b"\x89PNG"
    # Rerunning trains nothing and gives the same table; other settings are refused.
    r = run("--preset", "smoke", "--out", str(out))
    assert r.returncode == 0 and "training" not in r.stdout
    assert json.loads((out / "report" / "results.json").read_text())["table"] == results["table"]
    r = run("--preset", "smoke", "--steps", "30", "--out", str(out))
    assert r.returncode == 2 and "other settings" in r.stderr
    # New test settings reuse the trained models: evaluated, not trained.
    r = run("--preset", "smoke", "--tests", "64:0-3,48:2-4", "--out", str(out))
    assert r.returncode == 0 and "training" not in r.stdout and "evaluating" in r.stdout
    table = json.loads((out / "report" / "results.json").read_text())["table"]
    assert [row["setting"] for row in table][1:] == ["64, noise 0-3", "48, noise 2-4"]
    assert table[1] == results["table"][1]
    # A run stopped after training, before its record: the trained model is reused, the record rebuilt.
    record = out / "runs" / "repo-0.json"
    kept = json.loads(record.read_text())
    record.unlink()
    r = run("--preset", "smoke", "--tests", "64:0-3,48:2-4", "--out", str(out))
    assert r.returncode == 0 and "repo-0: reusing the trained model" in r.stdout and "training" not in r.stdout
    rebuilt = json.loads(record.read_text())["accuracy"]
    assert len(rebuilt) == 3 and rebuilt == {k: kept["accuracy"][k] for k in rebuilt}


@pytest.mark.parametrize("flags, message", [
    (["--tests", "64:9"], "expected LOW-HIGH"),
    (["--tests", "30:4-8"], "more than 30"),
    (["--seeds", "a"], "expected integers"),
    (["--layers", "1"], "at least 2 layers"),
])
def test_bad_settings_are_one_line_errors(tmp_path, flags, message):
    r = run("--preset", "smoke", "--out", str(tmp_path / "run"), *flags)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
