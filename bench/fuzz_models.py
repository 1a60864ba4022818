"""Corrupted model and adapter folders through ``repo_mlx.generate``: no traceback,
no hang, no silent NaN.

Each case is the official tiny checkpoint, or LoRA adapters for it, with one
fault: config.json (adapter_config.json) of the wrong shape, a key of the wrong
type or an absurd size; a safetensors header with bad keys, offsets, dtypes or
shapes, or a truncated file; a folder, symlink loop or FIFO where a file
belongs; an index whose weight_map is not a mapping; a GGUF file given as the
model. Every case runs ``generate`` (two tokens) in a worker process that is
killed past a timeout. The outcomes:

    clean      one line ``error: ...``, exit status 2
    ran        generated text with finite logits, or warned that they are NaN
    nan        ran, logits not finite, and no warning said so
    traceback  anything else (another exception, exit status or a longer error)
    hang       no answer within the timeout

    python bench/fuzz_models.py              # every case (300+), prints the counts
    python bench/fuzz_models.py --every 4    # a quarter of them, each class kept
"""

import argparse
import contextlib
import io
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import struct
import sys
import tempfile
from collections import Counter
from pathlib import Path

FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "repo-olmo2-tiny"
OUTCOMES = ("clean", "ran", "nan", "traceback", "hang")

# Values of the wrong type or size for config keys.
BAD_VALUES = [True, "64", None, [], {}, -1, 0, 1.5, 1e12, 10**18, math.nan, math.inf, -5.0]
CONFIG_KEYS = [
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta",
    "max_position_embeddings", "head_dim", "rope_scaling", "pe_config",
    "tie_word_embeddings", "eos_token_id", "model_type", "attention_bias",
]


# --- how a case spoils the folder ------------------------------------------------

def _config(folder, name="config.json"):
    return json.loads((folder / name).read_text())


def _write_config(folder, config, name="config.json"):
    (folder / name).write_text(json.dumps(config))  # NaN/Infinity as Python writes them


def set_config(key, value, name="config.json"):
    def spoil(folder):
        config = _config(folder, name)
        config[key] = value
        _write_config(folder, config, name)
    return spoil


def drop_config(key):
    def spoil(folder):
        config = _config(folder)
        config.pop(key, None)
        _write_config(folder, config)
    return spoil


def whole_config(text):
    return lambda folder: (folder / "config.json").write_text(text)


def _read_st(folder, name="model.safetensors"):
    raw = (folder / name).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_st(folder, header, data, n=None, name="model.safetensors"):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    (folder / name).write_bytes(struct.pack("<Q", len(h) if n is None else n) + h + data)


def header_edit(fn, name="model.safetensors"):
    """Apply fn(header, names) to the safetensors header, data unchanged."""
    def spoil(folder):
        header, data = _read_st(folder, name)
        names = sorted(k for k in header if k != "__metadata__")
        fn(header, names)
        _write_st(folder, header, data, name=name)
    return spoil


def entry(i, field, value, edit=True):
    def fn(header, names):
        header[names[i % len(names)]][field] = value
    return header_edit(fn) if edit else fn


def rename(i, new):
    def fn(header, names):
        header[new] = header.pop(names[i % len(names)])
    return header_edit(fn)


def remove(i):
    return header_edit(lambda header, names: header.pop(names[i % len(names)]))


def raw_header(n=None, text=None, name="model.safetensors"):
    def spoil(folder):
        header, data = _read_st(folder, name)
        if text is None:
            _write_st(folder, header, data, n, name)
        else:
            (folder / name).write_bytes(struct.pack("<Q", len(text)) + text + data)
    return spoil


def truncate(fraction, name="model.safetensors"):
    def spoil(folder):
        p = folder / name
        raw = p.read_bytes()
        p.write_bytes(raw[: int(len(raw) * fraction)])
    return spoil


def replace_with(name, what):
    def spoil(folder):
        p = folder / name
        if p.exists():
            p.unlink()
        if what == "dir":
            p.mkdir()
        elif what == "fifo":
            os.mkfifo(p)
        elif what == "loop":
            p.symlink_to(p.name)
        elif what == "empty":
            p.write_bytes(b"")
        elif what == "binary":
            p.write_bytes(bytes(range(256)) * 4)
    return spoil


def index(weight_map):
    def spoil(folder):
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return spoil


def gguf(as_file):
    def spoil(folder):
        blob = b"GGUF" + struct.pack("<I", 3) + bytes(64)
        if as_file:
            return blob  # the case passes the file itself as --model
        (folder / "model.safetensors").unlink()
        (folder / "model-q4_0.gguf").write_bytes(blob)
    return spoil


