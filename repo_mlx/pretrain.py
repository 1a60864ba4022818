"""Continual pre-training into RePo: ``python -m repo_mlx.pretrain --model BASE --data PATH``.

The paper's recipe (arXiv 2512.14391; docs/pretrain.md): a position module, initialised as the official
trainer does, in the upper layers of a plain base (one position per key/value head, docs/gqa.md), then
all parameters trained on packed text; a RePo BASE keeps its module. Data-parallel under ``mlx.launch``."""

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import types
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import cli_ui
from mlx_lm.utils import get_total_parameters

from . import _cli, adapters, pretrain_data
from .files import atomic_file, atomic_folder, check_outputs, remove_stale
from .export_hf import check_exportable, export_hf
from .errors import LoadError, one_line
from .position_stats import summary
from .probe import index_probe
from . import trainer as trainer_lib
from .trainer import Trainer, train as train_loop
from .rope import POSITION_WEIGHTS, pe_config, positions, repo_layer_ids, set_position_blend
from .loader import (DTYPES, architecture_name, get_model_path, load_config, load_model,
                     load_tokenizer, model_file, save_standalone, yarn_scaling)

TRAIN_ONLY = ("all", "position", "position+lora")
DEFAULTS = {
    "model": None, "data": None, "val_data": None, "val_share": 0.01, "val_batches": 8,
    "text_feature": "text", "data_split": "train", "save_path": "repo_model",
    "repo_start_layer": None, "repo_layer_ids": None, "position_warmup": 0,
    "plain": False, "nope": False, "train_only": "all", "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
    # The official run (configs/official-0425/...-SEXMH-L5.yaml of the RePo release).
    "iters": 1000, "batch_size": 4, "grad_accumulation_steps": 1, "seq_len": 4096,
    "learning_rate": 7.4487e-5, "warmup": 0, "betas": [0.9, 0.95], "weight_decay": 0.1,
    "adam_eps": 1e-8, "grad_clip": 1.0, "z_loss": 1e-5, "dtype": "bfloat16",
    "grad_checkpoint": False, "seed": 0, "steps_per_report": 10, "steps_per_eval": 200,
    "save_every": 100, "keep_checkpoints": 1, "plot": None, "export_hf": None,
    "dry_run": False, "probe": False, "yarn_factor": None, "force": False, "resume": None,
}
POSITIVE = ("iters", "batch_size", "grad_accumulation_steps", "seq_len", "steps_per_report",
            "steps_per_eval", "save_every", "keep_checkpoints")
# Settings a resumed run must share with the original to continue it exactly: all but these.
RUN_DEFINING = tuple(k for k in DEFAULTS if k not in (
    "val_batches", "save_path", "grad_checkpoint", "steps_per_report", "steps_per_eval", "save_every",
    "keep_checkpoints", "plot", "export_hf", "dry_run", "probe", "force", "resume"))
ARGS_FILE, METRICS_FILE = "pretrain_args.json", "metrics.jsonl"


rprint = partial(cli_ui.rprint, flush=True)  # rank 0 only; progress shows at once when piped


def default_start_layer(num_layers: int) -> int:
    """The release's 5 of 16 at any depth: RePo from layer round(n * 5 / 16) on, halves rounded up."""
    return (5 * num_layers + 8) // 16


def init_position_weights(model, seed: int, nope: bool = False) -> Dict[str, mx.array]:
    """New position-module weights (HF names) for every RePo layer, as the official trainer's init
    (normal, std 0.02, cut at 3 std). ``nope``: final_map is 0, so every position is 0 (no rotation)."""
    key = mx.random.key(seed)
    out = {}
    for i in model.args.repo_layers:
        for name in POSITION_WEIGHTS:
            key, sub = mx.random.split(key)
            shape = getattr(model.layers[i].self_attn, name).weight.shape
            w = 0.02 * mx.random.truncated_normal(-3.0, 3.0, shape, key=sub)
            if nope and name == "final_map":
                w = mx.zeros_like(w)
            out[f"model.layers.{i}.self_attn.{name}.weight"] = w
    return out


