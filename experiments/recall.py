"""Multi-query associative recall with noise, from scratch: ``python experiments/recall.py``.

A task tiny models learn on a CPU, where where-a-token-sits matters: key-value pairs with
spans of noise tokens between and around them, then every key asked again; the model must
give each key's value. Tiny OLMo-2 models are trained from scratch, layer 0 always RoPE and
the layers above it RoPE, RePo or NoPE (a position module fixed at 0), same init, data order
and recipe for every arm of a seed; trained at one length and noise level, tested at longer
and noisier ones. Reports accuracy per setting, paired by seed, and what the RePo layers'
positions carry (rank correlation with the index, where noise falls against keys, values and
queries, the token-index probe). Finished runs are kept; rerunning resumes.
See docs/experiment.md.
"""

import argparse
import json
import os
import shutil
import time
from functools import partial
from pathlib import Path

import numpy as np

import analysis  # experiments/analysis.py, beside this script
from analysis import fail, log

PRESETS = {
    "smoke": dict(hidden_size=32, layers=2, heads=2, pairs=3, keys=16, noise_tokens=8,
                  train_length=32, train_noise="0-3", tests="64:0-3,64:4-8",
                  steps=20, batch_size=8, lr=3e-3, warmup=2, seeds="0", eval_items=16, steps_per_eval=10),
    "default": dict(hidden_size=64, layers=2, heads=4, pairs=6, keys=64, noise_tokens=16,
                    train_length=64, train_noise="0-3", tests="64:4-6,96:0-3,128:0-3,128:4-8,256:8-16,512:16-32",
                    steps=4000, batch_size=32, lr=3e-3, warmup=200, seeds="0,1,2", eval_items=500,
                    steps_per_eval=500),
}
ARMS = (("rope", "RoPE"), ("nope", "NoPE"), ("repo", "RePo"))
PAIRS = (("repo", "rope"), ("repo", "nope"), ("nope", "rope"))
NAMES = dict(ARMS)
EVAL_SEED = 10_000  # evaluation sequences; training batches use (seed, step)


# ----------------------------------------------------------------- data
def noise_range(text):
    """'0-3' -> (0, 3)."""
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        fail(f"noise range {text!r}: expected LOW-HIGH, e.g. 0-3.")
    if not 0 <= lo <= hi:
        fail(f"noise range {text!r}: expected 0 <= LOW <= HIGH.")
    return lo, hi


def settings(cfg):
    """[(label, length, (noise lo, hi))]: the training setting first, then the tests."""
    out = [(f"{cfg.train_length}, noise {cfg.train_noise} (trained)", cfg.train_length, noise_range(cfg.train_noise))]
    for t in cfg.tests.split(","):
        length, _, noise = t.partition(":")
        if not length.isdigit() or not noise:
            fail(f"--tests entry {t!r}: expected LENGTH:LOW-HIGH, e.g. 128:4-8.")
        out.append((f"{length}, noise {noise}", int(length), noise_range(noise)))
    for label, length, (lo, hi) in out:
        need = 2 * cfg.pairs + cfg.pairs * hi + 2 * cfg.pairs
        if need > length:
            fail(f"setting {label}: {cfg.pairs} pairs with up to {hi} noise tokens after each need "
                 f"{need} tokens, more than {length}.")
    return out


def vocab(cfg):
    """Token ids: noise 0..n-1, keys n..n+k-1, values n+k..n+2k-1."""
    n, k = cfg.noise_tokens, cfg.keys
    return {"noise": (0, n), "key": (n, n + k), "value": (n + k, n + 2 * k), "size": n + 2 * k}


def make_batch(cfg, rng, batch, length, noise):
    """tokens [B, length], answer mask [B, length] (1 where the token is an answer) and
    labels [B, length] (filler / key / value / query / answer).

    A sequence: noise, then each pair "key value" followed by lo..hi noise tokens, then the
    keys again in a new order, each followed by its value (the answer, the only scored token).
    The leading noise pads the sequence to ``length``.
    """
    v = vocab(cfg)
    toks = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.float32)
    labels = np.full((batch, length), "filler", dtype=object)
    for b in range(batch):
        keys = rng.choice(np.arange(*v["key"]), cfg.pairs, replace=False)
        values = rng.integers(*v["value"], cfg.pairs)
        gaps = rng.integers(noise[0], noise[1] + 1, cfg.pairs)
        body, lab = [], []
        for k, val, g in zip(keys, values, gaps):
            body += [k, val] + list(rng.integers(*v["noise"], g))
            lab += ["key", "value"] + ["filler"] * g
        order = rng.permutation(cfg.pairs)
        for i in order:
            body += [keys[i], values[i]]
            lab += ["query", "answer"]
        lead = length - len(body)
        toks[b] = list(rng.integers(*v["noise"], lead)) + body
        labels[b, lead:] = lab
        mask[b] = labels[b] == "answer"
    return toks, mask, labels


