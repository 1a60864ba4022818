"""Outputs that appear whole or not at all: a kill, an error or Ctrl-C during a
write leaves the previous file or folder (or nothing), never a torn one."""

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from .errors import LoadError


@contextlib.contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Yield a scratch path that becomes ``path`` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise LoadError(f"Cannot write {path}: {e.strerror or e}.") from None
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(dst, force: bool) -> Iterator[Path]:
    """Yield a scratch folder that becomes ``dst`` only if the block succeeds."""
    dst = Path(dst)
    if dst.exists() and not force:
        raise LoadError(f"{dst} already exists; pass --force to replace it.")
    if dst.exists() and not dst.is_dir():
        raise LoadError(f"{dst} exists and is not a folder.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