def prepare_model(args, log=rprint):
    """Load BASE, add the position module if it has none; returns what training needs."""
    src = get_model_path(args.model)
    config = load_config(src)
    arch, name = model_file(config), architecture_name(config)
    if args.export_hf:
        check_exportable(config)
    n = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    quantized = "quantization" in config or "quantization_config" in config
    if quantized and args.train_only == "all":
        raise LoadError(
            f"{args.model} is quantized; --train-only all needs float weights. Use "
            "--train-only position or position+lora, or a float base (convert without -q)."
        )
    if quantized and args.export_hf:
        raise LoadError("--export-hf needs a float base; this one is quantized.")

    def layer_ids(pe, where):
        try:
            return repo_layer_ids(pe, n)
        except ValueError as e:
            raise LoadError(f"{where}: {one_line(e)}") from None

    existing = layer_ids(config.get("pe_config"), src / "config.json")
    overrides = {}
    if args.yarn_factor:
        overrides.update(yarn_scaling(args.yarn_factor, config.get("max_position_embeddings") or 4096))
    context = overrides.get("max_position_embeddings", config.get("max_position_embeddings"))
    if context and args.seq_len > context:
        raise LoadError(
            f"--seq-len {args.seq_len} is longer than the base's context of {context} "
            f"tokens; use --seq-len {context} or pass --yarn-factor "
            f"{math.ceil(args.seq_len / context)} (YaRN, as the paper did for 8K/16K)."
        )
    ids = args.repo_layer_ids
    if args.plain and args.nope:
        raise LoadError("--plain and --nope are two different controls; pass one of them.")
    if args.nope and (existing or args.train_only != "all"):
        raise LoadError(
            "--nope inserts a position module fixed at 0 into a plain base and trains every "
            f"other weight; {'drop --train-only' if not existing else f'{args.model} is already a RePo model'}."
        )
    new_layers = []
    if args.plain:
        if existing:
            raise LoadError(f"--plain continues a plain {name}, but {args.model} is a RePo model (RePo layers {existing}).")
        if args.repo_start_layer is not None or ids or args.position_warmup or args.train_only != "all":
            raise LoadError("--plain trains every weight of a plain model; drop --repo-start-layer, --repo-layer-ids, --position-warmup and --train-only.")
    elif existing:
        if args.repo_start_layer is not None or ids:
            wanted = layer_ids(pe_config(args.repo_start_layer or 0, ids or ""), "--repo-layer-ids")
            if wanted != existing:
                raise LoadError(
                    f"{args.model} is already a RePo model with RePo layers {existing}; "
                    f"--repo-start-layer/--repo-layer-ids ask for {wanted}. Drop them to "
                    f"continue training its module, or start from a plain {name}."
                )
    else:
        start = default_start_layer(n) if args.repo_start_layer is None else args.repo_start_layer
        if not 0 <= start < n:
            raise LoadError(f"--repo-start-layer {start} is beyond the base's {n} layers (0..{n - 1}).")
        if kv != heads and config["model_type"] == "olmo2":
            raise LoadError(
                f"{args.model} uses grouped-query attention ({kv} key/value heads for "
                f"{heads} query heads); RePo rotates head h's keys by query head h's "
                "positions, so it needs a base with as many key/value heads as query heads."
            )
        pe = pe_config(start, ids or "")
        new_layers = layer_ids(pe, "--repo-layer-ids")
        if not new_layers:
            raise LoadError(f"--repo-layer-ids {ids} has no layer >= --repo-start-layer {start}.")
        overrides["pe_config"] = pe

    class InsertedRePo(arch.Model):  # loading adds a freshly initialised position module
        def sanitize(self, weights):
            dtype = weights["model.norm.weight"].dtype  # float even in a quantized base
            new = {k: v.astype(dtype) for k, v in init_position_weights(self, args.seed, args.nope).items()}
            # The loader's own config/weight cross-check then runs on the result.
            return super().sanitize({**new, **weights})

    model_class = InsertedRePo if new_layers else arch.Model
    model, config = load_model(src, model_config=overrides, lazy=True, model_class=model_class)
    config.pop("position_blend", None)
    stored = config.get("torch_dtype") or "float32"
    tokenizer = load_tokenizer(src, eos_token_ids=config.get("eos_token_id"))
    if tokenizer.eos_token_id is None:
        raise LoadError(f"The tokenizer in {src} has no EOS token to separate documents.")
    if args.plain:
        log(f"Plain {name}: continuing without a position module (the RoPE control)")
    elif new_layers and args.nope:
        log(f"NoPE control: layers {new_layers} get a position module fixed at 0 (no rotation), frozen")
    elif new_layers:
        log(f"Inserted the position module into layers {new_layers} (truncated normal, std 0.02)")
    else:
        log(f"RePo base: continuing its position module in layers {existing}")
    return types.SimpleNamespace(
        model=model, tokenizer=tokenizer, config=config, src=src,
        repo_layers=new_layers or existing, inserted=bool(new_layers),
        quantized=quantized, stored_dtype=stored if stored in DTYPES else "float32",
    )


def to_compute_dtype(prep, dtype: str) -> Optional[dict]:
    """Cast to the compute dtype; returns float32 masters of the trainable weights from the stored
    values, before they are rounded. A quantized base keeps its format."""
    model, master = prep.model, None
    if not prep.quantized:
        if dtype != "float32":
            master = {k: v.astype(mx.float32) for k, v in tree_flatten(model.trainable_parameters())}
        model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters(), master)
    return master


def setup_trainable(model, train_only: str, lora_parameters: Optional[dict], nope: bool = False) -> Optional[dict]:
    """all: every parameter; position: gate/content/final maps; position+lora: plus LoRA.
    ``nope``: every parameter but the position module, which keeps positions at 0."""
    if train_only == "position+lora":
        return adapters.setup_trainable(model, "lora", -1, lora_parameters, "full")
    if train_only == "all":
        model.unfreeze()
        for m in adapters.position_maps(model.layers) if nope else []:
            m.freeze()
        return None
    model.freeze()
    for m in adapters.position_maps(model.layers):
        m.unfreeze()
    return None


