"""Checks that the Metal-only tests and ``python -m repo_mlx.doctor`` share: float64
references, the kernels against the pure path, the model against the official fixture."""

import contextlib
import dataclasses
import importlib
import re
import tempfile
from pathlib import Path
from typing import List, NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import MODEL_REMAPPING

from . import rope
from .loader import load

F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16
DTYPES = (F32, F16, BF16)
EPS = {F32: 2.0**-23, F16: 2.0**-10, BF16: 2.0**-7}  # spacing of the dtype at 1.0
SHAPES = {"decode": 1, "prefill": 129}  # tokens per call
# The kernels also with grouped-query attention: (tokens, query heads per KV head).
KERNEL_SHAPES = {**SHAPES, "decode, 3 query heads per KV head": (1, 3),
                 "prefill, 2 query heads per KV head": (129, 2)}  # fmt: skip
OUTPUTS = ("q", "k", "dq", "dk", "dz")
# Error against float64, relative to max(1, |reference|) per element (dz: to
# max(1, max |dz|), a sum over head_dim/2 pairs). float32 angles of positions up
# to 5000 carry ~3e-4 of error; half precision rounds cos, sin and the result.
REFERENCE_LIMITS = {F32: (2e-3, 2e-3), **{t: (8 * EPS[t], 4 * EPS[t]) for t in (F16, BF16)}}
# Kernels against the pure path, in units of the dtype at max(1, |pure|): the
# kernels round once from float32, the pure path after each operation (as the
# official code does); float32 differs by cos/sin and summation order only.
KERNEL_LIMITS = {"value": {F32: 16, F16: 4, BF16: 4}, "dz": {F32: 64, F16: 2, BF16: 2}}
FIXTURE = Path(__file__).with_name("fixtures") / "repo-olmo2-tiny"


class Check(NamedTuple):
    name: str
    status: str  # "pass", "fail" or "skip"
    detail: str


def dtype_name(dtype) -> str:
    return str(dtype).replace("mlx.core.", "")


def reference_rotate(x, p, w, a=1.0):
    """Spec section 4 in float64: out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin."""
    x, p, w = (np.asarray(v, np.float64) for v in (x, p, w))
    c, s = a * np.cos(p[..., None] * w), a * np.sin(p[..., None] * w)
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def reference_grads(x, p, g, w, a=1.0):
    """float64 dx = rotate(g, -p) and dp = sum_k w_k (out1_k g2_k - out2_k g1_k)."""
    o1, o2 = np.split(reference_rotate(x, p, w, a), 2, axis=-1)
    g1, g2 = np.split(np.asarray(g, np.float64), 2, axis=-1)
    return reference_rotate(g, -np.asarray(p, np.float64), w, a), (w * (o1 * g2 - o2 * g1)).sum(-1)


def f64(a) -> np.ndarray:
    return np.array(a.astype(F32), np.float64)


