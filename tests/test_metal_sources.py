"""The Metal kernel sources, checked off-Mac.

metal/rope.metal is compiled as C++ with tests/metal_harness (g++), its kernels
are launched exactly as repo_mlx.rope launches them on a GPU (same body, grid,
threadgroup, template, input order and strides), every thread of the grid runs
on the CPU, and the outputs are compared with the pure-MLX path and float64.
What this can and cannot prove: docs/kernels.md.
"""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from metal_harness.harness import Harness, Unmodelled, refuse_unmodelled, to_numpy

import repo_mlx
from repo_mlx import kernel_checks as kc
from repo_mlx import rope
from mlx.utils import tree_flatten

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None, reason="needs g++ to build the Metal sources as C++"
)

F32, F16, BF16 = kc.F32, kc.F16, kc.BF16

# (values dtype, positions dtype, head_dim, N, B, H, layout[, G]): H KV heads and
# G query heads per KV head (grouped-query attention; 1 if not given). Together they take
# every branch launch() has: both kernels, each dtype of values and positions,
# forward threadgroups narrower than, equal to and split along head_dim/2 (D =
# 1024: two threadgroups per row), backward rows of fewer pairs than lanes, one
# per lane and several per lane, inputs in the constant (< 8 elements) and device
# address spaces, and contiguous and strided inputs.
CASES = [(t, F32, d, n, 2, 3, "model") for t in kc.DTYPES for d in (64, 128) for n in (1, 513)]
CASES += [
    (F16, F16, 64, 513, 2, 3, "model"),  # half positions
    (BF16, BF16, 128, 1, 2, 3, "model"),  # bfloat positions
    (F32, BF16, 128, 33, 1, 2, "contiguous"),
    (F32, F32, 16, 24, 2, 4, "model"),  # the tiny fixture's head_dim: fewer pairs than lanes
    (F16, F32, 1024, 3, 1, 2, "model"),  # head_dim/2 > 256: forward rows span threadgroups
    (BF16, F32, 4, 1, 1, 1, "model"),  # under 8 elements: mlx passes these in constant space
    (F32, F16, 32, 7, 2, 3, "shared positions"),  # z broadcast over heads (stride 0)
]
# Grouped-query attention: groups of 2, 3, 4 and 8 query heads per KV head (a
# thread does its KV head's whole group), head_dim 64 and 128, decode and prefill.
CASES += [(t, F32, d, n, 2, 2, "model", g) for t in (F32, BF16) for d, n, g in
          [(64, 1, 2), (64, 33, 3), (128, 1, 4), (128, 257, 3), (64, 7, 8)]]  # fmt: skip
CASES += [
    (F16, F16, 128, 9, 1, 3, "contiguous", 2),
    (F32, F32, 16, 5, 2, 1, "model", 5),  # one KV head (multi-query attention)
    (F32, F32, 64, 4, 2, 2, "shared positions", 4),
]
KERNELS = list(rope.KERNELS)