def build_optimizer(args):
    """torch's AdamW with linear decay to 0 (after an optional warm-up). As the official run, weight
    decay on norms (decay_norm_and_bias: true) but not on embeddings (decay_embeddings: false)."""
    lr = optim.linear_schedule(args.learning_rate, 0.0, max(args.iters - args.warmup, 1))
    if args.warmup:
        ramp = optim.linear_schedule(0.0, args.learning_rate, args.warmup)
        lr = optim.join_schedules([ramp, lr], [args.warmup])
    # bias_correction: torch's AdamW, which the official trainer uses, always corrects;
    # MLX's default would move every weight by (1 - b1) / sqrt(1 - b2) x lr at step 1.
    kw = dict(learning_rate=lr, betas=list(args.betas), eps=args.adam_eps, bias_correction=True)
    return optim.MultiOptimizer(
        [optim.AdamW(weight_decay=0.0, **kw), optim.AdamW(weight_decay=args.weight_decay, **kw)],
        [lambda path, _: path.startswith("model.embed_tokens")],
    )


def count_parameters(model) -> Dict[str, int]:
    """The model's parameters as it will train: total (quantized weights unpacked, as
    mlx-lm counts them), trainable, of the position module and of LoRA adapters."""
    size = lambda tree: sum(v.size for _, v in tree_flatten(tree))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    return {
        "total": get_total_parameters(model),
        "trainable": size(trainable),
        "position": sum(size(m.parameters()) for m in adapters.position_maps(model.layers)),
        "adapters": size({k: v for k, v in trainable.items() if ".lora_" in k}),
    }


def estimate_memory(model, s) -> Dict[str, float]:
    """Estimated peak bytes, by part, of one training step with the settings ``s`` (batch_size per
    process). Activations: what the backward pass keeps, attention matrices included (MLX's
    attention backward materialises them), and the logits in float32 for the loss."""
    a, n = model.args, count_parameters(model)
    b = 4 if s.dtype == "float32" else 2
    q = next((m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)), None)
    wbytes = (q.bits + 32 / q.group_size) / 8 if q else b  # packed weights, scales and biases
    frozen = n["total"] - (n["trainable"] - n["adapters"])
    # LoRA weights and the position module of a quantized base stay float32.
    tb = 4 if q else b
    weights = frozen * wbytes + n["trainable"] * tb
    master = 4 * n["trainable"] if tb < 4 else 0
    grads = n["trainable"] * tb * (2 if s.grad_accumulation_steps > 1 else 1)
    grads += 4 * n["trainable"] if tb < 4 else 0  # float32 copy for the update
    optimizer = 2 * 4 * n["trainable"]
    d, f, h, L = a.hidden_size, a.intermediate_size, a.num_attention_heads, a.num_hidden_layers
    hd = a.head_dim or d // h
    qd, kvd = h * hd, a.num_key_value_heads * hd
    T = s.batch_size * s.seq_len
    per_token = b * (6 * d + 5 * qd + 4 * kvd + 4 * f) + 4 * (h * hd)  # + float32 cos/sin
    repo_extra = b * 3 * (d // 8) + 4 * a.num_key_value_heads
    attention = s.batch_size * 2 * h * s.seq_len ** 2 * 4
    layer = T * per_token + attention
    if s.grad_checkpoint:
        acts = L * T * d * b + 2 * (layer + T * repo_extra)
    else:
        acts = L * layer + len(a.repo_layers) * T * repo_extra + layer
    logits = T * a.vocab_size * (b + 4 + 4)
    parts = {"weights": weights, "master weights": master, "gradients": grads,
             "optimizer": optimizer, "activations": acts + logits}
    parts["total"] = sum(parts.values())
    return parts


def print_probe(prep, sequences, windows: int = 16, length: int = 512) -> None:
    """The token-index probe (repo_mlx.probe) of BASE as loaded: a new module is
    blended to integer positions, so the probe sees the base itself."""
    if len(sequences) < 4:
        raise LoadError(f"--probe needs at least 4 sequences of --data; it gives {len(sequences)}: add text or lower --seq-len.")
    if prep.inserted:
        set_position_blend(prep.model, 1.0)
    r2 = index_probe(prep.model, [np.asarray(s)[:length] for s in sequences[:windows]])
    rprint(f"Token-index probe, {min(len(sequences), windows)} windows of {min(length, len(sequences[0]))} tokens:")
    for layer, v in r2.items():
        rprint(f"  layer {layer:3d}  R^2 {v:6.2f}" + ("  (RePo layer)" if layer in prep.repo_layers else ""))


def loss_fn(model, batch, z_loss: float):
    """Next-token cross-entropy of every packed token, plus OLMo's z-loss."""
    logits = model(batch)[:, :-1]
    if logits.dtype in (mx.bfloat16, mx.float16):  # the loss in float32, as OLMo's fused loss
        logits = logits.astype(mx.float32)
    targets = batch[:, 1:]
    lse = mx.logsumexp(logits, axis=-1)
    ce = (lse - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]).mean()
    z = z_loss * mx.square(lse).mean()
    return ce + z, (ce, z)