# ----------------------------------------------------------------- models
def build(cfg, arm, seed):
    """A randomly initialised OLMo-2 for one arm: the shared weights come from ``seed`` (the
    same in every arm); RePo and NoPE add the position module in layers >= 1, RePo with the
    official init (normal, std 0.02, cut at 3 std), NoPE with final_map = 0 and frozen."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from repo_mlx.repo_olmo2 import Model, ModelArgs

    config = dict(model_type="olmo2", hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
                  intermediate_size=4 * cfg.hidden_size, num_attention_heads=cfg.heads,
                  rms_norm_eps=1e-6, vocab_size=vocab(cfg)["size"], rope_theta=10000.0,
                  max_position_embeddings=cfg.train_length)
    mx.random.seed(seed)
    plain = Model(ModelArgs(**config))
    if arm == "rope":
        return plain, config
    config["pe_config"] = {"dynamic_pe_mode": "swigluex_multihead", "dynamic_pe_start_layer": 1,
                           "dynmaic_pe_start_layer": 1, "dynamic_pe_layer_ids": "", "dynmaic_pe_layer_ids": ""}
    model = Model(ModelArgs(**config))
    model.load_weights(list(tree_flatten(plain.parameters())), strict=False)
    key = mx.random.key(seed + 1_000_000)
    for i in model.args.repo_layers:
        attn = model.layers[i].self_attn
        for name in ("gate_map", "content_map", "final_map"):
            key, sub = mx.random.split(key)
            lin = getattr(attn, name)
            lin.weight = 0.02 * mx.random.truncated_normal(-3.0, 3.0, lin.weight.shape, key=sub)
        if arm == "nope":
            attn.final_map.weight = mx.zeros_like(attn.final_map.weight)
            for name in ("gate_map", "content_map", "final_map"):
                getattr(attn, name).freeze()
    return model, config


def answer_loss(model, toks, mask):
    import mlx.nn as nn

    logits = model(toks[:, :-1])
    ce = nn.losses.cross_entropy(logits, toks[:, 1:], reduction="none")
    m = mask[:, 1:]
    return (ce * m).sum() / m.sum()


def accuracy(model, cfg, length, noise, items, seed=EVAL_SEED, batch=64):
    """Share of answers predicted right (greedy, teacher-forced), on ``items`` fixed sequences."""
    import mlx.core as mx

    rng = np.random.default_rng([seed, length, *noise])
    right = total = 0
    for start in range(0, items, batch):
        toks, mask, _ = make_batch(cfg, rng, min(batch, items - start), length, noise)
        pred = mx.argmax(model(mx.array(toks[:, :-1])), axis=-1)
        hit = (np.array(pred) == toks[:, 1:]) * mask[:, 1:]
        right += hit.sum()
        total += mask[:, 1:].sum()
    return float(right / total)


def train(cfg, arm, seed, folder):
    """One arm and seed: AdamW with torch's bias correction, betas (0.9, 0.95), weight decay
    0.1, warm-up then linear decay to 0, gradient clip 1.0; the loss is on the answers only."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    model, config = build(cfg, arm, seed)
    lr = optim.join_schedules([optim.linear_schedule(0.0, cfg.lr, cfg.warmup),
                               optim.linear_schedule(cfg.lr, 0.0, cfg.steps - cfg.warmup)], [cfg.warmup])
    opt = optim.AdamW(learning_rate=lr, betas=[0.9, 0.95], weight_decay=0.1, bias_correction=True)
    loss_and_grad = nn.value_and_grad(model, answer_loss)
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(toks, mask):
        loss, grads = loss_and_grad(model, toks, mask)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss

    noise = noise_range(cfg.train_noise)
    rng = np.random.default_rng([seed, 1])  # the data order: the same for every arm of a seed
    metrics, t0, losses = [], time.time(), []
    for i in range(1, cfg.steps + 1):
        toks, mask, _ = make_batch(cfg, rng, cfg.batch_size, cfg.train_length, noise)
        loss = step(mx.array(toks), mx.array(mask))
        mx.eval(state)
        losses.append(loss.item())
        if i % cfg.steps_per_eval == 0 or i == cfg.steps:
            acc = accuracy(model, cfg, cfg.train_length, noise, min(cfg.eval_items, 256), seed=EVAL_SEED + 1)
            metrics.append({"step": i, "loss": float(np.mean(losses)), "accuracy": acc,
                            "seconds": round(time.time() - t0, 1)})
            losses = []
            log(f"{arm}-{seed} step {i}: answer loss {metrics[-1]['loss']:.3f}, accuracy {acc:.3f}")
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    shutil.rmtree(folder, ignore_errors=True)  # a stopped run's unfinished folder
    os.replace(tmp, folder)
    return model