def _case(case, seed=None):
    """Inputs of one case: tensors as (mx array, numpy view with the same strides)."""
    T, P, D, N, B, H, layout, *group = case
    G = group[0] if group else 1
    rng = np.random.default_rng(CASES.index(case) if seed is None else seed)

    def make(base, dtype, view):
        base = mx.array(base.astype(np.float32)).astype(dtype)
        return view(base), view(to_numpy(base))

    def keep(a):
        return a

    def over_heads(a):  # positions of one head, broadcast to all (stride 0)
        return (np.broadcast_to if isinstance(a, np.ndarray) else mx.broadcast_to)(a, (B, H, N))

    if D >= 64:  # YaRN frequencies and cos/sin factor (spec section 7)
        inv_freq, factor = rope.yarn_parameters(D, 500000.0, 4.0)
    else:
        inv_freq, factor = rope.inv_frequencies(D, 10000.0), 1.0
    # Positions non-monotone, negative, up to +-5000 (both ends hit exactly).
    z = rng.uniform(-5000.0, 5000.0, (B, N, H))
    z.reshape(-1)[:2] = (-5000.0, 5000.0)[: z.size]
    if layout == "contiguous":
        views = [keep] * 5
        z = z.transpose(0, 2, 1)
    elif layout == "shared positions":
        views = [keep] * 5
        z = z[:, :, :1].transpose(0, 2, 1)
        views[2] = over_heads
    else:  # as the model makes them: q a head-split view of the projection, k
        # strided in the head dim, gk running backwards along N, z transposed.
        views = [
            lambda a: a.transpose(0, 2, 1, 3), lambda a: a[..., ::2],
            lambda a: a.transpose(0, 2, 1), keep, lambda a: a[:, :, ::-1],
        ]  # fmt: skip
    shapes = {
        "model": [(B, N, H * G, D), (B, H, N, 2 * D), None, (B, H * G, N, D), (B, H, N, D)],
    }.get(layout, [(B, H * G, N, D), (B, H, N, D), None, (B, H * G, N, D), (B, H, N, D)])
    tensors = [
        make(z if s is None else rng.standard_normal(s), P if s is None else T, v)
        for s, v in zip(shapes, views)
    ]
    return (*tensors, inv_freq, mx.array(factor, mx.float32))


def _launch(name, q, k, z, gq, gk, inv_freq, factor):
    """The kernel's launch as rope.py makes it, and the numpy stand-ins of its tensors."""
    tensors = [q, k, z] if rope.KERNELS[name].kind == "forward" else [q, k, z, gq, gk]
    launch = rope.launch(name, *[t[0] for t in tensors], inv_freq, factor)
    return launch, [t[1] for t in tensors]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("metal_harness"))
    for case in CASES:
        for name in KERNELS:
            h.add(name, _launch(name, *_case(case))[0])
    h.build()
    return h


def _pure(name, q, k, z, gq, gk, inv_freq, factor):
    """The same computation on the pure-MLX path (this machine has no Metal)."""
    assert not rope._use_kernels(q)
    if rope.KERNELS[name].kind == "forward":
        return list(rope._forward(q, k, z, inv_freq, factor))
    return list(rope._backward(q, k, z, gq, gk, inv_freq, factor))


def _id(case):
    return "-".join(map(str, case)).replace("mlx.core.", "").replace(" ", "_")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_kernels_match_pure_mlx_and_float64(harness, case):
    q, k, z, gq, gk, inv_freq, factor = inputs = _case(case)
    got = []
    for name in KERNELS:
        launch, tensors = _launch(name, *inputs)
        out = harness.run(name, launch, tensors)
        want = _pure(name, q[0], k[0], z[0], gq[0], gk[0], inv_freq, factor)
        assert len(out) == len(want)
        for i, (g, w) in enumerate(zip(out, want)):
            kind = "dz" if rope.KERNELS[name].kind == "backward" and i == 2 else "value"
            err = kc.units(g, w)
            assert err <= kc.KERNEL_LIMITS[kind][w.dtype], f"{name} output {i}: {err:.1f} units"
        got += out
    # ... and no further from float64 than the pure path is allowed to be.
    ref = kc.reference_outputs(dict(
        q=q[0], k=k[0], z=z[0], gq=gq[0], gk=gk[0], inv_freq=inv_freq, factor=factor.item()
    ))  # fmt: skip
    errs = kc.reference_errors(got, ref)
    assert kc.within_reference(errs, case[0], case[1]), errs


