"""Preference tuning for ``lora --train-mode dpo|orpo``: DPO and ORPO on the shared loop.

Only response tokens count; losses, rewards and metrics are TRL's (docs/finetune.md, "Losses"). The DPO
reference is the model with its adapters off when only adapters train (no second copy in memory), else a
frozen copy of the base or ``--reference-model-path``."""

import json
import warnings
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import List, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.cli_ui import rprint
from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

from .errors import LoadError, one_line
from .trainer import Trainer, derived_seed
from .finetune import run_loop
from .finetune import train_batches as sft_batches
from .finetune_data import Example, load_splits, read_jsonl
from .loader import load

TRAIN_MODES = ("sft", "dpo", "orpo")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")
KEYS = ("prompt", "chosen", "rejected")
# Each adapter layer and the attribute holding the layer it wraps.
ADAPTERS = {LoRALinear: "linear", LoRASwitchLinear: "linear", DoRALinear: "linear",
            LoRAEmbedding: "embedding", DoRAEmbedding: "embedding"}

Pair = Tuple[Example, Example]  # chosen, rejected


def _messages(value, role: str, key: str, where: str) -> list:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        return value
    raise LoadError(
        f"{where}: {key!r} must be a string or a list of chat messages "
        f"({{\"role\": ..., \"content\": ...}}), got {json.dumps(value)[:60]}."
    )


def encode_pair(record: dict, tokenizer, where: str) -> Pair:
    """(tokens, offset) of prompt + chosen and of prompt + rejected: with a chat template, the (system
    and) prompt with the generation prompt, each response as the assistant's turn; without one (RePo
    base models), ``prompt + response + <eos>`` as ``lora`` joins completions."""
    missing = [k for k in KEYS if k not in record]
    if missing:
        raise LoadError(
            f"{where}: missing {', '.join(map(repr, missing))} (a preference line needs "
            f"'prompt', 'chosen' and 'rejected'; found keys: {', '.join(map(repr, record)) or 'none'})."
        )
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise LoadError(f"{where}: 'system' must be a string, got {type(system).__name__}.")
    prompt = _messages(record["prompt"], "user", "prompt", where)
    responses = [_messages(record[k], "assistant", k, where) for k in KEYS[1:]]
    for key, messages in zip(KEYS[1:], responses):
        if not "".join(m["content"] for m in messages).strip():
            raise LoadError(f"{where}: {key!r} is empty; every pair needs two responses to compare.")
    if tokenizer.has_chat_template:
        prompt = ([{"role": "system", "content": system}] if system else []) + prompt
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
        pair = []
        for messages in responses:
            tokens = tokenizer.apply_chat_template(prompt + messages, return_dict=False)
            # The response starts where the rendering leaves the prompt's (its end, for every usual template).
            offset = next((i for i, (a, b) in enumerate(zip(head, tokens)) if a != b), min(len(head), len(tokens)))
            pair.append((list(tokens), offset))
    else:
        if not all(isinstance(record[k], str) for k in KEYS) or system is not None:
            raise LoadError(
                f"{where}: chat messages and 'system' need a chat template and this tokenizer has "
                "none (RePo is a base model); give 'prompt', 'chosen' and 'rejected' as strings, "
                "or add a chat_template to the model's tokenizer_config.json."
            )
        head = tokenizer.encode(record["prompt"])
        pair = [(head + tokenizer.encode(record[k], add_special_tokens=False) + [tokenizer.eos_token_id], len(head))
                for k in KEYS[1:]]
    if pair[0][1] == 0:
        raise LoadError(f"{where}: 'prompt' is empty; the first response token needs a token before it.")
    for key, (tokens, offset) in zip(KEYS[1:], pair):
        if offset >= len(tokens):
            raise LoadError(f"{where}: {key!r} adds no tokens after the prompt.")
    return tuple(pair)