def load(folder):
    import mlx.core as mx

    from repo_mlx.repo_olmo2 import Model, ModelArgs

    model = Model(ModelArgs(**json.loads((folder / "config.json").read_text())))
    model.load_weights(str(folder / "model.safetensors"))
    mx.eval(model.parameters())
    return model


# ----------------------------------------------------------------- analysis
def position_stats(cfg, model, length, noise, items=16):
    """Per RePo layer and head, on ``items`` evaluation sequences: IQR, rank correlation with
    the token index, and where noise, keys, values and query keys fall (analysis.placement)."""
    from repo_mlx.positions import positions

    rng = np.random.default_rng([EVAL_SEED, 7, length, *noise])
    toks, _, labels = make_batch(cfg, rng, items, length, noise)
    z = positions(model, toks)
    out = {}
    for layer, v in z.items():
        v = np.array(v)
        heads = []
        for h in range(v.shape[1]):
            per = [analysis.placement(v[b, h], labels[b]) for b in range(items)]
            heads.append({
                "iqr": float(np.mean([np.subtract(*np.percentile(v[b, h], [75, 25])) for b in range(items)])),
                "spearman": float(np.nanmean([analysis.spearman(v[b, h]) for b in range(items)])),
                "placement": {g: {k: float(np.mean([p[g][k] for p in per])) for k in ("percentile", "to_query")}
                              for g in analysis.GROUPS},
            })
        out[str(layer)] = heads
    return out


def integer_placement(cfg, length, noise, items=16):
    rng = np.random.default_rng([EVAL_SEED, 7, length, *noise])
    _, _, labels = make_batch(cfg, rng, items, length, noise)
    per = [analysis.placement(np.arange(length, dtype=float), labels[b]) for b in range(items)]
    return {g: {k: float(np.mean([p[g][k] for p in per])) for k in ("percentile", "to_query")} for g in analysis.GROUPS}


def probe(cfg, model, length, noise):
    from repo_mlx.probe import index_probe

    rng = np.random.default_rng([EVAL_SEED, 8, length, *noise])
    toks, _, _ = make_batch(cfg, rng, 16, length, noise)
    return {str(l): r for l, r in index_probe(model, toks.tolist()).items()}


