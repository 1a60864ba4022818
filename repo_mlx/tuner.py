"""What fine-tuning RePo needs on top of mlx-lm's tuner.

mlx-lm supplies the LoRA/DoRA layers, batching, loss and evaluation. This adds
the position module's training mode (recorded in adapter_config.json and
rebuilt by ``load_adapters``), data checks that name file and line, and a
training loop whose checkpoints resume exactly: optimizer state, iteration,
data order and dropout randomness all follow from (seed, iteration).
"""

import json
import os
import re
import time
import warnings
from functools import partial
from itertools import islice
from pathlib import Path
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_map_with_path
from mlx_lm.cli_ui import rprint
from mlx_lm.tuner.datasets import CompletionsDataset, create_dataset
from mlx_lm.tuner.trainer import default_loss, evaluate, iterate_batches
from mlx_lm.tuner.trainer import grad_checkpoint as _grad_checkpoint
from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers
from mlx_lm.tuner.utils import load_adapters as _mlx_lm_load_adapters
from mlx_lm.utils import maybe_set_recommended_wired_limit

from .errors import LoadError, one_line
from .repo_olmo2 import POSITION_WEIGHTS

POSITION_MODULE_CHOICES = ("frozen", "lora", "full")
POSITION_KEYS = tuple(f"self_attn.{name}" for name in POSITION_WEIGHTS)
OPTIMIZERS = {
    "adam": optim.Adam,
    "adamw": optim.AdamW,
    "muon": optim.Muon,
    "sgd": optim.SGD,
    "adafactor": optim.Adafactor,
}

Example = Tuple[List[int], int]  # tokens, index of the first token the loss sees


# --- which weights train -----------------------------------------------------


def _tuned_layers(model, num_layers: int):
    if num_layers > len(model.layers):
        raise LoadError(
            f"--num-layers {num_layers} is more than the model's {len(model.layers)} layers."
        )
    return model.layers[-max(num_layers, 0) :]


def position_maps(layers):
    return [
        getattr(layer.self_attn, name)
        for layer in layers
        if layer.self_attn.repo
        for name in POSITION_WEIGHTS
    ]


def setup_trainable(
    model: nn.Module,
    fine_tune_type: str,
    num_layers: int,
    lora_parameters: Optional[dict],
    position_module: str = "frozen",
) -> Optional[dict]:
    """Freeze the model, then make trainable what the options ask for.

    ``position_module`` decides gate_map/content_map/final_map in the tuned
    layers: "frozen", "lora" (low-rank adapters, like the other linears) or
    "full" (the weights themselves). Returns the LoRA parameters with the
    exact module ``keys`` used, so stock mlx-lm rebuilds the same layers.
    """
    if position_module not in POSITION_MODULE_CHOICES:
        raise LoadError(
            f"position_module must be one of {', '.join(POSITION_MODULE_CHOICES)}, "
            f"got {position_module!r}."
        )
    layers = _tuned_layers(model, num_layers)
    lora_parameters = lora_parameters or {}
    model.freeze()
    if fine_tune_type == "full":
        if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            raise LoadError(
                "Full fine-tuning needs float weights but this model is quantized; "
                "use --fine-tune-type lora or dora (QLoRA), or convert without -q."
            )
        for layer in layers:
            layer.unfreeze()
        for m in position_maps(layers):
            if position_module != "full":
                m.freeze()
        if position_module != "lora":
            return None
        keys = set(POSITION_KEYS)
        use_dora = False
    elif fine_tune_type in ("lora", "dora"):
        keys = set(lora_parameters.get("keys") or [])
        if not keys:  # mlx-lm's default: every linear in the tuned layers
            keys = {
                k
                for layer in model.layers
                for k, m in layer.named_modules()
                if isinstance(m, (nn.Linear, nn.QuantizedLinear))
            }
        keys = keys - set(POSITION_KEYS)
        if position_module == "lora":
            keys |= set(POSITION_KEYS)
        use_dora = fine_tune_type == "dora"
    else:
        raise LoadError(
            f"fine_tune_type must be lora, dora or full, got {fine_tune_type!r}."
        )
    lora_parameters = {**lora_parameters, "keys": sorted(keys)}
    try:
        linear_to_lora_layers(model, num_layers, lora_parameters, use_dora=use_dora)
    except (KeyError, ValueError) as e:
        raise LoadError(f"Bad lora_parameters: {one_line(e)}") from None
    if position_module == "full":
        for m in position_maps(layers):
            m.unfreeze()
    return lora_parameters


