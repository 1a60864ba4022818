"""Pre-training data: documents -> memory-mapped token cache -> packed sequences.

The cache is named by a fingerprint of the data and the tokenizer; its stream is cut into ``seq_len``-token
sequences (the tail that fills none is dropped, as OLMo does), visited in an order that depends only on
(seed, epoch): the data cursor is just the number of sequences consumed."""

import functools
import hashlib
import io
import json
import shutil
import time
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

from .errors import LoadError, one_line
from .files import atomic_file
from .loader import check_hub_reachable, is_hub_id

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
CACHE_VERSION = 1


def data_files(path: str) -> List[Path]:
    """The files ``path`` names (a file, or a folder's .txt/.jsonl/.parquet files)."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise LoadError(f"{p} holds no .txt, .jsonl or .parquet files; pass a text file or a folder of them.")
        return files
    if p.exists():
        raise LoadError(f"{p} is neither a file nor a folder.")
    return []  # a Hub dataset id, or missing: the caller decides


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LoadError(f"{file} is not UTF-8 text (byte {e.start}).") from None
    except OSError as e:
        raise LoadError(f"Cannot read {file}: {e.strerror}.") from None


def json_lines(file: Path) -> Iterator[Tuple[int, object]]:
    """(line number, value) of each non-blank line, split where open() splits lines."""
    for n, line in enumerate(io.StringIO(_read_text(file), newline=None), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise LoadError(f"{file}, line {n}: not valid JSON ({e.msg} at column {e.colno}).") from None


def _jsonl_documents(file: Path, key: str) -> Iterator[str]:
    for n, record in json_lines(file):
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            raise LoadError(f"{file}, line {n}: needs a string {key!r} field (--text-feature).")
        yield record[key]


def _parquet_documents(file: Path, key: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LoadError(f"{file}: reading .parquet needs pyarrow; pip install 'repo-mlx[data]'.") from None
    try:
        table = pq.ParquetFile(file)
    except Exception as e:
        raise LoadError(f"Cannot read {file} as parquet: {one_line(e)}") from None
    if key not in table.schema_arrow.names:
        raise LoadError(f"{file} has no {key!r} column (--text-feature); it has {table.schema_arrow.names}.")
    for batch in table.iter_batches(columns=[key]):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _hub_dataset(name: str, split: str, key: str):
    try:
        import datasets
    except ImportError:
        raise LoadError(
            f"--data {name} looks like a Hub dataset id, which needs the datasets "
            "package (pip install 'repo-mlx[data]'), or pass a local file or folder."
        ) from None
    from huggingface_hub.utils import logging as hub_logging

    # Their retry warnings would bury the one-line error below.
    hub_logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    check_hub_reachable(f"--data {name}")
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise LoadError(
            f"Cannot load Hub dataset {name} (split {split}): {type(e).__name__}: "
            f"{one_line(e)[:200]}. Check the id and the connection, or pass a local file or folder."
        ) from None
    if key not in ds.column_names:
        raise LoadError(f"Hub dataset {name} has no {key!r} column (--text-feature); it has {ds.column_names}.")
    return ds


class Source:
    """Where documents come from, and a fingerprint that changes when they do."""

    def __init__(self, path: str, text_key: str = "text", split: str = "train"):
        self.path, self.key, self.split = path, text_key, split
        self.files = data_files(path)
        self.hub = None
        if not self.files:
            if not is_hub_id(path) or Path(path).suffix in TEXT_SUFFIXES:
                raise LoadError(f"Data {path} does not exist (a file, a folder or a Hub dataset id).")
            self.hub = _hub_dataset(path, split, text_key)

    @functools.lru_cache(maxsize=1)
    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{CACHE_VERSION}|{self.key}|".encode())
        if self.hub is not None:
            h.update(f"hub|{self.path}|{self.split}|{self.hub._fingerprint}".encode())
        for f in self.files:
            # Content, not mtime: a rewritten but equal file keeps its cache.
            h.update(f"{f.name}|{f.stat().st_size}|".encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()

    def documents(self) -> Iterator[str]:
        if self.hub is not None:
            yield from (t for t in self.hub[self.key] if t is not None)
            return
        for f in self.files:
            if f.suffix == ".jsonl":
                yield from _jsonl_documents(f, self.key)
            elif f.suffix == ".parquet":
                yield from _parquet_documents(f, self.key)
            else:  # a plain text file is one document
                yield _read_text(f)


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes when the tokenizer would give other ids."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    backend = getattr(hf, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(hf.get_vocab().items()))
    return hashlib.sha256(f"{text}|{tokenizer.eos_token_id}".encode()).hexdigest()


def encode_documents(tokenizer, docs: Iterator[str], chunk: int = 256) -> Iterator[np.ndarray]:
    """Each document's ids followed by EOS; no BOS (OLMo-2 adds none)."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    docs = (d for d in docs if d.strip())
    while batch := list(islice(docs, chunk)):
        for ids in hf(batch, add_special_tokens=False)["input_ids"]:
            yield np.asarray(ids + [tokenizer.eos_token_id], dtype=np.uint32)