# ----------------------------------------------------------------- report
def report(cfg, out, seeds, results, timing):
    sets = settings(cfg)
    acc = {label: {a: [results[f"{a}-{s}"]["accuracy"][label] for s in seeds] for a, _ in ARMS}
           for label, _, _ in sets}
    rows = []
    lines = ["| setting (length, noise tokens after each pair) | " + " | ".join(f"{n}" for _, n in ARMS)
             + " | " + " | ".join(f"{NAMES[a]} − {NAMES[b]}" for a, b in PAIRS) + " |",
             "|---" * (1 + len(ARMS) + len(PAIRS)) + "|"]
    for label, length, noise in sets:
        cells = {a: f"{100 * np.mean(v):.1f}" + (f" ± {100 * np.std(v, ddof=1):.1f}" if len(v) > 1 else "")
                 for a, v in acc[label].items()}
        pairs = {f"{a}-{b}": analysis.paired(acc[label][a], acc[label][b], lower_is_better=False) for a, b in PAIRS}
        lines.append(f"| {label} | " + " | ".join(cells[a] for a, _ in ARMS) + " | "
                     + " | ".join(analysis.fmt_paired(pairs[f"{a}-{b}"], scale=100, decimals=1) for a, b in PAIRS) + " |")
        rows.append({"setting": label, "length": length, "noise": list(noise), "accuracy": acc[label], "paired": pairs})

    # Positions of the RePo arm, per layer (head means over seeds) and the strongest head.
    _, L, noise = sets[-1]
    pos_lines = ["| where | layer | IQR | rank corr. with index: head mean (lowest .. highest head) | noise percentile "
                 "| key percentile | value percentile | query percentile | noise to query | value to query |",
                 "|---" * 10 + "|"]
    ref = results["integer_placement"]
    for where in ("train", "test"):
        ref_p = ref[where]
        pos_lines.append(f"| {where}: integer positions | any | | 1.00 | " + " | ".join(
            f"{ref_p[g]['percentile']:.2f}" for g in analysis.GROUPS) + f" | {ref_p['filler']['to_query']:.2f} | "
            f"{ref_p['value']['to_query']:.2f} |")
        for layer in results[f"repo-{seeds[0]}"]["positions"][where]:
            heads = [h for s in seeds for h in results[f"repo-{s}"]["positions"][where][layer]]
            rho = [h["spearman"] for h in heads]
            m = {g: {k: np.mean([h["placement"][g][k] for h in heads]) for k in ("percentile", "to_query")}
                 for g in analysis.GROUPS}
            pos_lines.append(
                f"| {where}: RePo arm | {layer} | {np.mean([h['iqr'] for h in heads]):.3f} | {np.nanmean(rho):+.2f} "
                f"({np.nanmin(rho):+.2f} .. {np.nanmax(rho):+.2f}) | "
                + " | ".join(f"{m[g]['percentile']:.2f}" for g in analysis.GROUPS)
                + f" | {m['filler']['to_query']:.2f} | {m['value']['to_query']:.2f} |")
    probe_lines = ["| layer | " + " | ".join(n for _, n in ARMS) + " |", "|---" * (1 + len(ARMS)) + "|"]
    for layer in results[f"rope-{seeds[0]}"]["probe"]:
        probe_lines.append(f"| {layer} | " + " | ".join(
            f"{np.mean([results[f'{a}-{s}']['probe'][layer] for s in seeds]):.2f}" for a, _ in ARMS) + " |")
    v = vocab(cfg)
    md = [
        "# Associative recall with noise: RoPE, NoPE and RePo above a RoPE layer", "",
        f"OLMo-2 from scratch: hidden {cfg.hidden_size}, {cfg.layers} layers, {cfg.heads} heads; layer 0 RoPE, "
        f"layers 1..{cfg.layers - 1} the arm's. Vocabulary {v['size']}: {cfg.noise_tokens} noise tokens, {cfg.keys} keys, "
        f"{cfg.keys} values. {cfg.pairs} key-value pairs per sequence, each followed by a span of noise tokens, "
        f"leading noise up to the length, then every key again followed by its value (the only scored tokens). "
        f"Trained at length {cfg.train_length}, noise {cfg.train_noise} after each pair: {cfg.steps} steps of "
        f"{cfg.batch_size} sequences, lr {cfg.lr} ({cfg.warmup} warm-up steps, linear decay to 0), AdamW "
        f"(torch's bias correction, betas 0.9/0.95, weight decay 0.1), clip 1.0. Seeds {cfg.seeds}: the seed "
        "fixes the shared initial weights and the data order of every arm.", "",
        f"Answer accuracy (greedy, teacher-forced), {cfg.eval_items} fixed sequences ({cfg.eval_items * cfg.pairs} "
        "answers) per setting, the same for every model; mean ± sd over seeds, in %. Paired columns: A − B per "
        "seed in percentage points, mean ± sd, and (k/n) the seeds where A is better.", "",
        *lines, "",
        f"Positions the RePo arm assigns (16 sequences of the training setting, and of the last test setting, "
        f"length {L}, noise {noise[0]}-{noise[1]}; all heads and seeds). Percentile: mean rank of a group's "
        "positions among the sequence's (0 lowest, 1 highest); 'to query': mean distance to the query keys' "
        "mean position in position sds.", "",
        *pos_lines, "",
        "Token-index probe (repo_mlx.probe): held-out R^2 of the token index from each layer's attention input, "
        "16 sequences of the training setting (mean over seeds):", "", *probe_lines, "",
        "![training](training.png)", "",
        f"Wall time (s): {json.dumps(timing)}; BLAS preloaded: "
        f"{', '.join(Path(p).name for p in os.environ.get('LD_PRELOAD', '').split()) or 'no'}.", "",
    ]
    return "\n".join(md), rows