def adapter_cases():
    """The same faults in an adapter folder (``adapters/`` beside the model)."""
    inside = lambda spoil: lambda folder: spoil(folder / "adapters")
    out = [(f"adapter_config.json is {t!r}", lambda f, t=t: (f / "adapters" / "adapter_config.json").write_text(t))
           for t in ("[]", "null", "{", "", '{"position_module": "frozen"}')]
    for key, v in [("num_layers", "4"), ("num_layers", 99), ("num_layers", None), ("fine_tune_type", "nope"),
                   ("lora_parameters", 5), ("lora_parameters", {"rank": -1}), ("position_module", "sideways")]:
        out.append((f"adapter_config {key}={v!r}", inside(set_config(key, v, "adapter_config.json"))))
    for fraction in (0.0, 0.3, 0.999):
        out.append((f"adapters truncated to {fraction}", inside(truncate(fraction, "adapters.safetensors"))))
    for n in (0, 7, 2**40):
        out.append((f"adapters header length {n}", inside(raw_header(n=n, name="adapters.safetensors"))))
    for i in (0, 5):
        for field, v in [("dtype", "XX"), ("shape", [1]), ("data_offsets", [0, 10**15])]:
            out.append((f"adapter tensor {i} {field}={v!r}", inside(header_edit(entry(i, field, v, edit=False), "adapters.safetensors"))))
    for what in ("dir", "fifo", "empty"):
        out.append((f"adapters.safetensors is a {what}", inside(replace_with("adapters.safetensors", what))))
    return out


def cases():
    """(name, spoil) for every case, in a fixed order."""
    out = adapter_cases()
    for text in ("[]", "null", '"olmo2"', "3", "{", "", '{"model_type": "olmo2"}'):
        out.append((f"config.json is {text!r}", whole_config(text)))
    for key in CONFIG_KEYS:
        for v in BAD_VALUES:
            out.append((f"config {key}={v!r}", set_config(key, v)))
        out.append((f"config without {key}", drop_config(key)))
    for key, v in [("rms_norm_eps", 1e300), ("rope_theta", 1e-300), ("hidden_size", 65), ("num_attention_heads", 3),
                   ("num_key_value_heads", 3), ("head_dim", 8), ("vocab_size", 319), ("intermediate_size", 127),
                   ("rope_scaling", {"rope_type": "yarn", "factor": -2}), ("rope_scaling", {"rope_type": "nope"}),
                   ("rope_scaling", {"rope_type": "yarn", "factor": "x"}), ("pe_config", {"dynamic_pe_start_layer": 99}),
                   ("pe_config", {"dynamic_pe_layer_ids": "a,b"}), ("pe_config", {"dynamic_pe_start_layer": "1"})]:
        out.append((f"config {key}={v!r}", set_config(key, v)))
    for i in range(0, 40, 3):
        for field, v in [("dtype", "F16"), ("dtype", "XX"), ("dtype", 7), ("shape", [1]), ("shape", [-1, 64]),
                         ("shape", [10**12, 10**12]), ("shape", "64"), ("data_offsets", [0, 10**15]),
                         ("data_offsets", [100, 50]), ("data_offsets", [0]), ("data_offsets", "0,4"),
                         ("data_offsets", [-8, 0])]:
            out.append((f"tensor {i} {field}={v!r}", entry(i, field, v)))
        out.append((f"tensor {i} renamed", rename(i, "model.layers.0.nonsense.weight")))
        out.append((f"tensor {i} removed", remove(i)))
    out.append(("tensor entry not a mapping", header_edit(lambda h, names: h.__setitem__(names[0], [1, 2]))))
    out.append(("extra tensor", header_edit(lambda h, names: h.__setitem__("extra.weight", dict(h[names[0]])))))
    out.append(("metadata not a mapping", header_edit(lambda h, names: h.__setitem__("__metadata__", 5))))
    for n in (0, 1, 7, 2**40, 2**64 - 1):
        out.append((f"header length {n}", raw_header(n=n)))
    for text in (b"[1, 2]", b"null", b"{bad json", b"\xff\xfe" * 8, b'"x"' + b" " * 5):
        out.append((f"header {text[:12]!r}", raw_header(text=text)))
    for fraction in (0.0, 0.001, 0.3, 0.9, 0.999):
        out.append((f"weights truncated to {fraction}", truncate(fraction)))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        for what in ("dir", "fifo", "loop", "empty", "binary"):
            out.append((f"{name} is a {what}", replace_with(name, what)))
    for wm in ([], "model.safetensors", None, 5, {"lm_head.weight": 5}, {"lm_head.weight": "missing.safetensors"},
               {"lm_head.weight": "../config.json"}):
        out.append((f"index weight_map={wm!r}", index(wm)))
    out.append(("index is not JSON", lambda f: (f / "model.safetensors.index.json").write_text("{")))
    out.append(("index is a FIFO", replace_with("model.safetensors.index.json", "fifo")))
    out.append(("GGUF file as --model", gguf(True)))
    out.append(("GGUF file in the folder", gguf(False)))
    return out


