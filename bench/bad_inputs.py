"""Scripted bad input over every command, as a new user types it: the tally of how
each ends. Runs the commands as processes (``python -m repo_mlx.<command>``) with
the interpreter given, so the same cases run against any installed version.

    clean      exit status 2, one line ``error: ...``, nothing written, inputs intact
    refused    exit status 1 or 2, but more than one line (or a message without ``error:``)
    traceback  a Python traceback
    accepted   exit status 0: the command did the work (on input it should refuse)
    wrote      refused, but files appeared or changed
    lost       an input was changed or removed
    hang       no end within the timeout

    python bench/bad_inputs.py                       # this checkout's commands
    python bench/bad_inputs.py --python OTHER/python # another install of repo_mlx
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "repo-olmo2-tiny"
OUTCOMES = ("clean", "refused", "traceback", "accepted", "wrote", "lost", "hang")

# Builds, with the interpreter under test: a plain model, LoRA adapters, damaged adapters.
SETUP = r"""
import json, shutil, sys
from pathlib import Path
import mlx.core as mx
from mlx.utils import tree_flatten
from repo_mlx import load
from repo_mlx.adapters import setup_trainable
try:
    from repo_mlx import synthetic  # older versions
except ImportError:
    sys.path.insert(0, sys.argv[3])  # tests/synthetic.py
    import synthetic
root = Path(sys.argv[1])
synthetic.write_checkpoint(root / "plain", synthetic.config(repo=False), seed=1)
model, _ = load(sys.argv[2])
lora = setup_trainable(model, "lora", 4, {"rank": 4, "scale": 10.0, "dropout": 0.0}, "frozen")
weights = {k: mx.random.normal(v.shape) * 0.1 for k, v in tree_flatten(model.trainable_parameters())}
for name in ("adapters", "damaged"):
    (root / name).mkdir()
    mx.save_safetensors(str(root / name / "adapters.safetensors"), weights)
    (root / name / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 4, "lora_parameters": lora, "position_module": "frozen", "model": sys.argv[2]}))