def plot(out, seeds, results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (arm, name), color, style in zip(ARMS, ("tab:blue", "tab:green", "tab:red"), ("o-", "o--", "o-")):
        for i, s in enumerate(seeds):
            m = results[f"{arm}-{s}"]["metrics"]
            ax.plot([r["step"] for r in m], [100 * r["accuracy"] for r in m], style, color=color, alpha=0.6,
                    label=name if i == 0 else None)
    ax.set(xlabel="step", ylabel="accuracy (%), training setting", title="Recall accuracy during training, every seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------- driver
def build_parser():
    p = argparse.ArgumentParser(
        prog="python experiments/recall.py",
        description="Associative recall with noise from scratch: RoPE, NoPE and RePo above a RoPE layer, "
        "trained at one length and noise level, tested at longer and noisier ones. Rerun to resume.")
    p.add_argument("--out", default="recall_run", help="Run folder (default: recall_run).")
    analysis.add_preset_flags(p, PRESETS, "default")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = analysis.preset_settings(args, PRESETS, "default")
    if cfg.layers < 2 or cfg.hidden_size % cfg.heads or cfg.hidden_size < 8:
        fail("need at least 2 layers (layer 0 stays RoPE) and a hidden size >= 8 divisible by --heads.")
    if cfg.pairs > cfg.keys or cfg.steps <= cfg.warmup:
        fail("need --pairs <= --keys and --steps > --warmup.")
    try:
        seeds = [int(s) for s in cfg.seeds.split(",")]
    except ValueError:
        fail(f"--seeds {cfg.seeds!r}: expected integers separated by commas.")
    sets = settings(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "settings.json"
    fixed = lambda d: {k: v for k, v in d.items() if k != "tests"}  # noqa: E731 (new test settings reuse the models)
    if saved.exists() and fixed(json.loads(saved.read_text())) != fixed(vars(cfg)):
        fail(f"{out} was started with other settings ({saved}); use another --out or the same flags "
             "(only --tests may change).")
    saved.write_text(json.dumps(vars(cfg), indent=2))
    results, timing = {}, {}
    train_set, last = sets[0], sets[-1]
    for s in seeds:
        for arm, _ in ARMS:
            name, folder = f"{arm}-{s}", out / "runs" / f"{arm}-{s}"
            done = out / "runs" / f"{name}.json"
            if not done.exists():
                if (folder / "metrics.json").exists():  # trained, stopped before its record was written
                    log(f"{name}: reusing the trained model")
                    model, seconds = load(folder), None
                else:
                    log(f"{name}: training")
                    t = time.time()
                    model = train(cfg, arm, s, folder)
                    seconds = round(time.time() - t, 1)
                metrics = json.loads((folder / "metrics.json").read_text())
                r = {"train_seconds": seconds or metrics[-1]["seconds"], "accuracy": {}, "eval_seconds": 0.0,
                     "probe": probe(cfg, model, train_set[1], train_set[2]), "metrics": metrics}
                done.write_text(json.dumps(r, indent=1))
            r = json.loads(done.read_text())
            # Settings not evaluated yet (all of them after training, new ones after --tests changed).
            missing = [x for x in sets if x[0] not in r["accuracy"]]
            stale = arm == "repo" and r.get("positions", {}).get("test_setting") != last[0]
            if missing or stale:
                log(f"{name}: evaluating")
                t = time.time()
                model = load(folder)
                for label, length, noise in missing:
                    r["accuracy"][label] = accuracy(model, cfg, length, noise, cfg.eval_items)
                if arm == "repo":
                    r["positions"] = {"train": position_stats(cfg, model, train_set[1], train_set[2]),
                                      "test": position_stats(cfg, model, last[1], last[2]), "test_setting": last[0]}
                r["eval_seconds"] = round(r["eval_seconds"] + time.time() - t, 1)
                done.write_text(json.dumps(r, indent=1))
            results[name] = r
            timing[name] = r["train_seconds"] + r["eval_seconds"]
    results["integer_placement"] = {w: integer_placement(cfg, n, z) for w, (_, n, z) in
                                    (("train", train_set), ("test", last))}
    (out / "report").mkdir(exist_ok=True)
    md, rows = report(cfg, out, seeds, results, timing)
    plot(out, seeds, results, out / "report" / "training.png")
    (out / "report" / "report.md").write_text(md)
    (out / "report" / "results.json").write_text(json.dumps(
        {"settings": vars(cfg), "table": rows, "runs": results, "seconds": timing}, indent=1))
    log(f"done: {out / 'report' / 'report.md'}")
    print("\n".join(l for l in md.splitlines() if l.startswith("|"))[:4000])


if __name__ == "__main__":
    main()