def rotation_inputs(dtype, tokens, batch=2, heads=4, head_dim=128, seed=0, group=1) -> dict:
    """q, k as the model hands them over (head-split views; q has ``group`` query
    heads per KV head), positions of +-5000 (negative, non-monotone, a transposed
    view), cotangents, YaRN x4 frequencies."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)

    z = rng.uniform(-5000.0, 5000.0, (batch, tokens, heads)).astype(np.float32)
    inv_freq, factor = rope.yarn_parameters(head_dim, 500000.0, 4.0)
    return dict(
        q=normal(batch, tokens, heads * group, head_dim).transpose(0, 2, 1, 3),
        k=normal(batch, tokens, heads, head_dim).transpose(0, 2, 1, 3),
        z=mx.array(z).transpose(0, 2, 1),
        gq=normal(batch, heads * group, tokens, head_dim),
        gk=normal(batch, heads, tokens, head_dim),
        inv_freq=inv_freq,
        factor=factor,
    )


def rotation_outputs(inputs: dict) -> List[mx.array]:
    """Rotated q, k and the gradients dq, dk, dz, on the default device."""
    kw = dict(inv_freq=inputs["inv_freq"], attention_factor=inputs["factor"])
    out, grads = mx.vjp(
        lambda q, k, z: rope.continuous_rope_qk(q, k, z, **kw),
        [inputs["q"], inputs["k"], inputs["z"]],
        [inputs["gq"], inputs["gk"]],
    )
    mx.eval(out, grads)
    return [*out, *grads]


def reference_outputs(inputs: dict) -> List[np.ndarray]:
    """float64 q, k, dq, dk, dz; query head h takes KV head h // G's positions."""
    w, a = f64(inputs["inv_freq"]), inputs["factor"]
    q, k, z, gq, gk = (f64(inputs[n]) for n in ("q", "k", "z", "gq", "gk"))
    z = np.broadcast_to(z, k.shape[:-1])
    B, H, N = z.shape
    zq = np.repeat(z, q.shape[1] // H, axis=1)
    dq, dzq = reference_grads(q, zq, gq, w, a)
    dk, dzk = reference_grads(k, z, gk, w, a)
    dz = dzq.reshape(B, H, -1, N).sum(2) + dzk
    return [reference_rotate(q, zq, w, a), reference_rotate(k, z, w, a), dq, dk, dz]


def reference_errors(got, want) -> List[float]:
    """Per output: error against float64 as REFERENCE_LIMITS measures it."""
    errs = []
    for name, g, w in zip(OUTPUTS, got, want):
        scale = max(1.0, np.abs(w).max()) if name == "dz" else np.maximum(1.0, np.abs(w))
        errs.append(float((np.abs(f64(g) - w) / scale).max()))
    return errs


def units(got: mx.array, want: mx.array) -> float:
    """Largest |got - want| in units of the dtype's spacing at max(1, |want|)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
    g, w = f64(got), f64(want)
    if not np.isfinite(g).all():
        return float("inf")  # e.g. an element no thread wrote
    return float((np.abs(g - w) / (EPS[want.dtype] * np.maximum(1.0, np.abs(w)))).max())


def within_reference(errs, dtype, dz_dtype=F32) -> bool:
    """``errs`` within REFERENCE_LIMITS for values of ``dtype`` and dz of ``dz_dtype``."""
    dz = max(REFERENCE_LIMITS[dtype][1], REFERENCE_LIMITS[dz_dtype][1])
    return max(errs[:4]) <= REFERENCE_LIMITS[dtype][0] and errs[4] <= dz


@contextlib.contextmanager
def kernels(mode: str):
    before = rope.kernel_state()["mode"]
    rope.set_kernels(mode)
    try:
        yield
    finally:
        rope.set_kernels(before)


def check_pure_path(dtypes=DTYPES, shapes=SHAPES) -> List[Check]:
    """The pure-MLX path (on the CPU) against float64, forward and backward."""
    rows = []
    for dtype in dtypes:
        for shape, tokens in shapes.items():
            inputs = rotation_inputs(dtype, tokens)
            with kernels("off"), mx.stream(mx.cpu):
                errs = reference_errors(rotation_outputs(inputs), reference_outputs(inputs))
            ok = within_reference(errs, dtype)
            rows.append(Check(
                f"pure path {dtype_name(dtype)} {shape}", "pass" if ok else "fail",
                f"vs float64: values {max(errs[:4]):.2g}, dz {errs[4]:.2g} "
                f"(limits {REFERENCE_LIMITS[dtype][0]:.2g}, {REFERENCE_LIMITS[dtype][1]:.2g})",
            ))  # fmt: skip
    return rows


def kernels_unavailable() -> Optional[str]:
    """Why the kernels cannot be checked here, or None."""
    if not mx.metal.is_available():
        return "no Metal GPU here (mx.metal.is_available() is False)"
    if rope.metal_source_path() is None:
        return "metal/rope.metal not found"
    return None


def kernel_status() -> str:
    """Whether the rotation runs the Metal kernels in this process, and if not, why."""
    state = rope.kernel_state()
    if state["mode"] == "off":
        return "off (REPO_MLX_KERNELS=0 or rope.set_kernels(False))"
    if state["failure"]:
        return f"off after a failure: {state['failure']}"
    if why := kernels_unavailable():
        return f"not used: {why}; the pure MLX path runs"
    if mx.default_device() != mx.gpu:
        return "not used: the default device is the CPU"
    return f"in use on the GPU ({state['checked']} kernel instances checked and run so far)"


def check_kernels(dtypes=DTYPES, shapes=KERNEL_SHAPES) -> List[Check]:
    """The Metal kernels, strict, against the pure path on the CPU and against float64.
    ``shapes``: name -> tokens or (tokens, query heads per KV head)."""
    if why := kernels_unavailable():
        return [Check("Metal kernels", "skip", why)]
    rows = []
    for dtype in dtypes:
        for shape, size in shapes.items():
            name = f"kernels {dtype_name(dtype)} {shape}"
            tokens, group = size if isinstance(size, tuple) else (size, 1)
            inputs = rotation_inputs(dtype, tokens, group=group)
            try:
                with kernels("strict"), mx.stream(mx.gpu):
                    assert rope._use_kernels(inputs["q"]), "the kernels were not chosen"
                    got = rotation_outputs(inputs)
                with kernels("off"), mx.stream(mx.cpu):
                    pure = rotation_outputs(inputs)
            except Exception as e:  # a compile error or crash is a result here
                rows.append(Check(name, "fail", rope.one_line_error(e)))
                continue
            errs = reference_errors(got, reference_outputs(inputs))
            diff = [units(g, p) for g, p in zip(got, pure)]
            limits = [KERNEL_LIMITS["dz" if n == "dz" else "value"][dtype] for n in OUTPUTS]
            ok = within_reference(errs, dtype) and all(d <= l for d, l in zip(diff, limits))
            rows.append(Check(
                name, "pass" if ok else "fail",
                f"vs pure path: values {max(diff[:4]):.1f}, dz {diff[4]:.1f} units "
                f"(limits {limits[0]}, {limits[4]}); vs float64: values {max(errs[:4]):.2g}, "
                f"dz {errs[4]:.2g}",
            ))  # fmt: skip
    return rows


def rel_err(a, b) -> float:
    a = np.asarray(a.astype(F32) if isinstance(a, mx.array) else a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def check_model(device=None, fixture: Path = FIXTURE) -> List[Check]:
    """The official tiny checkpoint on ``device`` (the default one if None) against
    the official outputs (logits, positions, greedy tokens); on a GPU with kernels strict."""
    if not (fixture / "reference.npz").is_file():
        return [Check("model vs official fixture", "skip", f"fixture not found at {fixture}")]
    device = device or mx.default_device()
    name = f"model vs official fixture ({device})"
    ref = dict(np.load(fixture / "reference.npz"))
    ids = ref["input_ids"]
    try:
        with kernels("strict"), mx.stream(device):
            model, _ = load(str(fixture))
            z = rope.positions(model, ids)
            steps = generate_step(mx.array(ids[0]), model, max_tokens=len(ref["greedy"]))
            logits = rel_err(model(mx.array(ids)), ref["logits"])
            positions = max(float(np.abs(np.array(v) - ref[f"positions_layer{i}"]).max()) for i, v in z.items())
            greedy = [int(t) for t, _ in steps] == ref["greedy"].tolist()
    except Exception as ex:
        return [Check(name, "fail", rope.one_line_error(ex))]
    ok = logits <= 1e-4 and positions <= 1e-2 and greedy
    detail = (
        f"logits {logits:.2g} (limit 1e-4), positions {positions:.2g} "
        f"(limit 1e-2), greedy tokens {'equal' if greedy else 'DIFFER'}"
    )
    return [Check(name, "pass" if ok else "fail", detail)]


def plain_twin(model):
    """mlx-lm's own model of the same architecture on the same weights, minus the position module."""
    config = {f.name: getattr(model.args, f.name) for f in dataclasses.fields(model.args)}
    config.pop("pe_config", None)
    kind = MODEL_REMAPPING.get(config["model_type"], config["model_type"])
    arch = importlib.import_module(f"mlx_lm.models.{kind}")
    plain = arch.Model(arch.ModelArgs.from_dict(config))
    weights = tree_flatten(model.parameters())
    weights = [(k, v) for k, v in weights if k.split(".")[-2] not in rope.POSITION_WEIGHTS]
    names = dict(weights)
    quantized = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    if quantized:  # quantize the layers the RePo model has quantized, as it did
        q = quantized[0]
        nn.quantize(plain, q.group_size, q.bits, class_predicate=lambda p, m: f"{p}.scales" in names)
    plain.load_weights(weights)  # the same arrays: no copy
    return plain


# Primitives that make views or pass arrays through: no kernel, no copy.
VIEW_OPS = {
    "Broadcast", "CustomTransforms", "ExpandDims", "Flatten", "Reshape", "Slice",
    "Squeeze", "StopGradient", "Transpose", "Unflatten",
}  # fmt: skip


def count_ops(*outputs) -> int:
    """Operations (kernel launches on a GPU) that compute ``outputs``, views not counted."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "graph.dot"
        mx.export_to_dot(str(path), *outputs)
        labels = re.findall(r'label ="([^"]*)", shape=rectangle', path.read_text())
    return sum(label not in VIEW_OPS for label in labels)


def decode_ops(model) -> dict:
    """Operations of one decode step (one token, a KV cache holding 8) of the
    first RePo layer and of the first plain layer (None if it has none)."""
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[1] * 8]), cache=cache))
    h = mx.random.normal((1, 1, model.args.hidden_size), key=mx.random.key(0))
    h = h.astype(model.model.embed_tokens.weight.dtype)
    mx.eval(h, [c.state for c in cache])
    counts = {"repo": None, "plain": None}
    for layer, c in zip(model.layers, cache):
        kind = "repo" if layer.self_attn.repo else "plain"
        if counts[kind] is None:
            counts[kind] = count_ops(layer(h, None, cache=c))
    return counts