def token_cache(source: Source, tokenizer, cache_dir: Path, name: str, log: Callable = print) -> np.ndarray:
    """The source's tokens as a read-only memmap, built once per fingerprint."""
    key = hashlib.sha256(f"{source.fingerprint()}|{tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()[:16]
    file = cache_dir / f"{name}-{key}.u32"
    if file.exists():
        log(f"Token cache {file} (reused)")
        return np.memmap(file, dtype=np.uint32, mode="r")
    created = not cache_dir.exists()
    n_docs = n_tokens = 0
    tic = last = time.perf_counter()
    try:
        with atomic_file(file) as tmp, open(tmp, "wb") as out:
            for ids in encode_documents(tokenizer, source.documents()):
                out.write(ids.tobytes())
                n_docs, n_tokens = n_docs + 1, n_tokens + len(ids)
                if time.perf_counter() - last > 10:
                    last = time.perf_counter()
                    log(f"Tokenizing {source.path}: {n_docs} documents, {n_tokens} tokens, "
                        f"{n_tokens / (last - tic):.0f} tokens/s")
            if n_tokens == 0:
                raise LoadError(f"Data {source.path} holds no text (all documents are empty).")
    except BaseException:
        if created:  # bad data leaves nothing behind
            shutil.rmtree(cache_dir, ignore_errors=True)
        raise
    for old in cache_dir.glob(f"{name}-*.u32"):  # stale caches of this split
        if old != file:
            old.unlink()
    log(f"Token cache {file}: {n_docs} documents, {n_tokens} tokens")
    return np.memmap(file, dtype=np.uint32, mode="r")


class Packed:
    """``tokens`` cut into ``seq_len``-token sequences, optionally a range of them."""

    def __init__(self, tokens: np.ndarray, seq_len: int, start: int = 0, stop: Optional[int] = None):
        self.tokens, self.seq_len = tokens, seq_len
        self.start, self.stop = start, len(tokens) // seq_len if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> np.ndarray:
        j = (self.start + i) * self.seq_len
        return self.tokens[j : j + self.seq_len]

    def batch(self, indices) -> np.ndarray:
        return np.stack([self[int(i)] for i in indices]).astype(np.int32)


def split(tokens: np.ndarray, seq_len: int, val_share: float) -> Tuple[Packed, Packed]:
    """Train and held-out sequences: the last ``val_share`` of them is validation."""
    n = len(tokens) // seq_len
    n_val = int(round(n * val_share))
    if val_share > 0 and n_val == 0 and n >= 2:
        n_val = 1
    return Packed(tokens, seq_len, 0, n - n_val), Packed(tokens, seq_len, n - n_val, n)


@functools.lru_cache(maxsize=2)
def order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Epoch ``epoch``'s permutation of n sequences: a function of (seed, epoch) only."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2, epoch]))
    return rng.permutation(n)


def batch_indices(n: int, seed: int, cursor: int, size: int) -> np.ndarray:
    """The ``size`` sequences after the first ``cursor`` of the shuffled stream."""
    return np.asarray([order(n, seed, pos // n)[pos % n] for pos in range(cursor, cursor + size)])