def test_harness_catches_broken_kernels(tmp_path):
    """The comparison is not vacuous: a sign slip in the rotation and a missing
    simd_sum in the backward kernel are both caught."""
    source = rope.metal_source()
    broken = source.replace("T(x2 * c + x1 * s)", "T(x2 * c - x1 * s)")
    broken = broken.replace("sum = simd_sum(sum);", "")
    assert "sum = simd_sum(sum);" in source and "simd_sum(sum)" not in broken
    assert broken.count("x2 * c - x1 * s") == 1
    (tmp_path / "rope.metal").write_text(broken)
    h = Harness(tmp_path / "build", source=tmp_path / "rope.metal")
    inputs = _case((F32, F32, 128, 5, 2, 3, "model"), seed=0)
    launches = {n: _launch(n, *inputs) for n in KERNELS}
    for name, (launch, _) in launches.items():
        h.add(name, launch)
    h.build()
    for name, (launch, tensors) in launches.items():
        got = h.run(name, launch, tensors)
        want = _pure(name, *[t[0] for t in inputs[:5]], *inputs[5:])
        worst = [kc.units(g, w) for g, w in zip(got, want)]
        broken_outputs = worst[:2] if name == "repo_rope_forward" else worst[2:]
        assert min(broken_outputs) > 1e3, f"{name}: broken kernel not caught ({worst})"


# Slips that only grouped-query attention exposes: with one query head per KV
# head each mutant computes exactly what the shipped kernel does.
GROUP_MUTANTS = {
    # query head h*G + g read from head h (its KV head's index)
    "query head from KV index": [("repo_row(q_strides, b, hq, n)", "repo_row(q_strides, b, h, n)")],
    # dz keeps only the group's last query head's share
    "dz of one query head": [("t += repo_pair_grad<T, D>(\n          q,",
                              "t = repo_pair_grad<T, D>(\n          q,")],
}  # fmt: skip


@pytest.mark.parametrize("mutant", list(GROUP_MUTANTS))
def test_harness_catches_broken_grouping(tmp_path, mutant):
    """The grouped cases test the grouping: each mutant passes with G = 1 and fails
    by far with G = 3."""
    source = rope.metal_source()
    for old, new in GROUP_MUTANTS[mutant]:
        assert old in source
        source = source.replace(old, new)
    (tmp_path / "rope.metal").write_text(source)
    h = Harness(tmp_path / "build", source=tmp_path / "rope.metal")
    cases = {G: _case((F32, F32, 64, 5, 2, 2, "model", G), seed=0) for G in (1, 3)}
    launches = {(G, n): _launch(n, *cases[G]) for G in cases for n in KERNELS}
    for (_, name), (launch, _) in launches.items():
        h.add(name, launch)
    h.build()
    worst = {1: 0.0, 3: 0.0}
    for (G, name), (launch, tensors) in launches.items():
        got = h.run(name, launch, tensors)
        want = _pure(name, *[t[0] for t in cases[G][:5]], *cases[G][5:])
        worst[G] = max(worst[G], *(kc.units(g, w) for g, w in zip(got, want)))
    assert worst[1] <= kc.KERNEL_LIMITS["dz"][F32], worst
    assert worst[3] > 1e3, f"{mutant}: broken grouping not caught ({worst})"


@pytest.mark.parametrize(
    "snippet, what",
    [
        ("threadgroup float shared[32];", "threadgroup memory"),
        ("threadgroup_barrier(mem_flags::mem_threadgroup);", "barriers"),
        ("float v = simd_shuffle(1.0f, 0);", "simdgroup operations"),
        ("float v = fast::cos(1.0f);", "math other than"),
        ("void f(uint3 p [[thread_position_in_grid]]);", "attributes"),
        ("atomic_fetch_add_explicit(x, 1, memory_order_relaxed);", "atomics"),
    ],
)
def test_harness_refuses_what_it_cannot_model(tmp_path, snippet, what):
    """g++ would build these (or ignore them) and the serial harness would run
    them wrongly; it refuses, naming the line."""
    source = rope.metal_source() + "\n" + snippet + "\n"
    with pytest.raises(Unmodelled, match=what):
        refuse_unmodelled(source)
    (tmp_path / "rope.metal").write_text(source)
    h = Harness(tmp_path / "build", source=tmp_path / "rope.metal")
    h.add("repo_rope_forward", _launch("repo_rope_forward", *_case(CASES[0]))[0])
    with pytest.raises(Unmodelled, match=f"line {source.count(chr(10))}"):
        h.build()
    refuse_unmodelled(rope.metal_source())  # the shipped file passes
    # Comments do not count.
    refuse_unmodelled("// threadgroup_barrier would need real threads\n")


