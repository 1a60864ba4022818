"""How much a base's hidden states know about token order: the token-index probe.

RePo's position module is token-wise: it reads one token's hidden state and nothing else,
so it can only give positions that follow token order in layers whose input already carries
the token index. ``index_probe`` measures that: per layer, the held-out R^2 of a linear
(ridge) fit of the token index from the tensor that feeds the layer's attention. A layer
whose R^2 is near 0 cannot feed ordered positions (its RePo layers collapse towards NoPE);
the first layers with a clearly positive R^2 are where ``--repo-start-layer`` can start.
"""

from typing import Dict, List, Sequence

import mlx.core as mx
import numpy as np

from .rope import observe


def attention_inputs(model, input_ids) -> List[mx.array]:
    """[B, N, hidden] per layer: what its attention and position module read (OLMo-2's
    raw residual stream, Llama's and Qwen3's ``input_layernorm`` output)."""
    seen = observe(model, input_ids)
    return [seen[i][0] for i in range(len(model.layers))]


def ridge_r2(x_fit, y_fit, x_test, y_test, alphas=(1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)) -> float:
    """Held-out R^2 of a ridge regression of y on x (features standardised on the fit set).

    The ridge strength is chosen among ``alphas`` (times the number of fit rows) on the
    second half of the fit rows, then refitted on all of them; the test rows never choose
    anything. R^2 below 0 means worse than predicting the fit set's mean.
    """
    x_fit, x_test = np.asarray(x_fit, np.float64), np.asarray(x_test, np.float64)
    y_fit, y_test = np.asarray(y_fit, np.float64), np.asarray(y_test, np.float64)
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-8

    def fit(x, y, alpha):
        xs = (x - mu) / sd
        a = xs.T @ xs + alpha * len(x) * np.eye(xs.shape[1])
        return np.linalg.solve(a, xs.T @ (y - y.mean())), y.mean()

    def r2(w, b, x, y):
        pred = (x - mu) / sd @ w + b
        return 1 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12)

    half = len(x_fit) // 2
    best = max(alphas, key=lambda a: r2(*fit(x_fit[:half], y_fit[:half], a), x_fit[half:], y_fit[half:]))
    return float(r2(*fit(x_fit, y_fit, best), x_test, y_test))


def index_probe(model, sequences: Sequence[Sequence[int]], skip_first: int = 0) -> Dict[int, float]:
    """{layer: held-out R^2 of the token index from that layer's attention input}.

    ``sequences``: token-id lists (at least 4; any lengths); the first half fits the probe,
    the second half scores it, so no scored sequence was seen in the fit. ``skip_first``
    drops each sequence's first tokens (an attention-sink first token can dominate the fit).
    Layer 0 reads embeddings, which carry no index, so its R^2 is near 0 or below.
    """
    seqs = [[int(t) for t in s] for s in sequences]
    if len(seqs) < 4 or min(len(s) for s in seqs) <= skip_first + 1:
        raise ValueError(f"index_probe needs at least 4 sequences longer than {skip_first + 1} tokens.")
    feats: Dict[int, List[np.ndarray]] = {}
    index = []
    for s in seqs:
        for l, x in enumerate(attention_inputs(model, s)):
            feats.setdefault(l, []).append(np.array(x[0, skip_first:].astype(mx.float32)))
        index.append(np.arange(skip_first, len(s), dtype=np.float64))
    n_fit = len(seqs) // 2
    y_fit, y_test = np.concatenate(index[:n_fit]), np.concatenate(index[n_fit:])
    return {
        l: ridge_r2(np.concatenate(f[:n_fit]), y_fit, np.concatenate(f[n_fit:]), y_test)
        for l, f in feats.items()
    }
