"""What quantizing the position module would do to the positions.

``repo_mlx.convert -q`` keeps gate_map / content_map / final_map in float.
This script quantizes ONLY those three projections (everything else stays
float) and reports how far the positions and logits move, so the choice is
backed by numbers. On a real checkpoint:

    python bench/quantized_positions.py --model SakanaAI/RePo-OLMo2-1B-stage2-L5
"""

import sys
from pathlib import Path
import argparse

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import repo_mlx
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # synthetic.py lives with the tests
import synthetic  # noqa: E402  random official-format checkpoints
from repo_mlx.rope import POSITION_WEIGHTS
from repo_mlx.repo_olmo2 import Model, ModelArgs


def random_1b():
    cfg = synthetic.config_1b()
    model = Model(ModelArgs.from_dict(cfg))
    model.load_weights([(k, mx.array(v)) for k, v in synthetic.random_weights(cfg).items()])
    return model


def quantize_positions(model, bits, group_size):
    """Quantize only the position module; returns what undoes it."""
    originals = [
        (layer.self_attn, name, getattr(layer.self_attn, name))
        for layer in model.layers
        if layer.self_attn.repo
        for name in POSITION_WEIGHTS
    ]
    for attn, name, linear in originals:
        if linear.weight.shape[-1] % group_size == 0:
            setattr(attn, name, nn.QuantizedLinear.from_linear(linear, group_size, bits))
    return lambda: [setattr(attn, name, linear) for attn, name, linear in originals]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Model folder or Hub id (default: a random 1B-shaped model).")
    p.add_argument("--tokens", type=int, default=256, help="Prompt length in tokens (default: 256).")
    p.add_argument("--group-size", type=int, default=64, help="Quantization group size (default: 64).")
    args = p.parse_args()

    model = repo_mlx.load(args.model)[0] if args.model else random_1b()
    vocab = model.args.vocab_size
    ids = mx.random.randint(0, min(vocab, 1000), (1, args.tokens), key=mx.random.key(0))
    ref_z = {k: np.array(v) for k, v in repo_mlx.positions(model, ids).items()}
    ref_logits = np.array(model(ids).astype(mx.float32))
    spread = np.mean([np.percentile(z, 75) - np.percentile(z, 25) for z in ref_z.values()])
    print(f"{args.model or 'random 1B-shaped model'}: {len(ref_z)} RePo layers, "
          f"positions in [{min(z.min() for z in ref_z.values()):.1f}, "
          f"{max(z.max() for z in ref_z.values()):.1f}], mean IQR {spread:.1f}")
    print(f"{'position module':16s} {'max |dz|':>9s} {'mean |dz|':>10s} {'logits rel err':>15s} {'argmax same':>12s}")
    for bits in (8, 4):
        restore = quantize_positions(model, bits, args.group_size)
        z = repo_mlx.positions(model, ids)
        dz = np.concatenate([np.abs(np.array(z[k]) - ref_z[k]).ravel() for k in ref_z])
        logits = np.array(model(ids).astype(mx.float32))
        rel = np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()
        same = (logits.argmax(-1) == ref_logits.argmax(-1)).mean()
        print(f"{f'{bits}-bit':16s} {dz.max():9.3f} {dz.mean():10.3f} {rel:15.4f} {same:12.1%}")
        restore()


if __name__ == "__main__":
    main()
