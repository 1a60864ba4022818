"""Shared analysis of the experiments: paired-by-seed statistics and what learned positions carry.

- ``paired``: arm A against arm B with the same seeds (the seed fixes the data order for every
  arm, so seed s of A and seed s of B saw the same batches): the mean and sd of the per-seed
  differences and how many seeds favour each arm.
- ``spearman``: rank correlation of one head's positions with the token index (1: positions
  follow token order, 0: no order, nan: constant positions, e.g. NoPE).
- ``task_item_labels`` / ``placement``: on a ``repo_mlx.tasks`` item, which tokens are the asked
  key, its value, the query and the filler, and where each group's positions fall.
- ``log``, ``fail``, ``add_preset_flags`` / ``preset_settings``, ``stage``: what every script
  prints, how its presets become flags, and its resumable stages.
"""

import argparse
import json
import math
import re
import sys
import time

import numpy as np

GROUPS = ("filler", "key", "value", "query")


def paired(a, b, lower_is_better: bool) -> dict:
    """A - B per seed (same seed order in both lists): mean, sd, seeds where A / B is better."""
    d = np.asarray(a, float) - np.asarray(b, float)
    sign = -1 if lower_is_better else 1
    return {
        "mean": float(d.mean()), "sd": float(d.std(ddof=1)) if d.size > 1 else 0.0, "n": int(d.size),
        "a_better": int((sign * d > 0).sum()), "b_better": int((sign * d < 0).sum()),
        "differences": [float(x) for x in d],
    }


def fmt_paired(p: dict, scale: float = 1.0, decimals: int = 2) -> str:
    """'+1.23 ± 0.45 (2/3)': mean ± sd of A - B, and the seeds where A is better."""
    return f"{scale * p['mean']:+.{decimals}f} ± {scale * p['sd']:.{decimals}f} ({p['a_better']}/{p['n']})"


def spearman(z) -> float:
    """Rank correlation of positions ``z`` [N] with their token index 0..N-1."""
    z = np.asarray(z, float)
    if z.size < 2 or np.ptp(z) == 0:
        return math.nan
    ranks = np.empty(z.size)
    ranks[np.argsort(z, kind="stable")] = np.arange(z.size)
    return float(np.corrcoef(ranks, np.arange(z.size))[0, 1])


def placement(z, labels) -> dict:
    """Where each group's positions fall in one head: the group's mean percentile rank among
    all the item's positions (0 lowest, 1 highest), and its mean distance to the query's mean
    position in units of the positions' sd (how far RePo puts the group from the question)."""
    z = np.asarray(z, float)
    labels = np.asarray(labels)
    pct = np.empty(z.size)
    pct[np.argsort(z, kind="stable")] = np.arange(z.size) / max(z.size - 1, 1)
    sd = z.std() or math.nan
    q = z[labels == "query"].mean() if (labels == "query").any() else math.nan
    out = {}
    for g in GROUPS:
        m = labels == g
        if m.any():
            out[g] = {"percentile": float(pct[m].mean()), "to_query": float(np.abs(z[m] - q).mean() / sd)}
    return out


def _label_chars(sample) -> list:
    """A label per character of a tasks.Sample prompt: key, value, query, filler or other."""
    p = sample.prompt
    lab = ["other"] * len(p)

    def mark(a, b, what):
        lab[a:b] = [what] * (b - a)

    q = p.rfind("Question:")
    if sample.task in ("niah_single", "niah_multikey"):
        start = p.find("\n\n") + 2  # the haystack starts after the instruction
        mark(start, q, "filler")
        key = re.search(r"magic number for (\S+) mentioned", p[q:]).group(1)
        for m in re.finditer(r"One of the special magic numbers for (\S+) is: (\d+)\.", p):
            if m.group(1) == key:  # the asked needle; distractor needles stay "other"
                mark(*m.span(1), "key")
                mark(*m.span(2), "value")
            else:
                mark(*m.span(), "other")
    elif sample.task == "kv_retrieval":
        start = p.find("{")
        mark(start, q, "filler")
        key = sample.prompt[q:].split('"')[1]
        m = re.search(rf'"({re.escape(key)})": "([0-9a-f-]+)"', p)
        mark(*m.span(1), "key")
        mark(*m.span(2), "value")
    else:
        raise ValueError(f"no labels for task {sample.task!r}")
    mark(q, len(p), "query")
    return lab


def task_item_labels(tokenizer, sample):
    """(token ids, a label per token) of a tasks.Sample prompt; a token takes the label of its
    first non-space character."""
    chars = _label_chars(sample)
    enc = tokenizer._tokenizer(sample.prompt, return_offsets_mapping=True, add_special_tokens=False)
    labels = []
    for a, b in enc["offset_mapping"]:
        text = sample.prompt[a:b]
        k = a + (len(text) - len(text.lstrip())) if text.strip() else a
        labels.append(chars[min(k, len(chars) - 1)])
    return list(enc["input_ids"]), labels


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fail(msg: str) -> None:
    """One ``error:`` line and exit status 2, as the package's commands."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def add_preset_flags(p, presets: dict, default: str) -> None:
    """--preset, and a flag overriding each of its settings (booleans as true/false)."""
    p.add_argument("--preset", choices=sorted(presets), default=default, help=f"Sizes (default: {default}).")
    for name, value in presets[default].items():
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"Override the preset ({default} preset: {value}).")


def preset_settings(args, presets: dict, default: str) -> argparse.Namespace:
    """The chosen preset's settings with the flags given on top."""
    cfg = argparse.Namespace(**presets[args.preset])
    for k in presets[default]:
        if getattr(args, k) is not None:
            setattr(cfg, k, getattr(args, k))
    return cfg


def stage(out, name: str, fn) -> dict:
    """``fn()``'s result, run once: stored in OUT/done/NAME.json (with its seconds), which a
    rerun reads instead of running it again."""
    marker = out / "done" / f"{name}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    log(f"stage {name}")
    t = time.time()
    result = fn() or {}
    result.setdefault("seconds", round(time.time() - t, 1))
    marker.write_text(json.dumps(result, indent=1))
    return result