def _check_names(weights: dict, model: nn.Module, source) -> None:
    trainable = dict(tree_flatten(model.trainable_parameters()))
    unexpected = sorted(set(weights) - set(trainable))
    missing = sorted(set(trainable) - set(weights))
    wrong = [k for k in weights if k in trainable and weights[k].shape != trainable[k].shape]
    if unexpected or missing or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for what, names in (("unexpected", unexpected), ("missing", missing), ("wrong shape", wrong))
            if names
        )
        raise LoadError(
            f"{source} does not match the model and adapter settings ({detail}); "
            "was it trained on this model with the same --fine-tune-type, "
            "--num-layers and --position-module?"
        )


def load_adapters(model: nn.Module, adapter_path) -> nn.Module:
    """Apply the adapters in ``adapter_path`` (from repo_mlx.lora or mlx-lm)."""
    path = Path(adapter_path)
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoadError(f"Cannot read {path / 'adapter_config.json'}: {one_line(e)}") from None
    weights_file = path / "adapters.safetensors"
    if not weights_file.exists():
        raise LoadError(f"{path} has no adapters.safetensors.")
    if "position_module" not in config:  # written by stock mlx-lm
        try:
            return _mlx_lm_load_adapters(model, str(path))
        except (ValueError, KeyError, TypeError) as e:
            raise LoadError(f"Cannot apply the adapters in {path}: {one_line(e)}") from None
    try:
        setup_trainable(
            model,
            config.get("fine_tune_type", "lora"),
            config["num_layers"],
            config.get("lora_parameters"),
            config["position_module"],
        )
    except KeyError as e:
        raise LoadError(f"{path / 'adapter_config.json'} lacks {e}.") from None
    weights = mx.load(str(weights_file))
    _check_names(weights, model, weights_file)
    model.load_weights(list(weights.items()), strict=False)
    return model


# --- data ----------------------------------------------------------------------


class PlainCompletions(CompletionsDataset):
    """prompt + completion joined as they are: base models have no chat template."""

    def process(self, d):
        prompt = self.tokenizer.encode(d[self.prompt_key])
        tokens = prompt + self.tokenizer.encode(d[self.completion_key])
        tokens.append(self.tokenizer.eos_token_id)
        return tokens, len(prompt) if self.mask_prompt else 0


def _read_jsonl(path: Path) -> List[Tuple[int, dict]]:
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LoadError(
                        f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno})."
                    ) from None
                if not isinstance(record, dict):
                    raise LoadError(
                        f"{path}, line {n}: expected a JSON object, got {type(record).__name__}."
                    )
                records.append((n, record))
    except UnicodeDecodeError:
        raise LoadError(f"{path} is not UTF-8 text.") from None
    except OSError as e:
        raise LoadError(f"Cannot read {path}: {e.strerror}.") from None
    if not records:
        raise LoadError(f"{path} is empty; it needs one JSON object per line.")
    return records


def _make_dataset(records, tokenizer, args, where: str):
    """mlx-lm's dataset for the records' format, after checking every record's keys."""
    keys = {
        "prompt": getattr(args, "prompt_feature", "prompt"),
        "completion": getattr(args, "completion_feature", "completion"),
        "messages": getattr(args, "chat_feature", "messages"),
        "text": getattr(args, "text_feature", "text"),
    }
    mask = bool(getattr(args, "mask_prompt", False))
    n, first = records[0]
    if keys["prompt"] in first and keys["completion"] in first:
        need, kind = {keys["prompt"]: str, keys["completion"]: str}, "completions"
    elif keys["messages"] in first:
        need, kind = {keys["messages"]: list}, "chat"
    elif keys["text"] in first:
        need, kind = {keys["text"]: str}, "text"
    else:
        raise LoadError(
            f"{where}, line {n}: no {keys['text']!r}, {keys['prompt']!r}/"
            f"{keys['completion']!r} or {keys['messages']!r} key "
            f"(found: {', '.join(map(repr, first)) or 'none'})."
        )
    for n, record in records:
        for key, kind_of in need.items():
            if not isinstance(record.get(key), kind_of):
                found = "missing" if key not in record else type(record[key]).__name__
                raise LoadError(
                    f"{where}, line {n}: {key!r} must be a {kind_of.__name__} like "
                    f"line {records[0][0]}'s ({found})."
                )
    data = [r for _, r in records]
    if kind == "text" and mask:
        raise LoadError(f"{where}: --mask-prompt needs prompt/completion or chat data, not text.")
    if kind != "text" and not tokenizer.has_chat_template:
        if kind == "completions":
            return PlainCompletions(data, tokenizer, keys["prompt"], keys["completion"], mask)
        raise LoadError(
            f"{where}: chat ('messages') data needs a chat template and this "
            "tokenizer has none (RePo is a base model); use 'text' or "
            "'prompt'/'completion' lines, or add a chat_template to the model's "
            "tokenizer_config.json."
        )
    return create_dataset(data, tokenizer, args)


