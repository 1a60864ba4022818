"""Run the kernels of metal/rope.metal on the CPU, launched as mlx would launch them.

repo_mlx.rope gives mlx a kernel name, input/output names, a one-line body and,
per call, inputs, template, grid and threadgroup (``rope.launch``). This module
takes the very same pieces, writes the kernel signature by the rules of mlx's
``write_signature`` (mlx/backend/common/metal_kernel.cpp), includes the very
same .metal file after a small compatibility header (metal_compat.h) and
builds it with g++. ``run`` then executes every thread of the grid and returns
the outputs as mx arrays. What this can and cannot prove: docs/kernels.md.
"""

import ctypes
import re
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np

from repo_mlx import rope

HERE = Path(__file__).resolve().parent

# mlx's table of kernel attributes, in its order: a kernel gets each attribute
# whose name occurs in its body (a plain substring search, as mlx does).
ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]
MAX_CONSTANT_SIZE = 8  # smaller inputs go in the constant address space

# mlx dtype -> (Metal type name as mlx writes it, numpy storage)
TYPES = {
    mx.float32: ("float", np.float32),
    mx.float16: ("float16_t", np.float16),
    mx.bfloat16: ("bfloat16_t", np.uint16),  # numpy has no bfloat16: keep the bits
    mx.int32: ("int32_t", np.int32),
    mx.uint32: ("uint32_t", np.uint32),
}


class Unmodelled(ValueError):
    """The source or launch uses something the harness cannot run faithfully."""


# Constructs that g++ would accept but the harness would run wrongly: threads run
# one after another and lanes meet only at simd_sum, address spaces are erased.
UNMODELLED = [
    (r"\bthreadgroup\b", "threadgroup memory (threads here run one after another)"),
    (r"\b\w*_barrier\b", "barriers (threads here run one after another)"),
    (r"\batomic\w*", "atomics"),
    (r"\bsimd_(?!sum\b)\w+|\bquad_\w+", "simdgroup operations other than simd_sum"),
    (r"\bfast::|\bprecise::(?!sincos\b|cos\b|sin\b)\w+", "math other than precise::sincos/cos/sin"),
    (r"\[\[", "attributes in the header (g++ ignores unknown ones)"),
    (r"\bstatic\b(?!\s+constant\s+constexpr)", "static variables"),
    (r"\bvolatile\b", "volatile"),
]


def refuse_unmodelled(source: str) -> None:
    """Raise Unmodelled if ``source`` uses a construct from UNMODELLED."""
    code = re.sub(r"//[^\n]*|/\*.*?\*/", "", source, flags=re.S)
    for pattern, what in UNMODELLED:
        if m := re.search(pattern, code):
            line = code[: m.start()].count("\n") + 1
            raise Unmodelled(f"line {line}: {m.group(0)!r}: the harness cannot model {what}")


def to_numpy(a: mx.array) -> np.ndarray:
    """Row-contiguous numpy copy of ``a``; bfloat16 comes back as its uint16 bits."""
    return np.array(a.view(mx.uint16)) if a.dtype == mx.bfloat16 else np.array(a)


def from_numpy(a: np.ndarray, dtype) -> mx.array:
    return mx.array(a).view(mx.bfloat16) if dtype == mx.bfloat16 else mx.array(a)


def _template_arg(value):
    if isinstance(value, mx.Dtype):
        return "typename", TYPES[value][0]
    if isinstance(value, bool):
        return "bool", str(int(value))
    return "int", str(value)


def kernel_source(func: str, name: str, launch: dict):
    """(C++ source of the kernel function as mlx writes it, C++ call for one thread)."""
    kernel = rope.KERNELS[name]
    input_names, output_names, body = kernel.inputs, kernel.outputs, kernel.body
    for n, v in launch["template"]:
        if not isinstance(v, (mx.Dtype, bool, int)):
            raise Unmodelled(f"template argument {n}={v!r}: mlx takes dtypes, ints and bools")
    params, call = [], []
    for i, (n, a) in enumerate(zip(input_names, launch["inputs"])):
        t = TYPES[a.dtype][0]
        place = "constant" if a.size < MAX_CONSTANT_SIZE else "device"
        ref = "&" if a.ndim == 0 else "*"
        params.append(f"  const {place} {t}{ref} {n} [[buffer({len(params)})]]")
        call.append(f"*(const {t}*)in[{i}]" if a.ndim == 0 else f"(const {t}*)in[{i}]")
        if a.ndim > 0:
            for suffix, ctype, arg in (
                ("_shape", "const constant int*", f"(const int*)shapes[{i}]"),
                ("_strides", "const constant int64_t*", f"(const int64_t*)strides[{i}]"),
                ("_ndim", "const constant int&", f"*(const int*)ndims[{i}]"),
            ):
                if n + suffix in body:
                    params.append(f"  {ctype} {n}{suffix} [[buffer({len(params)})]]")
                    call.append(arg)
    for j, (n, d) in enumerate(zip(output_names, launch["output_dtypes"])):
        t = TYPES[d][0]
        params.append(f"  device {t}* {n} [[buffer({len(params)})]]")
        call.append(f"({t}*)out[{j}]")
    for attr, t in ATTRIBUTES:
        if attr in body:
            params.append(f"  {t} {attr} [[{attr}]]")
            call.append(f"t.{attr}")

    template = [(n, *_template_arg(v)) for n, v in launch["template"]]
    head = ""
    instance = func
    if template:
        head = "template <" + ", ".join(f"{kind} {n}" for n, kind, _ in template) + ">\n"
        instance += "<" + ", ".join(v for _, _, v in template) + ">"
    source = f"{head}[[kernel]] void {func}(\n" + ",\n".join(params) + ") {\n" + body + "\n}\n"
    return source, f"{instance}({', '.join(call)})"