def load_pairs(path: Path, tokenizer, max_seq_length: int, batch_size: int) -> List[Pair]:
    """Every line of ``path`` as a pair; pairs over ``max_seq_length`` lose the end of their
    responses (one warning)."""
    pairs, long = [], []
    for n, record in read_jsonl(path):
        where = f"{path}, line {n}"
        try:
            pair = encode_pair(record, tokenizer, where)
        except LoadError:
            raise
        except Exception as e:
            raise LoadError(f"{where}: cannot tokenize it ({one_line(e)}).") from None
        prompt = max(offset for _, offset in pair)
        if prompt >= max_seq_length:
            raise LoadError(
                f"{where}: the prompt is {prompt} tokens, which leaves no room for a response "
                f"within --max-seq-length {max_seq_length}; shorten it or raise --max-seq-length."
            )
        if any(len(tokens) > max_seq_length for tokens, _ in pair):
            long.append(n)
            pair = tuple((tokens[:max_seq_length], offset) for tokens, offset in pair)
        pairs.append(pair)
    if long and mx.distributed.init().rank() == 0:
        lines = ", ".join(map(str, long[:5])) + (" ..." if len(long) > 5 else "")
        warnings.warn(f"{path}: {len(long)} pair(s) longer than --max-seq-length {max_seq_length} "
                      f"tokens lose the end of their responses (line {lines}).")
    if len(pairs) < batch_size:
        raise LoadError(f"{path} has {len(pairs)} pairs, fewer than --batch-size {batch_size}.")
    return pairs


def load_data(args, tokenizer) -> Tuple[List[Pair], List[Pair], List[Pair]]:
    """train, valid and test pairs from the folder ``args.data``, after the flags are checked."""
    check_args(args)
    if args.data is None:
        raise LoadError("--data is required: a folder with train.jsonl and valid.jsonl.")
    if not Path(args.data).is_dir():
        raise LoadError(f"--data {args.data}: preference data must be a local folder holding train.jsonl.")
    return load_splits(Path(args.data), args, lambda p: load_pairs(p, tokenizer, args.max_seq_length, args.batch_size))


