# What RePo adds to a transformer, written once for every model file: the position
# module and the rotation by its per-head positions (spec sections 3-4), one
# differentiable op: metal/rope.metal's kernels on a Metal GPU, compiled MLX ops
# elsewhere or if a kernel fails. Only mlx, mlx-lm and the standard library: a
# converted folder carries it as repo_rope.py, with metal/rope.metal beside it.

import functools
import importlib.resources
import math
import os
import warnings
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import scaled_dot_product_attention


def inv_frequencies(head_dim: int, base: float) -> mx.array:
    """``1 / base ** (2k / head_dim)`` in float32, as the official code builds it."""
    exponent = mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim
    return 1.0 / (mx.array(base, mx.float32) ** exponent)


def yarn_parameters(
    head_dim: int, base: float, factor: float, original_max_position_embeddings: int = 4096,
    beta_fast: float = 32.0, beta_slow: float = 1.0,
) -> Tuple[mx.array, float]:  # fmt: skip
    """YaRN's blended inverse frequencies and its cos/sin factor (HF's formula)."""
    original = original_max_position_embeddings

    def correction_dim(rotations):
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(head_dim // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp
    inv_freq = inv_frequencies(head_dim, base)
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_factor


# Pairs (i, i + D/2) as [..., 2, D/2]: reshapes and a reversed slice are views,
# so each rotation compiles to one elementwise kernel.
def _halves(x):
    return x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2)


def _cos_sin(positions, inv_freq, factor):
    angles = positions.astype(mx.float32)[..., None, None] * inv_freq
    return mx.cos(angles) * factor, mx.sin(angles) * factor


def _rotate_by(x, cos, sin):
    # out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin, with cos and sin cast to the
    # model dtype first, as the official code does.
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    y = _halves(x)
    sign = mx.array([[-1.0], [1.0]], x.dtype)
    return (y * cos + y[..., ::-1, :] * (sin * sign)).reshape(x.shape)


def _rotate_queries(q, k, cos, sin):
    # Query heads h*G .. h*G + G-1 use KV head h's cos and sin (G = Hq / Hkv).
    if (G := q.shape[-3] // k.shape[-3]) == 1:
        return _rotate_by(q, cos, sin)
    grouped = q.reshape(*k.shape[:-3], k.shape[-3], G, *q.shape[-2:])
    return _rotate_by(grouped, cos[..., None, :, :, :], sin[..., None, :, :, :]).reshape(q.shape)


@mx.compile
def _forward(q, k, positions, inv_freq, factor):
    cos, sin = _cos_sin(positions, inv_freq, factor)
    return _rotate_queries(q, k, cos, sin), _rotate_by(k, cos, sin)


def _dz_terms(x, g, cos, sin):
    # out1 g2 | out2 g1 per pair, out recomputed in float32: [..., 2, D/2].
    f32 = mx.float32
    return _halves(_rotate_by(x.astype(f32), cos, sin)) * _halves(g.astype(f32))[..., ::-1, :]


@mx.compile
def _backward(q, k, positions, gq, gk, inv_freq, factor):
    # dx = rotate(g, -z); dz = sum_k w_k (out1 g2 - out2 g1) over k and its
    # group's queries.
    cos, sin = _cos_sin(positions, inv_freq, factor)
    if (G := q.shape[-3] // k.shape[-3]) == 1:
        t = _dz_terms(q, gq, cos, sin)
    else:
        shape = (*k.shape[:-3], k.shape[-3], G, *q.shape[-2:])
        cg, sg = cos[..., None, :, :, :], sin[..., None, :, :, :]
        t = _dz_terms(q.reshape(shape), gq.reshape(shape), cg, sg).sum(-4)
    t = t + _dz_terms(k, gk, cos, sin)
    dz = (t * (mx.array([[1.0], [-1.0]]) * inv_freq)).sum((-2, -1)).astype(positions.dtype)
    return _rotate_queries(gq, k, cos, -sin), _rotate_by(gk, cos, -sin), dz


class Kernel(NamedTuple):
    kind: str  # "forward": a thread per pair; "backward": a simdgroup per row
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]
    body: str  # one call into metal/rope.metal, which goes in as the header


KERNELS = {
    "repo_rope_forward": Kernel(
        "forward", ("q", "k", "z", "inv_freq", "factor"), ("q_out", "k_out"),
        "repo_rope_forward<T, H, G, D>(q, q_shape, q_strides, k, k_strides, z, z_strides, "
        "inv_freq, inv_freq_strides, factor, q_out, k_out, thread_position_in_grid);",
    ),
    "repo_rope_backward": Kernel(
        "backward", ("q", "k", "z", "gq", "gk", "inv_freq", "factor"), ("dq", "dk", "dz"),
        "repo_rope_backward<T, P, H, G, D>(q, q_shape, q_strides, k, k_strides, z, z_strides, "
        "gq, gq_strides, gk, gk_strides, inv_freq, inv_freq_strides, factor, dq, dk, dz, "
        "thread_position_in_grid);",
    ),
}
SIMD_WIDTH = 32  # lanes per simdgroup on Apple GPUs; the backward kernel relies on it
KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
MAX_KERNEL_ELEMENTS = 2**28  # 32-bit offsets, with 8x room for views of larger buffers
# A first use's largest difference from the pure path, relative to max(1, |pure|):
# a few units of the dtype pass (the pure path rounds after each op), a wrong index does not.
CHECK_TOLERANCE = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 6e-2}
MODES = {"1": "on", "on": "on", True: "on", "0": "off", "off": "off", False: "off", "strict": "strict"}


