"""Where RePo puts each token: ``python -m repo_mlx.positions --prompt ...``.

Prints a per-head summary of the positions every RePo layer assigns, and
optionally writes them as CSV or JSON and plots them like the official viewer.
"""

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Dict, List

import numpy as np

from .. import _cli
from ..position_stats import inlier_range, outliers, select, summary, token_texts
from ..rope import positions
from ..errors import LoadError
from ..limits import check_length
from ..files import atomic_file


def place_labels(points, boxes, limit: int = 8) -> List[int]:
    """Greedy: keep each label (in order) whose box, ``boxes`` (width, height) around ``points``
    in display points, overlaps none kept so far, up to ``limit`` labels."""
    kept = []
    for i, ((x, y), (w, h)) in enumerate(zip(points, boxes)):
        if len(kept) == limit:
            break
        if all(abs(x - points[j][0]) >= (w + boxes[j][0]) / 2 or abs(y - points[j][1]) >= (h + boxes[j][1]) / 2 for j in kept):
            kept.append(i)
    return kept


def plot(path: Path, layer: int, heads: Dict[int, np.ndarray], tokens: List[str], full: bool = False, max_labels: int = 8) -> Dict[int, Dict[str, int]]:
    """Token index against position, one panel per head. Every outlier is red, and those off the
    shown range sit on its edge as a triangle; up to ``max_labels`` of them get a label, the most
    extreme first, none overlapping. Returns each panel title's counts {head: {"outliers",
    "off_range", "labelled"}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi, fontsize = 100, 7
    cols = min(4, len(heads))
    rows = math.ceil(len(heads) / cols)
    size = (10, 5) if len(heads) == 1 else (4 * cols, 3 * rows)
    fig, axes = plt.subplots(rows, cols, figsize=size, dpi=dpi, squeeze=False)
    for ax in axes.flat[len(heads):]:
        ax.set_visible(False)
    n = len(tokens)
    counts = {}
    for ax, (head, z) in zip(axes.flat, heads.items()):
        x = np.arange(n)
        ax.plot(x, z, color="0.75", linewidth=0.8, zorder=1)
        ax.scatter(x, z, s=10, zorder=2)
        lo, hi = inlier_range(z, full)
        ax.set_ylim(lo, hi)
        ax.set_xlim(-0.5, max(n - 0.5, 0.5))
        out = outliers(z)
        shown = np.clip(z, lo, hi)
        off = out[shown[out] != z[out]]
        ax.scatter(out, shown[out], s=14, color="C3", zorder=3, clip_on=False)
        for marker, side in (("^", z[off] > hi), ("v", z[off] < lo)):
            ax.scatter(off[side], shown[off][side], marker=marker, s=30, color="C3", zorder=4, clip_on=False)
        median = np.median(z)
        ranked = sorted(out, key=lambda i: -abs(z[i] - median))
        labels = [f"{tokens[i]!r} {z[i]:.0f}" for i in ranked]
        to_points = ax.transData + matplotlib.transforms.Affine2D().scale(72 / dpi)
        anchors = [tuple(to_points.transform((i, shown[i]))) for i in ranked]
        boxes = [(0.6 * fontsize * len(t), fontsize + 2) for t in labels]
        kept = place_labels(anchors, boxes, max_labels)
        for k in kept:
            i, y = ranked[k], shown[ranked[k]]
            ax.annotate(labels[k], (i, y), xytext=(3, -8 if y >= hi else 3), textcoords="offset points",
                        fontsize=fontsize, color="C3", clip_on=False)
        counts[head] = {"outliers": len(out), "off_range": len(off), "labelled": len(kept)}
        note = "full range" if full else f"{len(out)} outliers in red, {len(off)} off the range, {len(kept)} labelled"
        ax.set_title(f"layer {layer} head {head} ({note})", fontsize=8 if len(heads) == 1 else 6)
        ax.set_xlabel("token index", fontsize=8)
        ax.set_ylabel("position", fontsize=8)
        if len(heads) == 1 and n <= 48:
            ax.set_xticks(x, [t.replace("\n", "\\n") for t in tokens], rotation=90, fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="python -m repo_mlx.positions",
        description="Show the positions a RePo model assigns to each token: a per-head "
        "summary (min, max, IQR, share of adjacent tokens whose position increases), "
        "and optionally CSV, JSON and a plot like the official viewer.",
    )
    _cli.add_model_flags(p, yarn=True, adapter=False)
    _cli.add_prompt_flags(p, "the text to position", required=True)
    p.add_argument("--layer", default="all", help="A RePo layer index, or 'all' (default). --plot needs one layer.")
    p.add_argument("--head", default="all", help="A head index, or 'all' (default; the plot becomes a grid of heads).")
    p.add_argument("--max-tokens", type=_cli.positive_int, default=512, help="Use at most this many tokens of the text, like the official viewer (default: 512).")
    p.add_argument("--csv", type=_cli.output_file, help="Write rows 'layer, head, index, token, position' to this file.")
    p.add_argument("--json", type=_cli.output_file, help="Write tokens, token ids and positions {layer: {head: [...]}} to this file.")
    p.add_argument("--plot", type=_cli.output_file, help="Write a PNG of token index against position (needs matplotlib).")
    p.add_argument("--full-range", action="store_true", help="Plot the full y-range instead of zooming on the inliers (Tukey fences).")
    return p


def command(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.plot is not None:
        if args.layer == "all":
            raise LoadError("--plot needs a single --layer (the summary lists the RePo layers).")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise LoadError("--plot needs matplotlib: pip install 'repo-mlx[plot]'.") from None
    text = _cli.read_prompt(args)
    model, tokenizer = _cli.load_from_args(args)
    ids = tokenizer.encode(text)
    if not ids:
        raise LoadError("The prompt is empty.")
    total = len(ids)
    ids = ids[: args.max_tokens]
    check_length(model, len(ids))
    z = {l: np.array(v) for l, v in positions(model, ids).items()}
    chosen = select(z, args.layer, args.head)
    tokens = token_texts(tokenizer, ids)

    cut = f" (first {len(ids)} of {total})" if total > len(ids) else ""
    print(f"{len(ids)} tokens{cut}; RePo layers {', '.join(map(str, sorted(z)))}")
    print(f"{'layer':>5} {'head':>4} {'min':>10} {'max':>10} {'IQR':>10} {'increasing':>10}")
    for layer, heads in chosen.items():
        for head, zh in heads.items():
            s = summary(zh)
            print(f"{layer:>5} {head:>4} {s['min']:>10.2f} {s['max']:>10.2f} "
                  f"{s['iqr']:>10.2f} {s['increasing']:>10.2f}")
    if args.csv is not None:
        with atomic_file(args.csv) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["layer", "head", "index", "token", "position"])
            for layer, heads in chosen.items():
                for head, z in heads.items():
                    w.writerows([layer, head, i, t, repr(p)] for i, (t, p) in enumerate(zip(tokens, z.tolist())))
        print(f"wrote {args.csv}")
    if args.json is not None:
        by_layer = {str(layer): {str(h): z.tolist() for h, z in heads.items()} for layer, heads in chosen.items()}
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps({"tokens": tokens, "token_ids": ids, "positions": by_layer}, ensure_ascii=False))
        print(f"wrote {args.json}")
    if args.plot is not None:
        layer = next(iter(chosen))
        plot(args.plot, layer, chosen[layer], tokens, args.full_range)
        print(f"wrote {args.plot}")


def main(argv=None) -> None:
    _cli.run(command, argv)