def test_harness_refuses_template_arguments_mlx_cannot_pass():
    launch = _launch("repo_rope_forward", *_case(CASES[0]))[0]
    launch["template"] = launch["template"] + [("S", 0.5)]
    with pytest.raises(Unmodelled, match="template argument S=0.5"):
        Harness("unused").add("repo_rope_forward", launch)


def test_wheel_ships_and_finds_metal_sources(tmp_path):
    """A built (non-editable) wheel contains metal/*.metal as repo_mlx/metal/ and,
    installed, rope.py finds them there."""
    root = Path(__file__).resolve().parents[1]
    import setuptools

    cmd = [sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "-q", "-w", str(tmp_path)]
    if int(setuptools.__version__.split(".")[0]) >= 77:  # then no download is needed
        cmd.append("--no-build-isolation")
    subprocess.run(cmd, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for source in (root / "metal").glob("*.metal"):
        assert f"repo_mlx/metal/{source.name}" in names
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--target", str(site), str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    probe = "from repo_mlx import rope; print(rope.__file__); print(rope.metal_source_path())"
    out = subprocess.run(
        [sys.executable, "-c", probe], env={"PYTHONPATH": str(site)}, cwd=tmp_path,
        check=True, capture_output=True, text=True,
    ).stdout.split("\n")  # fmt: skip
    assert Path(out[0]).parent == site / "repo_mlx"
    assert Path(out[1]) == site / "repo_mlx" / "metal" / "rope.metal"
    assert Path(out[1]).read_text() == (root / "metal" / "rope.metal").read_text()


def test_installed_package_finds_metal_sources():
    """The package under test (editable here) imports repo_mlx.metal as a regular
    package and reads rope.metal through it."""
    import repo_mlx.metal

    assert rope.metal_source_path() == Path(repo_mlx.metal.__file__).parent / "rope.metal"
    assert "repo_rope_forward" in rope.metal_source()


def test_standalone_copy_finds_metal_sources_beside_it(tmp_path):
    """A converted folder carries rope.py as repo_rope.py and rope.metal in metal/
    beside it: the copy imports with only mlx and mlx-lm and finds the source there; without
    it, it finds none and runs the pure path."""
    shutil.copy(rope.__file__, tmp_path / "repo_rope.py")
    probe = (
        "import sys, mlx.core as mx, repo_rope as r\n"
        "print(r.metal_source_path())\n"
        "x = mx.ones((1, 2, 3, 8)); y = r.continuous_rope(x, mx.zeros((1, 2, 3)), base=10000.0)\n"
        "assert mx.allclose(x, y).item()\n"
        "print(sorted(m for m in sys.modules if m.startswith('repo')))\n"
    )

    def run():
        return subprocess.run(
            [sys.executable, "-c", probe], cwd=tmp_path, check=True, capture_output=True,
            text=True,
        ).stdout.split("\n")  # fmt: skip

    assert run()[:2] == ["None", "['repo_rope']"]
    (tmp_path / "metal").mkdir()
    shutil.copy(rope.metal_source_path(), tmp_path / "metal" / "rope.metal")
    assert run()[:2] == [str(tmp_path / "metal" / "rope.metal"), "['repo_rope']"]
    tree = ast.parse((tmp_path / "repo_rope.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    stdlib = {"functools", "importlib", "math", "os", "pathlib", "typing", "warnings"}
    assert {m.split(".")[0] for m in imported} <= stdlib | {"mlx", "mlx_lm"}  # what stock mlx-lm has


@pytest.fixture
def harness_kernels(monkeypatch, tmp_path):
    """The harness stands in for mx.fast.metal_kernel and the device check says
    Metal GPU; strict mode. Yields (kernels built, kernels run) by name."""
    built = {"harness": None, "launches": []}

    def run(name, **launch):
        h = built["harness"]
        if h is None or h._key(name, launch) not in h.functions:
            # A new instance: rebuild all seen so far (dlopen caches a library by path).
            built["launches"].append((name, launch))
            h = built["harness"] = Harness(tmp_path / str(len(built["launches"])))
            for n, spec in built["launches"]:
                h.add(n, spec)
            h.build()
        runs.append(name)
        return h.run(name, launch, [to_numpy(a) for a in launch["inputs"][:-2]])

    def metal_kernel(name, **spec):
        calls.append(name)
        return lambda **launch: run(name, **launch)

    calls, runs = [], []
    monkeypatch.setattr(mx.fast, "metal_kernel", metal_kernel)
    monkeypatch.setattr(rope, "_on_metal_gpu", lambda: True)
    rope._kernel.cache_clear()
    rope.set_kernels("strict")  # a kernel failure fails the test
    try:
        yield calls, runs
    finally:
        rope._kernel.cache_clear()
        rope.set_kernels("on")


def test_model_runs_through_harness_kernels(harness_kernels, fixture_path, reference):
    """The dispatch end to end: with the harness standing in for mx.fast.metal_kernel
    (and the device check saying Metal GPU), the fixture model's rotations run the
    shipped kernels, first-use checks included, and still match the official logits;
    a gradient through the positions matches the pure path's."""
    calls, runs = harness_kernels
    model, _ = repo_mlx.load(str(fixture_path))
    ids = mx.array(reference["input_ids"])
    logits = model(ids)
    assert kc.rel_err(logits, reference["logits"]) <= 1e-4

    def loss(m):
        return m(ids[:, :8]).astype(mx.float32).square().mean()

    _, kernel_grads = nn.value_and_grad(model, loss)(model)
    rope.set_kernels(False)
    _, pure_grads = nn.value_and_grad(model, loss)(model)
    assert sorted(calls) == sorted(KERNELS)  # each kernel built once ...
    # ... and run: one first-use check each, then once per RePo layer (3) for the
    # loader's finite-output check, the logits, the loss and its backward pass.
    assert runs.count("repo_rope_forward") == 1 + 3 + 3 + 3
    assert runs.count("repo_rope_backward") == 1 + 3
    pure = dict(tree_flatten(pure_grads))
    gate = [(k, g) for k, g in tree_flatten(kernel_grads) if "gate_map" in k]
    assert len(gate) == 3  # reached only through d/dpositions
    for key, g in gate:
        assert kc.rel_err(g, np.array(pure[key])) <= 1e-4, key


def test_grouped_model_runs_through_harness_kernels(harness_kernels):
    """The same with grouped-query attention: a RePo Llama with 3 query heads per
    KV head (tests/test_repo_llama.py) runs the shipped kernels and matches the pure
    path, logits through the KV cache and gradients through the positions."""
    from mlx_lm.models.cache import make_prompt_cache
    from test_repo_llama import IDS, LLAMA, build

    calls, runs = harness_kernels
    model = build(LLAMA)

    def loss(m):
        return m(IDS[:, :8]).astype(mx.float32).square().mean()

    def outputs():
        cache = make_prompt_cache(model)
        steps = [model(IDS[:, :9], cache=cache)]
        steps += [model(IDS[:, i : i + 1], cache=cache) for i in range(9, IDS.shape[1])]
        _, grads = nn.value_and_grad(model, loss)(model)
        return mx.concatenate(steps, axis=1), dict(tree_flatten(grads))

    kernel_logits, kernel_grads = outputs()
    rope.set_kernels(False)
    pure_logits, pure_grads = outputs()
    assert sorted(calls) == sorted(KERNELS)
    # A first-use check each, then per RePo layer (3): prefill, 3 decode steps and
    # the loss forward, and the loss backward.
    assert runs.count("repo_rope_forward") == 1 + 3 * 5
    assert runs.count("repo_rope_backward") == 1 + 3
    assert kc.rel_err(kernel_logits, np.array(pure_logits)) <= 1e-5
    gate = [k for k in pure_grads if "gate_map" in k]
    assert len(gate) == 3
    for key in gate:
        assert kc.rel_err(kernel_grads[key], np.array(pure_grads[key])) <= 1e-4, key
