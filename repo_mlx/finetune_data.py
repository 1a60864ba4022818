"""Fine-tuning data: mlx-lm's datasets and formats, with every problem named by
file and line before training starts."""

import warnings
from pathlib import Path
from typing import List, Tuple

import mlx.core as mx
from mlx_lm.tuner.datasets import ChatDataset, CompletionsDataset, create_dataset

from .errors import LoadError, one_line
from .loader import check_hub_reachable, is_hub_id
from .pretrain_data import json_lines

Example = Tuple[List[int], int]  # tokens, index of the first token the loss sees


class PlainCompletions(CompletionsDataset):
    """prompt + completion joined as they are: base models have no chat template."""

    def process(self, d):
        prompt = self.tokenizer.encode(d[self.prompt_key])
        tokens = prompt + self.tokenizer.encode(d[self.completion_key]) + [self.tokenizer.eos_token_id]
        return tokens, len(prompt) if self.mask_prompt else 0


def read_jsonl(path: Path) -> List[Tuple[int, dict]]:
    records = []
    for n, record in json_lines(path):
        if not isinstance(record, dict):
            raise LoadError(f"{path}, line {n}: expected a JSON object, got {type(record).__name__}.")
        records.append((n, record))
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
        return PlainCompletions(data, tokenizer, dataset.prompt_key, dataset.completion_key, dataset.mask_prompt)
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
        warnings.warn(f"{where}: {len(long)} example(s) longer than --max-seq-length {max_seq_length} tokens are "
                      f"truncated (line {lines}; longest {max(k for _, k in long)} tokens).")
    return examples


def load_data(args, tokenizer) -> Tuple[List[Example], List[Example], List[Example]]:
    """train, valid and test examples from ``args.data`` (a folder or Hub dataset)."""
    if args.data is None and not getattr(args, "hf_dataset", None):
        raise LoadError("--data is required: a folder with train.jsonl and valid.jsonl.")
    folder = Path(args.data) if args.data is not None else None
    if folder is not None and folder.exists():
        if not folder.is_dir():
            raise LoadError(f"--data {folder} is a file; pass the folder holding train.jsonl.")
        return load_splits(folder, args, lambda path: _load_examples(path, args, tokenizer))
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


def load_splits(folder: Path, args, load) -> tuple:
    """train, valid and test of ``folder``, each ``load(path)`` where the run needs it."""
    out = []
    for name, wanted in (("train", args.train), ("valid", args.train), ("test", args.test)):
        path = folder / f"{name}.jsonl"
        if wanted and not path.exists():
            if name != "valid":
                raise LoadError(f"{path} does not exist; --{name} needs it.")
            if mx.distributed.init().rank() == 0:
                warnings.warn(f"{path} does not exist; training without validation.")
        out.append(load(path) if wanted and path.exists() else [])
    return tuple(out)


def _load_examples(path: Path, args, tokenizer) -> List[Example]:
    records = read_jsonl(path)
    dataset = _make_dataset(records, tokenizer, args, str(path))
    examples = tokenize(dataset, [n for n, _ in records], str(path), args.max_seq_length)
    if len(examples) < args.batch_size:
        raise LoadError(f"{path} has {len(examples)} examples, fewer than --batch-size {args.batch_size}.")
    return examples