def tokenize(dataset, numbers, where: str, max_seq_length: int) -> List[Example]:
    """Tokenize every example; warn once per file about truncation."""
    examples, long = [], []
    for i, n in enumerate(numbers):
        try:
            tokens, offset = dataset.process(dataset[i])
        except Exception as e:
            raise LoadError(f"{where}, line {n}: cannot tokenize it ({one_line(e)}).") from None
        if len(tokens) < 2:
            raise LoadError(f"{where}, line {n}: too short to train on (under 2 tokens).")
        if len(tokens) > max_seq_length:
            long.append((n, len(tokens)))
            tokens = tokens[:max_seq_length]
        examples.append((tokens, offset))
    if long and mx.distributed.init().rank() == 0:
        lines = ", ".join(str(n) for n, _ in long[:5]) + (" ..." if len(long) > 5 else "")
        warnings.warn(
            f"{where}: {len(long)} example(s) longer than --max-seq-length "
            f"{max_seq_length} tokens are truncated (line {lines}; longest "
            f"{max(k for _, k in long)} tokens)."
        )
    return examples


def load_data(args, tokenizer) -> Tuple[List[Example], List[Example], List[Example]]:
    """train, valid and test examples from ``args.data`` (a folder or Hub dataset)."""
    if args.data is None and not getattr(args, "hf_dataset", None):
        raise LoadError("--data is required: a folder with train.jsonl and valid.jsonl.")
    folder = Path(args.data) if args.data is not None else None
    if folder is not None and folder.exists():
        if not folder.is_dir():
            raise LoadError(f"--data {folder} is a file; pass the folder holding train.jsonl.")
        return tuple(_load_split(folder / f"{name}.jsonl", name, args, tokenizer)
                     for name in ("train", "valid", "test"))
    if not getattr(args, "hf_dataset", None) and not re.fullmatch(r"[\w.-]+/[\w.-]+", args.data):
        raise LoadError(f"Data folder {args.data} does not exist.")
    from mlx_lm.tuner.datasets import load_dataset

    try:
        splits = load_dataset(args, tokenizer)
    except Exception as e:
        raise LoadError(f"Cannot load Hugging Face dataset {args.data}: {one_line(e)}") from None
    return tuple(
        tokenize(s, range(len(s)), f"{args.data} [{name}]", args.max_seq_length)
        for s, name in zip(splits, ("train", "valid", "test"))
    )


def _load_split(path: Path, name: str, args, tokenizer) -> List[Example]:
    if not {"train": args.train, "valid": args.train, "test": args.test}[name]:
        return []
    if not path.exists():
        if name != "valid":
            raise LoadError(f"{path} does not exist; --{name} needs it.")
        if mx.distributed.init().rank() == 0:
            warnings.warn(f"{path} does not exist; training without validation.")
        return []
    records = _read_jsonl(path)
    dataset = _make_dataset(records, tokenizer, args, str(path))
    examples = tokenize(dataset, [n for n, _ in records], str(path), args.max_seq_length)
    if len(examples) < args.batch_size:
        raise LoadError(
            f"{path} has {len(examples)} examples, fewer than --batch-size {args.batch_size}."
        )
    return examples


# --- training --------------------------------------------------------------


def derived_seed(*ints: int) -> int:
    """A well-mixed 32-bit seed from (seed, stream, counter)."""
    return int(np.random.SeedSequence(list(ints)).generate_state(1)[0])


def train_batches(dataset, args, world, skip: int = 0):
    """mlx-lm's batches, epoch e shuffled by its own seed, after ``skip`` batches.

    Each epoch's order depends only on (seed, epoch), never on how often
    validation ran, so a resumed run sees the batches an uninterrupted one would.
    """
    per_epoch = len(dataset) // args.batch_size
    epoch, skip = divmod(skip, per_epoch)
    while True:
        batches = iterate_batches(
            dataset,
            args.batch_size,
            args.max_seq_length,
            seed=derived_seed(args.seed, 0, epoch),
            comm_group=world,
        )
        yield from islice(batches, skip, None)
        epoch, skip = epoch + 1, 0