def make_trainer(model, args, master: Optional[dict] = None) -> Trainer:
    """The shared loop's Trainer: a step is one update of --grad-accumulation-steps batches."""
    accum = args.grad_accumulation_steps
    return Trainer(model, build_optimizer(args), partial(loss_fn, z_loss=args.z_loss),
                   seed=args.seed, micro_batches=accum, accumulate=accum, grad_clip=args.grad_clip or None,
                   grad_checkpoint=args.grad_checkpoint, position_warmup=args.position_warmup,
                   master=master)


def local_batch(data: pretrain_data.Packed, idx) -> mx.array:
    """This process's share of the global batch of sequences ``idx``."""
    world = mx.distributed.init()
    local = len(idx) // world.size()
    return mx.array(data.batch(idx[world.rank() * local : (world.rank() + 1) * local]))


def batches(data: pretrain_data.Packed, args, step: int = 0):
    """This process's share of each global batch from step ``step`` on; the order depends only on
    (seed, sequences drawn), so a resumed run draws what an uninterrupted one would."""
    cursor = step * args.grad_accumulation_steps * args.batch_size
    while True:
        yield (local_batch(data, pretrain_data.batch_indices(len(data), args.seed, cursor, args.batch_size)),)
        cursor += args.batch_size


def validation_loss(model, val: pretrain_data.Packed, args) -> float:
    world = mx.distributed.init()
    # A short validation set wraps around to fill its batches.
    n = max(1, len(val) // args.batch_size)
    if args.val_batches > 0:
        n = min(n, args.val_batches)
    total = mx.array(0.0)
    for i in range(n):
        batch = local_batch(val, np.arange(i * args.batch_size, (i + 1) * args.batch_size) % len(val))
        total = total + loss_fn(model, batch, 0.0)[1][0]
        mx.eval(total)
    total = mx.distributed.all_sum(total, stream=mx.cpu) / world.size()
    return total.item() / n


def checkpoints(out: Path) -> List[Path]:
    """OUT/checkpoints/step-NNNNNNN.safetensors, oldest first."""
    return sorted(f for f in (out / "checkpoints").glob("step-*.safetensors") if ".state." not in f.name)


def read_metrics(out: Path) -> List[dict]:
    """metrics.jsonl's records; a line cut short by a kill is skipped."""
    records = []
    for line in (out / METRICS_FILE).read_text().splitlines():
        with suppress(ValueError):
            records.append(json.loads(line))
    return records


def plot_metrics(records: List[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LoadError("--plot needs matplotlib: pip install 'repo-mlx[plot]'.") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax1.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax1.set(xlabel="step", ylabel="cross-entropy", title="Loss")
    ax1.legend()
    pos = [r for r in records if "positions" in r]
    for layer in (pos[0]["positions"] if pos else {}):
        ax2.plot([r["step"] for r in pos], [r["positions"][layer]["iqr"] for r in pos], label=f"layer {layer}")
    ax2.set(xlabel="step", ylabel="position IQR (head mean)", title="Position spread per RePo layer")
    if pos:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def save_model(prep, trainer, args, out: Path) -> None:
    """The final model in OUT (standalone MLX folder) and, if asked, the HF format."""
    model = prep.model
    set_position_blend(model, 0.0)
    if not prep.quantized and args.dtype != prep.stored_dtype:
        # Frozen weights as stored, not rounded to the compute dtype.
        base = {k: v for f in sorted(prep.src.glob("model*.safetensors")) for k, v in mx.load(str(f)).items()}
        trainable = dict(tree_flatten(model.trainable_parameters()))
        frozen = []
        for k, v in tree_flatten(model.parameters()):
            b = base.get(k.replace(".linear.", "."))  # a LoRA layer wraps the base linear
            if k not in trainable and b is not None and b.shape == v.shape:
                frozen.append((k, b))
        model.set_dtype(mx.float32)
        model.update(tree_unflatten(frozen))
    if trainer.master:  # the float32 masters, not their half-precision copies
        model.update(tree_unflatten(list(trainer.master.items())))
    fused = [(n, adapters.fuse_layer(m)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    config = dict(prep.config)
    if not prep.quantized:
        model.set_dtype(getattr(mx, prep.stored_dtype))
        config["torch_dtype"] = prep.stored_dtype
    if args.export_hf:
        with atomic_folder(Path(args.export_hf), args.force or bool(args.resume)) as tmp:
            export_hf(tmp, model, prep.tokenizer, config, prep.src)
        rprint(f"Exported the Hugging Face format to {args.export_hf}")
    tmp = out / f".final.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # No config.json while the model files change: its presence marks a finished run.
    (out / "config.json").unlink(missing_ok=True)
    try:
        save_standalone(tmp, prep.src, model, prep.tokenizer, config, donate_model=False)
        # Into OUT, config.json last: no loader sees a half model.
        for f in sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: p.name == "config.json"):
            target = out / f.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train(prep, trainer: Trainer, train_set, val_set, args, out: Path, fingerprint: str, on_step=None):
    """The shared loop with pretrain's reports, metrics.jsonl and checkpoints."""
    rank0 = trainer.world.rank() == 0
    probe = mx.array(np.asarray(val_set[0] if len(val_set) else train_set[0], dtype=np.int32))
    start, tic = trainer.step, time.perf_counter()

    def log(record):
        if rank0:
            with open(out / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    def report(step, metrics, norm, steps, seconds):
        n = steps * args.grad_accumulation_steps * trainer.world.size()
        lr = trainer.optimizer.learning_rate.item()
        rate = (step - start) / (time.perf_counter() - tic)
        record = {
            "step": step, "loss": metrics[0] / n, "z_loss": metrics[1] / n,
            "learning_rate": lr, "grad_norm": norm if args.grad_clip else None,  # only clipping computes it
            "tokens_per_second": steps * args.batch_size * args.grad_accumulation_steps * args.seq_len / seconds,
            "trained_tokens": step * args.batch_size * args.grad_accumulation_steps * args.seq_len,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "eta_seconds": (args.iters - step) / rate,
            "position_blend": trainer.blend(step - 1),
        }
        rprint(
            f"Step {step}/{args.iters}: loss {record['loss']:.4f}, z-loss {record['z_loss']:.2e}, "
            f"lr {lr:.3e}, {f'grad norm {norm:.3f}, ' if args.grad_clip else ''}tokens/s "
            f"{record['tokens_per_second']:.0f}, peak mem {record['peak_memory_gb']:.3f} GB, "
            f"ETA {record['eta_seconds'] / 60:.1f} min"
        )
        log(record)

    def evaluate(step):
        record, text = {"step": step}, f"Step {step}:"
        if len(val_set):
            record["val_loss"] = validation_loss(trainer.model, val_set, args)
            text += f" val loss {record['val_loss']:.4f}"
        if prep.repo_layers and rank0:  # per RePo layer, the head means of the position summary
            record["positions"] = {}
            for layer, z in positions(trainer.model, probe[None]).items():
                heads = [summary(np.array(z[0, h])) for h in range(z.shape[1])]
                record["positions"][str(layer)] = {k: float(np.mean([s[k] for s in heads])) for k in heads[0]}
        for layer, s in record.get("positions", {}).items():
            text += f" | L{layer} IQR {s['iqr']:.3g} incr {s['increasing']:.2f}"
        rprint(text)
        log(record)

    def save(step):
        file = out / "checkpoints" / f"step-{step:07d}.safetensors"
        if rank0:  # the random state needs no saving: each step reseeds from (seed, step)
            sequences = trainer.step * args.grad_accumulation_steps * args.batch_size
            trainer_lib.save_checkpoint(trainer, [file], {
                "cursor": sequences, "tokens": sequences * args.seq_len, "seed": args.seed, "data": fingerprint})
            for old in checkpoints(out)[: -args.keep_checkpoints]:
                old.unlink()
                trainer_lib.state_file(old).unlink(missing_ok=True)
        rprint(f"Step {step}: saved checkpoint {file}")

    source = batches(train_set, args, trainer.step)
    train_loop(trainer, lambda: next(source), iters=args.iters, steps_per_report=args.steps_per_report,
               steps_per_eval=args.steps_per_eval, save_every=args.save_every,
               report=report, evaluate=evaluate, save=save, on_step=on_step)


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="python -m repo_mlx.pretrain",
        description="Continual pre-training into RePo: add the position module to a plain "
        "OLMo-2, Llama or Qwen3 (or continue a RePo model) and train on packed text with the paper's recipe. "
        "Every default is the official run's; -c config.yaml sets any option, a flag "
        "given here overrides it. Under mlx.launch the same command is data-parallel.",
    )
    a = p.add_argument
    a("--model", help="BASE: plain OLMo-2, Llama, Mistral or Qwen3, or a RePo model, Hugging Face folder or Hub id, or an MLX float folder.")
    a("--data", help="Training text: a .txt file (one document), a .jsonl file (one document per line, in --text-feature), a .parquet file (needs the data extra), a folder of such files, or a Hub dataset id (needs the data extra).")
    a("--val-data", help="Validation text, same forms as --data (default: hold out --val-share of --data).")
    a("--val-share", type=_cli.float_range(0, 1, hi_open=True), help="Share of the packed --data sequences held out for validation when there is no --val-data (default: 0.01, at least one sequence).")
    a("--val-batches", type=_cli.all_or_positive, help="Validation batches per evaluation; -1 for all (default: 8).")
    a("--text-feature", help="Field holding the text in .jsonl/.parquet/Hub data (default: text).")
    a("--data-split", help="Split of a Hub dataset (default: train).")
    a("--save-path", type=_cli.output_dir, help="Output folder OUT: the final model (loads in repo_mlx and mlx-lm --trust-remote-code), checkpoints/, metrics.jsonl (default: repo_model). The token cache goes beside it, in OUT.tokens.")
    a("--force", action="store_true", default=None, help="Replace an existing OUT.")
    a("--resume", metavar="OUT", help="Continue the run in OUT from its newest checkpoint, exactly as if uninterrupted (its settings are reused; flags given here override them).")
    a("-c", "--config", help="YAML file of options (names with underscores, e.g. seq_len: 2048).")
    a("--repo-start-layer", type=_cli.non_negative_int, help="Plain BASE: layers with index >= N get the position module (default: round(5/16 of the layers), the release's 5 of 16). --probe shows which layers can feed it.")
    a("--repo-layer-ids", type=_cli.layer_ids, help="Plain BASE: comma-separated layers that may get the module (with the start-layer rule; default: all).")
    a("--plain", action="store_true", default=None, help="Continue a plain BASE as plain RoPE, without the position module: the same-recipe control the paper compares RePo against.")
    a("--nope", action="store_true", default=None, help="Plain BASE: the NoPE control. The RePo layers get a position module fixed at 0 (frozen), so they rotate nothing; the rest trains as with RePo. RePo must beat both --plain and --nope to show it re-positions (docs/experiment.md).")
    a("--position-warmup", type=_cli.non_negative_int, help="Blend positions from integers (so step 0 is the base model) to learned over K steps (default: 0, the paper's cold start; docs/pretrain.md measures both).")
    a("--train-only", choices=TRAIN_ONLY, help="What trains: all parameters (default, the paper), the position module only, or it plus LoRA on every other linear (lora_parameters from -c) - the last two fit a 16 GB Mac.")
    a("--iters", type=_cli.positive_int, help="Optimizer steps; the learning rate reaches 0 at the last one (default: 1000).")
    a("--batch-size", type=_cli.positive_int, help="Sequences per batch over all processes (default: 4; the official run used 512).")
    a("--grad-accumulation-steps", type=_cli.positive_int, help="Batches whose gradients make one optimizer step (default: 1).")
    a("--seq-len", type=_cli.int_range(2), help="Tokens per packed sequence, at least 2 (default: 4096).")
    a("--learning-rate", type=_cli.positive_float, help="Peak AdamW learning rate, decayed linearly to 0 (default: 7.4487e-5).")
    a("--warmup", type=_cli.non_negative_int, help="Linear learning-rate warm-up steps (default: 0).")
    a("--betas", type=_cli.float_range(0, 1, hi_open=True), nargs=2, help="AdamW betas (default: 0.9 0.95).")
    a("--weight-decay", type=_cli.non_negative_float, help="AdamW weight decay, not applied to the embeddings (default: 0.1).")
    a("--adam-eps", type=_cli.positive_float, help="AdamW epsilon (default: 1e-8).")
    a("--grad-clip", type=_cli.non_negative_float, help="Clip the global gradient norm to this; 0 turns clipping off, which saves a pass over every gradient and the memory of holding them all at once (docs/gqa.md measures both) (default: 1.0).")
    a("--z-loss", type=_cli.non_negative_float, help="Weight of the z-loss, mean logsumexp(logits)^2 (default: 1e-5).")
    a("--dtype", choices=DTYPES, help="Compute dtype; half precision keeps float32 master weights and optimizer state (default: bfloat16).")
    a("--grad-checkpoint", action="store_true", default=None, help="Recompute each layer's activations in the backward pass: less memory, one more forward pass per layer.")
    a("--seed", type=_cli.seed, help="Seed of the new position module, data order and dropout (default: 0).")
    a("--steps-per-report", type=_cli.positive_int, help="Print and log training metrics every N steps (default: 10).")
    a("--steps-per-eval", type=_cli.positive_int, help="Validation loss and per-layer position summary every N steps (default: 200).")
    a("--save-every", type=_cli.positive_int, help="Checkpoint every N steps (default: 100).")
    a("--keep-checkpoints", type=_cli.positive_int, help="Keep the newest N checkpoints (default: 1).")
    a("--yarn-factor", type=_cli.float_range(1, 4096), help="Apply YaRN with this factor to all layers, for --seq-len beyond the base's context (at most 4096: see --yarn of generate).")
    a("--plot", type=_cli.output_file, help="Write a PNG of the loss curve and the position spread over steps here at the end.")
    a("--export-hf", type=_cli.output_dir, help="Also write the official Hugging Face format to this folder at the end.")
    a("--dry-run", action="store_true", default=None, help="Print the estimated peak memory and stop before any training.")
    a("--probe", action="store_true", default=None, help="Print BASE's token-index probe and stop before any training: per layer, the held-out R^2 of a linear fit of the token index from the layer's attention input, on up to 16 windows of 512 tokens of --data (half fit, half scored). The position module reads that input token by token, so where it is near 0 learned positions cannot follow token order: start --repo-start-layer where it is clearly positive (docs/experiment.md).")
    return p


def parse_args(argv=None) -> types.SimpleNamespace:
    # Paths as strings: pretrain_args.json records them.
    given = {k: str(v) if isinstance(v, Path) else v
             for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    args = {}
    if given.get("resume"):
        saved = Path(given["resume"]) / ARGS_FILE
        if not saved.exists():
            raise LoadError(f"--resume {given['resume']}: no {ARGS_FILE} there; is it a pretrain output folder?")
        args.update(json.loads(saved.read_text()))
        changed = [k for k in RUN_DEFINING if k in given and given[k] != args.get(k)]
        if changed:
            print(f"[WARNING] --resume with changed {', '.join(changed)}: the run will not continue exactly.", file=sys.stderr)
        given["save_path"] = given["resume"]
    if given.get("config"):
        args.update(_cli.read_config(given["config"], build_parser(), set(DEFAULTS) | {"config"}))
    args = {**DEFAULTS, **args, **given}
    for k in POSITIVE:
        if not isinstance(args[k], int) or args[k] < 1:
            raise LoadError(f"--{k.replace('_', '-')} must be a positive integer, got {args[k]!r}.")
    if args["model"] is None or args["data"] is None:
        raise LoadError("--model BASE and --data PATH are required (or --resume OUT).")
    for k in ("warmup", "position_warmup", "seed"):
        if not isinstance(args[k], int) or args[k] < 0:
            raise LoadError(f"--{k.replace('_', '-')} must be a non-negative integer, got {args[k]!r}.")
    if args["warmup"] >= args["iters"]:
        raise LoadError(f"--warmup {args['warmup']} must be less than --iters {args['iters']}.")
    if not 0 <= args["val_share"] < 1:
        raise LoadError(f"--val-share must be in [0, 1), got {args['val_share']}.")
    if args["train_only"] not in TRAIN_ONLY:
        raise LoadError(f"train_only must be one of {', '.join(TRAIN_ONLY)}.")
    if args["dtype"] not in DTYPES:
        raise LoadError(f"dtype must be one of {', '.join(DTYPES)}.")
    if args["batch_size"] % mx.distributed.init().size():
        raise LoadError(f"--batch-size {args['batch_size']} must be divisible by the number of processes ({mx.distributed.init().size()}).")
    if args["plot"] and importlib.util.find_spec("matplotlib") is None:
        raise LoadError("--plot needs matplotlib: pip install 'repo-mlx[plot]' (or drop --plot).")
    if args["repo_layer_ids"] is not None and not isinstance(args["repo_layer_ids"], str):  # a YAML list
        args["repo_layer_ids"] = ",".join(str(int(i)) for i in args["repo_layer_ids"])
    # files.check_outputs' rule; an existing OUT without --force is refused in run(), which offers --resume.
    check_outputs({f"--{k.replace('_', '-')}": args[k] for k in ("save_path", "export_hf", "plot")},
                  {f"--{k.replace('_', '-')}": args[k] for k in ("model", "data", "val_data")},
                  args["force"], {"--save-path", "--export-hf"} if args["force"] and not args["resume"] else set())
    return types.SimpleNamespace(**args)


def _barrier():
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))


def load_split(args, tokenizer, cache: Path):
    """Training and validation sequences; the fingerprint of what they came from."""
    world = mx.distributed.init()

    def tokens(path, name):
        source = pretrain_data.Source(path, args.text_feature, args.data_split)
        # Rank 0 tokenizes; the others then find the cache (rprint prints on rank 0 only).
        if world.rank() == 0:
            t = pretrain_data.token_cache(source, tokenizer, cache, name, rprint)
        _barrier()
        if world.rank() != 0:
            t = pretrain_data.token_cache(source, tokenizer, cache, name, rprint)
        return t, source.fingerprint()

    train_tokens, fp = tokens(args.data, "train")
    train_set, val_set = pretrain_data.split(train_tokens, args.seq_len, 0 if args.val_data else args.val_share)
    if args.val_data:
        val_tokens, vfp = tokens(args.val_data, "valid")
        val_set = pretrain_data.Packed(val_tokens, args.seq_len)
        fp += vfp
    if len(train_set) < args.batch_size:
        raise LoadError(
            f"Data {args.data} gives {len(train_set)} training sequences of {args.seq_len} "
            f"tokens ({len(train_tokens)} tokens), fewer than --batch-size {args.batch_size}; "
            "add text or lower --seq-len or --batch-size."
        )
    if args.val_data and len(val_set) < args.batch_size:
        raise LoadError(
            f"--val-data {args.val_data} gives {len(val_set)} sequences of {args.seq_len} "
            f"tokens, fewer than --batch-size {args.batch_size}."
        )
    rprint(f"Data: {len(train_set)} training and {len(val_set)} validation sequences of {args.seq_len} tokens")
    return train_set, val_set, fp


def run(args, on_step=None):
    world = mx.distributed.init()
    out = Path(args.save_path)
    for folder in (out.parent, out, out / "checkpoints", out.parent / f"{out.name}.tokens"):
        remove_stale(folder)  # what killed runs left behind
    finish_only = False
    if args.resume:
        found = trainer_lib.newest_intact(list(reversed(checkpoints(out))), str(out / "checkpoints"))
        folder, state = found[0], found[3]
        if int(state["step"]) >= args.iters:
            if (out / "config.json").exists():
                rprint(f"The run in {out} is complete (step {state['step']}, final model written); "
                       "pass a larger --iters to train on.")
                return None
            rprint(f"{folder} is the run's last step: writing the final model the interrupted run did not finish")
            finish_only = True
    elif out.exists() and not args.force and not (args.dry_run or args.probe):
        raise LoadError(f"{out} already exists; pass --force to replace it or --resume {out} to continue it.")
    if args.export_hf and Path(args.export_hf).exists() and not (args.force or args.resume):
        raise LoadError(f"--export-hf {args.export_hf} already exists; pass --force to replace it.")
    rprint(f"Loading {args.model}")
    prep = prepare_model(args)
    rank_batch = args.batch_size // world.size()
    mx.random.seed(args.seed)  # LoRA initialisation
    setup_trainable(prep.model, args.train_only, args.lora_parameters, args.nope)
    settings = types.SimpleNamespace(**{**vars(args), "batch_size": rank_batch,
                                        "dtype": prep.stored_dtype if prep.quantized else args.dtype})
    if prep.quantized and args.dtype != prep.stored_dtype:
        rprint(f"A quantized base computes in its own dtype ({prep.stored_dtype}); --dtype {args.dtype} is not applied")
    counts = count_parameters(prep.model)
    rprint(f"Parameters: {counts['total'] / 1e6:.2f}M, trainable {counts['trainable'] / 1e6:.2f}M")
    rprint(f"Estimated peak memory per process ({args.train_only}, {args.dtype}, batch {rank_batch} x "
           f"{args.seq_len} tokens{', grad checkpoint' if args.grad_checkpoint else ''}):")
    for k, v in estimate_memory(prep.model, settings).items():
        rprint(f"  {k:<15}{v / 1e9:8.3f} GB")
    if args.dry_run:
        return None
    cache = out.parent / f"{out.name}.tokens"
    fresh_cache = not cache.exists()
    try:
        train_set, val_set, fingerprint = load_split(args, prep.tokenizer, cache)
    except LoadError:
        if fresh_cache:  # bad data leaves nothing behind
            shutil.rmtree(cache, ignore_errors=True)
        raise
    if args.probe:
        # Held-out sequences first (Packed has no end for iteration: index it).
        return print_probe(prep, [d[i] for d in (val_set, train_set) for i in range(min(len(d), 16))])
    trainer = make_trainer(prep.model, args, to_compute_dtype(prep, args.dtype))
    _barrier()  # every process has checked its input before OUT changes
    if args.resume:
        trainer_lib.resume(trainer, *found)
        if state["data"] != fingerprint:
            raise LoadError(f"The data changed since {folder} was saved; resuming would not continue the same run.")
        rprint(f"Resuming from {folder} at step {trainer.step} (sequence {state['cursor']})")
        if world.rank() == 0 and (out / METRICS_FILE).exists():
            kept = [r for r in read_metrics(out) if r.get("step", 0) <= trainer.step]
            with atomic_file(out / METRICS_FILE) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    elif world.rank() == 0:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
    if world.rank() == 0:  # a resumed run records the --iters it now runs to
        saved = {k: v for k, v in vars(args).items() if k not in ("resume", "force", "dry_run", "probe", "config")}
        with atomic_file(out / ARGS_FILE) as tmp:
            tmp.write_text(json.dumps(saved, indent=2))
    _barrier()
    if not finish_only:
        try:
            train(prep, trainer, train_set, val_set, args, out, fingerprint, on_step)
        except LoadError:
            # A new run stopped before its first checkpoint (divergence) leaves nothing.
            if not args.resume and not checkpoints(out) and world.rank() == 0:
                shutil.rmtree(out, ignore_errors=True)
                if fresh_cache:
                    shutil.rmtree(cache, ignore_errors=True)
            raise
    if world.rank() == 0:
        save_model(prep, trainer, args, out)
        if args.plot:
            plot_metrics(read_metrics(out), Path(args.plot))
    rprint(f"Done: {out}")
    return trainer


def command(argv=None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    run(parse_args(argv))


def main(argv=None) -> None:
    """The command line: bad input is one ``error:`` line and exit status 2."""
    _cli.run(command, argv)


if __name__ == "__main__":
    main()