raw = (root / "damaged" / "adapters.safetensors").read_bytes()
(root / "damaged" / "adapters.safetensors").write_bytes(raw[: len(raw) // 2])
"""


def make_inputs(python: str, root: Path) -> dict:
    """The inputs every case draws on, under ``root``."""
    shutil.copytree(FIXTURE, root / "model", ignore=shutil.ignore_patterns("*.npz"))
    subprocess.run([python, "-c", SETUP, str(root), str(root / "model"), str(Path(__file__).parents[1] / "tests")],
                   check=True, capture_output=True)
    (root / "data").mkdir()
    for split in ("train", "valid"):
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"the cat sat on mat {i}"}) + "\n" for i in range(8)))
    (root / "pairs").mkdir()
    (root / "pairs" / "train.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    (root / "text.txt").write_text("To be, or not to be, that is the question. " * 20)
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (root / "big.txt").write_text("All the world's a stage. " * 400_000)  # 10 MB: thousands of contexts
    (root / "empty.txt").write_text("")
    (root / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    (root / "config.yaml").write_text("learnig_rate: 1e-4\n")
    (root / "unrelated").mkdir()
    (root / "unrelated" / "mine.txt").write_text("keep me")
    return {k: str(root / k) for k in ("model", "plain", "adapters", "damaged", "data", "pairs", "text.txt", "latin1.txt",
                                       "big.txt", "empty.txt", "bad.jsonl", "config.yaml", "unrelated")}


def cases(i: dict) -> list:
    """(class, command, argv) of every case, in a fixed order."""
    m, out = i["model"], "out"
    base = {  # enough for each command to reach its work
        "generate": ["--model", m, "-p", "hi", "-m", "2"], "chat": ["--model", m, "-m", "2"],
        "positions": ["--model", m, "-p", "hi"], "viewer": ["--model", m, "-p", "hi", "--html", "v.html"],
        "cache_prompt": ["--model", m, "-p", "hi", "--prompt-cache-file", "c.safetensors"],
        "evaluate": ["--model", m, "--task", "niah_single", "--lengths", "256", "--samples", "1"],
        "benchmark": ["--model", m, "-p", "8", "-g", "2", "-n", "1"], "convert": ["--hf-path", m, "--mlx-path", out],
        "fuse": ["--model", m, "--adapter-path", i["adapters"], "--save-path", out],
        "lora": ["--model", m, "--train", "--data", i["data"], "--iters", "2", "--batch-size", "2"],
        "pretrain": ["--model", i["plain"], "--data", i["text.txt"], "--save-path", out, "--seq-len", "16",
                     "--batch-size", "2", "--iters", "2"],
        "lm_eval": ["--model", m, "--tasks", "arc_easy"], "server": ["--model", m, "--port", "0"],
        "doctor": ["--model", m],
    }
    out_cases = []
    # Values every parser must refuse, flag by flag.
    numbers = {
        "generate": ["--max-tokens", "--temp", "--top-p", "--top-k", "--min-p", "--seed", "--max-kv-size", "--kv-bits",
                     "--kv-group-size", "--position-blend", "--yarn"],
        "chat": ["--max-tokens", "--temp", "--top-p", "--top-k", "--min-p", "--seed", "--max-kv-size"],
        "positions": ["--yarn", "--max-tokens"], "viewer": ["--yarn", "--max-tokens", "--port"],
        "cache_prompt": ["--yarn", "--position-blend", "--prefill-step-size"],
        "evaluate": ["--samples", "--seed", "--window", "--stride", "--yarn"],
        "benchmark": ["--prompt-tokens", "--generation-tokens", "--batch-size", "--num-trials", "--kv-bits"],
        "convert": ["--q-bits", "--q-group-size"], "server": ["--port", "--max-tokens", "--temp", "--top-p",
                                                             "--max-request-bytes", "--prompt-cache-size"],
        "lora": ["--iters", "--batch-size", "--learning-rate", "--num-layers", "--seed", "--max-seq-length",
                 "--steps-per-report", "--save-every", "--val-batches", "--grad-accumulation-steps"],
        "pretrain": ["--iters", "--batch-size", "--seq-len", "--learning-rate", "--warmup", "--weight-decay",
                     "--grad-clip", "--seed", "--val-share", "--keep-checkpoints", "--yarn-factor"],
        "lm_eval": ["--limit", "--num-shots", "--batch-size", "--seed"],
    }
    bad_numbers = ["abc", "", "-5", "1e999", "nan"]
    for name, flags in numbers.items():
        for flag in flags:
            for v in bad_numbers:
                out_cases.append(("bad value", name, [*base[name], f"{flag}={v}"]))
    for name in base:  # a model that is not there, a file, a latin-1 prompt file
        flag = "--hf-path" if name == "convert" else "--model"
        argv = base[name]
        k = argv.index(flag) if flag in argv else None
        for v in ("missing-model", i["text.txt"], i["unrelated"]):
            if k is not None:
                out_cases.append(("bad model", name, [*argv[:k + 1], v, *argv[k + 2:]]))
    for name in ("generate", "positions", "viewer", "cache_prompt"):
        out_cases.append(("bad text", name, [*base[name], "--prompt-file", i["latin1.txt"]]))
        out_cases.append(("bad text", name, [*base[name], "--prompt-file", i["empty.txt"]]))
    for name in ("lora",):
        for data in (i["bad.jsonl"], i["unrelated"], i["pairs"]):
            out_cases.append(("bad data", name, [*base[name][:-6], "--data", data, "--iters", "2", "--batch-size", "2"]))
        out_cases.append(("bad data", name, [*base[name], "-c", i["config.yaml"]]))
    # 1. outputs that are inputs, or not ours to replace
    out_cases += [
        ("output is input", "positions", ["--model", m, "--prompt-file", i["text.txt"], "--csv", i["text.txt"]]),
        ("output is input", "positions", ["--model", m, "-p", "hi", "--csv", "same", "--json", "same"]),
        ("output is input", "cache_prompt", ["--model", m, "-p", "hi", "--prompt-cache-file", f"{m}/model.safetensors"]),
        ("output is input", "viewer", ["--model", m, "--prompt-file", i["text.txt"], "--html", i["text.txt"]]),
        ("output is input", "evaluate", ["--model", m, "--task", "perplexity", "--data", i["text.txt"], "--output", i["text.txt"]]),
        ("output is input", "convert", ["--hf-path", m, "--mlx-path", ".", "--force"]),
        ("output is input", "convert", ["--hf-path", m, "--mlx-path", i["unrelated"], "--force"]),
        ("output is input", "convert", ["--hf-path", m, "--mlx-path", m, "--force"]),
        ("output is input", "fuse", ["--model", m, "--adapter-path", i["adapters"], "--save-path", i["adapters"], "--force"]),
        ("output is input", "fuse", ["--model", m, "--adapter-path", i["adapters"], "--save-path", i["unrelated"], "--force"]),
        ("output is input", "lora", [*base["lora"], "--adapter-path", i["unrelated"]]),
        ("output is input", "lora", [*base["lora"], "--adapter-path", i["data"]]),
        ("output is input", "pretrain", [*base["pretrain"], "--plot", i["text.txt"]]),
        ("output is input", "pretrain", [*base["pretrain"][:-6], "--save-path", i["unrelated"], "--force", "--seq-len", "16", "--batch-size", "2", "--iters", "2"]),
    ]
    # 2. conflicts that used to be found after the work
    undecodable = "caf\udce9"
    out_cases += [
        ("late conflict", "pretrain", [*base["pretrain"], "--export-hf", out]),
        ("late conflict", "convert", [*base["convert"], "--upload-repo", "not a repo id!!"]),
        ("late conflict", "fuse", [*base["fuse"], "--upload-repo", "not a repo id!!"]),
        *[("late conflict", name, [*base[name], flag, undecodable]) for name, flag in
          (("convert", "--mlx-path"), ("fuse", "--save-path"), ("cache_prompt", "--prompt-cache-file"),
           ("lora", "--adapter-path"), ("pretrain", "--save-path"), ("positions", "--csv"), ("viewer", "--html"))],
    ]
    # 3. damaged adapters
    for name in ("generate", "chat", "fuse", "cache_prompt", "lm_eval"):
        argv = [a for a in base[name]]
        if "--adapter-path" in argv:
            argv[argv.index("--adapter-path") + 1] = i["damaged"]
        else:
            argv += ["--adapter-path", i["damaged"]]
        out_cases.append(("damaged adapters", name, argv))
    # 4. training that diverges
    out_cases += [("diverges", "lora", [*base["lora"], "--learning-rate", "1e30", "--steps-per-eval", "100"]),
                  ("diverges", "pretrain", [*base["pretrain"], "--learning-rate", "1e30", "--dtype", "float32"])]
    # 5. absurd sizes
    out_cases += [
        ("absurd size", "evaluate", ["--model", m, "--task", "niah_single", "--lengths", "1K", "--samples", "100000000"]),
        ("absurd size", "generate", ["--model", m, "--prompt-file", i["big.txt"], "-m", "2"]),
        ("absurd size", "positions", ["--model", m, "--prompt-file", i["big.txt"]]),
        ("absurd size", "cache_prompt", ["--model", m, "--prompt-file", i["big.txt"], "--prompt-cache-file", "c.safetensors"]),
        ("absurd size", "generate", [*base["generate"], "--yarn", "1e30"]),
        ("absurd size", "viewer", [*base["viewer"], "--max-tokens", "100000000"]),
        ("absurd size", "benchmark", [*base["benchmark"][:2], "-p", "100000000", "-g", "2", "-n", "1"]),
        ("absurd size", "generate", [*base["generate"][:-1], "2000000000"]),
    ]
    # 6. tracebacks seen before
    out_cases += [
        ("traceback seen", "pretrain", [*base["pretrain"][:-6], "--seq-len", "1", "--batch-size", "2", "--iters", "2"]),
        ("traceback seen", "pretrain", ["--model", m, *base["pretrain"][2:], "--repo-layer-ids", "a,b"]),
        ("traceback seen", "pretrain", ["--model", m, *base["pretrain"][2:], "--repo-layer-ids", "99"]),
        ("traceback seen", "lora", [*base["lora"], "--clear-cache-threshold", "-1"]),
    ]
    return out_cases


def digest(root: Path) -> dict:
    """Every file under root: its hash (inputs) or size (outputs are judged by presence)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha1(p.read_bytes()).hexdigest() if p.stat().st_size < 20_000_000 else p.stat().st_size
    return out


def run_case(python: str, work: Path, inputs_root: Path, name: str, argv: list, timeout: float) -> tuple:
    before_inputs, before_work = digest(inputs_root), digest(work)
    cmd = [python, "-m", f"repo_mlx.{name}", *[os.fsencode(a) if "\udce9" in a else a for a in argv]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "TOKENIZERS_PARALLELISM": "false"}
    try:
        r = subprocess.run(cmd, cwd=work, capture_output=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "hang", f"no end in {timeout:g} s"
    err = r.stderr.decode("utf-8", "replace")
    lines = [l for l in err.strip().splitlines() if not l.startswith("[WARNING]")]
    after_inputs = digest(inputs_root)
    if after_inputs != before_inputs:
        return "lost", f"inputs changed: {sorted(set(before_inputs.items()) ^ set(after_inputs.items()))[:2]}"
    if "Traceback" in err:
        return "traceback", (lines or [""])[-1]
    if r.returncode == 0:
        return "accepted", "exit 0"
    wrote = digest(work) != before_work
    if r.returncode in (1, 2) and len(lines) == 1 and lines[0].startswith("error: "):
        return ("wrote" if wrote else "clean"), lines[0]
    return ("wrote" if wrote else "refused"), f"exit {r.returncode}: " + " | ".join(lines[-2:])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python", default=sys.executable, help="The interpreter whose repo_mlx runs the cases (default: this one).")
    p.add_argument("--timeout", type=float, default=120.0, help="Seconds before a case counts as a hang (default: 120).")
    p.add_argument("--every", type=int, default=1, help="Run every n-th case (default: all).")
    p.add_argument("--only", help="Comma-separated classes to run, e.g. 'bad model,diverges' (default: all).")
    p.add_argument("--verbose", action="store_true", help="Print each case as it ends.")
    p.add_argument("--json", help="Also write every case's outcome here.")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "inputs").mkdir()
        inputs = make_inputs(args.python, root / "inputs")
        shutil.copytree(root / "inputs", root / "pristine", symlinks=True)
        only = args.only and {c.strip() for c in args.only.split(",")}
        selected = [c for c in cases(inputs) if not only or c[0] in only][:: args.every]
        rows = []
        for n, (cls, name, argv) in enumerate(selected):
            work = root / f"work{n}"
            work.mkdir()
            outcome, detail = run_case(args.python, work, root / "inputs", name, argv, args.timeout)
            rows.append({"class": cls, "command": name, "argv": argv, "outcome": outcome, "detail": detail[:300]})
            if outcome == "lost":  # the next cases get the inputs back
                shutil.rmtree(root / "inputs")
                shutil.copytree(root / "pristine", root / "inputs", symlinks=True)
            if args.verbose:
                print(f"{outcome:9s} {cls:17s} {name} {' '.join(map(repr, argv[-4:]))}: {detail[:140]}", flush=True)
    counts = Counter(r["outcome"] for r in rows)
    print(f"{len(rows)} cases: " + ", ".join(f"{counts[o]} {o}" for o in OUTCOMES))
    for cls in dict.fromkeys(r["class"] for r in rows):
        c = Counter(r["outcome"] for r in rows if r["class"] == cls)
        print(f"  {cls:17s} " + ", ".join(f"{c[o]} {o}" for o in OUTCOMES if c[o]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
