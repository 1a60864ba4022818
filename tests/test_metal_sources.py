"""The Metal kernel sources, checked off-Mac.

metal/rope.metal is compiled as C++ with tests/metal_harness (g++), its kernels
are launched exactly as repo_mlx.rope launches them on a GPU (same body, grid,
threadgroup, template, input order and strides), every thread of the grid runs
on the CPU, and the outputs are compared with the pure-MLX path. What this can
and cannot prove: docs/kernels.md.
"""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from metal_harness.harness import Harness, to_numpy

from repo_mlx import rope

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None, reason="needs g++ to build the Metal sources as C++"
)

F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16
EPS = {F32: 2.0**-23, F16: 2.0**-10, BF16: 2.0**-7}  # spacing of the dtype at 1.0

# (x dtype, positions dtype, head_dim, N, B, H)
CASES = [(t, F32, d, n, 2, 3) for t in (F32, F16, BF16) for d in (64, 128) for n in (1, 513)]
CASES += [
    (F16, F16, 64, 513, 2, 3),  # half positions
    (BF16, BF16, 128, 1, 2, 3),  # bfloat positions
    (F32, BF16, 128, 33, 1, 2),
    (F32, F32, 16, 24, 2, 4),  # the tiny fixture's head_dim: fewer pairs than lanes
    (BF16, F32, 4, 1, 1, 1),  # under 8 elements: mlx passes these in constant space
]
KERNELS = list(rope.KERNELS)


def _case(case, seed=None):
    """Inputs of one case: tensors as (mx array, numpy view with the same strides)."""
    T, P, D, N, B, H = case
    rng = np.random.default_rng(CASES.index(case) if seed is None else seed)

    def make(base, dtype, view):
        base = mx.array(base.astype(np.float32)).astype(dtype)
        return view(base), view(to_numpy(base))

    if D >= 64:  # YaRN frequencies and cos/sin factor (spec section 7)
        inv_freq, factor = rope.yarn_parameters(D, 500000.0, 4.0)
    else:
        inv_freq, factor = rope.inv_frequencies(D, 10000.0), 1.0
    # Positions non-monotone, negative, up to +-5000 (both ends hit exactly).
    z = rng.uniform(-5000.0, 5000.0, (B, N, H))
    z.reshape(-1)[:2] = (-5000.0, 5000.0)[: z.size]
    # q as the model makes it (a head-split view of the projection); k strided in
    # the head dim; gk running backwards along N; z transposed like the model's.
    return (
        make(rng.standard_normal((B, N, H, D)), T, lambda a: a.transpose(0, 2, 1, 3)),
        make(rng.standard_normal((B, H, N, 2 * D)), T, lambda a: a[..., ::2]),
        make(z, P, lambda a: a.transpose(0, 2, 1)),
        make(rng.standard_normal((B, H, N, D)), T, lambda a: a),
        make(rng.standard_normal((B, H, N, D)), T, lambda a: a[:, :, ::-1]),
        inv_freq,
        factor,
    )


def _launch(name, q, k, z, gq, gk, inv_freq, factor):
    """The kernel's launch as rope.py makes it, and the numpy stand-ins of its tensors."""
    positions, inv_freq, factor = rope._arguments(q[0], z[0], None, inv_freq, factor)
    tensors = {
        "repo_rope_forward": [q, z],
        "repo_rope_qk_forward": [q, k, z],
        "repo_rope_backward": [q, z, gq],
        "repo_rope_qk_backward": [q, k, z, gq, gk],
    }[name]
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
    assert not rope._use_metal(q)
    kw = dict(inv_freq=inv_freq, attention_factor=factor)
    if name == "repo_rope_forward":
        return [rope.continuous_rope(q, z, **kw)]
    if name == "repo_rope_qk_forward":
        return list(rope.continuous_rope_qk(q, k, z, **kw))
    if name == "repo_rope_backward":
        _, grads = mx.vjp(lambda x, p: rope.continuous_rope(x, p, **kw), [q, z], [gq])
        return grads
    _, grads = mx.vjp(
        lambda a, b, p: rope.continuous_rope_qk(a, b, p, **kw), [q, k, z], [gq, gk]
    )
    return grads


def _ulps(got, want):
    """Largest |got - want| in units of the dtype's spacing at max(1, |want|)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    g, w = np.array(got.astype(F32)), np.array(want.astype(F32))
    assert np.isfinite(g).all(), "the kernel left elements unwritten (NaN fill)"
    return float((np.abs(g - w) / (EPS[want.dtype] * np.maximum(1.0, np.abs(w)))).max())


# The kernels round once from float32; the pure path rounds after each multiply
# and add in the value dtype (as the official code does), so in half and bfloat
# they differ by a few units; float32 differs only by cos/sin implementations
# and summation order (which matter more for dz, a sum over D/2 pairs).
LIMITS = {"value": {F32: 16, F16: 4, BF16: 4}, "dz": {F32: 64, F16: 2, BF16: 2}}


def _id(case):
    return "-".join(map(str, case)).replace("mlx.core.", "")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_kernels_match_pure_mlx(harness, case):
    q, k, z, gq, gk, inv_freq, factor = _case(case)
    for name in KERNELS:
        launch, tensors = _launch(name, q, k, z, gq, gk, inv_freq, factor)
        got = harness.run(name, launch, tensors)
        want = _pure(name, q[0], k[0], z[0], gq[0], gk[0], inv_freq, factor)
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            kind = "dz" if name.endswith("backward") and i == len(got) - 1 else "value"
            err = _ulps(g, w)
            assert err <= LIMITS[kind][w.dtype], f"{name} output {i}: {err:.1f} units"


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
    inputs = _case((F32, F32, 128, 5, 2, 3), seed=0)
    launches = {n: _launch(n, *inputs) for n in ("repo_rope_forward", "repo_rope_backward")}
    for name, (launch, _) in launches.items():
        h.add(name, launch)
    h.build()
    for name, (launch, tensors) in launches.items():
        got = h.run(name, launch, tensors)
        want = _pure(name, *[t[0] for t in inputs[:5]], *inputs[5:])
        worst = max(_ulps(g, w) for g, w in zip(got, want))
        assert worst > 1e3, f"{name}: broken kernel not caught ({worst:.1f} units)"


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


def test_standalone_copy_runs_without_metal_sources(tmp_path):
    """A converted folder carries rope.py as repo_rope.py alone: it imports with
    only mlx, finds no Metal sources and runs the pure path."""
    shutil.copy(rope.__file__, tmp_path / "repo_rope.py")
    probe = (
        "import sys, mlx.core as mx, repo_rope as r\n"
        "assert r.metal_source() is None\n"
        "x = mx.ones((1, 2, 3, 8)); y = r.continuous_rope(x, mx.zeros((1, 2, 3)), base=10000.0)\n"
        "assert mx.allclose(x, y).item()\n"
        "print(sorted(m for m in sys.modules if m.startswith('repo')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "['repo_rope']"
    tree = ast.parse((tmp_path / "repo_rope.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m.split(".")[0] for m in imported} <= {"functools", "math", "pathlib", "typing", "mlx"}