class KernelError(RuntimeError):
    """A Metal kernel failed and REPO_MLX_KERNELS=strict made that an error."""


def set_kernels(mode: Union[bool, str]) -> None:
    """Use the Metal kernels (True, "on", "1"), never (False, "off", "0"), or make a kernel
    failure an error ("strict"); forgets an earlier failure. Default: $REPO_MLX_KERNELS."""
    if mode not in MODES:
        raise ValueError(f"kernel mode must be 1/on, 0/off or strict, got {mode!r}.")
    _state.update(mode=MODES[mode], failure=None, checked=set())


def kernel_state() -> dict:
    """The mode, the failure that turned the kernels off (or None), and how many kernel
    instances passed their first-use check so far."""
    return {"mode": _state["mode"], "failure": _state["failure"], "checked": len(_state["checked"])}


_state = {}
set_kernels(MODES.get(_env := os.environ.get("REPO_MLX_KERNELS", "1").strip().lower(), "on"))
if _env not in MODES:
    warnings.warn(f"REPO_MLX_KERNELS={_env!r} is not 1, 0 or strict: using 1.")


def metal_source_path() -> Optional[Path]:
    """rope.metal in package repo_mlx.metal, or in metal/ beside a converted folder's copy."""
    if __package__:
        try:
            path = Path(importlib.resources.files(__package__ + ".metal") / "rope.metal")
        except ModuleNotFoundError:
            return None
    else:
        path = Path(__file__).resolve().parent / "metal" / "rope.metal"
    return path if path.is_file() else None


@functools.lru_cache(maxsize=None)
def metal_source() -> Optional[str]:
    path = metal_source_path()
    return path.read_text() if path else None


def _on_metal_gpu() -> bool:
    return mx.metal.is_available() and mx.default_device() == mx.gpu


def _use_kernels(*arrays) -> bool:
    # The kernels read any strides but want [B, H, N, D] and a GPU stream.
    q = arrays[0]
    return (
        _state["mode"] != "off"
        and _state["failure"] is None
        and q.ndim == 4
        and 0 < q.size < MAX_KERNEL_ELEMENTS
        and all(a.dtype in KERNEL_DTYPES for a in arrays)
        and _on_metal_gpu()
    )


@functools.lru_cache(maxsize=None)
def _kernel(name):
    if metal_source() is None:
        raise FileNotFoundError("metal/rope.metal is missing")
    k = KERNELS[name]
    return mx.fast.metal_kernel(
        name=name, input_names=k.inputs, output_names=k.outputs, source=k.body,
        header=metal_source(),
        ensure_row_contiguous=False,  # the kernels read strides: no copies of q/k views
    )  # fmt: skip


