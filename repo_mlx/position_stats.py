"""Summaries of RePo positions, shared by the positions command, the viewer and
pretrain's progress report."""

import math
from typing import Dict, List, Tuple

import numpy as np

from .errors import LoadError


def inlier_range(values, full: bool = False) -> Tuple[float, float]:
    """The y-range the official viewer shows: the inliers, within the Tukey fences Q1 - 1.5 IQR ..
    Q3 + 1.5 IQR (``full``: every value), plus 5% padding; a flat range is padded by 1."""
    v = np.asarray(values, dtype=np.float64)
    if not full:
        v = np.delete(v, outliers(v))
    lo, hi = float(v.min()), float(v.max())
    pad = 0.05 * (hi - lo) or 1.0
    return lo - pad, hi + pad


def outliers(values) -> np.ndarray:
    """Indices of the values outside the Tukey fences."""
    v = np.asarray(values, dtype=np.float64)
    q1, q3 = np.percentile(v, [25, 75])
    lo, hi = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
    return np.flatnonzero((v < lo) | (v > hi))


def summary(z) -> Dict[str, float]:
    """min, max, IQR and the share of adjacent tokens whose position increases."""
    z = np.asarray(z, dtype=np.float64)
    q1, q3 = np.percentile(z, [25, 75])
    steps = np.diff(z)
    increasing = float((steps > 0).mean()) if steps.size else math.nan
    return {"min": float(z.min()), "max": float(z.max()), "iqr": float(q3 - q1), "increasing": increasing}


def token_texts(tokenizer, ids: List[int]) -> List[str]:
    return [tokenizer.decode([i]) for i in ids]


def select(z: Dict[int, np.ndarray], layer: str, head: str) -> Dict[int, Dict[int, np.ndarray]]:
    """{layer: {head: positions [N]}} for the chosen layer(s) and head(s) of batch row 0."""
    layers = sorted(z)
    if not layers:
        raise LoadError("This model has no RePo layers (a plain model): nothing to show.")
    if layer != "all":
        if not layer.lstrip("-").isdigit() or int(layer) not in z:
            raise LoadError(f"--layer {layer} is not a RePo layer; RePo layers are "
                            f"{', '.join(map(str, layers))} (or 'all').")
        layers = [int(layer)]
    n_heads = z[layers[0]].shape[1]
    heads = list(range(n_heads))
    if head != "all":
        if not head.isdigit() or int(head) >= n_heads:
            raise LoadError(f"--head {head} must be 0..{n_heads - 1} or 'all'.")
        heads = [int(head)]
    return {l: {h: z[l][0, h] for h in heads} for l in layers}