def write_adapters(folder: Path) -> None:
    """LoRA adapters for the fixture (random B, so they change the output), as lora writes them."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from repo_mlx import load
    from repo_mlx.adapters import setup_trainable

    model, _ = load(str(FIXTURE))
    lora = setup_trainable(model, "lora", 4, {"rank": 4, "scale": 10.0, "dropout": 0.0}, "frozen")
    mx.random.seed(0)
    weights = {k: mx.random.normal(v.shape) * 0.1 for k, v in tree_flatten(model.trainable_parameters())}
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 4, "lora_parameters": lora, "position_module": "frozen"}))


_TEMPLATE = []


def adapter_template() -> Path:
    """The adapters, written once a run."""
    if not _TEMPLATE:
        _TEMPLATE.append(Path(tempfile.mkdtemp()) / "adapters")
        write_adapters(_TEMPLATE[0])
    return _TEMPLATE[0]


def make_case(spoil, root: Path) -> Path:
    """A spoiled copy of the fixture (with adapters/ beside it); the path to pass as --model."""
    folder = root / "model"
    shutil.copytree(FIXTURE, folder, ignore=shutil.ignore_patterns("*.npz"))
    shutil.copytree(adapter_template(), folder / "adapters")
    blob = spoil(folder)
    if isinstance(blob, bytes):
        (root / "model.gguf").write_bytes(blob)
        return root / "model.gguf"
    return folder


# --- running a case ----------------------------------------------------------------

def _worker(jobs, results):
    import warnings

    import mlx.core as mx

    import importlib

    from repo_mlx import load

    generate = importlib.import_module("repo_mlx.generate")  # the package's generate is the function

    while True:
        model = jobs.get()
        err = io.StringIO()
        code = 0
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("always")
            try:
                generate.main(["--model", model, "-p", "hello", "-m", "2", "--verbose", "0", "--adapter-path", f"{model}/adapters"])
            except SystemExit as e:
                code = e.code
            except BaseException as e:  # noqa: BLE001 - anything else is the finding
                code = f"{type(e).__name__}: {e}"
        err = err.getvalue()
        finite = None
        if code == 0:
            try:  # did the model's output go NaN?
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m, tok = load(model, adapter_path=f"{model}/adapters")
                    finite = bool(mx.isfinite(m(mx.array([tok.encode("hello")]))).all())
            except BaseException:  # noqa: BLE001
                finite = False
        results.put((code, err, finite))


def classify(code, err, finite) -> str:
    lines = err.strip().splitlines()
    if code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err:
        return "clean"
    if code == 0 and "Traceback" not in err:
        return "ran" if finite or "NaN" in err else "nan"
    return "traceback"


class Runner:
    """One worker process, replaced when a case hangs."""

    def __init__(self, timeout: float):
        self.timeout, self.ctx, self.proc = timeout, mp.get_context("spawn"), None

    def _start(self):
        self.jobs, self.results = self.ctx.Queue(), self.ctx.Queue()
        self.proc = self.ctx.Process(target=_worker, args=(self.jobs, self.results), daemon=True)
        self.proc.start()

    def run(self, model: Path):
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.jobs.put(str(model))
        try:
            # The first case also pays for the imports.
            return self.results.get(timeout=self.timeout)
        except queue.Empty:
            self.close()
            return None

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()
            self.proc = None


def run_cases(selected, timeout: float = 30.0, verbose: bool = False):
    """[(name, outcome, detail)] for the cases."""
    runner, rows = Runner(timeout), []
    try:
        for name, spoil in selected:
            with tempfile.TemporaryDirectory() as tmp:
                model = make_case(spoil, Path(tmp))
                got = runner.run(model)
            if got is None:
                outcome, detail = "hang", f"no answer in {timeout:g} s"
            else:
                code, err, finite = got
                outcome = classify(code, err, finite)
                detail = err.strip().splitlines()[-1] if err.strip() else str(code)
            rows.append((name, outcome, detail))
            if verbose:
                print(f"{outcome:9s} {name}: {detail[:160]}", flush=True)
    finally:
        runner.close()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--every", type=int, default=1, help="Run every n-th case (default: all).")
    p.add_argument("--timeout", type=float, default=30.0, help="Seconds before a case counts as a hang.")
    p.add_argument("--verbose", action="store_true", help="Print each case's outcome and last line.")
    args = p.parse_args()
    selected = cases()[:: args.every]
    rows = run_cases(selected, args.timeout, args.verbose)
    counts = Counter(outcome for _, outcome, _ in rows)
    print(f"{len(rows)} cases: " + ", ".join(f"{counts[o]} {o}" for o in OUTCOMES))
    for name, outcome, detail in rows:
        if outcome not in ("clean", "ran"):
            print(f"  {outcome}: {name}: {detail[:200]}")
    sys.exit(1 if counts["traceback"] or counts["hang"] or counts["nan"] else 0)


if __name__ == "__main__":
    main()