def collate(pairs: List[Pair], max_seq_length: int):
    """Chosen rows, then rejected rows, padded as mlx-lm pads (to 32k + 1 tokens:
    few shapes to compile); lengths hold [response offset, length] per row."""
    rows = [c for c, _ in pairs] + [r for _, r in pairs]
    longest = max(len(t) for t, _ in rows)
    width = min(1 + 32 * ((longest + 31) // 32), max_seq_length)
    batch = np.zeros((len(rows), width), np.int32)
    for i, (tokens, _) in enumerate(rows):
        batch[i, : len(tokens)] = tokens
    return mx.array(batch), mx.array([[offset, len(tokens)] for tokens, offset in rows])


def iterate_pairs(pairs: List[Pair], batch_size: int, max_seq_length: int, seed: int, comm_group=None):
    """One pass over the pairs in batches, as mlx-lm's iterate_batches: sorted by
    length, batches in an order drawn from ``seed``, each process its share."""
    rank, size = (comm_group.rank(), comm_group.size()) if comm_group is not None else (0, 1)
    order = sorted(range(len(pairs)), key=lambda i: max(len(t) for t, _ in pairs[i]))
    batches = [order[i + rank : i + batch_size : size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    for b in np.random.RandomState(seed).permutation(len(batches)):
        yield collate([pairs[i] for i in batches[b]], max_seq_length)


def train_batches(pairs: List[Pair], args, world, skip: int = 0):
    return sft_batches(pairs, args, world, skip, iterate=iterate_pairs)


def sequence_logps(model, batch, lengths):
    """Per row: the summed log-probability of its response tokens, and their number."""
    logits = model(batch[:, :-1])
    targets = batch[:, 1:]
    steps = mx.arange(1, targets.shape[1] + 1)  # index in the row of each target token
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])
    logp = -nn.losses.cross_entropy(logits, targets).astype(mx.float32)
    return (logp * mask).sum(-1), mask.sum(-1).astype(mx.float32)


def dpo_losses(pi_c, pi_r, ref_c, ref_r, beta: float, loss_type: str = "sigmoid"):
    """Per-pair DPO losses and the chosen and rejected rewards."""
    d = (pi_c - ref_c) - (pi_r - ref_r)
    if loss_type == "sigmoid":
        losses = -nn.log_sigmoid(beta * d)
    elif loss_type == "hinge":
        losses = nn.relu(1 - beta * d)
    elif loss_type == "ipo":
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        raise LoadError(f"dpo_loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {loss_type!r}.")
    return losses, beta * (pi_c - ref_c), beta * (pi_r - ref_r)


def log1m_exp(x):
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it. Each branch
    gets an input inside its range, so the unused one gives no inf (or NaN gradient)."""
    near = x > -0.6931
    return mx.where(near, mx.log(-mx.expm1(mx.maximum(x, -0.6931))), mx.log1p(-mx.exp(mx.minimum(x, -0.6931))))


def orpo_losses(avg_c, avg_r, beta: float):
    """Per-pair ORPO odds-ratio terms ``-beta log sigmoid(log_odds)`` and the rewards."""
    log_odds = (avg_c - avg_r) - (log1m_exp(avg_c) - log1m_exp(avg_r))
    return -beta * nn.log_sigmoid(log_odds), beta * avg_c, beta * avg_r


def adapter_layers(model) -> list:
    return [(name, m) for name, m in model.named_modules() if type(m) in ADAPTERS]


@contextmanager
def adapters_off(model):
    """The model as its base: every adapter layer replaced by the layer it wraps (scale 0
    would not do for DoRA, whose trained magnitude rescales the base output)."""
    adapted = adapter_layers(model)
    model.update_modules(tree_unflatten([(n, getattr(m, ADAPTERS[type(m)])) for n, m in adapted]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(adapted))


def only_adapters_train(model) -> bool:
    """True when every trainable weight is an adapter's own (switching them off gives the base)."""
    own = {f"{name}.{k}" for name, m in adapter_layers(model) for k, v in m.items() if isinstance(v, mx.array)}
    return {k for k, _ in tree_flatten(model.trainable_parameters())} <= own


def make_loss(train_mode: str, beta: float, loss_type: str = "sigmoid", reference=None, world=None):
    """The Trainer's ``loss(model, batch, lengths) -> (value, metrics)``; ``reference`` None: the model
    with its adapters off. Metrics, summed over batches and processes: (loss x pairs, response tokens,
    pairs, chosen rewards, rejected rewards, pairs ranked right)."""
    world = world or mx.distributed.init()

    def loss(model, batch, lengths):
        n = batch.shape[0] // 2
        if train_mode == "orpo":
            logps, counts = sequence_logps(model, batch, lengths)
            avg = logps / counts
            odds, rc, rr = orpo_losses(avg[:n], avg[n:], beta)
            tokens = counts[:n].sum()
            nll = -logps[:n].sum() / tokens
            if world.size() > 1:  # each process's NLL weighted by its share of tokens
                nll = nll * (tokens * world.size() / mx.distributed.all_sum(tokens, group=world, stream=mx.cpu))
            value = nll + odds.mean()
        else:
            if reference is None:
                with adapters_off(model):
                    ref = sequence_logps(model, batch, lengths)[0]
            else:
                ref = sequence_logps(reference, batch, lengths)[0]
            ref = mx.stop_gradient(ref)  # a constant of the batch
            # The reference pass first, its logits freed before the model's pass allocates its own.
            logps, counts = sequence_logps(model, mx.depends(batch, ref), lengths)
            if loss_type == "ipo":
                logps, ref = logps / counts, ref / counts
            losses, rc, rr = dpo_losses(logps[:n], logps[n:], ref[:n], ref[n:], beta, loss_type)
            value = losses.mean()
        pairs = mx.array(float(n))
        return value, (value * pairs, counts.sum(), pairs, rc.sum(), rr.sum(),
                       (rc > rr).astype(mx.float32).sum())

    return loss


def summary(totals) -> dict:
    """Means over pairs of summed metrics."""
    loss, tokens, pairs, rc, rr, right = totals
    return {"loss": loss / pairs, "rewards_chosen": rc / pairs, "rewards_rejected": rr / pairs,
            "margin": (rc - rr) / pairs, "accuracy": right / pairs, "tokens": tokens}


def describe(s: dict) -> str:
    return (f"loss {s['loss']:.3f}, rewards chosen {s['rewards_chosen']:.3f}, rejected "
            f"{s['rewards_rejected']:.3f}, margin {s['margin']:.3f}, accuracy {s['accuracy']:.3f}")


def evaluate(model, pairs: List[Pair], loss, batch_size: int, num_batches: int, max_seq_length: int,
             seed: int) -> dict:
    """The metrics over ``num_batches`` batches (-1: all), the same batches for the same seed."""
    model.eval()
    totals = None
    batches = iterate_pairs(pairs, batch_size, max_seq_length, seed, mx.distributed.init())
    for batch in islice(batches, None if num_batches == -1 else num_batches):
        metrics = loss(model, *batch)[1]
        totals = metrics if totals is None else tuple(a + b for a, b in zip(totals, metrics))
        mx.eval(totals)
    return summary([mx.distributed.all_sum(m, stream=mx.cpu).item() for m in totals])


def reference_model(args, model, tokenizer):
    """The frozen model DPO compares against, or None for ``model`` with its adapters off."""
    if args.train_mode != "dpo":
        return None
    path = args.reference_model_path
    if path is None:
        if only_adapters_train(model):
            rprint("Reference model: the base (adapters switched off)", flush=True)
            return None
        path = args.model
        rprint("Reference model: a frozen copy of the base", flush=True)
    else:
        rprint(f"Reference model: {path}", flush=True)
    reference, ref_tokenizer = load(path)
    if path != args.model and ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise LoadError(
            f"--reference-model-path {path} has another vocabulary than --model {args.model}; "
            "DPO compares the two models' log-probabilities of the same tokens."
        )
    reference.freeze()
    reference.eval()
    return reference


def check_args(args) -> None:
    if args.train_mode not in TRAIN_MODES:
        raise LoadError(f"train_mode must be one of {', '.join(TRAIN_MODES)}, got {args.train_mode!r}.")
    if args.dpo_loss_type not in DPO_LOSS_TYPES:
        raise LoadError(f"dpo_loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {args.dpo_loss_type!r}.")
    if args.reference_model_path is not None and args.train_mode != "dpo":
        raise LoadError(f"--reference-model-path is for --train-mode dpo; {args.train_mode} uses none.")


def loss_for(args, model, tokenizer):
    """The loss of ``args``, with its DPO reference (after the trainable weights are set up)."""
    return make_loss(args.train_mode, args.beta, args.dpo_loss_type, reference_model(args, model, tokenizer))


def train(trainer: Trainer, train_set: List[Pair], valid_set: List[Pair], args, adapter_file,
          loss, trained: int = 0, callback=None) -> None:
    """Preference pairs on the shared loop, with their metrics in the report lines."""
    # The same validation batches every time: a resumed run reports what an uninterrupted one does.
    validation = lambda: evaluate(trainer.model, valid_set, loss, args.batch_size, args.val_batches,
                                  args.max_seq_length, derived_seed(args.seed, 2))
    run_loop(trainer, train_batches(train_set, args, trainer.world, skip=trainer.step), args, adapter_file, trained,
             callback, summarize=lambda metrics, steps: summary(metrics), validation=validation if valid_set else None,
             describe=describe)


def test(args, model, tokenizer, test_set: List[Pair], loss=None) -> None:
    """``--test``, with the loss of the training just done (its reference) if there was one."""
    s = evaluate(model, test_set, loss or loss_for(args, model, tokenizer), args.batch_size, args.test_batches,
                 args.max_seq_length, derived_seed(args.seed, 3))
    rprint(f"Test {describe(s)}.", flush=True)
