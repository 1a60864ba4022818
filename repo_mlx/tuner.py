"""Fine-tuning data and checkpoints on top of mlx-lm's tuner.

mlx-lm supplies the datasets, batching, loss and evaluation; this adds data
checks that name file and line, a data order that follows from (seed,
iteration), and adapter checkpoints that resume exactly on the shared loop.
"""

import json
import time
import warnings
from functools import partial
from itertools import islice
from pathlib import Path
from typing import List, Tuple

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.cli_ui import rprint
from mlx_lm.tuner.datasets import ChatDataset, CompletionsDataset, create_dataset
from mlx_lm.tuner.trainer import default_loss, evaluate, iterate_batches
from mlx_lm.tuner.utils import build_schedule

from .adapters import check_names
from .errors import LoadError, one_line
from .files import atomic_file
from .trainer import Trainer, derived_seed
from .loader import check_hub_reachable, is_hub_id
from .trainer import train as train_loop

MASTER = "master/"  # state-file prefix of the float32 master weights
OPTIMIZERS = {
    "adam": optim.Adam,
    "adamw": optim.AdamW,
    "muon": optim.Muon,
    "sgd": optim.SGD,
    "adafactor": optim.Adafactor,
}

Example = Tuple[List[int], int]  # tokens, index of the first token the loss sees


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
    """mlx-lm's dataset for the first record's format; every record must match it."""
    n, first = records[0]
    data = [r for _, r in records]
    try:
        dataset = create_dataset(data, tokenizer, args)
    except ValueError as e:
        raise LoadError(
            f"{where}, line {n}: {one_line(e)} (found keys: {', '.join(map(repr, first)) or 'none'})."
        ) from None
    keys = [getattr(dataset, a) for a in ("text_key", "prompt_key", "completion_key", "chat_key")
            if hasattr(dataset, a)]
    for n, record in records:
        for key in keys:
            if type(record.get(key)) is not type(first[key]):
                found = "missing" if key not in record else type(record[key]).__name__
                raise LoadError(
                    f"{where}, line {n}: {key!r} must be a {type(first[key]).__name__} like "
                    f"line {records[0][0]}'s ({found})."
                )
    if isinstance(dataset, CompletionsDataset) and not tokenizer.has_chat_template:
        # Base models have no chat template: prompt + completion joined as they are.
        return PlainCompletions(data, tokenizer, dataset.prompt_key,
                                dataset.completion_key, dataset.mask_prompt)
    if isinstance(dataset, ChatDataset) and not tokenizer.has_chat_template:
        raise LoadError(
            f"{where}: chat ('messages') data needs a chat template and this "
            "tokenizer has none (RePo is a base model); use 'text' or "
            "'prompt'/'completion' lines, or add a chat_template to the model's "
            "tokenizer_config.json."
        )
    return dataset


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
    if not getattr(args, "hf_dataset", None) and not is_hub_id(args.data):
        raise LoadError(f"Data folder {args.data} does not exist.")
    from mlx_lm.tuner.datasets import load_dataset

    check_hub_reachable(f"--data {args.data}")
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


def token_weighted_loss(model, batch, lengths, world=None):
    """mlx-lm's loss; across processes, weighted by each one's share of tokens.

    The averaged gradient then equals the gradient on the combined batch even
    when the processes' batches hold different numbers of tokens. Returns
    (loss, (loss, tokens)): the value to differentiate and what to report.
    """
    world = world or mx.distributed.init()
    ce, ntoks = default_loss(model, batch, lengths)
    if world.size() > 1:
        total = mx.distributed.all_sum(ntoks, group=world, stream=mx.cpu)
        ce = ce * (ntoks * world.size() / total)
    return ce, (ce, ntoks)


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


def make_trainer(model, args) -> Trainer:
    """mlx-lm's iterations: one batch each, an update every --grad-accumulation-steps."""
    return Trainer(model, build_optimizer(args), token_weighted_loss, seed=args.seed,
                   accumulate=args.grad_accumulation_steps, grad_checkpoint=args.grad_checkpoint)


def state_file(adapter_file) -> Path:
    """Where a checkpoint's optimizer state, float32 masters and iteration live."""
    adapter_file = Path(adapter_file)
    return adapter_file.with_name(adapter_file.stem + ".state.safetensors")


def save_checkpoint(trainer: Trainer, files, trained: int, args) -> None:
    """The trainable weights in mlx-lm's adapter format and, beside them, what
    resuming needs (half-precision weights' float32 masters included)."""
    weights = dict(tree_flatten(trainer.model.trainable_parameters()))
    state = dict(tree_flatten(trainer.optimizer.state))
    state.update({MASTER + k: v for k, v in trainer.master.items()})
    meta = {"iteration": str(trainer.step), "trained_tokens": str(trained),
            "seed": str(args.seed), "batch_size": str(args.batch_size)}
    for file in files:
        with atomic_file(state_file(file)) as tmp:
            mx.save_safetensors(str(tmp), state, metadata=meta)
        with atomic_file(file) as tmp:
            mx.save_safetensors(str(tmp), weights, metadata=meta)