def token_weighted_loss(model, batch, lengths, world):
    """mlx-lm's loss; across processes, weighted by each one's share of tokens.

    The averaged gradient then equals the gradient on the combined batch even
    when the processes' batches hold different numbers of tokens.
    """
    ce, ntoks = default_loss(model, batch, lengths)
    if world.size() > 1:
        total = mx.distributed.all_sum(ntoks, group=world, stream=mx.cpu)
        ce = ce * (ntoks * world.size() / total)
    return ce, ntoks


def build_optimizer(args):
    name = args.optimizer.lower()
    if name not in OPTIMIZERS:
        raise LoadError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}.")
    lr = build_schedule(args.lr_schedule) if args.lr_schedule else args.learning_rate
    config = (args.optimizer_config or {}).get(name) or {}
    try:
        return OPTIMIZERS[name](learning_rate=lr, **config)
    except TypeError as e:
        raise LoadError(f"Bad optimizer_config for {name}: {one_line(e)}") from None


def state_file(adapter_file) -> Path:
    """Where a checkpoint's optimizer state and iteration live."""
    adapter_file = Path(adapter_file)
    return adapter_file.with_name(adapter_file.stem + ".state.safetensors")


def _save(file: Path, arrays: dict, metadata: dict) -> None:
    # Write then rename: a kill during a save never leaves a torn checkpoint.
    tmp = file.with_name(f".{file.stem}.partial-{os.getpid()}.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=metadata)
    os.replace(tmp, file)


def save_checkpoint(model, optimizer, files, it: int, trained: int, args) -> None:
    """Trainable weights and, beside them, what resuming needs."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    state = dict(tree_flatten(optimizer.state))
    meta = {"iteration": str(it), "trained_tokens": str(trained)}
    meta.update(seed=str(args.seed), batch_size=str(args.batch_size))
    for file in files:
        _save(state_file(file), state, meta)
        _save(file, weights, meta)


def resume(model, optimizer, adapter_file, args) -> Tuple[int, int]:
    """Load a checkpoint; returns its iteration and trained tokens (0, 0 if unknown)."""
    adapter_file = Path(adapter_file)
    if not adapter_file.is_file():
        raise LoadError(f"--resume-adapter-file {adapter_file} does not exist.")
    try:
        weights, meta = mx.load(str(adapter_file), return_metadata=True)
    except Exception as e:
        raise LoadError(f"Cannot read {adapter_file}: {one_line(e)}") from None
    _check_names(weights, model, adapter_file)
    model.load_weights(list(weights.items()), strict=False)
    optimizer.init(model.trainable_parameters())
    sfile = state_file(adapter_file)
    if not sfile.exists():
        warnings.warn(
            f"{sfile} does not exist: the weights are restored but the optimizer "
            "starts afresh at iteration 0."
        )
        return 0, 0
    state, smeta = mx.load(str(sfile), return_metadata=True)
    if smeta.get("iteration") != meta.get("iteration"):
        raise LoadError(f"{adapter_file} and {sfile} are from different iterations.")
    expected = dict(tree_flatten(optimizer.state))
    if set(state) != set(expected):
        raise LoadError(
            f"{sfile} holds state for another optimizer or model; resume with the "
            "same --optimizer and adapter settings."
        )
    # The learning rate stays this run's: a schedule recomputes it from the step.
    optimizer.state = tree_map_with_path(
        lambda path, now: now if path == "learning_rate" else state[path], optimizer.state
    )
    for key in ("seed", "batch_size"):
        if smeta.get(key) != str(getattr(args, key)):
            warnings.warn(
                f"Resuming with {key} {getattr(args, key)} but the checkpoint used "
                f"{smeta.get(key)}: the data order differs from the original run."
            )
    return int(smeta["iteration"]), int(smeta.get("trained_tokens", 0))


def checkpoint_layers(model):
    cls = type(model.layers[0])
    if not getattr(cls, "_repo_checkpointed", False):  # mlx-lm patches the class
        _grad_checkpoint(model.layers[0])
        cls._repo_checkpointed = True


def train(
    model,
    optimizer,
    train_set: List[Example],
    valid_set: List[Example],
    args,
    adapter_file,
    start: int = 0,
    trained: int = 0,
    callback=None,
):
    """Train from iteration ``start`` to ``args.iters``, saving every ``args.save_every``.

    mlx-lm's compiled step, batches, loss and evaluation; the loop is ours
    because mlx-lm's cannot resume (it restarts the iteration count, the data
    order and the optimizer).
    """
    maybe_set_recommended_wired_limit()  # keeps the weights resident on a Mac, as mlx-lm does
    world = mx.distributed.init()
    size = world.size()
    adapter_file = Path(adapter_file)
    accum = args.grad_accumulation_steps
    if args.grad_checkpoint:
        checkpoint_layers(model)
    loss_and_grad = nn.value_and_grad(model, partial(token_weighted_loss, world=world))
    optimizer.init(model.trainable_parameters())  # keeps a resumed state
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths, prev_grad, do_update):
        (loss, toks), grad = loss_and_grad(model, batch, lengths)
        if prev_grad is not None:
            grad = tree_map(lambda x, y: x + y, grad, prev_grad)
        if do_update:
            grad = average_gradients(grad)
            if accum > 1:
                grad = tree_map(lambda g: g / accum, grad)
            optimizer.update(model, grad)
            grad = None
        return loss, toks, grad

    batches = train_batches(train_set, args, world, skip=start)
    losses, n_tokens, steps, seconds = 0, 0, 0, 0.0
    grad = None
    model.train()
    for it in range(start + 1, args.iters + 1):
        if valid_set and (it == start + 1 or it % args.steps_per_eval == 0 or it == args.iters):
            tic = time.perf_counter()
            val_loss = evaluate(
                model,
                valid_set,
                args.batch_size,
                args.val_batches,
                args.max_seq_length,
                clear_cache_threshold=args.clear_cache_threshold,
            )
            model.train()
            val_time = time.perf_counter() - tic
            rprint(f"Iter {it}: val loss {val_loss:.3f}, val took {val_time:.3f}s", flush=True)
            if callback is not None:
                callback.on_val_loss_report(
                    {"iteration": it - 1, "val_loss": val_loss, "val_time": val_time}
                )

        batch, lengths = next(batches)
        # Dropout masks depend on (seed, iteration) only: resumable anywhere.
        mx.random.seed(derived_seed(args.seed, 1, it))
        tic = time.perf_counter()
        loss, toks, grad = step(batch, lengths, grad, it % accum == 0)
        losses, n_tokens, steps = losses + loss, n_tokens + toks, steps + 1
        mx.eval(state, losses, n_tokens, grad)
        if args.clear_cache_threshold and mx.get_cache_memory() > args.clear_cache_threshold:
            mx.clear_cache()
        seconds += time.perf_counter() - tic

        if it % args.steps_per_report == 0 or it == args.iters:
            train_loss = mx.distributed.all_sum(losses, stream=mx.cpu).item() / (steps * size)
            n_tokens = mx.distributed.all_sum(n_tokens, stream=mx.cpu).item()
            trained += n_tokens
            info = {
                "iteration": it,
                "train_loss": train_loss,
                "learning_rate": optimizer.learning_rate.item(),
                "iterations_per_second": steps / seconds,
                "tokens_per_second": n_tokens / seconds,
                "trained_tokens": trained,
                "peak_memory": mx.get_peak_memory() / 1e9,
            }
            rprint(
                f"Iter {it}: train loss {train_loss:.3f}, lr {info['learning_rate']:.3e}, "
                f"it/s {info['iterations_per_second']:.3f}, tokens/s "
                f"{info['tokens_per_second']:.1f}, trained tokens {trained}, "
                f"peak mem {info['peak_memory']:.3f} GB",
                flush=True,
            )
            if callback is not None:
                callback.on_train_loss_report(info)
            losses, n_tokens, steps, seconds = 0, 0, 0, 0.0

        if it % args.save_every == 0 or it == args.iters:
            # Counted on every process: all_sum must not run on rank 0 alone.
            tokens = trained + mx.distributed.all_sum(mx.array(n_tokens), stream=mx.cpu).item()
            files = [adapter_file]
            if it % args.save_every == 0:
                files.append(adapter_file.with_name(f"{it:07d}_adapters.safetensors"))
            if world.rank() == 0:
                save_checkpoint(model, optimizer, files, it, int(tokens), args)
            rprint(f"Iter {it}: saved {', '.join(str(f) for f in files)}", flush=True)