def launch(name, *inputs) -> dict:
    """Keyword arguments of kernel ``name``'s call (tests/metal_harness runs the same)."""
    (q, k, z, *_), (B, H, N, D) = inputs, inputs[1].shape  # H: KV heads
    G = q.shape[1] // H  # query heads per KV head: a thread does all of a group
    if KERNELS[name].kind == "forward":  # one thread per pair
        tx = min(D // 2, 256)
        grid, group, dtypes = (D // 2, N, B * H), (tx, max(1, 256 // tx), 1), [q.dtype] * 2
        template, shapes = [("T", q.dtype)], [q.shape, k.shape]
    else:  # one simdgroup per row: its lanes' sums meet in simd_sum
        grid, group, dtypes = (SIMD_WIDTH, N, B * H), (SIMD_WIDTH, 8, 1), [q.dtype] * 2 + [z.dtype]
        template, shapes = [("T", q.dtype), ("P", z.dtype)], [q.shape, k.shape, z.shape]
    return dict(
        inputs=inputs, template=template + [("H", H), ("G", G), ("D", D)], grid=grid,
        threadgroup=group, output_shapes=shapes, output_dtypes=dtypes,
    )  # fmt: skip


def _check(name, q, z) -> None:
    # First use of an instance: run it on two tokens against the pure path, so a
    # compile error or a wrong result shows here, once, not in some later mx.eval.
    Hq, H, D = q.shape[1], z.shape[1], q.shape[3]
    if (key := (name, q.dtype, z.dtype, Hq, H, D)) in _state["checked"]:
        return
    keys = mx.random.split(mx.random.key(0), 5)
    x = [
        mx.random.normal((1, (Hq, H)[i % 2], 2, D), key=keys[i]).astype(q.dtype) for i in range(4)
    ]  # q, k, gq, gk
    zs = mx.random.uniform(-1000, 1000, (1, H, 2), key=keys[4]).astype(z.dtype)
    forward = KERNELS[name].kind == "forward"
    args = (x[0], x[1], zs, *([] if forward else x[2:]), inv_frequencies(D, 1e4), mx.array(1.25))
    got, want = _kernel(name)(**launch(name, *args)), (_forward if forward else _backward)(*args)
    for i, (g, w) in enumerate(zip(got, want)):
        g, w, dtype = g.astype(mx.float32), w.astype(mx.float32), (q.dtype, z.dtype)[i > 1]
        err = (mx.abs(g - w).max() / mx.maximum(mx.abs(w).max(), 1.0)).item()
        if not err <= CHECK_TOLERANCE[dtype]:  # NaN fails too
            raise ArithmeticError(
                f"{name} output {i} is {err:.3g} (relative) from the pure path "
                f"for {q.dtype}, {Hq} query and {H} KV heads of {D}"
            )
    _state["checked"].add(key)


def one_line_error(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _run(name, *inputs):
    """The kernel's outputs, or None after a failure (the caller then runs the pure path)."""
    try:
        _check(name, inputs[0], inputs[2])
        return _kernel(name)(**launch(name, *inputs))
    except Exception as e:
        cause = _state["failure"] = one_line_error(e)
    message = (
        f"repo_mlx: a Metal rotary kernel failed ({cause}). Continuing on the pure-MLX path "
        "(same results, slower); please report it to the repo_mlx project with the output "
        "of `python -m repo_mlx.doctor`. REPO_MLX_KERNELS=0 turns the kernels off, "
        "REPO_MLX_KERNELS=strict makes this an error."
    )
    if _state["mode"] == "strict":
        raise KernelError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)


# inv_freq and the attention factor are keyword arguments: constants to the VJP,
# as nothing trains them.
@mx.custom_function
def _rope_qk(q, k, positions, *, inv_freq, factor):
    if _use_kernels(q, k, positions):
        if out := _run("repo_rope_forward", q, k, positions, inv_freq, factor):
            return tuple(out)
    return _forward(q, k, positions, inv_freq, factor)


@_rope_qk.vjp
def _rope_qk_vjp(primals, cotangents, outputs, *, inv_freq, factor):
    args = (*primals, *cotangents, inv_freq, factor)
    if _use_kernels(*args[:5]):
        if out := _run("repo_rope_backward", *args):
            return tuple(out)
    return _backward(*args)


@functools.lru_cache(maxsize=None)
def _constant(value: float, head_dim: int = 0) -> mx.array:
    # Built once per value: the decode path makes no new arrays per call.
    a = inv_frequencies(head_dim, value) if head_dim else mx.array(value, mx.float32)
    mx.eval(a)
    return a


def continuous_rope_qk(
    queries: mx.array,
    keys: mx.array,
    positions: mx.array,
    *,
    base: Optional[float] = None,
    inv_freq: Optional[mx.array] = None,
    attention_factor: Union[float, mx.array] = 1.0,
) -> Tuple[mx.array, mx.array]:
    """Rotate ``queries`` [B, Hq, N, head_dim] and ``keys`` [B, Hkv, N, head_dim] by
    real ``positions`` [B, Hkv, N] (or what broadcasts to it), rotate-half layout,
    angles in float32. Query heads h*G .. h*G + G-1 (G = Hq / Hkv, mlx-lm's grouping)
    share KV head h's positions; with Hq == Hkv that is the official rule. Give
    ``base`` or ``inv_freq`` (e.g. YaRN's); ``attention_factor`` multiplies cos and
    sin. Differentiable in queries, keys and positions.
    """
    D = queries.shape[-1]
    q_shape, k_shape = queries.shape, keys.shape
    grouped = (
        queries.ndim == keys.ndim >= 3
        and q_shape[:-3] + q_shape[-2:] == k_shape[:-3] + k_shape[-2:]
        and k_shape[-3] > 0
        and q_shape[-3] % k_shape[-3] == 0
    )
    if queries.dtype != keys.dtype or not (q_shape == k_shape or grouped):
        raise ValueError(
            "queries [..., Hq, N, head_dim] and keys [..., Hkv, N, head_dim] need the "
            "same shape and dtype except Hq, a multiple of Hkv (query head h uses KV head "
            f"h // (Hq / Hkv)); got {q_shape} {queries.dtype} and {k_shape} {keys.dtype}."
        )
    if (base is None) == (inv_freq is None):
        raise ValueError("continuous_rope needs exactly one of base and inv_freq.")
    if D % 2:
        raise ValueError(f"head_dim must be even, got {D}.")
    inv_freq = _constant(float(base), D) if inv_freq is None else inv_freq
    if inv_freq.shape != (D // 2,):
        raise ValueError(
            f"inv_freq must have shape ({D // 2},) for head_dim {D}, got {inv_freq.shape}."
        )
    # Each conversion only where needed: no new arrays on the model's path.
    if inv_freq.dtype != mx.float32:
        inv_freq = inv_freq.astype(mx.float32)
    if not isinstance(attention_factor, mx.array):
        attention_factor = _constant(float(attention_factor))
    if not mx.issubdtype(positions.dtype, mx.floating):
        positions = positions.astype(mx.float32)
    if positions.shape != k_shape[:-1]:
        try:
            positions = mx.broadcast_to(positions, k_shape[:-1])
        except ValueError:
            raise ValueError(
                f"positions must be [..., Hkv, N] = {k_shape[:-1]}, one per KV head and "
                f"token (or broadcast to that); got {positions.shape}."
            ) from None
    return _rope_qk(queries, keys, positions, inv_freq=inv_freq, factor=attention_factor)


def continuous_rope(x: mx.array, positions: mx.array, **kwargs) -> mx.array:
    """``continuous_rope_qk`` of one tensor, for tests and experiments."""
    return continuous_rope_qk(x, x, positions, **kwargs)[0]


# Rules every RePo model file shares (spec sections 3, 6 and 7); here because a
# converted folder carries this file beside its model file.
POSITION_MODES = ("swigluex_multihead",)
POSITION_WEIGHTS = ("gate_map", "content_map", "final_map")


def rope_parameters(head_dim: int, base: float, rope_scaling: Optional[dict]) -> Tuple[mx.array, float]:
    """Inverse frequencies and cos/sin factor of a config's ``rope_scaling``, as
    mlx-lm's ``initialize_rope`` scales them for integer positions."""
    scaling = rope_scaling or {}
    kind = scaling.get("type") or scaling.get("rope_type") or "default"
    if kind == "default":
        return inv_frequencies(head_dim, base), 1.0
    if kind == "linear":
        return inv_frequencies(head_dim, base) / scaling["factor"], 1.0
    if kind == "llama3":  # Llama 3.1+: long wavelengths slowed by factor, a smooth band between
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        context = scaling.get("original_max_position_embeddings", 8192)
        inv_freq = inv_frequencies(head_dim, base)
        wavelen = 2 * math.pi / inv_freq
        smooth = mx.clip((context / wavelen - low) / (high - low), 0.0, 1.0)
        return inv_freq * (smooth + (1 - smooth) / factor), 1.0
    if kind == "yarn":
        keys = ("original_max_position_embeddings", "beta_fast", "beta_slow")
        extra = {k: scaling[k] for k in keys if scaling.get(k) is not None}
        return yarn_parameters(head_dim, base, scaling["factor"], **extra)
    raise ValueError(
        f"rope_scaling type {kind!r} is not supported for RePo layers; "
        "use none, 'linear', 'llama3' or 'yarn'."
    )


def pe_setting(pe_config: dict, name: str):
    # The official code reads only the misspelled key; its converter writes both.
    wrong, right = pe_config.get("dynmaic_" + name), pe_config.get("dynamic_" + name)
    if wrong is not None and right is not None and wrong != right:
        raise ValueError(
            f"pe_config disagrees with itself: dynmaic_{name}={wrong!r} but "
            f"dynamic_{name}={right!r}; make both spellings equal."
        )
    return wrong if wrong is not None else right


def pe_config(start_layer: int = 1, layer_ids: str = "", mode="swigluex_multihead") -> dict:
    """A ``pe_config`` as the official converter writes it (both spellings of each key)."""
    return {
        "dynamic_pe_mode": mode,
        "dynamic_pe_start_layer": start_layer,
        "dynmaic_pe_start_layer": start_layer,
        "dynamic_pe_layer_ids": layer_ids,
        "dynmaic_pe_layer_ids": layer_ids,
        "dynamic_pe_init_pdrop": 1.0,
        "dynamic_pe_dropout_anneal_step": 0,
        "model_type": "",
    }


def repo_layer_ids(pe_config: Optional[dict], num_layers: int) -> List[int]:
    """The layers that assign their own positions, from a HF ``pe_config``."""
    mode = (pe_config or {}).get("dynamic_pe_mode")
    if mode in (None, "", "none"):
        return []
    if mode not in POSITION_MODES:
        raise ValueError(
            f"pe_config dynamic_pe_mode {mode!r} is not supported; "
            f"supported: {', '.join(POSITION_MODES)} (or 'none' for the plain model)."
        )
    start = int(pe_setting(pe_config, "pe_start_layer") or 0)
    ids = pe_setting(pe_config, "pe_layer_ids") or ""
    if isinstance(ids, str):
        try:
            ids = [int(i) for i in ids.split(",") if i.strip()]
        except ValueError:
            raise ValueError(f"pe_config layer ids {ids!r} must be comma-separated integers.")
    if bad := [i for i in ids if not 0 <= i < num_layers]:
        raise ValueError(f"pe_config names layers {bad} but the model has {num_layers} layers.")
    return [i for i in (ids or range(num_layers)) if i >= start]


def check_position_weights(weights: dict, repo_layers: List[int]) -> None:
    """Refuse a checkpoint whose position weights disagree with its config: stock
    loaders drop or ignore them and silently run the plain model."""
    found = {
        int(k.split(".")[2])
        for k in weights
        if k.startswith("model.layers.") and k.split(".")[4] in POSITION_WEIGHTS
    }
    if extra := sorted(found - set(repo_layers)):
        raise ValueError(
            f"Layers {extra} have RePo position weights (gate_map/content_map/final_map) "
            "but pe_config does not make them RePo layers; fix pe_config or use the "
            "matching checkpoint."
        )
    for i in sorted(repo_layers):
        for name in POSITION_WEIGHTS:
            if (key := f"model.layers.{i}.self_attn.{name}.weight") not in weights:
                raise ValueError(
                    f"pe_config makes layer {i} a RePo layer but the checkpoint has no "
                    f"{key}; the weights are incomplete or the config is wrong."
                )


class RePoAttention(nn.Module):
    """What is RePo's in a model file's Attention (a subclass of mlx-lm's, which brings
    ``rope``, ``scale`` and ``o_proj``): in a RePo layer the position module and the rotation
    by its positions. ``observe``: None, or a function each call hands the attention's input
    and its positions."""

    def init_positions(self, args, repo: bool, head_dim: int, n_positions: int):
        self.repo, self.observe = repo, None
        if repo:
            dim, d_p = args.hidden_size, args.hidden_size // 8
            self.gate_map = nn.Linear(dim, d_p, bias=False)
            self.content_map = nn.Linear(dim, d_p, bias=False)
            self.final_map = nn.Linear(d_p, n_positions, bias=False)
            # The official dynamic_pe_pdrop: 0 uses the learned positions, 1 is plain RoPE.
            self.position_blend = args.position_blend
            # Built once; private, so not a parameter.
            self._inv_freq, self._attention_factor = rope_parameters(
                head_dim, args.rope_theta, args.rope_scaling
            )

    def positions(self, x: mx.array, offset=0) -> mx.array:
        """z [B, positions per token, N] in float32: where this layer puts each token."""
        z = self.final_map(swiglu(self.gate_map(x), self.content_map(x)))
        z = z.astype(mx.float32).transpose(0, 2, 1)
        if p := self.position_blend:
            index = mx.arange(x.shape[1], dtype=mx.float32)
            if isinstance(offset, mx.array) and offset.ndim == 1:  # batch cache
                index = offset[:, None, None].astype(mx.float32) + index
            else:
                index = index + offset
            z = (1 - p) * z + p * index
        return z

    def attend(self, queries, keys, values, x: mx.array, mask=None, cache=None) -> mx.array:
        """Attention of split heads [B, heads, N, head_dim], queries and keys rotated by
        this layer's positions (``x`` feeds the module), then o_proj."""
        offset = cache.offset if cache is not None else 0
        z = self.positions(x, offset) if self.repo else None
        if self.observe is not None:
            self.observe(x, z)
        if z is None:
            queries, keys = self.rope(queries, offset=offset), self.rope(keys, offset=offset)
        else:
            queries, keys = continuous_rope_qk(
                queries, keys, z, inv_freq=self._inv_freq, attention_factor=self._attention_factor
            )
        # The cache holds rotated keys: a token's position never changes later.
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        output = scaled_dot_product_attention(
            queries, keys, values, cache=cache, scale=self.scale, mask=mask
        )
        B, _, L, _ = queries.shape
        return self.o_proj(output.transpose(0, 2, 1, 3).reshape(B, L, -1))


def observe(model, input_ids) -> Dict[int, Tuple[mx.array, Optional[mx.array]]]:
    """{layer: (its attention's input, its positions or None)} for ``input_ids``."""
    ids = mx.atleast_2d(mx.array(input_ids))
    seen = {}
    attention = [layer.self_attn for layer in model.layers]
    for i, a in enumerate(attention):
        a.observe = functools.partial(lambda i, x, z: seen.__setitem__(i, (x, z)), i)
    try:
        model.model(ids)
    finally:
        for a in attention:
            a.observe = None
    mx.eval(seen)
    return seen


def positions(model, input_ids) -> Dict[int, mx.array]:
    """The positions z [B, (KV) heads, N] (float32) that every RePo layer assigns."""
    return {i: z for i, (_, z) in observe(model, input_ids).items() if z is not None}


def set_position_blend(model, blend: float) -> None:
    """0 uses the learned positions, 1 turns every RePo layer into plain RoPE."""
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"position_blend must be in [0, 1], got {blend}.")
    model.args.position_blend = blend
    for layer in model.layers:
        if layer.self_attn.repo:
            layer.self_attn.position_blend = blend
