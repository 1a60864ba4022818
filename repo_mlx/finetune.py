"""Fine-tuning on the shared loop: mlx-lm's batches, loss, evaluation, optimizers
and report lines, in a data order that follows from (seed, iteration), with
adapter checkpoints that resume exactly."""

import time
import warnings
from functools import partial
from itertools import islice
from pathlib import Path
from typing import List

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.cli_ui import rprint
from mlx_lm.tuner.trainer import default_loss, evaluate, iterate_batches
from mlx_lm.tuner.utils import build_schedule, print_trainable_parameters
from mlx_lm.utils import save_config

from .adapters import check_names, setup_trainable
from .errors import LoadError, one_line
from .finetune_data import Example
from .trainer import Trainer, derived_seed, newest_intact, resume, save_checkpoint, state_file
from .trainer import train as train_loop

OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD,
              "adafactor": optim.Adafactor}


def train_batches(dataset, args, world, skip: int = 0, iterate=iterate_batches):
    """Endless batches of ``iterate`` (mlx-lm's) after ``skip``. Each epoch's order depends only on
    (seed, epoch), never on how often validation ran: a resumed run sees an uninterrupted one's."""
    epoch, skip = divmod(skip, len(dataset) // args.batch_size)
    while True:
        batches = iterate(dataset, args.batch_size, args.max_seq_length, seed=derived_seed(args.seed, 0, epoch),
                          comm_group=world)
        yield from islice(batches, skip, None)
        epoch, skip = epoch + 1, 0


def token_weighted_loss(model, batch, lengths, world=None):
    """mlx-lm's loss, across processes weighted by each one's share of tokens (the averaged gradient
    is the combined batch's). Returns (value to differentiate, (loss, tokens) to report)."""
    world = world or mx.distributed.init()
    ce, ntoks = default_loss(model, batch, lengths)
    if world.size() > 1:
        ce = ce * (ntoks * world.size() / mx.distributed.all_sum(ntoks, group=world, stream=mx.cpu))
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


def make_trainer(model, args, loss=token_weighted_loss) -> Trainer:
    """mlx-lm's iterations: one batch each, an update every --grad-accumulation-steps."""
    return Trainer(model, build_optimizer(args), loss, seed=args.seed,
                   accumulate=args.grad_accumulation_steps, grad_checkpoint=args.grad_checkpoint)


def resume_from(trainer: Trainer, adapter_file, args) -> int:
    """Continue from --resume-adapter-file, or if it is damaged the newest intact numbered checkpoint
    before it; returns its trained tokens (0 if unknown)."""
    adapter_file = Path(adapter_file)
    if not adapter_file.is_file():
        raise LoadError(f"--resume-adapter-file {adapter_file} does not exist.")
    if not state_file(adapter_file).exists():  # mlx-lm's adapters: weights only
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
    file, weights, state, meta = newest_intact([adapter_file] + older, str(adapter_file.parent))
    if file != adapter_file:
        rprint(f"Resuming from {file} instead", flush=True)
    check_names(weights, trainer.model, file)
    resume(trainer, file, weights, state, meta)
    for key in ("seed", "batch_size"):
        if meta.get(key) != str(getattr(args, key)):
            warnings.warn(
                f"Resuming with {key} {getattr(args, key)} but the checkpoint used "
                f"{meta.get(key)}: the data order differs from the original run."
            )
    return int(meta.get("trained_tokens", 0))


def train(trainer: Trainer, train_set: List[Example], valid_set: List[Example], args,
          adapter_file, trained: int = 0, callback=None) -> None:
    """SFT on the shared loop: mlx-lm's batches, loss and evaluation."""
    def validation():
        # The same validation batches every time, so a resumed run reports what an uninterrupted one does.
        batches = partial(iterate_batches, seed=derived_seed(args.seed, 2))
        return {"loss": evaluate(trainer.model, valid_set, args.batch_size, args.val_batches, args.max_seq_length,
                                 iterate_batches=batches, clear_cache_threshold=args.clear_cache_threshold)}

    run_loop(trainer, train_batches(train_set, args, trainer.world, skip=trainer.step), args, adapter_file, trained,
             callback, summarize=lambda m, steps: {"loss": m[0] / (steps * trainer.world.size()), "tokens": m[1]},
             validation=validation if valid_set else None, describe=lambda s: f"loss {s['loss']:.3f}")


def run_loop(trainer: Trainer, batches, args, adapter_file, trained: int, callback, summarize, validation, describe) -> None:
    """The shared loop with mlx-lm's report lines and callbacks, and adapter checkpoints.
    ``summarize(metrics, steps)``: the report's numbers (with ``tokens``); ``validation()``: the
    validation numbers (None: no validation); ``describe(numbers)``: as text."""
    adapter_file, start_tokens = Path(adapter_file), trained

    def report(it, metrics, norm, steps, seconds):
        nonlocal trained
        s = summarize(metrics, steps)
        tokens = s.pop("tokens")
        trained += int(tokens)
        info = {"iteration": it, **{f"train_{k}": v for k, v in s.items()},
                "learning_rate": trainer.optimizer.learning_rate.item(), "iterations_per_second": steps / seconds,
                "tokens_per_second": tokens / seconds, "trained_tokens": trained, "peak_memory": mx.get_peak_memory() / 1e9}
        rprint(f"Iter {it}: train {describe(s)}, lr {info['learning_rate']:.3e}, it/s {info['iterations_per_second']:.3f}, "
               f"tokens/s {info['tokens_per_second']:.1f}, trained tokens {trained}, peak mem {info['peak_memory']:.3f} GB",
               flush=True)
        if callback is not None:
            callback.on_train_loss_report(info)

    def validate(it):
        if validation is None:
            return
        tic = time.perf_counter()
        s = validation()
        val_time = time.perf_counter() - tic
        rprint(f"Iter {it}: val {describe(s)}, val took {val_time:.3f}s", flush=True)
        if callback is not None:
            callback.on_val_loss_report({"iteration": it, **{f"val_{k}": v for k, v in s.items() if k != "tokens"},
                                         "val_time": val_time})

    def save(it):
        # adapters.safetensors and every --save-every a numbered copy. Tokens are counted on every
        # process: all_sum must not run on rank 0 alone.
        tokens = start_tokens + int(mx.distributed.all_sum(trainer.totals[1], stream=mx.cpu).item())
        files = [adapter_file]
        if it % args.save_every == 0:
            files.append(adapter_file.with_name(f"{it:07d}_adapters.safetensors"))
        if trainer.world.rank() == 0:
            meta = {"trained_tokens": tokens, "seed": args.seed, "batch_size": args.batch_size}
            save_checkpoint(trainer, files, meta)
        rprint(f"Iter {it}: saved {', '.join(str(f) for f in files)}", flush=True)

    train_loop(trainer, lambda: next(batches), iters=args.iters, steps_per_report=args.steps_per_report,
               steps_per_eval=args.steps_per_eval, save_every=args.save_every, report=report, evaluate=validate,
               save=save, clear_cache_threshold=args.clear_cache_threshold)


def setup(args, model) -> None:
    """Make trainable what the flags ask for (LoRA layers drawn from --seed)."""
    mx.random.seed(args.seed)
    n, total = args.num_layers, len(model.layers)
    if n is not None and n > total:
        raise LoadError(f"--num-layers {n} is more than the model's {total} layers; pass {total} or -1 for all.")
    args.num_layers = min(16, total) if n is None else n
    args.lora_parameters = setup_trainable(model, args.fine_tune_type, args.num_layers, args.lora_parameters,
                                           args.position_module)
    if any(layer.self_attn.repo for layer in model.layers):
        rprint(f"Position module: {args.position_module}", flush=True)


def start(args, model, loss=token_weighted_loss):
    """The trainer of a run, resumed from --resume-adapter-file if given, with
    adapter_config.json written; returns it and the tokens trained so far."""
    trainer, trained = make_trainer(model, args, loss), 0
    if args.resume_adapter_file is not None:
        trained = resume_from(trainer, args.resume_adapter_file, args)
        rprint(f"Resuming from {args.resume_adapter_file} at iteration {trainer.step}", flush=True)
        if trainer.step >= args.iters:
            raise LoadError(f"{args.resume_adapter_file} is from iteration {trainer.step}; pass an --iters above it.")
    print_trainable_parameters(model)
    adapter_path = Path(args.adapter_path)
    if mx.distributed.init().rank() == 0:
        adapter_path.mkdir(parents=True, exist_ok=True)
        save_config(dict(vars(args)), adapter_path / "adapter_config.json")
    return trainer, trained