def _read_checkpoint(adapter_file: Path):
    """(weights, meta, state, state meta) of a checkpoint whose two files agree, or
    the reason it cannot be resumed from (a kill during a save, a full disk)."""
    try:
        weights, meta = mx.load(str(adapter_file), return_metadata=True)
        state, smeta = mx.load(str(state_file(adapter_file)), return_metadata=True)
    except Exception as e:
        return f"unreadable ({one_line(e)})"
    if smeta.get("iteration") != meta.get("iteration"):
        return f"its state file is from iteration {smeta.get('iteration')}, the weights from {meta.get('iteration')}"
    return weights, meta, state, smeta


def resume(trainer: Trainer, adapter_file, args) -> int:
    """Continue from a checkpoint; returns its trained tokens (0 if unknown).

    A damaged checkpoint gives way to the newest intact numbered one before it.
    """
    adapter_file = Path(adapter_file)
    if not adapter_file.is_file():
        raise LoadError(f"--resume-adapter-file {adapter_file} does not exist.")
    if not state_file(adapter_file).exists():
        try:
            weights = mx.load(str(adapter_file))
        except Exception as e:
            raise LoadError(f"Cannot read {adapter_file}: {one_line(e)}") from None
        check_names(weights, trainer.model, adapter_file)
        warnings.warn(
            f"{state_file(adapter_file)} does not exist: the weights are restored but the "
            "optimizer starts afresh at iteration 0."
        )
        trainer.restore(weights, dict(tree_flatten(trainer.optimizer.state)), 0, adapter_file)
        return 0
    # Numbered checkpoints before this one (all of them before adapters.safetensors).
    number = lambda f: int(f.name.split("_")[0]) if f.name[0].isdigit() else float("inf")
    older = sorted((f for f in adapter_file.parent.glob("*_adapters.safetensors")
                    if number(f) < number(adapter_file)), reverse=True)
    for file in [adapter_file] + older:
        found = _read_checkpoint(file)
        if not isinstance(found, str):
            break
        warnings.warn(f"Checkpoint {file} is damaged: {found}; trying the newest one before it.")
    else:
        raise LoadError(f"No intact checkpoint in {adapter_file.parent} to resume from; start the run again.")
    weights, meta, state, smeta = found
    if file != adapter_file:
        rprint(f"Resuming from {file} instead", flush=True)
    check_names(weights, trainer.model, file)
    weights.update({k[len(MASTER):]: v for k, v in state.items() if k.startswith(MASTER)})
    state = {k: v for k, v in state.items() if not k.startswith(MASTER)}
    trainer.restore(weights, state, int(smeta["iteration"]), state_file(file))
    for key in ("seed", "batch_size"):
        if smeta.get(key) != str(getattr(args, key)):
            warnings.warn(
                f"Resuming with {key} {getattr(args, key)} but the checkpoint used "
                f"{smeta.get(key)}: the data order differs from the original run."
            )
    return int(smeta.get("trained_tokens", 0))


def train(trainer: Trainer, train_set: List[Example], valid_set: List[Example], args,
          adapter_file, trained: int = 0, callback=None) -> None:
    """The shared loop with mlx-lm's batches, evaluation, reports and adapter files."""
    world = trainer.world
    adapter_file = Path(adapter_file)
    start = trainer.step

    def report(it, metrics, norm, steps, seconds):
        nonlocal trained
        train_loss = metrics[0] / (steps * world.size())
        trained += int(metrics[1])
        info = {
            "iteration": it,
            "train_loss": train_loss,
            "learning_rate": trainer.optimizer.learning_rate.item(),
            "iterations_per_second": steps / seconds,
            "tokens_per_second": metrics[1] / seconds,
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

    def validate(it):
        if not valid_set:
            return
        tic = time.perf_counter()
        # The same validation batches every time, so a resumed run reports what an uninterrupted one does.
        batches = partial(iterate_batches, seed=derived_seed(args.seed, 2))
        val_loss = evaluate(trainer.model, valid_set, args.batch_size, args.val_batches, args.max_seq_length,
                            iterate_batches=batches, clear_cache_threshold=args.clear_cache_threshold)
        val_time = time.perf_counter() - tic
        rprint(f"Iter {it}: val loss {val_loss:.3f}, val took {val_time:.3f}s", flush=True)
        if callback is not None:
            callback.on_val_loss_report({"iteration": it, "val_loss": val_loss, "val_time": val_time})

    def save(it):
        # Counted on every process: all_sum must not run on rank 0 alone.
        tokens = start_tokens + int(mx.distributed.all_sum(trainer.totals[1], stream=mx.cpu).item())
        files = [adapter_file]
        if it % args.save_every == 0:
            files.append(adapter_file.with_name(f"{it:07d}_adapters.safetensors"))
        if world.rank() == 0:
            save_checkpoint(trainer, files, tokens, args)
        rprint(f"Iter {it}: saved {', '.join(str(f) for f in files)}", flush=True)

    start_tokens = trained
    batches = train_batches(train_set, args, world, skip=start)
    train_loop(trainer, lambda: next(batches), iters=args.iters,
               steps_per_report=args.steps_per_report, steps_per_eval=args.steps_per_eval,
               save_every=args.save_every, report=report, evaluate=validate, save=save,
               clear_cache_threshold=args.clear_cache_threshold)