class Harness:
    """Collect launches with ``add``, compile them all with ``build``, then ``run``."""

    def __init__(self, build_dir: Path, source: Path = None):
        self.dir = Path(build_dir)
        self.source = source  # None: the file rope.py loads
        self.functions = {}  # (source, call) -> function name
        self.lib = None

    def _key(self, name, launch):
        return kernel_source("KERNEL", name, launch)

    def add(self, name: str, launch: dict) -> None:
        key = self._key(name, launch)
        if key not in self.functions:
            self.functions[key] = f"kernel_{len(self.functions)}"
            self.lib = None

    def build(self) -> None:
        path = self.source or rope.metal_source_path()
        if self.source is None:
            assert path is not None and path.read_text() == rope.metal_source()
        refuse_unmodelled(Path(path).read_text())
        for (source, _), _ in self.functions.items():
            refuse_unmodelled(source.split("{", 1)[1])  # the body mlx wraps
        parts = [
            "#include <metal_stdlib>  // harness stand-in for mlx's kernel prelude",
            f'#include "{path}"  // the header rope.py hands to mx.fast.metal_kernel',
        ]
        for (source, call), func in self.functions.items():
            parts.append(source.replace("KERNEL", func, 1))
            parts.append(
                f'extern "C" void launch_{func}(void** in, void** shapes, void** strides, '
                "void** ndims, void** out, const unsigned* grid, const unsigned* group) {\n"
                "  harness::run_grid({grid[0], grid[1], grid[2]}, "
                "{group[0], group[1], group[2]}, [&](const harness::ThreadInfo& t) {\n"
                f"    {call.replace('KERNEL', func, 1)};\n"
                "  });\n}\n"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        cpp, lib = self.dir / "kernels.cpp", self.dir / "kernels.so"
        cpp.write_text("\n".join(parts))
        cmd = ["g++", "-std=c++17", "-O1", "-fPIC", "-shared", "-Wall", "-Wno-attributes",
               f"-I{HERE}", str(cpp), "-o", str(lib)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"g++ failed:\n{done.stderr}")
        self.warnings = done.stderr
        self.lib = ctypes.CDLL(str(lib))

    def run(self, name: str, launch: dict, tensors) -> list:
        """Run kernel ``name`` as ``launch`` says; ``tensors`` (numpy, any strides) stand
        in for the leading inputs, the rest are taken from ``launch``."""
        func = self.functions.get(self._key(name, launch))
        if self.lib is None or func is None:
            raise RuntimeError(f"launch of {name} was not built; add() it before build().")
        inputs = launch["inputs"]
        arrays = [*tensors, *(to_numpy(a) for a in inputs[len(tensors) :])]
        for a, ref in zip(arrays, inputs, strict=True):
            assert a.shape == tuple(ref.shape) and a.dtype == TYPES[ref.dtype][1], (a, ref)
        outs = [
            np.full(shape, np.nan, TYPES[d][1]) if d != mx.bfloat16
            else np.full(shape, 0x7FC0, np.uint16)  # NaN: any element not written shows
            for shape, d in zip(launch["output_shapes"], launch["output_dtypes"])
        ]  # fmt: skip
        meta = [
            (np.array(a.shape, np.int32), np.array([s // a.itemsize for s in a.strides], np.int64),
             np.array(a.ndim, np.int32))
            for a in arrays
        ]  # fmt: skip

        def pointers(items):
            return (ctypes.c_void_p * len(items))(*[i.ctypes.data for i in items])

        getattr(self.lib, f"launch_{func}")(
            pointers(arrays),
            pointers([m[0] for m in meta]),
            pointers([m[1] for m in meta]),
            pointers([m[2] for m in meta]),
            pointers(outs),
            np.array(launch["grid"], np.uint32).ctypes.data_as(ctypes.c_void_p),
            np.array(launch["threadgroup"], np.uint32).ctypes.data_as(ctypes.c_void_p),
        )
        return [from_numpy(o, d) for o, d in zip(outs, launch["output_dtypes"])]
