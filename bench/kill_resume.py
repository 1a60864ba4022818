"""SIGKILL pre-training and LoRA at random moments, resume until done, compare.

Each command first runs uninterrupted; then the same run is killed again and
again (at random moments, and once just as pretrain starts its final write),
each time restarted with --resume (or afresh when no checkpoint exists yet),
until it completes. The final weights and the last checkpoint must equal the
uninterrupted run's bit for bit, and no scratch file may remain. Exits 1 if
any differ.

    python bench/kill_resume.py --kills 12 --seed 0
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # synthetic.py lives with the tests
import synthetic  # noqa: E402  random official-format checkpoints

TEXT = "the {a} sat on the {p}. the {a} likes the {p}."
ANIMALS, PLACES = ["cat", "dog", "fox", "owl", "bee"], ["mat", "log", "box", "hill", "tree"]


def write_data(root: Path) -> Path:
    rng = random.Random(0)
    lines = [json.dumps({"text": TEXT.format(a=rng.choice(ANIMALS), p=rng.choice(PLACES))}) for _ in range(200)]
    (root / "data").mkdir()
    for name, n in (("train", 160), ("valid", 40)):
        (root / "data" / f"{name}.jsonl").write_text("\n".join(lines[:n]) + "\n")
    return root / "data"


def pretrain_argv(base, data, out, iters):
    return ["-m", "repo_mlx.pretrain", "--model", str(base), "--data", str(data / "train.jsonl"),
            "--save-path", str(out), "--seq-len", "32", "--batch-size", "4", "--dtype", "bfloat16",
            "--learning-rate", "1e-3", "--iters", str(iters), "--save-every", "2",
            "--steps-per-eval", "4", "--steps-per-report", "1", "--repo-start-layer", "1",
            "--grad-accumulation-steps", "2"]


def lora_argv(base, data, out, iters):
    return ["-m", "repo_mlx.lora", "--model", str(base), "--train", "--data", str(data),
            "--adapter-path", str(out), "--iters", str(iters), "--batch-size", "4",
            "--learning-rate", "1e-3", "--num-layers", "-1", "--save-every", "2",
            "--steps-per-eval", "4", "--steps-per-report", "1", "--position-module", "lora"]


def start(argv):
    return subprocess.Popen([sys.executable, "-u", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def killed_run(command, fresh, resume, done, rng, kills, lines, final_write_kill=None):
    """Kill ``kills`` times, then let it finish; returns the number of kills made.

    A kill comes at a random moment after a random one of the first half of
    the run's output lines (``lines``: how many the uninterrupted run printed),
    so each restarted run makes some progress and is killed again.
    """
    made = 0
    while not done():
        p = start(resume() or fresh)
        if made < kills:
            if final_write_kill and made == kills - 1:
                for line in p.stdout:  # pretrain's final write starts after the last checkpoint
                    if any(m in line for m in final_write_kill):
                        break
            else:
                n = rng.randrange(max(2, lines // 2))  # a resumed run prints fewer
                for i, line in enumerate(p.stdout):
                    if i >= n:
                        break
                time.sleep(rng.uniform(0.0, 0.3))
            if p.poll() is None:
                p.kill()
                made += 1
                what = "final write" if final_write_kill and made == kills else "run"
                print(f"{command}: kill {made} during the {what}", flush=True)
            p.wait()
            continue
        out = p.communicate()[0]
        if p.returncode != 0:
            raise SystemExit(f"{command}: the finishing run failed ({p.returncode}):\n{out[-2000:]}")
    return made


def output_lines(argv) -> int:
    return len(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.splitlines())


def same(a: Path, b: Path) -> bool:
    x, y = mx.load(str(a)), mx.load(str(b))
    return x.keys() == y.keys() and all(mx.array_equal(x[k], y[k]).item() for k in x)


def scratch(root: Path):
    return [p for p in root.rglob(".*") if ".partial-" in p.name or ".old-" in p.name]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=10, help="Kills per command (default: 10).")
    p.add_argument("--iters", type=int, default=12, help="Steps (pretrain) and iterations (lora) (default: 12).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the kill moments (default: 0).")
    a = p.parse_args()
    rng = random.Random(a.seed)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_data(root)
        plain = synthetic.write_checkpoint(root / "plain", synthetic.config(repo=False), seed=1)
        repo = synthetic.write_checkpoint(root / "repo", synthetic.config(), seed=1, position_scale=0.05)

        ref, out = root / "pre-ref", root / "pre"
        lines = output_lines([sys.executable, *pretrain_argv(plain, data, ref, a.iters)])
        has_ckpt = lambda: any((out / "checkpoints").glob("step-???????.safetensors"))
        n = killed_run(
            "pretrain", pretrain_argv(plain, data, out, a.iters) + ["--force"],
            lambda: ["-m", "repo_mlx.pretrain", "--resume", str(out)] if has_ckpt() else None,
            lambda: (out / "config.json").exists(), rng, a.kills, lines,
            final_write_kill=(f"step-{a.iters:07d}", "writing the final model"),
        )
        last = f"checkpoints/step-{a.iters:07d}.safetensors"
        good = all(same(ref / f, out / f) for f in ("model.safetensors", last))
        print(f"pretrain: {n} kills, final model and last checkpoint bit-identical: {good}; scratch left: {scratch(root)}")
        ok &= good and not scratch(root)

        ref, out = root / "lora-ref", root / "lora"
        lines = output_lines([sys.executable, *lora_argv(repo, data, ref, a.iters)])
        latest = out / "adapters.safetensors"
        iteration = lambda: mx.load(str(latest), return_metadata=True)[1].get("step") if latest.exists() else None
        n = killed_run(
            "lora", lora_argv(repo, data, out, a.iters),
            lambda: lora_argv(repo, data, out, a.iters) + ["--resume-adapter-file", str(latest)]
            if iteration() not in (None, str(a.iters)) else None,
            lambda: iteration() == str(a.iters), rng, a.kills, lines,
        )
        good = same(ref / "adapters.safetensors", latest)
        print(f"lora: {n} kills, final adapters bit-identical: {good}; scratch left: {scratch(root)}")
        ok &= good and not scratch(root)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
